"""A user's own KV quantizer, plugged in with --kv_quant=tutorial_user_quantizer:quantize (the
tests check the plug-in point with it): symmetric int8 with one float16 scale per row.
x: (..., n), one row per token and head. Returns the tensors to store and the inverse."""

import torch


def quantize(x):
    scale = (x.abs().amax(dim=-1, keepdim=True) / 127).clamp(min=1e-4).half()
    codes = torch.round(x / scale.float()).clamp(-127, 127).to(torch.int8)
    return (codes, scale), dequantize


def dequantize(codes, scale):
    return codes.float() * scale.float()


def fake_quantize(x):
    """The failure the tests must catch: 'codes' kept as float32."""
    scale = x.abs().amax(dim=-1, keepdim=True) / 127
    return (torch.round(x / scale) * scale,), lambda y: y


def not_a_pair(x):
    return x


def scale_in_a_closure(x):
    """int8 whose dequantize remembers this call's scale instead of storing it: the cache
    would read every call's rows with the latest call's scale."""
    scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-4) / 127
    return (torch.round(x / scale).to(torch.int8),), lambda codes: codes.float() * scale


def wide_codes(x):
    """Right, but its codes kept as int64 (torch.round(...).long()): 64 bits a value."""
    scale = (x.abs().amax(dim=-1, keepdim=True) / 127).clamp(min=1e-4).half()
    return (torch.round(x / scale.float()).long(), scale), dequantize
