"""
Benchmarks on the current device, printed as markdown tables: training steps, generation
(prefill + decode steps) and eval_kv's passes. Takes train.py's config files and --name=value
overrides; a model with random weights is built from them (speed does not depend on weights).

    python bench.py config/train_shakespeare_char_cpu.py                       # all three
    python bench.py config/train_shakespeare_char_cpu.py --what=train --compile=True --bench_ablation=True
    python bench.py config/train_shakespeare_char_cpu.py --what=generate --baseline=True
    python bench.py config/train_shakespeare_char_cpu.py --what=generate --compile=True --kv_quant=int4
    python bench.py config/train_shakespeare_char_cpu.py --what=eval_kv --stream_len=1024
    python bench.py config/train_shakespeare_char.py --device=cuda --compile=True

train     ms/iter, tokens/s, MFU (where the device's peak is known) and memory of train.py's own
          step (steps.train_step), next to the plain eager loop a tutorial writes (at torch's
          default threads, or at --threads when given); rows timed in turn, bench_repeats runs
          of bench_iters iterations, the fastest run kept.
generate  tokens/s for bench_lengths new tokens (the 4-byte prompt's step included; sample.py
          counts decode steps only) with the cache unbounded and bounded to
          kv_window (256 when not given; one "fixed state" row for linear attention in every layer), eager and (--compile=True) through the compiled
          static-cache step (generate.StaticDecoder, its compile time printed; "compiled text":
          whether it drew the eager run's bytes from the same seed), the KV bits held, time per
          token over the first and the last 1024 of a long sample (a bounded cache must not slow
          down); bench_batch samples side by side against one (compiled on a CPU, also the batch
          step's matrix products alone and reading its caches once: a floor for its time); on CUDA also without CUDA
          graphs, and the fraction of the memory bandwidth used.
          --baseline=True also times the tutorial's way (concatenate, re-rotate every key).
eval_kv   bytes/s of kv.evaluate.evaluate on n_streams x stream_len random bytes against its natural
          reference (a plain window of block_size): the reference's own pass, then a decode step
          per byte (chunk = 1) for the plain cache and int4 in that window, eager and
          (--compile=True) compiled, and int4 + h2o (eager).
The other kv_* options (kv_quant, kv_evict, ...) apply to the generation rows. A setting given for
rows that --what leaves out gets a note saying it is ignored.
"""
import quiet_start  # first: Ctrl-C during the slow imports below exits quietly
import os
import sys
import time

import torch

import train
import train_checks
from configurator import PLAIN_TYPES, configure
from decode_timing import bench_generate, compiled_decoder
from device_peaks import peak_flops
from kv.evaluate import evaluate
from attention import PLAIN_SOFTMAX
from kv.policy import KVOptions
from kv.quant import make_formats
from loader import ByteLoader, dataset_paths
from model import GPT, GPTConfig, MODEL_ARG_KEYS, check_config, loss_fn
from steps import compile_probe, train_step
from devices import autocast_ctx, keep_freed_memory, pick_device, pick_dtype, synchronizer, use_threads
from utils import UserError, check_range, compile_or_eager, run_main

quiet_start.done()

TRAIN_SETTINGS = [k for k, v in vars(train).items() if not k.startswith("_") and isinstance(v, PLAIN_TYPES)]
TORCH_DEFAULT_THREADS = torch.get_num_threads()  # before --threads applies

# train.py's settings (config files apply here as there), then bench.py's own
globals().update({k: getattr(train, k) for k in TRAIN_SETTINGS})
# -----------------------------------------------------------------------------
what = "all"  # "train", "generate", "eval_kv" or "all"
bench_lengths = "256,1024,4096"  # generate: new tokens per row
bench_iters = 30  # train: timed iterations per run
bench_repeats = 3  # train: timed runs per row (the fastest is reported); eval_kv: evaluations (the median)
bench_ablation = False  # train: one row per change between the plain loop and train.py's step
baseline = False  # generate: also time the tutorial's concatenate-and-re-rotate decoding (slow)
n_streams = 4  # eval_kv: streams side by side
stream_len = 4096  # eval_kv: bytes per stream
bench_batch = 8  # generate: also time this many samples side by side against one (1 = skip)
# KV cache: kv_window, kv_sink, kv_trim, kv_quant, ... as in sample.py (KVOptions in kv/policy.py)
globals().update(KVOptions().settings())
# -----------------------------------------------------------------------------


