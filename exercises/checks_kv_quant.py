"""
Checks of exercise 4a, KV quantization: quantize(x) -> ((tensors...), dequantize),
like kv.quant.int8_quantize.

A quantizer is judged against the plainest correct one of its own format (symmetric, one
float16 scale per row, rounding to nearest), computed here on the same rows: the format is
read from the payload (the 8-bit tensor with the most columns holds the codes: int8/uint8,
packed to fewer bits when it has fewer columns than x, or float8).
"""

import math

import torch

from exercises.checks_common import (Failed, Skipped, TRAIN_BLOCK, expect, feed, held_out, randn, see, token_losses,
                                     trained_model)
from kv.policy import KVOptions, held_bits

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
MARGIN = 1.5  # error allowed, relative to the plain quantizer of the same format (mean and worst row)
FLOOR = ("keep every scale from being 0 in the dtype it is stored in: a floor must survive the cast (float16 "
         "holds nothing between 0 and 2**-24, so a floor of 1e-8 becomes 0 there)")


def quant_rows(seed=0, n=64):
    """(2, 3, 40, n) rows like real keys and values: magnitudes from 0.01 to 100 (a quantizer
    that ignores its scale fails), one outlier channel 8x the others, and a few rows of one
    sign (a zero point from a min above 0 must still be stored as it is)."""
    x = randn(2, 3, 40, n, seed=seed)
    x[..., 3] *= 8
    x[..., 0, :], x[..., 1, :] = x[..., 0, :].abs(), -x[..., 1, :].abs()
    return x * 10 ** (4 * torch.rand(2, 3, 40, 1, generator=torch.Generator().manual_seed(seed + 1)) - 2)


