"""
The KV study: how small, in bits, can the KV cache get, training-free and with a few gradient
steps? From one base checkpoint it fine-tunes trained reductions (each K iterations of
train.py's resume), evaluates each under a grid of training-free cache settings with
eval_kv's ruler, and writes one frontier, every row against the plain multi-head base at its
natural context (a 16-bit sliding window of its block_size).

    python train.py config/train_shakespeare_char_cpu_long.py --threads=1      # the base, 15-25 min
    python kv_study.py --base=out-shakespeare-char-cpu-long --quick=True          # ~10 min on a CPU
    python kv_study.py --base=out-shakespeare-char-cpu-long                        # the full study
    python kv_study.py --base=out-shakespeare-char-cpu --what=context              # assignment 1
    tensorboard --logdir=out-shakespeare-char-cpu-long/kv_study

Writes into `out` (default <base dir>/kv_study, or kv_study_quick): one folder per variant
(its fine-tuned last.pt, train.log, finetune.json, results.json), frontier.csv, frontier.md
(the table, and the largest reduction within 1% and within 3% with the commands that
reproduce it), frontier.png (bits per byte against log peak KV bits, a colour per variant,
the frontier, the baseline), TensorBoard scalars in frontier/. finetune.json and results.json
record the settings a variant's fine-tune and rows came from: a rerun skips what it would
redo with the same settings and redoes the rest, saying which settings changed; delete a
variant's folder to redo it anyway.

Variants (--variants=a,b,...): base (no fine-tune), base_ft (K more iterations, unchanged: the
control), gqa/mqa (K/V heads mean-pooled), local (window block/4 in the lower half of the
layers, kv_share=2), qat_int4, qat_int2 (quantization-aware training, kv/qat.py),
mqa_share_int2 (MQA + kv_share=2 + int2 QAT), mqa_share_int2_local (the same with every
layer's window at block/4), gqa_int2 (2 K/V heads + int2 QAT) and gqa_int2_local (the same with
every layer's window at block/8).
Yardstick: the base's rows are judged against the base; a fine-tuned variant's rows against
the worse-looking of the base and base_ft (the same K iterations, nothing reduced), so neither
extra training nor a fine-tune that overfits passes for a reduction's gain or cost
(--yardstick=same_training: base_ft; --yardstick=base: the base). x smaller is always against
the base.
Grid: plain, int8, int4, int2 (residual 0: every token at its format; int4/int2 keys per
token) at windows of block, block/2, block/4, block/8: a chunk scores these as the decoder
does. Two kinds of row it does not: eviction (h2o) reads a chunk with more than its budget in
sight (better than the decoder), and KIVI's per-channel keys are grouped and quantized before
the chunk's own queries read them (worse: RESULTS.md, "Per-channel keys, decoded"). Those
rows (exact_grid()) run only at --evict_chunk (1 = exact decode, slow; 0 = none of them).

--what=context answers assignment 1: bits per byte on positions [block, 4 block) of a base
trained at `block`, after 0, 25, 50, ... iterations of fine-tuning at 4 x block (an unbounded
cache), next to the base reading the same bytes with a sliding window of its block. Writes
the table into kv_study_context/context.md beside the base (--out: another folder), and each
fine-tune into a folder of its own there (kv/study_context.py).
"""
import quiet_start  # first: Ctrl-C during the slow imports below exits quietly
import os
import shlex
import sys
import time

import eval_kv
from checkpoint import load_model
from configurator import configure
from kv.evaluate import evaluate, rebase, spans
from kv.policy import KVOptions
from kv.quant import CHANNEL_KEYS, GROUPED, make_formats
from kv.report import check_writable
from kv import study_finetune
from kv.study_context import context, iteration_counts
from kv.study_finetune import (again_command, base_block, base_identity, base_streams, changes, fine_tune_command,
                               fine_tune_state, hyper)
from kv.study_report import write_frontier
from kv.study_variants import check_train_args, check_variants, variant_args
from fileio import read_json, write_json
from outdir import checkpoint_path, make_folder
from resume import saved_iteration
from devices import keep_freed_memory, use_threads
from utils import Progress, UserError, check_range, run_main, stop_on_sigterm

