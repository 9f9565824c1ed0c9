"""
Small helpers shared by the scripts: errors for bad user input, bytes <-> tokens, device and
dtype choice, the byte data loader, dataset preparation and atomic checkpoint writes.

    python -c "import utils; print(utils.encode('hé'), utils.decode(utils.encode('hé')))"
    python -c "import utils; print(utils.pick_device('auto'), utils.pick_dtype('auto', 'auto'))"
    python -c "import utils; print(utils.dataset_paths('shakespeare_char'))"
"""
import ctypes
import os
import re
import shutil
import sys
import urllib.request
from contextlib import nullcontext

import numpy as np
import torch

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
MARK = b"####"  # shown where the text jumps: a row restarted, or the text wrapped around


class UserError(Exception):
    """A mistake in the user's input. The message is one line: what is wrong, what to do."""


def run_main(fn):
    """Run a script's main: a UserError becomes one line on stderr and exit code 2."""
    try:
        return fn()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except NotImplementedError as e:  # a plugged-in exercise stub the student has not written yet
        print(f"error: not implemented yet: {e} (python -m exercises.check all shows what is missing)",
              file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)  # the user knows they pressed Ctrl-C; no traceback needed


def import_function(spec, option):
    """The function named by "package.module:function" (a user's plug-in), or a UserError."""
    import importlib
    mod_name, _, fn_name = spec.partition(":")
    if not mod_name or not fn_name:
        raise UserError(f"--{option}={spec!r}: expected package.module:function")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"--{option}={spec!r} does not import: {e}") from None
    if not callable(fn):
        raise UserError(f"--{option}={spec!r} is not a function")
    return fn


# -----------------------------------------------------------------------------
# tokens are raw UTF-8 bytes: the vocabulary is always 256

def encode(s):
    """str -> LongTensor (T,) of its UTF-8 bytes."""
    return torch.from_numpy(np.frombuffer(s.encode("utf-8"), dtype=np.uint8).astype(np.int64))


def decode(ids):
    """Byte ids -> str. A model can emit invalid UTF-8 (or we cut a character in two), so bad
    bytes are shown as backslash escapes instead of raising."""
    if torch.is_tensor(ids):
        ids = ids.tolist()
    return bytes(ids).decode("utf-8", errors="backslashreplace")


# -----------------------------------------------------------------------------
# device and precision, decided once at start-up

def _mps_available():
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def pick_device(device):
    """"" or "auto" -> the best available of cuda, mps, cpu; an explicit name is checked."""
    if device in ("", "auto"):
        return "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    m = re.fullmatch(r"cpu|mps|cuda(?::(\d+))?", device)
    if m is None:
        raise UserError(f"--device={device}: unknown device; use auto, cpu, cuda, cuda:N or mps")
    use = "use --device=auto or --device=cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device={device}: CUDA is not available here; {use}")
        if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
            raise UserError(f"--device={device}: this machine has "
                            f"{torch.cuda.device_count()} CUDA device(s)")
    if device == "mps" and not _mps_available():
        raise UserError(f"--device={device}: MPS is not available here; {use}")
    return device


def cpu_has_bf16():
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX): there bfloat16
    matmuls run 2-3x faster than float32 ones; elsewhere they are emulated and slower."""
    return any(getattr(torch.cpu, name, lambda: False)()
               for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def pick_dtype(device, dtype, training=False):
    """"" or "auto" -> bfloat16 on GPUs that support it, else float16 on cuda; for training on
    a CPU with native bfloat16, bfloat16; float32 elsewhere (inference on the CPU, MPS)."""
    device_type = device.split(":")[0]
    if dtype in ("", "auto"):
        if device_type == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "bfloat16" if device_type == "cpu" and training and cpu_has_bf16() else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"--dtype={dtype}: unknown dtype; use auto, float32, bfloat16 or float16")
    if dtype == "float16" and device_type == "cpu":
        raise UserError("--dtype=float16 is for GPUs; on the CPU use --dtype=bfloat16 or --dtype=float32")
    return dtype


def autocast_ctx(device, dtype):
    """Mixed precision (torch.autocast) for bfloat16/float16; a no-op context for float32."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))


