"""
The training half of bench.py: ms/iter, tokens/s, MFU and memory of a training step on the
current device, for the model and settings train.py would use (same config files and
--name=value overrides), next to the plain eager loop a tutorial would write.

    python bench.py config/train_shakespeare_char_cpu.py --what=train
    python bench.py config/train_shakespeare_char_cpu.py --what=train --compile=True --bench_ablation=True
    python bench.py config/train_shakespeare_char.py --what=train --device=cuda --compile=True

Rows are timed in turn, bench_repeats runs of bench_iters iterations each after a warm-up, and
the fastest run is kept (on a shared machine the slow runs are those other work interrupted):
  plain eager loop   model(x) (which also fills a KV cache), loss, backward, AdamW with torch's
                     defaults, zero_grad; float32 (no TF32); one micro-step per iteration; torch's default
                     number of threads (the other rows use --threads where given)
  train.py loop      what train.py runs: return_states=False (no cache), the configured AdamW
                     (fused), autocast in train.py's dtype (bfloat16 on GPUs and on CPUs with
                     bf16 instructions), gradient clipping, gradient accumulation,
                     set_to_none zero_grad, no host sync inside the step
  + compile          the same with torch.compile (--compile=True)
--bench_ablation=True adds one row per change between the two, to see which of them pays.
"""
import os
import time

import torch

from model import GPT, GPTConfig, loss_fn
from utils import ByteLoader, UserError, autocast_ctx, compile_or_eager, dataset_paths

TORCH_DEFAULT_THREADS = torch.get_num_threads()  # before bench.py applies --threads

# dense peak FLOP/s from the vendors' data sheets: (bfloat16/float16 tensor cores, TF32), the
# first name found in torch.cuda.get_device_name(); float32 runs use TF32 (train.py turns it on)
PEAK_FLOPS = [
    ("H200", 989e12, 495e12),
    ("H100 PCIe", 756e12, 378e12),
    ("H100", 989e12, 495e12),
    ("A100", 312e12, 156e12),
    ("L40S", 362e12, 183e12),
    ("L4", 121e12, 60e12),
    ("A10", 125e12, 62.5e12),
    ("V100", 125e12, 15.7e12),  # float16 only; no TF32 (plain float32)
]


def peak_flops(device, dtype, tf32=True):
    """The device's dense peak FLOP/s for dtype, or None where unknown (CPUs, other GPUs,
    float32 without TF32)."""
    if not device.startswith("cuda") or (dtype == "float32" and not tf32):
        return None
    name = torch.cuda.get_device_name(device)
    for key, half, tf32 in PEAK_FLOPS:
        if key in name:
            return tf32 if dtype == "float32" else half
    return None


def flops_per_token(model, block_size):
    """PaLM's estimate (appendix B): 6 FLOPs per parameter per token for the forward and
    backward matmuls, plus the attention scores 12 * n_layer * n_embd * T."""
    c = model.config
    return 6 * model.get_num_params() + 12 * c.n_layer * c.n_embd * block_size


def rss_mb():
    """Resident memory of this process now (MB), Linux; 0 elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


class RandomBytes:
    """Stand-in for ByteLoader when the dataset is not prepared: random bytes, same shapes."""

    def __init__(self, block_size, batch_size, device):
        self.shape, self.device = (batch_size, block_size), device

    def next(self):
        x = torch.randint(0, 256, self.shape, device=self.device)
        return x, torch.roll(x, -1, 1), torch.zeros(self.shape[0], dtype=torch.bool, device=self.device)


def make_loader(g, dev):
    try:
        train_path, _ = dataset_paths(g["dataset"])
    except UserError as e:
        print(f"note: random bytes instead of the dataset ({e})")
        return RandomBytes(g["block_size"], g["batch_size"], dev)
    return ByteLoader(train_path, g["block_size"], g["batch_size"], reset_prob=g["reset_prob"], seed=g["seed"], device=dev)


def plain_step(model, loader, g, dev, dt):
    """The loop a tutorial writes."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=g["learning_rate"])

    def step():
        x, y, _ = loader.next()
        logits, _ = model(x)
        loss = loss_fn(logits, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss
    return step, g["batch_size"]


def train_py_step(model, loader, g, dev, dt, cache=False, optimizer="configured", clip=True):
    """train.py's inner loop (its XL memory too, with --xl_mem). The keyword arguments undo
    one optimisation each, for the ablation rows: cache=True fills a KV cache in the forward,
    optimizer="default" or "fused" replaces model.configure_optimizers, clip=False skips clipping."""
    device_type = dev.split(":")[0]
    if optimizer == "configured":
        optimizer = model.configure_optimizers(g["weight_decay"], g["learning_rate"], (g["beta1"], g["beta2"]), device_type)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=g["learning_rate"], fused=optimizer == "fused" or None)
    scaler = torch.amp.GradScaler("cuda", enabled=(device_type == "cuda" and dt == "float16"))
    ctx = autocast_ctx(dev, dt)
    micro_steps = g["gradient_accumulation_steps"]
    memory = model.new_xl_states(g["batch_size"], g["xl_mem"]) if g["xl_mem"] else None
    params = [p for p in model.parameters() if p.requires_grad]
    fast = model

    def step():
        for _ in range(micro_steps):
            x, y, restarted = loader.next()
            with ctx:
                if memory is not None:
                    for state in {id(s): s for s in memory}.values():
                        state.restart(restarted)
                logits, _ = fast(x, memory, return_states=cache or memory is not None)
                loss = loss_fn(logits, y) / micro_steps
            scaler.scale(loss).backward()
        if clip and g["grad_clip"] > 0.0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, g["grad_clip"])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def compile_step():
        nonlocal fast
        x = torch.zeros(g["batch_size"], g["block_size"], dtype=torch.long, device=dev)

        def probe(m):
            try:
                with ctx:
                    logits, _ = m(x, return_states=False)
                logits.float().mean().backward()
            finally:
                model.zero_grad(set_to_none=True)
        fast = compile_or_eager(model, probe)
    step.compile = compile_step
    return step, micro_steps * g["batch_size"]


