"""
Generation: prefill the prompt in one forward, then one decode step per new token.

    from generate import generate
    from kv.policy import KVOptions
    out = generate(model, idx, max_new_tokens=100, temperature=0.8, top_k=200)
    out = generate(model, idx, 100, kv=KVOptions(kv_window=256, kv_quant="int4"))

The decode step is a function of its own so it can be timed and compiled alone. The fast
one, StaticDecoder, runs it over the static-shape caches of kv/static.py, compiled once:

    dec = StaticDecoder(model, KVOptions(kv_window=256), batch_size=8, capacity=T + 500)
    out = generate(model, idx, 500, decoder=dec)       # idx (8, T): 8 samples in one batch
"""

import time
import warnings

import torch

from kv.policy import KVOptions, held_bits, state_bits
from kv.static import static_reason
from plugins import not_finite
from utils import compile_or_eager


def sampling_probs(logits, temperature, top_k=None):
    """The probabilities (B, V), float32, that sample_next draws the next byte from (temperature > 0)."""
    scaled = logits.float() / temperature
    if temperature < 1e-3:  # (only a tiny temperature overflows float32)
        # a row that overflowed: the limit it tends to, the largest logits (0 after the shift),
        # the others -inf or far below (a tensor rule, not an if: the compiled step runs it too)
        shifted = (logits.float() - logits.float().amax(-1, keepdim=True)) / temperature
        scaled = torch.where(torch.isinf(scaled).any(-1, keepdim=True), shifted, scaled)
    V = scaled.size(-1)
    if top_k is not None and 0 < top_k < V:  # keep the top_k largest (and any tied with the last)
        kth = torch.kthvalue(scaled, V - int(top_k) + 1, dim=-1, keepdim=True).values  # (B, 1)
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    return torch.softmax(scaled, dim=-1)


def sample_next(logits, temperature=1.0, top_k=None, generator=None):
    """Pick the next byte from logits (B, V): greedy when temperature == 0. generator: one for
    the batch, or a list of B, row b drawing from the b-th alone (what it draws on its own)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    if isinstance(generator, (list, tuple)):  # multinomial's own rule, its noise drawn row by row
        noise = draw_noise(torch.empty(logits.shape, device=logits.device), generator)  # (a third of B calls' time)
        return pick_next(logits, temperature, top_k, noise)
    return torch.multinomial(sampling_probs(logits, temperature, top_k), num_samples=1, generator=generator)


def pick_next(logits, temperature, top_k, noise):
    """sample_next without a generator, for the compiled step: noise (B, V) holds Exp(1) draws,
    and the byte picked is argmax(probs / noise). That is how torch.multinomial draws one
    sample, from draws made as draw_noise makes them: from the same generator, the same bytes
    (tested on the CPU, and on CUDA by .ci/gpu; a device whose multinomial has a kernel of its
    own may draw other bytes from the same distribution)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    return (sampling_probs(logits, temperature, top_k) / noise).argmax(dim=-1, keepdim=True)


def draw_noise(noise, generator=None):
    """Fill noise (B, V) with the Exp(1) draws torch.multinomial would take from generator (or
    from a list of B generators, one per row, as sample_next takes them)."""
    if isinstance(generator, (list, tuple)):
        for row, g in zip(noise, generator, strict=True):
            row.exponential_(1.0, generator=g)
        return noise
    return noise.exponential_(1.0, generator=generator)


def decode_step(model, token, caches):
    """One new token (B, 1) through the model: the logits (B, V) of the byte after it."""
    logits, _ = model(token, caches)
    return logits[:, -1]


def static_step(model, token, caches, rot_table):
    """decode_step over the static caches of kv/static.py: token (B, 1) at the position of
    their Clock, which it advances. -> logits (B, V). What StaticDecoder compiles."""
    clock = caches[0].clock  # layer 0 always owns a cache
    logits = model.step(token, clock.t, rot_table, caches)
    clock.t.add_(1)
    return logits[:, -1]


def static_sample_step(model, token, caches, rot_table, noise, temperature, top_k):
    """static_step, then the next byte picked from its logits (pick_next) -> (B, 1): sampling
    inside the compiled step saves a dozen small eager operations per token."""
    return pick_next(static_step(model, token, caches, rot_table), temperature, top_k, noise)


def static_flush(caches):
    """Quantize in each of these static quantized caches (those with flush_apart, each once) the
    group the coming step completes: what StaticDecoder runs, compiled, once per G tokens."""
    for c in caches:
        c.flush()


SLOTS_STEP = 64  # a decoder's buffers hold a multiple of this many tokens (its capacity rounded up)


