"""
kv/qat.py, quantization-aware training of the cache, against references: with kv_quant=none
the QAT path trains bit for bit like plain training; with a format, the forward sees exactly
what the inference cache (QuantKVCache, residual 0, the same tokens in one chunk) hands back,
and the gradient passes straight through; train.py trains with it and rejects xl_mem with it.

    python -m pytest -q tests/test_qat.py
"""
import os

import pytest
import torch

from conftest import text, tiny, train
from kv.policy import KVOptions
from kv.qat import FakeQuantCache, make_qat_caches, qat_caches
from kv.quant import make_formats
from kv.quant_cache import QuantKVCache
from model import loss_fn


def grads_after_step(model, x, caches):
    model.zero_grad(set_to_none=True)
    logits, _ = model(x, caches)
    loss = loss_fn(logits[:, :-1], x[:, 1:])
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("kw", [dict(), dict(window=8, global_layers="1"), dict(n_kv_head=1, kv_share=2)])
def test_none_trains_bit_for_bit_like_plain_training(kw):
    model = tiny(**kw).train()
    x = text(T=24)
    assert make_qat_caches(model, "none") is None  # train.py's switch: plain training
    loss0, g0 = grads_after_step(model, x, None)
    loss1, g1 = grads_after_step(model, x, qat_caches(model, "none"))
    assert torch.equal(loss0, loss1)
    assert len(g0) == len(g1) > 0 and all(torch.equal(a, b) for a, b in zip(g0, g1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,group,channel_keys,T", [
    ("int4", 8, True, 32), ("int2", 8, True, 36), ("int4", 8, False, 20), ("int2", 4, False, 20),
    ("int8", 8, True, 20), ("fp8_e4m3", 8, True, 20)])
def test_fake_quant_is_what_the_inference_cache_holds(name, group, channel_keys, T, dtype):
    """The same K/V through a QuantKVCache (residual 0, one chunk from position 0) and through
    the training fake-quantizer: identical keys and values, the incomplete last key group
    (T=36, groups of 8) in full precision in both; also for bfloat16 K/V (training's autocast
    on a GPU), which both dequantize into bfloat16."""
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 3, T, 16, generator=g), torch.randn(2, 3, T, 16, generator=g)
    k[..., 5] *= 30  # an outlier channel
    k, v = k.to(dtype), v.to(dtype)
    fmts = make_formats(name, group, 16, channel_keys)
    cache = QuantKVCache(*fmts, batch_size=2, n_kv_head=3, head_dim=16, residual=0, dtype=dtype)
    keys, vals, _ = cache.update(k, v)
    fq = FakeQuantCache(*make_formats(name, group, 16, channel_keys))
    k2, v2, mask = fq.update(k.clone().requires_grad_(), v.clone().requires_grad_())
    assert torch.equal(k2, keys) and torch.equal(v2, vals)
    assert mask == "causal"
    assert not torch.equal(k2, k)  # something was quantized
    full = cache.k_full.size(2)  # what the cache still keeps unquantized
    assert torch.equal(k2[:, :, T - full:], k[:, :, T - full:])


def test_straight_through_gradient():
    fq = FakeQuantCache(*make_formats("int2", 8, 16, True))
    k = torch.randn(1, 2, 16, 16, requires_grad=True)
    v = torch.randn(1, 2, 16, 16, requires_grad=True)
    k2, v2, _ = fq.update(k, v)
    w = torch.randn_like(k2)
    ((k2 * w).sum() + (v2 * w).sum()).backward()
    assert torch.equal(k.grad, w) and torch.equal(v.grad, w)


@pytest.mark.parametrize("keys", ["channel", "token"])
def test_model_forward_through_qat_equals_the_inference_cache(keys):
    """A whole model: the training forward with int4 QAT caches gives the logits of the
    inference cache (int4, residual 0, the same key layout) fed the same bytes in one chunk."""
    model = tiny(n_kv_head=2)
    x = text(T=32)
    kv = KVOptions(kv_window=0, kv_quant="int4", kv_quant_group=8, kv_quant_residual=0, kv_quant_keys=keys)
    with torch.no_grad():
        trained, _ = model(x, make_qat_caches(model, "int4", 8, channel_keys=keys == "channel"))
        served, _ = model(x, kv.make_caches(model, 2, 32))
    assert torch.equal(trained, served)


