"""
Small helpers shared by the scripts: errors for bad user input (a user's plug-in: plugins.py),
the compile fallback, Ctrl-C at a clean step (StopAfterStep) or at once even inside one long
operation (SignalWatch). The device, dtype and threads are in devices.py, atomic writes in
fileio.py.

    python -c "import utils; print(utils.clock(3725), utils.has_module('numpy', 'nothing'))"
"""
import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager

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
            with SignalWatch(enabled=int(os.environ.get("RANK", -1)) == -1):  # (torchrun stops its own)
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
    except (Exception, KeyboardInterrupt) as e:  # UserError and NotImplementedError among them
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
            from plugins import unwritten, unwritten_message
            if unwritten(e):  # a plugged-in exercise stub the student has not written yet
                e = UserError(unwritten_message(e))
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


def project_file(name):
    """A file of the project (e.g. "sample.py", "config/x.py") as a command typed where this
    process runs should name it: as is in the project folder, else a path to it (relative
    below the folder run in, absolute elsewhere)."""
    full = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
    rel = os.path.relpath(full)
    return name if rel == name else full if rel.startswith("..") else rel


def check_range(settings, names, low, high=None, high_open=False):
    """One UserError for the first of the space-separated names whose value in settings is
    not a finite number >= low and <= high (< high if high_open; no bound if high is None)."""
    for name in names.split():
        v = settings[name]
        if not (math.isfinite(v) and v >= low and (high is None or (v < high if high_open else v <= high))):
            where = f"at least {low}" if high is None else f"in [{low}, {high}{')' if high_open else ']'}"
            finite = "a finite number, " if not math.isfinite(v) and high is None else ""
            raise UserError(f"--{name} must be {finite}{where}, got {v}")


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


_COMPILE_FAILED = {}  # (function, options) -> the exception its compilation raised in this process