def ramp_rows(n=64, rows=16):
    """rows of n values spread over [-1, 1]: together a ramp of 768 values, finer than the 256
    levels of an 8-bit code. Every 8 values hold -1 and 1, so that every row, and every group
    of 8, 16, 32, ... channels, has the same range and the same levels."""
    x = torch.linspace(-1, 1, 3 * n // 4 * rows + 2)[1:-1].view(-1, rows).t().reshape(rows, n // 8, 6)
    ends = torch.tensor([-1.0, 1.0]).expand(rows, n // 8, 2)
    return torch.cat([ends, x], -1).reshape(1, 1, rows, n)


def call_quantize(impl, x):
    # x stays the checker's (a quantize that writes into its input is told so); given as the cache
    # gives it, a slice of a larger tensor (its residual's oldest tokens): not contiguous
    given = torch.cat([x, x[..., :1, :]], -2)[..., :x.size(-2), :] if x.dim() > 2 else x.clone()
    out = impl.quantize(given)
    expect(torch.equal(given, x), "quantize changed x in place (e.g. x /= scale): compute new tensors "
           "(x / scale) and leave x as it was; it belongs to the caller")
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


def round_trip(impl, x):
    payload, inverse = call_quantize(impl, x)
    return payload, dequant(inverse, payload, x)


def bits_per_value(payload, x):
    return sum(t.numel() * t.element_size() * 8 for t in payload) / x.numel()


def codes_index(payload):
    """Which payload tensor holds the codes: the 8-bit one with the most columns (or, with no
    8-bit tensor, the one with the most columns)."""
    bytes_ = [i for i, t in enumerate(payload) if t.element_size() == 1] or range(len(payload))
    return max(bytes_, key=lambda i: payload[i].size(-1))


def code_format(payload, n):
    """(kind, bits) of the codes: kind "int" or a float8 dtype, bits per code."""
    if not any(t.element_size() == 1 for t in payload):
        return "int", 8
    codes = payload[codes_index(payload)]
    return (codes.dtype if codes.dtype in FP8 else "int"), max(2, min(8, round(8 * codes.size(-1) / n)))


def describe(kind, bits, payload=None):
    """The format in words; given the payload, codes in no 8-bit dtype (float32 ones) are named as
    they are: they are only judged as 8-bit integer codes (rule 2's check fails them)."""
    name = f"{str(kind).replace('torch.', '')} codes" if kind != "int" else f"{bits}-bit integer codes"
    if payload is not None and not any(t.element_size() == 1 for t in payload):
        return f"{str(payload[codes_index(payload)].dtype).replace('torch.', '')} codes, judged as {name}"
    return name


def plain_quantizer(kind, bits):
    """The plainest correct quantizer of a format, as a function x -> dequantized x."""
    def run(x):
        amax = x.abs().amax(-1, keepdim=True)
        if kind != "int":
            s = (amax / torch.finfo(kind).max).clamp(min=2 ** -14).half().float()
            return (x / s).to(kind).float() * s
        top = 2 ** (bits - 1) - 1
        s = (amax / top).half().float().clamp(min=2 ** -24)
        return (x / s).round().clamp(-top, top) * s
    return run


def row_errors(x, y):
    """Relative RMS error of every row."""
    return ((y - x).pow(2).mean(-1) / x.pow(2).mean(-1)).sqrt()


def shift(x, y):
    """How far y, the round trip of x, is shifted by a constant per row or group (of 8 to n
    channels), relative to the row's largest value; 0 when the error is not mostly such a shift."""
    n = x.size(-1)
    e = (y - x) / x.abs().amax(-1, keepdim=True).clamp(min=1e-30)
    for g in (n, 64, 32, 16, 8):
        if g <= n and n % g == 0:
            eg = e.unflatten(-1, (n // g, g))
            offset = eg.mean(-1, keepdim=True)
            size, rest = offset.pow(2).mean().sqrt().item(), (eg - offset).pow(2).mean().sqrt().item()
            if rest < 0.25 * size:
                return size
    return 0.0


def scales_fine(payload):
    """Whether the scales stored are beyond blame for an inf or nan: every payload tensor in
    floats but the codes finite, and in every row one of them (the scale; a zero point may be
    0) nonzero all along it. False when that cannot be told (no such tensor, odd shapes)."""
    codes = codes_index(payload)
    floats = [t.float() for i, t in enumerate(payload) if i != codes and t.is_floating_point()]
    if not floats or not all(bool(torch.isfinite(t).all()) for t in floats):
        return False
    nonzero = [(t != 0).all(-1) for t in floats]  # per row: this tensor is nonzero all along it
    if any(n.shape != nonzero[0].shape for n in nonzero):
        return False
    return bool(torch.stack(nonzero).any(0).all())


def gross_mistake(x, y, kind, bits, payload=None):
    """What is plainly wrong with y, the round trip of x (payload: what quantize stored, if
    known): None, or (message, rule), where rule is the rule of exercises/README.md it breaks
    when that is not whichever check met it (None)."""
    if not bool(torch.isfinite(y).all()):
        if kind in FP8:
            return ("dequantize gives inf or nan: float8 overflows past its largest value; divide each row by "
                    "a scale (absmax / the format's max) before the cast, and keep that scale from being 0"), None
        if payload is not None and scales_fine(payload):  # (then the scales are not what to blame)
            return ("dequantize gives inf or nan although the scales stored are finite and none is 0: look at "
                    "what dequantize computes from them (a division by a code, or by something else that can be "
                    "0?)"), None
        return f"dequantize gives inf or nan: a scale of 0 or one that float16 cannot hold; {FLOOR}", None
    zero_rows = (y == 0).all(-1) & (x != 0).any(-1)
    if bool(zero_rows.any()):
        size = x[zero_rows].pow(2).mean(-1).sqrt().max().item()
        return (f"{int(zero_rows.sum())} rows (up to size {size:.2g}) come back as all zeros: the scale does not "
                "follow each row's own range; every row (or group) needs its own scale, not one for the whole "
                "tensor"), ("4a", 5)
    if kind in FP8:
        fmax = torch.finfo(kind).max
        clipped = (x.abs() > 1.1 * fmax) & ((y.abs() - fmax).abs() <= 1e-3 * fmax)
        if bool(clipped.any()):
            return (f"values above {fmax:g} come back as {fmax:g}: {str(kind).replace('torch.', '')} saturates "
                    "there, and the values reach the cast unscaled: float8 codes need a scale per row too"), ("4a", 5)
    shifted = shift(x, y)
    if shifted > 0.05:
        return (f"values come back shifted by about the same amount within each row or group ({shifted:.2g} of "
                "the row's largest value on average), not scattered as rounding leaves them: a zero point (or an "
                "offset) that quantize subtracts and dequantize does not add back"), ("4a", 4)
    amax = x.abs().amax(-1, keepdim=True)
    far = (y - x).abs() > 0.5 * amax
    top = far & (x.abs() >= 0.9 * amax) & (y * x < 0) & (y.abs() >= 0.5 * amax)
    if bool(top.any()):
        return ("the largest values of a row come back with the opposite sign and about their own size: codes "
                "beyond the range of their dtype wrap around (.to(torch.int8) of 128 gives -128), so the codes "
                "need clamping to their range; with two codes to a byte, also unpack them in the order you packed "
                "them"), None
    ymax = y.abs().amax(-1, keepdim=True)
    gaps = y.sort(-1).values.diff(dim=-1)
    step = torch.where(gaps > 1e-6 * amax, gaps, ymax).amin(-1, keepdim=True)  # the finest level spacing
    # (an integer zero point may leave the top level half a step short of the range: not clipping)
    clipped = (y.abs() >= 0.999 * ymax) & (x.abs() > torch.maximum(1.05 * ymax, ymax + step))
    if clipped.float().mean().item() > 0.02:
        cut = (ymax / amax.clamp(min=1e-30)).median().item()
        return (f"values beyond about {cut:.2g} of their row's largest come back clipped at one level: the scale "
                "is too small for the codes' range (absmax / 127 for int8 codes, absmax / 7 for 4-bit ones)"), None
    factor = (y * x).sum(-1) / x.pow(2).sum(-1)
    plain = plain_quantizer(kind, bits)(x)  # (2-bit symmetric codes: three levels; they shrink rows there too)
    plain_factor = (plain * x).sum(-1) / x.pow(2).sum(-1)
    if min((factor - 1).abs().median().item(), (factor - plain_factor).abs().median().item()) > 0.1:
        return (f"rows come back as x times a factor ({factor.min().item():.2g} to {factor.max().item():.2g}): "
                "does dequantize multiply the codes by the row's scale (and quantize divide by it)?"), None
    if bool(far.any()):
        return ("some values come back far off (by more than half their row's largest value): codes clipped "
                "or wrapped around? the scale must map the row's range onto the codes' range"), None
    return None


def expect_no_gross_mistake(x, y, kind, bits, rule, judged, payload=None):
    """Failed when y, the round trip of x, is plainly wrong for a reason of this check's rule
    (or of none in particular); Skipped when the reason breaks another rule, whose check judges
    the same rows (it would fail here under the wrong rule's name)."""
    found = gross_mistake(x, y, kind, bits, payload)
    if found is None:
        return
    message, broken = found
    if broken is not None and broken != rule:
        where = "below" if broken[1] > rule[1] else "above"  # the checks go in the order of the rules
        raise Skipped(f"{message.split(':')[0]} (see {where}), so {judged} cannot be told")
    raise Failed(message + (f"; {see(*broken)}" if broken else ""))


def stored_scale_problem(payload):
    """What is wrong with the scales stored for x[1, 2, 4], a row of zeros (None if nothing):
    every payload tensor in floats but the codes must be finite, and one of them (the scale;
    a zero point may be 0) nonzero all along the row."""
    codes = codes_index(payload)
    floats = [(i, t) for i, t in enumerate(payload) if i != codes and t.is_floating_point()]
    for i, t in floats:
        if not bool(torch.isfinite(t.float()).all()):
            return f"payload tensor {i} ({str(t.dtype).replace('torch.', '')}) holds inf or nan"
    if floats and not any(bool((t[1, 2, 4] != 0).all()) for _, t in floats):
        stored = ", ".join(f"tensor {i} ({str(t.dtype).replace('torch.', '')})" for i, t in floats)
        return (f"a row of zeros is stored with a scale of 0 (payload {stored}): codes computed with it are "
                "0 / 0 = nan, which come back as 0 only because of how this machine casts nan to integers")
    return None


def check_quant_contract(impl, ctx):
    for n in (64, 32, 16, 128):
        x = randn(2, 3, 5, n, seed=n)
        x[1, 2, 4] = 0.0  # a row of zeros
        ctx["case"] = f"head dimension {n}, x shaped {tuple(x.shape)}"  # named if your code raises
        payload, y = round_trip(impl, x)
        wrong = stored_scale_problem(payload)
        if not bool(torch.isfinite(y[1, 2, 4]).all()):  # the row of zeros: say what is known of its scale
            stored = any(t.is_floating_point() for i, t in enumerate(payload) if i != codes_index(payload))
            why = (f"its scale is 0 (0 / 0 is nan); {FLOOR}" if wrong and "scale of 0" in wrong else
                   f"{wrong}; {FLOOR}" if wrong else "its stored scales are finite and not 0, so look at "
                   "what dequantize computes from them" if stored else "no payload tensor but the codes is in "
                   "floats (no scale of 0 to blame), so look at what dequantize computes")
            expect(False, f"head dimension {n}: dequantize gives inf or nan for a row of zeros: {why}")
        expect(bool(torch.isfinite(y).all()), f"head dimension {n}: dequantize gives inf or nan")
        expect(wrong is None, f"head dimension {n}: {wrong}; {FLOOR}")


def check_quant_bits(impl, ctx):
    x = quant_rows()
    payload, _ = call_quantize(impl, x)
    bits = bits_per_value(payload, x)
    widths = ", ".join(f"{t.dtype} {tuple(t.shape[-1:])}" for t in payload)
    expect(bits <= 9.0, f"{bits:.2f} bits per value ({widths}): store codes as int8/uint8/float8, at most "
           "9 bits per value with the scales (8-bit codes and one float16 scale per 64 values is 8.25)")
    ctx["bits"] = bits
    return f"{bits:.2f} bits per value ({widths}; float32 is 32)"


def check_quant_levels(impl, ctx):
    x = ramp_rows()
    payload, y = round_trip(impl, x)
    kind, bits = code_format(payload, x.size(-1))
    expect_no_gross_mistake(x, y, kind, bits, ("4a", 3), "how many levels are used",  # (the title names the ramp)
                            payload)
    levels = torch.unique(y).numel()
    if kind == "int":
        need, full = math.ceil(0.75 * 2 ** bits), f"{2 ** bits} levels"
    else:
        plain = torch.unique(plain_quantizer(kind, bits)(x)).numel()
        need, full = math.ceil(0.75 * plain), f"{plain} values of a scaled {str(kind).replace('torch.', '')} cast"
    if levels < need:
        ctx["explains_error"] = "the levels"  # (fewer levels: a larger error, which rule 5's check leaves to this)
        worth = math.log2(levels + 1)
        hint = (f"the scale spends only about {worth:.0f} bits' worth of them (scale = absmax / {2 ** (bits - 1) - 1}"
                f" for symmetric codes, (max - min) / {2 ** bits - 1} with a zero point)")
        if kind == "int" and bits == 8 and levels <= 16:
            hint += "; if you meant 4-bit codes, pack two per byte (a uint8 holding one code counts 8 bits)"
        raise Failed(f"{levels} distinct values come back from a ramp of {x.unique().numel()} values between -1 "
                     f"and 1, where {describe(kind, bits)} resolve {full}: {hint}")
    return f"{levels} levels on a ramp ({describe(kind, bits, payload)})"


def check_quant_bias(impl, ctx):
    x = quant_rows()
    payload, y = round_trip(impl, x)
    kind, bits = code_format(payload, x.size(-1))
    expect_no_gross_mistake(x, y, kind, bits, ("4a", 4), "how the codes are rounded", payload)
    again = round_trip(impl, x)[1]
    if not torch.equal(again, y):
        ctx["random"] = True  # (rule 6's check would meet it again)
        raise Failed("the same x comes back different from a second call: random rounding (x / scale + "
                     "torch.rand...) is unbiased on average but not to nearest; use torch.round")
    rms = x.pow(2).mean(-1, keepdim=True).sqrt()

    def bias_corr(y):
        e, xs = (y - x) / rms, x / rms  # every row on the same scale
        corr = torch.corrcoef(torch.stack([e.flatten(), xs.flatten()]))[0, 1]
        return (e.mean() / e.pow(2).mean().sqrt()).item(), corr.item()
    bias, corr = bias_corr(y)
    # rounding to nearest: about 0 for both; 2-bit symmetric codes (three levels) leave every
    # small value at 0, so their errors follow x even in the plain quantizer: that is allowed too
    corr_plain = bias_corr(plain_quantizer(kind, bits)(x))[1]
    follows = min(abs(corr), abs(corr - corr_plain)) > 0.25
    if abs(bias) > 0.25 or follows:
        ctx.setdefault("explains_error", "the rounding")
    if abs(bias) > 0.25:
        way = "low" if bias < 0 else "high"
        raise Failed(f"every value comes back too {way} (the mean error is {bias:+.2f} of the RMS error; rounding "
                     f"to nearest gives about 0): codes {'floored (torch.floor, //)' if way == 'low' else 'rounded up'}"
                     " instead of rounded to nearest, or a zero point or offset (+128 then -127) that dequantize "
                     "does not undo exactly")
    expect(not follows, f"the errors follow x (correlation {corr:+.2f}; rounding to nearest "
           f"gives about 0{f', or {corr_plain:+.2f} with symmetric 2-bit codes' if abs(corr_plain) > 0.25 else ''}): "
           + ("values come back shrunk toward 0: .to(torch.int8) truncates toward 0 (round to nearest before "
              "converting), "
              "or the scale does not match the codes' range"
              if corr < corr_plain else
              "values come back pushed away from 0, where rounding to nearest pushes neither way"))
    far = off_nearest(impl)
    expect(far <= 0.02, f"{far:.0%} of the values of a ramp from -1 to 1 come back at a level farther from them "
           "than another level your codes hold there: rounding that is unbiased on average but not to nearest "
           "(x / scale + a random or fixed offset, then floor); use torch.round")
    return f"mean error {bias:+.2f} of the RMS error, correlation with x {corr:+.2f}"


def off_nearest(impl):
    """The share of a ramp's values that come back at a level farther from them than another
    level the round trip holds. On the ramp every row and group has the same range, so every
    correct format (a scale or zero point per row or group, int or float8) uses one set of
    levels everywhere, and rounding to nearest puts each value on the nearest of them."""
    x = ramp_rows()
    y = round_trip(impl, x)[1].flatten()
    x = x.flatten()
    levels = torch.unique(y)
    if levels.numel() < 2:
        return 0.0
    gap = levels.diff().median()
    nearest = levels[(x[:, None] - levels[None, :]).abs().argmin(-1)]
    return ((x - y).abs() - (x - nearest).abs() > 0.1 * gap).float().mean().item()


def check_quant_error(impl, ctx):
    x = quant_rows()
    payload, y = round_trip(impl, x)
    kind, bits = code_format(payload, x.size(-1))
    expect_no_gross_mistake(x, y, kind, bits, ("4a", 5), "the error", payload)
    rel, ref = row_errors(x, y), row_errors(x, plain_quantizer(kind, bits)(x))
    mean, worst = rel.mean().item(), rel.max().item()
    bound_mean, bound_worst = min(0.9, MARGIN * ref.mean().item()), min(1.0, MARGIN * ref.max().item())
    desc = describe(kind, bits)
    plain = (f"a plain per-row quantizer with {desc} gets {ref.mean().item():.2g} on average, "
             f"{ref.max().item():.2g} in the worst row")
    if (worst > bound_worst or mean > bound_mean) and ctx.get("explains_error"):
        raise Skipped(f"the error is too large ({mean:.2g} on average, {worst:.2g} in the worst row; allowed "
                      f"{bound_mean:.2g} and {bound_worst:.2g}), as {ctx['explains_error']} mistake above makes it: "
                      "fix that first")
    if worst > bound_worst:
        size = x.pow(2).mean(-1).sqrt()
        at = size.flatten()[rel.flatten().argmax()].item()
        rank = (size < at).float().mean().item()
        where = (f"the worst row (size {at:.2g}, among the smallest) comes back with a relative error of {worst:.2g}"
                 if rank < 0.2 else f"the worst row (size {at:.2g}) comes back with a relative error of {worst:.2g}")
        hint = ("a floor on the scale too high for small rows (clamp it only to keep it from 0, e.g. 2**-24 in "
                "float16)" if rank < 0.2 else "does every row get a scale that fits its own range, and are codes "
                "rounded to nearest?")
        raise Failed(f"{where} ({plain}; allowed {bound_worst:.2g}): {hint}")
    expect(mean <= bound_mean, f"relative RMS error {mean:.2g} on average ({plain}; allowed {bound_mean:.2g}): "
           "rows range from 0.01 to 100 in size: a scale per row (or group) from its absmax, all levels used, "
           "rounding to nearest")
    xb = x.bfloat16()  # as a bfloat16 model's cache holds keys and values (eval_kv's default dtype)
    payload_b, yb = round_trip(impl, xb)
    found = gross_mistake(xb.float(), yb, kind, bits, payload_b)
    if found is not None:
        raise Failed(f"with x in bfloat16 (a bfloat16 model's cache): {found[0]}" + (f"; {see(*found[1])}"
                                                                                    if found[1] else ""))
    return (f"relative RMS error {mean:.2g} on average, {worst:.2g} in the worst row "
            f"({describe(kind, bits, payload)}; allowed {bound_mean:.2g} and {bound_worst:.2g})")


def check_quant_rows(impl, ctx):
    if ctx.get("random"):
        raise Skipped("quantize does not repeat itself (see above), so whether rows stand alone cannot be told")
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
    # (equal_nan: a nan that comes back the same is the contract check's to report, not a changed row)
    expect(torch.allclose(got, torch.cat([y1, y2], 2)[:, :, keep], rtol=1e-3, atol=1e-6, equal_nan=True),
           "rows changed when payloads of two calls were joined and some rows dropped: each row's "
           "codes and scale must stand alone, and dequantize may use nothing but its arguments")
    alone = dequant(*reversed(call_quantize(impl, x1[:, :, 5:6])), x1[:, :, 5:6])
    expect(torch.allclose(alone, y1[:, :, 5:6], rtol=1e-3, atol=1e-6, equal_nan=True),
           "a row quantized alone comes back different than among others: no statistics over the "
           "whole tensor (the cache quantizes a few tokens at a time)")


def model_allowance(bits):
    """Loss the trained model may lose with a quantized cache (a correct int8 loses ~0.0001,
    int4 in groups ~0.001, int2 ~0.04)."""
    return 0.01 if bits >= 8 else 0.03 if bits >= 4 else 0.1


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
    hs = model.config.head_dim
    _, code_bits = code_format(call_quantize(impl, randn(1, 1, 1, hs))[0], hs)
    allowed = model_allowance(code_bits)
    expect(loss <= base + allowed, f"loss {loss:.3f} with your cache against {base:.3f} with the plain cache "
           f"({bits:.0f} KV bits per token, {code_bits}-bit codes: allowed +{allowed}): the error costs too much"
           + ("; 2-bit symmetric codes use 3 levels and zero every value under half the row's largest: a scale "
              "and zero point per group of 32 use all 4 levels ((max - min) / 3)" if code_bits < 4 else ""))
    return f"loss {base:.3f} -> {loss:.3f} with KV bits per token {full:.0f} -> {bits:.0f}"
