"""kv/evict.py against references: a brute-force reading of the eviction rule in plain Python,
forwards over exactly the kept tokens (RoPE distances survive eviction), the plain cache when
nothing has to go, and the model's own bounded cache for the StreamingLLM window."""

import pytest
import torch

from conftest import TOL, feed, forward_at, text, tiny
from kv.evict import POLICIES, EvictKVCache
from kv.policy import KVOptions
from kv.quant import make_formats


def brute_force(held, budget, keep_recent, keep_sink, seen, policy):
    """The rule, read literally: held = {position: score} of one head. Keep the sinks and
    the keep_recent newest, then the best of the rest (highest score; for window, newest)."""
    must = {p for p in held if p < keep_sink or p >= seen - keep_recent}
    rest = sorted((p for p in held if p not in must),
                  key=lambda p: held[p] if policy == "h2o" else p, reverse=True)
    return must | set(rest[:max(budget - len(must), 0)])


@pytest.mark.parametrize("policy", ["h2o", "window"])
@pytest.mark.parametrize("quant,prefill,step,n_head,n_kv", [
    ("none", 0, 1, 4, 4), ("none", 0, 3, 4, 2), ("int8", 0, 1, 4, 2), ("int4", 0, 2, 2, 1),
    ("none", 10, 1, 4, 2), ("int8", 10, 1, 2, 2)])
