"""
Attention kinds: one function each, picked by name from ATTENTION.

Each takes q (B, nh, T, hs), k and v (B, nkv, S, hs), a mask and the dropout probability,
and returns y (B, nh, T, hs). The mask is None (every key visible), "causal" (square
lower-triangular) or bool (..., T, S), True = may attend: kv.cache.attention_mask makes it.
softmax and naive also take a float mask (..., T, S), added to the scores as SDPA adds it
(-inf = hidden): how a layer class passes a bias such as ALiBi's.

    softmax   PyTorch's fused scaled_dot_product_attention: the reference, and the fastest
    naive     softmax(q k^T / sqrt(hs)) v written out (it can hand back the probabilities)
    linear    a layer of its own (attention_linear.LinearAttention), not a function here
    package.module:function   your own, called with K/V repeated to nh heads and a bool mask;
              checked once at the start on a small input (it must use the mask: the last
              queries alone over all keys must give what they give in a full call)

Keys come in the order the cache holds them, not always the order of their positions (a
kv_window ring wraps around, eviction refills the slots it freed): only the mask says which
keys a query sees, so an attention kind must not read meaning into a key's index (nor can it
see positions: a relative-position bias such as ALiBi needs a layer class, like linear's).

Adding a kind: write the function, add it to ATTENTION (and to the lines naming the kinds:
train.py's `attention` setting, model.py's GPTConfig.attention comment and CausalSelfAttention
docstring, README's --attention line: tests/test_newcomer.py checks --help and the README name
it); tests/test_model.py runs every kind in ATTENTION through its forward and cache checks.
A variant of softmax with another scale is one line (import functools):
    ATTENTION["sharp"] = functools.partial(softmax_attention, scale=2.0)  # 2 / sqrt(hs)
PLAIN_SOFTMAX lists the kinds that compute exactly softmax(q k^T / sqrt(hs)) v: h2o (and a
plug-in eviction rule) and the compiled decode step (kv/static.py) compute the attention of
those kinds their own way, and refuse (h2o) or keep eager (--compile) every other kind. Add a
kind there only if it is that very function: anything else would be silently replaced.
"""

import math

import torch
from torch.nn import functional as F

from plugins import import_function
from devices import no_autocast
from utils import UserError


def expand_kv(k, n_head):
    """Repeat each K/V head for the query heads of its group: (B, nkv, S, hs) -> (B, nh, S, hs)."""
    g = n_head // k.size(1)
    return k if g == 1 else k.repeat_interleave(g, dim=1)


def _mask_for_heads(mask, n_head):
    # a per-KV-head mask (B, nkv, T, S) must line up with the query heads of each group
    if torch.is_tensor(mask) and mask.dim() == 4 and 1 < mask.size(1) < n_head:
        return mask.repeat_interleave(n_head // mask.size(1), dim=1)
    return mask


def materialize_mask(mask, T, S, device):
    """Any mask form as a bool tensor (..., T, S)."""
    if mask is None:
        return torch.ones(T, S, dtype=torch.bool, device=device)
    if isinstance(mask, str):
        return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)
    return mask


