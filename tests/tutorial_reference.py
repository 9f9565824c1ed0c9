"""An independent, deliberately plain forward pass with the tutorial's semantics: keys are
cached unrotated, the cache grows by concatenation (and, with kv_window, is cut to its
last N tokens), and every call rotates the whole cache again (positions 0..S-1 for keys,
S-T..S-1 for the queries) with rotary_embedding_torch, under a lower-right causal mask.

The tests compare model.py against it; bench.py times it as the slow baseline."""

import torch
from torch.nn import functional as F
from rotary_embedding_torch import RotaryEmbedding


class TutorialReference:
    """Plain MHA from a state dict `sd`; call it on consecutive chunks of one text."""

    def __init__(self, sd, n_layer, n_head, kv_window=0):
        self.sd, self.n_layer, self.n_head, self.kv_window = sd, n_layer, n_head, kv_window
        self.C = sd["transformer.wte.weight"].size(1)
        self.rot = RotaryEmbedding(dim=self.C // n_head).to(sd["transformer.wte.weight"].device)
        self.caches = [None] * n_layer

    def _ln(self, x, name):
        return F.layer_norm(x, (self.C,), self.sd[name + ".weight"], self.sd.get(name + ".bias"))

    def _lin(self, x, name):
        return F.linear(x, self.sd[name + ".weight"], self.sd.get(name + ".bias"))

    @torch.no_grad()
    def __call__(self, piece):
        sd, C, nh = self.sd, self.C, self.n_head
        B, T = piece.shape
        x = sd["transformer.wte.weight"][piece]
        for i in range(self.n_layer):
            p = f"transformer.h.{i}."
            self.rot.freqs.data.copy_(sd[p + "attn.rotary_emb.freqs"])
            q, k, v = self._lin(self._ln(x, p + "ln_1"), p + "attn.c_attn").split(C, dim=2)
            q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k, v))
            if self.caches[i] is not None:
                k = torch.cat([self.caches[i][0], k], dim=2)
                v = torch.cat([self.caches[i][1], v], dim=2)
            if self.kv_window:
                k, v = k[:, :, -max(self.kv_window, T):], v[:, :, -max(self.kv_window, T):]
            self.caches[i] = (k, v)
            qr, kr = self.rot.rotate_queries_with_cached_keys(q, k)
            S = kr.size(2)
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
            y = F.scaled_dot_product_attention(qr, kr, v, attn_mask=mask)
            x = x + self._lin(y.transpose(1, 2).reshape(B, T, C), p + "attn.c_proj")
            x = x + self._lin(F.gelu(self._lin(self._ln(x, p + "ln_2"), p + "mlp.c_fc")), p + "mlp.c_proj")
        return F.linear(self._ln(x, "transformer.ln_f"), sd["lm_head.weight"])


def reference_logits(sd, n_layer, n_head, idx, chunks=None):
    """Logits of a plain MHA state dict `sd` on idx (B, T), fed in `chunks` (default: whole)."""
    ref = TutorialReference(sd, n_layer, n_head)
    return torch.cat([ref(piece) for piece in (chunks or [idx])], dim=1)
