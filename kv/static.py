"""
Static-shape KV caches: what the compiled decode step (generate.StaticDecoder) writes into.

A compiled function is specialized to the shapes and the Python numbers it reads: a cache
that grows by concatenation, or that picks its slot with a Python int changing every token,
would make torch.compile trace the step again for every token. The caches here allocate
every buffer once at its final size, and keep the step's bookkeeping in tensors: the
position of the token being decoded (a `Clock` shared by the caches of one model), the text
position of every slot (EMPTY for a slot never written), and the slot to write and the
mask, computed from those inside the step. The same compiled code then serves every token,
and on CUDA it can be replayed as one CUDA graph (gpt-fast's way).

A step attends over every slot of the buffers; kv.cache.visible(), the one mask rule, hides
the empty slots (EMPTY is in the future of every query) and the keys out of sight, so a step
sees exactly the keys the eager cache would show it. So a step costs what the full buffers
cost: a ring of kv_window slots, or an unbounded cache's whole capacity from the first token
(size it for the text, as generate does). The caches attend themselves (attend_slots), with
the attention written out as sums that the compiler fuses with the dequantization of codes.

    StaticKVCache     = kv.cache.KVCache: unbounded (slot = position, sized by `capacity`) or
                        the kv_sink first tokens and a ring of the last kv_window
    StaticQuantCache  = kv.quant_cache.QuantKVCache without eviction: int8, fp8_e4m3, fp8_e5m2 (per
                        token), int4, int2 (keys per channel over G tokens, as KIVI, or
                        per token with kv_quant_keys='token')

They hold the same keys, values and codes as the eager caches and size_bits() counts the same
bits (tests/test_decode.py checks both). They take one token per step, from StaticDecoder;
a prompt is prefilled by the eager caches (KVOptions.make_caches) and copied in by load().
Eviction by attention score (h2o), recency eviction, kv_trim, user quantizers, linear
attention and user attention functions stay eager: static_reason() says which and why.
"""

import torch

from attention import PLAIN_SOFTMAX
from kv.cache import Cache, KVCache, visible
from kv.quant import FP8, ChannelFormat, GroupFormat, payload_bits
from kv.quant_cache import QuantKVCache
from devices import no_autocast

EMPTY = 2 ** 62  # the position of a slot never written: after every query, so never visible


class Clock:
    """The position of the next token: t, a (1,) long tensor on the device, read and advanced
    inside the compiled step; n, the same number as a Python int for everything outside it
    (sizes, reports), advanced by the decoder after each step."""

    def __init__(self, device, n=0):
        self.t = torch.full((1,), n, dtype=torch.long, device=device)
        self.n = n

    def set(self, n):
        self.t.fill_(n)
        self.n = n


