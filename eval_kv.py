"""
The ruler for KV-cache compression: what a cache setting costs in bits per byte and what it
saves in KV bits, next to the same model at the context it was trained for, on long
contiguous stretches of the val split.

    python eval_kv.py --out_dir=out-shakespeare-char-cpu                      # the reference alone
    python eval_kv.py --out_dir=out-shakespeare-char-cpu --kv_quant=int4 --kv_quant_keys=token --kv_quant_residual=8
    python eval_kv.py --out_dir=out-shakespeare-char-cpu --kv_evict=h2o --kv_budget=32 --kv_recent=16 --kv_sink=4 --chunk=1
    python eval_kv.py --out_dir=out-shakespeare-char-cpu --kv_quant=mypkg.quant:quantize   # your own
    python eval_kv.py --out_dir=out-shakespeare-char-cpu --kv_quant=int4 --chunk=1 --compile=True   # exact decode, compiled
    python eval_kv.py --out_dir=out-shakespeare-char-cpu --sweep=quick       # a few minutes
    python eval_kv.py --out_dir=out-shakespeare-char-cpu --sweep=full        # every format and policy
    python eval_kv.py --out_dir=out-mqa --sweep=quick --baseline=out-shakespeare-char-cpu   # another model, same axis
    tensorboard --logdir=out-shakespeare-char-cpu

The reference (--reference=natural) is the checkpoint at its natural context: a plain sliding
window of its xl_mem tokens if it was trained with XL memory, else of its block_size (read
far past what it was trained on, a model is lost, not compressed). A window is the cache's,
as in sample.py: every layer keeps its newest keys and values, so a deeper layer still carries
what its window's tokens saw before it (not a fresh forward over the last bytes alone);
--reference=unbounded is a plain cache of the whole stream (bounded by kv_window/kv_sink if
given). Every setting keeps the reference's history bound unless it sets its own kv_window.
What caches keep in full precision (a plain cache, a quantization residual) is stored at
--dtype, 16-bit by default as on a GPU.

n_streams streams of stream_len bytes, at evenly spaced fixed offsets of the val split, are
fed side by side, chunk bytes per forward (chunk=1 is exact decode: every byte is one step;
the default, the checkpoint's block_size, is much faster but quantizes and evicts once per
chunk). The reference's results do not depend on the chunk (up to float rounding), so its
pass reads one stream at a time in pieces (kv/evaluate.py, ReferencePass). With --chunk=1 --compile=True every
setting whose caches allow it, the reference's own row too, runs the compiled decode step
(generate.StaticDecoder), a byte per step; the others stay eager. Reported per setting: peak KV bits
per stream, the most a token-by-token decoder holds at once (keys and values of every layer
at their stored width), whatever the chunk (kv.peak.decoder_peak); bits per token (peak / tokens of
the stream, the x of the frontier); x smaller (the baseline's peak / the row's); bits per
byte, overall and per position bucket [0, block), [block, 2 block), [2 block, 4 block), ...;
its change against the baseline; the mean KL(reference || setting) of the next-byte
distributions, in bits. The baseline is this checkpoint's reference, or with --baseline=CKPT
another checkpoint's natural reference on the same bytes (e.g. a plain multi-head model, so
that different architectures land on one axis).
A sweep writes eval_kv_<sweep>.csv, .md and .png (bits per byte against KV bits per token,
the frontier marked) into out_dir, and the same scalars to TensorBoard (out_dir/eval_kv_<sweep>).
"""
import quiet_start  # first: Ctrl-C during the slow imports below exits quietly
import os
import re
import sys
from dataclasses import fields, replace

import torch

from attention import PLAIN_SOFTMAX
from checkpoint import load_model, saved_dataset_paths
from configurator import configure
from generate import static_decoders
from kv.evaluate import evaluate, label, least_memory, load_streams, rebase, spans
from kv.policy import KVOptions, saved_tokens
from kv.quant import CHANNEL_KEYS, FORMATS
from kv.report import check_writable, frontier, markdown, write_outputs  # noqa: F401 (frontier: part of eval_kv's API)
from loader import dataset_dir, dataset_paths, same_dataset
from outdir import checkpoint_path
from devices import in_bytes, keep_freed_memory, memory_available, pick_device, use_threads
from utils import Progress, UserError, has_module, run_main

quiet_start.done()