quiet_start.done()

# -----------------------------------------------------------------------------
base = "out-shakespeare-char-cpu-long"  # the base checkpoint: a .pt file, or an out_dir holding ckpt.pt
out = ""  # the study's folder ('' = kv_study or kv_study_quick beside the base checkpoint)
what = "frontier"  # 'frontier' (the KV study) or 'context' (assignment 1: fine-tuning at 4x the block)
quick = False  # a small study: fewer variants and settings, K=50, 2 streams x 1024 bytes
variants = ""  # comma-separated variants ('' = all; quick: base,base_ft,mqa,qat_int2,mqa_share_int2)
iters = 1000  # K: fine-tuning iterations per variant (quick: 50)
learning_rate = 1e-3  # peak learning rate of the fine-tunes (warm-up K/10, cosine to min_lr)
min_lr = 1e-4  # final learning rate of the fine-tunes
kv_quant_group = 32  # int4/int2: values per group, at training (QAT) and evaluation alike
n_streams = 4  # val streams evaluated side by side (quick: 2)
stream_len = 4096  # bytes per stream (quick: 1024)
chunk = 0  # bytes per forward in the evaluation (0 = the block_size)
evict_chunk = 0  # chunk of the h2o and per-channel-key rows (1 = exact decode, slow; 0 = none of them)
dtype = "bfloat16"  # storage of what caches keep in full precision (eval_kv's --dtype)
context_iters = "0,25,50,100,200,400"  # what=context: fine-tuning iterations at 4x the block
context_streams = 64  # what=context: val streams of 4 x block bytes
train_args = ""  # more train.py arguments for every fine-tune, space-separated (e.g. "--batch_size=8")
threads = 0  # CPU threads of every step (0 = automatic: OMP_NUM_THREADS, else the CPUs not busy with other work)
yardstick = "strict"  # fine-tuned rows against: 'strict' the worse of base and base_ft, 'same_training' base_ft (trained as long), 'base' the base
tensorboard = True  # TensorBoard scalars of the frontier (and of each fine-tune)
# -----------------------------------------------------------------------------

# the settings each --what does not read (a note names those given)
IGNORED_BY = {"frontier": ("context_iters", "context_streams"),
              "context": ("quick", "variants", "iters", "kv_quant_group", "n_streams", "stream_len", "chunk",
                          "evict_chunk", "yardstick")}
QUICK = dict(iters=50, n_streams=2, stream_len=1024, variants="base,base_ft,mqa,qat_int2,mqa_share_int2")
HERE = os.path.dirname(os.path.abspath(__file__))


GRID_VERSION = 4  # raised whenever grid(), exact_grid() or their rows' fields change: older rows are then redone


