"""
Assignment 3: linear attention (Katharopoulos et al., arXiv 2006.16236).

Softmax attention weighs value s for query t by exp(q_t . k_s). Linear attention uses
phi(q_t) . phi(k_s) instead, with phi(x) = elu(x) + 1 (always positive) and no softmax, so

    y_t = sum_{s<=t} (phi(q_t) . phi(k_s)) v_s = phi(q_t)^T S_t,   S_t = sum_{s<=t} phi(k_s) v_s^T

S_t is an hs x hs matrix per head whatever the history's length: a fixed-size state instead of
a KV cache that grows. Without the softmax the outputs' scale wanders, so normalise them:
F.layer_norm over the head dimension (what --attention=linear does), or divide by
phi(q_t) . z_t with z_t = sum_{s<=t} phi(k_s) (the paper's denominator).

Two functions:
  attention       the parallel form, plugged into the model in place of softmax attention:
                      python train.py config/train_shakespeare_char_cpu.py --block_size=32 \
                          --attention=exercises.linear_attention:attention --out_dir=out-linear
                  It runs over the ordinary KV cache when sampling.
  recurrent_step  the same computation one token at a time, carrying only (S, z).
Check both:
    python -m exercises.check linear_attention
"""


def attention(q, k, v, mask, dropout_p):
    """Masked linear attention, the parallel form (attention.py's user-attention contract).

    q        (B, nh, T, hs): queries of the T newest tokens, RoPE already applied.
    k, v     (B, nh, S, hs): keys (RoPE applied) and values of every token they may attend to,
             S >= T (when sampling, S counts the cached tokens too); as many heads as q.
    mask     bool, broadcastable to (B, nh, T, S): True where query t may use key s. Use it as
             given: it is causal, but may also hide keys of a local window or another text.
    dropout_p attention dropout probability while training (0.0 otherwise); you may ignore it.

    Return y (B, nh, T, hs) in q's dtype: for each query, the sum over the keys it may see of
    (phi(q) . phi(k)) v, normalised by F.layer_norm over hs (or by the denominator).

    Hints: no softmax and no 1/sqrt(hs) scale; zero the masked weights (multiply by the mask)
    rather than setting them to -inf; compute in float32 (q.float()) and cast back at the end.
    The gradient must reach q, k and v. The rules the checker applies: exercises/README.md,
    "Assignment 3, rules".
    """
    raise NotImplementedError("assignment 3 (linear attention): implement attention in exercises/linear_attention.py")


def recurrent_step(q, k, v, S, z):
    """Linear attention one token at a time, with a state of fixed size.

    q, k  (B, h, T, hs): queries and keys ALREADY through phi (positive), T tokens in order.
    v     (B, h, T, hs): values.
    S     (B, h, hs, hs): the state sum phi(k_s) v_s^T over every earlier token; update it in
          place (S += ...), it is all the layer keeps between calls.
    z     (B, h, hs): sum phi(k_s) over every earlier token; update it in place too.

    For t = 0..T-1: add token t to S and z, then read it out with query t. Return
    num (B, h, T, hs) = q_t^T S_t and den (B, h, T, 1) = q_t . z_t (S_t, z_t include token t).
    attention() above must then equal layer_norm(num) (or num / den) for the same text.
    Same contract as attention_linear.linear_recurrent, the project's version.

    Hints: k[:, :, t, :, None] * v[:, :, t, None, :] is the outer product; `S += ...` changes
    the caller's tensor, `S = S + ...` does not.
    """
    raise NotImplementedError("assignment 3 (linear attention): implement recurrent_step in exercises/linear_attention.py")
