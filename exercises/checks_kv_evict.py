"""
Checks of exercise 4b, KV eviction: priority(scores, pos, seen, kv_sink, kv_recent) -> (B, nkv, n),
like kv.evict.h2o_priority.
"""

import functools
import random

import torch
from torch.nn import functional as F

from kv.policy import KVOptions
from exercises.checks_common import Failed, Skipped, expect, feed, random_text, see, short, tiny_model
from model import GPT, GPTConfig


def evict_inputs(n=24, seen=60, seed=0):
    """Cached tokens of 2 x 3 heads in shuffled slots: positions 0..3, a sample of the middle
    and the newest ranked, seen - 11 .. seen - 2 (the step's own token, at seen - 1, is never
    among them: the cache does not rank it); scores with zeros and ties (check_evict_scores
    adds a heavy hitter)."""
    g = torch.Generator().manual_seed(seed)
    pos = []
    for _ in range(6):
        middle = (torch.randperm(seen - 15, generator=g)[:n - 14] + 4).tolist()
        p = torch.tensor(list(range(4)) + middle + list(range(seen - 11, seen - 1)))
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
           f"got {tuple(getattr(rank, 'shape', ())) or type(rank).__name__}: one priority per cached token, "
           "not the indices of the tokens to keep")
    expect(rank.is_floating_point(), f"priorities must be floats (float('inf') for the protected), got {rank.dtype}")
    expect(torch.equal(s, scores) and torch.equal(p, pos), "priority changed its inputs: build the priorities "
           "in a new tensor; the cache keeps adding to these scores")
    expect(not bool(rank.isnan().any()), "some priorities are nan")
    n = rank.size(-1)
    if torch.equal(rank.sort(-1).values, torch.arange(n, dtype=rank.dtype).expand_as(rank)):
        expect(not returns_indices(impl), f"every head's priorities are the numbers 0..{n - 1} in some order, "
               "and the sinks and the newest are not the highest of them: they look like the indices argsort "
               "returns, not priorities; slot j must hold the priority of the token in slot j")
    return rank


def returns_indices(impl):
    """Ranks (slot j holds token j's rank) are priorities; indices (the slots in the order of
    their priorities, what argsort returns) are not. Ranks put the protected tokens on top."""
    scores, pos, seen = evict_inputs()
    rank = impl.priority(scores.clone(), pos.clone(), seen, 4, 10).float()
    protected = (pos < 4) | (pos >= seen - 10)
    low = torch.where(protected, rank, float("inf")).amin(-1)
    high = torch.where(protected, float("-inf"), rank).amax(-1)
    return not bool((low > high).all())


EVICT_CASES = [(4, 10), (2, 4), (0, 6), (3, 0)]  # (kv_sink, kv_recent)


def below(rank, must, free):
    """The tokens of `must` ranked below a token of `free` in their head (a tie at the top of a
    head is the business of check_evict_only: it means too many are protected)."""
    high = torch.where(free, rank, float("-inf")).amax(-1, keepdim=True)
    top = rank.amax(-1, keepdim=True)
    return must & ((rank < high) | ((rank == high) & (rank < top)))


def ranked_below(rank, must, free):
    """Is some token of `must` ranked below a token of `free` in its head?"""
    return bool(below(rank, must, free).any())


def by_slot(rank, first, last):
    """Does the rule protect the first `first` and last `last` slots of every head (places in
    the cache) rather than positions?"""
    top = rank.amax(-1, keepdim=True)
    ok = torch.ones(rank.shape[:-1], dtype=torch.bool)
    if first:
        ok &= (rank[..., :first] == top).all(-1)
    if last:
        ok &= (rank[..., -last:] == top).all(-1)
    return bool(ok.all())


