"""
The ruler for KV-cache compression: what a cache policy costs in bits per byte, next to the
same model with a plain full-precision cache, on long contiguous stretches of the val split.

    python eval_kv.py --out_dir=out-shakespeare-char-cpu                      # the plain cache
    python eval_kv.py --out_dir=out-shakespeare-char-cpu --kv_quant=int4 --kv_quant_group=32
    python eval_kv.py --out_dir=out-shakespeare-char-cpu --kv_evict=h2o --kv_budget=1024 --kv_recent=512 --kv_sink=4 --chunk=1
    python eval_kv.py --out_dir=out-shakespeare-char-cpu --kv_quant=mypkg.quant:quantize   # your own
    python eval_kv.py --out_dir=out-shakespeare-char-cpu --sweep=quick       # a couple of minutes
    python eval_kv.py --out_dir=out-shakespeare-char-cpu --sweep=full        # every format and policy
    tensorboard --logdir=out-shakespeare-char-cpu

n_streams streams of stream_len bytes, at evenly spaced fixed offsets of the val split, are
fed side by side, chunk bytes per forward (chunk=1 is exact decode: every byte is one step;
the default, the checkpoint's block_size, is much faster but quantizes and evicts once per
chunk). The plain cache's results do not depend on the chunk (up to float rounding), so its
pass reads one stream at a time, each in one forward (512 bytes at a time if the attention
is not the fused "softmax" kind); every compressed cache runs at `chunk`. Reported: bits
per byte overall and per position bucket [0, block), [block, 2 block), [2 block, 4 block),
...; the mean KL(plain || compressed) of the next-byte distributions, in bits; KV bits per
token of the stream (peak KV bits / stream tokens, the x of the frontier), KV bits per
cached token (at the end of the stream, summed over layers), peak KV bits, and the ratio
of the peak to the peak of a 16-bit plain cache.
A sweep writes eval_kv_<sweep>.csv, .md and .png (bits per byte against KV bits per token,
the frontier marked) into out_dir, and the same scalars to TensorBoard (out_dir/eval_kv_<sweep>).
kv_window/kv_sink bound the history of both caches (a model trained with XL memory sees no
more); the compression options apply to the compressed cache only.
"""
import csv
import math
import os
import sys
import time

import numpy as np
import torch
from torch.nn import functional as F

from checkpoint import checkpoint_path, load_model
from configurator import configure
from kv.policy import KVOptions, unique
from loader import dataset_paths
from utils import UserError, keep_freed_memory, pick_device, run_main

# -----------------------------------------------------------------------------
out_dir = "out"  # the folder train.py wrote; sweep results are written here too
checkpoint_name = "ckpt"  # 'ckpt' (best val loss) or 'last', with or without '.pt'
dataset = ""  # '' = the checkpoint's dataset; or a name under data/, or a folder with val.txt
n_streams = 4  # contiguous stretches of the val split, evaluated side by side
stream_len = 4096  # bytes per stream
chunk = 0  # bytes per forward (0 = the checkpoint's block_size; 1 = exact decode)
# KV cache: kv_window, kv_sink, kv_trim, kv_quant, kv_quant_group, kv_quant_residual, kv_evict,
# kv_budget, kv_recent, with the defaults and meanings of KVOptions in kv/policy.py; kv_window
# and kv_sink bound the history of the plain cache too, the others apply to the compressed one
globals().update(KVOptions().settings())
sweep = ""  # '' = the one setting above; 'quick' or 'full' = a named grid, written into out_dir
device = ""  # 'cpu', 'cuda', 'mps'; '' = the best available
threads = 0  # CPU threads for torch (0 = torch's default; 1 is faster on a machine busy with other work)
tensorboard = True  # sweeps: write the scalars to TensorBoard too
# -----------------------------------------------------------------------------

REF_CHUNK = 512  # bytes per forward of the plain cache's pass (unless the attention is fused)