def attend_slots(q, parts, mask, width):
    """Softmax attention of one query per sequence, q (B, nh, 1, hs), over the slots of parts,
    a list of (keys, values) (B, nkv, S_i, hs), mask (1, sum S_i) True = may attend (the
    softmax and naive kinds compute the same, so both use it). Written as sums, not a call to SDPA, so
    that torch.compile makes vectorized loops of them (fusing a dequantization into them),
    where SDPA's CPU kernel makes small BLAS calls per head and block of keys. Dot products
    are summed in pieces of `width` channels (the channels of one packed byte plane)."""
    B, nh, _, hs = q.shape
    H = parts[0][0].size(1)
    qg = q.float().view(B, H, nh // H, 1, hs) * hs ** -0.5  # (B, nkv, query heads per KV head, 1, hs)
    scores = []
    for k, _ in parts:
        k = k.float()[:, :, None]  # (B, nkv, 1, S, hs)
        scores.append(sum((qg[..., a:a + width] * k[..., a:a + width]).sum(-1) for a in range(0, hs, width)))
    att = torch.softmax(torch.cat(scores, dim=-1).masked_fill(~mask, float("-inf")), dim=-1)
    y, start = 0, 0
    for _, v in parts:
        p = att[..., start:start + v.size(2), None]  # (B, nkv, g, S, 1)
        start += v.size(2)
        v = v.float()[:, :, None]
        y = y + torch.cat([(p * v[..., a:a + width]).sum(-2) for a in range(0, hs, width)], dim=-1)
    return y.view(B, nh, 1, hs).to(q.dtype)  # (B, nkv, g, hs) -> (B, nh, 1, hs)


def ring_slot(p, window, sink):
    """The slot of position p (tensor) in a buffer of `sink` fixed slots and a ring of `window`."""
    return torch.where(p < sink, p, sink + (p - sink) % window)


class StaticKVCache(Cache):
    """Full-precision keys and values in buffers of a fixed size (see the module docstring)."""

    def __init__(self, clock, batch_size, n_kv_head, head_dim, window=0, sink=0, capacity=256,
                 dtype=torch.float32, device="cpu"):
        self.clock = clock
        self.window, self.sink = window, (sink if window > 0 else 0)
        # (a window longer than the capacity never wraps: its slot is the position, as unbounded)
        cap = min(self.sink + window, max(int(capacity), 1)) if window > 0 else max(int(capacity), 1)
        self.k = torch.zeros(batch_size, n_kv_head, cap, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.kpos = torch.full((cap,), EMPTY, dtype=torch.long, device=device)  # position of each slot

    @property
    def seen(self):
        return self.clock.n

    @property
    def capacity(self):
        return self.k.size(2)

    def reset(self):
        """Forget everything (the buffers stay: an empty slot is one marked EMPTY)."""
        self.kpos.fill_(EMPTY)

    def buffers(self):
        return [self.k, self.v, self.kpos]

    def update(self, k, v):
        """Store the one new token's k, v (B, nkv, 1, hs) in its slot; return the buffers and
        the mask (1, capacity) of the slots its query may see."""
        p = self.clock.t  # (1,) position of the new token
        s = p if self.window == 0 else ring_slot(p, self.window, self.sink)
        self.k.index_copy_(2, s, k.to(self.k.dtype))  # stored at the cache's dtype,
        self.v.index_copy_(2, s, v.to(self.v.dtype))
        self.kpos.index_copy_(0, s, p)
        mask = visible(p, self.kpos, self.window, self.sink)
        return self.k.to(k.dtype), self.v.to(v.dtype), mask  # read back in the compute dtype, as KVCache

    def attend(self, fn, q, k, v, mask, dropout_p=0.0):
        return attend_slots(q, [(k, v)], mask, k.size(-1))

    def load(self, cache):
        """Copy a prefilled eager KVCache of the same kind (its slots are laid out alike)."""
        if not isinstance(cache, KVCache) or cache.window != self.window or cache.n > self.capacity:
            raise ValueError("load() takes an eager KVCache of the same window that fits the capacity")
        n = cache.n
        self.k[:, :, :n] = cache.k[:, :, :n]
        self.v[:, :, :n] = cache.v[:, :, :n]
        self.kpos[:n] = cache.pos[:n]

    def tokens(self):
        return min(self.clock.n, self.capacity)

    def size_bits(self):
        """B x nkv x tokens x hs x 2 tensors x dtype bits (the slots written, as KVCache counts)."""
        B, H, _, D = self.k.shape
        return 2 * B * H * self.tokens() * D * self.k.element_size() * 8


def _bytes(t):
    # float8 tensors are indexed and selected as uint8 (CPU kernels for float8 are few)
    return t.view(torch.uint8) if t.dtype in FP8.values() else t


class StaticQuantCache(Cache):
    """QuantKVCache in buffers of a fixed size: codes in whole groups of G tokens (G = 1 for
    the per-token formats), the newest tokens in full precision in a ring of R + G slots.

    After the step at position p, the tokens [0, qn) are codes and [qn, p] full precision,
    qn = the largest multiple of G with p + 1 - qn >= R (0 while fewer than R tokens came):
    what QuantKVCache holds, which quantizes G tokens at a time once R + G are waiting. The
    step that completes a group attends over its codes, as the eager cache does. When R > 0
    and G > 1 (flush_apart) that group is already in the residual before the step: the
    decoder calls flush() then, once per G tokens (quantizing inside every step, to keep its
    shapes fixed, cost half the step). Otherwise (a group of one token, or R = 0: the group
    holds the current token) the step quantizes it itself, and a step that completes nothing
    rewrites the last group with itself.
    With a window, code groups go to a ring of slots after the groups holding sink tokens, as
    many as can be in sight (the codes a query sees lie in (p - window, qn), qn <= p + 1 - R:
    ceil((window - R) / G) groups); the window must be at least R + G, so that no token
    leaves it before it is quantized (otherwise the eager cache regroups what is left:
    static_reason() keeps that eager)."""

    def __init__(self, clock, key_fmt, val_fmt, batch_size, n_kv_head, head_dim, residual=32, window=0,
                 sink=0, capacity=256, dtype=torch.float32, device="cpu"):
        self.clock, self.key_fmt, self.val_fmt = clock, key_fmt, val_fmt
        self.G = G = max(key_fmt.tokens_per_group, val_fmt.tokens_per_group)
        self.R = residual
        self.window, self.sink = window, (sink if window > 0 else 0)
        if window and window < residual + G:
            raise ValueError(f"a static quantized cache needs window >= residual + group ({residual + G})")
        nr = residual + G
        self.k_res = torch.zeros(batch_size, n_kv_head, nr, head_dim, dtype=dtype, device=device)
        self.v_res = torch.zeros_like(self.k_res)
        self.rpos = torch.full((nr,), EMPTY, dtype=torch.long, device=device)
        self.sink_groups = -(-self.sink // G)  # the groups holding sink tokens keep their slots
        self.ring_groups = -(-(window - residual) // G) if window else max(-(-int(capacity) // G), 1)
        self.flush_apart = G > 1 and residual > 0
        n_codes = (self.sink_groups + self.ring_groups) * G
        zeros = self.k_res.new_zeros(batch_size, n_kv_head, n_codes, head_dim)
        with no_autocast(zeros.device.type):  # the formats' own layout, allocated once
            self.k_codes, self.v_codes = key_fmt.quantize(zeros), val_fmt.quantize(zeros)
            one = zeros[:, :, :G]
            self.group_bits = payload_bits(key_fmt.quantize(one)) + payload_bits(val_fmt.quantize(one))
        self.cpos = torch.full((n_codes,), EMPTY, dtype=torch.long, device=device)
        bits = getattr(key_fmt, "bits", 8)  # int4/int2 pack 8 // bits pieces of a row into each byte
        self.width = head_dim * bits // 8 if bits < 8 and key_fmt.name == val_fmt.name else head_dim
        self.token_bits = 2 * batch_size * n_kv_head * head_dim * self.k_res.element_size() * 8

    @property
    def seen(self):
        return self.clock.n

    def reset(self):
        self.cpos.fill_(EMPTY)
        self.rpos.fill_(EMPTY)

    def buffers(self):
        return [self.k_res, self.v_res, self.rpos, self.cpos, *self.k_codes, *self.v_codes]

    def _group_slot(self, gi):
        """The slot of group gi (tensor; gi >= 0)."""
        sg, rg = self.sink_groups, self.ring_groups
        return torch.where(gi < sg, gi, sg + (gi - sg) % rg)

    def update(self, k, v):
        with no_autocast(k.device.type):  # quantization is done in full precision
            return self._update(k, v)

    def _update(self, k, v):
        G, nr = self.G, self.rpos.numel()
        p = self.clock.t  # (1,)
        r = p % nr
        self.k_res.index_copy_(2, r, k.to(self.k_res.dtype))
        self.v_res.index_copy_(2, r, v.to(self.v_res.dtype))
        self.rpos.index_copy_(0, r, p)
        after = (p + 1 - self.R).clamp(min=0)  # tokens past the residual after this step
        qn = after // G * G  # tokens held as codes after this step: [0, qn)
        if not self.flush_apart:
            self._store_group(qn, (after > 0) & (after % G == 0))  # done: this step completes a group
        # in the compute dtype, k's (the residual may be stored narrower), as QuantKVCache does
        keys = torch.cat([dequantize(self.key_fmt, self.k_codes, k.dtype), self.k_res.to(k.dtype)], dim=2)
        vals = torch.cat([dequantize(self.val_fmt, self.v_codes, k.dtype), self.v_res.to(k.dtype)], dim=2)
        kpos = torch.cat([self.cpos, torch.where(self.rpos >= qn, self.rpos, EMPTY)])  # codes count once
        return keys, vals, visible(p, kpos, self.window, self.sink)

    def due(self, n):
        """Does the step at position n (an int) complete a group that flush() must store first?"""
        after = n + 1 - self.R
        return self.flush_apart and after > 0 and after % self.G == 0

    def flush(self):
        """Quantize the group the coming step completes (its tokens [qn - G, qn), qn = p + 1 - R,
        are in the residual already) into its slots: called by the decoder when due(p)."""
        with no_autocast(self.k_res.device.type):
            self._store_group(self.clock.t + 1 - self.R, None)

    def _store_group(self, qn, done):
        """Quantize group qn / G - 1 from the residual into its slots; where done (a bool tensor)
        is False, rewrite the slots with what they hold (the same shapes and kernels every step)."""
        G, nr = self.G, self.rpos.numel()
        gi = (qn // G - 1).clamp(min=0)
        gpos = gi * G + torch.arange(G, device=qn.device)  # (G,) its positions, in the ring
        ts = self._group_slot(gi) * G + torch.arange(G, device=qn.device)  # its token slots
        self._put(self.k_codes, self.key_fmt.quantize(self.k_res.index_select(2, gpos % nr)), ts, done)
        self._put(self.v_codes, self.val_fmt.quantize(self.v_res.index_select(2, gpos % nr)), ts, done)
        self.cpos.index_copy_(0, ts, gpos if done is None else torch.where(done, gpos, self.cpos.index_select(0, ts)))

    def attend(self, fn, q, k, v, mask, dropout_p=0.0):
        """Attention read straight from the codes (attend_slots; k, v are not read): compiled,
        the dequantization is fused into its sums and the dequantized cache never exists. Keys and
        values come out in q's dtype, as QuantKVCache dequantizes them (under bfloat16 autocast,
        rounded to bfloat16: in float32 they would be other keys, and other greedy text)."""
        with no_autocast(q.device.type):
            parts = [(dequantize(self.key_fmt, self.k_codes, q.dtype),
                      dequantize(self.val_fmt, self.v_codes, q.dtype)),
                     (self.k_res.to(q.dtype), self.v_res.to(q.dtype))]
            return attend_slots(q, parts, mask, self.width)

    def _put(self, payload, new, ts, done):
        """Write a group's tensors `new` into their slots (where done, unless done is None).
        Tensors run over tokens or over groups (dim 2)."""
        n_codes = self.cpos.numel()
        for buf, t in zip(payload, new):
            idx = ts if buf.size(2) == n_codes else ts[:1] // self.G
            b, t = _bytes(buf), _bytes(t.to(buf.dtype))
            b.index_copy_(2, idx, t if done is None else torch.where(done, t, b.index_select(2, idx)))

    def load(self, cache):
        """Copy a prefilled eager QuantKVCache of the same formats: the code groups a later
        query can still see (or holding sink tokens), and the full-precision residual."""
        if type(cache) is not QuantKVCache or cache.window != self.window or cache.group != self.G:
            raise ValueError("load() takes an eager QuantKVCache of the same formats and window")
        n, G = cache.seen, self.G
        if cache.k_codes is not None:
            first = cache.pos_codes.view(-1, G)[:, 0]  # (groups,) first position of each held group
            last = first + G - 1
            # the groups the next query (position n) can see, and those holding sink tokens
            keep = (last > n - self.window) | (first < self.sink) if self.window else torch.ones_like(first, dtype=torch.bool)
            gi = first[keep] // G
            rows = torch.arange(first.numel(), device=first.device)[keep]
            if gi.numel() > self.sink_groups + self.ring_groups:
                raise ValueError("the prefilled cache holds more than this static cache can")
            ts = (self._group_slot(gi)[:, None] * G + torch.arange(G, device=gi.device)).flatten()
            src = (rows[:, None] * G + torch.arange(G, device=gi.device)).flatten()
            for buf, old in zip(self.k_codes + self.v_codes, cache.k_codes + cache.v_codes):
                per_token = buf.size(2) == self.cpos.numel()
                _bytes(buf).index_copy_(2, ts if per_token else self._group_slot(gi),
                                        _bytes(old).index_select(2, src if per_token else rows))
            self.cpos.index_copy_(0, ts, cache.pos_codes.index_select(0, src))
        nr = self.rpos.numel()
        if cache.pos_full.numel() > nr:
            raise ValueError("the prefilled cache's residual is longer than R + G")
        r = cache.pos_full % nr
        self.k_res.index_copy_(2, r, cache.k_full.to(self.k_res.dtype))
        self.v_res.index_copy_(2, r, cache.v_full.to(self.v_res.dtype))
        self.rpos.index_copy_(0, r, cache.pos_full)

    def _held_groups(self):
        """Code groups the eager cache would hold after the step at position n - 1."""
        n, G = self.clock.n, self.G
        nq = max(0, n - self.R) // G
        if not self.window:
            return nq
        lo = max(0, -(-(n - self.window + 1) // G) - 1)  # the first group with a token in sight
        return max(0, nq - lo) + max(0, min(self.sink_groups, nq, lo))

    def tokens(self):
        n = self.clock.n
        return self._held_groups() * self.G + n - max(0, n - self.R) // self.G * self.G

    def size_bits(self):
        """Codes, scales and zero points of the groups held, plus the residual: what
        QuantKVCache.size_bits() counts for the same text."""
        n = self.clock.n
        n_full = n - max(0, n - self.R) // self.G * self.G
        return self._held_groups() * self.group_bits + n_full * self.token_bits


def dequantize(fmt, payload, dtype):
    """fmt.dequantize of kv/quant.py's formats, written as one broadcast expression (no
    writes into slices of an output): torch.compile turns it into a vectorized loop, fused
    into the attention sums that read it. The same arithmetic, so the same values."""
    if isinstance(fmt, (GroupFormat, ChannelFormat)):
        packed, scale, zero = payload
        shifts = torch.arange(0, 8, fmt.bits, dtype=torch.uint8, device=packed.device)
        codes = ((packed.unsqueeze(-2) >> shifts[:, None]) & (2 ** fmt.bits - 1)).flatten(-2)  # (B, nkv, S, hs)
        x = codes.to(dtype)
        if isinstance(fmt, ChannelFormat):  # per channel over G tokens: scale (B, nkv, S / G, hs)
            g = x.unflatten(2, (scale.size(2), -1))
            return (g * scale.to(dtype).unsqueeze(3) + zero.to(dtype).unsqueeze(3)).flatten(2, 3)
        g = x.unflatten(-1, (scale.size(-1), -1))  # per token, G channels: scale (B, nkv, S, hs / G)
        return (g * scale.to(dtype).unsqueeze(-1) + zero.to(dtype).unsqueeze(-1)).flatten(-2)
    codes, scale = payload  # int8 and fp8: one scale per token
    return codes.to(dtype) * scale.to(dtype)


STATIC_FORMATS = ("int8", "fp8_e4m3", "fp8_e5m2", "int4", "int2")  # the kv_quant formats dequantize() above reads


def static_reason(kv, config, device=None):
    """None when the static caches cover KVOptions kv for a model of this config (on device,
    a torch.device, where given), else what keeps the decode step eager (said as "the decode
    step stays eager: <reason>")."""
    if device is not None and kv.kv_quant in FP8:
        if device.type == "mps":
            return f"kv_quant={kv.kv_quant} on MPS (no float8 dtypes there: the eager cache emulates them)"
        if device.type == "cuda" and kv.kv_quant == "fp8_e4m3" and torch.cuda.get_device_capability(device) < (8, 9):
            return "kv_quant=fp8_e4m3 on a GPU older than Ada/Hopper (the compiler's Triton has no e4m3 there)"
    if kv.others():
        return f"--{kv.others()[0][0]} (an option kv/static.py does not know)"
    if kv.kv_trim:
        return "kv_trim (a user's function)"
    if kv.kv_evict != "none":
        return f"kv_evict={kv.kv_evict} (eviction moves tokens between steps)"
    if kv.kv_quant != "none" and kv.kv_quant not in STATIC_FORMATS:
        who = "a user's quantizer" if ":" in kv.kv_quant else "a format kv/static.py does not know"
        return f"kv_quant={kv.kv_quant} ({who})"
    if config.attention not in PLAIN_SOFTMAX:
        return f"attention={config.attention} (only {' and '.join(PLAIN_SOFTMAX)} attention compile)"
    group = kv.key_group()  # tokens a key group waits for (1 unless int4/int2 keys go per channel)
    local = any(config.is_local(i) for i in range(config.n_layer))
    if kv.kv_quant != "none" and local and group > config.window:
        return f"local windows of {config.window} tokens, under one key group of {group} tokens"
    return None

