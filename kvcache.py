"""
The KV cache: what a softmax attention layer remembers of the text it has read.

One cache object serves one layer (or one group of layers that share K/V) for B
sequences. `update(k, v)` stores the keys/values of the T newest tokens and returns
what the new queries attend over, with the mask that says which query sees which key.
Every other cache (quantized, evicting, ...) implements the same two methods,
`update` and `size_bits`, so the model never needs to know which one it talks to.

Keys are cached *after* RoPE rotation, each at the absolute position of its token in
the text. RoPE makes q_i . k_j depend only on i - j, so a key rotated once stays right
whatever is later dropped from the cache, and a decode step rotates one query and one
key instead of re-rotating the whole history (the tutorial's way, O(history) per step).

Which keys a query at position p may see is one rule, `visible()`:
  kpos <= p  and  (p - kpos < recent  or  kpos < sink)       (recent = 0: no bound)
`recent` is the layer's local window or sample.py's --kv_window, whichever binds, and
`sink` the --kv_sink first tokens (StreamingLLM). The same rule builds the training
mask, so chunked, token-by-token and full-sequence feeding all compute the same thing.
"""

import torch


def visible(qpos, kpos, recent=0, sink=0):
    """Bool mask (..., T, S): may the query at qpos[t] attend to the key at kpos[..., s]?"""
    d = qpos.view(-1, 1) - kpos.unsqueeze(-2)  # (..., T, S) distance in the text
    ok = d >= 0
    if recent > 0:
        near = d < recent
        if sink > 0:
            near = near | (kpos.unsqueeze(-2) < sink)
        ok = ok & near
    return ok


