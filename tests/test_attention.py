"""attention.py against references: PyTorch's SDPA over repeated K/V heads, the softmax kind
against the naive one and against a user's function, explicit band masks, and what the
training forward hands SDPA (its fast causal path; float32 under CPU autocast)."""

import pytest
import torch
from torch.nn import functional as F

import devices
from attention import expand_kv, naive_attention, softmax_attention
from conftest import TOL, text, tiny
from kv.cache import visible


def test_naive_equals_softmax_and_gqa_equals_repeated_heads():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 7, 8, generator=g)
    for nkv in (4, 2, 1):
        k, v = torch.randn(2, nkv, 11, 8, generator=g), torch.randn(2, nkv, 11, 8, generator=g)
        mask = visible(torch.arange(4, 11), torch.arange(11), window=5, sink=2)
        ref = F.scaled_dot_product_attention(q, expand_kv(k, 4), expand_kv(v, 4), attn_mask=mask)
        torch.testing.assert_close(softmax_attention(q, k, v, mask), ref, **TOL)
        torch.testing.assert_close(naive_attention(q, k, v, mask), ref, **TOL)
        ref_c = F.scaled_dot_product_attention(q, expand_kv(k, 4)[:, :, :7], expand_kv(v, 4)[:, :, :7], is_causal=True)
        torch.testing.assert_close(naive_attention(q, k[:, :, :7], v[:, :, :7], "causal"), ref_c, **TOL)


def test_a_float_mask_is_a_bias_added_to_the_scores():
    """A layer class's bias by distance (ALiBi) as a float mask, -inf where hidden: softmax and
    naive give softmax(q k^T / sqrt(hs) + bias) v written out by hand, also under CPU autocast."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 5, 8, generator=g) for _ in range(3))
    d = (torch.arange(5).view(-1, 1) - torch.arange(5)).float()  # query - key distance
    bias = (-0.5 * d).masked_fill(d < 0, float("-inf")).expand(4, 5, 5) * torch.tensor([1., 2, 3, 4]).view(4, 1, 1)
    ref = torch.softmax(q @ k.transpose(-2, -1) / 8 ** 0.5 + bias, dim=-1) @ v
    torch.testing.assert_close(softmax_attention(q, k, v, bias), ref, **TOL)
    torch.testing.assert_close(naive_attention(q, k[:, :2], v[:, :2], bias), naive_attention(
        q, expand_kv(k[:, :2], 4), expand_kv(v[:, :2], 4), bias), **TOL)  # GQA: the same bias per query head
    torch.testing.assert_close(naive_attention(q, k, v, bias), ref, **TOL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for fn in (softmax_attention, naive_attention):
            y = fn(q.bfloat16(), k.bfloat16(), v.bfloat16(), bias.bfloat16())
            torch.testing.assert_close(y.float(), ref, atol=3e-2, rtol=3e-2)


def test_scale_sharpens_softmax_and_naive_alike():
    """scale=s is softmax(s q k^T / sqrt(hs)): the same as the plain kind fed s q."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=g) for _ in range(3))
    mask = visible(torch.arange(6), torch.arange(6), window=4)
    for mask in (mask, "causal", None):
        ref = softmax_attention(2.0 * q, k, v, mask)
        torch.testing.assert_close(softmax_attention(q, k, v, mask, scale=2.0), ref, **TOL)
        torch.testing.assert_close(naive_attention(q, k, v, mask, scale=2.0), ref, **TOL)
        assert not torch.allclose(softmax_attention(q, k, v, mask), ref, **TOL)


def test_naive_model_equals_softmax_model():
    a, b = tiny(), tiny(attention="naive")
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(text())[0], a(text())[0], **TOL)


def test_n_kv_head_equal_n_head_is_mha():
    a, b = tiny(), tiny(n_kv_head=4)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(text())[0], a(text())[0], **TOL)


def test_user_attention_plugs_in_by_name():
    a, b = tiny(), tiny(attention="tutorial_user_attention:attend")
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(text())[0], a(text())[0], **TOL)


def test_window_equals_full_attention_under_band_mask():
    m = tiny(window=5, global_layers="1")
    idx = text(T=30)
    ref_mask = torch.ones(30, 30, dtype=torch.bool).tril() & ~torch.ones(30, 30, dtype=torch.bool).tril(-5)
    seen = []
    orig = m.transformer.h[0].attn.attend

    def spy(q, k, v, mask, p):
        seen.append(mask)
        return orig(q, k, v, mask, p)
    m.transformer.h[0].attn.attend = spy
    out = m(idx)[0]
    assert torch.equal(seen[0], ref_mask)
    # the same model with window >= T is plain causal attention
    m.transformer.h[0].attn.attend = orig
    wide = tiny(window=30, global_layers="1")
    wide.load_state_dict(m.state_dict())
    torch.testing.assert_close(wide(idx)[0], tiny()(idx)[0], **TOL)
    assert not torch.allclose(out, wide(idx)[0], atol=1e-4)


@pytest.mark.parametrize("window", [0, 64])
def test_training_forward_lets_sdpa_use_its_fast_kernels(monkeypatch, window):
    """No explicit mask in training without memory (window 0 or >= T): is_causal=True, which
    SDPA's flash and memory-efficient kernels take."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        calls.append((attn_mask is None, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    model = tiny(n_head=2, n_embd=16, window=window, bias=True, dropout=0.1).train()
    model(torch.zeros(2, 32, dtype=torch.long))
    assert calls == [(True, True)] * 2


def test_cpu_autocast_computes_matmuls_in_bf16_and_attention_in_float32(monkeypatch):
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    model = tiny(n_head=2).train()
    idx = torch.randint(0, 256, (2, 16))
    with devices.autocast_ctx("cpu", "bfloat16"):
        logits, _ = model(idx)
    assert logits.dtype == torch.bfloat16  # the matmuls ran in bfloat16
    assert seen == [(torch.float32,) * 3 + (False,)] * 2
    # the attention itself: float32 on the bfloat16 values, rounded back
    q, k, v = torch.randn(3, 2, 2, 16, 8).bfloat16()
    with devices.autocast_ctx("cpu", "bfloat16"):
        got = softmax_attention(q, k, v, "causal")
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, sdpa(q.float(), k.float(), v.float(), is_causal=True).bfloat16())
    with devices.autocast_ctx("cpu", "float32"):
        assert not torch.is_autocast_enabled("cpu")


def test_a_user_attention_that_ignores_its_mask_is_refused_at_the_start():
    """SDPA's is_causal=True instead of the mask trains as well as softmax (T = S) and decodes
    wrongly from the cache (T < S): one UserError when the function is resolved."""
    from utils import UserError
    with pytest.raises(UserError, match="use the mask you are given"):
        tiny(attention="tutorial_user_attention:causal_by_itself")


def test_a_user_attention_in_another_dtype_gives_q_dtype():
    a, b = tiny(), tiny(attention="tutorial_user_attention:in_float64")
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 256, (2, 12))
    assert torch.allclose(a(x)[0], b(x)[0], atol=1e-5)
