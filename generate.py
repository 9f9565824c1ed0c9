"""
Generation: prefill the prompt in one forward, then one decode step per new token.

    from generate import generate
    from kv.policy import KVOptions
    out = generate(model, idx, max_new_tokens=100, temperature=0.8, top_k=200)
    out = generate(model, idx, 100, kv=KVOptions(kv_window=256, kv_quant="int4"))

The decode step is a function of its own so it can be timed and compiled alone.
"""

import torch

from kv.policy import KVOptions, held_bits


def sample_next(logits, temperature=1.0, top_k=None, generator=None):
    """Pick the next byte from logits (B, V): greedy when temperature == 0."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        v, _ = torch.topk(logits, min(int(top_k), logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1, generator=generator)


def decode_step(model, token, caches):
    """One new token (B, 1) through the model: the logits (B, V) of the byte after it."""
    logits, _ = model(token, caches)
    return logits[:, -1]


@torch.no_grad()
def generate_stream(model, idx, max_new_tokens, temperature=1.0, top_k=None, kv=None, stats=None,
                    generator=None, decode=None):
    """Prefill the prompt idx (B, T) in one pass, then one decode step per token; yields each
    new token (B, 1). kv: the KVOptions of the caches (default: plain, unbounded). If given,
    `stats` gets the peak KV bits and the bits per cached token (per sequence) at the end.
    decode: what runs a decode step instead of decode_step (e.g. a compiled one)."""
    B, T = idx.size()
    decode = decode or decode_step
    kv = kv or KVOptions(kv_window=0)
    caches = kv.make_caches(model, B, capacity=T + max_new_tokens)
    logits, _ = model(idx, caches)  # prefill
    logits = logits[:, -1]
    peak, peak_tokens = held_bits(caches)
    for i in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, generator)
        yield nxt
        if i + 1 < max_new_tokens:
            logits = decode(model, nxt, caches)
            bits, held = held_bits(caches)
            if bits > peak:
                peak, peak_tokens = bits, held
    if stats is not None:
        stats["kv_bits_peak"] = peak
        stats["kv_bits_per_token"] = peak / max(B * peak_tokens, 1)


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, **kw):
    """Complete idx (B, T) with max_new_tokens bytes; returns (B, T + max_new_tokens)."""
    new = list(generate_stream(model, idx, max_new_tokens, temperature, top_k, **kw))
    return torch.cat([idx] + new, dim=1)
