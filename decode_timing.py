"""
How bench.py times decoding: the seconds at each new token of generate_stream (one sample or a
batch, eager or through a compiled StaticDecoder), the tutorial's concatenate-and-re-rotate
decoding, the bytes a static step reads, and the floor of a batch step on a CPU (its matrix
products alone).

    from decode_timing import time_generation
    stamps, stats = time_generation(model, 256, KVOptions(kv_window=64), "cpu")
"""
import time

import torch

from devices import synchronizer
from generate import generate_stream, say_once, static_decoder
from utils import compile_or_eager


SAMPLING = dict(temperature=1.0, top_k=200)  # how the rows sample (sample.py's top_k; the model's own temperature)


def time_generation(model, n_new, kv, device, decoder=None, batch=1, drawn=None):
    """Seconds since the start at each new token, and the KV stats (a decoder made with SAMPLING);
    the new tokens go to the list drawn, if given. Every run draws from a generator seeded 0."""
    prompt = torch.full((batch, 4), ord("#"), dtype=torch.long, device=device)
    stats, stamps = {}, []
    sync = synchronizer(device)
    g = torch.Generator(device=device).manual_seed(0)
    sync()
    t0 = time.perf_counter()
    for token in generate_stream(model, prompt, n_new, **SAMPLING, kv=kv, stats=stats,
                                 generator=g, decoder=decoder):
        sync()
        stamps.append(time.perf_counter() - t0)
        if drawn is not None:
            drawn.append(token)
    return stamps, stats


def agreement(eager, compiled):
    """"same" where two runs drew the same tokens (lists of (B, 1)), else the byte where the
    compiled text parts from the eager one (float rounding can flip a draw: on a GPU, in bfloat16)."""
    parted = (torch.cat(eager, 1) != torch.cat(compiled, 1)).any(0).nonzero()
    return "same" if parted.numel() == 0 else f"parts at byte {int(parted[0]) + 1}"


def time_baseline(model, n_new, window):
    """The tutorial's decoding: cut history by concatenation, re-rotate all keys each step."""
    from tests.tutorial_reference import TutorialReference
    c = model.config
    ref = TutorialReference(model.state_dict(), c.n_layer, c.n_head, kv_window=window)
    t0 = time.perf_counter()
    logits = ref(torch.full((1, 4), ord("#"), dtype=torch.long))
    for _ in range(n_new - 1):
        logits = ref(torch.multinomial(torch.softmax(logits[:, -1], dim=-1), 1))
    return time.perf_counter() - t0


NOTE = say_once(print)  # a note on why a cache stays eager, printed once whatever asks again


def compiled_decoder(model, kv, batch, capacity, what, say=NOTE, **kw):
    """A StaticDecoder (None where the cache stays eager: the note why), its compile time said."""
    dec = static_decoder(model, kv, batch, capacity, say=say, **kw)
    if dec is not None:
        say(f"compiled the decode step for {what} in {dec.compile_seconds:.1f} s")
    return dec


def read_bytes(model, dec):
    """Bytes a decode step reads: every weight, and every slot of the static caches."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return weights + sum(t.numel() * t.element_size() for t in dec.buffers())


def products_ms(model, B, calls=300):
    """ms for the matrix products of one decode step at batch B: every Linear of the model once,
    on (B, in_features) rows, compiled with the step's CPU options (fastest of 3 runs). Neither
    attention nor any overhead is in it: a floor for the batch-B step on this machine."""
    lins = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = [torch.randn(B, m.in_features) for m in lins]
    products = lambda xs: [m(x) for m, x in zip(lins, xs)]
    with torch.no_grad():
        f = compile_or_eager(products, lambda f: f(xs), fixed_args=(xs,), fullgraph=True, options={"cpp_wrapper": True})
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(calls):
                f(xs)
            runs.append((time.perf_counter() - t0) / calls * 1e3)
    return min(runs)
