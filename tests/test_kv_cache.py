"""kv/cache.py and kv/policy.py against references: forwards over exactly the tokens a bounded
cache keeps (each at its own position), the tutorial's cut history, the full forward while
everything fits, the ring buffer against the simple TrimCache, hand-computed bit counts, and
one clear error for every bad combination of kv_* options."""

import pytest
import torch

from conftest import TOL, feed, forward_at, text, tiny
from kv.cache import KVCache
from kv.policy import KVOptions, held_bits
from tutorial_reference import TutorialReference
from utils import UserError


@pytest.mark.parametrize("window,sink,step", [(8, 0, 1), (8, 3, 1), (8, 3, 5), (6, 2, 13)])
def test_bounded_cache_equals_forward_over_kept_tokens(window, sink, step):
    # one layer: a kept token's K/V depends on the token and its position only, so the
    # last query must see exactly what a full forward over the kept tokens computes
    m = tiny(n_layer=1)
    idx = text(T=40)
    ours, caches = feed(m, idx, step, KVOptions(kv_window=window, kv_sink=sink))
    assert caches[0].tokens() == window + sink
    for t in (15, 27, 39):
        keep = [p for p in range(t + 1) if p < sink or t - p < window]
        ref = forward_at(m, idx[:, keep], torch.tensor(keep))
        torch.testing.assert_close(ours[:, t], ref[:, -1], **TOL)


def test_ring_cache_after_decode_steps_serves_chunks():
    """Chunks after decode steps: a chunk larger than the ring's free space masks the held keys
    by the positions the decode steps stored, so every query (one layer) must still see exactly
    what a forward over the tokens it may see computes, at their own positions."""
    m = tiny(n_layer=1)
    idx = text(T=42)
    window, sink = 8, 2
    caches = KVOptions(kv_window=window, kv_sink=sink).make_caches(m, 2)
    t0 = 0
    for size in [5] + [1] * 20 + [6, 1, 1, 7, 1]:
        logits, caches = m(idx[:, t0:t0 + size], caches)
        for i, t in enumerate(range(t0, t0 + size)):
            keep = [p for p in range(t + 1) if p < sink or t - p < window]
            ref = forward_at(m, idx[:, keep], torch.tensor(keep))
            torch.testing.assert_close(logits[:, i], ref[:, -1], **TOL)
        t0 += size


def test_bounded_decode_matches_tutorial_with_cut_history():
    # the tutorial's fix of exercise 1: keep the last N unrotated keys, re-rotate them at
    # 0..N-1 every step. RoPE only sees distances, so our rotated ring buffer must agree.
    m = tiny(n_layer=3)
    idx = text(T=50)
    ref = TutorialReference(m.state_dict(), 3, 4, kv_window=9)
    expected = torch.cat([ref(idx[:, :6])] + [ref(idx[:, t:t + 1]) for t in range(6, 50)], dim=1)
    caches = KVOptions(kv_window=9).make_caches(m, 2)
    ours = [m(idx[:, :6], caches)[0]] + [m(idx[:, t:t + 1], caches)[0] for t in range(6, 50)]
    torch.testing.assert_close(torch.cat(ours, dim=1), expected, **TOL)


def test_bounded_cache_is_full_forward_while_it_fits():
    m = tiny()
    idx = text(T=12)
    torch.testing.assert_close(feed(m, idx, 1, KVOptions(kv_window=12))[0], m(idx)[0], **TOL)


def test_local_layer_never_holds_more_than_window():
    m = tiny(window=4, global_layers="1")
    _, caches = feed(m, text(T=30), 3, KVOptions(kv_window=10))
    assert caches[0].tokens() == 4 and caches[1].tokens() == 10
    _, caches = feed(m, text(T=30), 3, KVOptions(kv_window=2, kv_sink=1))
    assert caches[0].tokens() == 3 and caches[1].tokens() == 3


