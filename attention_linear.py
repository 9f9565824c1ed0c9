"""
Causal linear attention (Katharopoulos et al., arXiv 2006.16236) with a fixed-size state.

softmax(q k^T) is replaced by phi(q) phi(k)^T with phi(x) = elu(x) + 1 > 0, so

    y_t = phi(q_t)^T S_t  (/ phi(q_t)^T z_t with linear_norm="denominator")
    S_t = sum_{s<=t} phi(k_s) v_s^T   (hs x hs per K/V head),   z_t = sum_{s<=t} phi(k_s)

Three forms compute the same y:
  parallel   the T x T masked matrix (memory T^2: the reference),
  chunked    quadratic inside chunks of `chunk` tokens, the state S carried between
             chunks (memory T * chunk + (T / chunk) hs^2: what training uses),
  recurrent  one token at a time, S updated in place (what decoding uses).
The state is all a layer remembers, so its size does not depend on the history length.

RoPE: q and k are rotated by their absolute position *before* phi. The state stays
hs x hs (rotating after phi, or keeping relative positions, would need the history);
the price is that phi(R_p q) . phi(R_s k) is no longer a function of p - s only.
rope=False turns rotation off. linear_norm="layernorm" normalises each head's output
(no learned parameters, so checkpoints keep the tutorial's layout).
"""

import torch
import torch.nn as nn
from torch.nn import functional as F
from rotary_embedding_torch import RotaryEmbedding

from kv.cache import Cache
from rope import apply_rope
from devices import no_autocast

EPS = 1e-6


def phi(x):
    return F.elu(x) + 1


