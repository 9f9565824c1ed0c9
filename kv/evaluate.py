"""
eval_kv.py's measurement: n streams of the val split fed through a reference cache and, in
lockstep, through each cache setting (a chunk of bytes per forward, or a decode step per byte),
scored as bits per byte (overall and per position bucket), KL from the reference and the peak
KV bits a token-by-token decoder holds. eval_kv.py (the script) and kv_study.py call evaluate().

    from kv.evaluate import evaluate, load_streams
    x, y = load_streams("data/shakespeare_char/val.txt", 4, 1024)
    rows = evaluate(model, x, y, [KVOptions(kv_window=64, kv_quant="int4")], 64, KVOptions(kv_window=64))
"""
import math
import time

import numpy as np
import torch
from torch.nn import functional as F

from kv.peak import decoder_peak, least_cache_bytes
from plugins import not_finite
from utils import UserError

SPAN = 64  # bytes whose log-probabilities are scored together at chunk 1 (one pass of vector ops)
REF_CHUNK = 512  # bytes per forward of an unbounded reference's pass (unless the attention is fused)


def load_streams(path, n, L):
    """x, y (n, L): n stretches of L + 1 bytes at evenly spaced offsets of the file."""
    data = np.fromfile(path, dtype=np.uint8)
    if len(data) < L + 1:
        raise UserError(f"{path} has {len(data):,} bytes, fewer than stream_len + 1 = {L + 1:,}; lower --stream_len")
    offsets = stream_offsets(len(data), n, L)
    s = torch.from_numpy(np.stack([data[o:o + L + 1] for o in offsets]).astype(np.int64))
    return s[:, :-1], s[:, 1:]


