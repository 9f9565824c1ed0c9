"""
KV-cache eviction: hold at most kv_budget tokens per layer and KV head, drop the rest.

    window  recency only, the StreamingLLM baseline (arXiv 2309.17453): the kv_sink first
            tokens and the newest kv_budget - kv_sink (what --kv_window=kv_budget - kv_sink
            with the same --kv_sink holds)
    h2o     Heavy-Hitter Oracle (arXiv 2306.14048): the kv_sink first tokens, the kv_recent
            newest, and as many more as fit, those with the largest cumulative attention
            probability (summed over every query so far, over the query heads of a GQA group
            and over the layers of a kv_share group). Each KV head chooses its own tokens.
    package.module:function   your own rule in H2O's place (below)

H2O reads the attention probabilities: the cache's attend() computes the layer's attention
the naive way (attention.naive_attention) and adds the probabilities to each key's score.

A budget of N tokens counts as a window of N does (kv.cache): N tokens held, the newest
included. Eviction happens lazily, at the start of the next update, once every layer that
shares the cache has reported its scores: it leaves kv_budget - 1 tokens, so a decode step
attends over kv_budget, its own token included (chunk = 1 is the paper's decode loop; a
chunk of T tokens attends over kv_budget - 1 + T and evicts once per chunk). kv_recent
counts the same way: the kv_recent newest tokens, the step's own included. Keys are cached
after RoPE at their own positions, so a kept key is still rotated by its true distance to
every later query.

With quantization (kv_quant) the kept tokens are stored as codes. Keys are then quantized
per token, like values: a KIVI key group spans G tokens, and single evictions would leave
holes in groups whose scales are still held, so nothing would be saved. The full-precision
residual (the kv_quant_residual newest tokens) is never evicted, so that every head holds
the same number of codes and the same residual; it counts in the budget, and so does the
token that leaves it at a step (kv_budget >= kv_sink + kv_quant_residual + 1). size_bits() counts
the keys and values held (codes, scales, zero points, residual); the per-head positions and
scores are bookkeeping, like the plain cache's positions, and are not counted.

Your own rule, --kv_evict=package.module:function (h2o_priority below is H2O's):
    def function(scores, pos, seen, kv_sink, kv_recent):
        # scores (B, nkv, n): cumulative attention each cached token received; pos (B, nkv, n):
        # its position in the text; seen: tokens read once the step's (first) new token is in:
        # that token, at seen - 1, is not among those ranked and always stays; kv_sink,
        # kv_recent: the options (positions < kv_sink and >= seen - kv_recent stay)
        return priority             # (B, nkv, n) floats: each head keeps its highest, up to the budget
    function.needs_scores = False   # optional: a rule that ranks by position alone says so
The cache still drops tokens no later query can see (a --kv_window bound) first, and never
drops the full-precision residual of a quantized cache; everything else is the rule's choice.
A rule that reads scores makes its cache compute the layer's attention itself, written out
(softmax and naive models only); one marked needs_scores = False is handed zeros for scores,
and its cache attends with the model's own attention, of any kind, at that kind's speed.
"""

import torch

from attention import naive_attention
from kv.quant import FullPrecision, flat_index
from kv.quant_cache import QuantKVCache
from plugins import import_function
from devices import no_autocast
from utils import UserError


def h2o_priority(scores, pos, seen, kv_sink, kv_recent):
    """H2O's choice as a plain function (what --kv_evict=h2o uses; the reference of exercise 4):
    the kv_sink first and the kv_recent newest tokens come first, then the most attended."""
    protect = (pos < kv_sink) | (pos >= seen - kv_recent)
    return torch.where(protect, float("inf"), scores)


# the named rules: name -> the function ranking cached tokens (None: recency alone, no scores).
# A function here ranks by attention score unless marked needs_scores = False (reads_scores):
# its cache computes softmax attention itself (naive, with the probabilities), so models of
# other attention kinds refuse it (KVOptions.check_model)
POLICIES = {"window": None, "h2o": h2o_priority}


def reads_scores(rule):
    """Does rule (None: recency alone) read the attention scores, so that its cache must
    compute them?"""
    return rule is not None and getattr(rule, "needs_scores", True) is not False


def resolve_evict(name):
    """The rule for kv_evict `name`: None for "none"/"window", a function of POLICIES, or a user's function."""
    if name == "none":
        return None
    if name in POLICIES:
        return POLICIES[name]
    if ":" not in name:
        raise UserError(f"unknown kv_evict {name!r}: choose none, {', '.join(POLICIES)} "
                        "or give your own rule as package.module:function")
    return import_function(name, "kv_evict")


