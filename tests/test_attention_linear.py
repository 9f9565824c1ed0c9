"""attention_linear.py: recurrent == parallel == chunked, in layers and in whole models."""

import pytest
import torch

from attention_linear import linear_chunked, linear_parallel, linear_recurrent, phi
from conftest import TOL, feed, text, tiny
from kv.policy import KVOptions, held_bits
from utils import UserError


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("nkv,T,chunk", [(4, 37, 8), (2, 64, 16), (1, 5, 64)])
def test_three_forms_agree(nkv, T, chunk):
    B, nh, hs = 2, 4, 8
    q, k, v = phi(rand(B, nh, T, hs, seed=0)), phi(rand(B, nkv, T, hs, seed=1)), rand(B, nkv, T, hs, seed=2)
    S0, z0 = phi(rand(B, nkv, hs, hs, seed=3)), phi(rand(B, nkv, hs, seed=4))  # a state carried in
    num_p, den_p = linear_parallel(q, k, v, S0, z0)
    num_c, den_c, S, z = linear_chunked(q, k, v, S0, z0, chunk=chunk)
    S_r, z_r = S0.clone(), z0.clone()
    num_r, den_r = linear_recurrent(q, k, v, S_r, z_r)
    scale = num_p.abs().max()
    torch.testing.assert_close(num_c / scale, num_p / scale, **TOL)
    torch.testing.assert_close(num_r / scale, num_p / scale, **TOL)
    torch.testing.assert_close(den_c / den_p.max(), den_p / den_p.max(), **TOL)
    torch.testing.assert_close(den_r / den_p.max(), den_p / den_p.max(), **TOL)
    torch.testing.assert_close(S_r, S, **TOL)
    torch.testing.assert_close(z_r, z, **TOL)


MODELS = [
    dict(attention="linear"),
    dict(attention="linear", rope=False),
    dict(attention="linear", n_kv_head=2),
    dict(attention="linear", n_kv_head=1, linear_norm="denominator"),
    dict(attention="linear", linear_layers="1", n_layer=3),  # hybrid: linear beside softmax
    dict(attention="linear", linear_layers="0,2", n_layer=3, window=6, global_layers="2"),
]


@pytest.mark.parametrize("kw", MODELS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_model_decoding_equals_full_forward(kw):
    m = tiny(bias=True, **kw)
    idx = torch.randint(0, 256, (2, 150), generator=torch.Generator().manual_seed(1))
    full, _ = m(idx)  # training's chunked form
    for step in (1, 29):
        torch.testing.assert_close(feed(m, idx, step)[0], full, **TOL)


def test_linear_state_size_is_constant_in_history():
    m = tiny(bias=True, attention="linear")
    sizes = []
    for T in (100, 10_000):
        caches = KVOptions(kv_window=0).make_caches(m, 1)
        _, caches = m(torch.randint(0, 256, (1, T)), caches)
        sizes.append(held_bits(caches)[0])
    assert sizes[0] == sizes[1] == 2 * (8 * 8 + 8) * 4 * 32  # layers x (S + z) x heads x fp32


def test_linear_bad_input():
    for kw, words in [(dict(linear_layers="5"), "out of range"), (dict(linear_norm="softmax"), "unknown linear_norm"),
                      (dict(attention="softmax", linear_layers="0"), "needs --attention=linear")]:
        with pytest.raises(UserError, match=words):
            tiny(**dict(dict(attention="linear"), **kw))


def test_linear_sums_stay_float32_under_bf16_autocast(monkeypatch):
    """Autocast would run the state's matmuls and cumulative sums in bfloat16; they must not."""
    import attention_linear
    import devices
    seen = []
    chunked = attention_linear.linear_chunked

    def spy(q, k, v, *a, **kw):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return chunked(q, k, v, *a, **kw)

    monkeypatch.setattr(attention_linear, "linear_chunked", spy)
    model = tiny(n_layer=1, n_head=2, attention="linear").train()
    idx = torch.randint(0, 256, (2, 40))
    with devices.autocast_ctx("cpu", "bfloat16"):
        logits, _ = model(idx)
    assert seen == [(torch.float32,) * 3 + (False,)]
    ref, _ = model(idx)  # float32 throughout
    torch.testing.assert_close(logits.float(), ref, atol=0.1, rtol=0.05)


def test_a_layer_class_with_a_state_of_its_own_gets_it_from_make_state(monkeypatch):
    """A new kind registered in ATTENTION_LAYERS whose class has make_state (here built on
    linear attention) keeps that state, not a KV cache, wherever caches or XL memory are made:
    fed token by token and in chunks it computes its full forward, and no layer counts as cached."""
    import model as model_module
    from attention_linear import LinearAttention, LinearState
    from kv.xl import make_xl_memory

    class Retention(LinearAttention):
        pass

    monkeypatch.setitem(model_module.ATTENTION_LAYERS, "retention", Retention)
    m = tiny(attention="retention")
    assert m.config.no_kv_cache and not m.config.cached_kinds()
    idx = text(T=20)
    full, _ = m(idx)
    for step in (1, 6):
        ours, caches = feed(m, idx, step)
        assert all(isinstance(c, LinearState) for c in caches)
        torch.testing.assert_close(ours, full, **TOL)
    assert all(isinstance(c, LinearState) for c in make_xl_memory(m, 2, mem_len=8))
