"""
Assignment 4a: quantize the KV cache. Store each key and value in 8 bits, or fewer.

A float32 cache spends 32 bits on every number (16 in bfloat16). Keys and values tolerate far
less precision: one scale per row and 8-bit integer codes lose almost nothing. Which 8-bit
format would you pick (int8 with a scale? float8 e4m3 or e5m2?), and what does it take to go
below 8 bits (groups of values sharing a scale and a zero point, codes packed two or four to
a byte, a few newest tokens kept in full precision)? The cache stores exactly the tensors you
return and counts their bits, so the savings are real, and so is the error.

Try it (eval_kv.py compares the loss with your cache to the plain cache's, bucket by bucket,
and reports KV bits per token):
    python eval_kv.py --out_dir=out-shakespeare-char --kv_quant=exercises.kv_quant:quantize --kv_quant_residual=0
    # the CPU recipe's model: --out_dir=out-shakespeare-char-cpu
Check it:
    python -m exercises.check kv_quant
"""


def quantize(x):
    """Quantize rows independently.

    x   (..., n) float: every row is the key (or the value) of one token in one head; n is the
        head dimension (16 to 128: a group size must divide it). The leading dimensions are
        (B, nkv, tokens). Rows come in any size (0.01 to 100 and more), zeros included.

    Return (payload, dequantize):
      payload     a tuple of tensors, each shaped (..., m) with x's leading dimensions, e.g.
                  (codes, scale) with codes (..., n) int8 and scale (..., 1) float16. The cache
                  keeps exactly these and counts numel x dtype width: float32 "codes" would
                  cost 32 bits each, so use int8 / uint8 / float8 (torch.float8_e4m3fn) codes.
      dequantize  a function: dequantize(*payload) -> (..., n) floats, approximately x.
    The cache concatenates the payload rows of many calls and drops rows it evicts before it
    calls dequantize, so a row's codes and scale must say all there is to know about that row:
    no statistics over the whole tensor, nothing remembered outside the payload.

    Hints: symmetric int8: scale = row absmax / 127, codes = round(x / scale); keep the scale
    from being 0, in the dtype you store it in too (float16 cannot hold 1e-8); x / scale then
    torch.round, clamp to [-127, 127], .to(torch.int8). Below 8 bits: uint8 codes in
    [0, 2^b - 1] with a per-group zero point, packed with shifts (<<, |).
    The checker reports your bits per value and error; kv/quant.py holds the project's formats.

    Limits: at most 9 bits per value at head dimension 64, scales and zero points included;
    round to nearest; an error close to what a plain quantizer of your format gets, in every
    row. All of them: exercises/README.md, "Assignment 4a, rules".
    """
    raise NotImplementedError("assignment 4 (KV quantization): implement quantize in exercises/kv_quant.py")


def dequantize(codes, scale):
    """The inverse of quantize, given the payload's tensors (rows concatenated or dropped at
    will): return (..., n) floats. Change the parameters to match the payload you return."""
    raise NotImplementedError("assignment 4 (KV quantization): implement dequantize in exercises/kv_quant.py")
