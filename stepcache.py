"""
Decode steps compiled ahead (utils.unguarded), kept so that they are compiled once: in this
process for every decoder of the same kind, and on disk for later runs.

Compiling a CPU decode step ahead (torch's aot_compile, so that it runs without dynamo's guard
check) bypasses inductor's own caches: every process used to compile it from scratch, 11 s for
the CPU recipe's window-256 step and 28 s for its int4 step on our 2-core VM, warm cache or
not (RESULTS.md, "Decode speed"). So a step compiled here is saved (torch's
save_compiled_function) to a file named by a hash of what it was compiled for:

    the step's description (its function, compile options, model config, cache kind, the shapes
    and dtypes of its buffers, the grad and autocast mode) + this project's source files + the
    versions of torch and Python + the CPU's vector instructions

and a later decoder with the same hash loads it (2-3 s) instead of compiling. A step found
here is used only if dynamo's guards (shapes, dtypes, the constants it read) pass on the new
decoder's own arguments; a file that cannot be read, or that fails its guards, is compiled
again and overwritten. Editing any .py file of the project changes the hash.

The files are code (pickles of compiled functions): they live in torch's own cache folder
(TORCHINDUCTOR_CACHE_DIR, by default /tmp/torchinductor_$USER), under decode_steps/, as
inductor's compiled kernels do; delete that folder to compile afresh. DECODE_STEP_CACHE=FOLDER
puts them elsewhere (one that cannot be written gets a note: every run then compiles afresh),
and DECODE_STEP_CACHE= (empty) keeps none on disk. The folder is kept
under MAX_BYTES: a save deletes the steps used least recently (a load counts as a use) past it.

    python -c "import stepcache; print(stepcache.folder())"
"""
import functools
import glob
import hashlib
import os
import platform
import sys

import torch

from fileio import atomic_write

SUBDIR = "decode_steps"
MAX_BYTES = 256 * 2**20  # the folder's size past which a save deletes the least recently used steps
_HERE = {}  # hash -> a step compiled or loaded in this process
_UNSAVED = set()  # folders a step could not be saved in (said once each)


def folder():
    """Where compiled steps are saved: $DECODE_STEP_CACHE where set (empty: nowhere), else
    decode_steps/ in torch's cache folder (None where that cannot be found)."""
    own = os.environ.get("DECODE_STEP_CACHE")
    if own is not None:
        return own or None
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
        return os.path.join(cache_dir(), SUBDIR)
    except Exception:  # (an internal module of torch: another version may move it)
        return None


@functools.lru_cache(maxsize=1)
def _environment():
    """The project's sources and the versions a compiled step depends on, hashed once."""
    h = hashlib.sha256()
    root = os.path.dirname(os.path.abspath(__file__))
    for path in sorted(glob.glob(os.path.join(root, "*.py")) + glob.glob(os.path.join(root, "kv", "*.py"))):
        h.update(os.path.relpath(path, root).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa
        isa = str(pick_vec_isa())
    except Exception:
        isa = "?"
    h.update(repr((torch.__version__, sys.version, platform.machine(), isa)).encode())
    return h.hexdigest()


def key(description):
    """The hash naming a step compiled for description (a string: see the module docstring)."""
    return hashlib.sha256((_environment() + description).encode()).hexdigest()[:40]


def find(k, args):
    """The step saved under hash k whose guards pass on args (a tuple: the step's arguments),
    from this process or from disk; None where there is none. Its `origin` says which:
    "reused" (this process) or "loaded" (disk)."""
    f, origin = _HERE.get(k), "reused"
    if f is None:
        origin, where = "loaded", folder()
        path = os.path.join(where, k + ".bin") if where is not None else None
        if path is None or not os.path.isfile(path) or not _ours(path):
            return None
        try:
            with open(path, "rb") as fh:
                f = torch.compiler.load_compiled_function(fh)
        except Exception:  # unreadable, truncated, or from a torch that saves otherwise: compile again
            return None
        try:
            os.utime(path)  # used now: the last to be pruned
        except OSError:
            pass
    try:
        if not f.guard_check(*args):
            return None
    except Exception:
        return None
    f.disable_guard_check()
    _mark(f, origin)
    _HERE[k] = f
    return f


def _mark(f, origin):
    try:
        f.origin = origin  # (read by the decoder that asked, right away)
    except AttributeError:  # a torch whose compiled functions take no attributes: "compiled" is said
        pass


def _ours(path):
    """Whether the file and its folder belong to this user (POSIX): a saved step is code, and
    only this user's own are loaded (not one another user left in a shared /tmp)."""
    if not hasattr(os, "getuid"):
        return True
    return all(os.stat(p).st_uid == os.getuid() for p in (path, os.path.dirname(path)))


def keep(k, f):
    """Keep the step f under hash k, in this process and on disk (where it can be written:
    a step that cannot be saved still runs); its `origin` is "compiled"."""
    _mark(f, "compiled")
    _HERE[k] = f
    where = folder()
    if where is None:
        return
    try:
        data = type(f).serialize(f).serialized_data  # what f.save_compiled_function would write
        os.makedirs(where, exist_ok=True)
        atomic_write(os.path.join(where, k + ".bin"), lambda fh: fh.write(data))
        prune(where, keep=k + ".bin")
    except Exception as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
        if where not in _UNSAVED:  # once per folder and process
            _UNSAVED.add(where)
            print(f"note: the compiled decode step cannot be saved in {where} ({why}); later runs compile it "
                  "again (DECODE_STEP_CACHE=FOLDER keeps the steps in a folder you can write)", file=sys.stderr)


def prune(where, keep=None):
    """Delete this user's steps in folder where, least recently used first (oldest modification
    time: find touches what it loads), until they take at most MAX_BYTES; the file named keep
    stays whatever its size. Files that are not steps are left alone."""
    steps = []
    for name in os.listdir(where):
        path = os.path.join(where, name)
        if name.endswith(".bin") and len(name) == 44 and os.path.isfile(path) and _ours(path):
            st = os.stat(path)
            steps.append((st.st_mtime, st.st_size, name))
    total = sum(size for _, size, _ in steps)
    for _, size, name in sorted(steps):
        if total <= MAX_BYTES:
            break
        if name == keep:
            continue
        try:
            os.remove(os.path.join(where, name))
            total -= size
        except OSError:  # another run deleted it first
            pass


def forget():
    """Forget the steps of this process (the files stay): the next decoder looks on disk."""
    _HERE.clear()