def priorities(rule, scores, pos, seen, kv_sink, kv_recent):
    """rule's priorities for the cached tokens, or one UserError if they are not floats shaped
    like scores."""
    rank = rule(scores, pos, seen, kv_sink, kv_recent)
    if not (torch.is_tensor(rank) and rank.shape == pos.shape and rank.is_floating_point()):
        raise UserError(f"kv_evict rule {getattr(rule, '__name__', rule)} must return float priorities shaped "
                        f"like scores {tuple(pos.shape)}, got {getattr(rank, 'dtype', type(rank).__name__)} "
                        f"{tuple(getattr(rank, 'shape', ()))}")
    # a user's rule only (h2o's priorities are finite): the check waits for the device at each eviction
    if rule is not h2o_priority and bool(rank.isnan().any()):  # (topk's order for nan would decide what goes)
        raise UserError(f"kv_evict rule {getattr(rule, '__name__', rule)} returned nan priorities (0 / 0, or "
                        "inf - inf?); give every cached token a number, float('inf') for those that must stay")
    return rank


def check_rule(name):
    """Call a user's rule (kv_evict `name`) once on a small input, so that a wrong signature or
    result is one UserError at the start, not when the first eviction comes, deep in a run."""
    rule = resolve_evict(name)
    if rule is None or rule is h2o_priority:
        return
    scores = torch.rand(1, 2, 6, generator=torch.Generator().manual_seed(0))
    priorities(rule, scores, torch.arange(6).expand(1, 2, 6).clone(), 8, 1, 2)  # (what it raises: run_main names it)


