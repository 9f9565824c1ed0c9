"""
Quantization-aware training of the KV cache: train the model through the very quantizer its
cache will use, so that it learns keys and values that survive it.

    from kv.qat import make_qat_caches
    caches = make_qat_caches(model, kv_quant="int2", kv_quant_group=32)   # None for "none"
    logits, _ = model(x, caches)      # K/V go through int2 and back; gradients pass straight

It uses the cache protocol (kv.cache.Cache), so model.py needs nothing: a FakeQuantCache is a
stateless per-layer "cache" that stores nothing. Its update(k, v) returns

    fq(k), fq(v), attention_mask(pos, pos, window)      fq(x) = dequant(quant(x)) + (x - x.detach())

with the formats of kv/quant.py (make_formats), so the forward pass sees exactly the values the
inference cache would hand back, and the backward pass treats the rounding as the identity
(the straight-through estimator: rounding has zero gradient almost everywhere).

Which inference cache it matches: QuantKVCache with kv_quant_residual=0 fed the same T tokens
from position 0 (eval_kv with --kv_quant_residual=0 and chunk = block_size), whose returned
keys and values are fq(k), fq(v) exactly (tests/test_qat.py). With int4/int2 and channel_keys
(the quantized cache's KIVI layout) a key group is G consecutive tokens aligned at position 0;
a last, incomplete group stays in full precision, as the cache keeps it until it is complete.
channel_keys=False groups keys per token, the layout of the evicting cache (kv_evict), and of
int8/fp8 always. Note that a per-channel group's scale spans G tokens, so within one forward a
key's rounding depends on later keys of its group; the chunked inference cache does the same,
and the straight-through gradient carries nothing back through it.
"""

import torch

from kv.cache import Cache, attention_mask
from kv.quant import CHANNEL_KEYS, make_formats
from devices import no_autocast
from utils import UserError


class FakeQuantCache(Cache):
    """One layer's fake-quantizing "cache" for training: holds nothing, seen stays 0."""

    def __init__(self, key_fmt, val_fmt, window=0):
        self.key_fmt, self.val_fmt, self.window = key_fmt, val_fmt, window
        self.group = max(key_fmt.tokens_per_group, val_fmt.tokens_per_group)

    def update(self, k, v):
        T = k.size(2)
        pos = torch.arange(T, device=k.device)
        self.key_pos = pos  # (a training call: its own T tokens, nothing remembered)
        return self.fake_quant(k, self.key_fmt), self.fake_quant(v, self.val_fmt), attention_mask(pos, pos, self.window)

    def fake_quant(self, x, fmt):
        """x (B, nkv, T, hs) -> the values the cache would return, with x's gradient."""
        m = x.size(2) // self.group * self.group  # whole groups; the rest stays as it is
        if m == 0:
            return x
        with no_autocast(x.device.type):  # quantization runs in full precision, as in the cache
            # dequantized into x's dtype, as the cache does (bfloat16 under a GPU's autocast)
            back = torch.empty(*x.shape[:2], m, x.size(3), dtype=x.dtype, device=x.device)
            fmt.dequantize(fmt.quantize(x[:, :, :m].detach()), back)
        if m < x.size(2):
            back = torch.cat([back, x[:, :, m:].detach()], dim=2)
        # forward: exactly the codes' values (x - x.detach() is exactly 0); backward: identity
        return back + (x - x.detach())

    def restart(self, rows):
        """train.py tells memories which rows jumped elsewhere: nothing is held, nothing to forget."""

    def tokens(self):
        return 0

    def size_bits(self):
        return 0


def make_qat_caches(model, kv_quant="none", kv_quant_group=32, channel_keys=True):
    """One FakeQuantCache per layer for training with kv_quant, or None for "none" (plain
    training). channel_keys: int4/int2 keys per channel over G tokens (as QuantKVCache stores
    them), else per token (as EvictKVCache does)."""
    if kv_quant == "none":
        return None
    check_qat(model, kv_quant, kv_quant_group, channel_keys)
    return qat_caches(model, kv_quant, kv_quant_group, channel_keys)


def check_qat(model, kv_quant, kv_quant_group=32, channel_keys=True):
    """One UserError if quantization-aware training cannot run on this model: an unknown
    format, a group that does not fit the head dimension, a plug-in that breaks its promise
    (make_formats), or a linear attention layer, which keeps a state instead of K/V (train.py
    asks before its first evaluation)."""
    if kv_quant == "none":
        return
    c = model.config
    linear = [i for i in range(c.n_layer) if c.keeps_state(i)]
    if linear:
        which = f"layer {linear[0]} of this model is" if len(linear) == 1 else \
            f"layers {','.join(map(str, linear))} of this model are"
        raise UserError(f"--kv_quant={kv_quant} in training fake-quantizes the K/V of every layer, and {which} linear "
                        "attention (a state, no K/V cache): --kv_quant=none trains it without")
    make_formats(kv_quant, kv_quant_group, c.head_dim, channel_keys)
    per_channel = channel_keys and kv_quant in CHANNEL_KEYS
    if per_channel and any(c.is_local(i) for i in range(c.n_layer)) and kv_quant_group > c.window:
        raise UserError(f"--kv_quant={kv_quant} groups keys per channel over kv_quant_group={kv_quant_group} tokens, "
                        f"more than the local window of {c.window}: the inference cache quantizes nothing in the local "
                        "layers, so training would fake-quantize what decoding never does; pass --kv_quant_keys=token, "
                        f"or --kv_quant_group={c.window} or less")


def qat_caches(model, kv_quant, kv_quant_group=32, channel_keys=True):
    """make_qat_caches without the "none" shortcut: kv_quant="none" gives identity caches
    (training through them equals plain training; tests/test_qat.py checks it bit for bit)."""
    c = model.config
    caches = []
    for i in range(c.n_layer):
        if kv_quant == "none":
            fmts = (Identity(), Identity())
        else:
            fmts = make_formats(kv_quant, kv_quant_group, c.head_dim, channel_keys)
        caches.append(FakeQuantCache(*fmts, window=c.window if c.is_local(i) else 0))
    return caches


class Identity:
    """The no-op format: fake_quant returns its input itself."""
    tokens_per_group = 1 << 62  # no whole group ever: fake_quant returns x untouched
