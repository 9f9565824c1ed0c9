"""
bench.py's generation benchmark (--what=generate: bench_generate) and how it times decoding:
the seconds at each new token of generate_stream (one sample or a batch, eager or through a
compiled StaticDecoder), the tutorial's concatenate-and-re-rotate decoding, the bytes a static
step reads, and a floor for a batch step on a CPU (its matrix products, and reading its caches once).

    from decode_timing import time_generation
    stamps, stats = time_generation(model, 256, KVOptions(kv_window=64), "cpu")
"""
import time
from dataclasses import replace

import torch

from device_peaks import peak_bandwidth
from devices import synchronizer
from generate import generate_stream, say_once, static_decoder
from utils import compile_or_eager


SAMPLING = dict(temperature=1.0, top_k=200)  # how the rows sample (sample.py's top_k; the model's own temperature)


def time_generation(model, n_new, kv, device, decoder=None, batch=1, drawn=None):
    """Seconds since the start at each new token, and the KV stats (a decoder made with SAMPLING);
    the new tokens go to the list drawn, if given. Row k of every run draws from a generator
    seeded k, as sample.py's sample k draws from --seed + k."""
    prompt = torch.full((batch, 4), ord("#"), dtype=torch.long, device=device)
    stats, stamps = {}, []
    sync = synchronizer(device)
    g = [torch.Generator(device=device).manual_seed(k) for k in range(batch)]
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


def time_baseline(model, device, n_new, window):
    """The tutorial's decoding: cut history by concatenation, re-rotate all keys each step."""
    from tests.tutorial_reference import TutorialReference
    c = model.config
    ref = TutorialReference(model.state_dict(), c.n_layer, c.n_head, kv_window=window)
    sync = synchronizer(device)  # (the reference's tensors are on its weights' device)
    t0 = time.perf_counter()
    logits = ref(torch.full((1, 4), ord("#"), dtype=torch.long, device=device))
    for _ in range(n_new - 1):
        logits = ref(torch.multinomial(torch.softmax(logits[:, -1], dim=-1), 1))
    sync()
    return time.perf_counter() - t0


NOTE = say_once(print)  # a note on why a cache stays eager, printed once whatever asks again


def compiled_decoder(model, kv, batch, capacity, what, say=NOTE, **kw):
    """A StaticDecoder (None where the cache stays eager: the note why), its compile time said."""
    dec = static_decoder(model, kv, batch, capacity, say=say, **kw)
    if dec is not None:
        say(dec.compile_line(f" for {what}"))
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
        return fastest_ms(lambda: f(xs), calls)


def stream_ms(nbytes, calls=300):
    """ms for one core to read nbytes once: a sum over a float32 tensor of that size (fastest of
    3 runs), the rate a step reading its caches could at best reach on this machine."""
    x = torch.ones(max(nbytes // 4, 1))
    return fastest_ms(x.sum, calls)


def fastest_ms(fn, calls):
    """ms per call of fn(), the fastest of 3 runs of calls calls."""
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - t0) / calls * 1e3)
    return min(runs)


