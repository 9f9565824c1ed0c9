"""
Checks of exercise 4b, KV eviction: priority(scores, pos, seen, kv_sink, kv_recent) -> (B, nkv, n),
like kv.evict.h2o_priority.
"""

import torch

from kv.policy import KVOptions
from exercises.checks_common import (TRAIN_BLOCK, expect, feed, held_out, random_text, tiny_model,
                                     token_losses, trained_model)


def evict_inputs(n=24, seen=60, seed=0):
    """Cached tokens of 2 x 3 heads in shuffled slots: positions 0..3, a sample of the middle
    and the newest; scores with zeros, ties and one heavy hitter per head."""
    g = torch.Generator().manual_seed(seed)
    pos = []
    for _ in range(6):
        middle = (torch.randperm(seen - 14, generator=g)[:n - 14] + 4).tolist()
        p = torch.tensor(list(range(4)) + middle + list(range(seen - 10, seen)))
        pos.append(p[torch.randperm(n, generator=g)])
    pos = torch.stack(pos).view(2, 3, n)
    scores = torch.rand(2, 3, n, generator=g) * (seen - pos)  # older tokens have collected more
    scores[..., ::5] = 0.0
    scores[..., 1::7] = scores[..., 2::7][..., :scores[..., 1::7].size(-1)]  # ties
    return scores, pos, seen


def call_priority(impl, scores, pos, seen, sink, recent):
    s, p = scores.clone(), pos.clone()
    rank = impl.priority(s, p, seen, sink, recent)
    expect(torch.is_tensor(rank) and tuple(rank.shape) == tuple(scores.shape),
           f"priority must return a tensor shaped like scores {tuple(scores.shape)}, "
           f"got {tuple(getattr(rank, 'shape', ())) or type(rank).__name__}")
    expect(rank.is_floating_point(), f"priorities must be floats (float('inf') for the protected), got {rank.dtype}")
    expect(torch.equal(s, scores) and torch.equal(p, pos), "priority changed its inputs: work on a copy "
           "(torch.where(...) makes one); the cache keeps adding to these scores")
    expect(not bool(rank.isnan().any()), "some priorities are nan")
    return rank


EVICT_CASES = [(4, 10), (2, 4), (0, 6), (3, 0)]  # (kv_sink, kv_recent)


def protected_above_rest(rank, must):
    """Is every protected token ranked above every other one, in every head?"""
    low = torch.where(must, rank, float("inf")).amin(-1)
    high = torch.where(must, float("-inf"), rank).amax(-1)
    return bool((low > high).all()) if bool(must.any()) else True


def check_evict_shapes(impl, ctx):
    scores, pos, seen = evict_inputs()
    call_priority(impl, scores, pos, seen, 4, 10)


def check_evict_sinks(impl, ctx):
    scores, pos, seen = evict_inputs()
    for sink, recent in EVICT_CASES:
        rank = call_priority(impl, scores, pos, seen, sink, recent)
        sinks = pos < sink
        may_go = ~sinks & (pos < seen - recent)
        expect(protected_above_rest(torch.where(sinks | may_go, rank, float("-inf")), sinks),
               f"kv_sink={sink}: a token at a position < {sink} is ranked below a token that may go: "
               "the sinks must always stay (give them float('inf'))")


def check_evict_recent(impl, ctx):
    scores, pos, seen = evict_inputs()
    for sink, recent in EVICT_CASES:
        rank = call_priority(impl, scores, pos, seen, sink, recent)
        new = pos >= seen - recent
        may_go = (pos >= sink) & ~new
        expect(protected_above_rest(torch.where(new | may_go, rank, float("-inf")), new),
               f"kv_recent={recent}, seen={seen}: a token at a position >= {seen - recent} is ranked below "
               "a token that may go: the kv_recent newest must always stay")


def check_evict_scores(impl, ctx):
    scores, pos, seen = evict_inputs()
    for sink, recent in EVICT_CASES:
        rank = call_priority(impl, scores, pos, seen, sink, recent)
        free = (pos >= sink) & (pos < seen - recent)
        s = scores.clone()
        heavy = torch.where(free, s, float("-inf")).argmax(-1, keepdim=True)  # the most attended
        s.scatter_(-1, heavy, 1e6)  # make it a clear heavy hitter
        rank = call_priority(impl, s, pos, seen, sink, recent)
        top = rank.gather(-1, heavy)
        unused = free & (s == 0)
        expect(bool((torch.where(unused, rank, float("-inf")) < top).all()),
               f"kv_sink={sink}, kv_recent={recent}: a token nobody attended to is ranked above the token "
               "with by far the largest attention: rank by the scores (higher = keep)")


def check_evict_model(impl, ctx):
    budget, sink, recent = 10, 2, 3
    model = tiny_model(n_kv_head=2, n_layer=3, kv_share=1).eval()
    idx = random_text(2, 40)
    kv = KVOptions(kv_evict=impl.spec("priority"), kv_budget=budget, kv_sink=sink, kv_recent=recent)
    states = kv.make_caches(model, 2)
    with torch.no_grad():
        for t in range(idx.size(1)):
            logits, states = model(idx[:, t:t + 1], states)
            for layer, cache in enumerate(states):
                held = cache.pos_codes  # (B, nkv, n): what each head holds (eviction runs before a step's token is added)
                expect(held.size(-1) <= budget + 1, f"step {t}: layer {layer} holds {held.size(-1)} tokens, "
                       f"budget {budget} plus this step's")
                need = set(range(min(sink, t + 1))) | set(range(max(t + 1 - recent, 0), t + 1))
                for head in held.reshape(-1, held.size(-1)):
                    missing = need - set(head.tolist())
                    expect(not missing, f"step {t}: layer {layer} dropped {sorted(missing)}; the sinks and the "
                           f"{recent} newest must stay (kv_sink={sink}, kv_recent={recent})")
    return f"40 decode steps, budget {budget}, sinks and newest always held"


def check_evict_eval(impl, ctx):
    model = trained_model()
    x, y = held_out(TRAIN_BLOCK, rows=32)
    budget, sink, recent = 12, 2, 4
    losses = {}
    with torch.no_grad():
        for name, options in (("plain", None), ("window", dict(kv_evict="window")),
                              ("yours", dict(kv_evict=impl.spec("priority"), kv_recent=recent))):
            kv = KVOptions(kv_window=0, kv_budget=budget, kv_sink=sink, **options) if options else None
            logits, _ = feed(model, x, 1, kv)
            losses[name] = token_losses(logits, y)[budget:].mean().item()
    expect(losses["yours"] <= losses["window"] + 0.05,
           f"loss {losses['yours']:.3f} with your rule, {losses['window']:.3f} keeping the newest "
           f"{budget - sink} (plain cache {losses['plain']:.3f}): your choice of tokens costs more than recency")
    return (f"budget {budget} of {TRAIN_BLOCK}: loss {losses['plain']:.3f} plain, {losses['window']:.3f} recency only, "
            f"{losses['yours']:.3f} yours")