def skip_if_overprotected(rank, pos, seen, sink, recent, judged):
    """Skipped when a token that may go is ranked as high as the protected ones (rule 4's
    failure): it then outranks everything for that reason alone, and `judged` cannot be told;
    or when a protected one is ranked below one that may go (rules 2 and 3's failure)."""
    protected = (pos < sink) | (pos >= seen - recent)
    if ranked_below(rank, protected, ~protected):
        raise Skipped(f"a token that must stay is ranked below one that may go (see above), so {judged} "
                      "cannot be told")
    low = torch.where(protected, rank, float("inf")).amin(-1, keepdim=True)
    if bool((~protected & (rank >= low)).any()):
        raise Skipped(f"tokens that may go are protected too (see above), so {judged} cannot be told")


SLOTS = ("heads keep their tokens in slots in no particular order (an evicted token's slot goes to "
         "the next one): find the tokens by pos")


def check_evict_shapes(impl, ctx):
    scores, pos, seen = evict_inputs()
    call_priority(impl, scores, pos, seen, 4, 10)


def check_evict_sinks(impl, ctx):
    scores, pos, seen = evict_inputs()
    for sink, recent in EVICT_CASES:
        rank = call_priority(impl, scores, pos, seen, sink, recent)
        sinks = pos < sink
        may_go = ~sinks & (pos < seen - recent)
        if ranked_below(rank, sinks, may_go):
            expect(not (sink and by_slot(rank, sink, 0)), f"kv_sink={sink}: the first {sink} slots are protected, "
                   f"not the tokens at positions < {sink}: {SLOTS}")
            raise Failed(f"kv_sink={sink}: a token at a position < {sink} is ranked below a token that may go: "
                         "the sinks must always stay (give them float('inf'))")


def check_evict_recent(impl, ctx):
    scores, pos, seen = evict_inputs()
    for sink, recent in EVICT_CASES:
        rank = call_priority(impl, scores, pos, seen, sink, recent)
        new = pos >= seen - recent
        may_go = (pos >= sink) & ~new
        lost = sorted(set(pos[below(rank, new, may_go)].tolist()))
        if lost:
            expect(not (recent and by_slot(rank, 0, recent)), f"kv_recent={recent}: the last {recent} slots are "
                   f"protected, not the newest tokens: {SLOTS}")
            where = f"kv_recent={recent}, seen={seen}"
            edge = seen - recent
            expect(lost != [edge], f"{where}: position {edge} (= seen - kv_recent, the oldest of the kv_recent "
                   "newest) is ranked below a token that may go: protect pos >= seen - kv_recent")
            raise Failed(f"{where}: positions {short(lost)} (among the newest, pos >= seen - kv_recent = {edge}) "
                         "are ranked below a token that may go: the kv_recent newest must always stay")


def check_evict_only(impl, ctx):
    scores, pos, seen = evict_inputs()
    for sink, recent in EVICT_CASES:
        rank = call_priority(impl, scores, pos, seen, sink, recent)
        protected = (pos < sink) | (pos >= seen - recent)
        if ranked_below(rank, protected, ~protected):  # too few protected: rules 2 and 3 say so
            raise Skipped("a token that must stay is ranked below one that may go (see above), so which others "
                          "are protected cannot be told")
        low = torch.where(protected, rank, float("inf")).amin(-1, keepdim=True)
        over = ~protected & (rank >= low)
        if not bool(over.any()):
            continue
        extra = sorted(set(pos[over].tolist()))
        where = f"kv_sink={sink}, kv_recent={recent}, seen={seen}"
        edge_only = set(extra) <= {sink, seen - recent - 1}  # (an off-by-one at a boundary, nothing else)
        expect(not (edge_only and recent and seen - recent - 1 in extra), f"{where}: position {seen - recent - 1} is "
               f"protected with the newest, one too many: the kv_recent newest are the positions >= seen - "
               f"kv_recent = {seen - recent}; {see('4b', 3)}")
        everything = bool((over == ~protected).all())
        expect(not everything, f"{where}: every token is ranked as high as the protected ones, so nothing is "
               "told apart" + (": with kv_recent=0, a slice [-kv_recent:] is [-0:], the whole tensor, not "
                               f"nothing; {see('4b', 3)}" if recent == 0 else ""))  # (else this check's rule 4)
        expect(not (edge_only and sink in extra), f"{where}: position {sink} is protected with the sinks: the sinks "
               f"are the positions < kv_sink ({f'0..{sink - 1}' if sink else 'none when kv_sink=0'}); {see('4b', 2)}")
        raise Failed(f"{where}: positions {extra[:8]} are neither sinks nor among the newest, yet ranked as high "
                     "as the protected: the others are ranked by the attention they received")
    # a quantized cache keeps its kv_quant_residual newest apart, unranked: the ranked tokens
    # then end before seen - 1, and the newest are still found from seen, not from pos
    later, sink, recent = seen + 5, 4, 10
    rank = call_priority(impl, scores, pos, later, sink, recent)
    protected = (pos < sink) | (pos >= later - recent)
    low = torch.where(protected, rank, float("inf")).amin(-1, keepdim=True)
    over = ~protected & (rank >= low)
    if bool(over.any()):
        raise Failed(f"kv_sink={sink}, kv_recent={recent}, seen={later}, the newest ranked token at "
                     f"{int(pos.max())} (a quantized cache keeps its kv_quant_residual newest apart, unranked): "
                     f"positions {sorted(set(pos[over].tolist()))[:8]} are protected, below seen - kv_recent = "
                     f"{later - recent}: find the newest from seen, not from pos; {see('4b', 3)}")


