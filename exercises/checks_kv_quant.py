"""
Checks of exercise 4a, KV quantization: quantize(x) -> ((tensors...), dequantize),
like kv.quant.int8_quantize.
"""

import torch

from exercises.checks_common import Failed, TRAIN_BLOCK, expect, feed, held_out, randn, token_losses, trained_model
from kv.policy import KVOptions, held_bits


def quant_rows(seed=0, n=64):
    """(2, 3, 40, n) rows like real keys and values: magnitudes from 0.01 to 100 (a quantizer
    that ignores its scale fails), and one outlier channel 8x the others."""
    x = randn(2, 3, 40, n, seed=seed)
    x[..., 3] *= 8
    return x * 10 ** (4 * torch.rand(2, 3, 40, 1, generator=torch.Generator().manual_seed(seed + 1)) - 2)


def call_quantize(impl, x):
    out = impl.quantize(x)
    expect(isinstance(out, (tuple, list)) and len(out) == 2,
           f"quantize must return (payload, dequantize), got {type(out).__name__}")
    payload, inverse = out
    expect(isinstance(payload, (tuple, list)) and len(payload) > 0 and all(torch.is_tensor(t) for t in payload),
           "the payload must be a tuple of tensors, e.g. (codes, scale)")
    expect(callable(inverse), "the second thing returned must be the dequantize function")
    for i, t in enumerate(payload):
        expect(tuple(t.shape[:-1]) == tuple(x.shape[:-1]), f"payload tensor {i} has shape {tuple(t.shape)}: every "
               f"tensor must keep x's leading dimensions {tuple(x.shape[:-1])} and add one of its own (..., m)")
    return tuple(payload), inverse


def dequant(inverse, payload, like):
    y = inverse(*payload)
    expect(torch.is_tensor(y) and tuple(y.shape) == tuple(like.shape),
           f"dequantize must return a tensor shaped like x {tuple(like.shape)}, got {tuple(getattr(y, 'shape', ()))}")
    expect(y.is_floating_point(), f"dequantize must return floats, got {y.dtype}")
    return y.float()


def bits_per_value(payload, x):
    return sum(t.numel() * t.element_size() * 8 for t in payload) / x.numel()


def error_bound(bits):
    """The mean relative RMS error of a row allowed at `bits` per value: 0.1 at 8.25 bits (int8
    gets 0.01, fp8 e5m2 0.04), 0.5 at 6, 0.75 from 5 bits down (int2 in groups of 32: 0.49).
    Returning zeros scores 1."""
    return min(0.75, 2.0 ** (5 - min(bits, 8.25)))


def check_quant_contract(impl, ctx):
    for n in (64, 32, 16):
        x = randn(2, 3, 5, n, seed=n)
        payload, inverse = call_quantize(impl, x)
        dequant(inverse, payload, x)


def check_quant_bits(impl, ctx):
    x = quant_rows()
    payload, _ = call_quantize(impl, x)
    bits = bits_per_value(payload, x)
    widths = ", ".join(f"{t.dtype} {tuple(t.shape[-1:])}" for t in payload)
    expect(bits <= 9.0, f"{bits:.2f} bits per value ({widths}): store codes as int8/uint8/float8, at most "
           "9 bits per value with the scales (8-bit codes and one float16 scale per 64 values is 8.25)")
    ctx["bits"] = bits
    return f"{bits:.2f} bits per value ({widths}; float32 is 32)"


def check_quant_error(impl, ctx):
    x = quant_rows()
    payload, inverse = call_quantize(impl, x)
    y = dequant(inverse, payload, x)
    bits = bits_per_value(payload, x)
    rel = ((y - x).pow(2).mean(-1) / x.pow(2).mean(-1)).sqrt()  # per row
    worst, mean = rel.max().item(), rel.mean().item()
    bound = error_bound(bits)
    expect(mean == mean and mean <= bound,
           f"relative RMS error {mean:.3g} on average (allowed {bound:.3g} at {bits:.2f} bits per value): rows "
           "range from 0.01 to 100 in size; does every row use its own scale, and does dequantize multiply by it?")
    expect(worst < 1.0, f"a row comes back with a relative error of {worst:.3g}, worse than zeros: small rows "
           "need small scales (clamp the scale only to keep it from being 0)")
    return f"relative RMS error {mean:.2g} on average, {worst:.2g} in the worst row (allowed {bound:.2g})"


def check_quant_rows(impl, ctx):
    x1, x2 = quant_rows(seed=3), quant_rows(seed=5)[:, :, :7]
    p1, inv1 = call_quantize(impl, x1)
    p2, inv2 = call_quantize(impl, x2)
    y1, y2 = dequant(inv1, p1, x1), dequant(inv2, p2, x2)
    # what the cache does: rows of two calls joined, some dropped, read back by the last inverse
    both = tuple(torch.cat([a, b], 2) for a, b in zip(p1, p2))
    keep = torch.arange(x1.size(2) + x2.size(2)) % 3 != 1
    try:
        got = dequant(inv2, tuple(t[:, :, keep] for t in both), torch.cat([x1, x2], 2)[:, :, keep])
    except (NotImplementedError, Failed):
        raise
    except Exception as e:
        raise Failed(f"dequantize failed on the rows of two calls joined ({type(e).__name__}: "
                     f"{' '.join(str(e).split())[:100]}): it may use nothing but its arguments") from None
    expect(torch.allclose(got, torch.cat([y1, y2], 2)[:, :, keep], rtol=1e-3, atol=1e-6),
           "rows changed when payloads of two calls were joined and some rows dropped: each row's "
           "codes and scale must stand alone, and dequantize may use nothing but its arguments")
    alone = dequant(*reversed(call_quantize(impl, x1[:, :, 5:6])), x1[:, :, 5:6])
    expect(torch.allclose(alone, y1[:, :, 5:6], rtol=1e-3, atol=1e-6),
           "a row quantized alone comes back different than among others: no statistics over the "
           "whole tensor (the cache quantizes a few tokens at a time)")


def check_quant_model(impl, ctx):
    model = trained_model()
    x, y = held_out(TRAIN_BLOCK, rows=16)
    kv = KVOptions(kv_quant=impl.spec("quantize"), kv_quant_residual=0)
    with torch.no_grad():
        plain, plain_states = feed(model, x, x.size(1))
        yours, states = feed(model, x, x.size(1), kv)
    base, loss = token_losses(plain, y).mean().item(), token_losses(yours, y).mean().item()
    bits = held_bits(states)[0] / (x.numel())
    full = held_bits(plain_states)[0] / (x.numel())
    expect(loss <= base + 0.1, f"loss {loss:.3f} with your cache against {base:.3f} with the plain cache "
           f"({bits:.0f} KV bits per token): the error costs too much")
    return f"loss {base:.3f} -> {loss:.3f} with KV bits per token {full:.0f} -> {bits:.0f}"
