"""
The peak KV bits of a token-by-token decoder, whatever chunk a model was fed in: what
eval_kv.py reports for every setting (its peak KV bits per stream and bits per token).

    from kv.peak import decoder_peak
    bits = decoder_peak(model, KVOptions(kv_window=256, kv_quant="int4"), L=4096)
"""

import torch

from attention import naive_attention
from kv.cache import Cache


def least_cache_bytes(config, kv, L, width=2):
    """Bytes that one stream's KV caches under kv (KVOptions) hold at the least over L tokens,
    width bytes a value: each layer's (one per kv_share group) at most its bound's tokens, a
    local layer's at most its window, none for linear attention; a quantized cache counted at
    2 bits a value, fewer than any format holds. A cheap floor for refusing what cannot fit."""
    c = config
    bound = min(L, kv.kv_window + kv.kv_sink) if kv.kv_window > 0 else L
    bound = min(bound, kv.kv_budget + 1) if kv.kv_evict != "none" else bound
    held = sum(min(bound, c.window) if c.is_local(i) else bound  # tokens, over the caches
               for i in range(0, c.n_layer, c.kv_share) if not c.keeps_state(i))
    values = 2 * c.kv_heads * c.head_dim * held
    return values // 4 if kv.kv_quant != "none" else values * width


@torch.no_grad()
def decoder_peak(model, kv, L, dtype=torch.bfloat16):
    """Peak KV bits per stream of a token-by-token decoder with kv's caches (KVOptions) over L
    tokens. What a cache holds depends on its rules and on how many tokens it has read, not
    on their values, so zeros stand in for the model's keys and values (and their uniform
    attention for H2O's scores), one token at a time, whatever chunk the model was fed in;
    layers whose caches are built alike hold alike, so one cache stands in for each kind."""
    c = model.config
    p = next(model.parameters())
    dtype = dtype or p.dtype
    caches = kv.make_caches(model, 1, capacity=L, dtype=dtype)
    kinds = {}  # (attention kind, local?) -> the caches of those layers (one per kv_share group)
    for i in range(0, c.n_layer, c.kv_share):
        kinds.setdefault((c.kind(i), c.is_local(i)), []).append(caches[i])
    fixed = sum(len(g) * g[0].size_bits() for g in kinds.values() if not g[0].holds_tokens)  # states
    stand_ins = [(g[0], len(g)) for g in kinds.values() if g[0].holds_tokens]
    held = lambda: fixed + sum(n * cache.size_bits() for cache, n in stand_ins)
    # zeros in the storage dtype: nothing to convert when the caches hand them back
    zeros = lambda T: torch.zeros(1, c.kv_heads, T, c.head_dim, dtype=dtype, device=p.device)  # (B, nkv, T, hs)
    q = torch.zeros(1, c.n_head, 1, c.head_dim, dtype=dtype, device=p.device)  # (B, nh, T, hs)
    start, stop = horizon(kv, c, L)
    peak = fixed
    if start:  # a cache that only grows: one chunk leaves it as `start` decode steps would
        for cache, _ in stand_ins:
            cache.update(zeros(start), zeros(start))
        peak = held()
    for _ in range(start, stop):
        for cache, _ in stand_ins:
            k, v, mask = cache.update(zeros(1), zeros(1))
            if type(cache).attend is not Cache.attend:  # a cache that reads the attention (H2O)
                cache.attend(naive_attention, q, k, v, mask)
        peak = max(peak, held())
    return peak


def horizon(kv, config, L):
    """(start, stop): the tokens over which decoder_peak must follow kv's caches one at a
    time. A bounded cache (a window or a budget in every softmax layer) has gone through every
    state it will be in after kv_sink + window + kv_budget + kv_quant_residual + key group
    tokens (its residual and key groups cycle from there): twice that, with a margin, from 0.
    An unbounded one (no window anywhere) only grows, by a key group at a time, so its peak is
    among the last 2 (kv_quant_residual + key group) + 64 tokens. A mix, kv_trim or an option
    not yet in kv/policy.py's BUILT_IN (which may bound a cache in ways not known here): all L."""
    windows = [kv.kv_window if kv.kv_window > 0 else (config.window if config.is_local(i) else 0)
               for i in range(config.n_layer) if not config.keeps_state(i)]
    quant = (kv.kv_quant_residual + kv.key_group()) if kv.kv_quant != "none" else 0
    if kv.kv_trim or kv.others():
        return 0, L
    if kv.kv_evict != "none" or all(windows):
        return 0, min(L, 2 * (kv.kv_sink + max(windows, default=0) + kv.kv_budget + quant) + 64)
    if not any(windows):
        return max(L - 2 * quant - 64, 0), L
    return 0, L
