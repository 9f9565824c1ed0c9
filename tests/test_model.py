"""model.py and kvcache.py against references: the tutorial's forward, full forwards,
explicit masks, repeated K/V heads, hand-computed bit counts."""

import itertools
import os
import pickle

import pytest
import torch
from torch.nn import functional as F

from checkpoint import convert_state_dict, load_model, read_checkpoint
from kvcache import KVCache, visible
from model import GPT, GPTConfig, naive_attention, softmax_attention, expand_kv
from tutorial_reference import TutorialReference, reference_logits
from utils import UserError

TOL = dict(atol=1e-5, rtol=1e-5)


def tiny(**kw):
    torch.manual_seed(0)
    args = dict(n_layer=2, n_head=4, n_embd=32, bias=False)
    args.update(kw)
    return GPT(GPTConfig(**args)).eval()


def text(B=2, T=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, T), generator=g)


def feed(model, idx, step, **state_kw):
    """Logits of idx fed `step` tokens at a time through one set of caches."""
    states = model.new_states(idx.size(0), capacity=4, **state_kw)
    out = []
    for a in range(0, idx.size(1), step):
        logits, states = model(idx[:, a:a + step], states)
        out.append(logits)
    return torch.cat(out, dim=1), states


def test_forward_shapes_and_loss():
    m = tiny()
    logits, states = m(text())
    assert logits.shape == (2, 40, 256)
    assert len(states) == 2 and states[0].tokens() == 40
    assert m.loss(logits, text()).ndim == 0
    _, none = m(text(), return_states=False)
    assert none is None


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
    from rotary_embedding_torch import RotaryEmbedding
    from model import apply_rope, rope_table
    r = RotaryEmbedding(dim=16)
    x = torch.randn(2, 3, 10, 16)
    ours = apply_rope(x, rope_table(r.freqs, torch.arange(5, 15)))
    torch.testing.assert_close(ours, r.rotate_queries_or_keys(x, offset=5), atol=1e-6, rtol=1e-6)


def test_naive_equals_softmax_and_gqa_equals_repeated_heads():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 7, 8, generator=g)
    for nkv in (4, 2, 1):
        k, v = torch.randn(2, nkv, 11, 8, generator=g), torch.randn(2, nkv, 11, 8, generator=g)
        mask = visible(torch.arange(4, 11), torch.arange(11), recent=5, sink=2)
        ref = F.scaled_dot_product_attention(q, expand_kv(k, 4), expand_kv(v, 4), attn_mask=mask)
        torch.testing.assert_close(softmax_attention(q, k, v, mask), ref, **TOL)
        torch.testing.assert_close(naive_attention(q, k, v, mask), ref, **TOL)
        ref_c = F.scaled_dot_product_attention(q, expand_kv(k, 4)[:, :, :7], expand_kv(v, 4)[:, :, :7], is_causal=True)
        torch.testing.assert_close(naive_attention(q, k[:, :, :7], v[:, :, :7], "causal"), ref_c, **TOL)


def test_naive_model_equals_softmax_model():
    a, b = tiny(), tiny(attention="naive")
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(text())[0], a(text())[0], **TOL)


def test_n_kv_head_equal_n_head_is_mha():
    a, b = tiny(), tiny(n_kv_head=4)
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
    out = m(idx, return_states=False)[0]
    assert torch.equal(seen[0], ref_mask)
    # the same model with window >= T is plain causal attention
    m.transformer.h[0].attn.attend = orig
    wide = tiny(window=30, global_layers="1")
    wide.load_state_dict(m.state_dict())
    torch.testing.assert_close(wide(idx)[0], tiny()(idx)[0], **TOL)
    assert not torch.allclose(out, wide(idx)[0], atol=1e-4)


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
    captured = {}

    def grab(mod, args, out):
        captured["kv"] = out[1]
    h = ref.transformer.h[0].attn.register_forward_hook(grab)
    idx = text()
    x = ref.transformer.wte(idx)
    from model import rope_table
    pos = torch.arange(40)
    rot = rope_table(ref.transformer.h[0].attn.rotary_emb.freqs, pos)
    x, kv0 = ref.transformer.h[0](x, (rot, pos))
    x, _ = ref.transformer.h[1](x, (rot, pos), shared=kv0)
    expected = ref.lm_head(ref.transformer.ln_f(x))
    h.remove()
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


@pytest.mark.parametrize("kw", COMBOS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "mha")
def test_token_by_token_and_chunked_equal_full_forward(kw):
    m = tiny(**kw)
    idx = text(T=33)
    full, _ = m(idx)
    for step in (1, 5, 16):
        torch.testing.assert_close(feed(m, idx, step)[0], full, **TOL)


