"""
Sample text from a trained model, streaming it as it is generated.

    python sample.py --out_dir=out-shakespeare-char-cpu --kv_window=64   # the CPU recipe: its 64-byte context
    python sample.py --out_dir=out-shakespeare-char
    python sample.py --out_dir=out-shakespeare-char --checkpoint_name=last --num_samples=3
    python sample.py --out_dir=out-shakespeare-char --start=FILE:prompt.txt --max_new_tokens=2000
    python sample.py --out_dir=out-shakespeare-char --kv_window=256 --kv_sink=4
    python sample.py --out_dir=out-shakespeare-char --kv_quant=int4 --kv_evict=h2o --kv_budget=256 --kv_recent=64

The speed (tokens/s) and the size of the KV cache (in bits) are reported on stderr.
"""
import codecs
import os
import sys
import time

import torch

from checkpoint import checkpoint_path, load_model
from configurator import configure
from generate import generate_stream
from kv.policy import KVOptions
from utils import UserError, autocast_ctx, check_range, pick_device, pick_dtype, run_main, use_threads

# -----------------------------------------------------------------------------
out_dir = "out"  # the folder train.py wrote
checkpoint_name = "ckpt"  # 'ckpt' (best val loss), 'last' (latest), with or without '.pt'
start = "####"  # the prompt, or FILE:path to read it from a file ('####' starts a text in training)
num_samples = 1  # samples to draw
max_new_tokens = 500  # bytes generated per sample
temperature = 0.8  # 1.0 = the model's distribution, < 1.0 more conservative, 0 = greedy
top_k = 200  # sample among the k most likely bytes only (0 = all)
seed = 1337  # random seed
device = ""  # 'cpu', 'cuda', 'mps'; '' = the best available
dtype = ""  # 'float32', 'bfloat16', 'float16'; '' = automatic
attention = ""  # '' = the checkpoint's attention; or another kind; a plug-in a checkpoint names runs only if given here too
threads = 0  # torch's CPU threads (0 = automatic: OMP_NUM_THREADS, else the CPUs not busy with other work)
# KV cache: kv_window, kv_sink, kv_trim, kv_quant, kv_quant_group, kv_quant_residual, kv_evict,
# kv_budget, kv_recent, with the defaults and meanings of KVOptions in kv/policy.py
globals().update(KVOptions().settings())
# -----------------------------------------------------------------------------


def main():
    configure(globals(), sys.argv[1:])
    if hasattr(sys.stdout, "reconfigure"):  # a console that cannot show a character shows \uXXXX
        sys.stdout.reconfigure(errors="backslashreplace")
    if not os.path.isdir(out_dir):
        raise UserError(f"out_dir {out_dir!r} does not exist: train a model first "
                        f"(python train.py config/train_shakespeare_char.py --out_dir={out_dir}) "
                        f"or pass --out_dir=<the folder train.py wrote>")
    path = checkpoint_path(out_dir, checkpoint_name)
    if not os.path.exists(path):  # a folder of that name: read_checkpoint says so
        raise UserError(f"{path} not found: train.py writes ckpt.pt and last.pt into --out_dir, e.g. "
                        f"python train.py config/train_shakespeare_char.py --out_dir={out_dir}")
    prompt = read_prompt(start)
    if max_new_tokens < 0 or num_samples < 1:
        raise UserError("--max_new_tokens must be 0 or more, --num_samples at least 1")
    check_range(globals(), "temperature top_k", 0)
    kv = KVOptions.from_settings(globals()).check()

    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    thread_words = use_threads(threads)
    print(f"device {dev}, dtype {dt}" + (f", {thread_words}" if dev == "cpu" else "") + f", checkpoint {path}",
          file=sys.stderr)
    torch.manual_seed(seed)
    model, ckpt = load_model(path, dev, {"attention": attention} if attention else None)
    model.eval()
    kv = kv.for_checkpoint(ckpt.get("config", {}), say=lambda line: print(line, file=sys.stderr))
    ctx = autocast_ctx(dev, dt)
    idx = torch.tensor([list(prompt)], dtype=torch.long, device=dev)  # (1, T)

    seconds, kv_peak, kv_per_token = 0.0, 0, 0.0
    for k in range(num_samples):
        # an incremental decoder holds back the bytes of an incomplete UTF-8
        # character until it is complete; invalid bytes come out as \xNN
        decoder = codecs.getincrementaldecoder("utf-8")(errors="backslashreplace")
        write(decoder.decode(prompt))
        stats = {}
        t0 = time.time()
        with torch.no_grad(), ctx:
            for token in generate_stream(model, idx, max_new_tokens, temperature=temperature, top_k=top_k or None,
                                         kv=kv, stats=stats):
                write(decoder.decode(bytes([int(token[0, 0])])))  # int() waits for the token
        seconds += time.time() - t0
        write(decoder.decode(b"", final=True) + "\n")
        if k < num_samples - 1:
            write("---------------\n")
        kv_peak = max(kv_peak, stats.get("kv_bits_peak", 0))
        kv_per_token = stats.get("kv_bits_per_token", kv_per_token)

    speed = num_samples * max_new_tokens / seconds if seconds else float("nan")
    print(f"{speed:.1f} tokens/s; KV cache peak {kv_peak:,} bits ({kv_peak / 8 / 2**20:.2f} MiB), "
          f"{kv_per_token:,g} bits per token", file=sys.stderr)


def read_prompt(text):
    """The prompt as bytes: the text itself, or the contents of FILE:path."""
    if text.startswith("FILE:"):
        path = text[len("FILE:"):]
        if not os.path.isfile(path):
            raise UserError(f"prompt file {path!r} not found (--start=FILE:path reads the prompt from path)")
        with open(path, "rb") as f:
            data = f.read()
        if not data:
            raise UserError(f"prompt file {path!r} is empty: the model needs at least one byte to start from")
        return data
    if not text:
        raise UserError("the prompt is empty: pass --start=TEXT (the default '####' starts a new text)")
    return text.encode("utf-8")


_line_open = False  # whether the text on stdout lacks its final newline (private: not a setting)


def write(text):
    """Print at once: the text appears as it is generated."""
    global _line_open
    sys.stdout.write(text)
    sys.stdout.flush()
    if text:
        _line_open = not text.endswith("\n")


def end_line():
    """Before an error: end the line of text, so that the error does not stick to it."""
    if _line_open:
        write("\n")


if __name__ == "__main__":
    run_main(main, before_error=end_line)
