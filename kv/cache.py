"""
The KV cache: what a softmax attention layer remembers of the text it has read.

One cache object serves one layer (or one kv_share group of layers) for B sequences, and
every cache kind (plain, ring buffer, quantized, evicting, XL memory, linear state) speaks
the same protocol, `Cache`, so an attention layer never needs to know which one it has:

    k, v, mask = cache.update(k, v)                  # store the T newest tokens' K/V
    y = cache.attend(attend_fn, q, k, v, mask, p)    # attend over what update returned
    cache.size_bits(), cache.tokens(), cache.seen    # what is held, and how far the text got

`update` returns the keys and values (B, nkv, S, hs) the new queries attend over and a mask
in the cheapest form the attention functions take: None (every key visible), "causal" (square
lower-triangular, SDPA's fast path) or bool (..., T, S), True = may attend. After it,
`cache.key_pos` holds those keys' positions in the text: (S,), or (B, nkv, S) where rows and
heads hold different tokens (eviction), for a layer that needs distances (a bias like ALiBi's). `attend` runs the
layer's attention function; a cache that needs the attention probabilities (eviction by
score) overrides it, so the layer never has to ask.

Keys are cached *after* RoPE rotation, each at the absolute position of its token in the
text. RoPE makes q_i . k_j depend only on i - j, so a key rotated once stays right whatever
is later dropped from the cache, and a decode step rotates one query and one key instead of
re-rotating the whole history (the tutorial's way, O(history) per step).

Which keys a query at position p may see is one rule, `visible()`:
  kpos <= p  and  (p - kpos < window  or  kpos < sink)       (window = 0: no bound)
A window of N is N tokens, the query's own included. `window` is the layer's local window or
the scripts' --kv_window, whichever binds, and `sink` the --kv_sink first tokens
(StreamingLLM). The same rule builds the training mask (`attention_mask`), so chunked,
token-by-token and full-sequence feeding all compute the same thing.
"""

import torch

from utils import UserError


def visible(qpos, kpos, window=0, sink=0):
    """Bool mask (..., T, S): may the query at qpos[t] attend to the key at kpos[..., s]?"""
    d = qpos.view(-1, 1) - kpos.unsqueeze(-2)  # (..., T, S) distance in the text
    ok = d >= 0
    if window > 0:
        near = d < window
        if sink > 0:
            near = near | (kpos.unsqueeze(-2) < sink)
        ok = ok & near
    return ok


def attention_mask(qpos, kpos, window=0, sink=0, held_in_sight=False):
    """visible() in its cheapest form: "causal" when the keys are the queries themselves and
    the window covers them all; None for one query over keys it all sees (window 0, or a
    cache that holds only keys in sight: held_in_sight); else the bool tensor."""
    T, S = qpos.numel(), kpos.size(-1)
    if T == 1 and (window == 0 or held_in_sight):
        return None
    if S == T and T > 1 and (window == 0 or window >= T):
        return "causal"
    return visible(qpos, kpos, window, sink)


class Cache:
    """The protocol every cache follows (see the module docstring)."""
    seen = 0  # tokens fed so far = the absolute position of the next token
    holds_tokens = True  # False for a fixed-size state (linear attention): "bits per cached token" skips it
    key_pos = None  # after update: the text positions (S,) or (B, nkv, S) of the keys it returned

    def update(self, k, v):
        """Store k, v (B, nkv, T, hs) of the next T tokens; return (keys, values, mask)."""
        raise NotImplementedError

    def attend(self, fn, q, k, v, mask, dropout_p=0.0):
        """Run the layer's attention function over what update returned."""
        return fn(q, k, v, mask, dropout_p)

    def tokens(self):
        """How many tokens of the text this cache holds (per sequence)."""
        raise NotImplementedError

    def size_bits(self):
        """Bits of key/value data held (positions are bookkeeping, not counted)."""
        raise NotImplementedError