def bench_generate(model, device, kv, lengths, compile=False, baseline=False, batch=8):
    """bench.py --what=generate: tokens/s eager and (compile) compiled for each count of new tokens
    in lengths, unbounded and in kv's window (256 if none); the time per token over the first and
    last 1024; (baseline) the tutorial's decoding; batch samples side by side against one (batch
    > 1); on CUDA the rows without CUDA graphs and the bandwidth used. Prints markdown tables."""
    window = kv.kv_window if kv.kv_window > 0 else 256
    n = max(lengths)
    state = model.config.no_kv_cache  # linear attention in every layer: a fixed-size state, no window to bound
    key = 0 if state else window  # the rows the per-token times, the baseline and the batch read
    # the rows' caches: unbounded (where nothing is dropped a sink means nothing: an evicting
    # cache keeps its sink inside kv_budget), and the window with any sink
    rows = {0: replace(kv, kv_window=0, kv_sink=kv.kv_sink if kv.kv_evict != "none" else 0),
            window: replace(kv, kv_window=window)}
    names = {0: "fixed state" if state else "unbounded",
             window: f"{window}" + (f" + sink {kv.kv_sink}" if kv.kv_sink else "")}
    # compiled decoders sized as sample.py sizes them, for the prompt and the new tokens: one per
    # row for the unbounded cache (it attends over all its slots), one for the window's rows
    decs = {}
    if compile:
        decs = {(0, m): compiled_decoder(model, rows[0], 1, 4 + m, f"unbounded, {m} tokens", **SAMPLING) for m in lengths}
        if not state:
            ring = compiled_decoder(model, rows[window], 1, 4 + n, f"kv_window={names[window]}", **SAMPLING)
            decs.update({(window, m): ring for m in lengths})
    time_generation(model, 16, kv, device)  # a warm-up: the first eager row would pay for it
    print(f"\ngeneration: KV cache {kv.describe() if kv.compressed else 'plain (full precision)'}, batch 1, top_k 200")
    # (no memory column: the KV bits are the cache's; the process's RSS also holds what the
    # allocator keeps after keep_freed_memory, and what compiling took)
    # (compiled text: whether the compiled run drew the eager run's bytes, from the same seed)
    print("\n| new tokens | kv_window | tokens/s eager | tokens/s compiled | compiled / eager | KV bits (peak) | "
          "KV bits/cached token | compiled text |")
    print("|---|---|---|---|---|---|---|---|")
    runs = {}
    for w in (0,) if state else (0, window):
        for m in lengths:
            drawn, drawn_fast = [], []
            stamps, stats = time_generation(model, m, rows[w], device, drawn=drawn)
            dec = decs.get((w, m))
            fast, _ = time_generation(model, m, rows[w], device, dec, drawn=drawn_fast) if dec else (None, 0)
            runs[w, m] = stamps, fast
            c = f"{m / fast[-1]:,.0f} | {stamps[-1] / fast[-1]:.2f}x" if fast else "- | -"
            per_token = "-" if state else f"{stats['kv_bits_per_token']:,.0f}"  # (a state is not per token)
            print(f"| {m} | {names[w]} | {m / stamps[-1]:,.0f} | {c} | {stats['kv_bits_peak']:,} | "
                  f"{per_token} | {agreement(drawn, drawn_fast) if fast else '-'} |", flush=True)
    if n >= 2048:
        for name, st in zip(("eager", "compiled"), runs[key, n]):
            if st:
                first, last = st[1024] - st[0], st[-1] - st[-1025]
                where = "fixed state" if state else f"kv_window={window}"
                print(f"\n{name}, {where}, {n} tokens in {st[-1]:.2f} s: {first / 1.024:.3f} ms/token over the "
                      f"first 1024, {last / 1.024:.3f} over the last 1024 ({last / first - 1:+.0%})")
    if baseline and state:
        print("no tutorial-style baseline: it concatenates and re-rotates a KV cache, which linear attention "
              "does not keep")
    elif baseline:
        t = time_baseline(model, device, n, window)
        ours = runs[window, n][0][-1]
        print(f"tutorial-style baseline (concatenate + re-rotate), kv_window={window}: {n} tokens in {t:.2f} s, "
              f"{t / ours:.2f}x the time ours takes eager ({ours:.2f} s)")
    if batch > 1:
        bench_batched(model, device, rows[key], n, decs.get((key, n)), batch)
    bw = peak_bandwidth(device)
    if decs.get((window, n)) and device.startswith("cuda"):
        plain = compiled_decoder(model, replace(kv, kv_window=window), 1, 4 + n, "no CUDA graphs", cuda_graphs=False,
                                 **SAMPLING)
        print(f"\nCUDA, kv_window={window}, {n} tokens: " + (f"bytes read per step (weights + every cache slot) x "
              f"steps/s / peak bandwidth ({bw / 1e12:.2f} TB/s)" if bw else "tokens/s (peak bandwidth of this GPU unknown)"))
        for name, dec in (("CUDA graphs", decs[window, n]), ("compiled, no CUDA graphs", plain)):
            st, _ = time_generation(model, n, replace(kv, kv_window=window), device, dec)
            frac = f", {read_bytes(model, dec) * n / st[-1] / bw:.2%} of the bandwidth" if bw else ""
            print(f"- {name}: {n / st[-1]:,.0f} tokens/s{frac}")


def bench_batched(model, device, kv, n, dec1, B):
    """B samples side by side (sample.py --num_samples) against one (dec1: its compiled decoder, or None)."""
    decB = compiled_decoder(model, kv, B, 4 + n, f"batch {B}", **SAMPLING) if dec1 is not None else None
    print(f"\n{B} samples side by side, kv_window={kv.kv_window}, {n} new tokens each: wall time of the batch "
          "against one sample")
    print(f"\n| decode | 1 sample s | {B} samples s | ratio |")
    print("|---|---|---|---|")
    for name, d1, dB in (("eager", None, None), ("compiled", dec1, decB)):
        if name == "compiled" and dec1 is None:
            continue
        one = time_generation(model, n, kv, device, d1)[0][-1]
        many = time_generation(model, n, kv, device, dB, batch=B)[0][-1]
        print(f"| {name} | {one:.2f} | {many:.2f} | {many / one:.2f}x |", flush=True)
    if decB is not None and device == "cpu":
        ms = products_ms(model, B)
        per_token = one * 1e3 / n  # ms per token of one compiled sample, all of it
        cache_bytes = sum(t.numel() * t.element_size() for t in decB.buffers())
        read = stream_ms(cache_bytes)
        print(f"\nthe matrix products alone of a batch-{B} step (each Linear once on {B} rows, compiled as the "
              f"step is): {ms:.3f} ms, {ms / per_token:.2f}x one compiled sample's whole time per token; "
              f"reading its caches once ({cache_bytes / 2**20:.1f} MiB, at the rate one core sums a tensor that "
              f"large): {read:.3f} ms, {read / per_token:.2f}x; the two together, a floor for the ratio: "
              f"{(ms + read) / per_token:.2f}x")
