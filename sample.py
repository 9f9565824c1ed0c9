"""
Sample text from a trained model, streaming it as it is generated.

    python sample.py --out_dir=out-shakespeare-char-cpu --kv_window=64   # the CPU recipe: its 64-byte context
    python sample.py --out_dir=out-shakespeare-char
    python sample.py --out_dir=out-shakespeare-char --checkpoint_name=last --num_samples=3
    python sample.py --out_dir=out-shakespeare-char --start=FILE:prompt.txt --max_new_tokens=2000
    python sample.py --out_dir=out-shakespeare-char --kv_window=256 --kv_sink=4
    python sample.py --out_dir=out-shakespeare-char --kv_quant=int4 --kv_evict=h2o --kv_budget=256 --kv_recent=64
    python sample.py --out_dir=out-shakespeare-char --num_samples=8 --max_new_tokens=20000 --kv_window=256 --compile=True

The samples run as one batch: the first streams as it is generated, the others are printed
when the batch is done. Each sample draws its bytes from a generator of its own: sample k
(from 0) is the one --seed=SEED+k draws alone, so the first of 3 samples is the one sample of
--num_samples=1 and more samples only add others.
--compile=True compiles the decode step (generate.StaticDecoder; the compile time is
printed; on a CPU a later run loads it: stepcache.py); it picks the bytes inside the step, the
same text as without it for the same seed.
The speed of the decode steps (tokens/s), the time the prompt took and the size of the KV
cache (in bits) are reported on stderr.
"""
import quiet_start  # first: Ctrl-C during the slow imports below exits quietly
import codecs
import io
import os
import sys
import time

import torch

from checkpoint import load_model
from configurator import configure
from generate import generate_stream, prefill_piece, static_decoder
from kv.peak import least_cache_bytes
from kv.policy import KVOptions
from outdir import checkpoint_path, missing_checkpoint
from devices import autocast_ctx, emulated_note, in_bytes, memory_available, pick_device, pick_dtype, use_threads
from utils import SEED_MAX, UserError, check_range, run_main

quiet_start.done()

# -----------------------------------------------------------------------------
out_dir = "out"  # the folder train.py wrote
checkpoint_name = "ckpt"  # 'ckpt' (best val loss), 'last' (latest), with or without '.pt'
start = "####"  # the prompt, or FILE:path to read it from a file ('####' starts a text in training)
num_samples = 1  # samples to draw
max_new_tokens = 500  # bytes generated per sample
temperature = 0.8  # 1.0 = the model's distribution, < 1.0 more conservative, 0 = greedy
top_k = 200  # sample among the k most likely bytes only (0 = all)
seed = 1337  # random seed: sample k of --num_samples draws from seed + k, as one sample would
device = ""  # 'cpu', 'cuda', 'mps'; '' or 'auto' = the best available
dtype = ""  # 'float32', 'bfloat16', 'float16'; '' = automatic
attention = ""  # '' = the checkpoint's attention; or another kind; a plug-in a checkpoint names runs only if given here too
threads = 0  # torch's CPU threads (0 = automatic: OMP_NUM_THREADS, else the CPUs not busy with other work)
compile = False  # torch.compile the decode step over static caches (eager, with a warning, where it fails); pays only for long samples (RESULTS.md)
# KV cache: kv_window, kv_sink, kv_trim, kv_quant, kv_quant_group, kv_quant_keys, kv_quant_residual,
# kv_evict, kv_budget, kv_recent, with the defaults and meanings of KVOptions in kv/policy.py
globals().update(KVOptions().settings())
# -----------------------------------------------------------------------------