def grid(block, fast):
    """The training-free settings (KVOptions) of each variant: quantization with no
    full-precision residual (every token at its format as soon as it arrives; int4/int2 keys
    per token, as QAT trains them), at the natural window and at smaller ones: rows a chunk of
    bytes scores as the token-by-token decoder does."""
    q = lambda f, w, keys="token": KVOptions(kv_window=w, kv_quant=f, kv_quant_group=kv_quant_group,
                                             kv_quant_residual=0, kv_quant_keys=keys)
    windows = (block, block // 4) if fast else (block, block // 2, block // 4, block // 8)
    formats = ("none", "int4", "int2") if fast else ("none", "int8", "int4", "int2")
    rows = [q(f, w) if f != "none" else KVOptions(kv_window=w) for w in windows for f in formats if w > 0]
    return rows


def exact_grid(block, fast):
    """The rows a chunk scores unlike the decoder (eval_kv.chunk_note), run at --evict_chunk:
    KIVI's per-channel int4/int2 keys (which wait for a group of kv_quant_group tokens) at the
    natural window, and h2o at a budget of block/4 (half of it the recent window), plain and
    int4 (per-token keys)."""
    b = max(block // 4, 8)
    channel = [KVOptions(kv_window=block, kv_quant=f, kv_quant_group=kv_quant_group, kv_quant_residual=0,
                         kv_quant_keys="channel") for f in ("int4", "int2")]
    return ([] if fast else channel) + [
        KVOptions(kv_window=block, kv_evict="h2o", kv_budget=b, kv_recent=b // 2, kv_sink=4),
        KVOptions(kv_window=block, kv_evict="h2o", kv_budget=b, kv_recent=b // 2, kv_sink=4, kv_quant="int4",
                  kv_quant_group=kv_quant_group, kv_quant_residual=0)]


# -- fine-tunes (kv/study_finetune.py), with this study's settings --------------------------

def fine_tune(base_path, folder, args, k, config, block=None):
    """study_finetune.fine_tune with this study's settings."""
    return study_finetune.fine_tune(base_path, folder, args, k, config, hyper(globals()), block)


def here(text):
    """A command with the paths under this directory written from it (the study keeps absolute
    paths, so a rerun from elsewhere still finds its folders)."""
    return text.replace(os.path.join(os.getcwd(), ""), "")


# -- evaluation ------------------------------------------------------------------------------

def idle_on(kv, c):
    """Whether part of kv (KVOptions) cannot act on a model (GPTConfig c) whose every softmax
    layer is local: per-channel keys whose group outgrows the window (nothing is quantized),
    or an eviction budget the window never reaches (nothing is evicted). Such a row is
    another row's cache under a label that says otherwise."""
    softmax = [i for i in range(c.n_layer) if not c.keeps_state(i)]
    if not softmax or not all(c.is_local(i) for i in softmax):
        return False
    never_quantized = kv.kv_quant != "none" and kv.key_group() > c.window
    never_evicts = kv.kv_evict != "none" and kv.kv_budget >= c.window
    return never_quantized or never_evicts


def evaluate_variant(path, x, y, settings, step, block, label):
    """kv.evaluate.evaluate of one checkpoint under settings (each sets its own window: the
    study's grid), against its own natural reference."""
    model, ckpt = load_model(path, "cpu", option=None)
    model.eval()
    ref = eval_kv.reference_options(ckpt.get("config") or {}, "natural", say=lambda s: None)
    idle = [s for s in settings if idle_on(s, model.config)]
    if idle:
        w = model.config.window
        print(f"  note: every softmax layer of {label} attends {w} back, where a per-channel key group of more "
              f"tokens never fills and an eviction budget of {w} or more never binds: "
              f"{', '.join(s.describe() for s in idle)} would hold the cache of another row, so they are left out")
    progress = Progress(spans(step, x.size(1))[1], f"  {label}")
    settings = [ref] + [s for s in settings if s != ref and s not in idle]
    rows = evaluate(model, x, y, settings, step, ref, block, progress, eval_kv.DTYPES[dtype])
    for r, kv in zip(rows, settings):
        r.update(kv.settings())  # the fields, for the command that reproduces the row
    c = model.config
    softmax = [i for i in range(c.n_layer) if not c.keeps_state(i)]
    if softmax and all(c.is_local(i) for i in softmax):  # (eval_kv's local_note, for the grid as a whole)
        print(f"  note: every softmax layer of {label} attends {c.window} back, so its rows that differ only in a "
              f"kv_window of {c.window} or more hold the same cache (their labels name a bound that does not bind)")
    return rows


def study():
    base_path = os.path.abspath(base if base.endswith(".pt") else checkpoint_path(base, "ckpt"))
    folder = os.path.abspath(out or os.path.join(os.path.dirname(base_path), "kv_study_quick" if quick else "kv_study"))
    base_model, ckpt = load_model(base_path, "cpu", option="base")
    if base_model.config.no_kv_cache:
        raise UserError(f"every layer of {base_path} is linear attention (a fixed-size state, no KV cache): "
                        "there is no cache to shrink; study a softmax base")
    config = ckpt.get("config") or {}
    block, c = base_block(config, base_path), base_model.config
    n_layer = c.n_layer
    make_formats(GROUPED[0], kv_quant_group, c.n_embd // c.n_head, True)  # every grouped row's (not a variant's) error
    todo = [(v, variant_args(v, block, n_layer, kv_quant_group)) for v in variant_names()]
    check_variants(todo, base_model, config, base)
    x, y = base_streams(config, base_path, n_streams, stream_len)
    step = chunk or block
    settings = grid(block, quick)
    # every row on 2 bytes of the base: a setting no variant can hold (a kv_quant_group that
    # does not divide the head size) is one line now, not after the fine-tunes
    ref = eval_kv.reference_options(config, "natural", say=lambda s: None)
    dry = settings + (exact_grid(block, quick) if evict_chunk else [])
    evaluate(base_model.eval(), x[:1, :2], y[:1, :2], [s for s in dry if s != ref], 1, ref, block,
                     dtype=eval_kv.DTYPES[dtype])
    make_folder(folder, "out")  # (after the checks: a refused study leaves no empty folder)
    check_writable(os.path.join(folder, "frontier"), [".csv", ".md", ".png"], tensorboard, "--out")
    variant_names(say=lambda line: print(line, file=sys.stderr))  # (the note, once nothing is refused)
    eval_cmd = (f"--n_streams={n_streams} --stream_len={stream_len} --dtype={dtype} "
                f"{shlex.quote('--baseline=' + base_path)}")
    rows, t0, spent = [], time.time(), {"fine-tune": [], "evaluation": []}  # seconds of each done here
    tuned, measured = run_settings(ckpt, base_path, step)
    states = {name: fine_tune_state(os.path.join(folder, name), args, tuned) for name, args in todo}
    for n, (name, args) in enumerate(todo):
        vdir = os.path.join(folder, name)
        done, ft_done = os.path.join(vdir, "results.json"), os.path.join(vdir, "finetune.json")
        ft, ended, trained = states[name]
        record = read_json(done)  # the evaluation's settings and rows
        # the rows depend on the evaluation's settings and, for a fine-tuned variant, on its fine-tune
        wanted = measured if args is None else dict(measured, **{"fine-tune": tuned})
        # where its rows come from and how they are made again, from this run's paths (a rerun from
        # another directory, or of a moved study, reuses the rows but not their old paths)
        ckpt_path = os.path.join(vdir, "last.pt") if args is not None else base_path
        train_cmd = "" if args is None else again_command(base_path, vdir, fine_tune_command(
            vdir, args, iters, config, hyper(globals())))
        if trained and isinstance(record, dict) and record.get("settings") == wanted:
            print(f"[{n + 1}/{len(todo)}] {name}: finished before, skipped", file=sys.stderr)
            rows += [dict(r, checkpoint=ckpt_path, train_command=train_cmd) for r in record["rows"]]
            continue
        if record is not None or ft:  # a study with other settings, or one from before they were recorded
            why = []
            if args is not None and not trained:
                if not ft and os.path.exists(os.path.join(vdir, "train.log")):  # (the record comes at the end)
                    why = ["its last fine-tune did not finish"]
                else:
                    why = changes(ft.get("settings", {}), tuned) or [
                        f"its last.pt (iteration {ended}) is not the end of the fine-tune recorded"]
            why += changes(record.get("settings", {}) if isinstance(record, dict) else {}, measured)
            print(f"[{n + 1}/{len(todo)}] {name}: done before with other settings "
                  f"({', '.join(dict.fromkeys(why)) or 'its fine-tune was redone since'}), redone", file=sys.stderr)
        print(f"[{n + 1}/{len(todo)}] {name}" + (f": fine-tuning {iters} iterations" if not trained else ""),
              file=sys.stderr)
        t1 = time.time()
        if not trained:
            ft = {"settings": tuned, "command": fine_tune(base_path, vdir, args, iters, config)}
            ft["last_iter"] = saved_iteration(os.path.join(vdir, "last.pt"))
            write_json(ft_done, ft)
            spent["fine-tune"].append(time.time() - t1)
        t1 = time.time()
        found = [dict(r, chunk=step) for r in evaluate_variant(ckpt_path, x, y, settings, step, block, name)]
        if evict_chunk:
            found += [dict(r, chunk=evict_chunk) for r in evaluate_variant(
                ckpt_path, x, y, exact_grid(block, quick), evict_chunk, block, f"{name} at chunk {evict_chunk}")[1:]]
        for r in found:
            r.update(variant=name, train_command=train_cmd, checkpoint=ckpt_path)
        write_json(done, {"settings": wanted, "rows": found})
        rows += found
        spent["evaluation"].append(time.time() - t1)
        left = [(v, None if states[v][2] else a) for v, a in todo[n + 1:]]  # (a finished fine-tune is not redone)
        print(f"  {name} done; elapsed {time.time() - t0:.0f}s, {eta(left, spent)}", file=sys.stderr)
    judge(rows, base_path)
    for r in rows:
        r["eval_command"] = here(eval_command(r, eval_cmd))
        r["train_command"] = here(r["train_command"])
    title = (f"{os.path.basename(os.path.dirname(os.path.abspath(base_path)))}: {n_streams} x {stream_len} bytes, "
             f"chunk {step}" + (f" (h2o and per-channel keys: chunk {evict_chunk})" if evict_chunk else ""))
    write_frontier(rows, os.path.join(folder, "frontier"), title, yardstick, tensorboard, show=print)
    print(f"wrote {here(folder)}/frontier.csv, .md, .png", file=sys.stderr)


def variant_names(say=None):
    """--variants as a list, base first: every row is measured against the base's plain cache,
    so the base is evaluated whether or not it was asked for (a note through say, e.g. print)."""
    names = list(dict.fromkeys(v.strip() for v in variants.split(",") if v.strip()))
    if not names:
        raise UserError(f"--variants={variants}: no variant named; give names separated by commas, e.g. "
                        "--variants=base,base_ft,mqa")
    if "base" not in names and say is not None:
        say("note: base added to --variants: every row is measured against the base's plain cache")
    return ["base"] + [v for v in names if v != "base"]


def run_settings(ckpt, base_path, step):
    """What a variant's results depend on, as recorded beside them: (fine-tune, evaluation).
    A rerun with other settings redoes what they change instead of reusing stale rows."""
    base_id = base_identity(ckpt, base_path)
    tuned = dict(base_id, iters=iters, learning_rate=learning_rate, min_lr=min_lr, kv_quant_group=kv_quant_group,
                 train_args=train_args)
    measured = dict(base_id, n_streams=n_streams, stream_len=stream_len, chunk=step, evict_chunk=evict_chunk,
                    dtype=dtype, kv_quant_group=kv_quant_group, quick=quick, grid=GRID_VERSION)
    return tuned, measured


def eta(todo, spent):
    """'ETA m:ss' of the variants left, from the mean fine-tune and evaluation times of this run
    (a fine-tune costs far more than an evaluation, so they are counted apart)."""
    n_ft = sum(args is not None for _, args in todo)
    if n_ft and not spent["fine-tune"]:
        return "ETA after the first fine-tune"
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0
    left = n_ft * mean(spent["fine-tune"]) + len(todo) * mean(spent["evaluation"])
    return f"ETA {left // 60:.0f}:{left % 60:02.0f}"


def judge(rows, base_path):
    """Put every row against the plain multi-head base at its natural context (x_smaller,
    delta_base_pct) and against its yardstick (delta_pct, yardstick: see yardstick_of)."""
    refs = {r["variant"]: r for r in rows if r["variant"] in ("base", "base_ft") and "(reference)" in r["setting"]}
    if "base" not in refs:
        return
    b = refs["base"]
    rebase(rows, f"{here(base_path)}, {b['setting']}", b["kv_bits_peak"], b["bpb"])
    for r in rows:
        y = yardstick_of(r, refs)
        r.update(delta_base_pct=r["delta_pct"], yardstick=y, delta_pct=100 * (r["bpb"] / refs[y]["bpb"] - 1))


def yardstick_of(row, refs):
    """The plain multi-head model (its natural reference) a row's change in bits per byte is
    counted against. The base's own (training-free) rows: the base. A fine-tuned variant had K
    more iterations, which may help (an undertrained base) or hurt (one that overfits), so
    base_ft, the base fine-tuned as long with nothing reduced, is the control: --yardstick=strict
    (the default) takes whichever of base and base_ft makes the row look worse, same_training
    takes base_ft, base the base."""
    if row["variant"] == "base" or yardstick == "base" or "base_ft" not in refs:
        return "base"
    if yardstick == "same_training":
        return "base_ft"
    return max(("base", "base_ft"), key=lambda y: row["bpb"] / refs[y]["bpb"])


def eval_command(r, common):
    """The eval_kv.py command that reproduces row r (parsed back from its setting's fields)."""
    kv = {k: r[k] for k in r if k.startswith("kv_") and k in KVOptions().settings()}
    if kv.get("kv_quant") not in CHANNEL_KEYS:
        kv.pop("kv_quant_keys", None)  # (apply to some formats only: eval_kv refuses them elsewhere)
    if kv.get("kv_quant") not in GROUPED:
        kv.pop("kv_quant_group", None)
    flags = " ".join(f"--{k}={v}" for k, v in kv.items() if v != KVOptions().settings()[k] or k == "kv_window")
    d = os.path.dirname(r["checkpoint"])
    return (f"python {shlex.quote(os.path.join(HERE, 'eval_kv.py'))} {shlex.quote('--out_dir=' + d)} "
            f"{shlex.quote('--checkpoint_name=' + os.path.basename(r['checkpoint']))} {flags} --chunk={r['chunk']} {common}")


def main():
    given = set()  # the settings a flag or a config file sets
    configure(globals(), sys.argv[1:], given=given)
    if quick:  # the quick study's values, except those given by a flag or a config file
        globals().update({k: v for k, v in QUICK.items() if k not in given})
    if not variants:
        globals()["variants"] = ("base,base_ft,gqa,mqa,local,qat_int4,qat_int2,mqa_share_int2,"
                                 "mqa_share_int2_local,gqa_int2,gqa_int2_local")
    if what not in ("frontier", "context"):
        raise UserError(f"--what={what!r}: choose frontier or context")
    if what == "frontier":
        variant_names()  # an empty list is one line now
    unused = [k for k in IGNORED_BY[what] if k in given]
    if unused:
        print(f"note: {', '.join('--' + k for k in unused)} appl{'ies' if len(unused) == 1 else 'y'} to "
              f"--what={'context' if what == 'frontier' else 'frontier'} only: ignored here")
    check_range(globals(), "iters n_streams stream_len kv_quant_group context_streams", 1)
    check_range(globals(), "chunk evict_chunk learning_rate min_lr", 0)
    if min_lr > learning_rate:  # (train.py refuses it: say so before any fine-tune starts)
        raise UserError(f"--min_lr={min_lr:g} is above --learning_rate={learning_rate:g}: the fine-tunes' rate would "
                        "rise where it should decay; lower --min_lr (learning_rate / 10 is usual)")
    iteration_counts(context_iters)  # a typo here is one line now, not a traceback after the base's evaluation
    check_train_args(train_args)
    if yardstick not in ("strict", "same_training", "base"):
        raise UserError(f"--yardstick={yardstick!r}: choose strict, same_training or base")
    if dtype not in eval_kv.DTYPES:
        raise UserError(f"--dtype={dtype!r}: choose {', '.join(eval_kv.DTYPES)}")
    keep_freed_memory()
    use_threads(threads)
    try:
        with stop_on_sigterm():  # as Ctrl-C: a fine-tune running is stopped, what finished is kept
            study() if what == "frontier" else context(globals(), eval_kv.DTYPES[dtype])
    except KeyboardInterrupt:
        print("\ninterrupted: the same command goes on from here (what finished is kept, what was cut short is "
              "done again)", file=sys.stderr)
        raise


if __name__ == "__main__":
    run_main(main)
