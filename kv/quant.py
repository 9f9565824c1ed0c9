"""
KV-cache quantization: keys and values kept as integer or float8 codes, not as floats.

    from kv.policy import KVOptions
    caches = KVOptions(kv_quant="int4", kv_quant_group=32, kv_quant_residual=32).make_caches(model, batch_size)

Formats (kv_quant), all with float16 scales and zero points:
  int8       per token: one scale per token and head (absmax / 127), int8 codes
  fp8_e4m3   per token: one scale per token and head (absmax / 448), torch.float8_e4m3fn codes
  fp8_e5m2   per token: one scale per token and head (absmax / 57344), torch.float8_e5m2 codes
  int4, int2 groups of G = kv_quant_group values, each with a scale and a zero point (its
             minimum): x ~ code * scale + zero, codes 0..2^bits-1 packed 2 (int4) or 4 (int2)
             to a byte. As in KIVI (arXiv 2402.02750) keys are grouped per channel (one group
             = one channel over G consecutive tokens: key outliers live in a few channels) and
             values per token (one group = G consecutive channels of one token).
  package.module:function   your own per-token quantizer (below)

int8 and fp8 are per token: with 127 levels (or 3 mantissa bits) one scale per token is fine
enough even with outlier channels, and a per-token format can quantize each token as soon as
it arrives and lets eviction drop single tokens. Below 8 bits the grouping matters: a key
outlier channel would flatten every other channel of its token group, so keys go per channel.
Errors: |x - x_hat| <= scale / 2 for the integer formats (scales are rounded up and zero
points down to float16, so nothing is clipped); half an ulp for fp8 (2^-4 of |x| for e4m3,
2^-3 for e5m2, plus half a subnormal step).

The cache that holds these codes, QuantKVCache, is in kv/quant_cache.py.

Your own quantizer, --kv_quant=package.module:function:
    def function(x):                # x (..., n): rows = one token of one head, n = head_dim
        ...
        return (codes, scale), dequantize   # stored tensors, each (..., m_i), and the inverse
    def dequantize(codes, scale):   # the same tensors (rows may be concatenated or dropped)
        return ...                  # (..., n) floats
Every tensor you return is stored and counted at its dtype's width, so float32 "codes" cost
32 bits each: store int8/uint8/float8 tensors. Rows are quantized independently (a row's
slice of each tensor must hold all there is to know about that row), so the cache may
concatenate rows from several calls, or drop rows, before it calls dequantize. It calls the
dequantize of the latest call for all of them, so dequantize may use nothing but its
arguments (no scale remembered in a closure); a test call at start-up checks it.
"""

import torch

from plugins import call_error, import_function, plugin_error, unwritten
from utils import UserError

SCALE_DTYPE = torch.float16  # scales and zero points, as KIVI stores them
FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
NO_FP8 = {"mps"}  # device types without float8 tensors: fp8 codes are rounded on the CPU (slower, the same bits)
INT_BITS = {"int8": 8, "int4": 4, "int2": 2}
FORMATS = ("int8", "fp8_e4m3", "fp8_e5m2", "int4", "int2")  # the named kv_quant formats (make_formats builds them)
GROUPED = ("int4", "int2")  # quantized in groups of kv_quant_group values: where kv_quant_group applies
CHANNEL_KEYS = ("int4", "int2")  # keys may be grouped per channel over tokens (KIVI): where kv_quant_keys applies


# -----------------------------------------------------------------------------
# packing: 8 // bits codes per byte, in planes: a row of n codes is cut into 8 // bits
# pieces of m = n * bits // 8, and byte j holds code j of every piece, the first piece in the
# lowest bits. Unpacking a piece is then one shift and one mask, written straight into its
# slice of the output (interleaving codes inside a byte would need an extra copy).

