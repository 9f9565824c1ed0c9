"""kv/quant.py (through kv/policy.py's KVOptions) against references: hand-packed bytes, stated error bounds,
hand-computed bit counts, an audit of every tensor a cache holds, and keys/values a cache
returns against the same tokens quantized one by one."""

import pytest
import torch

import kv.quant as kv_quant
from conftest import tiny
from kv.policy import KVOptions
from kv.quant import FORMATS, ChannelFormat, GroupFormat, make_formats, pack, payload_bits, unpack
from kv.quant_cache import QuantKVCache
from utils import UserError

B, H, D = 2, 3, 16


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x[..., 3] *= 20  # an outlier channel, as keys have
    return x


def test_pack_by_hand_and_round_trip():
    codes = torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8)
    # planes [1, 2] and [3, 4]: byte j = code j | code j+2 << 4
    assert pack(codes, 4).tolist() == [[1 | 3 << 4, 2 | 4 << 4]]
    assert pack(torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8), 2).tolist() == [[1 | 2 << 2 | 3 << 4]]
    for bits in (4, 2):
        c = torch.randint(0, 2 ** bits, (5, 7, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
        p = pack(c, bits)
        assert p.dtype == torch.uint8 and p.shape == (5, 7, 32 * bits // 8)
        assert torch.equal(unpack(p, bits), c)


def dequant(fmt, payload, like):
    return fmt.dequantize(payload, torch.empty_like(like))


def same(a, b):
    # bit equality, float8 included (torch.equal has no float8 kernel)
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# By hand, per format: bits per code, and its layout, which says what else it stores and how
# far off it may be:
#   "token": one float16 scale per token and head, symmetric (no zero point): 16 bits a token,
#            error within half a step (scale / 2)
#   "float": the same for a float format: error within half an ulp of the value (relative)
#   "group": a float16 scale and zero point per group of kv_quant_group values (8 here), keys
#            per channel over tokens, values per token: error within half the group's step
# A format added to kv/quant.py's FORMATS adds its row here. One stored another way (a zero
# point per token, say) adds its layout to the bound of test_error_within_bounds_... and to
# expected_bits below: their failures print the numbers that differ.
HAND = {"int8": (8, "token"), "fp8_e4m3": (8, "float"), "fp8_e5m2": (8, "float"), "int4": (4, "group"),
        "int2": (2, "group")}


def hand(name):
    """(bits per code, layout) of format `name`, from HAND."""
    assert name in HAND, f"format {name!r} has no row in HAND (tests/test_kv_quant.py): add its bits and layout"
    return HAND[name]


@pytest.mark.parametrize("far", [False, True], ids=["near0", "far"])
@pytest.mark.parametrize("name", FORMATS)
def test_error_within_bounds_and_exactly_reproducible(name, far):
    # far: values around 300 with a small spread, where float16 rounds the zero point by more
    # than a quantization step: it must round down (no value below it to clip)
    x = rand(B, H, 64, D)
    if far:
        x = 300 + 0.05 * x
    keys, values = make_formats(name, 8, D, channel_keys=True)
    for fmt in (keys, values):
        payload = fmt.quantize(x)
        y = dequant(fmt, payload, x)
        err = (x - y).abs()
        if hand(name)[1] == "token":
            bound = payload[1].float() / 2  # half a step of the row's scale
        elif hand(name)[1] == "float":
            rel, sub = (2 ** -4, 2 ** -10) if name == "fp8_e4m3" else (2 ** -3, 2 ** -17)
            bound = rel * x.abs() + sub * payload[1].float()  # half an ulp, or half a subnormal step
        elif isinstance(fmt, ChannelFormat):
            bound = (payload[1].float() / 2).repeat_interleave(8, dim=2)  # per channel, 8 tokens a group
        else:
            bound = (payload[1].float() / 2).repeat_interleave(8, dim=-1)  # per token, 8 channels a group
        ulp = torch.finfo(torch.float32).eps * x.abs()  # float32's own rounding of code * scale + zero
        assert (err <= bound * (1 + 1e-5) + ulp + 1e-7).all(), (name, (err - bound).max())
        assert err.max() > 0  # it did quantize
        again = fmt.quantize(x.clone())
        assert all(same(a, b) for a, b in zip(payload, again))
        assert torch.equal(dequant(fmt, again, x), y)


@pytest.mark.parametrize("bits", [4, 2])
def test_fast_dequantize_equals_plain_formula(bits):
    x = rand(B, H, 16, D, seed=1)
    for fmt, axis in ((GroupFormat(bits, 8), -1), (ChannelFormat(bits, 4), 2)):
        packed, scale, zero = fmt.quantize(x)
        reps = 8 if axis == -1 else 4
        ref = unpack(packed, bits).float() * scale.float().repeat_interleave(reps, axis) \
            + zero.float().repeat_interleave(reps, axis)
        torch.testing.assert_close(dequant(fmt, (packed, scale, zero), x), ref, atol=1e-6, rtol=0)


def cache_for(name, residual, group=8, window=0, sink=0):
    """The cache KVOptions makes for a one-layer model with H heads of D channels."""
    kv = KVOptions(kv_window=window, kv_sink=sink, kv_quant=name, kv_quant_group=group,
                   kv_quant_residual=residual).check()
    cache = kv.make_caches(tiny(n_layer=1, n_head=H, n_embd=H * D), B)[0]
    assert isinstance(cache, QuantKVCache)
    return cache


def fill(cache, n, step, seed=0):
    """Feed n random tokens of K/V into cache, step at a time; returns k, v and the last update's result."""
    k, v = rand(B, H, n, D, seed=seed), rand(B, H, n, D, seed=seed + 1)
    out = None
    for a in range(0, n, step):
        out = cache.update(k[:, :, a:a + step], v[:, :, a:a + step])
    return k, v, out




def expected_bits(name, n, residual, group=8):
    """By hand: codes + scales + zero points of the quantized tokens, fp32 for the rest."""
    bits, layout = hand(name)
    per_token = layout != "group"
    nq = max(n - residual, 0) if per_token else max(n - residual, 0) // group * group
    rows = B * H
    if per_token:
        k_bits = v_bits = nq * rows * (D * bits + 16)
    else:
        v_bits = nq * rows * (D * bits + 2 * 16 * D // group)  # values: groups of 8 channels
        k_bits = nq * rows * D * bits + (nq // group) * rows * D * 2 * 16  # keys: per channel, 8 tokens
    return k_bits + v_bits + 2 * (n - nq) * rows * D * 32


def audit(cache):
    """Bits of every tensor the cache object holds, except int64 positions and eviction
    scores: what is really stored, whatever size_bits() claims."""
    total = 0
    for name, value in vars(cache).items():
        for t in (value if isinstance(value, tuple) else (value,)):
            if torch.is_tensor(t) and t.dtype != torch.int64 and not name.startswith("score"):
                total += t.numel() * t.element_size() * 8
    return total


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("residual", [0, 5, 32])
def test_size_bits_exact_and_really_stored(name, residual):
    cache = cache_for(name, residual)
    n = 53
    fill(cache, n, 7)
    assert cache.tokens() == n
    assert cache.size_bits() == expected_bits(name, n, residual)
    assert audit(cache) == cache.size_bits()
    code_dtype = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
    if cache.k_codes is not None:
        for payload in (cache.k_codes, cache.v_codes):
            codes, scales = payload[0], payload[1:]
            assert codes.dtype == code_dtype.get(name, torch.uint8)
            nq = codes.size(2)
            assert codes.numel() == B * H * nq * D * hand(name)[0] // 8
            assert all(s.dtype == torch.float16 for s in scales)
    assert cache.k_full.dtype == torch.float32 and cache.k_full.size(2) == n - (cache.k_codes[0].size(2) if cache.k_codes else 0)


class FloatCopyCache(QuantKVCache):
    """A known failure: codes counted, but a full-precision copy kept for attention."""

    def update(self, k, v):
        keys, vals, mask = super().update(k, v)
        self.k_float, self.v_float = keys, vals
        return keys, vals, mask


def test_audit_catches_fake_quantization():
    fmts = make_formats("int2", 8, D, channel_keys=True)
    fake = FloatCopyCache(*fmts, batch_size=B, n_kv_head=H, head_dim=D, residual=0)
    fill(fake, 40, 8)
    assert audit(fake) == fake.size_bits() + 2 * 40 * B * H * D * 32  # 6x what it claims
    # float32 "codes" from a user's quantizer are stored, and counted, as 32 bits each
    cache = cache_for("tutorial_user_quantizer:fake_quantize", residual=0)
    fill(cache, 40, 8)
    assert cache.size_bits() == audit(cache) == 2 * 40 * B * H * D * 32


@pytest.mark.parametrize("name", ["int8", "fp8_e5m2", "int4", "int2", "tutorial_user_quantizer:quantize"])
@pytest.mark.parametrize("step", [1, 6])
def test_cache_returns_each_token_quantized_once(name, step):
    """The keys/values an update returns are the newest tokens exactly and every older one as
    its own quantize-dequantize (per token; keys of int4/int2 in groups of 8 tokens)."""
    residual, n = 5, 45
    cache = cache_for(name, residual)
    k, v, (keys, vals, mask) = fill(cache, n, step)
    nq = cache.k_codes[0].size(2)
    assert keys.shape == (B, H, n, D) and torch.equal(keys[:, :, nq:], k[:, :, nq:])
    assert torch.equal(vals[:, :, nq:], v[:, :, nq:])
    key_fmt, val_fmt = make_formats(name, 8, D, channel_keys=True)
    g = key_fmt.tokens_per_group
    ref_k = torch.cat([dequant(key_fmt, key_fmt.quantize(k[:, :, a:a + g]), k[:, :, :g]) for a in range(0, nq, g)], dim=2)
    ref_v = torch.cat([dequant(val_fmt, val_fmt.quantize(v[:, :, a:a + 1]), v[:, :, :1]) for a in range(nq)], dim=2)
    assert torch.equal(keys[:, :, :nq], ref_k) and torch.equal(vals[:, :, :nq], ref_v)
    if step == 1:
        assert mask is None


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_without_float8_tensors_gives_the_same_cache(name, monkeypatch):
    """On a device without float8 tensors (MPS) fp8 codes are rounded on the CPU and kept as
    their bytes: the cache hands back the same keys and values, and holds the same bits, as
    with float8 codes (the CPU stands in for MPS here)."""
    native = cache_for(name, residual=5)
    _, _, (keys, vals, _) = fill(native, 45, 6)
    monkeypatch.setattr(kv_quant, "NO_FP8", {"cpu"})
    emulated = cache_for(name, residual=5)
    _, _, (keys_e, vals_e, _) = fill(emulated, 45, 6)
    assert emulated.k_codes[0].dtype == torch.uint8
    assert torch.equal(emulated.k_codes[0], native.k_codes[0].view(torch.uint8))
    assert torch.equal(keys_e, keys) and torch.equal(vals_e, vals)
    assert emulated.size_bits() == native.size_bits() == audit(emulated)


def test_history_bound_drops_whole_groups():
    cache = cache_for("int4", residual=4, group=8, window=20, sink=1)
    _, _, (keys, _, mask) = fill(cache, 60, 1)
    # query 59 sees 0 (the sink) and 40..59; key groups of 8 go once all of their tokens are
    # out of sight (32..39 went), and the one holding the sink stays
    assert cache.pos_codes.tolist() == list(range(0, 8)) + list(range(40, 56))
    assert cache.pos_full.tolist() == list(range(56, 60))
    assert mask.shape == (1, keys.size(2)) and mask.sum() == 21


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_a_prefill_holds_what_token_by_token_feeding_holds(name):
    """A prompt longer than the window, fed in one update, leaves the cache holding what the
    same prompt fed a token at a time does (sample.py's peak is measured after the prefill);
    the next tokens then come back the same either way."""
    whole, one_by_one = (cache_for(name, residual=4, group=8, window=20, sink=1) for _ in range(2))
    k, v, _ = fill(whole, 60, 60)
    fill(one_by_one, 60, 1)
    assert whole.size_bits() == one_by_one.size_bits() and whole.tokens() == one_by_one.tokens() < 60
    assert torch.equal(whole.pos_codes, one_by_one.pos_codes) and torch.equal(whole.pos_full, one_by_one.pos_full)
    nk, nv = rand(B, H, 3, D, seed=5), rand(B, H, 3, D, seed=6)
    for a in range(3):
        got, want = (c.update(nk[:, :, a:a + 1], nv[:, :, a:a + 1]) for c in (whole, one_by_one))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_user_quantizer_plugs_in():
    cache = cache_for("tutorial_user_quantizer:quantize", residual=2)
    k, _, (keys, _, _) = fill(cache, 12, 3)
    assert cache.k_codes[0].dtype == torch.int8 and cache.k_codes[1].dtype == torch.float16
    assert cache.size_bits() == 2 * B * H * (10 * (D * 8 + 16) + 2 * D * 32)
    assert (keys - k).abs().max() < 0.5


@pytest.mark.parametrize("name,head_dim,words", [
    ("int4", 16, "does not divide the head dimension 16"),  # group 32 > 16
    ("int2", 6, "multiple of 4"),
    ("tutorial_user_quantizer:not_a_pair", 16, "must return"),
    ("tutorial_user_quantizer:scale_in_a_closure", 16, "not in a closure"),
])
def test_model_dependent_errors_come_from_make_caches(name, head_dim, words):
    kv = KVOptions(kv_quant=name, kv_quant_group=32 if head_dim == 16 else 2).check()  # fine on their own
    with pytest.raises(UserError, match=words):
        kv.make_caches(tiny(n_layer=1, n_head=1, n_embd=head_dim), 1)


def test_payload_bits_counts_dtype_width():
    t = (torch.zeros(3, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.float16),
         torch.zeros(5, dtype=torch.float8_e4m3fn))
    assert payload_bits(t) == 12 * 8 + 2 * 16 + 5 * 8


@pytest.mark.parametrize("name", ["int4", "int2"])
def test_groups_that_all_left_a_short_window_leave_the_residual(name):
    """A window shorter than a group: fed a token at a time, nothing is ever quantized (the
    window drops a token before its group is complete); a prefill quantizes whole groups, which
    then leave the window one after the other. Once the last has gone, the cache returns what
    token by token feeding returns: the residual alone (it used to fail, dequantizing no codes:
    sample.py with a prompt, eval_kv at chunk > 1, on a model with --window below the group)."""
    # a local layer's cache (a model's --window: KVOptions refuses such a kv_window)
    whole, one_by_one = (QuantKVCache(*make_formats(name, 8, D, True), B, H, D, residual=0, window=6)
                         for _ in range(2))
    fill(whole, 20, 20)
    fill(one_by_one, 20, 1)
    assert whole.k_codes is not None and one_by_one.k_codes is None
    nk, nv = rand(B, H, 6, D, seed=5), rand(B, H, 6, D, seed=6)
    for a in range(6):
        got, want = (c.update(nk[:, :, a:a + 1], nv[:, :, a:a + 1]) for c in (whole, one_by_one))
        if a >= 1:  # query 21 on: groups 0..7 and 8..15 are out of sight
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
            assert torch.equal(got[2], want[2]) and whole.size_bits() == one_by_one.size_bits()


def test_the_cache_is_still_found_where_it_used_to_live():
    """QuantKVCache moved to kv/quant_cache.py; `from kv.quant import QuantKVCache` still works."""
    from kv.quant import QuantKVCache as old_path
    assert old_path is QuantKVCache
    with pytest.raises(AttributeError):
        kv_quant.NoSuchThing


def test_a_label_tells_per_token_keys_from_per_channel_ones():
    """int4/int2 keys are grouped per channel without eviction and per token with it: the label
    says '/token-keys' whenever they are per token, so two caches never share one name."""
    from kv.policy import KVOptions
    channel = KVOptions(kv_quant="int4", kv_quant_residual=0)
    token = KVOptions(kv_quant="int4", kv_quant_residual=0, kv_quant_keys="token")
    evicting = KVOptions(kv_quant="int4", kv_quant_residual=0, kv_evict="h2o", kv_budget=32, kv_recent=8)
    assert evicting.key_group() == 1 and not evicting.channel_keys  # (per token, whatever kv_quant_keys says)
    assert "/token-keys" not in channel.describe()
    assert token.describe().startswith("int4/g32/r0/token-keys")
    assert evicting.describe().startswith("int4/g32/r0/token-keys")


def test_a_grouped_format_needs_bits_that_pack_into_bytes(monkeypatch):
    """A format added to GROUPED without its bits, or with bits that do not divide 8 (codes are
    packed 8 // bits to a byte: 3 bits would silently take 4), is refused in one line."""
    monkeypatch.setattr(kv_quant, "GROUPED", kv_quant.GROUPED + ("int3",))
    with pytest.raises(UserError, match="INT_BITS"):
        make_formats("int3", 8, D, channel_keys=False)
    monkeypatch.setitem(kv_quant.INT_BITS, "int3", 3)
    with pytest.raises(UserError, match="must divide 8"):
        make_formats("int3", 8, D, channel_keys=False)


def test_a_named_format_with_nothing_to_build_it_says_where_to_add_it(monkeypatch):
    """A name added to FORMATS with no line in make_formats is a step left out of the recipe,
    not a broken plug-in: the error names make_formats (it used to call the name as a plug-in)."""
    monkeypatch.setattr(kv_quant, "FORMATS", kv_quant.FORMATS + ("int6",))
    with pytest.raises(UserError, match="make_formats builds nothing for it"):
        make_formats("int6", 8, D, channel_keys=False)
