"""model.py against references: the tutorial's forward, its own full forward (every kind and
combination fed token by token and in chunks through caches), layers fed the same K/V by
hand, rotary_embedding_torch's RoPE, and one clear error for every impossible config."""

import re

import pytest
import torch
from rotary_embedding_torch import RotaryEmbedding

import rope
from attention import ATTENTION
from conftest import TOL, feed, text, tiny
from kv.policy import KVOptions
from tutorial_reference import reference_logits
from utils import UserError


def test_forward_shapes_and_loss():
    m = tiny()
    caches = KVOptions(kv_window=0).make_caches(m, 2, capacity=40)
    logits, caches = m(text(), caches)
    assert logits.shape == (2, 40, 256)
    assert len(caches) == 2 and caches[0].tokens() == 40
    assert m.loss(logits, text()).ndim == 0
    plain, none = m(text())  # training: no cache kept
    assert none is None
    torch.testing.assert_close(plain, logits, **TOL)


def test_matches_tutorial_forward_past_training_length():
    m = tiny(n_layer=3)
    idx = text(T=90)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    ref = reference_logits(sd, 3, 4, idx, chunks=[idx[:, :50]] + [idx[:, t:t + 1] for t in range(50, 90)])
    ours, _ = feed(m, idx, 1)
    torch.testing.assert_close(ours, ref, **TOL)
    full, _ = m(idx)
    torch.testing.assert_close(full, reference_logits(sd, 3, 4, idx), **TOL)


def test_rope_matches_rotary_embedding_torch():
    r = RotaryEmbedding(dim=16)
    x = torch.randn(2, 3, 10, 16)
    ours = rope.apply_rope(x, rope.rope_table(r.freqs, torch.arange(5, 15)))
    torch.testing.assert_close(ours, r.rotate_queries_or_keys(x, offset=5), atol=1e-6, rtol=1e-6)


def test_rope_compiled_form_equals_the_complex_form(monkeypatch):
    """apply_rope writes the turn with cos/sin under torch.compile: the same numbers."""
    table = rope.rope_table(RotaryEmbedding(dim=16).freqs, torch.arange(3, 13))
    x = torch.randn(2, 3, 10, 16)
    eager, eager16 = rope.apply_rope(x, table), rope.apply_rope(x.bfloat16(), table)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(rope.apply_rope(x, table), eager, atol=1e-6, rtol=0)
    got16 = rope.apply_rope(x.bfloat16(), table)
    assert got16.dtype == torch.bfloat16
    torch.testing.assert_close(got16, eager16)


def test_kv_share_equals_layers_fed_the_same_kv():
    m = tiny(n_layer=2, kv_share=2)
    assert m.transformer.h[1].attn.c_attn.weight.shape == (32, 32)  # no K/V projection
    ref = tiny(n_layer=2)
    sd = ref.state_dict()
    for k, v in m.state_dict().items():
        sd[k] = v if v.shape == sd[k].shape else sd[k]
    # give layer 1 of the plain model layer 0's K/V rows: it then computes its own K/V
    # from its own input; the shared model must instead reuse layer 0's K/V exactly
    sd["transformer.h.1.attn.c_attn.weight"] = torch.cat([m.state_dict()["transformer.h.1.attn.c_attn.weight"],
                                                           m.state_dict()["transformer.h.0.attn.c_attn.weight"][32:]])
    ref.load_state_dict(sd)
    idx = text()
    x = ref.transformer.wte(idx)
    pos = torch.arange(40)
    rot = rope.rope_table(ref.transformer.h[0].attn.rotary_emb.freqs, pos)
    x, kv0 = ref.transformer.h[0](x, pos, rot)
    x, _ = ref.transformer.h[1](x, pos, rot, shared=kv0)
    expected = ref.lm_head(ref.transformer.ln_f(x))
    torch.testing.assert_close(m(idx)[0], expected, **TOL)


COMBOS = [
    dict(),
    dict(attention="naive"),
    dict(n_kv_head=2),
    dict(n_kv_head=1, attention="naive"),
    dict(window=4, global_layers="0"),
    dict(window=3, n_kv_head=2, n_layer=4, global_layers="0,1", kv_share=2),
    dict(kv_share=2),
    dict(rope=False),
]
# a kind added to ATTENTION later: alone, and with grouped K/V heads (k and v come with fewer heads
# than q) and local windows (bool masks, fewer queries than keys)
COMBOS += [dict(attention=k, **x) for k in ATTENTION if k not in ("softmax", "naive")
           for x in (dict(), dict(n_kv_head=2, window=3, global_layers="0"))]


