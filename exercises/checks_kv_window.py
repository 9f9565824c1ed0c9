"""
Checks of exercise 1, bounded history: keep_recent(k, v, pos, kv_window, kv_sink),
like kv.cache.keep_recent.
"""

from dataclasses import replace

import torch

from kv.policy import KVOptions
from exercises.checks_common import (TRAIN_BLOCK, expect, expect_close, feed, held_out, random_text,
                                     tiny_model, token_losses, trained_model)


# (positions held before the trim, kv_window, kv_sink): a first trim, sinks, holes left by
# an earlier trim, a short history that must stay whole, a window of one, a long prefill
TRIM_CASES = [
    (list(range(20)), 5, 0),
    (list(range(20)), 5, 3),
    ([0, 1, 2, 3] + list(range(40, 47)), 6, 4),
    (list(range(4)), 8, 2),
    (list(range(12)), 1, 0),
    (list(range(30)), 8, 4),
]


def trim_inputs(pos, dtype=torch.float32):
    """k, v whose every row says which position and (batch, head) it belongs to."""
    p = torch.tensor(pos)
    B, H, hs = 2, 3, 4
    tag = torch.arange(B).view(B, 1, 1, 1) * 0.25 + torch.arange(H).view(1, H, 1, 1) * 0.0625
    k = (p.view(1, 1, -1, 1).float() + tag + torch.arange(hs) * 1e-3).to(dtype)
    return k, -k, p


def expected_kept(pos, window, sink):
    return [p for i, p in enumerate(pos) if i >= len(pos) - window or p < sink]


def call_trim(impl, pos, window, sink, dtype=torch.float32):
    k, v, p = trim_inputs(pos, dtype)
    out = impl.keep_recent(k.clone(), v.clone(), p.clone(), window, sink)
    expect(isinstance(out, (tuple, list)) and len(out) == 3,
           f"keep_recent must return (k, v, pos), got {type(out).__name__}"
           + (f" of {len(out)}" if isinstance(out, (tuple, list)) else ""))
    expect(all(torch.is_tensor(t) for t in out), "keep_recent must return three tensors (k, v, pos)")
    return (k, v, p), out


def kept_positions(out):
    return [int(x) for x in out[2].tolist()]


def check_trim_shapes(impl, ctx):
    for dtype in (torch.float32, torch.float16):
        (k, v, p), (k2, v2, p2) = call_trim(impl, list(range(20)), 5, 3, dtype=dtype)
        n = p2.numel()
        expect(p2.dim() == 1 and p2.dtype == torch.long, f"pos must stay a 1-D long tensor, got {p2.dtype} {tuple(p2.shape)}")
        for name, got in (("k", k2), ("v", v2)):
            want = (k.size(0), k.size(1), n, k.size(3))
            expect(tuple(got.shape) == want, f"{name} has shape {tuple(got.shape)}, expected {want} "
                   "(B, nkv, kept, hs): select along dim 2, the token axis")
            expect(got.dtype == dtype, f"{name} came back as {got.dtype}, given {dtype}: keep the dtype")


def check_trim_recent(impl, ctx):
    for pos, window, sink in TRIM_CASES:
        _, out = call_trim(impl, pos, window, sink)
        kept = kept_positions(out)
        newest = pos[-window:]
        missing = [p for p in newest if p not in kept]
        expect(not missing, f"pos={short(pos)}, kv_window={window}: the newest {len(newest)} must stay, "
               f"{short(missing)} went missing (kept {short(kept)})")


def check_trim_sinks(impl, ctx):
    for pos, window, sink in TRIM_CASES:
        _, out = call_trim(impl, pos, window, sink)
        kept = kept_positions(out)
        missing = [p for p in pos if p < sink and p not in kept]
        expect(not missing, f"pos={short(pos)}, kv_sink={sink}: positions < {sink} must stay, "
               f"{short(missing)} went missing; the sinks are positions in the text (pos < kv_sink)")


def check_trim_budget(impl, ctx):
    for pos, window, sink in TRIM_CASES:
        _, out = call_trim(impl, pos, window, sink)
        kept, want = kept_positions(out), expected_kept(pos, window, sink)
        extra = [p for p in kept if p not in want]
        expect(not extra and len(kept) <= window + sink,
               f"pos={short(pos)}, kv_window={window}, kv_sink={sink}: keeps {len(kept)} tokens, "
               f"expected {short(want)}; {short(extra)} should have gone")


def check_trim_rows(impl, ctx):
    for pos, window, sink in TRIM_CASES:
        (k, v, p), (k2, v2, p2) = call_trim(impl, pos, window, sink)
        kept = kept_positions((k2, v2, p2))
        expect(kept == sorted(kept) and len(set(kept)) == len(kept),
               f"positions must stay in order, oldest first, each once; got {short(kept)}")
        where = [pos.index(x) for x in kept if x in pos]
        expect(len(where) == len(kept), f"returned positions {short(kept)} that were not in pos")
        expect(torch.equal(k2, k[:, :, where]) and torch.equal(v2, v[:, :, where]),
               "the rows of k and v do not belong to the returned positions: select the same "
               "tokens from k, v and pos (one mask for all three)")


def check_trim_model(impl, ctx):
    model = tiny_model(n_kv_head=2).eval()
    idx = random_text(2, 60)
    ring_kv = KVOptions(kv_window=8, kv_sink=3)
    with torch.no_grad():
        for step in (1, 7):
            ring, _ = feed(model, idx, step, ring_kv)
            yours, states = feed(model, idx, step, replace(ring_kv, kv_trim=impl.spec("keep_recent")))
            expect_close(yours, ring, f"logits fed {step} byte(s) at a time",
                         "compare with kv.cache.KVCache(window=8, sink=3), the ring buffer")
            expect(states[0].tokens() <= 11, f"the cache holds {states[0].tokens()} tokens, at most 8 + 3 allowed")
    return "fed 1 and 7 bytes at a time"


def check_trim_long_text(impl, ctx):
    model = trained_model()
    L = TRAIN_BLOCK
    x, y = held_out(10 * L)
    with torch.no_grad():
        full, _ = feed(model, x, 8)
        yours, _ = feed(model, x, 8, KVOptions(kv_window=L, kv_sink=4, kv_trim=impl.spec("keep_recent")))
    inside = token_losses(full, y)[L // 2:L].mean().item()
    far_full = token_losses(full, y)[4 * L:].mean().item()
    far_yours = token_losses(yours, y)[4 * L:].mean().item()
    expect(far_yours < far_full - 0.5 and far_yours < inside + 0.5,
           f"loss 4-10x past the training length: {far_yours:.2f} with your trim, {far_full:.2f} "
           f"unbounded, {inside:.2f} inside the training length; keep the newest kv_window tokens")
    return (f"loss {far_full:.2f} unbounded -> {far_yours:.2f} with kv_window={L}, kv_sink=4 "
            f"({inside:.2f} inside the training length)")


def short(xs, n=12):
    xs = list(xs)
    return str(xs) if len(xs) <= n else str(xs[:n // 2])[:-1] + ", ..., " + str(xs[-n // 2:])[1:]