class EvictKVCache(QuantKVCache):
    """A (possibly quantized) cache that keeps `budget` tokens per KV head (see the module
    docstring). keep_recent/keep_sink: tokens eviction never drops. window/sink: the history
    bound of kv.cache.visible() (a local layer's window, or --kv_window/--kv_sink).

    The quantized part is a set of slots in no particular order, each with its position and
    score per head: a token leaving the residual takes the slot of one just evicted, so a
    decode step writes one row per head instead of moving the whole cache."""

    def __init__(self, policy, budget, batch_size, n_kv_head, head_dim, keep_recent=0, keep_sink=0,
                 key_fmt=None, val_fmt=None, residual=0, window=0, sink=0, dtype=torch.float32,
                 device="cpu"):
        # policy: "window", "h2o" or a rule function(scores, pos, seen, kv_sink, kv_recent)
        if not callable(policy) and policy not in POLICIES:
            raise ValueError(f"unknown eviction policy {policy!r}")
        self.rule = policy if callable(policy) else resolve_evict(policy)  # None: recency only
        key_fmt = key_fmt or FullPrecision()
        val_fmt = val_fmt or FullPrecision()
        if key_fmt.tokens_per_group != 1 or val_fmt.tokens_per_group != 1:
            raise ValueError("eviction needs per-token formats (keys are not grouped per channel)")
        if isinstance(key_fmt, FullPrecision):
            residual = 0  # nothing to keep apart
        super().__init__(key_fmt, val_fmt, batch_size, n_kv_head, head_dim, residual, window, sink,
                         dtype, device)
        self.budget = budget
        self.keep_recent, self.keep_sink = keep_recent, keep_sink
        self.pos_codes = torch.zeros(batch_size, n_kv_head, 0, dtype=torch.long, device=device)  # per head
        self.score_codes = torch.zeros(batch_size, n_kv_head, 0, device=device)  # attention received
        self.score_full = self.score_codes.clone()
        self.holes = None  # (B, nkv, e): slots evicted, to be refilled in this update
        self.scored = reads_scores(self.rule)  # attend() observes the attention probabilities

    def _appended(self, T):
        B, H, _ = self.score_full.shape
        self.score_full = torch.cat([self.score_full, self.score_full.new_zeros(B, H, T)], dim=-1)

    def attend(self, fn, q, k, v, mask, dropout_p=0.0):
        """With a rule that ranks by score: attention written out, its probabilities observed."""
        if not self.scored:  # (the scores stay zeros)
            return fn(q, k, v, mask, dropout_p)
        y, att = naive_attention(q, k, v, mask, dropout_p, need_weights=True)
        with no_autocast(q.device.type):
            self.observe(att)
        return y

    def observe(self, att):
        """Add the attention probabilities att (B, nh, T, S) over the keys the last update
        returned to each key's score, summing the query heads of each KV head."""
        B, H, n_codes = self.score_codes.shape
        s = att.float().view(B, H, -1, att.size(-2), att.size(-1)).sum(dim=(2, 3))
        self.score_codes += s[..., :n_codes]
        self.score_full += s[..., n_codes:]

    def _after_prefill(self):
        """Nothing: the prefill's attention scores are observed after the update, so eviction
        waits for the first decode step (sample.py says so when the prompt is the peak)."""

    def _forget(self, T, now=None):
        """QuantKVCache._forget's, per head: what no query from self.seen (or now) on can see
        goes first, then the lowest ranked beyond the budget."""
        if self.window > 0:  # the residual: the same tokens for every head
            keep_full = self._alive(self.pos_full, now)
            if not bool(keep_full.all()):
                self._keep_full(keep_full)
                self.score_full = self.score_full[..., keep_full]
        n_codes = self.pos_codes.size(-1)
        if n_codes == 0:
            return
        # the residual is always kept, and the step's first token will need a place
        n_keep = self.budget - 1 - self.pos_full.numel()
        alive = None
        if self.window > 0:
            alive = self._alive(self.pos_codes, now)
            n_keep = min(n_keep, int(alive.sum(-1).min()))
        if n_keep >= n_codes:
            return
        gone = self.evicted(alive, n_codes - n_keep)
        if n_codes - n_keep <= self.pos_full.numel() + T - self.residual:
            self.holes = gone  # as many tokens leave the residual in this update: they move in
            return
        keep = torch.ones_like(self.pos_codes, dtype=torch.bool).scatter_(-1, gone, False)
        idx = keep.nonzero()[:, 2].view(*keep.shape[:2], n_keep)  # (B, nkv, n_keep), in slot order
        flat = flat_index(idx, n_codes)
        self.k_codes, self.v_codes = self.key_fmt.gather(self.k_codes, flat), self.val_fmt.gather(self.v_codes, flat)
        self.pos_codes, self.score_codes = self.pos_codes.gather(-1, idx), self.score_codes.gather(-1, idx)

    def evicted(self, alive, e):
        """Slots (B, nkv, e) of the quantized part to evict: tokens out of sight (alive False;
        None = all in sight) first, then the lowest ranked: by age (window, never the kv_sink
        first or the kv_recent newest) or by the rule's priority (h2o_priority, or a user's)."""
        p = self.pos_codes
        now = self.seen + 1  # counting the step's first token, which stays: kv_recent includes it
        if self.rule is None:  # window: recency only
            rank = torch.where((p < self.keep_sink) | (p >= now - self.keep_recent), float("inf"), p.float())
        else:  # copies: a rule that writes into its inputs must not change the scores kept
            rank = priorities(self.rule, self.score_codes.clone(), p.clone(), now, self.keep_sink, self.keep_recent)
        if alive is not None:
            rank = rank.masked_fill(~alive, float("-inf"))
        return rank.topk(e, dim=-1, largest=False, sorted=False).indices

    def _store(self, k_codes, v_codes, m):
        pos = self.pos_full[:m].expand(*self.pos_codes.shape[:2], -1)
        score, self.score_full = self.score_full[..., :m], self.score_full[..., m:]
        e = 0
        if self.holes is not None:  # reuse the evicted slots
            e = self.holes.size(-1)
            flat = flat_index(self.holes, self.pos_codes.size(-1))
            self.key_fmt.overwrite(self.k_codes, flat, [t[:, :, :e] for t in k_codes])
            self.val_fmt.overwrite(self.v_codes, flat, [t[:, :, :e] for t in v_codes])
            self.pos_codes.view(-1).index_copy_(0, flat, pos[..., :e].reshape(-1))
            self.score_codes.view(-1).index_copy_(0, flat, score[..., :e].reshape(-1))
            self.holes = None
        if m > e:
            rest = lambda payload: tuple(t[:, :, e:] for t in payload)
            if self.k_codes is None:
                self.k_codes, self.v_codes = rest(k_codes), rest(v_codes)
            else:
                self.k_codes = tuple(torch.cat(pair, dim=2) for pair in zip(self.k_codes, rest(k_codes)))
                self.v_codes = tuple(torch.cat(pair, dim=2) for pair in zip(self.v_codes, rest(v_codes)))
            self.pos_codes = torch.cat([self.pos_codes, pos[..., e:]], dim=-1)
            self.score_codes = torch.cat([self.score_codes, score[..., e:]], dim=-1)