@pytest.mark.parametrize("kw", COMBOS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "mha")
def test_token_by_token_and_chunked_equal_full_forward(kw):
    m = tiny(**kw)
    idx = text(T=33)
    full, _ = m(idx)
    for step in (1, 5, 16):
        torch.testing.assert_close(feed(m, idx, step)[0], full, **TOL)


def test_loaded_rope_frequencies_replace_the_cached_table():
    """The RoPE table is cached across forwards; load_state_dict writes other frequencies into
    the same tensor (same data_ptr): the next forward must use them, as a model that never
    saw the old ones does."""
    m = tiny()
    idx = text(T=20)
    before, _ = m(idx)  # builds the table from the initial frequencies
    sd = {k: v * 0.5 if k.endswith("rotary_emb.freqs") else v for k, v in m.state_dict().items()}
    m.load_state_dict(sd)
    fresh = tiny()
    fresh.load_state_dict(sd)
    after, _ = m(idx)
    torch.testing.assert_close(after, fresh(idx)[0], **TOL)
    assert not torch.allclose(after, before, atol=1e-4)  # the frequencies do matter here


def test_config_errors_are_clear():
    for kw, words in [(dict(n_kv_head=3), "multiple of n_kv_head"), (dict(window=-1), "window"),
                      (dict(window=4, global_layers="7"), "out of range"), (dict(attention="flash9"), "unknown attention"),
                      (dict(attention="nosuchpkg.mod:fn"), "no module named"), (dict(global_layers="a,b"), "comma-separated"),
                      (dict(n_layer=4, window=4, global_layers="1", kv_share=2), "mix")]:
        with pytest.raises(UserError, match=words):
            tiny(**kw)


@pytest.mark.parametrize("kw", [dict(n_embd=384, n_head=5), dict(n_embd=96, n_head=7), dict(n_embd=40, n_head=3),
                                dict(n_embd=21, n_head=2, rope=False), dict(n_embd=48, n_head=6, n_kv_head=4),
                                dict(n_embd=32, n_head=1, n_kv_head=2)])
def test_a_head_count_that_does_not_divide_is_answered_with_ones_that_build(kw):
    """The n_head (or n_kv_head) values the error offers are ones the model builds with."""
    from model import GPTConfig, check_config
    with pytest.raises(UserError) as e:
        check_config(GPTConfig(**kw))
    flag = "n_kv_head" if "n_kv_head" in kw else "n_head"
    offered = str(e.value).split(f"--{flag}=")[1].split(", or an")[0].split("(")[0]  # "4 or 6", "1, 2, 3 or 6"
    values = [int(v) for v in re.findall(r"\d+", offered)]
    assert values and kw[flag] not in values, str(e.value)
    for v in values:
        check_config(GPTConfig(**{**kw, flag: v}))


def test_an_unknown_kind_lists_the_layer_classes_registered_too(monkeypatch):
    """A kind registered as a layer class in model.ATTENTION_LAYERS is offered beside linear."""
    import model
    monkeypatch.setitem(model.ATTENTION_LAYERS, "alibi", model.CausalSelfAttention)
    with pytest.raises(UserError, match=r"'linear'.*'alibi'|'alibi'.*'linear'"):
        tiny(attention="alibx")
    assert tiny(attention="alibi")(text(B=1, T=4))[0].shape == (1, 4, 256)


def test_nanogpts_model_x_y_call_says_what_to_write_instead():
    """model(x, y) is nanoGPT's way to get the loss; here the second argument is the caches, so
    the call says how the loss is computed instead of failing deep in the cache code."""
    model, x = tiny(), text(B=2, T=8)
    with pytest.raises(TypeError, match=r"model.loss\(logits, targets\)"):
        model(x, x)
    logits, _ = model(x)
    assert torch.isfinite(model.loss(logits, x)).all()


def test_a_layer_class_registered_by_name_builds_and_decodes(monkeypatch):
    """ARCHITECTURE.md's route for a kind that needs positions or parameters: a layer class in
    model.ATTENTION_LAYERS, nothing in attention.py. Built on CausalSelfAttention unchanged, it is
    softmax attention under another name: same logits, and cached decoding equals the full forward."""
    import model

    class Mine(model.CausalSelfAttention):
        pass

    monkeypatch.setitem(model.ATTENTION_LAYERS, "mine", Mine)
    a, b = tiny(), tiny(attention="mine")
    b.load_state_dict(a.state_dict())
    idx = text(T=24)
    torch.testing.assert_close(b(idx)[0], a(idx)[0], **TOL)
    torch.testing.assert_close(feed(b, idx, 1)[0], b(idx)[0], **TOL)