def softmax_attention(q, k, v, mask=None, dropout_p=0.0, scale=1.0):
    """The reference: PyTorch's fused scaled_dot_product_attention, softmax(scale q k^T / sqrt(hs)) v."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        # the CPU flash-attention kernel's backward is much slower in bfloat16 than in float32
        # (RESULTS.md): under CPU autocast, attend in float32
        with no_autocast("cpu"):
            mask = mask.float() if torch.is_tensor(mask) and mask.is_floating_point() else mask  # (a bias)
            return softmax_attention(q.float(), k.float(), v.float(), mask, dropout_p, scale).to(q.dtype)
    gqa = k.size(1) != q.size(1)
    s = None if scale == 1.0 else scale / math.sqrt(q.size(-1))  # (None: SDPA's own 1 / sqrt(hs))
    if isinstance(mask, str):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=s, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_mask_for_heads(mask, q.size(1)),
                                          dropout_p=dropout_p, scale=s, enable_gqa=gqa)


def naive_attention(q, k, v, mask=None, dropout_p=0.0, need_weights=False, scale=1.0):
    """softmax(scale q k^T / sqrt(hs)) v written out, so the probabilities can be handed back."""
    nh, T, S = q.size(1), q.size(2), k.size(2)
    k, v = expand_kv(k, nh), expand_kv(v, nh)
    att = (q @ k.transpose(-2, -1)) * (scale / math.sqrt(q.size(-1)))  # (B, nh, T, S)
    if mask is not None:  # None (the decode step): every key is visible, nothing to fill
        mask = _mask_for_heads(materialize_mask(mask, T, S, q.device), nh)
        att = att.float() + mask if mask.is_floating_point() else att.masked_fill(~mask, float("-inf"))  # (a bias)
    att = torch.softmax(att.float(), dim=-1).to(q.dtype)
    y = F.dropout(att, dropout_p) @ v if dropout_p > 0 else att @ v
    return (y, att) if need_weights else y


ATTENTION = {"softmax": softmax_attention, "naive": naive_attention}
PLAIN_SOFTMAX = ("softmax", "naive")  # exactly softmax(q k^T / sqrt(hs)) v: h2o and the compiled step compute it themselves


def resolve_attention(name, layer_kinds=("linear",)):
    """The attention function for a kind name or a user's "package.module:function" (None for a
    name of layer_kinds, model.py's ATTENTION_LAYERS: a layer class of its own, like linear)."""
    if name in ATTENTION or name in layer_kinds:
        return ATTENTION.get(name)
    if ":" not in name:
        raise UserError(f"unknown attention {name!r}: choose one of {sorted(ATTENTION) + sorted(layer_kinds)} "
                        "or give your own as package.module:function")
    if name not in _CHECKED:
        _CHECKED[name] = _check_user_attention(_user_attention(import_function(name, "attention"), name), name)
    return _CHECKED[name]


_CHECKED = {}  # a user's functions, by name, once checked


def _check_user_attention(attend, name):
    """One call on a small input, so that a function that does not use the mask it is given
    (SDPA's is_causal=True, a triangle of its own) is one line at the start, rather than a
    model that trains well and then decodes from its cache something else than it learned."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=g) for _ in range(3))  # (B, nh, T, hs)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    y = attend(q, k, v, causal)
    later_k, later_v = k.clone(), v.clone()
    later_k[:, :, -1] += 1.0
    later_v[:, :, -1] += 1.0
    def same(a, b):  # (nan or inf: the first evaluation says so, naming the plug-in)
        finite = bool(torch.isfinite(a).all() and torch.isfinite(b).all())
        return not finite or torch.allclose(a.float(), b.float(), atol=1e-5)
    if not same(attend(q, later_k, later_v, causal)[:, :, :-1], y[:, :, :-1]):
        raise UserError(f"--attention={name}: an output changed when only a later token's key and value did: use "
                        "the mask you are given (True = may attend), e.g. attn_mask=mask in SDPA")
    if not same(attend(q[:, :, -2:], k, v, causal[-2:]), y[:, :, -2:]):
        raise UserError(f"--attention={name}: the last 2 queries over all 6 keys (T < S, as when decoding from the "
                        "cache) differ from the same queries in a call over all 6: use the mask you are given; "
                        "is_causal=True and a triangle of your own are right only when T = S")
    return attend


def _user_attention(fn, name):
    # a user's function gets the simplest contract: as many K/V heads as query heads
    # and a materialized bool mask broadcastable to (B, nh, T, S) (often just (T, S))
    def attend(q, k, v, mask=None, dropout_p=0.0):
        nh, T, S = q.size(1), q.size(2), k.size(2)
        m = _mask_for_heads(materialize_mask(mask, T, S, q.device), nh)
        y = fn(q, expand_kv(k, nh), expand_kv(v, nh), m, dropout_p)
        if not torch.is_tensor(y) or y.shape != q.shape:  # said here, not as a shape error deep in the model
            raise UserError(f"--attention={name} returned {tuple(y.shape) if torch.is_tensor(y) else type(y).__name__}"
                            f"; it must return a tensor shaped like q, {tuple(q.shape)} (B, nh, T, hs)")
        return y.to(q.dtype)  # (a float64 or float32 result where q is bfloat16 is still an answer)
    return attend