class StaticDecoder:
    """The decode step over static caches of its own, for one model, cache kind (KVOptions),
    batch size and capacity (text length), compiled once:

        dec = StaticDecoder(model, kv, batch_size=B, capacity=T + n)
        dec.start()                 # empty caches; or dec.start(caches) after an eager prefill
        logits = dec(token)         # token (B, 1) -> logits (B, V) of the next byte

    compile: True = torch.compile with fullgraph, dynamic=False (on a CPU compiled ahead for the
    decoder's own model, buffers and caches and called without dynamo's guard check, so it is
    traced for the model's dtype and mode and the autocast in force here: make the decoder where
    it is used (a call in another raises ValueError); on CUDA mode="reduce-overhead": the step
    is replayed as one CUDA graph); False = the same step eager (a reference: slower than the
    eager caches, as it attends over every slot); or a torch.compile backend (tests count
    compilations with one). When compiling fails: one warning, and `compiled` is False;
    `unguarded` says whether the step runs without the guard check.
    dtype: what the caches store full precision at (default: as KVOptions.make_caches).
    temperature, top_k: where temperature is given, the step also picks the next byte as
    sample_next does, and next_token() runs it instead of __call__ (generate_stream uses it
    for the same temperature and top_k). From the same generator, the same bytes as sample_next.
    Raises ValueError for a cache kind kv.static.static_reason() keeps eager."""

    def __init__(self, model, kv, batch_size, capacity, compile=True, cuda_graphs=None, dtype=None,
                 temperature=None, top_k=None):
        reason = static_reason(kv, model.config, next(model.parameters()).device)
        if reason is not None:
            raise ValueError(f"no static decode step for {reason}")
        self.model, self.kv, self.batch_size, self.capacity = model, kv, batch_size, capacity
        p = next(model.parameters())
        # buffers for a whole number of SLOTS_STEP tokens: texts a few bytes apart (another
        # prompt) share one compiled step (stepcache.py); the extra slots stay empty
        room = -(-capacity // SLOTS_STEP) * SLOTS_STEP
        self.caches = kv.make_caches(model, batch_size, capacity=room, dtype=dtype, static=True)
        first = {}  # (first layer, cache) of each cache once: kv_share layers share one
        for i, c in enumerate(self.caches):
            first.setdefault(id(c), (i, c))
        self.distinct = list(first.values())
        self.clock = self.caches[0].clock
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=p.device)  # the step's input
        self.temperature, self.top_k = temperature, effective_top_k(temperature, top_k, model.config.vocab_size)
        # the Exp(1) draws a sampling step picks with (draw_noise)
        self.noise = torch.ones(batch_size, model.config.vocab_size, device=p.device) if temperature else None
        self.rot_table = model._rope(0, room).clone() if model.config.rope else None  # (room, hs/2, 2)
        self.cuda_graphs = p.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs:  # CUDA graphs replay fixed addresses: the caches must never move, and the
            # RoPE table is read where it lies (an input not marked static is copied in at every replay)
            for t in self.buffers() + [t for t in (self.rot_table, self.noise) if t is not None]:
                torch._dynamo.mark_static_address(t)
        # the caches that quantize a group apart from the step, in lists of one schedule (residual,
        # group): a local layer may keep a shorter residual than a global one (local_residual)
        schedules = {}
        for _, c in self.distinct:
            if getattr(c, "flush_apart", False):
                schedules.setdefault((c.R, c.G), []).append(c)
        self.flushing = list(schedules.values())
        step = static_step if temperature is None else static_sample_step
        self.args = (self.model, self.token, self.caches, self.rot_table)
        if temperature is not None:
            self.args += (self.noise, temperature, self.top_k)
        self.step, self.compiled, self.compile_seconds, self.unguarded = step, False, 0.0, False
        self.origin = None  # where a compiled step came from: "compiled", "reused", "loaded" (stepcache.py)
        self.traced, self.weight = None, p  # what a step called without guards was traced for (mode())
        self.flushes = [static_flush] * len(self.flushing)  # one per list of self.flushing
        if compile:
            # (imported here: importing torch._dynamo is a large part of an eager sample.py run)
            import torch._dynamo.config as dynamo_config
            import torch._inductor.config as inductor_config
            options, fixed = dict(fullgraph=True, dynamic=False), False
            if compile is not True:
                options["backend"] = compile
            elif self.cuda_graphs:
                options["mode"] = "reduce-overhead"
            elif p.device.type == "cpu":
                # batch 1: each (1, C) x (C, N) product becomes a fused multiply-and-sum, not a
                # BLAS call, whose per-call cost dominates so small a product;
                # cpp_wrapper: the step's kernels are called from C++, not from Python (less
                # overhead per call); memory_planning: the step's intermediate tensors in one pool
                # allocated per call, not one allocation each (RESULTS.md, "What each compile
                # option of the CPU step buys")
                options["options"] = {"post_grad_fusion_options": {"decompose_mm_pass": {}}, "cpp_wrapper": True,
                                      "memory_planning": True}
                # every call passes the same model, buffers and caches: compiled ahead for them
                # and called without dynamo's guard check, which walks every parameter and cache
                # buffer per call (it cost more than inductor's freezing, which aot_compile
                # refuses, saved at batch 8: RESULTS.md, "Without dynamo's guard check")
                fixed = True
            # (guarded steps: CUDA, MPS, a backend given) one compiled entry per decoder of another
            # cache kind or shape: more than dynamo's default of 8 in a sweep (its guards pick the
            # entry; none is traced twice). A CPU step compiled ahead is kept by stepcache.py for
            # the next decoder of its kind and shape, in this process and in later runs
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
            t0 = time.perf_counter()
            args = self.args
            # (compiled in the probe) emulate_precision_casts: a value cast to a narrower dtype
            # is rounded there even where inductor fuses it with what reads it, as eager rounds
            # it. Without it, a step that quantizes a group itself (kv_quant_residual=0) read
            # float32 scales where the cache stores float16 ones: logits off by up to 0.4 from
            # that step on, and other greedy text with int2
            # (no_grad: the step is traced as it is called, for inference)
            with torch.no_grad(), inductor_config.patch(emulate_precision_casts=True), warnings.catch_warnings():
                # (inductor's C++ code generator warns of bfloat16 residuals beside float16 scales
                # in one loop: both are read as stored, and the tests compare the result with eager)
                warnings.filterwarnings("ignore", message="bf16 and fp16 are mixed")
                # a step compiled ahead is found again by what it was compiled for (stepcache.py):
                # by another decoder of this kind in this process, or by a later run
                what = self.describe() if fixed else None
                self.step = compile_or_eager(step, lambda f: self._probe(f, *args),
                                             fixed_args=args if fixed else None, describe=what, **options)
                self.compiled = self.step is not step
                self.origin = getattr(self.step, "origin", "compiled")
                if self.compiled:  # each list of caches its own function where the arguments are fixed
                    flush = lambda i, g: compile_or_eager(static_flush, lambda f: self._probe(f, g),
                                                          fixed_args=(g,) if fixed else None,
                                                          describe=what and f"{what} flush {i}", **options)
                    self.flushes = [flush(i, g) for i, g in enumerate(self.flushing)]
            self.compile_seconds = time.perf_counter() - t0
            # (the guarded function is still torch.compile's, where torch could not compile ahead)
            self.unguarded = fixed and self.compiled and not hasattr(self.step, "aot_compile")
            if self.unguarded:
                self.traced = self.mode()
            self.start()

    def describe(self):
        """What the step is compiled for beyond its arguments' shapes, as one line: the model's
        class and config, the cache kind and its buffers, sampling, the weights' dtype, the mode
        and autocast (stepcache.py's key)."""
        bufs = [(tuple(t.shape), str(t.dtype)) for t in self.buffers()]
        table = None if self.rot_table is None else tuple(self.rot_table.shape)
        return repr((type(self.model).__qualname__, self.model.config, self.kv, self.batch_size, table,
                     [type(c).__qualname__ for _, c in self.distinct], bufs, self.temperature, self.top_k,
                     self.token.device.type, self.mode()))

    def compile_line(self, what=""):
        """What compiling the step took, as a line to show (what: e.g. " for int4")."""
        s = f"{self.compile_seconds:.1f} s"
        if self.origin == "loaded":
            return f"loaded the decode step{what} in {s} (an earlier run compiled it: stepcache.py)"
        if self.origin == "reused":
            return f"reused the decode step{what} compiled for an earlier decoder of its kind ({s})"
        return f"compiled the decode step{what} in {s}"

    def buffers(self):
        """Every tensor the step reads or writes besides the weights (each cache once)."""
        out = [self.clock.t, self.token]
        for _, c in self.distinct:
            out += c.buffers()
        return out

    def _probe(self, fn, *args):
        # compile fn now, on the decoder's own caches (start() resets them after)
        with torch.no_grad():
            for _ in range(3 if self.cuda_graphs else 1):  # CUDA graphs are recorded on a later call
                self.start()
                fn(*args)

    def start(self, prefilled=None):
        """Empty the caches, or load eager caches (the same KVOptions) after a prefill; returns
        the static caches (for held_bits and the like)."""
        seen = prefilled[0].seen if prefilled is not None else 0
        if seen >= self.capacity:
            raise ValueError(f"the prefilled text ({seen} tokens) fills the decoder's capacity {self.capacity}")
        for i, c in self.distinct:
            c.reset()
            if prefilled is not None:
                c.load(prefilled[i])
        self.clock.set(seen)
        return self.caches

    def mode(self):
        """What the step's trace depends on besides its arguments' shapes: the weights' dtype,
        train or eval, and the autocast in force (on a CPU nothing checks these per call)."""
        dev = self.token.device.type
        cast = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        return self.weight.dtype, self.model.training, cast

    def __call__(self, token):
        """token (B, 1) -> logits (B, V); the caches now hold it."""
        if self.temperature is not None:
            raise ValueError("this decoder was made to sample (temperature given): call next_token()")
        return self._run(token)

    def next_token(self, token, generator=None):
        """token (B, 1) -> the byte after it (B, 1), drawn from generator as sample_next draws
        it at the decoder's temperature and top_k; the caches now hold token."""
        if self.temperature is None:
            raise ValueError("this decoder returns logits (no temperature given): call it, and sample_next()")
        return self._run(token, generator)

    def _run(self, token, generator=None):
        if self.clock.n >= self.capacity:
            raise ValueError(f"the decoder's capacity of {self.capacity} tokens is used up")
        if self.traced is not None and self.mode() != self.traced:
            say = lambda dt, train, cast: (f"{str(dt).replace('torch.', '')} weights, {'train' if train else 'eval'} "
                                           f"mode, {str(cast).replace('torch.', '') if cast else 'no'} autocast")
            raise ValueError(f"the decoder was compiled for {say(*self.traced)} and is called with "
                             f"{say(*self.mode())}: make the decoder where it is used, after changing the model")
        if self.cuda_graphs and self.compiled:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs may be overwritten
        self.token.copy_(token)  # into a buffer of its own: a column sliced from a text has other strides
        if self.temperature:
            draw_noise(self.noise, generator)
        with torch.no_grad():  # inference only (grad mode is part of what was compiled)
            for group, flush in zip(self.flushing, self.flushes):
                if group[0].due(self.clock.n):
                    flush(group)
            out = self.step(*self.args)
        self.clock.n += 1
        return out.clone() if self.cuda_graphs else out