# -----------------------------------------------------------------------------
out_dir = "out"  # the folder train.py wrote; sweep results are written here too
checkpoint_name = "ckpt"  # 'ckpt' (best val loss) or 'last', with or without '.pt'
dataset = ""  # '' = the checkpoint's dataset; or a name under data/, or the path of a folder with val.txt (./mydata)
n_streams = 4  # contiguous stretches of the val split, evaluated side by side
stream_len = 4096  # bytes per stream
chunk = 0  # bytes per forward (0 = the checkpoint's block_size; 1 = exact decode)
reference = "natural"  # 'natural': a plain sliding window of the checkpoint's xl_mem, else block_size; 'unbounded': a plain cache of the whole stream
baseline = ""  # what ratios and changes are against: '' = this checkpoint's reference; or another checkpoint (.pt file or out_dir) at its natural context
dtype = "bfloat16"  # storage of what caches keep in full precision (plain cache, quantization residual): bfloat16, float16 or float32
# KV cache: kv_window, kv_sink, kv_trim, kv_quant, kv_quant_group, kv_quant_keys, kv_quant_residual,
# kv_evict, kv_budget, kv_recent, with the defaults and meanings of KVOptions in kv/policy.py (kv_window=-1:
# the reference's history bound; with --reference=unbounded, kv_window and kv_sink bound the
# reference too)
globals().update(KVOptions().settings())
sweep = ""  # '' = the one setting above; 'quick' or 'full' = a named grid, written into out_dir
device = ""  # 'cpu', 'cuda', 'mps'; '' or 'auto' = the best available
attention = ""  # '' = the checkpoint's attention; or another kind; a plug-in a checkpoint names runs only if given here too
threads = 0  # torch's CPU threads (0 = automatic: OMP_NUM_THREADS, else the CPUs not busy with other work)
tensorboard = True  # sweeps: write the scalars to TensorBoard too
compile = False  # with chunk=1: decode through the compiled static-cache step where a setting allows it, the reference too (RESULTS.md: when it pays)
# -----------------------------------------------------------------------------

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def sweep_settings(kind, span, group, residual, bounded=False):
    """The named grids: a list of KVOptions fields (dicts). Budgets are fractions of `span`,
    the history the rows keep (--kv_window, else the reference's window, or the whole stream;
    a key group per channel that does not fit in it becomes per token); h2o keeps half its
    budget as its recent window (the paper's split). A residual is lowered where it would
    leave nothing to quantize (KVOptions.check): below the span less a key group, and with
    eviction inside the recent half; int4 with per-token keys and a quarter of the residual
    shows what quantization saves in a short window. bounded: the reference has a window,
    and the grid shows the plain unbounded cache too (the model read past its context)."""
    def quant(f, r=residual, keys="channel"):
        keys = "token" if f in CHANNEL_KEYS and group > span else keys  # a channel group would not fit the history
        g = group if f in CHANNEL_KEYS and keys == "channel" else 1
        s = dict(kv_quant=f, kv_quant_group=group, kv_quant_residual=max(min(r, span - g), 0))
        return s if keys == "channel" else dict(s, kv_quant_keys=keys)

    def evict(policy, frac, sink, fmt="none"):
        b = max(round(frac * span), 2 * sink + 2)  # room for the sinks and a recent half
        s = dict(kv_evict=policy, kv_budget=b, kv_sink=sink, kv_recent=b // 2 if policy == "h2o" else 0)
        if fmt != "none":
            s.update(quant(fmt, min(residual, b // 2 - 1)))
        return s

    head = [dict()] + ([dict(kv_window=0, kv_sink=0)] if bounded else [])
    if kind == "quick":
        return head + [quant("int8"), quant("int4"), quant("int2"), quant("int4", residual // 4, "token"),
                       evict("window", 0.25, 4), evict("h2o", 0.25, 4), evict("h2o", 0.25, 4, "int4")]
    if kind == "full":
        grid = head + [quant(f) for f in FORMATS]
        grid += [quant(f, residual // 4, keys) for f in CHANNEL_KEYS for keys in ("channel", "token")]
        grid += [evict(p, frac, s) for p in ("window", "h2o") for frac in (0.5, 0.25, 0.125) for s in (0, 4)]
        grid += [evict("h2o", 0.25, 4, f) for f in ("int8", "fp8_e4m3", "int4", "int2")]
        grid += [evict("h2o", frac, 4, "int4") for frac in (0.5, 0.125)] + [evict("window", 0.25, 4, "int4")]
        return grid
    raise UserError(f"unknown sweep {kind!r}: choose quick or full (or '' for one setting)")


def reference_options(config, how, kv_window=-1, kv_sink=0, say=print, no_cache=False):
    """The reference cache for a checkpoint's saved config: 'natural' = a plain sliding window
    of the most history it was trained with (xl_mem, else block_size); 'unbounded' = a plain
    cache bounded only by kv_window/kv_sink (-1: an XL model's xl_mem, else no bound)."""
    if how == "unbounded":
        return KVOptions(kv_window=kv_window, kv_sink=kv_sink).for_checkpoint(config, say, no_cache)
    if how != "natural":
        raise UserError(f"--reference={how!r}: choose natural or unbounded")
    n = saved_tokens(config, "xl_mem") or saved_tokens(config, "block_size")
    if not n:
        raise UserError("the checkpoint does not record its block_size (or xl_mem), so its natural context "
                        "is unknown: pass --reference=unbounded")
    return KVOptions(kv_window=n)


def chunk_note(settings, step):
    """How a chunk of step > 1 tokens scores settings unlike the token-by-token decoder whose
    bits the table gives ('' where it scores them alike)."""
    if step == 1:
        return ""
    said = []
    if any(s.kv_quant != "none" and (s.kv_quant_residual > 0 or s.key_group() > 1) for s in settings):
        groups = any(s.kv_quant != "none" and s.key_group() > 1 for s in settings)
        said.append("a chunk's tokens past the full-precision residual are quantized before the chunk's own queries "
                    "read them" + (" (and per-channel key groups take their scales from later tokens)" if groups else "")
                    + ", which the decoder does not do (those rows usually score worse)")
    if any(s.kv_evict != "none" for s in settings):
        said.append("eviction runs once per chunk, holding up to a chunk more than its budget meanwhile (those rows "
                    "score better)")
    if any(s.kv_trim for s in settings):
        said.append("a kv_trim rule runs once per chunk: the chunk's queries read what it kept before the chunk and "
                    "every token of the chunk within kv_window, not what it would keep at each token")
    if not said:
        return ""
    return (f"note: at chunk {step} {'; '.join(said)}: the rows score otherwise than the token-by-token decoder whose "
            "bits the table gives; --chunk=1 scores that decoder (slower)")


def residual_twins(settings, results):
    """Rows that differ only in kv_quant_residual and scored exactly alike, as 'a and b' strings."""
    twins = {}
    for opts, r in zip(settings, results):
        if opts.kv_quant != "none":
            key = (replace(opts, kv_quant_residual=0), r["bpb"], r["kl_bits"])
            twins.setdefault(key, []).append(r["setting"])
    return [" and ".join(names) for names in twins.values() if len(names) > 1]


def load_baseline(where, dev, say, dataset):
    """--baseline: a checkpoint (a .pt file, or an out_dir holding ckpt.pt), its model and its
    natural reference; a note when it was trained on another dataset than the one scored."""
    path = where if where.endswith(".pt") else checkpoint_path(where, "ckpt")
    model, ckpt = load_model(path, dev, option="baseline")
    model.eval()
    config = ckpt.get("config") or {}
    if not same_dataset(config.get("dataset") or "", dataset):
        say(f"note: the baseline {path} was trained on {config.get('dataset') or 'a dataset it does not name'}, "
            f"the text scored is {dataset}'s val split: the baseline reads text it did not learn")
    ref = reference_options(config, "natural", say=say)
    if model.config.no_kv_cache:  # every layer linear: its state carries the whole stream, no window
        ref = replace(ref, kv_window=0)
    return path, model, ref


def check_memory(config, settings, ref_kv, step, dev, dt):
    """One error before any work where the streams cannot fit in memory (kv.evaluate.least_memory)."""
    host, on_dev = least_memory(config, settings, ref_kv, n_streams, stream_len, step, dt)
    free_host = memory_available("cpu")
    checks = [(host + on_dev, free_host, "cpu")] if dev == "cpu" else \
        [(host, free_host, "cpu"), (on_dev, memory_available(dev), dev)]
    for need, free, where in checks:
        if free is not None and need > free:
            raise UserError(f"{n_streams:,} streams of {stream_len:,} bytes need at least {in_bytes(need)} on {where}, "
                            f"and {in_bytes(free)} is free: lower --n_streams or --stream_len"
                            + (" (or --chunk)" if step > 1 and where == dev else ""))


def main():
    configure(globals(), sys.argv[1:])
    say = lambda line: print(line, file=sys.stderr)
    keep_freed_memory()  # no page faults on every pass's big tensors (devices.py)
    for name, value, low in (("n_streams", n_streams, 1), ("stream_len", stream_len, 1), ("chunk", chunk, 0)):
        if value < low:
            raise UserError(f"--{name} must be at least {low}, got {value}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype={dtype!r}: choose {', '.join(DTYPES)}")
    if reference not in ("natural", "unbounded"):
        raise UserError(f"--reference={reference!r}: choose natural or unbounded")
    path = checkpoint_path(out_dir, checkpoint_name)
    kv = KVOptions.from_settings(globals())
    grid_own = [f for f in fields(KVOptions) if f.name not in ("kv_window", "kv_sink", "kv_quant_group",
                                                                "kv_quant_residual")]
    given = [f"--{f.name}" for f in grid_own if getattr(kv, f.name) != f.default]
    if sweep and given:  # (before the options' own checks, whose advice would not fit a sweep)
        raise UserError(f"--sweep={sweep} runs its own grid of cache settings: drop {', '.join(given)} "
                        "(kv_window, kv_sink, kv_quant_group and kv_quant_residual do apply to the grid)")
    kv = kv.check()
    if not sweep:
        kv.check_unused()
    # optional packages are looked for now, not when the long run's results are written
    png = bool(sweep) and has_module("matplotlib", "the sweep writes no .png")
    use_tb = bool(sweep) and tensorboard and has_module("tensorboard", "no TensorBoard scalars are written")
    thread_words = use_threads(threads)
    dev = pick_device(device)
    model, ckpt = load_model(path, dev, {"attention": attention} if attention else None)
    model.eval()
    kv.check_model(model.config)
    linear = model.config.no_kv_cache
    if sweep and linear:
        raise UserError("every layer of this model is linear attention (a fixed-size state, no KV cache): "
                        "a --sweep of caches would repeat one row; drop --sweep")
    config = ckpt.get("config") or {}
    name = dataset or config.get("dataset", "")
    if not name:
        raise UserError(f"{path} does not say which dataset it was trained on; pass --dataset=NAME (or a folder with val.txt)")
    if dataset:  # (only its val.txt is read: a folder holding that alone will do)
        held = os.path.join(dataset_dir(dataset), "val.txt")
        val_path = held if os.path.isfile(held) else dataset_paths(dataset)[1]
    else:
        val_path = saved_dataset_paths(name, path)[1]  # the checkpoint's: read only
    # what is not the checkpoint's own: named in the title and in the sweep's file names, so that
    # such a run neither passes for nor replaces the checkpoint's own sweep
    other = []
    if attention and attention != config.get("attention", "softmax"):
        other.append(f"attention={attention}")
    if dataset and not same_dataset(config.get("dataset") or "", dataset):
        say(f"note: {path} was trained on {config.get('dataset') or 'a dataset it does not name'}; the text scored "
            f"is {dataset}'s val split, which it did not learn")
        other.append(f"text of {os.path.basename(os.path.normpath(dataset))}")
    if reference != "natural":
        other.append(f"reference={reference}")
    block = saved_tokens(config, "block_size") or 256
    if sweep:  # settings that change every row of the grid
        other += [f"kv_window={kv_window}"] if kv_window != -1 else []
        other += [f"kv_sink={kv_sink}"] if kv_sink else []
        other += [f"chunk={chunk}"] if chunk and chunk != block else []
    # (the title says the dtype already; the file names say it too)
    tags = other + ([f"dtype={dtype}"] if dtype != "bfloat16" else [])
    if os.path.basename(path) != "ckpt.pt":  # (last.pt's sweep must not replace ckpt.pt's; the title names the file)
        tags.append(os.path.splitext(os.path.basename(path))[0])
    prefix = os.path.join(out_dir, "_".join([f"eval_kv_{sweep}"] + [re.sub(r"[^\w.-]+", "-", o) for o in tags]))
    if sweep:  # the files the sweep writes at its end: writable now, or one error before the long run
        files = [".csv", ".md", ".png"] if png else [".csv", ".md"]
        check_writable(prefix, files, use_tb, "--out_dir")
        if os.path.isfile(prefix + ".csv"):
            say(f"note: this sweep replaces the one in {prefix}.csv (and its table, plot and scalars) when it ends")
    step = chunk or block
    ref_kv = reference_options(config, reference, kv_window, kv_sink, say, linear)
    if linear and ref_kv.kv_window:  # its state carries the whole stream: no window to speak of
        ref_kv = replace(ref_kv, kv_window=0)
    if compile and step != 1:
        say(f"note: --compile=True compiles the decode step of --chunk=1; chunks of {step} run eager")
    window = ref_kv.kv_window
    bound = lambda s: (replace(s, kv_window=window) if s.kv_window == -1 else s).check()  # -1: the reference's
    if sweep:
        span = kv_window if kv_window > 0 else window if kv_window == -1 and window else stream_len  # what rows keep
        grid = sweep_settings(sweep, span, kv_quant_group, kv_quant_residual, bounded=window > 0)
        settings = [bound(KVOptions(**dict(dict(kv_window=kv_window, kv_sink=kv_sink), **s))) for s in grid]
        settings = list(dict.fromkeys([ref_kv] + settings))  # the reference first, also under a window of one's own
        unscored = sorted(model.config.cached_kinds() - set(PLAIN_SOFTMAX))  # kinds h2o cannot rank
        if unscored and any(s.ranks_by_score() for s in settings):
            settings = [s for s in settings if not s.ranks_by_score()]
            say(f"note: the grid leaves out h2o: it ranks keys by softmax scores, which attention="
                f"{unscored[0]} does not give")
        if kv_quant_group > span:
            say(f"note: a key group of kv_quant_group={kv_quant_group} tokens does not fit in the {span} tokens the "
                "rows keep: the grid groups keys per token (/token-keys)")
        lowered = {s.kv_quant_residual for s in settings if s.kv_quant != "none"}
        lowered -= {kv_quant_residual, kv_quant_residual // 4}  # (a quarter: the grid's own rows)
        if lowered:
            say(f"note: the grid lowers kv_quant_residual={kv_quant_residual} to "
                f"{', '.join(map(str, sorted(lowered)))} where it must fit the window or an eviction's recent half (each row's /r says which)")
    else:
        settings = list(dict.fromkeys([ref_kv, bound(kv)]))  # the reference, and the setting if it differs
        settings[-1].check_trim(model.config)
    notes = [s.local_residual(model.config)[1] for s in settings]
    notes += [] if sweep else [kv.local_note(model.config, window),  # as given (kv_window=-1: the reference's bound)
                               settings[-1].context_note(model.config, config, stream_len)]
    if sweep and kv_sink:  # (--kv_sink adds sinks to the grid's rows: the first row with them says where they sit)
        notes += [next((s.context_note(model.config, config, stream_len) for s in settings if s.kv_sink), None)]
    for note in dict.fromkeys(notes):
        if note:
            say(note)
    dt = DTYPES[dtype]
    check_memory(model.config, settings, ref_kv, step, dev, dt)
    x, y = load_streams(val_path, n_streams, stream_len)
    size = os.path.getsize(val_path)
    if n_streams > 1 and n_streams * stream_len + 1 > size:  # evenly spaced: they share bytes (stream_offsets)
        fit = max(1, (size - 1) // stream_len)
        say(f"note: {n_streams} streams of {stream_len:,} bytes overlap in the {size:,}-byte val text, so some bytes "
            f"are scored more than once (the mean leans toward them; {fit} such streams fit side by side)")
    # a dry run of every setting on 2 bytes: an error that depends on the model (or sits in a
    # user's plug-in) shows in seconds, not after the long run
    evaluate(model, x[:1, :2], y[:1, :2], settings, 1, ref_kv, block, dtype=dt)
    base = load_baseline(baseline, dev, say, name) if baseline else None
    if base:
        evaluate(base[1], x[:1, :2], y[:1, :2], [base[2]], 1, base[2], block, dtype=dt)
    note = chunk_note(settings, step)
    if note:
        say(note)
    print(f"{path}: {n_streams} stream{'s' if n_streams != 1 else ''} x {stream_len:,} bytes of {val_path}, chunk {step}, block {block}, "
          f"reference {label(ref_kv)} (history bound {window or 'none'}), full precision stored at {dtype}, "
          f"device {dev}" + (f", {thread_words}" if dev == "cpu" else ""), file=sys.stderr)
    progress = Progress(spans(step, stream_len)[1] * (2 if base else 1), sweep or "eval_kv")
    # chunk = 1 with --compile: every setting whose caches allow it decodes through the
    # compiled step, the reference's own cache too (kv/static.py; the others stay eager)
    steps = lambda m: static_decoders(m, say) if compile and step == 1 else None
    try:
        results = evaluate(model, x, y, settings, step, ref_kv, block, progress, dt, decode=steps(model))
        if base:
            base_path, base_model, base_kv = base
            [b] = evaluate(base_model, x, y, [base_kv], step, base_kv, block, progress, dt, decode=steps(base_model))
            rebase(results, f"{base_path}, {b['setting']}", b["kv_bits_peak"], b["bpb"])
    except KeyboardInterrupt:
        if sweep:  # (a single evaluation writes no file)
            kept = f" ({prefix}.csv is the earlier sweep's, untouched)" if os.path.isfile(prefix + ".csv") else ""
            say(f"\nstopped before the sweep ended: nothing was written{kept}")
        raise
    same = residual_twins(settings, results)
    if same and step > 1:
        say(f"note: at chunk {step} {'; '.join(same)} score alike: a residual shorter than what a chunk quantizes "
            "changes nothing its queries read (only their bits differ); --chunk=1 tells them apart")
    bigger = [(opts, r["setting"]) for opts, r in zip(settings, results)
              if opts.kv_quant != "none" and r["kv_bits_peak"] >= r["kv_bits_peak_ref"]]
    # the tokens a cache holds at most: its window (an unbounded one, the stream), or its eviction budget
    span = lambda o: min(o.kv_window or stream_len, o.kv_budget if o.kv_evict != "none" else stream_len)
    waits = lambda o: 2 * (o.kv_quant_residual + o.key_group() - 1) >= span(o)  # most of them held back
    wider = lambda o: o.kv_window == 0 and ref_kv.kv_window > 0 or o.kv_window > ref_kv.kv_window > 0
    waiting = [name for opts, name in bigger if waits(opts)]
    longer = [name for opts, name in bigger if not waits(opts) and wider(opts)]
    dense = [name for opts, name in bigger if not waits(opts) and not wider(opts)]
    if waiting:
        grouped = any(opts.key_group() > 1 for opts, name in bigger if name in waiting)
        say(f"note: {', '.join(waiting)} hold at least the reference's bits: the full-precision residual (and a key "
            "group waiting to be quantized) fill most of the window; --kv_quant_residual=0"
            + (" --kv_quant_keys=token" if grouped else "") + " quantizes every token")
    if longer:
        say(f"note: {', '.join(longer)} hold at least the reference's bits although every token is quantized: they "
            "keep more tokens than the reference's bound (a longer --kv_window, or none)")
    if dense:
        say(f"note: {', '.join(dense)} hold at least the reference's bits although every token is quantized and "
            "no more tokens are kept: the format stores as many bits per value as full precision, or more")
    # (the title names the reference as it came out: --reference=unbounded under a kv_window is a window)
    named = [f"reference {label(ref_kv)}" if o == f"reference={reference}" else o for o in other
             if not o.startswith("chunk=")]  # (the title says the chunk already)
    title = (f"{os.path.basename(os.path.normpath(out_dir))}/{os.path.basename(path)}: "
             f"{n_streams} x {stream_len} bytes, chunk {step}, full precision at {dtype}"
             + "".join(", " + o for o in named))
    if sweep:
        # the table first: a failed write loses nothing; the chunk's caveat goes into the .md with it
        write_outputs(results, prefix, title, use_tb, png, show=print, notes=[note] if note else [])
        print(f"wrote {prefix}.csv, {prefix}.md" + (f", {prefix}.png" if png else "")
              + (f" and TensorBoard scalars in {prefix}/" if use_tb else ""))
    else:
        print(markdown(results, title))
        stepwise = compile and step == 1  # (then the reference decodes a byte per step too)
        for opts, r in zip(settings, results):
            how = f" (the reference's own pass, in pieces of the stream, not chunks of {step}: a speed of its own)" \
                if opts == ref_kv and not stepwise and (len(settings) > 1 or step < block) else ""
            print(f"{r['setting']}: {r['bytes_per_s']:,.0f} bytes/s{how}")


if __name__ == "__main__":
    run_main(main)