def test_keeps_exactly_the_budget_sinks_recent_and_top_scores(policy, quant, prefill, step, n_head, n_kv):
    # a prefill of `prefill` tokens, then chunks of `step`: a score sums over every query of a
    # chunk (a mean would weigh the prefill's queries less than a decode step's). The attention
    # is peaky (one or two keys take most of it), so the top scores are not the newest tokens,
    # and a key that took it while in the full-precision residual must keep that score.
    B, D, budget, recent, sink = 2, 8, 12, 3, 2
    residual = 4 if quant != "none" else 0
    fmts = make_formats(quant, 4, D, channel_keys=False) if quant != "none" else (None, None)
    cache = EvictKVCache(policy, budget, B, n_kv, D, keep_recent=recent, keep_sink=sink,
                         key_fmt=fmts[0], val_fmt=fmts[1], residual=residual)
    g = torch.Generator().manual_seed(0)
    ref = [[{} for _ in range(n_kv)] for _ in range(B)]  # per row and KV head: position -> score
    chunks = ([prefill] if prefill else []) + [step] * ((60 - prefill) // step)
    t0 = 0
    for step in chunks:
        # each key carries its position in channel 0, so the keys returned say what is held
        k = torch.zeros(B, n_kv, step, D)
        k[..., 0] = torch.arange(t0, t0 + step, dtype=torch.float)
        keys, vals, mask = cache.update(k, torch.randn(B, n_kv, step, D, generator=g))
        for b in range(B):
            for h in range(n_kv):
                held = ref[b][h]
                # before a step the cache evicts to budget - 1 (the step's first token makes
                # the budget), counting that token as seen: kv_recent includes it, and the
                # residual (never evicted) covers the residual + 1 newest with it
                if len(held) > budget - 1:
                    keep = brute_force(held, budget - 1, max(recent, residual + 1 if residual else 0),
                                       sink, t0 + 1, policy)
                    ref[b][h] = held = {p: held[p] for p in keep}
                held.update({p: 0.0 for p in range(t0, t0 + step)})
                got = keys[b, h, :, 0].round().long().tolist()
                assert sorted(got) == sorted(held), (t0, b, h)
                if t0 >= budget + step:
                    assert len(got) == budget - 1 + step  # the budget with the step's first token, and the rest
        kpos = keys[..., 0].round().long()  # (B, nkv, S)
        qpos = torch.arange(t0, t0 + step)
        seen_by = (kpos.unsqueeze(-2) <= qpos.view(-1, 1)).repeat_interleave(n_head // n_kv, dim=1)
        att = torch.rand(B, n_head, step, keys.size(2), generator=g) ** 20 * seen_by  # peaky
        att = att / att.sum(-1, keepdim=True)  # attention probabilities over the keys returned
        cache.observe(att)  # as attend() does for h2o (window ranks by position only)
        group = att.view(B, n_kv, n_head // n_kv, step, -1).sum(dim=(2, 3))  # GQA: sum the group
        for b in range(B):
            for h in range(n_kv):
                for s, p in enumerate(keys[b, h, :, 0].round().long().tolist()):
                    ref[b][h][p] += group[b, h, s].item()
        t0 += step
    assert cache.tokens() == budget - 1 + step


COMBOS = [dict(), dict(n_kv_head=2), dict(n_kv_head=1, kv_share=2), dict(window=5, global_layers="1"),
          dict(attention="linear", linear_layers="0")]  # a hybrid: its softmax layer evicts


@pytest.mark.parametrize("kw", COMBOS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "mha")
@pytest.mark.parametrize("policy", sorted(POLICIES))  # every named rule
def test_budget_larger_than_the_text_equals_the_plain_cache(kw, policy):
    m = tiny(**kw)
    idx = text(T=30)
    full, _ = m(idx)
    kv = KVOptions(kv_evict=policy, kv_budget=100, kv_recent=4 if policy != "window" else 0, kv_sink=2).check()
    for step in (1, 7):
        ours, caches = feed(m, idx, step, kv)
        assert isinstance(caches[-1], EvictKVCache)
        torch.testing.assert_close(ours, full, **TOL)
    if kw.get("window"):
        assert caches[0].tokens() <= 5 + 6  # a local layer never holds more than its window


@pytest.mark.parametrize("policy", sorted(POLICIES) + ["tutorial_user_evict:newest"])  # every named rule
def test_kept_keys_keep_their_distances(policy):
    # one layer, one KV head, one row: one kept set, so the last query must see exactly what
    # a stateless forward over the kept tokens, at their own positions, computes
    m = tiny(n_layer=1, n_kv_head=1)
    idx = text(B=1, T=50)
    recent = 3 if policy != "window" else 0
    caches = KVOptions(kv_evict=policy, kv_budget=12, kv_recent=recent, kv_sink=2).check().make_caches(m, 1)
    for t in range(50):
        logits, caches = m(idx[:, t:t + 1], caches)
        c = caches[0]
        keep = sorted(c.pos_codes[0, 0].tolist() + c.pos_full.tolist())
        ref = forward_at(m, idx[:, keep], torch.tensor(keep))
        torch.testing.assert_close(logits[:, -1], ref[:, -1], **TOL)
    assert len(keep) == 12 and keep[:2] == [0, 1] and keep[-3:] == [47, 48, 49]  # budget 12, the newest included
    if policy == "h2o":
        assert keep != [0, 1] + list(range(40, 50))  # not merely a window


@pytest.mark.parametrize("sink", [0, 3])
@pytest.mark.parametrize("local", [{}, dict(window=16, global_layers="0")])
def test_window_policy_is_the_bounded_cache(sink, local):
    # a budget of N is a window of N: a decode step sees N tokens, itself included; the sinks
    # count in the budget and come on top of kv_window (in a local layer too, where both bind
    # inside its window of 16)
    m = tiny(n_kv_head=2, **local)
    idx = text(T=45)
    budget = 10
    ours, caches = feed(m, idx, 1, KVOptions(kv_evict="window", kv_budget=budget, kv_sink=sink).check())
    ring, _ = feed(m, idx, 1, KVOptions(kv_window=budget - sink, kv_sink=sink))
    torch.testing.assert_close(ours, ring, **TOL)
    assert caches[0].tokens() == budget


def test_quantized_eviction_holds_codes_per_head():
    m = tiny(n_kv_head=2)
    kv = KVOptions(kv_quant="int4", kv_quant_group=4, kv_quant_residual=4, kv_evict="h2o",
                   kv_budget=16, kv_recent=4, kv_sink=1).check()
    _, caches = feed(m, text(T=60), 1, kv)
    c = caches[0]
    assert c.tokens() == 16 and c.k_codes[0].dtype == torch.uint8 and c.k_codes[0].shape == (2, 2, 12, 4)
    assert c.pos_full.tolist() == [56, 57, 58, 59]
    assert (c.pos_codes == 0).any(-1).all()  # every head kept its sink
    bits = 2 * 2 * 2 * (12 * (8 * 4 + 2 * 16 * 2) + 4 * 8 * 32)  # k and v; B x nkv; codes+scales+zeros; residual
    assert c.size_bits() == bits


def test_ranking_by_score_refuses_an_attention_it_would_replace():
    """h2o (and a plug-in rule) computes softmax attention itself to observe its scores: on a
    model whose attention is another kind (here a user's plug-in) it is refused, in one line,
    rather than silently swapping that attention for softmax; recency eviction works as usual."""
    from utils import UserError
    config = tiny(attention="tutorial_user_attention:attend").config
    for rule in ("h2o", "tutorial_user_evict:by_score"):
        with pytest.raises(UserError, match="ranks keys by the softmax attention"):
            KVOptions(kv_evict=rule, kv_budget=8).check_model(config)
    KVOptions(kv_evict="window", kv_budget=8).check_model(config)
    KVOptions(kv_evict="tutorial_user_evict:newest", kv_budget=8).check_model(config)  # marked: no scores
    KVOptions(kv_evict="h2o", kv_budget=8, kv_recent=2).check_model(tiny(attention="naive").config)
    # a hybrid's linear layers hold no keys: its softmax layers are what h2o ranks
    KVOptions(kv_evict="h2o", kv_budget=8, kv_recent=2).check_model(tiny(attention="linear", linear_layers="0").config)


def test_a_rule_that_returns_nan_is_refused_when_it_does():
    """A rule whose priorities come out nan (here for every other position) is one UserError,
    not an eviction decided by how topk orders nan."""
    from utils import UserError

    def per_score(scores, pos, seen, kv_sink, kv_recent):
        return torch.where(pos % 2 == 0, scores, float("nan"))

    cache = EvictKVCache(per_score, 4, 1, 2, 8)
    q = torch.randn(1, 2, 1, 8)
    with pytest.raises(UserError, match="returned nan priorities"):
        for _ in range(8):
            k, v = torch.randn(1, 2, 1, 8), torch.zeros(1, 2, 1, 8)
            cache.attend(None, q, *cache.update(k, v))


@pytest.mark.parametrize("attention", ["softmax", "tutorial_user_attention:attend"])
def test_a_rule_marked_needs_scores_false_attends_with_the_models_own_attention(attention):
    """A plug-in rule ranking by position alone (needs_scores = False) runs on any attention
    kind, through that kind's own function (no scores computed: they stay zeros), and keeps
    what the same rule as the named window keeps: the same logits as --kv_evict=window."""
    import attention as attention_module

    m = tiny(n_kv_head=2, attention=attention)
    idx = text(T=40)
    rule = KVOptions(kv_evict="tutorial_user_evict:newest", kv_budget=10, kv_sink=2).check()
    assert not rule.ranks_by_score()
    rule.check_model(m.config)
    calls = []
    naive = attention_module.naive_attention
    with pytest.MonkeyPatch.context() as mp:  # the cache must not write the attention out itself
        mp.setattr("kv.evict.naive_attention", lambda *a, **kw: calls.append(1) or naive(*a, **kw))
        ours, caches = feed(m, idx, 1, rule)
    assert not calls and isinstance(caches[0], EvictKVCache) and caches[0].tokens() == 10
    assert not caches[0].score_codes.any()
    window, _ = feed(m, idx, 1, KVOptions(kv_evict="window", kv_budget=10, kv_sink=2).check())
    torch.testing.assert_close(ours, window, **TOL)