def pack(codes, bits):
    """uint8 codes (..., n), each < 2**bits -> uint8 (..., n * bits // 8)."""
    planes = codes.unflatten(-1, (8 // bits, -1))
    out = planes[..., 0, :].clone()
    for i in range(1, 8 // bits):  # 1 or 3 shifts of the whole tensor, not a loop over values
        out |= planes[..., i, :] << (bits * i)
    return out


def plane(packed, bits, i):
    """Piece i of every row: uint8 (..., m) codes."""
    if i == 0:
        return packed & (2 ** bits - 1)
    if (i + 1) * bits == 8:
        return packed >> (8 - bits)  # the top bits need no mask
    return (packed >> (bits * i)) & (2 ** bits - 1)


def unpack(packed, bits):
    """The inverse of pack: uint8 (..., m) -> uint8 codes (..., m * 8 // bits)."""
    return torch.cat([plane(packed, bits, i) for i in range(8 // bits)], dim=-1)


def unpack_into(packed, bits, out):
    """unpack(packed, bits), converted to out's dtype, written into out (..., n)."""
    m = packed.size(-1)
    for i in range(8 // bits):  # 2 or 4 passes over the whole cache, not a loop over tokens
        out[..., i * m:(i + 1) * m] = plane(packed, bits, i).to(out.dtype)  # (converted first: faster)
    return out


# -----------------------------------------------------------------------------
# float16 rounding that never shrinks a range: a scale rounded up and a zero point rounded
# down keep every value inside [zero, zero + qmax * scale], so no code is ever clipped

def _fp16_up(x):
    # round to nearest is off by at most 2^-11 relative in fp16's normal range (x >= 2^-14)
    return (x * (1 + 2 ** -10)).to(SCALE_DTYPE)


def _fp16_down(x):
    # the same margin, plus one subnormal step for values near 0
    return (x - x.abs() * 2 ** -10 - 2 ** -24).to(SCALE_DTYPE)


def affine_quantize(x, dim, bits):
    """Asymmetric quantization of the groups that run along `dim` of x: uint8 codes (shape of
    x), scale and zero (float16, size 1 along dim). x ~ code * scale + zero, error <= scale / 2."""
    x = x.float()
    lo, hi = torch.aminmax(x, dim=dim, keepdim=True)
    zero = _fp16_down(lo)
    z = zero.float()
    scale = _fp16_up(((hi - z) / (2 ** bits - 1)).clamp_(min=2 ** -14))  # smallest normal fp16
    codes = ((x - z) / scale.float()).round_().clamp_(0, 2 ** bits - 1)
    return codes.to(torch.uint8), scale, zero


# -----------------------------------------------------------------------------
# formats. A format turns x (B, nkv, S, hs) into a tuple of stored tensors (its "payload")
# whose dim 2 runs over tokens (or over groups of tokens), and writes the dequantized values
# back into a float tensor it is given (the cache's output, so nothing is copied twice).

class TokenFormat:
    """Base of the per-token formats: every row (one token of one head) stands alone, so rows
    can be concatenated, selected, gathered or overwritten per head freely."""
    tokens_per_group = 1

    def select(self, payload, keep):
        """Keep the tokens where keep (S,) is True."""
        return tuple(t[:, :, keep] for t in payload)

    def gather(self, payload, flat):
        """Per-head selection: flat (B * nkv * S',) indexes the rows of every tensor viewed as
        (B * nkv * S, width); see flat_index."""
        return tuple(_rows(t).index_select(0, flat).view(t.size(0), t.size(1), -1, t.size(-1)).view(t.dtype)
                     for t in payload)

    def overwrite(self, payload, flat, new):
        """Per-head slot reuse: write the rows of `new` over the rows flat of payload."""
        for t, n in zip(payload, new):
            _rows(t).index_copy_(0, flat, _rows(n.contiguous()))


def _rows(t):
    # (B, nkv, S, w) -> (B * nkv * S, w); float8 through a uint8 view (few float8 kernels)
    return (t.view(torch.uint8) if t.dtype in FP8.values() else t).flatten(0, 2)


class FullPrecision(TokenFormat):
    """No quantization: the payload is the tensor itself (eviction without quantization)."""
    name = "none"

    def quantize(self, x):
        return (x.contiguous(),)

    def dequantize(self, payload, out):
        return out.copy_(payload[0])


class Int8Format(TokenFormat):
    """Symmetric int8 per token: one scale = absmax / 127 per row."""
    name = "int8"

    def quantize(self, x):
        scale = _fp16_up((x.float().abs().amax(-1, keepdim=True) / 127).clamp(min=2 ** -14))
        codes = torch.round(x.float() / scale.float()).clamp_(-127, 127)
        return codes.to(torch.int8), scale

    def dequantize(self, payload, out):
        codes, scale = payload
        return out.copy_(codes).mul_(scale.to(out.dtype))


def int8_quantize(x):
    """int8 under the user-quantizer contract (--kv_quant=kv.quant:int8_quantize stores what
    --kv_quant=int8 stores; the reference of exercise 4): int8 codes, a float16 scale per row."""
    return Int8Format().quantize(x), int8_dequantize


def int8_dequantize(codes, scale):
    return codes.float() * scale.float()


class Fp8Format(TokenFormat):
    """A float8 code per value, scaled per row so the row's absmax lands on the largest code."""

    def __init__(self, name):
        self.name, self.code_dtype = name, FP8[name]
        self.fmax = torch.finfo(self.code_dtype).max

    def quantize(self, x):
        scale = _fp16_up((x.float().abs().amax(-1, keepdim=True) / self.fmax).clamp(min=2 ** -14))
        q = (x.float() / scale.float()).clamp_(-self.fmax, self.fmax)
        if q.device.type in NO_FP8:  # rounded on the CPU, kept on the device as the codes' bytes
            return q.cpu().to(self.code_dtype).view(torch.uint8).to(q.device), scale
        return q.to(self.code_dtype), scale

    def dequantize(self, payload, out):
        codes, scale = payload
        if codes.dtype == torch.uint8:  # (the bytes of float8 codes, on a device in NO_FP8)
            codes = codes.cpu().view(self.code_dtype).float().to(out.device)
        return out.copy_(codes).mul_(scale.to(out.dtype))


class GroupFormat(TokenFormat):
    """int4/int2 (bits dividing 8) per token: groups of `group` consecutive channels. Payload: packed codes
    (B, nkv, S, hs * bits / 8), scale and zero (B, nkv, S, hs / G)."""

    def __init__(self, bits, group):
        self.name, self.bits, self.group = f"int{bits}", bits, group

    def quantize(self, x):
        g = x.unflatten(-1, (-1, self.group))  # (..., hs / G, G)
        codes, scale, zero = affine_quantize(g, -1, self.bits)
        return pack(codes.flatten(-2), self.bits), scale.squeeze(-1), zero.squeeze(-1)

    def dequantize(self, payload, out):
        packed, scale, zero = payload
        unpack_into(packed, self.bits, out)
        g = out.unflatten(-1, (scale.size(-1), -1))  # (..., hs / G, G)
        g.mul_(scale.to(out.dtype).unsqueeze(-1)).add_(zero.to(out.dtype).unsqueeze(-1))
        return out


class ChannelFormat:
    """int4/int2 keys per channel (KIVI): one group = one channel over `group` consecutive
    tokens. Payload: packed codes (B, nkv, S, hs * bits / 8), scale and zero (B, nkv, S / G, hs)."""

    def __init__(self, bits, group):
        self.name, self.bits, self.group = f"int{bits}", bits, group
        self.tokens_per_group = group

    def quantize(self, x):
        g = x.unflatten(2, (-1, self.group))  # (B, nkv, S / G, G, hs)
        codes, scale, zero = affine_quantize(g, 3, self.bits)
        return pack(codes.flatten(2, 3), self.bits), scale.squeeze(3), zero.squeeze(3)

    def dequantize(self, payload, out):
        packed, scale, zero = payload
        unpack_into(packed, self.bits, out)
        g = out.unflatten(2, (scale.size(2), -1))  # (B, nkv, S / G, G, hs)
        g.mul_(scale.to(out.dtype).unsqueeze(3)).add_(zero.to(out.dtype).unsqueeze(3))
        return out

    def select(self, payload, keep):
        """keep (S,) is constant within each group of tokens (whole groups go or stay)."""
        packed, scale, zero = payload
        g = keep.view(-1, self.group)[:, 0]
        return packed[:, :, keep], scale[:, :, g], zero[:, :, g]


class UserFormat(TokenFormat):
    """A user's function(x) -> (tensors, dequantize); see the module docstring."""

    def __init__(self, name, fn):
        self.name, self.fn, self.inverse = name, fn, None

    def quantize(self, x):
        payload, inverse = self.fn(x)
        self.inverse = inverse
        return tuple(payload)

    def dequantize(self, payload, out):
        return out.copy_(self.inverse(*payload))

    def check(self, head_dim):
        """Call the function once on a small input; any broken promise is one UserError."""
        what = f"kv_quant={self.name}"
        x = torch.randn(1, 2, 3, head_dim, generator=torch.Generator().manual_seed(0))
        contract = (f"{what} must return (tensors, dequantize) with every tensor shaped (..., m) "
                    f"like x (..., {head_dim}); see kv/quant.py's docstring")
        try:
            out = self.fn(x)
            if not (isinstance(out, (tuple, list)) and len(out) == 2):
                raise UserError(contract)
            payload, inverse = tuple(out[0]) if isinstance(out[0], (tuple, list)) else None, out[1]
            if not payload or not callable(inverse) or \
                    not all(torch.is_tensor(t) and t.shape[:3] == x.shape[:3] for t in payload):
                raise UserError(contract)
            back = inverse(*payload)
            # the cache dequantizes the rows of every call with the latest call's dequantize
            later = self.fn(x.flip(-1) * 100.0)
            again = later[1](*payload) if isinstance(later, (tuple, list)) and len(later) == 2 \
                and callable(later[1]) else back
        except Exception as e:
            if isinstance(e, UserError) or unwritten(e):  # (an exercise stub: run_main says "not implemented yet")
                raise
            called = call_error(e)  # the call itself failed: a wrong signature, said with the right one
            if called is not None:
                raise called from None
            # with the plug-in's own lines under the message (plugins.plugin_error)
            frames = getattr(plugin_error(e), "details", [])
            raise UserError(f"{what} failed on a test input: {type(e).__name__}: {' '.join(str(e).split())[:200]}",
                            frames) from None
        if not torch.is_tensor(back) or back.shape != x.shape:
            raise UserError(f"{what}: dequantize must return a tensor shaped like x {tuple(x.shape)}, "
                            f"got {getattr(back, 'shape', type(back).__name__)}")
        if not (torch.is_tensor(again) and again.shape == back.shape and
                torch.allclose(again.float(), back.float(), rtol=1e-3, atol=1e-6, equal_nan=True)):
            raise UserError(f"{what}: rows of one call come back different through the dequantize of a later call; "
                            "the cache keeps one dequantize for the rows of every call, so it may use nothing but "
                            "its arguments: store the scale among the tensors returned, not in a closure")


def resolve_quant(name):
    """Check a kv_quant name; returns the user's function for "package.module:function"."""
    if name == "none" or name in FORMATS:
        return None
    if ":" not in name:
        raise UserError(f"unknown kv_quant {name!r}: choose none, {', '.join(FORMATS)} "
                        "or give your own as package.module:function")
    return import_function(name, "kv_quant")


def make_formats(name, group, head_dim, channel_keys):
    """(key format, value format) for kv_quant `name` and this head dimension. channel_keys:
    int4/int2 keys grouped per channel (KIVI); False groups them per token like values."""
    if name in FP8:
        return Fp8Format(name), Fp8Format(name)
    if name == "int8":
        return Int8Format(), Int8Format()
    if name in GROUPED:
        bits = INT_BITS.get(name)
        if bits not in (1, 2, 4, 8):  # (a format added to GROUPED, with no bits or bits pack() cannot hold)
            raise UserError(f"kv_quant={name} is in kv/quant.py's GROUPED: its bits per code go in INT_BITS and must "
                            f"divide 8 (codes are packed 8 // bits to a byte), got {bits}")
        if not isinstance(group, int) or isinstance(group, bool) or group < 1:
            raise UserError(f"kv_quant_group must be an integer >= 1, got {group!r}")
        if head_dim % group:
            raise UserError(f"kv_quant_group={group} does not divide the head dimension {head_dim}; "
                            f"pick a divisor of {head_dim}")
        if head_dim * bits % 8:
            raise UserError(f"kv_quant={name} packs {8 // bits} codes per byte: the head dimension {head_dim} "
                            f"must be a multiple of {8 // bits}")
        keys = ChannelFormat(bits, group) if channel_keys and name in CHANNEL_KEYS else GroupFormat(bits, group)
        return keys, GroupFormat(bits, group)
    if name in FORMATS:  # (a name added to FORMATS, with no line above that builds it)
        raise UserError(f"kv_quant={name} is in kv/quant.py's FORMATS but make_formats builds nothing for it: "
                        "add a line there that returns its (key format, value format)")
    fmt = UserFormat(name, resolve_quant(name))
    fmt.check(head_dim)
    return fmt, fmt


def flat_index(idx, S):
    """Per-head indices idx (B, nkv, n) into a length-S axis -> rows of a (B * nkv * S, w) view."""
    B, H, _ = idx.shape
    base = torch.arange(B * H, device=idx.device).view(B, H, 1) * S
    return (idx + base).flatten()


def payload_bits(payload):
    """Bits held by a tuple of tensors: numel x the width of each one's dtype."""
    return sum(t.numel() * t.element_size() * 8 for t in payload)


def __getattr__(name):
    # QuantKVCache lived here until 2026-12-03: the old import path still finds it
    if name == "QuantKVCache":
        from kv.quant_cache import QuantKVCache
        return QuantKVCache
    raise AttributeError(f"module 'kv.quant' has no attribute {name!r}")
