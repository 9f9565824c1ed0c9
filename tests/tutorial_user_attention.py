"""A user's own attention function, plugged in with --attention=tutorial_user_attention:attend
(the tests check the plug-in point with it). q, k, v: (B, nh, T|S, hs); mask: bool, True = attend."""

def attend(q, k, v, mask, dropout_p):
    att = (q @ k.transpose(-2, -1)) / q.size(-1) ** 0.5
    att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return att @ v


def causal_by_itself(q, k, v, mask, dropout_p):
    """The mistake the start-up check catches: SDPA's own causal flag instead of the mask, right
    in training (T = S) and wrong when decoding from the cache (T < S)."""
    import torch.nn.functional as F
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def in_float64(q, k, v, mask, dropout_p):
    """Right, but computed and returned in float64."""
    return attend(q.double(), k.double(), v.double(), mask, dropout_p)