def effective_top_k(temperature, top_k, vocab_size):
    """top_k as an int that limits the draw, or None where it does not (None, 0, >= vocab_size,
    or greedy decoding at temperature 0)."""
    return int(top_k) if temperature and top_k is not None and 0 < top_k < vocab_size else None


def static_decoder(model, kv, batch_size, capacity, say=None, **kw):
    """A compiled StaticDecoder (kw: its options) where the cache kind allows one; else None
    (decode eager), and a note through say (e.g. print) saying why. None too when compiling
    failed (after compile_or_eager's warning): uncompiled, the eager caches are faster."""
    reason = static_reason(kv, model.config, next(model.parameters()).device)
    if reason is not None:
        if say is not None:
            say(f"note: the decode step stays eager: {reason}")
        return None
    dec = StaticDecoder(model, kv, batch_size, capacity, **kw)
    return dec if dec.compiled or not kw.get("compile", True) else None


def say_once(say):
    """say (e.g. print), each distinct line once: a note that holds for every row of a sweep."""
    said = set()

    def once(line):
        if line not in said:
            said.add(line)
            say(line)
    return once


def static_decoders(model, say=None):
    """A function (kv, batch_size, capacity, dtype) -> static_decoder(...) that says what its
    compilation took: kv.evaluate.evaluate's `decode` (eval_kv --chunk=1 --compile=True)."""
    say = say_once(say) if say is not None else None

    def decoder(kv, batch_size, capacity, dtype=None):
        dec = static_decoder(model, kv, batch_size, capacity, say=say, dtype=dtype)
        if dec is not None and dec.compiled and say is not None:
            what = kv.describe() if kv.compressed else "the plain cache"
            if kv.kv_window > 0:
                what += f", kv_window={kv.kv_window}" + (f", kv_sink={kv.kv_sink}" if kv.kv_sink else "")
            say(dec.compile_line(f" for {what}"))
        return dec
    return decoder


