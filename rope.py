"""
RoPE, shared by every attention kind.

The frequencies are rotary_embedding_torch's (kept as attn.rotary_emb.freqs, as in the
tutorial's checkpoints) and so is the rotation: channels (2i, 2i+1) form a pair turned
by the angle pos * freqs[i]. A pair is a complex number, so in eager mode the turn is one
complex multiplication by e^(i angle), the cheapest form for the decode step. Under
torch.compile the same products are written out with cos and sin: inductor generates no
code for complex numbers and would fall back to eager kernels, splitting its fusions.
"""

import torch


def rope_table(freqs, pos):
    """(cos, sin) of pos*freqs: float (T, hs/2, 2) for absolute positions pos (T,); the last
    dimension read as one complex number is e^(i pos*freqs)."""
    ang = pos.to(freqs.dtype)[:, None] * freqs[None, :]
    return torch.stack((ang.cos(), ang.sin()), dim=-1)


def apply_rope(x, rot):
    """Rotate x (B, h, T, hs) by the table rot (T, hs/2, 2) of its positions."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, h, T, hs/2, 2)
    if torch.compiler.is_compiling():
        x0, x1 = pairs.unbind(-1)
        cos, sin = rot.unbind(-1)
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    else:
        out = torch.view_as_real(torch.view_as_complex(pairs) * torch.view_as_complex(rot))
    return out.flatten(-2).to(x.dtype)