def main():
    echoed = io.StringIO()  # the "Overriding" lines: on stderr after the device line (stdout is the text)
    configure(globals(), sys.argv[1:], echo=echoed)
    if hasattr(sys.stdout, "reconfigure"):  # a console that cannot show a character shows \uXXXX
        sys.stdout.reconfigure(errors="backslashreplace")
    path = checkpoint_path(out_dir, checkpoint_name)
    if not os.path.exists(path):  # before reading the prompt (a folder of that name: read_checkpoint says so)
        raise missing_checkpoint(path)
    prompt = read_prompt(start)
    if max_new_tokens < 0:
        raise UserError(f"--max_new_tokens must be 0 or more, got {max_new_tokens}")
    if num_samples < 1:
        raise UserError(f"--num_samples must be at least 1, got {num_samples}")
    check_range(globals(), "temperature top_k", 0)
    check_range(globals(), "seed", -SEED_MAX, SEED_MAX)
    kv = KVOptions.from_settings(globals()).check().check_unused()

    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    thread_words = use_threads(threads)
    torch.manual_seed(seed)
    model, ckpt = load_model(path, dev, {"attention": attention} if attention else None)
    model.eval()
    notes = [n for n in [emulated_note(dev, dt)] if n]  # printed after the device line, once every setting has passed
    kv = kv.check_model(model.config).for_checkpoint(ckpt.get("config", {}), notes.append,
                                                     model.config.no_kv_cache).check()
    length = len(prompt) + max_new_tokens - 1  # what the last query sees (the last byte drawn is never read)
    notes += [n for n in [kv.local_note(model.config), kv.local_residual(model.config)[1],
                          kv.context_note(model.config, ckpt.get("config") or {}, length)] if n]
    kv.check_trim(model.config)
    if len(prompt) > LONG_PROMPT and prefill_piece(kv, len(prompt)) == len(prompt):
        notes.append(f"note: the {len(prompt):,}-byte prompt is read in one pass, each byte attending to every one "
                     "before it: its time grows with the square of its length (40 kB took 39 s on one thread of a "
                     "2-core CPU with the CPU recipe's model); --kv_window=N reads it in pieces of N")
    print(f"device {dev}, dtype {dt}" + (f", {thread_words}" if dev == "cpu" else "") + f", checkpoint {path}",
          *echoed.getvalue().splitlines(), *notes, sep="\n", file=sys.stderr)
    need, free = least_memory(model, kv, len(prompt), 4 if dt == "float32" else 2), memory_available(dev)
    if free is not None and need > free:
        many = num_samples > 1
        shorter = ", or shorten the prompt" if prefill_piece(kv, len(prompt)) > max_new_tokens else ""
        raise UserError(f"{num_samples} sample{'s' if many else ''} of {len(prompt):,} + {max_new_tokens:,} bytes "
                        f"need{'' if many else 's'} at least {in_bytes(need)} on {dev}, and {in_bytes(free)} is free: "
                        f"lower --num_samples or --max_new_tokens{shorter}"
                        + (", or bound the cache (--kv_window=N)" if kv.kv_window <= 0 and kv.kv_evict == "none" else ""))
    ctx = autocast_ctx(dev, dt)
    # the samples run side by side, one batch of num_samples rows: at the defaults 8 take about
    # as long as 1 (RESULTS.md). The first streams as it is generated, the others print when done.
    idx = torch.tensor([list(prompt)] * num_samples, dtype=torch.long, device=dev)  # (num_samples, T)
    # a generator per row, seeded seed + row: sample k is the one --seed=seed+k draws alone
    generators = [torch.Generator(device=dev).manual_seed(seed + k) for k in range(num_samples)]
    # an incremental decoder holds back the bytes of an incomplete UTF-8
    # character until it is complete; invalid bytes come out as \xNN
    first = codecs.getincrementaldecoder("utf-8")(errors="backslashreplace")
    others = [bytearray(prompt) for _ in range(num_samples - 1)]
    stats = {}
    with torch.no_grad(), ctx:
        step = None
        if compile and max_new_tokens > 1:
            say = lambda line: print(line, file=sys.stderr)
            step = static_decoder(model, kv, num_samples, idx.size(1) + max_new_tokens, say=say,
                                  temperature=temperature, top_k=top_k or None)
            if step is not None and step.compiled:
                say(step.compile_line())
        stamps = [time.time()]  # the start, then each new token's arrival
        shown = bytes(prompt)  # printed with the first new byte: a model or plug-in that fails prints nothing
        try:
            for token in generate_stream(model, idx, max_new_tokens, temperature=temperature, top_k=top_k or None,
                                         kv=kv, stats=stats, generator=generators, decoder=step):
                row = token[:, 0].tolist()  # waits for the token
                stamps.append(time.time())
                write(first.decode(shown + bytes(row[:1])))
                shown = b""
                for text, b in zip(others, row[1:]):
                    text.append(b)
        except KeyboardInterrupt:  # Ctrl-C: the other samples as far as they got, then the usual exit
            if len(stamps) > 1:
                print_samples(first, shown, others, write)
                print(f"stopped after {len(stamps) - 1:,} of {max_new_tokens:,} new bytes"
                      + (f"; the {len(others)} other samples above stop there too" if others else ""), file=sys.stderr)
            raise
    print_samples(first, shown, others, write)

    # the speed of the decode steps (each new token after the first), apart from reading the
    # prompt (the first token comes after it), which a long prompt makes long
    seconds = stamps[-1] - stamps[1] if len(stamps) > 2 else 0.0
    speed = f"{num_samples * (len(stamps) - 2) / seconds:.1f} tokens/s decoding" if seconds > 0 else "no decode steps"
    peak = stats.get("kv_bits_peak", 0) // num_samples  # per sample
    batch = f"{num_samples} samples side by side" if num_samples > 1 else "1 sample"
    fixed = stats.get("kv_bits_fixed", 0) // num_samples  # linear layers' state, per sample
    held = ("a fixed-size linear-attention state" if model.config.no_kv_cache  # per token means nothing
            else f"{stats.get('kv_bits_per_token', 0):,g} bits per cached token"
            + (f" in the softmax layers, plus {fixed:,} bits of fixed-size linear-attention state" if fixed else ""))
    reading = f"; the {len(prompt):,}-byte prompt read in {stamps[1] - stamps[0]:.2f} s" if len(stamps) > 1 else ""
    print(f"{speed} ({batch}{reading}); KV cache peak "
          f"{peak:,} bits per sample ({peak / 8 / 2**20:.2f} MiB), {held}", file=sys.stderr)
    note = kv.unquantized_note(model.config, max(length, len(prompt)))  # (the tokens cached at most)
    if note:
        print(note, file=sys.stderr)
    decode_peak = stats.get("kv_bits_peak_decode", 0) // num_samples
    if kv.kv_evict != "none" and 0 < decode_peak < peak:  # eviction waits for the step after an update
        print(f"note: the peak is the {len(prompt)}-byte prompt, which the cache holds whole after reading it in "
              f"one pass (it evicts at the next step); the decode steps held at most {decode_peak:,} bits per "
              "sample", file=sys.stderr)