def bench_train(g, args, dev, dt):
    """Print the training table for the settings g (bench.py's globals) and model args."""
    threads = torch.get_num_threads()
    rows = [("plain eager loop", plain_step, {}, "float32", TORCH_DEFAULT_THREADS)]
    if g["bench_ablation"]:
        if threads != TORCH_DEFAULT_THREADS:
            rows.append((f"+ --threads={threads}", plain_step, {}, "float32", threads))
        rows += [("+ return_states=False (no KV cache)", train_py_step, dict(optimizer="default", clip=False),
                  "float32", threads),
                 ("+ fused AdamW", train_py_step, dict(optimizer="fused", clip=False), "float32", threads),
                 ("+ clipping, as configured", train_py_step, {}, "float32", threads)]
        if dt != "float32":
            rows.append((f"+ {dt} autocast (= train.py loop)", train_py_step, {}, dt, threads))
    else:
        rows.append(("train.py loop", train_py_step, {}, dt, threads))
    if g["compile"]:
        rows.append(("train.py loop + compile", train_py_step, {"compile": True}, dt, threads))
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.startswith("cuda") else (lambda: None)
    set_tf32 = (lambda on: torch.set_float32_matmul_precision("high" if on else "highest")) \
        if dev.startswith("cuda") else (lambda on: None)
    # a few untimed steps first, so that the process's one-time set-up counts in no row's memory
    model = GPT(GPTConfig(**args)).to(dev)
    step, _ = plain_step(model, RandomBytes(g["block_size"], g["batch_size"], dev), g, dev, "float32")
    for _ in range(2):
        step()
    del model, step

    # build and warm up every row (its memory is measured here), then time them in turn, so
    # that a burst of other work on a shared machine slows every row, not just one
    runs = []
    for name, make, kw, row_dt, row_threads in rows:
        tf32 = make is not plain_step  # train.py turns TF32 on for CUDA; the plain loop does not
        torch.set_num_threads(row_threads)
        set_tf32(tf32)
        kw = dict(kw)
        want_compile = kw.pop("compile", False)
        torch.manual_seed(g["seed"])
        before = rss_mb()
        if dev.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(dev)
        model = GPT(GPTConfig(**args)).to(dev)
        step, rows_per_iter = make(model, make_loader(g, dev), g, dev, row_dt, **kw)
        if want_compile:
            t0 = time.perf_counter()
            step.compile()
            print(f"{name}: compiling took {time.perf_counter() - t0:.1f} s")
        for _ in range(5):
            step()
        sync()
        mem = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.startswith("cuda") else rss_mb() - before
        runs.append(dict(name=name, dtype=row_dt, threads=row_threads, tf32=tf32, step=step, best=float("inf"), mem=mem,
                         tokens=rows_per_iter * g["block_size"], fpt=flops_per_token(model, g["block_size"])))
    for _ in range(g["bench_repeats"]):
        for run in runs:
            torch.set_num_threads(run["threads"])
            set_tf32(run["tf32"])
            t0 = time.perf_counter()
            for _ in range(g["bench_iters"]):
                loss = run["step"]()
            loss.item()
            sync()
            run["best"] = min(run["best"], (time.perf_counter() - t0) / g["bench_iters"])
    torch.set_num_threads(threads)

    print(f"\ntraining: batch {g['batch_size']} x block {g['block_size']}, gradient_accumulation_steps="
          f"{g['gradient_accumulation_steps']}; best of {g['bench_repeats']} x {g['bench_iters']} iterations")
    cpu = not dev.startswith("cuda")
    print(f"\n| loop | dtype |{' threads |' if cpu else ''} ms/iter | tokens/s | vs plain | TFLOP/s | MFU | "
          f"{'RSS growth MB' if cpu else 'peak CUDA memory MB'} |")
    print("|---|---|" + ("---|" if cpu else "") + "---|---|---|---|---|---|")
    base = runs[0]["tokens"] / runs[0]["best"]
    for run in runs:
        tps = run["tokens"] / run["best"]
        peak = peak_flops(dev, run["dtype"], run["tf32"])
        mfu = f"{tps * run['fpt'] / peak:.1%}" if peak else "n/a"
        th = f" {run['threads']} |" if cpu else ""
        print(f"| {run['name']} | {run['dtype']} |{th} {run['best'] * 1e3:.1f} | {tps:,.0f} | {tps / base:.2f}x "
              f"| {tps * run['fpt'] / 1e12:.3g} | {mfu} | {run['mem']:,.0f} |")
