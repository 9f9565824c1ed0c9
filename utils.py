"""
Small helpers shared by the scripts: errors for bad user input (a user's plug-in: plugins.py),
device, dtype and CPU thread choice, glibc's memory setting, the compile fallback and Ctrl-C at a
clean step (StopAfterStep). Atomic writes are in fileio.py.

    python -c "import utils; print(utils.pick_device('auto'), utils.pick_dtype('auto', 'auto'), utils.pick_threads())"
"""
import ctypes
import math
import os
import re
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext

import torch

class UserError(Exception):
    """A mistake in the user's input. The message is one line: what is wrong, what to do.
    details: lines shown under it (the frames of a user's plug-in that failed)."""

    def __init__(self, message, details=()):
        super().__init__(message)
        self.details = list(details)


def run_main(fn, before_error=None):
    """Run a script's main: a UserError becomes one line on stderr and exit code 2; so does
    an exception raised in a user's plug-in, with the frames of the plug-in's own file under
    it, and a failure to write the output (a full disk). A reader that stops reading (`| head`)
    ends the script quietly. before_error(): called first (sample.py ends its line of text there)."""
    try:
        try:
            result = fn()
        except SystemExit as e:  # --help, or a script's own exit: what it printed still has to get out
            sys.stdout.flush()
            from plugins import plugin_error
            failed = plugin_error(e)  # a plug-in that exits mid-run (sys.exit): a failure, not the script's end
            if failed is None:
                raise
            raise failed from None
        sys.stdout.flush()  # here rather than at exit, so that an output that fails is handled below
        return result
    except (UserError, NotImplementedError, KeyboardInterrupt, Exception) as e:
        if isinstance(e, BrokenPipeError):
            # the reader of our output has gone (`python sample.py | head -c 100`): nothing to
            # report, and nobody to report it to. Exit status 141 (128 + 13, SIGPIPE) is what a
            # shell reports for a program that SIGPIPE ended, as a C program's default would; Python
            # ignores the signal, so the status is given here, and a pipeline under
            # `set -o pipefail` still sees that the writer did not finish
            settle_output()
            sys.exit(141)
        if isinstance(e, OSError) and output_fails():
            settle_output()
            print(f"error: could not write the output: {e.strerror or e}; make room where it goes, or send it "
                  "elsewhere", file=sys.stderr, flush=True)
            sys.exit(2)
        if before_error is not None:
            before_error()
        if isinstance(e, KeyboardInterrupt):  # the user knows they pressed Ctrl-C; no traceback needed
            sys.exit(143 if isinstance(e, Terminated) else 130)  # (128 + the signal, as a shell says)
        if isinstance(e, NotImplementedError):  # (plugins.py imports this module: imported when needed)
            from plugins import stub_exercise, unwritten
            if unwritten(e):  # a plugged-in exercise stub the student has not written yet
                e = UserError(f"not implemented yet: {e} (python -m exercises.check {stub_exercise(e)} shows what "
                              "is missing)")
        if out_of_memory(e):
            e = UserError(f"out of memory ({' '.join(str(e).split())[:120]}): lower the sizes given (--batch_size, "
                          "--block_size, --num_samples, --max_new_tokens, --n_streams, --stream_len, ...)")
        elif not isinstance(e, UserError):
            from plugins import plugin_error
            e = plugin_error(e)
            if e is None:
                raise  # a bug of ours: the whole traceback helps fix it
        print(f"error: {e}", file=sys.stderr, flush=True)
        for line in getattr(e, "details", ()):
            print(line, file=sys.stderr, flush=True)
        sys.exit(2)


def out_of_memory(e):
    """Whether exception e says memory ran out (a CPU or GPU allocation, numpy's too, or a
    tensor size past what can be counted)."""
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(e, RuntimeError) and any(
        s in str(e) for s in ("can't allocate memory", "Storage size calculation overflowed", "out of memory"))


def _fd(stream):
    """The file descriptor under a stream, or None (a StringIO in tests, no stream at all)."""
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def output_fails():
    """Whether writing stdout fails now: a buffered stdout tries again what a failed write left
    in its buffer; an unbuffered one writes 0 bytes, which a device such as /dev/full refuses.
    (An unbuffered stdout to a regular file on a full disk passes this test.)"""
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        return True
    fd = _fd(sys.stdout)
    if fd is None:
        return False
    try:
        os.write(fd, b"")
    except OSError:
        return True
    return False


