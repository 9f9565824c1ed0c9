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
        """Slot of each absolute position p (a tensor) of a bounded cache: sinks first, then a ring."""
        return torch.where(p < self.sink, p, self.sink + (p - self.sink) % self.recent)

    def _write(self, k, v, p):
        if self.recent == 0:  # unbounded: slot = position, so a slice copy (faster than index_copy_)
            end = self.n + k.size(2)
            self.k[:, :, self.n:end] = k
            self.v[:, :, self.n:end] = v
            self.pos[self.n:end] = p
            return
        s = self._slots(p)
        self.k.index_copy_(2, s, k.to(self.k.dtype))
        self.v.index_copy_(2, s, v.to(self.v.dtype))
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


def keep_recent(k, v, pos, kv_window, kv_sink=0):
    """The bounded-history rule as a plain function (what TrimCache calls; exercise 1):
    k, v (B, nkv, S, hs) and their text positions pos (S,), oldest first, newest last.
    Keep the last kv_window tokens and the first kv_sink of the text; return (k, v, pos)."""
    keep = (pos >= pos[-1] - kv_window + 1) | (pos < kv_sink)
    return k[:, :, keep], v[:, :, keep], pos[keep]


class TrimCache:
    """A bounded cache written the simple way: append by concatenation, then ask a
    function (keep_recent, or a user's "module:function" with its signature) which tokens
    stay. Slower than KVCache's ring buffer; sample.py --kv_trim=... selects it."""

    def __init__(self, batch_size, n_kv_head, head_dim, recent=0, sink=0, trim_fn=keep_recent,
                 dtype=torch.float32, device="cpu", **unused):
        self.recent, self.sink, self.trim_fn = recent, sink, trim_fn
        self.k = torch.zeros(batch_size, n_kv_head, 0, head_dim, dtype=dtype, device=device)
        self.v = self.k
        self.pos = torch.zeros(0, dtype=torch.long, device=device)
        self.seen = 0

    def update(self, k, v):
        T = k.size(2)
        qpos = torch.arange(self.seen, self.seen + T, device=self.pos.device)
        self.seen += T
        keys, vals, kpos = torch.cat([self.k, k], 2), torch.cat([self.v, v], 2), torch.cat([self.pos, qpos])
        if self.recent:
            self.k, self.v, self.pos = self.trim_fn(keys, vals, kpos, self.recent, self.sink)
        else:
            self.k, self.v, self.pos = keys, vals, kpos
        if T == 1:  # the decode step attends over exactly what is kept
            return self.k, self.v, None
        return keys, vals, visible(qpos, kpos, self.recent, self.sink)

    def tokens(self):
        return self.k.size(2)

    def size_bits(self):
        return 2 * self.k.numel() * self.k.element_size() * 8


def xl_step(mem_k, mem_v, mem_ok, k, v, mem_len):
    """One TransformerXL memory step as a plain function (what XLMemory calls; exercise 2).
    mem_k, mem_v (B, nkv, m, hs): K/V kept from earlier batches; mem_ok (B, m): False where
    the row has since restarted; k, v (B, nkv, T, hs): this batch. Returns
    keys, values (B, nkv, m+T, hs) to attend over, key_ok (B, m+T), and the new memory:
    the last min(mem_len, m+T) of them, detached (no gradient into the past), with its ok."""
    keys, vals = torch.cat([mem_k, k], dim=2), torch.cat([mem_v, v], dim=2)
    key_ok = torch.cat([mem_ok, mem_ok.new_ones(mem_ok.size(0), k.size(2))], dim=1)
    cut = keys.size(2) - min(mem_len, keys.size(2))
    return keys, vals, key_ok, keys[:, :, cut:].detach(), vals[:, :, cut:].detach(), key_ok[:, cut:]


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
                 step_fn=xl_step, dtype=torch.float32, device="cpu", **unused):
        self.mem_len, self.window, self.rope_fn, self.step_fn = mem_len, window, rope_fn, step_fn
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
        if m == 0:  # nothing to remember yet (and the batch may be in another dtype)
            self.k, self.v = self.k.to(k.dtype), self.v.to(v.dtype)
        keys, vals, key_ok, new_k, new_v, self.valid = self.step_fn(self.k, self.v, self.valid, k, v, self.mem_len)
        pos = torch.arange(m + T, device=k.device)
        mask = visible(pos[m:], pos, self.window)  # (T, m + T)
        if m > 0:
            mask = mask & key_ok[:, None, None, :]  # (B, 1, T, m + T): no memory of another text
        elif self.window == 0 or self.window >= T:
            mask = "causal"
        shift = m + T - new_k.size(2)  # re-base the kept keys to positions 0..kept-1
        if shift and self.rope_fn is not None:
            new_k = self.rope_fn(new_k, -shift)
        self.k, self.v = new_k, new_v
        return keys, vals, mask

    def tokens(self):
        return self.k.size(2)

    def size_bits(self):
        return 2 * self.k.numel() * self.k.element_size() * 8