def compile_or_eager(fn, probe, fixed_args=None, describe=None, **options):
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
    function.
    describe: with fixed_args, a string saying what fn is compiled for beyond its arguments'
    shapes (a model's config, a cache kind): a step compiled for the same description and
    options is taken from stepcache.py (this process, or a file an earlier run saved) if its
    guards pass on fixed_args, and one compiled here is kept there."""
    key = (getattr(fn, "__qualname__", None) or type(fn).__qualname__, repr(sorted(options.items())))
    if key in _COMPILE_FAILED:
        return fn
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    from devices import mps_available  # (devices.py imports this module)
    mps_rng = torch.mps.get_rng_state() if mps_available() else None
    try:
        compiled = torch.compile(fn, **options)
        if fixed_args is not None:
            name = None if describe is None else f"{key[0]} {key[1]} {describe}"
            compiled = unguarded(compiled, fixed_args, name)
        probe(compiled)
    except Exception as e:  # any failure inside the compiler stack means: run eager
        # (no dynamo.reset(): it would throw away every other function's compiled code, which
        # would then compile again at its next call, outside its own probe and its options)
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


def unguarded(compiled, args, description=None):
    """compiled (what torch.compile returned) traced now for args and called from here on
    without dynamo's guard check; compiled itself where this torch cannot (then its first call
    traces it, as usual). description: what it is compiled for (compile_or_eager's describe),
    to find it in stepcache.py, or keep it there, under; None: neither."""
    aot = getattr(compiled, "aot_compile", None)
    if aot is None:
        return compiled
    import stepcache
    args = tuple(args)
    k = stepcache.key(description) if description is not None else None
    found = stepcache.find(k, args) if k is not None else None
    if found is not None:
        return found
    try:
        f = aot((args, {}))
        f.disable_guard_check()
    except Exception:  # (an experimental API in torch 2.13) the guarded function does the same work
        return compiled
    if k is not None:
        stepcache.keep(k, f)
    return f


class Terminated(KeyboardInterrupt):
    """SIGTERM, stopping a script at once as Ctrl-C does (its `finally` blocks run: locks and
    temporary files are cleaned up); run_main exits 143 for it."""


@contextmanager
def stop_on_sigterm(enabled=True):
    """Inside it SIGTERM raises Terminated (if enabled, in the main thread, unless started ignored)."""
    def handler(signum, frame):
        handled()
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
    and for a signal the process was started with ignored (SIGINT under `&` in a script): whoever
    started it chose that."""

    def __init__(self, enabled=True):
        self.asked = 0
        main = threading.current_thread() is threading.main_thread()
        self.signals = [s for s in (signal.SIGINT, signal.SIGTERM)
                        if enabled and main and signal.getsignal(s) is not signal.SIG_IGN]

    def __enter__(self):
        global _STOPPER
        self.previous = {s: signal.signal(s, self._handler) for s in self.signals}
        self.outer, _STOPPER = _STOPPER, self
        return self

    def __exit__(self, *exc):
        global _STOPPER
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        _STOPPER = self.outer

    def _handler(self, signum, frame):
        handled()
        if self.asked:  # a second signal: at once (exit 143 for SIGTERM, 130 for Ctrl-C)
            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        self.asked = signum
        what, again = ("Ctrl-C", "Ctrl-C again") if signum == signal.SIGINT else ("SIGTERM", "a second signal")
        print(f"\n{what}: stopping after this iteration and writing last.pt ({again} to stop at once)",
              file=sys.stderr, flush=True)


_STOPPER = None  # the StopAfterStep in force, if any: its first signal waits for the step's end
_HANDLED = [0]  # signals the main thread's handlers (ours) have run for: SignalWatch's sign of life


def handled():
    """Count a signal the main thread acts on (every handler of ours calls this first)."""
    _HANDLED[0] += 1


class SignalWatch:
    """A Ctrl-C or SIGTERM that stops a script at once does so even while the main thread is
    inside one long operation (a forward over a huge block_size), where Python cannot run its
    handler until the operation ends, minutes later: a thread sees each signal arrive
    (signal.set_wakeup_fd) and ends the process (exit 130 or 143) if, `grace` seconds on, the
    handlers have not run for it and the main thread is still inside the very call it was in.
    Not the first signal under StopAfterStep: that one asks for a clean stop at the end of the
    step, and waits for it. Writes are atomic (fileio.py): none is left half-done."""

    def __init__(self, grace=5.0, enabled=True):
        self.grace, self.enabled, self.thread, self.done = grace, enabled, None, False

    def __enter__(self):
        if not self.enabled or threading.current_thread() is not threading.main_thread():
            return self
        import socket
        try:
            self.r, self.w = socket.socketpair()
            self.w.setblocking(False)
            self.previous_fd = signal.set_wakeup_fd(self.w.fileno(), warn_on_full_buffer=False)
        except (OSError, ValueError):  # (no socket pair, or a platform without wakeup fds)
            return self
        self.arrived, self.base = 0, _HANDLED[0]  # signals seen here; handled before this watch
        self.previous = signal.getsignal(signal.SIGINT)
        if self.previous is signal.default_int_handler:  # Python's own, which counts nothing
            signal.signal(signal.SIGINT, self._interrupt)
        self.thread = threading.Thread(target=self._watch, name="signal watch", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.thread is not None:
            self.done = True
            if signal.getsignal(signal.SIGINT) == self._interrupt:
                signal.signal(signal.SIGINT, self.previous)
            signal.set_wakeup_fd(self.previous_fd)
            self.w.close()  # the thread reads the end of the stream and ends

    @staticmethod
    def _interrupt(signum, frame):
        handled()
        raise KeyboardInterrupt

    def _watch(self):
        seen = {}  # id(StopAfterStep) -> its signals so far
        with self.r:
            while data := self.r.recv(64):
                for signum in data:
                    if signum not in (signal.SIGINT, signal.SIGTERM):
                        continue
                    self.arrived += 1
                    stopper = _STOPPER
                    if stopper is not None and signum in stopper.signals:
                        seen[id(stopper)] = seen.get(id(stopper), 0) + 1
                        if seen[id(stopper)] == 1:  # a clean stop after the step, however long it takes
                            continue
                    where = self._main_at()
                    while True:  # (a run of C calls: no handler runs between them, but the place moves)
                        time.sleep(self.grace)
                        if self.done or _HANDLED[0] - self.base >= self.arrived:  # the main thread has it
                            break
                        if self._main_at() == where:
                            what = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
                            os.write(2, f"\n{what}: stopped at once, inside an operation too long to wait for "
                                        "(no file is left half-written: writes are atomic)\n".encode())
                            os._exit(130 if signum == signal.SIGINT else 143)
                        where = self._main_at()

    @staticmethod
    def _main_at():
        """Where the main thread is: its innermost Python frame and instruction."""
        frame = sys._current_frames().get(threading.main_thread().ident)
        return (id(frame), frame.f_lasti) if frame is not None else None


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
                f"elapsed {elapsed:.0f}s, ETA {clock(eta)}")
        end = "\n" if not self.tty or self.done == self.total else ""
        print(("\r" if self.tty else "") + line.ljust(78), end=end, file=sys.stderr, flush=True)