@pytest.mark.parametrize("window,sink,step", [(8, 0, 1), (8, 3, 1), (8, 3, 5), (6, 2, 13)])
def test_bounded_cache_equals_forward_over_kept_tokens(window, sink, step):
    # one layer: a kept token's K/V depends on the token and its position only, so the
    # last query must see exactly what a full forward over the kept tokens computes
    m = tiny(n_layer=1)
    idx = text(T=40)
    ours, states = feed(m, idx, step, kv_window=window, kv_sink=sink)
    assert states[0].tokens() == window + sink
    for t in (15, 27, 39):
        keep = [p for p in range(t + 1) if p < sink or t - p < window]
        ref, _ = m(idx[:, keep], pos=torch.tensor(keep))
        torch.testing.assert_close(ours[:, t], ref[:, -1], **TOL)


def test_bounded_decode_matches_tutorial_with_cut_history():
    # the tutorial's fix of exercise 1: keep the last N unrotated keys, re-rotate them at
    # 0..N-1 every step. RoPE only sees distances, so our rotated ring buffer must agree.
    m = tiny(n_layer=3)
    idx = text(T=50)
    ref = TutorialReference(m.state_dict(), 3, 4, kv_window=9)
    expected = torch.cat([ref(idx[:, :6])] + [ref(idx[:, t:t + 1]) for t in range(6, 50)], dim=1)
    states = m.new_states(2, kv_window=9)
    ours = [m(idx[:, :6], states)[0]] + [m(idx[:, t:t + 1], states)[0] for t in range(6, 50)]
    torch.testing.assert_close(torch.cat(ours, dim=1), expected, **TOL)


def test_bounded_cache_is_full_forward_while_it_fits():
    m = tiny()
    idx = text(T=12)
    torch.testing.assert_close(feed(m, idx, 1, kv_window=12)[0], m(idx)[0], **TOL)


def test_local_layer_never_holds_more_than_window():
    m = tiny(window=4, global_layers="1")
    _, states = feed(m, text(T=30), 3, kv_window=10)
    assert states[0].tokens() == 4 and states[1].tokens() == 10
    _, states = feed(m, text(T=30), 3, kv_window=2, kv_sink=1)
    assert states[0].tokens() == 3 and states[1].tokens() == 3


def test_size_bits_hand_computed():
    c = KVCache(3, 2, 8, capacity=100)
    c.update(torch.zeros(3, 2, 10, 8), torch.zeros(3, 2, 10, 8))
    assert c.size_bits() == 2 * 3 * 2 * 10 * 8 * 32
    c16 = KVCache(1, 4, 16, recent=5, sink=1, dtype=torch.float16)
    for _ in range(9):
        c16.update(torch.zeros(1, 4, 1, 16, dtype=torch.float16), torch.zeros(1, 4, 1, 16, dtype=torch.float16))
    assert c16.size_bits() == 2 * 4 * 6 * 16 * 16
    m = tiny(n_layer=4, n_kv_head=1, kv_share=2)
    _, states = m(text(B=1, T=7))
    assert GPT.states_bits(states) == (2 * 2 * 1 * 7 * 8 * 32, 7)


def test_cache_allocates_once():
    c = KVCache(1, 2, 4, capacity=50)
    buf = c.k
    for _ in range(50):
        c.update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
    assert c.k is buf


def test_generate_cached_equals_recompute_past_block():
    m = tiny()
    prompt = text(B=1, T=5)
    out = m.generate(prompt, 60, temperature=0)
    seq = prompt
    for _ in range(60):
        logits, _ = m(seq, return_states=False)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_top_k_sampling():
    m = tiny()
    g = torch.Generator().manual_seed(0)
    prompt = text(B=3, T=4)
    out = m.generate(prompt, 30, temperature=1.0, top_k=1, generator=g)
    assert torch.equal(out, m.generate(prompt, 30, temperature=0))
    big = m.generate(prompt, 5, temperature=1.0, top_k=10_000, generator=g)  # clamps to 256
    assert big.shape == (3, 9)
    stats = {}
    list(m.generate_stream(prompt, 20, kv_window=8, stats=stats))
    assert stats["kv_bits_peak"] == 2 * 2 * 3 * 4 * 8 * 8 * 32  # layers x k/v x B x heads x 8 tokens x hs x fp32
    assert stats["kv_bits_per_token"] == 2 * 2 * 4 * 8 * 32


def test_config_errors_are_clear():
    for kw, words in [(dict(n_kv_head=3), "multiple of n_kv_head"), (dict(window=-1), "window"),
                      (dict(window=4, global_layers="7"), "out of range"), (dict(attention="flash9"), "unknown attention"),
                      (dict(attention="nosuchpkg.mod:fn"), "does not import"), (dict(global_layers="a,b"), "comma-separated"),
                      (dict(n_layer=4, window=4, global_layers="1", kv_share=2), "mix")]:
        with pytest.raises(UserError, match=words):
            tiny(**kw)


def test_user_attention_plugs_in_by_name():
    a, b = tiny(), tiny(attention="tutorial_user_attention:attend")
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(text())[0], a(text())[0], **TOL)