@pytest.mark.slow
def test_train_py_with_qat(data_dir, tmp_path):
    out = tmp_path / "out"
    printed = train(data_dir, out, "--max_iters=4", "--kv_quant=int2", "--kv_quant_group=8")
    assert "iter 4" in printed and (out / "last.pt").exists()
    printed = train(data_dir, out, "--init_from=resume", "--resume_checkpoint_name=last", "--max_iters=2",
                    "--kv_quant=int4", "--kv_quant_keys=token", "--kv_quant_group=16")
    assert "iter 6" in printed


def test_a_compiler_that_fails_on_the_fake_quantization_falls_back_before_training(data_dir, tmp_path,
                                                                                    monkeypatch, capsys):
    """--compile=True tries the path training takes, the QAT caches included: a compiler that
    fails there only (Triton has no float8_e4m3 before compute capability 8.9) means an eager
    run with one warning, not a crash at the first training step."""
    import utils

    class Compiled(torch.nn.Module):  # a compiled model whose compiler refuses the caches' path
        def __init__(self, model, **kw):
            super().__init__()
            self._orig_mod = model

        def forward(self, idx, caches=None):
            if caches is not None:
                raise RuntimeError("backend: float8_e4m3fn is not supported on this GPU")
            return self._orig_mod(idx, caches)

    monkeypatch.setattr(torch, "compile", Compiled)
    monkeypatch.setattr(utils, "_COMPILE_FAILED", {})
    printed = train(data_dir, tmp_path / "out", "--max_iters=2", "--kv_quant=int8", "--compile=True")
    assert "iter 2" in printed, printed
    assert "warning: torch.compile failed, running eager" in capsys.readouterr().err


def test_qat_with_xl_mem_is_one_error(data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train(data_dir, tmp_path, "--max_iters=1", "--xl_mem=16", "--kv_quant=int4")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "xl_mem" in err[0]


@pytest.mark.parametrize("flags, words", [
    (["--kv_quant=int8", "--kv_quant_group=8"], "--kv_quant_group applies to int4 and int2, not to kv_quant=int8"),
    (["--kv_quant_keys=token"], "--kv_quant_keys applies to a quantized cache, not to kv_quant=none"),
])
def test_qat_settings_the_format_ignores_are_one_error(data_dir, tmp_path, capsys, flags, words):
    """As sample.py refuses them: a setting that would do nothing here, and that the next: line
    would hand to sample.py, which refuses it."""
    with pytest.raises(SystemExit) as e:
        train(data_dir, tmp_path, "--max_iters=1", *flags)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not os.path.exists(tmp_path / "ckpt.pt")


def test_qat_on_a_model_with_linear_layers_is_one_error(data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train(data_dir, tmp_path, "--max_iters=1", "--attention=linear", "--linear_layers=0", "--kv_quant=int4")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "layer 0 of this model is linear attention" in err[0] and "--kv_quant=none trains it" in err[0]


def test_token_keys_quantize_every_token_at_once():
    """kv_quant_keys=token (what QAT with --kv_quant_keys=token trains for): with residual 0 every
    token is stored as codes as soon as it arrives; bits by hand: per token and head, 2 x hs
    codes of 2 bits plus a float16 scale and zero per group of G values, for keys and values."""
    model = tiny(n_kv_head=2)  # head_dim 8
    kv = KVOptions(kv_window=0, kv_quant="int2", kv_quant_group=4, kv_quant_residual=0, kv_quant_keys="token")
    assert "token-keys" in kv.describe() and kv.check().key_group() == 1
    caches = kv.make_caches(model, 1, 8)
    with torch.no_grad():
        model(text(B=1, T=5), caches)
    per_token_head = 2 * (8 * 2 + 2 * 16 * (8 // 4))  # keys and values
    assert caches[0].size_bits() == 5 * 2 * per_token_head and caches[0].k_full.size(2) == 0
