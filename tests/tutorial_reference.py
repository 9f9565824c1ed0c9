"""An independent, deliberately plain forward pass with the tutorial's semantics, used as
the reference the tests compare model.py against: keys are cached unrotated, the cache
grows by concatenation, and every call rotates the whole cache again (positions 0..S-1
for keys, S-T..S-1 for the queries) with rotary_embedding_torch, then attends under a
lower-right causal mask."""

import torch
from torch.nn import functional as F
from rotary_embedding_torch import RotaryEmbedding


def reference_logits(sd, n_layer, n_head, idx, chunks=None, bias=False):
    """Logits of a plain MHA checkpoint state dict `sd` on idx (B, T), fed in `chunks`."""
    C = sd["transformer.wte.weight"].size(1)
    hs = C // n_head
    rot = RotaryEmbedding(dim=hs)
    B = idx.size(0)

    def ln(x, name):
        return F.layer_norm(x, (C,), sd[name + ".weight"], sd.get(name + ".bias"))

    def lin(x, name):
        return F.linear(x, sd[name + ".weight"], sd.get(name + ".bias"))

    caches = [None] * n_layer
    out = []
    for piece in (chunks or [idx]):
        x = sd["transformer.wte.weight"][piece]
        T = piece.size(1)
        for i in range(n_layer):
            p = f"transformer.h.{i}."
            rot.freqs.data.copy_(sd[p + "attn.rotary_emb.freqs"])
            q, k, v = lin(ln(x, p + "ln_1"), p + "attn.c_attn").split(C, dim=2)
            q, k, v = (t.view(B, T, n_head, hs).transpose(1, 2) for t in (q, k, v))
            if caches[i] is not None:
                k = torch.cat([caches[i][0], k], dim=2)
                v = torch.cat([caches[i][1], v], dim=2)
            caches[i] = (k, v)
            qr, kr = rot.rotate_queries_with_cached_keys(q, k)
            S = kr.size(2)
            mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)
            y = F.scaled_dot_product_attention(qr, kr, v, attn_mask=mask)
            x = x + lin(y.transpose(1, 2).reshape(B, T, C), p + "attn.c_proj")
            h = F.gelu(lin(ln(x, p + "ln_2"), p + "mlp.c_fc"))
            x = x + lin(h, p + "mlp.c_proj")
        out.append(F.linear(ln(x, "transformer.ln_f"), sd["lm_head.weight"]))
    return torch.cat(out, dim=1)
