"""Model-side checks that a mutation audit of model.py, attention.py, attention_linear.py and
kv/ found missing: each test compares against a reference computed independently (attention
and linear attention written out with loops and rotation matrices built by hand, the
eviction rule read literally, a cacheless forward, GPT-2's initialisation), never against
numbers copied from a run."""

import math

import pytest
import torch

from attention import naive_attention, softmax_attention
from conftest import TOL, text, tiny
from kv.evict import EvictKVCache
from kv.qat import FakeQuantCache
from kv.quant import make_formats
from kv.xl import make_xl_memory
from model import GPT, GPTConfig
from tutorial_reference import reference_logits


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- attention --------------------------------------------------------------------------------

@pytest.mark.parametrize("attend", [softmax_attention, naive_attention], ids=["softmax", "naive"])
def test_per_kv_head_mask_reaches_the_query_heads_of_its_group(attend):
    """A mask per KV head (an evicting cache's, fed in chunks) applies to query heads h*g..h*g+g-1."""
    B, nh, nkv, T, S, hs = 2, 4, 2, 5, 9, 8
    q, k, v = rand(B, nh, T, hs, seed=0), rand(B, nkv, S, hs, seed=1), rand(B, nkv, S, hs, seed=2)
    mask = torch.rand(B, nkv, T, S, generator=torch.Generator().manual_seed(3)) < 0.5
    mask[..., 0] = True  # every query sees a key
    ref = torch.empty(B, nh, T, hs)
    for b in range(B):
        for h in range(nh):
            j = h // (nh // nkv)  # the KV head of query head h
            for t in range(T):
                s = (k[b, j] @ q[b, h, t]) / math.sqrt(hs)
                s = s.masked_fill(~mask[b, j, t], float("-inf"))
                ref[b, h, t] = torch.softmax(s, -1) @ v[b, j]
    torch.testing.assert_close(attend(q, k, v, mask), ref, **TOL)


# -- linear attention -------------------------------------------------------------------------

def rotation(freqs, p):
    """The RoPE matrix of position p built by hand: channels (2i, 2i+1) turned by p * freqs[i]."""
    R = torch.zeros(2 * len(freqs), 2 * len(freqs))
    for i, f in enumerate(freqs.tolist()):
        c, s = math.cos(p * f), math.sin(p * f)
        R[2 * i:2 * i + 2, 2 * i:2 * i + 2] = torch.tensor([[c, -s], [s, c]])
    return R


def linear_by_hand(layer, x, pos, norm):
    """Causal linear attention written out: y_t = sum_{s<=t} phi(q_t).phi(k_s) v_s per query head,
    phi = elu + 1, q and k rotated before phi, query head h reading KV head h // g."""
    B, T, C = x.shape
    nh, nkv, hs = layer.n_head, layer.n_kv_head, layer.head_dim
    qkv = layer.c_attn(x)
    q = qkv[..., :C].view(B, T, nh, hs)
    k = qkv[..., C:C + nkv * hs].view(B, T, nkv, hs)
    v = qkv[..., C + nkv * hs:].view(B, T, nkv, hs)
    R = torch.stack([rotation(layer.rotary_emb.freqs, p) for p in pos.tolist()])  # (T, hs, hs)
    rot = lambda a: torch.einsum("tij,btnj->btni", R, a)
    phi = lambda a: torch.where(a > 0, a + 1, torch.exp(a))
    q, k = phi(rot(q)), phi(rot(k))
    y = torch.zeros(B, T, nh, hs)
    for h in range(nh):
        j = h // (nh // nkv)
        for t in range(T):
            w = (k[:, :t + 1, j] * q[:, t:t + 1, h]).sum(-1)  # (B, t+1): phi(q_t) . phi(k_s)
            num = (w[..., None] * v[:, :t + 1, j]).sum(1)
            if norm == "denominator":
                num = num / (w.sum(1, keepdim=True) + 1e-6)
            elif norm == "layernorm":
                num = (num - num.mean(-1, keepdim=True)) / torch.sqrt(num.var(-1, unbiased=False, keepdim=True) + 1e-5)
            y[:, t, h] = num
    return layer.c_proj(y.reshape(B, T, C))


@pytest.mark.parametrize("norm", ["layernorm", "denominator", "none"])
def test_linear_layer_equals_linear_attention_written_out(norm):
    """attention=linear computes phi(q).phi(k) v with elu+1, RoPE on q and k (not v), GQA and its norm."""
    m = tiny(attention="linear", n_kv_head=2, bias=True, linear_norm=norm)
    layer = m.transformer.h[0].attn
    layer.chunk = 8  # several chunks: the state is carried from one to the next
    x, pos = rand(2, 21, 32, seed=0), torch.arange(3, 24)
    with torch.no_grad():
        got, _ = layer(x, pos, m._rope(3, 21))
        ref = linear_by_hand(layer, x, pos, norm)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


# -- eviction ---------------------------------------------------------------------------------