def save_tutorial_layout(path, model, **extra):
    ckpt = {"model": {"_orig_mod." + k: v for k, v in model.state_dict().items()},
            "optimizer": {"state": {}, "param_groups": []},
            "model_args": {"n_layer": 2, "n_head": 4, "n_embd": 32, "bias": False, "dropout": 0.0},
            "config": {"batch_size": 4, "dataset": "shakespeare_char"}}
    ckpt.update(extra)
    torch.save(ckpt, path)


def test_tutorial_layout_checkpoint_loads_and_matches_hand_set_model(tmp_path):
    torch.manual_seed(3)
    hand = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, bias=False)).eval()
    with torch.no_grad():
        for p in hand.parameters():
            p.copy_(torch.randn_like(p) * 0.05) if p.requires_grad else None
    save_tutorial_layout(tmp_path / "ckpt.pt", hand)
    model, ckpt = load_model(str(tmp_path / "ckpt.pt"))
    idx = text(T=70)
    torch.testing.assert_close(model.eval()(idx)[0], hand(idx)[0], **TOL)
    torch.testing.assert_close(feed(model, idx, 1)[0],
                               reference_logits(hand.state_dict(), 2, 4, idx), **TOL)


def test_bad_checkpoints_give_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_checkpoint(str(tmp_path / "nope.pt"))
    good = tmp_path / "good.pt"
    save_tutorial_layout(good, tiny())
    data = good.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="trunc.pt"):
        read_checkpoint(str(tmp_path / "trunc.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="junk.pt"):
        read_checkpoint(str(tmp_path / "junk.pt"))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="not a checkpoint of this project"):
        read_checkpoint(str(tmp_path / "foreign.pt"))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_pickle_with_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": {}, "model_args": {}, "x": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="refused"):
        read_checkpoint(str(tmp_path / "evil.pt"))
    assert not (tmp_path / "pwned.txt").exists()


def test_convert_mha_to_gqa_mean_pools_and_trains(tmp_path):
    src = tiny()
    save_tutorial_layout(tmp_path / "ckpt.pt", src)
    model, ckpt = load_model(str(tmp_path / "ckpt.pt"), overrides={"n_kv_head": 2})
    assert ckpt["conversions"]
    for i in range(2):
        w_old = src.state_dict()[f"transformer.h.{i}.attn.c_attn.weight"]
        w_new = model.state_dict()[f"transformer.h.{i}.attn.c_attn.weight"]
        assert w_new.shape == (32 + 2 * 2 * 8, 32)
        torch.testing.assert_close(w_new[:32], w_old[:32])
        k_old = w_old[32:64].view(4, 8, 32)
        v_old = w_old[64:].view(4, 8, 32)
        torch.testing.assert_close(w_new[32:48].view(2, 8, 32), (k_old[0::2] + k_old[1::2]) / 2)
        torch.testing.assert_close(w_new[48:].view(2, 8, 32), (v_old[0::2] + v_old[1::2]) / 2)
    # the converted model trains: a few steps on one batch lower its loss
    model.train()
    opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.99), "cpu")
    idx = text(B=4, T=33)
    losses = []
    for _ in range(20):
        logits, _ = model(idx[:, :-1], return_states=False)
        loss = model.loss(logits, idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_convert_kv_share_averages_group():
    src = tiny(n_layer=4)
    old, new = src.config, GPTConfig(n_layer=4, n_head=4, n_embd=32, bias=False, kv_share=2)
    sd, notes = convert_state_dict(dict(src.state_dict()), old, new)
    w = src.state_dict()
    key = "transformer.h.{}.attn.c_attn.weight"
    torch.testing.assert_close(sd[key.format(0)][32:], (w[key.format(0)][32:] + w[key.format(1)][32:]) / 2)
    assert sd[key.format(1)].shape == (32, 32) and notes
    GPT(new).load_state_dict(sd)


@pytest.mark.parametrize("step", [1, 7])
def test_trim_cache_with_keep_recent_equals_ring_buffer(step):
    from kvcache import TrimCache
    m = tiny(n_layer=2)
    idx = text(T=40)
    ring, _ = feed(m, idx, step, kv_window=6, kv_sink=2)
    trim, states = feed(m, idx, step, kv_window=6, kv_sink=2, make_cache=lambda i, **kw: TrimCache(**kw))
    torch.testing.assert_close(trim, ring, **TOL)
    assert states[0].tokens() == 8 and states[0].size_bits() == 2 * 2 * 4 * 8 * 8 * 32


def test_rope_compiled_form_equals_the_complex_form(monkeypatch):
    """apply_rope writes the turn with cos/sin under torch.compile: the same numbers."""
    import rope
    from rotary_embedding_torch import RotaryEmbedding
    table = rope.rope_table(RotaryEmbedding(dim=16).freqs, torch.arange(3, 13))
    x = torch.randn(2, 3, 10, 16)
    eager, eager16 = rope.apply_rope(x, table), rope.apply_rope(x.bfloat16(), table)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(rope.apply_rope(x, table), eager, atol=1e-6, rtol=0)
    got16 = rope.apply_rope(x.bfloat16(), table)
    assert got16.dtype == torch.bfloat16
    torch.testing.assert_close(got16, eager16)
