"""
Speed of eval_kv.py against the targets of the KV-compression issue, as a markdown table:
  chunk = block_size, no compression           >= 20,000 bytes/s
  chunk = 1 (exact decode), int4 + h2o         >=    300 bytes/s
on a 4-layer, 128-wide model (the CPU recipe's size), 4 streams of 4096 bytes.

    python bench_eval_kv.py                                   # random weights, random bytes
    python bench_eval_kv.py --out_dir=out-shakespeare-char-cpu  # a trained checkpoint and its val split
    python bench_eval_kv.py --stream_len=1024                 # a quicker, rougher look

Bytes/s counts the bytes of all streams, over the whole evaluation (the plain cache's pass and
the compressed one's), by the wall clock: the median of `repeats` evaluations (steadier on a
machine whose timings drift 10-20%) after a first one, shown apart: after eval_kv.py's 2-byte
dry run, it is what one run of eval_kv.py gets, and it also pays for the process's memory
growing. A case whose first evaluation takes over 10 s is timed by that one alone. Bytes
per CPU-second divides by the CPU time this process got instead: on a machine shared with
other work (the load average is printed) it tells what the code does when it has the cores
(with --threads=1, what one core does). Speed does not depend on the weights, so random
ones do.
"""
import os
import sys
import time

import torch

from checkpoint import checkpoint_path, load_model
from configurator import configure
from eval_kv import evaluate, load_streams
from kvpolicy import describe, make_cache_factory
from model import GPT, GPTConfig
from utils import dataset_paths, keep_freed_memory, run_main

# -----------------------------------------------------------------------------
out_dir = ""  # a trained checkpoint's folder; '' = a random 4-layer, 128-wide model
checkpoint_name = "ckpt"  # with out_dir: 'ckpt' or 'last'
block_size = 64  # without out_dir: the chunk of the fast case (the CPU recipe's block_size)
n_streams = 4  # streams evaluated side by side
stream_len = 4096  # bytes per stream
h2o_budget = 0.25  # the decode case keeps this fraction of the stream (half of it as its recent window)
threads = 0  # torch threads (0 = torch's default)
repeats = 3  # timed evaluations after the first (of a case that takes under 10 s); the median is reported
# -----------------------------------------------------------------------------

TARGETS = [("plain cache", 0, "none", 20_000),  # (case, chunk (0 = block_size), policy, bytes/s)
           ("int4 + h2o", 1, "h2o", 300)]


def main():
    configure(globals(), sys.argv[1:])
    keep_freed_memory()  # no page faults on every pass's big tensors (utils)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    if out_dir:
        model, ckpt = load_model(checkpoint_path(out_dir, checkpoint_name), "cpu")
        config = ckpt.get("config") or {}
        block = int(config.get("block_size", block_size))
        x, y = load_streams(dataset_paths(config.get("dataset", "shakespeare_char"))[1], n_streams, stream_len)
    else:
        model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, bias=False, dropout=0.0))
        block = block_size
        data = torch.randint(0, 256, (n_streams, stream_len + 1), generator=torch.Generator().manual_seed(0))
        x, y = data[:, :-1], data[:, 1:]
    model.eval()
    budget = max(1, round(h2o_budget * stream_len))
    h2o = dict(kv_quant="int4", kv_evict="h2o", kv_budget=budget, kv_recent=budget // 2, kv_sink=4)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"model {model.get_num_params() / 1e6:.2f}M parameters, {n_streams} x {stream_len} bytes, "
          f"{torch.get_num_threads()} threads, load average {load:.2f} before the run\n")
    print("| case | chunk | policy | bytes/s | first evaluation | bytes per CPU-second | target | met |")
    print("|---|---:|---|---:|---:|---:|---:|:---:|")
    nbytes = n_streams * stream_len
    for name, chunk, policy, target in TARGETS:
        options = h2o if policy == "h2o" else {}
        mk = make_cache_factory(**options)
        step = chunk or block

        def timed():
            t0, c0 = time.perf_counter(), time.process_time()
            evaluate(model, x, y, [(describe(**options), mk)], step, block=block)
            return time.perf_counter() - t0, time.process_time() - c0

        evaluate(model, x[:1, :2], y[:1, :2], [(describe(**options), mk)], 1, block=block)  # eval_kv's dry run
        first = timed()
        runs = [timed() for _ in range(repeats)] if first[0] < 10 and repeats > 0 else [first]
        wall, cpu = sorted(runs)[len(runs) // 2]  # the median by wall time, and its CPU time
        speed = nbytes / wall
        print(f"| {name} | {step} | {describe(**options)} | {speed:,.0f} | {nbytes / first[0]:,.0f} | "
              f"{nbytes / cpu:,.0f} | {target:,} | {'yes' if speed >= target else 'NO'} |", flush=True)
    if hasattr(os, "getloadavg"):
        print(f"\nload average after the run: {os.getloadavg()[0]:.2f} (other processes share the CPU when it is above "
              f"{torch.get_num_threads()})")


if __name__ == "__main__":
    run_main(main)
