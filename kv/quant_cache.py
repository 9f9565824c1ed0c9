"""
QuantKVCache: a KV cache holding old tokens as codes of a kv/quant.py format, the newest in
full precision.

    from kv.policy import KVOptions
    caches = KVOptions(kv_quant="int4", kv_quant_group=32, kv_quant_residual=32).make_caches(model, batch_size)

The newest kv_quant_residual tokens stay in full precision (a key group per channel needs G
tokens before it can be quantized; the newest tokens also matter most). Per-token formats
quantize a token as soon as it leaves the residual; int4/int2 keys per channel (the default
without eviction) go G tokens at a time once R + G are waiting. size_bits() counts every
stored tensor at its dtype's width: codes, scales, zero points and the full-precision residual.
Tensors are sized exactly (grown by concatenation, or rows overwritten in place), so the bits
counted are the bits held; dequantized keys and values exist only for the step that asks for
them. Positions are bookkeeping, not counted.
"""

import torch

from kv.cache import Cache, attention_mask
from kv.quant import payload_bits
from devices import no_autocast


class QuantKVCache(Cache):
    """A KV cache holding old tokens as codes and the newest `residual` in full precision.

    The protocol of kv.cache.Cache. Held: a quantized part (payload tuples k_codes, v_codes; positions pos_codes) and the
    full-precision residual (k_full, v_full; positions pos_full), the newest tokens. window/sink is the
    history bound of kv.cache.visible(): keys no later query can see are dropped (a key group
    of G tokens once all of its tokens are out of sight).

    An update appends the new tokens, quantizes what left the residual, then returns the
    dequantized keys and values: a step's queries see exactly what is stored after it, the
    newest `residual` tokens (the step's own included) in full precision.
    """
    def __init__(self, key_fmt, val_fmt, batch_size, n_kv_head, head_dim, residual=32, window=0,
                 sink=0, dtype=torch.float32, device="cpu"):
        self.key_fmt, self.val_fmt = key_fmt, val_fmt
        self.residual = residual
        self.window, self.sink = window, (sink if window > 0 else 0)
        self.k_full = torch.zeros(batch_size, n_kv_head, 0, head_dim, dtype=dtype, device=device)
        self.v_full = self.k_full.clone()
        self.pos_full = torch.zeros(0, dtype=torch.long, device=device)
        self.k_codes = self.v_codes = None  # payloads, once something is quantized
        self.pos_codes = self.pos_full.clone()  # (S,); an evicting cache keeps (B, nkv, S)
        self.group = max(key_fmt.tokens_per_group, val_fmt.tokens_per_group)
        self.seen = 0

    def _alive(self, p, now=None):
        """Can a query at position now (default self.seen) or later still see the key at position p?"""
        return (p < self.sink) | (p > (self.seen if now is None else now) - self.window)

    def _forget(self, T, now=None):
        """Before T new tokens arrive: drop what no query from self.seen (or now) on can see."""
        if self.window == 0:
            return
        keep_full = self._alive(self.pos_full, now)
        if not bool(keep_full.all()):
            self._keep_full(keep_full)
        if self.k_codes is not None:
            g = self.group
            keep = self._alive(self.pos_codes, now).view(-1, g).any(-1).repeat_interleave(g)  # whole groups
            if not bool(keep.all()):
                self.k_codes = self.key_fmt.select(self.k_codes, keep)
                self.v_codes = self.val_fmt.select(self.v_codes, keep)
                self.pos_codes = self.pos_codes[keep]

    def _keep_full(self, keep):
        """Keep the residual tokens where keep (S,) is True."""
        self.k_full, self.v_full, self.pos_full = self.k_full[:, :, keep], self.v_full[:, :, keep], self.pos_full[keep]

    def _appended(self, T):
        """Hook: T new tokens were appended to the residual."""

    def update(self, k, v):
        """Store k, v (B, nkv, T, hs) of the next T tokens; return the keys and values of every
        token held, dequantized, and the mask (None, "causal" or bool (..., T, S))."""
        with no_autocast(k.device.type):  # quantization is done in full precision
            return self._update(k, v)

    def _update(self, k, v):
        T = k.size(2)
        qpos = torch.arange(self.seen, self.seen + T, device=self.pos_full.device)
        self._forget(T)
        self.seen += T
        # inference only: stored tensors carry no autograd history
        self.k_full = torch.cat([self.k_full, k.detach().to(self.k_full.dtype)], dim=2)
        self.v_full = torch.cat([self.v_full, v.detach().to(self.v_full.dtype)], dim=2)
        self.pos_full = torch.cat([self.pos_full, qpos])
        self._appended(T)
        m = (self.k_full.size(2) - self.residual) // self.group * self.group
        if m > 0:  # these left the residual: to codes
            self._store(self.key_fmt.quantize(self.k_full[:, :, :m]), self.val_fmt.quantize(self.v_full[:, :, :m]), m)
            self.k_full, self.v_full, self.pos_full = self.k_full[:, :, m:], self.v_full[:, :, m:], self.pos_full[m:]
        keys, vals, kpos = self._assemble(k.dtype)
        self.key_pos = kpos
        if T > 1:  # a prefill: keep only what its last query sees, as a decode step's cache holds
            self._after_prefill()
        return keys, vals, attention_mask(qpos, kpos, self.window, self.sink)

    def _after_prefill(self):
        """Hook, after an update of several tokens: drop what its last query could not see (the
        next update would drop it anyway), so that the cache never holds a whole long prompt."""
        self._forget(0, now=self.seen - 1)

    def _store(self, k_codes, v_codes, m):
        """Add the codes of the m oldest residual tokens to the quantized part."""
        if self.k_codes is None:
            self.k_codes, self.v_codes = k_codes, v_codes
        else:
            self.k_codes = tuple(torch.cat(pair, dim=2) for pair in zip(self.k_codes, k_codes))
            self.v_codes = tuple(torch.cat(pair, dim=2) for pair in zip(self.v_codes, v_codes))
        self.pos_codes = torch.cat([self.pos_codes, self.pos_full[:m].expand(*self.pos_codes.shape[:-1], -1)], dim=-1)

    def _assemble(self, dtype):
        """Keys, values (B, nkv, S, hs) of everything held, in `dtype` (the compute dtype: the
        residual may be stored narrower), and their positions."""
        if self.k_codes is None:
            return self.k_full.to(dtype), self.v_full.to(dtype), self.pos_full
        pq = self.pos_codes
        if pq.size(-1) == 0:  # every group has left a local window: the residual alone
            return self.k_full.to(dtype), self.v_full.to(dtype), self.pos_full.expand(*pq.shape[:-1], -1)
        n_codes = pq.size(-1)
        B, H, _, D = self.k_full.shape
        out = []
        for fmt, payload, full in ((self.key_fmt, self.k_codes, self.k_full), (self.val_fmt, self.v_codes, self.v_full)):
            x = full.new_empty(B, H, n_codes + full.size(2), D, dtype=dtype)
            fmt.dequantize(payload, x[:, :, :n_codes])
            x[:, :, n_codes:] = full
            out.append(x)
        return out[0], out[1], torch.cat([pq, self.pos_full.expand(*pq.shape[:-1], -1)], dim=-1)

    def tokens(self):
        """How many tokens of the text this cache holds (per sequence and head)."""
        return self.pos_codes.size(-1) + self.pos_full.numel()

    def size_bits(self):
        """Bits held: codes, scales and zero points of the quantized part, plus the residual."""
        return payload_bits(self.stored_tensors())

    def stored_tensors(self):
        """Every tensor holding key/value data: what size_bits() counts."""
        return [self.k_full, self.v_full] + list(self.k_codes or ()) + list(self.v_codes or ())