def check_evict_scores(impl, ctx):
    scores, pos, seen = evict_inputs()
    for sink, recent in EVICT_CASES:
        free = (pos >= sink) & (pos < seen - recent)
        s = scores.clone()
        heavy = torch.where(free, s, float("-inf")).argmax(-1, keepdim=True)  # the most attended
        s.scatter_(-1, heavy, 1e4)  # a clear heavy hitter (over 100x the others; finite in float16)
        rank = call_priority(impl, s, pos, seen, sink, recent)
        plain = call_priority(impl, scores, pos, seen, sink, recent)
        if ranked_below(rank, ~free, free) and not ranked_below(plain, ~free, free):
            raise Failed(f"kv_sink={sink}, kv_recent={recent}: once one token's score reaches 1e4, a sink or one of "
                         "the newest is ranked below it: protect them with float('inf'), not a finite mark; "
                         f"attention sums grow with the text, past any finite number; {see('4b', 2)}")
        skip_if_overprotected(rank, pos, seen, sink, recent, "how the others are ranked by their scores")
        top = rank.gather(-1, heavy)
        unused = free & (s == 0)
        expect(bool((torch.where(unused, rank, float("-inf")) < top).all()),
               f"kv_sink={sink}, kv_recent={recent}: a token nobody attended to is ranked above the token "
               "with by far the largest attention: rank by the scores, higher = keep (not by position, nor by minus the "
               "score)")


def check_evict_heads(impl, ctx):
    scores, pos, seen = evict_inputs()
    rank = call_priority(impl, scores, pos, seen, 2, 4)
    other_scores, other_pos, _ = evict_inputs(seed=1)  # other heads: other tokens, other scores
    for b, h in ((0, 0), (1, 2)):
        for dim, what in ((1, "the other heads of its row"), (0, "the other batch rows")):
            away = torch.zeros(2, 3, 1, dtype=torch.bool)
            if dim == 1:
                away[b] = True
                away[b, h] = False
            else:
                away[1 - b] = True
            s2 = torch.where(away, other_scores * 10, scores)
            p2 = torch.where(away, other_pos, pos)
            rank2 = call_priority(impl, s2, p2, seen, 2, 4)
            order = lambda r: torch.sign(r[b, h][:, None] - r[b, h][None, :])  # noqa: E731
            expect(torch.equal(order(rank), order(rank2)), f"the priorities of head {h} of row {b} change when "
                   f"only {what} change: each head holds other tokens in its slots (slot j of two heads are "
                   f"different tokens), so rank every head by its own scores alone (no sum or mean over dim {dim})")


