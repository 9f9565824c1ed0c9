"""
Benchmarks on the current device, printed as markdown tables. Takes the same config files
and --name=value overrides as train.py (a model is built from them with random weights).

    python bench.py config/train_shakespeare_char_cpu.py                 # training + generation
    python bench.py config/train_shakespeare_char_cpu.py --what=generate --baseline=True
    python bench.py config/train_shakespeare_char.py --device=cuda --compile=True

Generation: tokens/s for 256, 1024 and 4096 new tokens with the cache unbounded and
bounded (--bench_kv_window), the KV bits held, time per token early vs late in a long
sample (a bounded cache must not slow down), and process memory. --baseline=True also
times the tutorial's way (concatenate the cache, re-rotate every cached key each step).
Training: ms/iter, tokens/s, MFU against the device's peak where known, peak memory.
"""

import ast
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests"))

from bench_train import bench_train, rss_mb  # noqa: E402
from configurator import configure  # noqa: E402
from model import GPT, GPTConfig, MODEL_ARG_KEYS  # noqa: E402
from utils import (UserError, autocast_ctx, compile_or_eager, keep_freed_memory, pick_device, pick_dtype,  # noqa: E402
                   run_main)


def train_defaults():
    """train.py's settings (its top-level literal assignments), so config files apply here too."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
    out = {}
    for node in ast.parse(open(path).read()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return out


globals().update(train_defaults())
# -----------------------------------------------------------------------------
what = "all"  # "train", "generate" or "all"
bench_kv_window = 256  # the bounded cache of the generation rows
bench_lengths = "256,1024,4096"  # new tokens per generation row
bench_iters = 30  # timed training iterations (after warm-up), per repeat
bench_repeats = 3  # timed runs per training row; the fastest is reported
bench_ablation = False  # training: one row per change between the plain loop and train.py's
baseline = False  # also time the tutorial's concatenate-and-re-rotate decoding (slow)
threads = 0  # torch threads on CPU; 0 = torch's default
# -----------------------------------------------------------------------------


def time_generation(model, n_new, kv_window, device, decode=None):
    """Wall time of each new token (list of seconds since start) and the stats.
    decode: what runs the decode steps (default: the model, eager)."""
    prompt = torch.full((1, 4), ord("#"), dtype=torch.long, device=device)
    stats, stamps = {}, []
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    g = torch.Generator(device=device).manual_seed(0)
    sync()
    t0 = time.perf_counter()
    for _ in model.generate_stream(prompt, n_new, temperature=1.0, top_k=200, kv_window=kv_window,
                                   stats=stats, generator=g, decode=decode):
        sync()
        stamps.append(time.perf_counter() - t0)
    return stamps, stats


def time_baseline(model, n_new, kv_window):
    """The tutorial's decoding: cut history by concatenation, re-rotate all keys each step."""
    from tutorial_reference import TutorialReference
    c = model.config
    ref = TutorialReference(model.state_dict(), c.n_layer, c.n_head, kv_window=kv_window)
    x = torch.full((1, 4), ord("#"), dtype=torch.long)
    t0 = time.perf_counter()
    logits = ref(x)
    for _ in range(n_new - 1):
        probs = torch.softmax(logits[:, -1] / 1.0, dim=-1)
        logits = ref(torch.multinomial(probs, 1))
    return time.perf_counter() - t0


def bench_generate(model, device):
    rows = []
    lengths = [int(s) for s in bench_lengths.split(",")]
    for kv_window in (0, bench_kv_window):
        for n in lengths:
            before = rss_mb()
            stamps, stats = time_generation(model, n, kv_window, device)
            rows.append((n, kv_window or "unbounded", n / stamps[-1], stats["kv_bits_peak"],
                         stats["kv_bits_per_token"], rss_mb() - before))
    print("\n| new tokens | cache | tokens/s | KV bits (peak) | KV bits/token | RSS growth MB |")
    print("|---|---|---|---|---|---|")
    for n, cache, tps, peak, per, mem in rows:
        print(f"| {n} | {cache} | {tps:,.0f} | {peak:,} | {per:,.0f} | {mem:+.1f} |")
    n = max(lengths)
    if n >= 2048:
        stamps, _ = time_generation(model, n, bench_kv_window, device)
        early = (stamps[1280] - stamps[256]) / 1024
        late = (stamps[-1] - stamps[-1025]) / 1024
        print(f"\nkv_window={bench_kv_window}, {n} tokens in {stamps[-1]:.2f} s: {early * 1e3:.3f} ms/token over "
              f"tokens 256..1280, {late * 1e3:.3f} ms/token over the last 1024 ({late / early - 1:+.0%})")
        if baseline:
            t = time_baseline(model, n, bench_kv_window)
            print(f"tutorial-style baseline (concatenate + re-rotate), kv_window={bench_kv_window}: "
                  f"{n} tokens in {t:.2f} s; ours is {t / stamps[-1]:.1f}x faster")
    if compile:
        compare_compiled_decode(model, device, max(lengths))


def compare_compiled_decode(model, device, n):
    """The decode step torch.compile'd vs eager, unbounded cache. (The cache's positions are
    Python ints that change every token, so the compiled step is re-specialised per token
    until torch._dynamo's recompile limit, then runs eager: expect no gain.)"""
    prompt = torch.full((1, 4), ord("#"), dtype=torch.long, device=device)
    t0 = time.perf_counter()
    compiled = compile_or_eager(model, lambda c: list(model.generate_stream(prompt, 16, decode=c)))
    print(f"\ncompiling the decode step took {time.perf_counter() - t0:.1f} s")
    time_generation(model, 64, 0, device, decode=compiled)  # any remaining warm-up
    eager, _ = time_generation(model, n, 0, device)
    fast, _ = time_generation(model, n, 0, device, decode=compiled)
    print(f"decode step compiled: {n / fast[-1]:,.0f} tokens/s for {n} new tokens, eager "
          f"{n / eager[-1]:,.0f} tokens/s ({eager[-1] / fast[-1]:.2f}x)")


def main():
    configure(globals(), sys.argv[1:])
    if what not in ("train", "generate", "all"):
        raise UserError(f"--what={what}: choose train, generate or all")
    if threads:
        torch.set_num_threads(threads)
    dev = pick_device(device)
    if dev == "cpu":
        keep_freed_memory()  # as train.py does
    dt, dt_train = pick_dtype(dev, dtype), pick_dtype(dev, dtype, training=True)
    torch.manual_seed(seed)
    args = {k: globals()[k] for k in MODEL_ARG_KEYS}
    print(f"device {dev}, dtype {dt_train} (training), {dt} (generation), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; model {n_layer}x{n_embd}, {n_head} heads, attention={attention}")
    if what in ("train", "all"):
        bench_train(globals(), args, dev, dt_train)
    if what in ("generate", "all"):
        model = GPT(GPTConfig(**dict(args, dropout=0.0))).to(dev).eval()
        with autocast_ctx(dev, dt):
            bench_generate(model, dev)


if __name__ == "__main__":
    run_main(main)