def prefill_piece(kv, T):
    """The tokens prefill feeds in one forward, for a T-token prompt under KVOptions kv."""
    return min(T, kv.kv_window) if kv.kv_window > 0 and not kv.compressed and not kv.kv_trim else T


@torch.no_grad()
def prefill(model, idx, caches, kv):
    """The prompt idx (B, T) into the caches; -> the logits (B, V) of the byte after it. One
    forward, except under a window that keeps every token as it came (no quantization, no
    eviction, no trim rule): there a prompt longer than the window goes in pieces of the
    window's length, each query seeing the same keys as in one pass (up to float rounding), in
    time and memory O(T x window) rather than O(T^2) (a 10 kB prompt under a 64-byte window:
    14 s -> 0.9 s on one CPU thread, RESULTS.md)."""
    T = idx.size(1)
    piece = prefill_piece(kv, T)
    for i in range(0, T, piece):
        logits, _ = model(idx[:, i:i + piece], caches)  # (B, t, V)
    return logits[:, -1]


@torch.no_grad()  # (also for a caller that forgets it: autograd's bookkeeping costs a fifth of an eager step)
def generate_stream(model, idx, max_new_tokens, temperature=1.0, top_k=None, kv=None, stats=None,
                    generator=None, decoder=None):
    """Prefill the prompt idx (B, T) (prefill), then one decode step per token; yields each
    new token (B, 1). kv: the KVOptions of the caches (default: the decoder's, else plain and
    unbounded). If given, `stats` gets the peak KV bits, the bits per cached token (per
    sequence; a linear layer's fixed-size state, which no token accounts for, apart:
    kv_bits_fixed) and the peak over the decode steps alone (an eviction cache holds the whole
    prompt until the first step). decoder: a StaticDecoder for the same kv, B and at least
    T + max_new_tokens tokens, which then runs the decode steps (the prefill stays eager); one
    made to sample (its temperature given) must have this temperature and top_k, and then
    picks the bytes inside its step: the same bytes from the same generator. generator: one
    for the batch, or a list of B (row b then draws what it draws alone from the b-th)."""
    B, T = idx.size()
    if isinstance(generator, (list, tuple)) and len(generator) != B:
        raise ValueError(f"{len(generator)} generators for a batch of {B} rows: give one, or one per row")
    kv = kv or (decoder.kv if decoder is not None else KVOptions(kv_window=0))
    if decoder is not None and (decoder.kv != kv or decoder.batch_size != B or decoder.capacity < T + max_new_tokens):
        raise ValueError("the decoder was made for other KV options, another batch size or a shorter text")
    fused = decoder is not None and decoder.temperature is not None
    if fused and (decoder.temperature, decoder.top_k) != \
            (temperature, effective_top_k(temperature, top_k, model.config.vocab_size)):
        raise ValueError(f"the decoder samples at temperature {decoder.temperature} and top_k {decoder.top_k}, "
                         f"not {temperature} and {top_k}")
    caches = kv.make_caches(model, B, capacity=T + max_new_tokens)
    logits = prefill(model, idx, caches, kv)
    peak, peak_tokens = held_bits(caches)
    decode_peak = 0
    if decoder is not None:
        caches = decoder.start(caches)
        decode = lambda token: decoder(token)
    else:
        decode = lambda token: decode_step(model, token, caches)
    nxt = None  # the next byte, where the decoder's step picked it
    for i in range(max_new_tokens):
        if nxt is None:
            # (eager steps each: a plug-in may be in them; the compiled step runs the project's code alone)
            if (decoder is None or i == 0) and not bool(torch.isfinite(logits).all()):
                raise not_finite(f"the scores for new byte {i + 1}")
            nxt = sample_next(logits, temperature, top_k, generator)
        yield nxt
        if i + 1 < max_new_tokens:
            if fused:
                nxt = decoder.next_token(nxt, generator)
            else:
                logits, nxt = decode(nxt), None
            bits, held = held_bits(caches)
            decode_peak = max(decode_peak, bits)
            if bits > peak:
                peak, peak_tokens = bits, held
    if stats is not None:
        fixed = state_bits(caches)  # linear layers' state: the same at any length, no token's
        stats["kv_bits_peak"] = peak
        stats["kv_bits_per_token"] = (peak - fixed) / max(B * peak_tokens, 1)
        stats["kv_bits_fixed"] = fixed
        stats["kv_bits_peak_decode"] = decode_peak


def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, **kw):
    """Complete idx (B, T) with max_new_tokens bytes; returns (B, T + max_new_tokens)."""
    new = list(generate_stream(model, idx, max_new_tokens, temperature, top_k, **kw))
    return torch.cat([idx] + new, dim=1)