class KVCache:
    """Full-precision keys and values, written in place into buffers allocated once.

    recent = 0 keeps everything (the tutorial's unbounded cache); its buffer is sized by
    `capacity` and doubles only if a caller feeds more than it announced. recent = N keeps
    the first `sink` tokens and a ring of the last N: capacity sink + N, nothing moves.
    """

    def __init__(self, batch_size, n_kv_head, head_dim, recent=0, sink=0, capacity=256,
                 dtype=torch.float32, device="cpu"):
        self.recent, self.sink = recent, (sink if recent > 0 else 0)
        cap = self.sink + recent if recent > 0 else max(int(capacity), 1)
        self.k = torch.zeros(batch_size, n_kv_head, cap, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.zeros(cap, dtype=torch.long, device=device)  # absolute position of each slot
        self.n = 0     # slots in use
        self.seen = 0  # tokens fed so far = absolute position of the next token

    @property
    def capacity(self):
        return self.k.size(2)

    def _slots(self, p):
        """Slot of each absolute position p (a tensor): sinks first, then a ring."""
        if self.recent == 0:
            return p
        return torch.where(p < self.sink, p, self.sink + (p - self.sink) % self.recent)

    def _write(self, k, v, p):
        s = self._slots(p)
        self.k.index_copy_(2, s, k)
        self.v.index_copy_(2, s, v)
        self.pos.index_copy_(0, s, p)

    def update(self, k, v):
        """Store k, v (B, nkv, T, hs) of the next T tokens; return (keys, values, mask) to
        attend over: keys/values (B, nkv, S, hs) and a mask: None (all visible), "causal"
        (square lower-triangular, SDPA's is_causal fast path) or a bool tensor (T, S)."""
        T = k.size(2)
        p0 = self.seen
        self.seen += T
        if self.recent == 0 and self.n + T > self.capacity:
            self._grow(self.n + T)
        if T == 1:
            # the decode step: the new token takes a free slot, or the slot of the one key
            # it can no longer see; then the cache holds exactly what its query may see
            s = p0 if self.recent == 0 or p0 < self.sink else self.sink + (p0 - self.sink) % self.recent
            self.k[:, :, s] = k[:, :, 0]
            self.v[:, :, s] = v[:, :, 0]
            self.pos[s] = p0
            self.n = min(self.n + 1, self.capacity)
            return self.k[:, :, :self.n], self.v[:, :, :self.n], None
        qpos = torch.arange(p0, p0 + T, device=self.pos.device)
        if self.n + T <= self.capacity:
            fresh = self.n == 0
            self._write(k, v, qpos)
            self.n += T
            if fresh and (self.recent == 0 or self.recent >= T):
                mask = "causal"
            else:
                mask = visible(qpos, self.pos[:self.n], self.recent, self.sink)
            return self.k[:, :, :self.n], self.v[:, :, :self.n], mask
        # a chunk larger than the free space: the queries need keys the chunk overwrites,
        # so attend over old + new, then keep only what the policy keeps
        keys = torch.cat([self.k[:, :, :self.n], k], dim=2)
        vals = torch.cat([self.v[:, :, :self.n], v], dim=2)
        kpos = torch.cat([self.pos[:self.n], qpos])
        keep = (qpos < self.sink) | (qpos >= self.seen - self.recent)
        self._write(k[:, :, keep], v[:, :, keep], qpos[keep])
        self.n = self.capacity
        return keys, vals, visible(qpos, kpos, self.recent, self.sink)

    def _grow(self, need):
        cap = max(need, 2 * self.capacity)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(old.size(0), old.size(1), cap, old.size(3))
            new[:, :, :self.n] = old[:, :, :self.n]
            setattr(self, name, new)
        pos = self.pos.new_zeros(cap)
        pos[:self.n] = self.pos[:self.n]
        self.pos = pos

    def tokens(self):
        """How many tokens of the text this cache holds (per sequence)."""
        return self.n

    def size_bits(self):
        """Bits of key/value payload held: B x nkv x tokens x hs x 2 tensors x dtype bits.
        (Slot positions are bookkeeping shared by the batch and derivable; not counted.)"""
        B, H, _, D = self.k.shape
        return 2 * B * H * self.n * D * self.k.element_size() * 8


class XLMemory:
    """TransformerXL-style memory for training: the keys/values of the previous steps'
    batches (the same loader rows, which continue the same text), detached so that no
    gradient flows into them, at most `mem_len` tokens.

    Each step the batch is placed right after the memory: memory at positions
    0..m-1, batch at m..m+T-1 (so `seen` = m). Stored keys are rotated, so keeping the
    last mem_len of them re-bases their positions with one rotation by -(m + T - mem_len):
    positions stay small however long training runs (float32 angles would lose precision
    at millions of tokens). Rows that the loader restarted lose their memory
    (`restart(rows)`), so no row attends to another stretch of text."""

    def __init__(self, batch_size, n_kv_head, head_dim, mem_len, window=0, rope_fn=None,
                 dtype=torch.float32, device="cpu", **unused):
        self.mem_len, self.window, self.rope_fn = mem_len, window, rope_fn
        self.k = torch.zeros(batch_size, n_kv_head, 0, head_dim, dtype=dtype, device=device)
        self.v = self.k
        self.valid = torch.ones(batch_size, 0, dtype=torch.bool, device=device)  # (B, m) per slot

    @property
    def seen(self):
        return self.k.size(2)

    def restart(self, rows):
        """rows: bool (B,), True where the loader jumped to another place in the text."""
        self.valid = self.valid & ~rows.to(self.valid.device)[:, None]

    def update(self, k, v):
        m, T = self.k.size(2), k.size(2)
        keys, vals = (torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)) if m else (k, v)
        pos = torch.arange(m + T, device=k.device)
        mask = visible(pos[m:], pos, self.window)  # (T, m + T)
        ok = torch.cat([self.valid, self.valid.new_ones(self.valid.size(0), T)], dim=1)  # (B, m + T)
        if m > 0:
            mask = mask & ok[:, None, None, :]  # (B, 1, T, m + T): no memory of another text
        elif self.window == 0 or self.window >= T:
            mask = "causal"
        # keep the newest mem_len tokens, detached, re-based to positions 0..kept-1
        keep = min(self.mem_len, m + T)
        shift = m + T - keep
        new_k, new_v = keys[:, :, shift:].detach(), vals[:, :, shift:].detach()
        if shift and self.rope_fn is not None:
            new_k = self.rope_fn(new_k, -shift)
        self.k, self.v, self.valid = new_k, new_v, ok[:, shift:]
        return keys, vals, mask

    def tokens(self):
        return self.k.size(2)

    def size_bits(self):
        return 2 * self.k.numel() * self.k.element_size() * 8