def check_evict_ties(impl, ctx):
    _, pos, seen = evict_inputs()
    s = torch.full(pos.shape, 2.0)
    s[..., ::3] = 5.0  # two groups of equal scores, of all ages
    for sink, recent in ((0, 0), (2, 4)):
        rank = call_priority(impl, s, pos, seen, sink, recent)
        skip_if_overprotected(rank, pos, seen, sink, recent, "how equal scores are ordered")
        free = (pos >= sink) & (pos < seen - recent)
        pair = free[..., :, None] & free[..., None, :] & (s[..., :, None] == s[..., None, :])
        older_above = pair & (pos[..., :, None] < pos[..., None, :]) & (rank[..., :, None] > rank[..., None, :])
        if bool(older_above.any()):
            b, h, i, j = older_above.nonzero()[0].tolist()
            old, young = pos[b, h, i].item(), pos[b, h, j].item()
            raise Failed(f"at equal scores an older token (position {old}) is ranked above a newer one "
                         f"({young}): the older had {seen - old} queries to collect that score, the newer only "
                         f"{seen - young}; leave ties equal or prefer the newer (dividing by the age seen - pos "
                         "does), never the older")


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
                expect(held.size(-1) <= budget, f"step {t}: layer {layer} holds {held.size(-1)} tokens, "
                       f"over the budget of {budget} (this step's token included)")
                need = set(range(min(sink, t + 1))) | set(range(max(t + 1 - recent, 0), t + 1))
                for head in held.reshape(-1, held.size(-1)):
                    missing = need - set(head.tolist())
                    expect(not missing, f"step {t}: layer {layer} dropped {sorted(missing)}; the sinks and the "
                           f"{recent} newest must stay (kv_sink={sink}, kv_recent={recent})")
    return f"40 decode steps, budget {budget}, sinks and newest always held"


# -----------------------------------------------------------------------------
# a text whose second byte is needed again and again: ">K" then lines of random letters, each
# ending in "=K". Recency alone forgets K; the attention every "=" pays it keeps it.

def recall_text(rows, length, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        key = rng.choice("ABCDEFGHIJKLMNOP")
        s = ">" + key
        while len(s) < length:
            s += "".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(8, 12))) + "=" + key
        out.append(list(s[:length].encode("ascii")))
    return torch.tensor(out)


@functools.lru_cache(maxsize=None)
def recall_model():
    """One layer trained for 100 steps (under a second) to answer every "=" with the text's key."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=64, bias=False))
    opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.99), "cpu")
    data = recall_text(16 * 100, 33, seed=100)
    model.train()
    for it in range(100):
        for group in opt.param_groups:
            group["lr"] = 3e-3 * min(1.0, (it + 1) / 20)
        rows = data[it * 16:(it + 1) * 16]
        logits, _ = model(rows[:, :-1])
        asked = rows[:, :-1] == ord("=")  # only the recalls are taught
        loss = F.cross_entropy(logits[asked], rows[:, 1:][asked])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return model


def check_evict_recall(impl, ctx):
    model = recall_model()
    text = recall_text(32, 49, seed=7)
    x, y = text[:, :-1], text[:, 1:]
    budget, sink, recent = 10, 1, 2
    asked = x == ord("=")
    asked[:, :budget] = False  # once eviction has begun
    losses = {}
    with torch.no_grad():
        for name, rule in (("plain", None), ("window", "window"), ("h2o", "h2o"), ("yours", impl.spec("priority"))):
            kv = KVOptions(kv_window=0, kv_budget=budget, kv_sink=sink, kv_evict=rule,
                           kv_recent=recent if rule != "window" else 0) if rule else None
            logits, _ = feed(model, x, 1, kv)
            losses[name] = F.cross_entropy(logits[asked], y[asked]).item()
    plain, window, yours = losses["plain"], losses["window"], losses["yours"]
    report = (f"loss at the recalls {yours:.2f} with {impl.whose} rule, {window:.2f} keeping only the newest, "
              f"{losses['h2o']:.2f} with the reference (kv.evict.h2o_priority), {plain:.2f} keeping everything")
    expect(yours <= plain + 0.25 * (window - plain), f"budget {budget}: {report}. Every '=' recalls the text's "
           "second byte, so that byte collects attention at every recall: rank by the attention received (a "
           "rule where age outweighs attention keeps only the newest)")
    return f"budget {budget} on text that recalls its second byte: {report}"