def stream_offsets(size, n, L):
    """Where load_streams' n stretches of L + 1 bytes start in a file of size bytes: evenly
    spaced, first and last at its ends. Stream i scores bytes offset + 1 .. offset + L, so no
    byte is scored twice when size >= n L + 1."""
    return [i * (size - L - 1) // max(n - 1, 1) for i in range(n)]


def buckets(block, L):
    """Position buckets [0, block), [block, 2 block), [2 block, 4 block), ... cut at L."""
    edges, e = [0], block
    while edges[-1] < L:
        edges.append(min(e, L))
        e *= 2
    return list(zip(edges[:-1], edges[1:]))


def label(kv, reference=None):
    """A row's name: what the cache does (KVOptions.describe) and the history it may keep."""
    what = kv.describe() if kv.compressed else (f"trim {kv.kv_trim}" if kv.kv_trim else "plain")
    sink = f" + sink {kv.kv_sink}" if kv.kv_sink and kv.kv_evict == "none" else ""  # (eviction names its own)
    bound = f"window {kv.kv_window}{sink}" if kv.kv_window > 0 else "unbounded"
    return f"{what}, {bound}" + (" (reference)" if kv == reference else "")


class ReferencePass:
    """The reference cache's pass over x, y (B, L), one stream at a time (as fast as all side
    by side, 1/B of the memory), in pieces: two windows when it has one (at least 256 bytes;
    a piece attends over at most three windows: O(L x window), not O(L^2)); a whole stream when
    it is unbounded and the attention is the fused "softmax" kind (no L x L matrix in memory);
    else REF_CHUNK bytes. logprobs(a, b) hands out the log-probabilities (B, b - a, V) of
    bytes a..b-1, computing pieces as needed and forgetting those before a."""

    def __init__(self, model, x, y, kv, dtype=torch.bfloat16):
        self.model, self.x, self.y, self.kv, self.dtype = model, x, y, kv, dtype
        B, L = x.shape
        self.piece = reference_piece(model.config, kv, L)
        self.states = [None] * B  # each stream's caches, alive while the stream is read
        self.nll = torch.zeros(B, L)
        self.lp, self.start, self.end, self.seconds = None, 0, 0, 0.0

    def logprobs(self, a, b):
        B, L = self.x.shape
        dev = next(self.model.parameters()).device
        while self.end < b:
            t0 = time.perf_counter()
            s, e = self.end, min(self.end + self.piece, L)
            lps = []
            for i in range(B):
                if self.states[i] is None:
                    self.states[i] = self.kv.make_caches(self.model, 1, capacity=L, dtype=self.dtype)
                logits, self.states[i] = self.model(self.x[i:i + 1, s:e].to(dev), self.states[i])
                lps.append(F.log_softmax(logits.float(), dim=-1))
                if e == L:
                    self.states[i] = None  # read to the end: its memory serves the next stream
            lp = torch.cat(lps)  # (B, e - s, V)
            self.nll[:, s:e] = -lp.gather(-1, self.y[:, s:e].to(dev).unsqueeze(-1)).squeeze(-1).cpu()
            if self.lp is not None:
                lp = torch.cat([self.lp[:, a - self.start:], lp], dim=1)
                s = a
            self.lp, self.start, self.end = lp, s, e
            self.seconds += time.perf_counter() - t0
        return self.lp[:, a - self.start:b - self.start]


def reference_piece(config, kv, L):
    """Bytes per piece of ReferencePass over streams of L bytes under the reference cache kv."""
    w = max(kv.kv_window, 0)
    return min(L, max(2 * w, 256) if w else (L if config.attention == "softmax" else REF_CHUNK))


def least_memory(config, settings, reference, B, L, chunk, dtype=torch.bfloat16):
    """(host, device) bytes that evaluate() over B streams of L bytes needs at the least: the
    streams and every row's per-byte losses on the host; on the device the float32
    log-probabilities of a reference piece of every stream, twice (the streams' own and
    their concatenation), of a span of the other settings (twice: the logits and their
    log-softmax) and their caches for B streams (kv.peak.least_cache_bytes). The activations
    inside a forward come on top: a floor for refusing, not a forecast."""
    others = [kv for kv in settings if kv != reference]
    width = torch.finfo(dtype).bits // 8
    host = B * L * (2 * 8 + 4 + 8 * len(others))  # x and y (int64), the reference's nll, each run's nll and kl
    span = spans(chunk, L)[0]
    device = B * config.vocab_size * 4 * 2 * (reference_piece(config, reference, L) + (span if others else 0))
    device += B * sum(least_cache_bytes(config, kv, L, width) for kv in others)
    return host, device


def spans(chunk, L):
    """(bytes scored together, how many such spans in L bytes): a chunk, or at chunk 1 SPAN
    decode steps, whose log-probabilities are then scored in one pass."""
    span = chunk if chunk > 1 else min(SPAN, L)
    return span, len(range(0, L, span))


@torch.no_grad()
def evaluate(model, x, y, settings, chunk, reference, block=256, progress=None, dtype=torch.bfloat16,
             decode=None):
    """Feed x (B, L) chunk bytes at a time through the reference cache (KVOptions) and, in
    lockstep, through each setting's cache (a list of KVOptions; a setting equal to the
    reference is the reference itself, computed once); full precision is stored at dtype.
    decode (at chunk = 1): a function (kv, B, L, dtype) -> generate.StaticDecoder, or None for
    the eager caches; every setting, the reference's own too, then runs a decode step per byte.
    Returns one dict of results per setting (see the module docstring), against the
    reference as the baseline (rebase() puts them against another)."""
    B, L = x.shape
    dev = next(model.parameters()).device
    ref = ReferencePass(model, x, y, reference, dtype)
    stepwise = decode is not None and chunk == 1
    runs = []
    for kv in settings:
        t0 = time.time()
        dec = decode(kv, B, L, dtype) if stepwise else None
        if progress is not None:
            progress.set_aside(time.time() - t0)  # compiling (or failing to): not a rate the rest will go at
        states = dec.start() if dec is not None else \
            kv.make_caches(model, B, capacity=L, dtype=dtype) if stepwise or kv != reference else None
        runs.append(dict(kv=kv, dec=dec, states=states, nll=torch.zeros(B, L), kl=torch.zeros(B, L), seconds=0.0))
    span = spans(chunk, L)[0]
    xd = x.to(dev)
    for a in range(0, L, span):
        b = min(a + span, L)
        ya = y[:, a:b].to(dev)
        lp_ref = ref.logprobs(a, b)
        for run in runs:
            if run["states"] is None:
                continue  # the reference: filled in below
            t0 = time.perf_counter()
            if chunk > 1:
                logits, run["states"] = model(xd[:, a:b], run["states"])
            else:  # a decode step per byte, its logits kept until the span is scored
                logits = torch.empty(B, b - a, model.config.vocab_size, device=dev)
                for i in range(a, b):
                    if run["dec"] is not None:
                        logits[:, i - a] = run["dec"](xd[:, i:i + 1])  # the compiled decode step
                    else:
                        out, run["states"] = model(xd[:, i:i + 1], run["states"])
                        logits[:, i - a] = out[:, 0]
            lp = F.log_softmax(logits.float(), dim=-1)
            run["nll"][:, a:b] = -lp.gather(-1, ya.unsqueeze(-1)).squeeze(-1).cpu()
            run["kl"][:, a:b] = (lp_ref.exp() * (lp_ref - lp)).sum(-1).clamp(min=0).cpu()
            run["seconds"] += time.perf_counter() - t0
        if progress is not None:
            progress.step(f"{b}/{L} bytes")
    peaks = {}
    for kv in [reference] + list(settings):
        if kv not in peaks:
            peaks[kv] = decoder_peak(model, kv, L, dtype)
    ln2 = math.log(2)
    bpb_ref = ref.nll.mean().item() / ln2
    results = []
    for run in runs:
        kv = run["kv"]
        if run["states"] is None:
            run.update(nll=ref.nll, seconds=ref.seconds)
        r = dict(setting=label(kv, reference), kv_bits_peak=peaks[kv], kv_bits_per_token=peaks[kv] / L,
                 x_smaller=None, bpb=run["nll"].mean().item() / ln2, delta_pct=None,
                 kl_bits=run["kl"].mean().item() / ln2)
        if not math.isfinite(r["bpb"]):
            raise not_finite(f"the loss of {r['setting']}")
        for lo, hi in buckets(block, L):
            r[f"bpb[{lo},{hi})"] = run["nll"][:, lo:hi].mean().item() / ln2
        r.update(bpb_ref=bpb_ref, kv_bits_peak_ref=peaks[reference], bytes_per_s=B * L / max(run["seconds"], 1e-9))
        results.append(r)
    return rebase(results, label(reference), peaks[reference], bpb_ref)


def rebase(results, name, peak, bpb):
    """Put each row against a baseline (its name, peak KV bits per stream and bits per byte):
    x_smaller = the baseline's peak / the row's, delta_pct = the change in bits per byte."""
    for r in results:
        r.update(x_smaller=peak / r["kv_bits_peak"], delta_pct=100 * (r["bpb"] / bpb - 1),
                 baseline=name, bpb_base=bpb, kv_bits_peak_base=peak)
    return results
