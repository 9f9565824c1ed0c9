"""
RoPE, shared by every attention kind.

The frequencies are rotary_embedding_torch's (kept as attn.rotary_emb.freqs, as in the
tutorial's checkpoints) and so is the rotation: channels (2i, 2i+1) form a pair turned
by the angle pos * freqs[i]. A pair is a complex number, so the turn is one complex
multiplication by e^(i angle), the cheapest form for the decode step.
"""

import torch


def rope_table(freqs, pos):
    """e^(i pos*freqs): complex (T, hs/2) for absolute positions pos (T,)."""
    ang = pos.to(freqs.dtype)[:, None] * freqs[None, :]
    return torch.polar(torch.ones_like(ang), ang)


def apply_rope(x, rot):
    """Rotate x (B, h, T, hs) by the table rot (T, hs/2) of its positions."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * rot).flatten(-2).to(x.dtype)