def test_h2o_evicts_the_unattended_token_right_after_the_sinks():
    """kv_sink=2 protects positions 0 and 1 only: position 2, never attended, is the first evicted."""
    cache = EvictKVCache("h2o", budget=6, batch_size=1, n_kv_head=1, head_dim=4, keep_recent=2, keep_sink=2)
    for t in range(7):
        k = torch.zeros(1, 1, 1, 4)
        k[..., 0] = t  # channel 0 carries the position: the keys returned say what is held
        keys, _, _ = cache.update(k, torch.zeros(1, 1, 1, 4))
        held = keys[0, 0, :, 0].round().long()
        att = (held != 2).float()  # uniform over every held key but position 2
        cache.observe((att / att.sum()).view(1, 1, 1, -1))
    # the rule read literally: before the 7th token, 6 held > budget - 1; sinks 0, 1 and the
    # recent 5, 6 (kv_recent counts the step's own token) stay; of 2, 3, 4 the least attended goes
    assert sorted(held.tolist()) == [0, 1, 3, 4, 5, 6]


# -- quantization-aware training -------------------------------------------------------------

def test_straight_through_gradient_with_an_incomplete_last_group():
    """QAT's gradient is the identity for every token, those of an incomplete last group (kept as is) too."""
    fq = FakeQuantCache(*make_formats("int4", 8, 16, True))
    k, v = rand(1, 2, 20, 16, seed=0).requires_grad_(), rand(1, 2, 20, 16, seed=1).requires_grad_()
    k2, v2, _ = fq.update(k, v)
    w = rand(1, 2, 20, 16, seed=2)
    ((k2 * w).sum() + (v2 * w).sum()).backward()
    plain_k, plain_v = k.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
    ((plain_k * w).sum() + (plain_v * w).sum()).backward()  # the identity's gradient, by autograd
    assert torch.equal(k.grad, plain_k.grad) and torch.equal(v.grad, plain_v.grad)


# -- the GPT ----------------------------------------------------------------------------------

def test_trained_layernorms_and_biases_match_the_tutorial_forward():
    """ln_1 before attention, ln_2 before the MLP, every bias used: checked with non-identity LayerNorms."""
    m = tiny(bias=True, n_layer=3)
    with torch.no_grad():
        for i, (name, p) in enumerate(m.named_parameters()):
            if name.endswith("bias") or ".ln_" in name:  # at init a LayerNorm is the identity
                p.add_(rand(*p.shape, seed=i) * 0.5)
    idx = text(T=24)
    ref = reference_logits({k: v.clone() for k, v in m.state_dict().items()}, 3, 4, idx)
    torch.testing.assert_close(m(idx)[0], ref, **TOL)


def test_output_matrix_is_the_embedding():
    """Weight tying: the logits are the final hidden state times the token embedding matrix."""
    m = tiny()
    seen = []
    m.lm_head.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    logits, _ = m(text(T=10))
    torch.testing.assert_close(logits, seen[0] @ m.transformer.wte.weight.T, **TOL)


def test_initial_weights_follow_gpt2():
    """Init: N(0, 0.02) weights, N(0, 0.02/sqrt(2 n_layer)) residual projections, zero biases, unit LayerNorms."""
    torch.manual_seed(0)
    L = 4
    m = GPT(GPTConfig(n_layer=L, n_head=4, n_embd=128, bias=True))
    for name, p in m.named_parameters():
        if "rotary_emb" in name:
            continue
        if name.endswith("c_proj.weight"):
            want = 0.02 / math.sqrt(2 * L)
        elif p.dim() == 2:
            want = 0.02
        elif "ln_" in name and name.endswith("weight"):
            assert torch.equal(p, torch.ones_like(p)), name
            continue
        else:  # a bias
            assert torch.equal(p, torch.zeros_like(p)), name
            continue
        assert abs(p.std().item() / want - 1) < 0.05 and abs(p.mean().item()) < want / 20, name


def test_dropout_is_off_in_eval():
    """A model with dropout=0.5 in eval mode computes what the same weights without dropout do."""
    idx = text(T=20)
    a, b = tiny(dropout=0.5), tiny()  # the same weights (tiny seeds them)
    torch.testing.assert_close(a(idx)[0], b(idx)[0], **TOL)


def test_dropout_one_drops_every_branch_in_training():
    """dropout=1 in training drops the embedding and every attention and MLP output: a zero stream."""
    m = tiny(bias=True, dropout=1.0).train()
    with torch.no_grad():
        for i, (name, p) in enumerate(m.named_parameters()):
            if name.endswith("bias"):  # nonzero, so that a branch not dropped adds something
                p.copy_(rand(*p.shape, seed=i))
        logits, _ = m(text(T=12))
        ref = m.lm_head(m.transformer.ln_f(torch.zeros(32)))
    torch.testing.assert_close(logits, ref.expand_as(logits), **TOL)


def test_hybrid_xl_places_the_batch_right_after_the_softmax_memory():
    """XL with a linear layer beside softmax ones: the softmax layers' queries sit right after their
    memory (not at the linear state's longer count), as a cacheless forward over memory + batch."""
    m = tiny(attention="linear", linear_layers="0")
    with torch.no_grad():
        m.transformer.h[0].attn.c_proj.weight.zero_()  # the linear layer adds nothing: a softmax model
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 256, (2, 8), generator=g) for _ in range(3)]
    memory = make_xl_memory(m, 2, mem_len=12)
    for x in batches:
        logits, _ = m(x, memory)
    ref, _ = m(torch.cat(batches, dim=1)[:, 4:])  # memory = bytes 4..15, batch = 16..23
    torch.testing.assert_close(logits, ref[:, -8:], **TOL)
