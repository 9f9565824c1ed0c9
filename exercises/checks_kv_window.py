"""
Checks of exercise 1, bounded history: keep_recent(k, v, pos, kv_window, kv_sink),
like kv.cache.keep_recent.
"""

from dataclasses import replace

import torch

from kv.policy import KVOptions
from exercises.checks_common import (TRAIN_BLOCK, Failed, Skipped, expect, expect_close, feed, held_out, random_text,
                                     short, tiny_model, token_losses, trained_model)


# (positions held before the trim, kv_window, kv_sink): a first trim, sinks, holes left by
# an earlier trim, a short history that must stay whole, a window of one, a long prefill,
# a cache whose first entries are not sinks (sinks are positions, not places in the cache),
# and more sinks than the window holds
TRIM_CASES = [
    (list(range(20)), 5, 0),
    (list(range(20)), 5, 3),
    ([0, 1, 2, 3] + list(range(40, 47)), 6, 4),
    (list(range(4)), 8, 2),
    (list(range(12)), 1, 0),
    (list(range(30)), 8, 4),
    (list(range(10, 30)), 5, 3),
    (list(range(16)), 3, 6),
]


def trim_inputs(pos, dtype=torch.float32):
    """k, v whose every row says which position and (batch, head) it belongs to: k[0, 0, :, 0]
    is the position itself, v is -k."""
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
    ranks = tuple(t.dim() for t in out)
    if sorted(ranks) == [1, 4, 4] and ranks != (4, 4, 1):  # the right tensors in another order
        order = ", ".join("pos" if r == 1 else "k or v" for r in ranks)
        raise Failed(f"keep_recent returned ({order}): return them in the order (k, v, pos)")
    k2, v2 = out[0], out[1]
    if k2.numel() and v2.numel() and bool((k2 <= 0).all() and (k2 < 0).any() and (v2 >= 0).all()):  # (v is -k)
        raise Failed("keep_recent returned v's rows where k's go and k's where v's go: return (k, v, pos), "
                     "each trimmed with the same mask")
    return (k, v, p), out


def tokens_in(rows, sign=1):
    """The positions of the tokens whose rows a k (sign 1) or v (sign -1) holds, see trim_inputs."""
    expect(rows.dim() == 4, f"k and v must stay (B, nkv, kept, hs), got {tuple(rows.shape)}")
    return [int(x) for x in (sign * rows[0, 0, :, 0].float()).round().tolist()]


def kept_positions(out):
    """The tokens kept, read from the rows of k (what attention sees); check_trim_rows checks
    that v and pos agree."""
    return tokens_in(out[0])


def check_trim_shapes(impl, ctx):
    for dtype in (torch.float32, torch.float16):
        pos = list(range(20))
        (k, v, p), (k2, v2, p2) = call_trim(impl, pos, 5, 3, dtype=dtype)
        expect(p2.dim() == 1 and p2.dtype == torch.long,
               f"pos came back as {p2.dtype} {tuple(p2.shape)}: pos must stay a 1-D long tensor, the kept entries "
               "of the pos it was given")
        B, H, _, hs = k.shape
        for name, got in (("k", k2), ("v", v2)):
            expect(got.dim() == 4 and (got.size(0), got.size(1), got.size(3)) == (B, H, hs),
                   f"{name} has shape {tuple(got.shape)}, expected (B, nkv, kept, hs) = ({B}, {H}, kept, {hs}): "
                   "tokens are selected along dim 2, the token axis, and every other axis stays whole")
            expect(got.dtype == dtype, f"{name} came back as {got.dtype}, given {dtype}: keep the dtype (no .float())")
        n = k2.size(2)
        expect(v2.size(2) == n, f"k keeps {n} tokens and v {v2.size(2)}: select the same tokens from both")
        if p2.numel() != n:
            if p2.numel() == len(pos):
                raise Failed(f"pos still holds all {len(pos)} positions while k and v keep {n} tokens: "
                             "trim pos with the same mask as k and v")
            if n == len(pos):
                raise Failed(f"k and v still hold all {n} tokens while pos keeps {p2.numel()}: select the "
                             "same tokens from k and v as from pos")
            raise Failed(f"pos has {p2.numel()} entries but k and v hold {n} tokens: one mask for all three")


def check_trim_recent(impl, ctx):
    for pos, window, sink in TRIM_CASES:
        _, out = call_trim(impl, pos, window, sink)
        kept = kept_positions(out)
        newest = pos[-window:]
        missing = [p for p in newest if p not in kept]
        where = f"pos={short(pos)}, kv_window={window}"
        if missing and kept and set(kept) <= set(pos[:len(kept)]):
            raise Failed(f"{where}: kept the oldest tokens {short(kept)}; the newest are at the end of pos, "
                         "the cache being oldest first")
        expect(pos[-1] not in missing, f"{where}: the newest token (position {pos[-1]}, the one this step "
               f"added, pos[-1]) went missing (kept {short(kept)}): the kv_window newest include it")
        expect(not missing, f"{where}: the newest {len(newest)} must stay, {short(missing)} went missing "
               f"(kept {short(kept)})")