def _group(q, n_kv_head):
    """(B, nh, T, hs) -> (B, nkv, g, T, hs): the query heads that share a K/V head."""
    B, nh, T, hs = q.shape
    return q.view(B, n_kv_head, nh // n_kv_head, T, hs)


def linear_parallel(q, k, v, S0=None, z0=None):
    """Reference form. q (B, nh, T, hs) and k, v (B, nkv, T, hs), already through phi;
    S0 (B, nkv, hs, hs), z0 (B, nkv, hs): the state before this text. Returns numerator
    (B, nh, T, hs) and denominator (B, nh, T, 1)."""
    qg = _group(q, k.size(1))  # (B, nkv, g, T, hs)
    T = q.size(2)
    att = (qg @ k.unsqueeze(2).transpose(-2, -1)) * torch.ones(T, T, device=q.device).tril()  # (B, nkv, g, T, T)
    num, den = att @ v.unsqueeze(2), att.sum(-1, keepdim=True)
    if S0 is not None:
        num = num + qg @ S0.unsqueeze(2)
        den = den + (qg @ z0.unsqueeze(2).unsqueeze(-1))
    return num.flatten(1, 2), den.flatten(1, 2)


def linear_chunked(q, k, v, S0=None, z0=None, chunk=64):
    """Same result as linear_parallel with memory linear in T. Returns num, den, S, z
    (the state after the last token)."""
    B, nh, T, hs = q.shape
    nkv = k.size(1)
    L = min(chunk, T)
    pad = (-T) % L
    if pad:  # zero rows add nothing to the state (phi outputs are only zero here)
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    n = (T + pad) // L
    qc = _group(q, nkv).unflatten(3, (n, L))  # (B, nkv, g, n, L, hs)
    kc, vc = k.unflatten(2, (n, L)), v.unflatten(2, (n, L))  # (B, nkv, n, L, hs)
    kv = kc.transpose(-2, -1) @ vc  # (B, nkv, n, hs, hs): each chunk's contribution to S
    ks = kc.sum(-2)  # (B, nkv, n, hs): each chunk's contribution to z
    S0 = torch.zeros(B, nkv, hs, hs, dtype=q.dtype, device=q.device) if S0 is None else S0
    z0 = torch.zeros(B, nkv, hs, dtype=q.dtype, device=q.device) if z0 is None else z0
    S_before = S0.unsqueeze(2) + kv.cumsum(2) - kv  # state entering each chunk
    z_before = z0.unsqueeze(2) + ks.cumsum(2) - ks
    att = (qc @ kc.unsqueeze(2).transpose(-2, -1)) * torch.ones(L, L, device=q.device).tril()
    num = att @ vc.unsqueeze(2) + qc @ S_before.unsqueeze(2)  # (B, nkv, g, n, L, hs)
    den = att.sum(-1, keepdim=True) + qc @ z_before.unsqueeze(2).unsqueeze(-1)
    num = num.flatten(3, 4)[..., :T, :].flatten(1, 2)
    den = den.flatten(3, 4)[..., :T, :].flatten(1, 2)
    return num, den, S0 + kv.sum(2), z0 + ks.sum(2)


def linear_recurrent(q, k, v, S, z):
    """One token at a time, updating S (B, nkv, hs, hs) and z (B, nkv, hs) in place."""
    nums, dens = [], []
    for t in range(q.size(2)):
        kt, vt = k[:, :, t], v[:, :, t]  # (B, nkv, hs)
        S += kt.unsqueeze(-1) * vt.unsqueeze(-2)
        z += kt
        qt = _group(q[:, :, t:t + 1], k.size(1))  # (B, nkv, g, 1, hs)
        nums.append((qt @ S.unsqueeze(2)).flatten(1, 2))
        dens.append((qt @ z.unsqueeze(2).unsqueeze(-1)).flatten(1, 2))
    return torch.cat(nums, dim=2), torch.cat(dens, dim=2)


def linear_attention(q, k, v, mask, dropout_p=0.0):
    """Linear attention under attention.py's user-attention contract, the parallel form with any
    mask: --attention=attention_linear:linear_attention (the reference of exercise 3).
    q (B, nh, T, hs), k (RoPE applied) and v (B, nh, S, hs), mask bool broadcastable to
    (B, nh, T, S). It runs over the ordinary KV cache; with the causal mask it computes what
    attention="linear" (linear_norm="layernorm") computes. No attention dropout, as there."""
    att = (phi(q.float()) @ phi(k.float()).transpose(-2, -1)) * mask  # (B, nh, T, S), >= 0
    return F.layer_norm(att @ v.float(), (q.size(-1),)).to(q.dtype)


class LinearState(Cache):
    """The fixed-size memory of one linear attention layer: S and z per K/V head (the layer
    reads and writes them itself: a state, not a list of keys, so update() is not used)."""

    state_keys = ("S", "z", "seen")  # what a checkpoint keeps of it as XL memory (kv.xl.memory_state)
    holds_tokens = False  # tokens() is the history it summarises, not tokens it keeps

    def __init__(self, batch_size, n_kv_head, head_dim, dtype=torch.float32, device="cpu"):
        self.S = torch.zeros(batch_size, n_kv_head, head_dim, head_dim, dtype=dtype, device=device)
        self.z = torch.zeros(batch_size, n_kv_head, head_dim, dtype=dtype, device=device)
        self.seen = 0

    def restart(self, rows):
        """Forget the history of rows (B,) that jumped to another place in the text."""
        keep = (~rows).to(self.S.dtype).to(self.S.device)
        self.S = self.S * keep[:, None, None, None]
        self.z = self.z * keep[:, None, None]

    def tokens(self):
        return self.seen  # the history it summarises, whatever its length

    def size_bits(self):
        return (self.S.numel() + self.z.numel()) * self.S.element_size() * 8


class LinearAttention(nn.Module):
    """Same projections and names as CausalSelfAttention (c_attn, c_proj, rotary_emb)."""

    @staticmethod
    def make_state(config, batch_size, dtype, device):
        """The state this layer keeps instead of a KV cache, for the caches (kv/policy.py) and
        the XL memory (kv/xl.py): its sums in the model's dtype (float32 by design)."""
        return LinearState(batch_size, config.kv_heads, config.head_dim, dtype=dtype, device=device)

    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * self.n_kv_head * self.head_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.rotary_emb = RotaryEmbedding(dim=self.head_dim)  # its freqs, as in every layer
        self.resid_dropout = nn.Dropout(config.dropout)
        self.norm = config.linear_norm
        self.chunk = 64  # training's chunk length: memory T * chunk instead of T^2

    def forward(self, x, pos, rot, cache=None, shared=None):
        """x (B, T, C), rot the RoPE table of its positions (or None); cache: a LinearState."""
        B, T, C = x.size()
        qkv = self.c_attn(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh + 2 nkv, T, hs)
        nq = self.n_head + self.n_kv_head
        qk = apply_rope(qkv[:, :nq], rot) if rot is not None else qkv[:, :nq]
        # the sums over the whole history are float32 by design: no autocast in here
        with no_autocast(x.device.type):
            qk = phi(qk.float())
            q, k, v = qk[:, :self.n_head], qk[:, self.n_head:], qkv[:, nq:].float()
            if cache is None:
                num, den, _, _ = linear_chunked(q, k, v, chunk=self.chunk)
            elif T == 1:
                num, den = linear_recurrent(q, k, v, cache.S, cache.z)
            else:
                num, den, S, z = linear_chunked(q, k, v, cache.S, cache.z, chunk=self.chunk)
                cache.S, cache.z = S.detach(), z.detach()  # XL training: no gradient into the past
            if cache is not None:
                cache.seen += T
            if self.norm == "denominator":
                y = num / (den + EPS)
            elif self.norm == "layernorm":
                y = F.layer_norm(num, (self.head_dim,))
            else:
                y = num
        y = y.to(x.dtype).transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y)), None
