"""cache.key_pos, the text positions of the keys an update returned, against the keys
themselves (each carries its position), and a layer class that reads it (an ALiBi bias, the
route ARCHITECTURE.md gives) fed token by token and in chunks through the caches against
its own full forward."""

import pytest
import torch

import model as model_module
from attention import materialize_mask, naive_attention
from conftest import TOL, feed, text, tiny
from kv.cache import attention_mask
from kv.policy import KVOptions
from model import CausalSelfAttention

SETTINGS = {
    "plain": dict(kv_window=0),
    "ring": dict(kv_window=6),
    "ring+sink": dict(kv_window=6, kv_sink=2),
    "trim": dict(kv_window=6, kv_sink=2, kv_trim="kv.cache:keep_recent"),
    "int8": dict(kv_window=0, kv_quant="int8", kv_quant_residual=3),
    "int4 window": dict(kv_window=9, kv_quant="int4", kv_quant_group=4, kv_quant_keys="token", kv_quant_residual=2),
    "h2o int8": dict(kv_window=0, kv_quant="int8", kv_quant_residual=2, kv_evict="h2o", kv_budget=10, kv_recent=3,
                     kv_sink=2),
    "evict window": dict(kv_window=0, kv_evict="window", kv_budget=7, kv_sink=1),
}


@pytest.mark.parametrize("name", SETTINGS)
def test_key_pos_names_the_keys_an_update_returned(name):
    """Keys whose every channel holds their position (exact under every format): key_pos must
    read the same positions, in the order of the keys, after prefills, overflowing chunks and
    decode steps."""
    m = tiny(n_layer=1, n_kv_head=2)
    cache = KVOptions(**SETTINGS[name]).check().make_caches(m, batch_size=2, capacity=4)[0]
    g = torch.Generator().manual_seed(0)
    seen = 0
    for T in (5, 1, 1, 8, 1, 1, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 12, 1, 1):
        k = torch.arange(seen, seen + T, dtype=torch.float).view(1, 1, T, 1).expand(2, 2, T, 8)
        keys, _, mask = cache.update(k, torch.randn(2, 2, T, 8, generator=g))
        cache.attend(naive_attention, torch.randn(2, 4, T, 8, generator=g), keys, keys, mask)  # (h2o's scores)
        held = keys[..., 0].round().long()  # (B, nkv, S)
        assert torch.equal(cache.key_pos.expand_as(held), held), (name, seen, T)
        seen += T


def alibi_slopes(n_head, device):
    return 2.0 ** -torch.arange(1, n_head + 1, device=device, dtype=torch.float).view(-1, 1, 1)  # (nh, 1, 1)


class ALiBi(CausalSelfAttention):
    """softmax(q k^T / sqrt(hs) - slope_h * distance) v, no RoPE: the bias needs the keys'
    positions, which a cache gives as key_pos after update."""

    def forward(self, x, pos, rot, cache=None, shared=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).view(B, T, -1, self.head_dim).transpose(1, 2).split(
            [self.n_head, self.n_kv_head, self.n_kv_head], dim=1)
        if cache is None:
            kpos, mask = pos, attention_mask(pos, pos, self.window)
        else:
            k, v, mask = cache.update(k, v)
            kpos = cache.key_pos  # (S,) or, evicting, (B, nkv, S)
        d = (pos.view(-1, 1) - kpos.unsqueeze(-2)).float()  # (..., T, S) query - key
        sees = materialize_mask(mask, T, kpos.size(-1), x.device)
        if d.dim() == 4:  # per KV head: line up with the query heads of each group
            d = d.repeat_interleave(self.n_head // d.size(1), dim=1)
        if sees.dim() == 4 and sees.size(1) != self.n_head:
            sees = sees.repeat_interleave(self.n_head // sees.size(1), dim=1)
        bias = (-alibi_slopes(self.n_head, x.device) * d).masked_fill(~sees, float("-inf"))
        y = self.attend(q, k, v, bias) if cache is None else cache.attend(self.attend, q, k, v, bias)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C)), (k, v, mask)


LOCAL = dict(window=6, n_kv_head=2)  # local layers, GQA


@pytest.mark.parametrize("kw,name", [(dict(), "plain"), (LOCAL, "plain"), (dict(), "int8 long residual"),
                                     (dict(), "evict window large budget"), (LOCAL, "evict window large budget")])
def test_a_layer_class_reading_key_pos_equals_its_full_forward(monkeypatch, kw, name):
    """A local window: the ring's overflowing chunks (7 > 6) return old + new keys, whose
    positions are not the slots'. The int8 residual and the budget exceed the text (a local
    layer keeps a shorter residual: not int8 there), so each cache must give the full forward
    exactly, distances included."""
    monkeypatch.setitem(model_module.ATTENTION_LAYERS, "alibi", ALiBi)
    m = tiny(attention="alibi", rope=False, **kw)
    idx = text(T=30)
    full, _ = m(idx)
    kv = {"plain": KVOptions(kv_window=0),
          "int8 long residual": KVOptions(kv_window=0, kv_quant="int8", kv_quant_residual=40),
          "evict window large budget": KVOptions(kv_evict="window", kv_budget=40)}[name].check()
    for step in (1, 7):
        torch.testing.assert_close(feed(m, idx, step, kv)[0], full, **TOL)


def test_a_layer_class_reading_key_pos_under_xl_memory(monkeypatch):
    """TransformerXL memory re-bases its keys' positions as it drops the oldest: each batch
    after the first computes what a full forward over the previous batch and itself does (one
    layer: a remembered key depends only on its token, not on what its batch attended to)."""
    from kv.xl import make_xl_memory
    monkeypatch.setitem(model_module.ATTENTION_LAYERS, "alibi", ALiBi)
    m = tiny(attention="alibi", rope=False, n_layer=1)
    batches = [text(T=12, seed=s) for s in (1, 2, 3)]
    memory = make_xl_memory(m, 2, mem_len=12)
    m(batches[0], memory)
    for prev, now in zip(batches, batches[1:]):
        logits, _ = m(now, memory)
        torch.testing.assert_close(logits, m(torch.cat([prev, now], dim=1))[0][:, 12:], **TOL)


def test_a_layer_class_reading_key_pos_trains_through_quantization_aware_caches(monkeypatch):
    """--kv_quant in training passes K/V through the cache's quantizer (kv/qat.py): its stand-in
    cache gives key_pos too, so the layer computes its bias, with the gradient flowing."""
    from kv.qat import make_qat_caches
    monkeypatch.setitem(model_module.ATTENTION_LAYERS, "alibi", ALiBi)
    m = tiny(attention="alibi", rope=False).train()
    logits, _ = m(text(T=16), make_qat_caches(m, "int8"))
    logits.sum().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