def sweep_settings(kind, L, group, residual):
    """The named grids: a list of KVOptions fields (dicts), budgets as fractions of the stream
    length L. h2o keeps half its budget as its recent window (the paper's split); with
    quantization the residual fits in that half."""
    quant = lambda f: dict(kv_quant=f, kv_quant_group=group, kv_quant_residual=residual)

    def evict(policy, frac, sink, fmt="none"):
        b = max(1, round(frac * L))
        s = dict(kv_evict=policy, kv_budget=b, kv_sink=sink, kv_recent=b // 2 if policy == "h2o" else 0)
        if fmt != "none":
            s.update(quant(fmt), kv_quant_residual=min(residual, b // 2))
        return s

    if kind == "quick":
        return [dict(), quant("int8"), quant("int4"), quant("int2"), evict("window", 0.25, 4),
                evict("h2o", 0.25, 4), evict("h2o", 0.25, 4, "int4")]
    if kind == "full":
        grid = [dict()] + [quant(f) for f in ("int8", "fp8_e4m3", "fp8_e5m2", "int4", "int2")]
        grid += [evict(p, frac, s) for p in ("window", "h2o") for frac in (0.5, 0.25, 0.125) for s in (0, 4)]
        grid += [evict("h2o", 0.25, 4, f) for f in ("int8", "fp8_e4m3", "int4", "int2")]
        grid += [evict("h2o", frac, 4, "int4") for frac in (0.5, 0.125)] + [evict("window", 0.25, 4, "int4")]
        return grid
    raise UserError(f"unknown sweep {kind!r}: choose quick or full (or '' for one setting)")


def load_streams(path, n, L):
    """x, y (n, L): n stretches of L + 1 bytes at evenly spaced offsets of the file."""
    data = np.fromfile(path, dtype=np.uint8)
    if len(data) < L + 1:
        raise UserError(f"{path} has {len(data):,} bytes, fewer than stream_len + 1 = {L + 1:,}; lower --stream_len")
    offsets = [i * (len(data) - L - 1) // max(n - 1, 1) for i in range(n)]
    s = torch.from_numpy(np.stack([data[o:o + L + 1] for o in offsets]).astype(np.int64))
    return s[:, :-1], s[:, 1:]


def buckets(block, L):
    """Position buckets [0, block), [block, 2 block), [2 block, 4 block), ... cut at L."""
    edges, e = [0], block
    while edges[-1] < L:
        edges.append(min(e, L))
        e *= 2
    return list(zip(edges[:-1], edges[1:]))


def cache_bits(caches, B):
    """Bits held by all caches (a shared cache once), and the bits one token costs in all of them."""
    uniq = unique(caches)
    per_token = sum(c.size_bits() / (B * c.tokens()) for c in uniq if c.tokens())
    return sum(c.size_bits() for c in uniq), per_token


class Progress:
    """A one-line progress bar with an ETA on stderr (on a terminal; elsewhere a line now and then)."""

    def __init__(self, total, label):
        self.total, self.label, self.done = total, label, 0
        self.t0 = self.last = time.time()
        self.tty = sys.stderr.isatty()

    def step(self, what=""):
        self.done += 1
        now = time.time()
        if not (self.tty or now - self.last > 30 or self.done == self.total):
            return
        if self.tty and now - self.last < 0.2 and self.done < self.total:
            return
        self.last = now
        elapsed = now - self.t0
        eta = elapsed / self.done * (self.total - self.done)
        bar = "#" * int(20 * self.done / self.total)
        line = (f"{self.label} [{bar:<20}] {100 * self.done / self.total:3.0f}% {what} "
                f"elapsed {elapsed:.0f}s, ETA {eta // 60:.0f}:{eta % 60:02.0f}")
        end = "\n" if not self.tty or self.done == self.total else ""
        print(("\r" if self.tty else "") + line.ljust(78), end=end, file=sys.stderr, flush=True)


@torch.no_grad()
def evaluate(model, x, y, settings, chunk, reference, block=256, progress=None):
    """Feed x (B, L) chunk bytes at a time through the reference cache (KVOptions) and, in
    lockstep, through each setting's cache (a list of KVOptions; one that compresses nothing
    is the reference itself, computed once). Returns one dict of results per setting."""
    B, L = x.shape
    ref_states = [None] * B  # the reference cache of each stream, alive while the stream is read
    runs = []
    for kv in settings:
        states = kv.make_caches(model, B, capacity=L) if kv.compressed or kv.kv_trim else None
        runs.append(dict(name=kv.describe(), states=states, nll=torch.zeros(B, L), kl=torch.zeros(B, L),
                         peak=0, per_cached=0.0, seconds=0.0))
    ref = dict(nll=torch.zeros(B, L), peak=0, per_cached=0.0, seconds=0.0)
    dev = next(model.parameters()).device
    # the plain cache's results do not depend on how the text is fed (up to float rounding):
    # with fused attention (no T x S matrix in memory) it reads a whole stream per forward,
    # otherwise REF_CHUNK bytes at a time; both are faster than small chunks. One stream at a
    # time: the same speed as all side by side, 1/B of the memory (and of the fresh pages
    # the first pass page-faults in)
    ref_step = L if model.config.attention == "softmax" else min(L, chunk * -(-REF_CHUNK // chunk))
    for a in range(0, L, chunk):
        xa, ya = x[:, a:a + chunk].to(dev), y[:, a:a + chunk].to(dev)
        if a % ref_step == 0:
            t0 = time.perf_counter()
            lps, bits = [], []
            for b in range(B):
                if a == 0:
                    ref_states[b] = reference.make_caches(model, 1, capacity=L)
                logits, ref_states[b] = model(x[b:b + 1, a:a + ref_step].to(dev), ref_states[b])
                lps.append(F.log_softmax(logits.float(), dim=-1))
                bits.append(cache_bits(ref_states[b], 1))
                if a + ref_step >= L:
                    ref_states[b] = None  # read to the end: its memory serves the next stream
            ref_lp, seg = torch.cat(lps), a
            yr = y[:, a:a + ref_step].to(dev)
            ref["nll"][:, a:a + ref_step] = -ref_lp.gather(-1, yr.unsqueeze(-1)).squeeze(-1).cpu()
            ref["seconds"] += time.perf_counter() - t0
            ref["peak"] = max(ref["peak"], sum(total for total, _ in bits))
            ref["per_cached"] = bits[0][1]
        lp_ref = ref_lp[:, a - seg:a - seg + chunk]
        for run in runs:
            if run["states"] is None:
                continue  # the plain cache: filled in from the reference below
            t0 = time.perf_counter()
            logits, run["states"] = model(xa, run["states"])
            lp = F.log_softmax(logits.float(), dim=-1)
            run["nll"][:, a:a + chunk] = -lp.gather(-1, ya.unsqueeze(-1)).squeeze(-1).cpu()
            run["kl"][:, a:a + chunk] = (lp_ref.exp() * (lp_ref - lp)).sum(-1).clamp(min=0).cpu()
            run["seconds"] += time.perf_counter() - t0
            _track(run, run["states"], B)
        if progress is not None:
            progress.step(f"{min(a + chunk, L)}/{L} bytes")
    bits16 = ref["peak"] * 16 / (8 * next(model.parameters()).element_size())
    ln2 = math.log(2)
    bpb_ref = ref["nll"].mean().item() / ln2
    results = []
    for run in runs:
        if run["states"] is None:
            run.update(nll=ref["nll"], peak=ref["peak"], per_cached=ref["per_cached"], seconds=ref["seconds"])
        bpb = run["nll"].mean().item() / ln2
        r = dict(setting=run["name"], bpb=bpb, bpb_ref=bpb_ref, delta_pct=100 * (bpb / bpb_ref - 1),
                 kl_bits=run["kl"].mean().item() / ln2, kv_bits_per_token=run["peak"] / (B * L),
                 kv_bits_per_cached_token=run["per_cached"], kv_bits_peak=run["peak"],
                 ratio_16bit=run["peak"] / bits16, bytes_per_s=B * L / max(run["seconds"], 1e-9))
        for lo, hi in buckets(block, L):
            r[f"bpb[{lo},{hi})"] = run["nll"][:, lo:hi].mean().item() / ln2
        results.append(r)
    return results


def _track(run, states, B):
    bits, per_token = cache_bits(states, B)
    run["peak"] = max(run["peak"], bits)
    run["per_cached"] = per_token  # at the end of the stream


def frontier(results):
    """Indices of the settings no other beats on both KV bits per token and bits per byte."""
    order = sorted(range(len(results)), key=lambda i: (results[i]["kv_bits_per_token"], results[i]["bpb"]))
    best, keep = float("inf"), []
    for i in order:
        if results[i]["bpb"] < best:
            best = results[i]["bpb"]
            keep.append(i)
    return set(keep)


def markdown(results, title):
    """The results as markdown: the frontier table, the settings within 1%, the buckets."""
    front = frontier(results)
    lines = [f"### {title}", "", "| setting | KV bits/token | bits/cached token | peak vs 16-bit cache | "
             "bits/byte | vs plain | KL (bits) | frontier |", "|---|---:|---:|---:|---:|---:|---:|:---:|"]
    for i, r in enumerate(results):
        lines.append(f"| {r['setting']} | {r['kv_bits_per_token']:,.0f} | {r['kv_bits_per_cached_token']:,.0f} | "
                     f"{r['ratio_16bit']:.3f} | {r['bpb']:.4f} | {r['delta_pct']:+.2f}% | {r['kl_bits']:.5f} | "
                     f"{'*' if i in front else ''} |")
    # within 1% either way: a setting that lowers bits per byte by more has changed the model
    # (e.g. cut a history it cannot use), it has not kept it
    close = [r["setting"] for r in results if abs(r["delta_pct"]) <= 1.0]
    lines += ["", f"Within 1% of the plain cache's {results[0]['bpb_ref']:.4f} bits per byte: "
              + (", ".join(close) if close else "none") + ".", ""]
    cols = [k for k in results[0] if k.startswith("bpb[")]
    lines += ["| setting | " + " | ".join(c[3:] for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    lines += [f"| {r['setting']} | " + " | ".join(f"{r[c]:.4f}" for c in cols) + " |" for r in results]
    return "\n".join(lines) + "\n"


def plot(results, path, title):
    """bits per byte against KV bits per token (log scale), the frontier joined in red."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5.5))
    xs = [r["kv_bits_per_token"] for r in results]
    ys = [r["bpb"] for r in results]
    ax.scatter(xs, ys, color="tab:blue", zorder=2)
    for r, x_, y_ in zip(results, xs, ys):
        ax.annotate(r["setting"], (x_, y_), fontsize=7, xytext=(4, 3), textcoords="offset points")
    front = sorted(frontier(results), key=lambda i: xs[i])
    ax.plot([xs[i] for i in front], [ys[i] for i in front], "o-", color="tab:red", label="frontier", zorder=3)
    ax.axhline(results[0]["bpb_ref"], color="gray", ls="--", lw=1, label="plain cache")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV bits per token of the stream (peak KV bits / tokens)")
    ax.set_ylabel("bits per byte")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(results, prefix, title, use_tb):
    """prefix.csv, prefix.md, prefix.png and TensorBoard scalars in the folder prefix/."""
    with open(prefix + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(results[0]))
        w.writeheader()
        w.writerows(results)
    md = markdown(results, title)
    with open(prefix + ".md", "w") as f:
        f.write(md)
    plot(results, prefix + ".png", title)
    if use_tb:
        try:
            from torch.utils.tensorboard import SummaryWriter  # slow import, only when used
        except ImportError:
            print("note: tensorboard is not installed; no TensorBoard scalars written", file=sys.stderr)
            return md
        with SummaryWriter(prefix) as tb:
            for i, r in enumerate(results):  # step = the setting's row in the table
                for k in ("bpb", "kl_bits", "kv_bits_per_token", "ratio_16bit", "delta_pct"):
                    tb.add_scalar(f"eval_kv/{k}", r[k], i)
                tb.add_scalar("eval_kv/bpb_vs_kv_bits_per_token", r["bpb"], round(r["kv_bits_per_token"]))
            tb.add_text("eval_kv/table", md)
    return md


def main():
    configure(globals(), sys.argv[1:])
    keep_freed_memory()  # no page faults on every pass's big tensors (utils)
    for name, value, low in (("n_streams", n_streams, 1), ("stream_len", stream_len, 1), ("chunk", chunk, 0)):
        if value < low:
            raise UserError(f"--{name} must be at least {low}, got {value}")
    path = checkpoint_path(out_dir, checkpoint_name)
    kv = KVOptions.from_settings(globals()).check()
    if sweep:
        if kv.compressed or kv_budget or kv_recent or kv_trim:
            raise UserError(f"--sweep={sweep} runs its own grid of kv_quant/kv_evict settings; drop them "
                            "(kv_quant_group and kv_quant_residual do apply to the grid)")
        grid = [dict(s, kv_window=kv_window, kv_sink=s.get("kv_sink", kv_sink))
                for s in sweep_settings(sweep, stream_len, kv_quant_group, kv_quant_residual)]
        settings = [KVOptions(**s).check() for s in grid]
    else:
        settings = [KVOptions(kv_window=kv_window, kv_sink=kv_sink)] + ([kv] if kv.compressed or kv_trim else [])
    if threads < 0:
        raise UserError(f"--threads must be 0 (torch's default) or more, got {threads}")
    if threads:
        torch.set_num_threads(threads)
    dev = pick_device(device)
    model, ckpt = load_model(path, dev)
    model.eval()
    config = ckpt.get("config") or {}
    name = dataset or config.get("dataset", "")
    if not name:
        raise UserError(f"{path} does not say which dataset it was trained on; pass --dataset=NAME (or a folder with val.txt)")
    _, val_path = dataset_paths(name)
    block = int(config.get("block_size", 0) or 256)
    step = chunk or block
    say = lambda line: print(line, file=sys.stderr)
    settings = [s.for_checkpoint(config, say=lambda line: None) for s in settings]
    reference = KVOptions(kv_window=kv_window, kv_sink=kv_sink).for_checkpoint(config, say)
    window = reference.kv_window
    x, y = load_streams(val_path, n_streams, stream_len)
    # a dry run of every setting on 2 bytes: an error that depends on the model (or sits in a
    # user's plug-in) shows in seconds, not after the long run
    evaluate(model, x[:1, :2], y[:1, :2], settings, 1, reference, block)
    print(f"{path}: {n_streams} streams x {stream_len:,} bytes of {val_path}, chunk {step}, "
          f"block {block}, history bound {window or 'none'}, device {dev}", file=sys.stderr)
    progress = Progress(len(range(0, stream_len, step)), sweep or "eval_kv")
    results = evaluate(model, x, y, settings, step, reference, block, progress)
    title = (f"{os.path.basename(os.path.normpath(out_dir))}/{os.path.basename(path)}: "
             f"{n_streams} x {stream_len} bytes, chunk {step}")
    if sweep:
        prefix = os.path.join(out_dir, f"eval_kv_{sweep}")
        print(write_outputs(results, prefix, title, tensorboard))
        print(f"wrote {prefix}.csv, {prefix}.md, {prefix}.png" + (f" and TensorBoard scalars in {prefix}/" if tensorboard else ""))
    else:
        print(markdown(results, title))
        for r in results:
            print(f"{r['setting']}: {r['bytes_per_s']:,.0f} bytes/s")


if __name__ == "__main__":
    run_main(main)