@pytest.mark.parametrize("step", [1, 7])
def test_trim_cache_with_keep_recent_equals_ring_buffer(step):
    m = tiny(n_layer=2)
    idx = text(T=40)
    ring, _ = feed(m, idx, step, KVOptions(kv_window=6, kv_sink=2))
    trim, caches = feed(m, idx, step, KVOptions(kv_window=6, kv_sink=2, kv_trim="kv.cache:keep_recent"))
    assert type(caches[0]).__name__ == "TrimCache"
    torch.testing.assert_close(trim, ring, **TOL)
    assert caches[0].tokens() == 8 and caches[0].size_bits() == 2 * 2 * 4 * 8 * 8 * 32


def test_size_bits_hand_computed():
    c = KVCache(3, 2, 8, capacity=100)
    c.update(torch.zeros(3, 2, 10, 8), torch.zeros(3, 2, 10, 8))
    assert c.size_bits() == 2 * 3 * 2 * 10 * 8 * 32
    c16 = KVCache(1, 4, 16, window=5, sink=1, dtype=torch.float16)
    for _ in range(9):
        c16.update(torch.zeros(1, 4, 1, 16, dtype=torch.float16), torch.zeros(1, 4, 1, 16, dtype=torch.float16))
    assert c16.size_bits() == 2 * 4 * 6 * 16 * 16
    m = tiny(n_layer=4, n_kv_head=1, kv_share=2)
    caches = KVOptions(kv_window=0).make_caches(m, 1, capacity=7)
    assert caches[0] is caches[1] and caches[2] is caches[3]  # one cache per kv_share group
    m(text(B=1, T=7), caches)
    assert held_bits(caches) == (2 * 2 * 1 * 7 * 8 * 32, 7)


def test_cache_allocates_once():
    c = KVCache(1, 2, 4, capacity=50)
    buf = c.k
    for _ in range(50):
        c.update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
    assert c.k is buf


@pytest.mark.parametrize("chunks", [[1] * 40, [3, 1, 9, 1, 1, 14, 1, 10], [40]])
def test_a_window_longer_than_the_text_allocates_for_the_text(chunks):
    """--kv_window=10000000 for a short text: the buffers start at the capacity announced and
    grow no further than the ring (window + sink) needs, and every update hands back what a
    cache allocated for the whole ring hands back (a window of 24 wraps within 40 tokens)."""
    for window, sink in ((10_000_000, 4), (24, 4)):
        small, whole = KVCache(1, 2, 4, window, sink, capacity=10), KVCache(1, 2, 4, window, sink, capacity=window + sink)
        assert small.capacity == 10
        g = torch.Generator().manual_seed(0)
        for T in chunks:
            k, v = torch.randn(1, 2, T, 4, generator=g), torch.randn(1, 2, T, 4, generator=g)
            (ks, vs, ms), (kw, vw, mw) = small.update(k, v), whole.update(k, v)
            assert torch.equal(ks, kw) and torch.equal(vs, vw)
            explicit = lambda m: torch.ones(T, ks.size(2)).tril(ks.size(2) - T).bool() if isinstance(m, str) else \
                torch.ones(T, ks.size(2), dtype=torch.bool) if m is None else m
            assert torch.equal(explicit(ms), explicit(mw))
        assert small.capacity <= min(window + sink, 40) and small.size_bits() == whole.size_bits()


@pytest.mark.parametrize("kw,words", [
    (dict(kv_quant="int7"), "unknown kv_quant"),
    (dict(kv_quant="nosuchpkg.mod:fn"), "no module named"),
    (dict(kv_quant="int4", kv_quant_group=0), "kv_quant_group"),
    (dict(kv_quant_residual=-1), "kv_quant_residual"),
    (dict(kv_evict="lru"), "unknown kv_evict"),
    (dict(kv_evict="h2o"), "needs a budget"),
    (dict(kv_evict="h2o", kv_budget=10, kv_recent=8, kv_sink=4), "smaller than kv_sink \\+ kv_recent"),
    (dict(kv_evict="h2o", kv_budget=20, kv_recent=8, kv_sink=4, kv_quant="int8"), "kv_quant_residual"),
    (dict(kv_budget=100), "kv_evict"),
])
def test_bad_options_are_one_line_errors(kw, words):
    with pytest.raises(UserError, match=words):
        KVOptions(**kw).check()