class KVCache(Cache):
    """Full-precision keys and values, written in place into buffers allocated once.

    window = 0 keeps everything (the tutorial's unbounded cache); its buffer is sized by
    `capacity` and doubles only if a caller feeds more than it announced. window = N keeps
    the first `sink` tokens and a ring of the last N: capacity sink + N, nothing moves (a
    window longer than the text announced starts at `capacity` and grows up to sink + N:
    until the ring wraps, a token's slot is its position either way).
    dtype is the width K/V are stored at (and counted at by size_bits); update() hands them
    back in the dtype they came in, so a 16-bit cache can serve a float32 model.
    """

    def __init__(self, batch_size, n_kv_head, head_dim, window=0, sink=0, capacity=256,
                 dtype=torch.float32, device="cpu"):
        self.window, self.sink = window, (sink if window > 0 else 0)
        self.ring = self.sink + window if window > 0 else 0  # the most slots it ever holds (0: no bound)
        cap = min(self.ring, max(int(capacity), 1)) if window > 0 else max(int(capacity), 1)
        self.k = torch.zeros(batch_size, n_kv_head, cap, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.zeros(cap, dtype=torch.long, device=device)  # absolute position of each slot
        self.n = 0  # slots in use
        self.seen = 0
        self.overflow_pos = None  # the key positions of an update that returned more keys than slots

    @property
    def capacity(self):
        return self.k.size(2)

    @property
    def key_pos(self):
        return self.pos[:self.n] if self.overflow_pos is None else self.overflow_pos

    def _write(self, k, v, p):
        if self.window == 0:  # unbounded: slot = position, so a slice copy (faster than index_copy_)
            end = self.n + k.size(2)
            self.k[:, :, self.n:end] = k
            self.v[:, :, self.n:end] = v
            self.pos[self.n:end] = p
            return
        s = torch.where(p < self.sink, p, self.sink + (p - self.sink) % self.window)  # sinks, then a ring
        self.k.index_copy_(2, s, k.to(self.k.dtype))
        self.v.index_copy_(2, s, v.to(self.v.dtype))
        self.pos.index_copy_(0, s, p)

    def update(self, k, v):
        T, out = k.size(2), k.dtype
        # stored at the cache's dtype and read back in the compute dtype: every query sees
        # the stored values, its own chunk's keys included, whatever the chunk size
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        p0 = self.seen
        self.seen += T
        self.overflow_pos = None
        if self.n + T > self.capacity and (self.window == 0 or self.capacity < self.ring):
            self._grow(self.n + T)
        if T == 1:
            # the decode step: the new token takes a free slot, or the slot of the one key
            # it can no longer see; then the cache holds exactly what its query may see
            s = p0 if self.window == 0 or p0 < self.sink else self.sink + (p0 - self.sink) % self.window
            self.k[:, :, s] = k[:, :, 0]
            self.v[:, :, s] = v[:, :, 0]
            self.pos[s] = p0
            self.n = min(self.n + 1, self.capacity)
            return self.k[:, :, :self.n].to(out), self.v[:, :, :self.n].to(out), None
        qpos = torch.arange(p0, p0 + T, device=self.pos.device)
        if self.n + T <= self.capacity:
            self._write(k, v, qpos)
            self.n += T
            kpos = self.pos[:self.n]
            mask = attention_mask(qpos, kpos, self.window, self.sink)
            return self.k[:, :, :self.n].to(out), self.v[:, :, :self.n].to(out), mask
        # a chunk larger than the free space: the queries need keys the chunk overwrites,
        # so attend over old + new, then keep only what the window keeps
        keys = torch.cat([self.k[:, :, :self.n], k], dim=2).to(out)
        vals = torch.cat([self.v[:, :, :self.n], v], dim=2).to(out)
        kpos = torch.cat([self.pos[:self.n], qpos])
        keep = (qpos < self.sink) | (qpos >= self.seen - self.window)
        self._write(k[:, :, keep], v[:, :, keep], qpos[keep])
        self.n = self.capacity
        self.overflow_pos = kpos
        return keys, vals, attention_mask(qpos, kpos, self.window, self.sink)

    def _grow(self, need):
        cap = max(need, 2 * self.capacity)
        cap = min(cap, self.ring) if self.window else cap  # (a window's ring is the most it needs)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(old.size(0), old.size(1), cap, old.size(3))
            new[:, :, :self.n] = old[:, :, :self.n]
            setattr(self, name, new)
        pos = self.pos.new_zeros(cap)
        pos[:self.n] = self.pos[:self.n]
        self.pos = pos

    def tokens(self):
        return self.n

    def size_bits(self):
        """B x nkv x tokens x hs x 2 tensors x dtype bits."""
        B, H, _, D = self.k.shape
        return 2 * B * H * self.n * D * self.k.element_size() * 8


def keep_recent(k, v, pos, kv_window, kv_sink=0):
    """The bounded-history rule as a plain function (what TrimCache calls; exercise 1):
    k, v (B, nkv, S, hs) and their text positions pos (S,), oldest first, newest last.
    Keep the last kv_window tokens and the first kv_sink of the text; return (k, v, pos)."""
    keep = (pos >= pos[-1] - kv_window + 1) | (pos < kv_sink)
    return k[:, :, keep], v[:, :, keep], pos[keep]


class TrimCache(Cache):
    """A bounded cache written the simple way: append by concatenation, then ask a
    function (keep_recent, or a user's "module:function" with its signature) which tokens
    stay. Slower than KVCache's ring buffer; --kv_trim=... selects it."""

    def __init__(self, batch_size, n_kv_head, head_dim, window=0, sink=0, trim_fn=keep_recent,
                 dtype=torch.float32, device="cpu", trim_name="keep_recent"):
        self.window, self.sink, self.trim_fn, self.trim_name = window, sink, trim_fn, trim_name
        self.k = torch.zeros(batch_size, n_kv_head, 0, head_dim, dtype=dtype, device=device)
        self.v = self.k
        self.pos = torch.zeros(0, dtype=torch.long, device=device)
        self.seen = 0

    def update(self, k, v):
        T, out = k.size(2), k.dtype
        qpos = torch.arange(self.seen, self.seen + T, device=self.pos.device)
        self.seen += T
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)  # stored at the cache's dtype, as KVCache
        keys, vals, kpos = torch.cat([self.k, k], 2), torch.cat([self.v, v], 2), torch.cat([self.pos, qpos])
        if self.window:  # (copies when all of them are attended below: the function may write into its inputs)
            given = (keys, vals, kpos) if T == 1 else (keys.clone(), vals.clone(), kpos.clone())
            self.k, self.v, self.pos = self._trim(*given)
        else:
            self.k, self.v, self.pos = keys, vals, kpos
        if T == 1:  # the decode step attends over exactly what is kept
            self.key_pos = self.pos
            return self.k.to(out), self.v.to(out), None
        self.key_pos = kpos
        return keys.to(out), vals.to(out), attention_mask(qpos, kpos, self.window, self.sink)

    def _trim(self, keys, vals, kpos):
        """trim_fn's (k, v, pos), or a UserError saying how what it returned breaks the contract."""
        out = self.trim_fn(keys, vals, kpos, self.window, self.sink)
        if isinstance(out, (tuple, list)) and len(out) == 3 and all(torch.is_tensor(t) for t in out):
            k, v, pos = out
            B, H, _, D = keys.shape
            if (k.dim() == 4 and k.shape[:2] == (B, H) and k.size(3) == D and v.shape == k.shape
                    and k.dtype == keys.dtype and v.dtype == vals.dtype
                    and pos.shape == (k.size(2),) and pos.dtype == kpos.dtype
                    and k.device == v.device == pos.device == keys.device):
                return k, v, pos
            got = ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}" for t in out)
        else:
            got = type(out).__name__ + (f" of {len(out)}" if isinstance(out, (tuple, list)) else "")
        B, H, S, D = keys.shape
        raise UserError(f"--kv_trim={self.trim_name} must return (k, v, pos) of the tokens kept: k and v "
                        f"(B={B}, nkv={H}, kept, hs={D}) {str(keys.dtype).replace('torch.', '')} like the k "
                        f"it was given, pos (kept,) long, all on {keys.device}; it returned {got} (given S={S} "
                        "tokens)")

    def tokens(self):
        return self.k.size(2)

    def size_bits(self):
        return 2 * self.k.numel() * self.k.element_size() * 8