def flops_per_token(model, block):
    """PaLM's estimate (appendix B): 6 FLOPs per parameter per token for the forward and
    backward matmuls, plus the attention scores 12 * n_layer * n_embd * T."""
    c = model.config
    return 6 * model.get_num_params() + 12 * c.n_layer * c.n_embd * block


def rss_mib():
    """Resident memory of this process now (MiB), Linux; 0 elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


class RandomBytes:
    """Stand-in for ByteLoader when the dataset is not prepared: random bytes, same shapes."""

    def __init__(self, device):
        self.shape, self.device = (batch_size, block_size), device

    def next(self):
        x = torch.randint(0, 256, self.shape, device=self.device)
        return x, torch.roll(x, -1, 1), torch.zeros(self.shape[0], dtype=torch.bool, device=self.device)


def make_loader(dev):
    try:
        train_path, _ = dataset_paths(dataset)
    except UserError as e:
        print(f"note: random bytes instead of the dataset ({e})")
        return RandomBytes(dev)
    return ByteLoader(train_path, block_size, batch_size, reset_prob=reset_prob, seed=seed, device=dev)


# -----------------------------------------------------------------------------
# train

def plain_step(model, dev, dt):
    """The loop a tutorial writes: float32, torch's AdamW defaults, no clipping."""
    loader, optimizer = make_loader(dev), torch.optim.AdamW(model.parameters(), lr=learning_rate)

    def step():
        x, y, _ = loader.next()
        logits, _ = model(x)
        loss = loss_fn(logits, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss
    return step, batch_size


def train_py_step(model, dev, dt, compiled=False):
    """steps.train_step itself, as train.py runs it, with train.py's optimizer, scaler, autocast and XL memory."""
    from kv.xl import make_xl_memory
    device_type = dev.split(":")[0]
    loader = make_loader(dev)
    optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
    scaler = torch.amp.GradScaler("cuda", enabled=(device_type == "cuda" and dt == "float16"))
    ctx = autocast_ctx(dev, dt)
    memory = make_xl_memory(model, batch_size, xl_mem) if xl_mem else None
    probe = lambda m: compile_probe(m, dev, ctx, (batch_size, block_size), memory)  # (the path the step takes)
    fast = compile_or_eager(model, probe) if compiled else model
    step = lambda: train_step(fast, optimizer, scaler, loader, ctx, gradient_accumulation_steps, grad_clip, memory)
    return step, gradient_accumulation_steps * batch_size


def bench_train(args, dev, dt):
    n = torch.get_num_threads()  # (use_threads chose them: --threads, OMP_NUM_THREADS or the free CPUs)
    # the plain loop at torch's default threads, unless --threads was given: then every row runs at it
    plain = n if threads > 0 else TORCH_DEFAULT_THREADS
    rows = [("plain eager loop", plain_step, {}, "float32", plain)]
    if bench_ablation and n != plain:
        rows.append((f"+ {n} threads (auto)", plain_step, {}, "float32", n))
    if bench_ablation and dt != "float32":
        rows.append(("train.py step, float32", train_py_step, {}, "float32", n))
    rows.append(("train.py step", train_py_step, {}, dt, n))
    if compile:
        rows.append(("train.py step + compile", train_py_step, {"compiled": True}, dt, n))
    sync = synchronizer(dev)
    # build and warm up every row (its memory is measured here), then time them in turn, so
    # that a burst of other work on a shared machine slows every row, not just one
    runs = []
    if not dev.startswith("cuda"):  # the process's one-time growth (kernels, allocator pools) goes to no row
        warm_step = plain_step(GPT(GPTConfig(**args)).to(dev), dev, "float32")[0]
        for _ in range(5):
            warm_step()
        del warm_step
    for name, make, kw, row_dt, row_threads in rows:
        torch.set_num_threads(row_threads)
        torch.manual_seed(seed)
        before = rss_mib()
        if dev.startswith("cuda"):  # (the earlier rows' models and optimizers are still held: not counted)
            torch.cuda.reset_peak_memory_stats(dev)
            held = torch.cuda.memory_allocated(dev)
        elif dev == "mps":  # (Metal's memory is not in the process's RSS)
            held = torch.mps.current_allocated_memory()
        model = GPT(GPTConfig(**args)).to(dev)
        t0 = time.perf_counter()
        step, rows_per_iter = make(model, dev, row_dt, **kw)
        for _ in range(5):
            step()
        sync()
        if kw.get("compiled"):
            print(f"{name}: compiling and 5 warm-up steps took {time.perf_counter() - t0:.1f} s")
        mem = (torch.cuda.max_memory_allocated(dev) - held) / 2**20 if dev.startswith("cuda") else \
            (torch.mps.current_allocated_memory() - held) / 2**20 if dev == "mps" else rss_mib() - before
        runs.append(dict(name=name, dtype=row_dt, threads=row_threads, step=step, best=float("inf"), mem=mem,
                         tokens=rows_per_iter * block_size, fpt=flops_per_token(model, block_size)))
    for _ in range(bench_repeats):
        for run in runs:
            torch.set_num_threads(run["threads"])
            t0 = time.perf_counter()
            for _ in range(bench_iters):
                loss = run["step"]()
            float(loss.detach())
            sync()
            run["best"] = min(run["best"], (time.perf_counter() - t0) / bench_iters)
    torch.set_num_threads(n)
    cpu = not dev.startswith("cuda")
    print(f"\ntraining: batch {batch_size} x block {block_size}, gradient_accumulation_steps="
          f"{gradient_accumulation_steps}; best of {bench_repeats} x {bench_iters} iterations")
    memory = "peak CUDA memory" if dev.startswith("cuda") else "MPS memory growth" if dev == "mps" else "RSS growth"
    print(f"\n| loop | dtype |{' threads |' if cpu else ''} ms/iter | tokens/s | vs plain | TFLOP/s | MFU | "
          f"{memory} MiB |")
    print("|---|---|" + ("---|" if cpu else "") + "---|---|---|---|---|---|")
    base = runs[0]["tokens"] / runs[0]["best"]
    for run in runs:
        tps = run["tokens"] / run["best"]
        peak = peak_flops(dev, run["dtype"])
        mfu = f"{tps * run['fpt'] / peak:.1%}" if peak else "n/a"
        th = f" {run['threads']} |" if cpu else ""
        print(f"| {run['name']} | {run['dtype']} |{th} {run['best'] * 1e3:.1f} | {tps:,.0f} | {tps / base:.2f}x "
              f"| {tps * run['fpt'] / 1e12:.3g} | {mfu} | {run['mem']:,.0f} |")


# -----------------------------------------------------------------------------
# eval_kv

def eval_cases(b, config):
    """(name, chunk (0 = block_size), cache, decode) rows against eval_kv's natural reference (a
    plain window of block_size): decode None = the reference's one-pass pieces, "eager" = a
    decode step per byte through the eager caches, "compiled" = through the compiled step
    (eval_kv --chunk=1 --compile=True). int4 keeps the reference's window, as eval_kv does.
    No h2o row for a model of an attention kind h2o cannot rank (unscored_kinds)."""
    plain, int4 = KVOptions(kv_window=block_size), KVOptions(kv_window=block_size, kv_quant="int4")
    h2o = KVOptions(kv_window=0, kv_quant="int4", kv_evict="h2o", kv_budget=b, kv_recent=b // 2, kv_sink=4).check()
    rows = [("plain cache", 0, plain, None), ("plain cache", 1, plain, "eager"), ("int4", 1, int4, "eager"),
            ("int4 + h2o (unbounded)", 1, h2o, "eager")]
    if compile:
        rows[3:3] = [("plain cache", 1, plain, "compiled"), ("int4", 1, int4, "compiled")]
    return [r for r in rows if not r[2].ranks_by_score()] if unscored_kinds(config) else rows


def unscored_kinds(config):
    """The attention kinds of config's cached layers that h2o cannot rank keys by (it computes
    softmax itself: any other kind would be replaced by softmax in its row)."""
    return sorted(config.cached_kinds() - set(PLAIN_SOFTMAX))


def bench_eval_kv(model):
    data = torch.randint(0, 256, (n_streams, stream_len + 1), generator=torch.Generator().manual_seed(0))
    x, y = data[:, :-1], data[:, 1:]
    reference = KVOptions(kv_window=block_size)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    n = torch.get_num_threads()
    print(f"\neval_kv: {n_streams} x {stream_len} bytes, reference kv_window={block_size}, {n} "
          f"thread{'s' if n != 1 else ''}, load average {load:.2f} before; bytes/s of the setting itself (as "
          f"eval_kv prints it) and over the whole evaluation (with the reference pass), the median of "
          f"{bench_repeats} after a first one (shown apart: it includes any compilation; a row whose first one "
          "takes a minute or more shows that one alone)")
    print("\n| case | chunk | decode | setting bytes/s | whole bytes/s | first evaluation bytes/s "
          "| bytes per CPU-second |")
    print("|---|---:|---|---:|---:|---:|---:|")
    compiled = []  # what compiling took, said below the table
    # h2o's budget: a quarter of the stream, and at least the 4 sinks + int4's residual of 32 + the step's token
    if unscored_kinds(model.config):
        kind = unscored_kinds(model.config)[0]
        print(f"(no int4 + h2o row: h2o ranks keys by softmax scores, which attention={kind} does not give)")
    for name, chunk, kv, how in eval_cases(max(40, stream_len // 4), model.config):
        step = chunk or block_size
        decode = None
        if how == "eager":
            decode = lambda kv, B, L, dtype: None  # a decode step per byte, eager caches
        elif how == "compiled":  # one decoder for the row's evaluations (each starts it afresh)
            made = []

            def decode(kv, B, L, dtype, made=made, name=name):
                if not made:
                    made.append(compiled_decoder(model, kv, B, L, f"eval_kv {name}", say=compiled.append, dtype=dtype))
                return made[0]

        def timed():
            t0, c0 = time.perf_counter(), time.process_time()
            r = evaluate(model, x, y, [kv], step, reference, block_size, decode=decode)[0]
            return time.perf_counter() - t0, time.process_time() - c0, r["bytes_per_s"]

        evaluate(model, x[:1, :2], y[:1, :2], [kv], 1, reference, block_size)  # eval_kv's dry run
        first = timed()
        runs = [timed() for _ in range(bench_repeats)] if first[0] < 60 else [first]
        # the median by wall time (of an even count, the faster middle one), its CPU time and own speed
        wall, cpu, own = sorted(runs)[(len(runs) - 1) // 2]
        nbytes = x.numel()
        if how == "compiled" and made[0] is None:
            how = "eager (not compiled: below)"
        print(f"| {name} | {step} | {how or 'one pass'} | {own:,.0f} | {nbytes / wall:,.0f} | "
              f"{nbytes / first[0]:,.0f} | {nbytes / cpu:,.0f} |", flush=True)
    if compiled:
        print("", *dict.fromkeys(compiled), sep="\n")


def new_token_counts(text):
    """--bench_lengths as a list of numbers of new tokens (each 1 or more), or one UserError."""
    counts = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            item = repr(part) if part else "an empty item"
            raise UserError(f"--bench_lengths={text}: {item} is not a number of new tokens (1 or more); give "
                            "numbers separated by commas, e.g. --bench_lengths=256,1024")
        counts.append(int(part))
    return counts


def check_settings():
    """bench.py's own settings and train.py's, checked before any benchmark runs (a mistake in
    the last one must not wait for the first ones to finish)."""
    if what not in ("train", "generate", "eval_kv", "all"):
        raise UserError(f"--what={what}: choose train, generate, eval_kv or all")
    new_token_counts(bench_lengths)
    check_range(globals(), "bench_iters bench_repeats bench_batch n_streams stream_len", 1)
    if what == "train" and kv_quant != "none":  # (train.py would train through it: bench's step does not)
        raise UserError(f"--kv_quant={kv_quant} sets the cache of the generation rows; --what=train times "
                        "train.py's step without quantization-aware training: drop it, or --what=generate")
    # (train.py's settings that load, save or stop a run: bench.py builds its models with random weights)
    ignored = [f"--{k}" for k, off in (("init_from", "scratch"), ("eval_only", False), ("overwrite", False),
                                        ("resume_checkpoint_name", "ckpt")) if globals()[k] != off]
    if ignored:
        raise UserError(f"{' and '.join(ignored)}: bench.py times models of the given shape with random weights "
                        "(their speed does not depend on the weights) and writes no checkpoint: drop "
                        + ("it" if len(ignored) == 1 else "them"))
    train_checks.check_settings(globals())  # batch_size, block_size, learning_rate, ... as train.py checks them


def check_caches(config, kv):
    """The caches of the generation rows (kv) and of the eval_kv rows fit a model of config (its
    head dimension, its attention), checked before the benchmarks that come first."""
    if what in ("generate", "all"):
        if kv.kv_window == 0:
            raise UserError("--kv_window=0: the generation table has its unbounded rows already; --kv_window=N "
                            "(N > 0) sets the window of its other rows (default 256)")
        kv.check_model(config)
        if kv.kv_quant != "none":
            make_formats(kv.kv_quant, kv.kv_quant_group, config.head_dim, kv.channel_keys)
    if what in ("eval_kv", "all") and not config.no_kv_cache:
        for name, _, case, _ in eval_cases(max(40, stream_len // 4), config):
            try:
                if case.kv_quant != "none":
                    make_formats(case.kv_quant, case.kv_quant_group, config.head_dim, case.channel_keys)
            except UserError:
                raise UserError(f"eval_kv's row '{name}' groups kv_quant_group={case.kv_quant_group} values, which "
                                f"needs a head dimension (n_embd/n_head) that is a multiple of {case.kv_quant_group}; "
                                f"this model's is {config.head_dim}: change n_embd or n_head, or pick --what=train "
                                "or --what=generate") from None


# bench.py's own settings and the rows they apply to (the kv_* settings: the generation rows)
APPLIES = {"bench_lengths": ("generate",), "baseline": ("generate",), "bench_batch": ("generate",),
           "bench_iters": ("train",), "bench_ablation": ("train",), "bench_repeats": ("train", "eval_kv"),
           "n_streams": ("eval_kv",), "stream_len": ("eval_kv",), **{k: ("generate",) for k in KVOptions().settings()}}


def unused_settings(given):
    """A note naming the settings given (by a flag or a config file) that --what's rows do not read."""
    unused = [k for k in sorted(given) if k in APPLIES and what != "all" and what not in APPLIES[k]]
    if unused:
        print(f"note: {', '.join('--' + k for k in unused)} appl{'ies' if len(unused) == 1 else 'y'} to other rows "
              f"than --what={what}'s: ignored here (--what=all runs every row)")


def main():
    given = set()
    configure(globals(), sys.argv[1:], given=given)
    run_benchmarks(given, {a[2:].split("=")[0] for a in sys.argv[1:] if a.startswith("--")})


def run_benchmarks(given=(), flags=()):
    check_settings()
    unused_settings(given)
    if "out_dir" in flags:  # (config files set it for train.py: only a flag's is said)
        print("note: --out_dir is not read: bench.py times a model of the config's shape with random weights "
              "(speed does not depend on them); sample.py and eval_kv.py read a checkpoint")
    kv = KVOptions.from_settings(globals()).check().check_unused()
    args = {k: globals()[k] for k in MODEL_ARG_KEYS}
    config = GPTConfig(**args)
    check_config(config)
    check_caches(config, kv)
    thread_words = use_threads(threads)
    dev = pick_device(device)
    if dev == "cpu":
        keep_freed_memory()  # as train.py and eval_kv.py do
    if dev.startswith("cuda"):
        torch.set_float32_matmul_precision("high")  # TF32 matmuls, as train.py runs them (and PEAK_FLOPS assumes)
    dt, dt_train = pick_dtype(dev, dtype), pick_dtype(dev, dtype, training=True)
    torch.manual_seed(seed)
    print(f"device {dev}, dtype {dt_train} (training), {dt} (generation, eval_kv), torch {torch.__version__}, "
          f"{thread_words}; model {n_layer}x{n_embd}, {n_head} heads, attention={attention}")
    with torch.device("meta"):  # counted, not allocated
        n_params = sum(p.numel() for p in GPT(config).parameters()) if dev == "cpu" else 0
    if n_params > 5e6:  # e.g. `python bench.py`: the GPU recipe's shape, as train.py warns
        print(f"note: a {n_params / 1e6:.1f}M-parameter model takes a long time on a CPU (an hour or more for "
              "--what=all); the CPU recipe's shape: python bench.py config/train_shakespeare_char_cpu.py", flush=True)
    if what in ("train", "all"):
        bench_train(args, dev, dt_train)
    model = GPT(GPTConfig(**dict(args, dropout=0.0))).to(dev).eval()
    if what in ("generate", "all"):
        with autocast_ctx(dev, dt):
            bench_generate(model, dev, kv, new_token_counts(bench_lengths), compile, baseline, bench_batch)
    if what in ("eval_kv", "all"):
        bench_eval_kv(model)


if __name__ == "__main__":
    run_main(main)