def settle_output():
    """Send what stdout and stderr still hold; where that fails, point the stream's descriptor
    at os.devnull, so that the interpreter's own flush at exit does not fail a second time
    with a traceback (what the stream held is lost either way: it cannot be written)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
            continue
        except (OSError, ValueError):
            pass
        fd = _fd(stream)
        if fd is not None:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, fd)
            os.close(devnull)


SEED_MAX = 2 ** 62  # a seed torch takes, with room for the rank and iteration train.py adds to it


def check_range(settings, names, low, high=None, high_open=False):
    """One UserError for the first of the space-separated names whose value in settings is
    not a finite number >= low and <= high (< high if high_open; no bound if high is None)."""
    for name in names.split():
        v = settings[name]
        if not (math.isfinite(v) and v >= low and (high is None or (v < high if high_open else v <= high))):
            where = f"at least {low}" if high is None else f"in [{low}, {high}{')' if high_open else ']'}"
            raise UserError(f"--{name} must be {where}, got {v}")


# -----------------------------------------------------------------------------
# device and precision, decided once at start-up

def mps_available():
    """Whether this torch build and machine have Apple's MPS device."""
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def pick_device(device):
    """"" or "auto" -> the best available of cuda, mps, cpu; an explicit name is checked."""
    if device in ("", "auto"):
        return "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
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
    if device == "mps" and not mps_available():
        raise UserError(f"--device={device}: MPS is not available here; {use}")
    if m.group(1) is not None:  # cuda:N becomes the current device: synchronize(), pin_memory() and the
        torch.cuda.set_device(device)  # capability checks then act on it, not on GPU 0
    return device


def synchronizer(device):
    """A function that waits for the work queued on device (CUDA, MPS); a no-op on the CPU."""
    if device.startswith("cuda"):
        return lambda: torch.cuda.synchronize(device)
    if device == "mps":
        return torch.mps.synchronize
    return lambda: None