LONG_PROMPT = 16384  # bytes past which a prompt read in one pass gets a note on its time


def print_samples(first, shown, others, write):
    """The end of the first sample (streamed so far) and the others whole, each after a line."""
    write(first.decode(shown, final=True) + "\n")
    for text in others:
        write("---------------\n" + text.decode("utf-8", errors="backslashreplace") + "\n")


def least_memory(model, kv, T, width):
    """Bytes that num_samples samples of a T-byte prompt and max_new_tokens new bytes need at
    the least: their KV caches (kv.peak.least_cache_bytes), and for the prompt's bytes prefill
    feeds at once their logits and, inside a block, the MLP's hidden values and their GELU
    (2 x 4 n_embd). width: bytes of a value in the compute dtype (the caches' and logits' too)."""
    c = model.config
    kv_bytes = least_cache_bytes(c, kv, T + max_new_tokens, width)
    return num_samples * (kv_bytes + prefill_piece(kv, T) * (c.vocab_size + 8 * c.n_embd) * width)


def read_prompt(text):
    """The prompt as bytes: the text itself, or the contents of FILE:path. Bytes of the command
    line that are not UTF-8 (Python holds them as surrogates) are given to the model as they were."""
    if text.startswith("FILE:"):
        path = os.path.expanduser(text[len("FILE:"):])  # (~ is not expanded by the shell after FILE:)
        how = "--start=FILE:path reads the prompt from the file at path"
        if os.path.isdir(path):
            raise UserError(f"prompt file {path!r} is a folder; {how}")
        if not os.path.isfile(path):
            raise UserError(f"prompt file {path!r} not found ({how})")
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise UserError(f"prompt file {path!r} cannot be read: {e.strerror or e}") from None
        if not data:
            raise UserError(f"prompt file {path!r} is empty: the model needs at least one byte to start from")
        return data
    if not text:
        raise UserError("the prompt is empty: pass --start=TEXT (the default '####' starts a new text)")
    named = text[len("file:"):] if text[:5].lower() == "file:" else text
    if "\n" not in named and len(named) < 4096 and os.path.isfile(os.path.expanduser(named)):
        print(f"note: the prompt is the text {text!r} itself; to read the file: --start=FILE:{named}", file=sys.stderr)
    return text.encode("utf-8", "surrogateescape")


_line_open = False  # whether the text on stdout lacks its final newline (private: not a setting)


# control characters other than newline, tab and carriage return, shown as \xNN like invalid
# bytes: an undertrained model emits them, and raw they can switch a terminal's character set
SHOWN = {c: f"\\x{c:02x}" for c in (*range(32), 127) if chr(c) not in "\n\t\r"}


def write(text):
    """Print at once: the text appears as it is generated."""
    global _line_open
    sys.stdout.write(text.translate(SHOWN))
    sys.stdout.flush()
    if text:
        _line_open = not text.endswith("\n")


def end_line():
    """Before an error: end the line of text, so that the error does not stick to it."""
    if _line_open:
        write("\n")


if __name__ == "__main__":
    run_main(main, before_error=end_line)