def window_edge(pos, window):
    """The kv_window + 1th newest token, which a window one too wide keeps (None: there is none)."""
    return pos[-window - 1] if len(pos) > window else None


def false_sinks(pos, window, sink, kept):
    """What was kept as a sink that is none (a message), or None: position kv_sink itself, or
    the first places of the cache whatever their positions. A token kept at the window's edge
    is rule 4's mistake, not this one: it does not hide false sinks kept with it."""
    extra = sorted(set(kept) - set(expected_kept(pos, window, sink)) - {window_edge(pos, window)})
    if extra == [sink]:
        which = f"0..{sink - 1}" if sink else "none when kv_sink=0"
        return f"position {sink} was kept as a sink; the sinks are the positions < kv_sink ({which}), not <="
    if extra and set(extra) <= set(pos[:sink]):
        return (f"kept the first kv_sink entries of the cache {short(extra)}, whose positions are not < kv_sink: "
                "the sinks are chosen by position (the values in pos), not by their place in the cache")
    return None


def newest_gone(pos, window, kept):
    """A Skipped where some of the kv_window newest tokens went missing: rule 2's failure
    (reported above), which makes the tokens kept in their place look like false sinks or
    extra tokens."""
    if any(p not in kept for p in pos[-window:]):
        raise Skipped(f"the newest tokens are not all kept (pos={short(pos)}, kv_window={window}, kept "
                      f"{short(kept)}: see above), so which others are kept by mistake cannot be told")


def check_trim_sinks(impl, ctx):
    for pos, window, sink in TRIM_CASES:
        _, out = call_trim(impl, pos, window, sink)
        kept = kept_positions(out)
        missing = [p for p in pos if p < sink and p not in kept]
        where = f"pos={short(pos)}, kv_window={window}, kv_sink={sink}"
        expect(not missing, f"{where}: positions < {sink} must stay, {short(missing)} went missing; the sinks "
               "are the tokens at text positions < kv_sink, wherever they sit in the cache")
        wrong = false_sinks(pos, window, sink, kept)
        if wrong:
            newest_gone(pos, window, kept)
        expect(wrong is None, f"{where}: {wrong}")


def check_trim_budget(impl, ctx):
    for pos, window, sink in TRIM_CASES:
        _, out = call_trim(impl, pos, window, sink)
        kept, want = kept_positions(out), expected_kept(pos, window, sink)
        extra = sorted(set(kept) - set(want))
        where = f"pos={short(pos)}, kv_window={window}, kv_sink={sink}"
        if not extra:
            continue
        newest_gone(pos, window, kept)
        wrong_sinks = false_sinks(pos, window, sink, kept)  # rule 3's failure, reported above
        edge = window_edge(pos, window)
        if edge in extra and (extra == [edge] or wrong_sinks):  # a mistake of its own besides the sinks
            raise Failed(f"{where}: one token too many at the window's edge: position {pos[-window - 1]} is the "
                         f"{window + 1}th newest; the kv_window newest are the last kv_window entries of pos, "
                         "this step's included")
        if wrong_sinks:
            raise Skipped("tokens that are not sinks are kept as sinks (see above), so what else is kept cannot be "
                          "told")
        raise Failed(f"{where}: keeps {len(set(kept))} tokens, expected {short(want)}; {short(extra)} should "
                     "have gone")


def check_trim_rows(impl, ctx):
    for pos, window, sink in TRIM_CASES:
        (k, v, p), (k2, v2, p2) = call_trim(impl, pos, window, sink)
        kept = kept_positions((k2, v2, p2))
        twice = sorted({x for x in kept if kept.count(x) > 1})
        expect(not twice, f"pos={short(pos)}, kv_window={window}, kv_sink={sink}: token(s) {short(twice)} "
               "appear twice: a token that is both a sink and one of the newest is kept once; one mask over "
               "the tokens keeps each once, where joining two slices repeats the tokens they share")
        if kept != sorted(kept):
            expect(kept != sorted(kept, reverse=True), f"the tokens come back newest first {short(kept)}: keep "
                   "the cache's order, oldest first")
            raise Failed(f"the tokens come back out of order {short(kept)}: keep the cache's order, oldest first")
        if k2.numel():  # two empty tensors are equal whatever was selected
            expect(not torch.equal(v2, k2), "v came back equal to k: return the kept rows of v, not of k")
        expect(tokens_in(v2, -1) == kept, f"v holds the tokens at {short(tokens_in(v2, -1))}, k those at "
               f"{short(kept)}: select the same tokens from k and v")
        expect(p2.tolist() == kept, f"pos says {short(p2.tolist())} but k and v hold the tokens at positions "
               f"{short(kept)}: select pos with the same mask as k and v")
        where = [pos.index(x) for x in kept]
        expect(torch.equal(k2, k[:, :, where]) and torch.equal(v2, v[:, :, where]),
               "the rows of another batch row or head do not belong to the tokens kept: select along dim 2 "
               "only, the same tokens for every row and head")


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