def cpu_has_bf16():
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX): there bfloat16
    matmuls run 2-3x faster than float32 ones; elsewhere they are emulated and slower."""
    return any(getattr(torch.cpu, name, lambda: False)()
               for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def pick_dtype(device, dtype, training=False):
    """"" or "auto" -> bfloat16 on GPUs that compute in it (Ampere and later), else float16 on
    cuda; for training on a CPU with native bfloat16, bfloat16; float32 elsewhere (inference
    on the CPU, MPS)."""
    device_type = device.split(":")[0]
    if dtype in ("", "auto"):
        if device_type == "cuda":  # (is_bf16_supported() also says yes where bfloat16 is only emulated)
            return "bfloat16" if torch.cuda.get_device_capability(device) >= (8, 0) else "float16"
        return "bfloat16" if device_type == "cpu" and training and cpu_has_bf16() else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"--dtype={dtype}: unknown dtype; use auto, float32, bfloat16 or float16")
    if dtype == "float16" and device_type == "cpu":
        raise UserError("--dtype=float16 is for GPUs; on the CPU use --dtype=bfloat16 or --dtype=float32")
    if dtype == "float16" and device_type == "mps" and training:  # (train.py's loss scaling is CUDA's)
        raise UserError("--dtype=float16 trains without loss scaling on MPS (small gradients vanish); "
                        "use --dtype=bfloat16 or --dtype=float32")
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


def pick_threads(requested=0):
    """(threads, reason) for torch's CPU work: requested > 0 (--threads=N) wins, then
    OMP_NUM_THREADS, else the CPUs this process may use minus the load already on them, at
    least 1. torch's default (one per core) assumes idle cores: on a busy machine its
    threads wait for each other at every operation, many times slower than fewer threads."""
    if requested < 0:
        raise UserError(f"--threads must be 0 (chosen automatically) or a number of threads, got {requested}")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    most = 4 * cpus  # (torch's thread pool crashes at tens of thousands; past the CPUs threads only wait)
    plural = "s" if cpus != 1 else ""
    if requested > most:
        raise UserError(f"--threads={requested} is far more than the {cpus} CPU{plural} this process may use: "
                        f"give {cpus} or fewer (at most {most}), or 0 to choose automatically")
    if requested > 0:  # (more threads than CPUs only wait for each other: said on the device line)
        return requested, f"--threads={requested}" + (f", more than the {cpus} CPU{plural}" if requested > cpus else "")
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > most:
        raise UserError(f"OMP_NUM_THREADS={env} is far more than the {cpus} CPU{plural} this process may use: "
                        f"set it to {cpus} or fewer, or pass --threads=N")
    if env.isdigit() and int(env) > 0:
        return int(env), f"OMP_NUM_THREADS={env}"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0  # runnable processes, last minute
    # the minute's average lags: work started seconds ago shows only in the processes running now
    load = max(load, running_others())
    n = min(cpus, max(1, cpus - round(load)))
    return n, f"auto: {cpus} CPU{'s' if cpus != 1 else ''}, load {load:.1f}"


def running_others():
    """Processes running or ready to run right now, this one not counted (Linux's /proc/loadavg;
    0 elsewhere)."""
    try:
        with open("/proc/loadavg") as f:
            return max(int(f.read().split()[3].split("/")[0]) - 1, 0)
    except (OSError, ValueError, IndexError):
        return 0


def use_threads(requested=0):
    """Set torch's CPU threads by pick_threads; returns the words for the device line,
    e.g. "1 thread (auto: 2 CPUs, load 1.6)"."""
    n, reason = pick_threads(requested)
    torch.set_num_threads(n)
    return f"{n} thread{'s' if n != 1 else ''} ({reason})"


def memory_available(dev):
    """Bytes free for new tensors on device dev: CUDA's free memory, Linux's MemAvailable for
    the CPU; None where it is not known (MPS, other systems)."""
    try:
        if dev.startswith("cuda"):  # free on the GPU, and what torch holds there unused
            d = torch.device(dev)
            return torch.cuda.mem_get_info(d)[0] + torch.cuda.memory_reserved(d) - torch.cuda.memory_allocated(d)
        if dev == "cpu":
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
    except (OSError, ValueError, RuntimeError):
        pass
    return None


def has_module(name, without):
    """Whether the optional package `name` is installed; if not, one note line on stderr
    saying what is skipped (`without`), at start-up rather than as a traceback at the end."""
    import importlib.util
    if importlib.util.find_spec(name) is not None:
        return True
    print(f"note: {name} is not installed, so {without} (pip install -r requirements.txt installs it)",
          file=sys.stderr, flush=True)
    return False


def clock(seconds):
    """A duration as m:ss, or h:mm:ss from an hour on."""
    m, s = divmod(round(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


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


_COMPILE_FAILED = {}  # (function, options) -> the exception its compilation raised in this process


def compile_or_eager(fn, probe, fixed_args=None, **options):
    """torch.compile(fn, **options), tried once by probe(compiled): compilation is lazy, so this
    is where it would fail (no C++ compiler, an unsupported platform or Python). On failure,
    fn itself and one warning line on stderr; a later call for the same function and options
    returns fn at once, without trying again (a sweep's rows would otherwise each pay for a
    failed compile and warn); another function is still tried. The global RNG is left as the
    probe found it.
    fixed_args: the arguments of every later call, the very same objects (a decoder's model,
    buffers and caches, whose tensors change in place only). fn is then compiled ahead for them
    (aot_compile, in the grad and autocast modes of this call) and called without dynamo's
    guard check, tens of microseconds a call on a CPU (RESULTS.md, "Decode speed"): the check
    is what would notice other arguments or another grad or autocast mode, so only a caller
    that never changes them may ask. Where aot_compile is missing or fails, the usual compiled
    function."""
    key = (getattr(fn, "__qualname__", None) or type(fn).__qualname__, repr(sorted(options.items())))
    if key in _COMPILE_FAILED:
        return fn
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    mps_rng = torch.mps.get_rng_state() if mps_available() else None
    try:
        compiled = torch.compile(fn, **options)
        if fixed_args is not None:
            compiled = unguarded(compiled, fixed_args)
        probe(compiled)
    except Exception as e:  # any failure inside the compiler stack means: run eager
        import torch._dynamo as dynamo
        dynamo.reset()  # forget what was half-compiled
        first = (str(e).strip().splitlines() or [""])[0][:200]
        print(f"warning: torch.compile failed, running eager (and so from here on; {type(e).__name__}: {first})",
              file=sys.stderr, flush=True)
        _COMPILE_FAILED[key] = e
        compiled = fn
    finally:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        if mps_rng is not None:
            torch.mps.set_rng_state(mps_rng)
    return compiled


def unguarded(compiled, args):
    """compiled (what torch.compile returned) traced now for args and called from here on
    without dynamo's guard check; compiled itself where this torch cannot (then its first call
    traces it, as usual)."""
    aot = getattr(compiled, "aot_compile", None)
    if aot is None:
        return compiled
    try:
        f = aot((tuple(args), {}))
        f.disable_guard_check()
    except Exception:  # (an experimental API in torch 2.13) the guarded function does the same work
        return compiled
    return f


class Terminated(KeyboardInterrupt):
    """SIGTERM, stopping a script at once as Ctrl-C does (its `finally` blocks run: locks and
    temporary files are cleaned up); run_main exits 143 for it."""


@contextmanager
def stop_on_sigterm(enabled=True):
    """Inside it SIGTERM raises Terminated (if enabled, in the main thread, unless started ignored)."""
    def handler(signum, frame):
        raise Terminated
    if not enabled or threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class StopAfterStep:
    """Ctrl-C (SIGINT) or SIGTERM (`kill`, a job scheduler's notice) during the training loop:
    the first asks the loop to stop after the iteration it is in, so that last.pt is written
    at a clean step and a resume continues exactly from it; a second stops at once. `asked`:
    the signal's number, or 0. Off under DDP (every rank would have to agree on the step, and
    torchrun stops its processes itself), outside the main thread (no signal handlers there),
    and for a signal the process was started with ignored (`nohup`, `&` in a script): whoever
    started it chose that."""

    def __init__(self, enabled=True):
        self.asked = 0
        main = threading.current_thread() is threading.main_thread()
        self.signals = [s for s in (signal.SIGINT, signal.SIGTERM)
                        if enabled and main and signal.getsignal(s) is not signal.SIG_IGN]

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handler) for s in self.signals}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handler(self, signum, frame):
        if self.asked:  # a second signal: at once (exit 143 for SIGTERM, 130 for Ctrl-C)
            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        self.asked = signum
        what, again = ("Ctrl-C", "Ctrl-C again") if signum == signal.SIGINT else ("SIGTERM", "a second signal")
        print(f"\n{what}: stopping after this iteration and writing last.pt ({again} to stop at once)",
              file=sys.stderr, flush=True)


class TensorBoard:
    """A SummaryWriter made on first use (so a run that writes nothing leaves no file), or nothing."""

    def __init__(self, log_dir, purge_step):
        self.log_dir, self.purge_step, self.writer = log_dir, purge_step, None

    def add_scalar(self, tag, value, step):
        if self.log_dir is None:
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter  # slow import, only when used
            # purge_step hides events a previous run logged past this point
            self.writer = SummaryWriter(self.log_dir, purge_step=self.purge_step or None)
        self.writer.add_scalar(tag, value, step)

    def close(self):
        if self.writer is not None:
            self.writer.close()


class Progress:
    """A one-line progress bar with an ETA on stderr (on a terminal; elsewhere a line now and then)."""

    def __init__(self, total, label):
        self.total, self.label, self.done = total, label, 0
        self.t0 = self.last = time.time()
        self.tty = sys.stderr.isatty()
        self.aside = 0.0  # seconds spent on other things (compiling), left out of the ETA

    def set_aside(self, seconds):
        self.aside += seconds

    def step(self, what=""):
        self.done += 1
        now = time.time()
        if not (self.tty or now - self.last > 30 or self.done == self.total):
            return
        if self.tty and now - self.last < 0.2 and self.done < self.total:
            return
        self.last = now
        elapsed = now - self.t0
        eta = max(elapsed - self.aside, 0.0) / self.done * (self.total - self.done)
        bar = "#" * int(20 * self.done / self.total)
        line = (f"{self.label} [{bar:<20}] {100 * self.done / self.total:3.0f}% {what} "
                f"elapsed {elapsed:.0f}s, ETA {eta // 60:.0f}:{eta % 60:02.0f}")
        end = "\n" if not self.tty or self.done == self.total else ""
        print(("\r" if self.tty else "") + line.ljust(78), end=end, file=sys.stderr, flush=True)
