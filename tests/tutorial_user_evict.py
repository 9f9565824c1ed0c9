"""A user's own eviction rules, plugged in with --kv_evict=tutorial_user_evict:NAME (the tests
check the plug-in point with them). scores, pos: (B, nkv, n); returns priorities shaped alike."""

import torch


def by_score(scores, pos, seen, kv_sink, kv_recent):
    """H2O's idea without its protected tokens: the most attended stay."""
    return scores.clone()


def newest(scores, pos, seen, kv_sink, kv_recent):
    """Recency, read from the positions alone: the kv_sink first and then the newest stay
    (what --kv_evict=window keeps)."""
    return torch.where(pos < kv_sink, float("inf"), pos.float())


newest.needs_scores = False  # it never reads scores: its cache attends with the model's own attention
