"""
Sample text from a trained model, streaming it as it is generated.

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
from kvcache import TrimCache
from kvpolicy import make_cache_factory
from utils import UserError, autocast_ctx, import_function, pick_device, pick_dtype, run_main

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
kv_window = 0  # keep only the last kv_window positions in the KV cache (0 = unbounded)
kv_sink = 0  # with kv_window: also keep the first kv_sink positions
kv_trim = ""  # "package.module:function" choosing the kept tokens instead of the ring buffer (exercise 1)
kv_quant = "none"  # KV cache storage: none, int8, fp8_e4m3, fp8_e5m2, int4, int2, or package.module:function
kv_quant_group = 32  # int4/int2: values per group sharing one scale and zero point
kv_quant_residual = 32  # int4/int2: newest tokens kept in full precision
kv_evict = "none"  # none, window (recency), h2o (cumulative attention score), or package.module:function
kv_budget = 0  # with kv_evict: tokens kept per layer (and KV head)
kv_recent = 0  # with kv_evict=h2o: newest tokens always kept
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
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: train.py writes ckpt.pt and last.pt into --out_dir, e.g. "
                        f"python train.py config/train_shakespeare_char.py --out_dir={out_dir}")
    prompt = read_prompt(start)
    if max_new_tokens < 0 or num_samples < 1 or kv_window < 0 or kv_sink < 0:
        raise UserError("--max_new_tokens, --kv_window and --kv_sink must be 0 or more, --num_samples at least 1")

    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    print(f"device {dev}, dtype {dt}, checkpoint {path}", file=sys.stderr)
    torch.manual_seed(seed)
    model, ckpt = load_model(path, dev)
    model.eval()
    window = kv_window
    xl = ckpt.get("config", {}).get("xl_mem", 0)
    if window == 0 and xl:
        window = xl  # a model trained with XL memory saw at most that much history
        print(f"kv_window={window}: the xl_mem this model was trained with (--kv_window= to change)", file=sys.stderr)
    make_cache = make_cache_factory(kv_quant, kv_quant_group, kv_quant_residual, kv_evict,
                                    kv_budget, kv_recent, kv_sink)
    if kv_trim:
        if make_cache is not None:
            raise UserError("--kv_trim replaces the cache; it does not combine with --kv_quant or --kv_evict")
        trim_fn = import_function(kv_trim, "kv_trim")
        make_cache = lambda layer, **kw: TrimCache(trim_fn=trim_fn, **kw)
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
            for token in model.generate_stream(idx, max_new_tokens, temperature=temperature, top_k=top_k or None,
                                               kv_window=window, kv_sink=kv_sink, make_cache=make_cache,
                                               stats=stats):
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


def write(text):
    """Print at once: the text appears as it is generated."""
    sys.stdout.write(text)
    sys.stdout.flush()


if __name__ == "__main__":
    run_main(main)