def no_autocast(device_type):
    """A context that turns autocast off for code meant to run at full precision (a no-op,
    and nearly free, when autocast is off: this sits on the decode step)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


def keep_freed_memory():
    """Ask glibc's malloc to keep the memory a process frees, for its next allocations.
    By default it maps each big block (above a threshold of at most 32 MB) fresh from the OS
    and unmaps it on free, and trims its heap, so every step over big activations touches
    new pages: measured on a 2-core CPU, 60-120k page faults in a forward over 4 x 4096 bytes
    side by side (~0.1 s of 0.9 s), 15% of a float32 training step of the GPU recipe. The
    price: the process keeps the memory it once used. A no-op off Linux/glibc."""
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(-4, 0)  # M_MMAP_MAX = 0: serve big blocks from the heap, not one mapping each
    mallopt(-1, 2 ** 31 - 1)  # M_TRIM_THRESHOLD: never give the heap's free top back


def compile_or_eager(fn, probe):
    """torch.compile(fn), tried once by probe(compiled): compilation is lazy, so this is
    where it would fail (no C++ compiler, an unsupported platform or Python). On failure,
    fn itself and one warning line on stderr. The global RNG is left as the probe found it."""
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        compiled = torch.compile(fn)
        probe(compiled)
    except Exception as e:  # any failure inside the compiler stack means: run eager
        import torch._dynamo as dynamo
        dynamo.reset()  # forget what was half-compiled
        first = (str(e).strip().splitlines() or [""])[0][:200]
        print(f"warning: torch.compile failed, running eager ({type(e).__name__}: {first})",
              file=sys.stderr, flush=True)
        compiled = fn
    finally:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    return compiled


# -----------------------------------------------------------------------------
# data

class ByteLoader:
    """Batches (x, y, restarted) of bytes from one split, x and y LongTensors (B, T).

    Row r of each batch continues the text exactly where row r of the previous batch stopped,
    so a model can carry state (an XL memory) from batch to batch. The text is read as if laid
    out "####" + text + "####" + text: a row runs across the end of the text into a marked
    restart of it. With probability reset_prob, when it would run past that layout's end, and
    on the first call, a row jumps to a random offset; `restarted` says which rows jumped, and a
    jumped row's first 4 bytes are "####" so the model also sees that the text is not continuous.
    """

    def __init__(self, path, block_size, batch_size, reset_prob=0.1, seed=1337, device="cpu"):
        if not os.path.isfile(path) or os.path.getsize(path) == 0:
            raise UserError(f"data file {path} is missing or empty; run the dataset's prepare.py")
        if block_size < 1 or batch_size < 1 or not 0.0 <= reset_prob <= 1.0:
            raise UserError(f"need block_size >= 1, batch_size >= 1 and 0 <= reset_prob <= 1; got "
                            f"{block_size}, {batch_size}, {reset_prob}")
        self.text = np.memmap(path, dtype=np.uint8, mode="r")  # bytes stay on disk until read
        self.period = len(MARK) + len(self.text)  # the layout is this period repeated twice
        if block_size + 1 > self.period:
            raise UserError(f"block_size={block_size} is longer than {path} "
                            f"({len(self.text)} bytes); use a smaller --block_size")
        self.block_size, self.batch_size, self.reset_prob = block_size, batch_size, reset_prob
        self.device = device
        self.gen = torch.Generator().manual_seed(seed)  # own RNG: same batches whatever else runs
        self.pos = torch.full((batch_size,), -1, dtype=torch.long)  # -1: the row has not started
        self.offsets = np.arange(block_size + 1)

    def next(self):
        B, T, P = self.batch_size, self.block_size, self.period
        # draw both every call, so the generator advances the same way whatever happens
        jump = torch.rand(B, generator=self.gen) < self.reset_prob
        fresh = torch.randint(0, P, (B,), generator=self.gen)
        restarted = jump | (self.pos < 0) | (self.pos + T + 1 > 2 * P)
        self.pos = torch.where(restarted, fresh, self.pos)
        # one gather for the whole batch: index into the text, with -4..-1 standing for "####"
        idx = (self.pos.numpy()[:, None] + self.offsets) % P - len(MARK)  # (B, T+1)
        chunk = self.text[np.maximum(idx, 0)]
        chunk[idx < 0] = MARK[0]
        chunk[restarted.numpy(), :len(MARK)] = MARK[0]
        self.pos += T
        chunk = torch.from_numpy(chunk)  # uint8: 8x less to copy to the GPU than int64
        if self.device.startswith("cuda"):
            chunk = chunk.pin_memory().to(self.device, non_blocking=True)
            restarted = restarted.pin_memory().to(self.device, non_blocking=True)
        else:
            chunk, restarted = chunk.to(self.device), restarted.to(self.device)
        x = chunk[:, :-1].long().contiguous()
        y = chunk[:, 1:].long().contiguous()
        return x, y, restarted

    def state_dict(self):
        return {"pos": self.pos.clone(), "rng": self.gen.get_state()}

    def load_state_dict(self, state):
        # a checkpoint may have been loaded onto the GPU; the loader's state lives on the CPU.
        # A changed batch_size keeps the rows both runs have; new rows start fresh.
        pos = state["pos"].cpu()
        n = min(len(pos), self.batch_size)
        self.pos = torch.full((self.batch_size,), -1, dtype=torch.long)
        self.pos[:n] = pos[:n]
        self.gen.set_state(state["rng"].cpu())


def fixed_batches(path, block_size, batch_size, n_batches, seed, device="cpu"):
    """The same n_batches batches every call (for the val loss). Each row continues the text from
    one batch to the next (only the first batch restarts), so an XL memory can be carried along."""
    loader = ByteLoader(path, block_size, batch_size, reset_prob=0.0, seed=seed, device=device)
    return [loader.next() for _ in range(n_batches)]


def _prepare_command(data_dir):
    """The exact command a user should type to prepare data_dir."""
    script = os.path.relpath(os.path.join(data_dir, "prepare.py"))
    shared = os.path.join(REPO_DIR, "..", "shared", "data", os.path.basename(data_dir), "input.txt")
    path = os.path.relpath(shared) if os.path.isfile(shared) else "PATH"
    return f"python {script} --input={path}"


def _write(path, data):
    # write then rename, so an interrupted run never leaves a half file that looks prepared
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def prepare(data_dir, input_path=None, url=None):
    """Split data_dir/input.txt into train.txt (first 90% of the bytes) and val.txt (the rest).
    input_path is copied to input.txt first; url is downloaded when there is no input.txt."""
    os.makedirs(data_dir, exist_ok=True)
    target = os.path.join(data_dir, "input.txt")
    if input_path:
        if not os.path.isfile(input_path):
            raise UserError(f"--input={input_path}: no such file")
        if not (os.path.exists(target) and os.path.samefile(input_path, target)):
            shutil.copyfile(input_path, target)
    elif not os.path.exists(target):
        if not url:
            raise UserError(f"{os.path.relpath(target)} not found and there is no download source;"
                            f" give a plain-text copy of the corpus: {_prepare_command(data_dir)}")
        print(f"downloading {url}")
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                _write(target, response.read())
        except (OSError, ValueError) as e:  # URLError and timeouts are OSErrors
            raise UserError(f"could not download {url} ({getattr(e, 'reason', e)}); "
                            f"give a local copy instead: {_prepare_command(data_dir)}") from None
    with open(target, "rb") as f:
        data = f.read()
    if not data:
        raise UserError(f"{os.path.relpath(target)} is empty")
    n = int(len(data) * 0.9)
    _write(os.path.join(data_dir, "train.txt"), data[:n])
    _write(os.path.join(data_dir, "val.txt"), data[n:])
    print(f"{os.path.relpath(data_dir)}: train.txt has {n:,} bytes, "
          f"val.txt has {len(data) - n:,} bytes")


def dataset_paths(dataset):
    """(train_path, val_path) of a dataset: a name under data/, or a directory path. Prepares it
    when only input.txt is there; otherwise says which command prepares it."""
    is_dir_path = os.sep in dataset or "/" in dataset
    data_dir = dataset if is_dir_path else os.path.join(REPO_DIR, "data", dataset)
    train, val = os.path.join(data_dir, "train.txt"), os.path.join(data_dir, "val.txt")
    if os.path.isfile(train) and os.path.isfile(val):
        return train, val
    if os.path.isfile(os.path.join(data_dir, "input.txt")):
        prepare(data_dir)
        return train, val
    local = os.path.join(REPO_DIR, "..", "shared", "data", os.path.basename(data_dir), "input.txt")
    if not is_dir_path and os.path.isfile(local):  # an offline machine's local copy of the corpus
        print(f"preparing {dataset} from the local copy {os.path.relpath(local)}")
        prepare(data_dir, input_path=local)
        return train, val
    if not is_dir_path and not os.path.isdir(data_dir):
        known = sorted(d for d in os.listdir(os.path.join(REPO_DIR, "data"))
                       if os.path.isfile(os.path.join(REPO_DIR, "data", d, "prepare.py")))
        raise UserError(f"--dataset={dataset}: unknown dataset; known: {', '.join(known)}")
    if not os.path.isfile(os.path.join(data_dir, "prepare.py")):
        raise UserError(f"no train.txt and val.txt in {data_dir}; "
                        f"put the corpus there as input.txt (it is split on first use)")
    hint = _prepare_command(data_dir)
    if dataset == "shakespeare_char":
        hint += f" (or download it: python {os.path.relpath(os.path.join(data_dir, 'prepare.py'))})"
    raise UserError(f"dataset {dataset} is not prepared; run {hint}")


def atomic_torch_save(obj, path):
    """torch.save that never leaves a truncated file: a crash mid-write keeps the old checkpoint."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
