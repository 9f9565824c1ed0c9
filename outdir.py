"""
The out_dir of a training run: checked before any work (a folder we can write, with room
for the checkpoints), held by one run at a time (out_dir/train.lock), never silently taken
from an earlier run (--overwrite=True replaces it only when the new run writes its first checkpoint),
and cleared of the temporary files an interrupted run left. And the other way: the file of a
checkpoint named in an out_dir, or, when it is not there, what the folder holds instead.

    python -c "import outdir; lock = outdir.claim('out-test', fresh=True, overwrite=False); lock.release()"
"""
import difflib
import errno
import os
import re
import shutil
import socket
from contextlib import suppress

from utils import UserError, project_file

try:
    import fcntl
except ImportError:  # Windows: msvcrt's byte-range locks end with the process too
    fcntl = None
    import msvcrt

LOCK_NAME = "train.lock"
CHECKPOINTS = ("ckpt.pt", "last.pt")
SET_ASIDE = re.compile(r"(ckpt|last)_\d+(_\d+)?\.pt")  # a resume's earlier ckpt.pt or later last.pt, kept (resume.py)
TEMP = re.compile(r".+\.pt(\.\d+)?\.tmp")  # what fileio.atomic_torch_save (ckpt.pt.PID.tmp) and download_pretrained (ckpt.pt.tmp) write before their rename


def claim(out_dir, fresh, overwrite):
    """Make out_dir ready for a training run and take its lock; returns the Lock (release it,
    or use it as a context manager). fresh: a run from scratch, which refuses to replace an
    earlier run's checkpoints unless overwrite."""
    if not fresh and not os.path.isdir(out_dir):
        raise UserError(f"--out_dir={out_dir} is not a folder, so there is no run in it to resume "
                        "(--init_from=resume reads its ckpt.pt or last.pt); check the path")
    made = None  # the outermost folder this run creates (out_dir, or a missing parent of it)
    if not os.path.exists(out_dir):
        made = os.path.abspath(out_dir)
        while not os.path.exists(os.path.dirname(made)):
            made = os.path.dirname(made)
    make_folder(out_dir)
    try:
        lock = Lock(out_dir)
    except OSError as e:  # a read-only folder, a full disk
        raise UserError(f"cannot write in --out_dir={out_dir} ({e.strerror or e}); use another --out_dir") from None
    lock.made_folder = made  # a run refused or stopped before it wrote anything leaves no empty folder
    try:
        earlier = earlier_files(out_dir)
        if fresh and any(n in CHECKPOINTS for n in earlier) and not overwrite:
            raise UserError(f"--out_dir={out_dir} already holds {listed(earlier)} of an earlier run, which a "
                            "fresh run (init_from=scratch) would replace: use another --out_dir, --init_from=resume "
                            "to continue that run, or --overwrite=True to replace it")
        blocked = [n for n in CHECKPOINTS if os.path.isdir(os.path.join(out_dir, n))]
        if blocked:  # (a run would train, then fail to write it)
            raise UserError(f"{os.path.join(out_dir, blocked[0])} is a folder, where this run writes its checkpoint "
                            "file: move it away (or use another --out_dir)")
        left = sorted(n for n in os.listdir(out_dir) if TEMP.fullmatch(n))
        for name in left:
            os.remove(os.path.join(out_dir, name))
        if left:
            print(f"note: removed {', '.join(left)} from {out_dir}, left by an interrupted run")
    except OSError as e:
        lock.release()
        raise UserError(f"cannot write in --out_dir={out_dir} ({e.strerror or e}); use another --out_dir") from None
    except BaseException:
        lock.release()
        raise
    return lock


def listed(names):
    """'a', 'a and b', 'a, b and c'."""
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def earlier_files(out_dir):
    """The checkpoints of an earlier run in out_dir: ckpt.pt, last.pt and those a resume set
    aside (resume.py's ckpt_N.pt, last_N.pt): what --overwrite=True removes."""
    earlier = [n for n in CHECKPOINTS if os.path.exists(os.path.join(out_dir, n))]
    return earlier + sorted(n for n in os.listdir(out_dir) if SET_ASIDE.fullmatch(n))


def remove_earlier(out_dir):
    """A fresh run with --overwrite=True, when it writes its first checkpoint: remove the
    earlier run's, so that none of them is mixed with this run's."""
    earlier = earlier_files(out_dir)
    try:
        for name in earlier:
            os.remove(os.path.join(out_dir, name))
    except OSError as e:
        raise UserError(f"cannot remove the earlier run's checkpoints in --out_dir={out_dir} ({e.strerror or e}); "
                        "use another --out_dir") from None
    if earlier:
        curves = any(n.startswith("events.out.tfevents.") for n in os.listdir(out_dir))
        print(f"note: --overwrite=True: removed {listed(earlier)} of the earlier run in {out_dir}"
              + ("; its TensorBoard curves (events.out.tfevents.*) stay beside this run's: delete the older "
                 "files to see this run alone" if curves else ""))


def make_folder(out_dir, option="out_dir"):
    """Create out_dir if needed; one UserError if it cannot hold files (option: the setting
    that named it)."""
    flag = f"--{option}={out_dir}"
    if not out_dir or not out_dir.strip():
        raise UserError(f"--{option} is empty: name the folder for the results, e.g. --{option}=out")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"{flag} is a file, not a folder; use another --{option}")
    parent = os.path.dirname(os.path.abspath(out_dir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"{flag} lies under {parent}, which is a file; use another --{option}")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} cannot be created ({e.strerror or e}); use another --{option}") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise UserError(f"{flag} is not writable; use another --{option}")


def check_space(out_dir, model, extra_bytes=0, kept=0):
    """One UserError if out_dir's disk cannot take this model's checkpoints: weights and the
    two AdamW moments (and extra_bytes, e.g. an XL memory), for each checkpoint not there yet,
    once more for the new file written beside the one it replaces, and once more for each of
    the `kept` files that a new one does not replace (set aside under another name)."""
    per_file = 3 * sum(p.numel() * p.element_size() for p in model.parameters()) + extra_bytes + 2 ** 20
    missing = sum(not os.path.exists(os.path.join(out_dir, n)) for n in CHECKPOINTS)
    need, free = per_file * (missing + 1 + kept), shutil.disk_usage(out_dir).free
    if free < need:
        raise UserError(f"--out_dir={out_dir} has {free / 2 ** 20:,.1f} MiB free; this model's checkpoints need "
                        f"about {need / 2 ** 20:,.1f} MiB: free some space or use another --out_dir")


class Lock:
    """out_dir/train.lock: the holder's pid and host inside, and an OS lock on the file
    that ends with the process (kill -9 included), so a dead run's lock is taken over."""

    def __init__(self, out_dir):
        self.path, self.fd, self.made_folder = os.path.join(out_dir, LOCK_NAME), None, None
        for _ in range(100):  # the holder may remove the file between our open and our lock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                _lock(fd)
            except OSError as e:
                holder = _read(fd) or "a process"
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK, errno.EDEADLK):
                    raise
                raise UserError(f"another training run ({holder}) is writing into {out_dir}: wait for it to end, "
                                f"stop it, or use another --out_dir (the lock is {self.path})") from None
            try:
                same = fcntl is None or os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                break
            os.close(fd)
        else:
            raise UserError(f"could not take the lock {self.path}; is another run starting there?")
        previous = _read(self.fd)
        if previous:
            print(f"note: took over {self.path} from a run that has ended ({previous})")
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        os.write(self.fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        os.fsync(self.fd)

    def release(self):
        if self.fd is None:
            return
        if fcntl is not None:
            with suppress(OSError):  # (gone, or a folder made read-only meanwhile: the OS lock ends anyway)
                os.remove(self.path)  # while still locked: a run that opened it meanwhile sees it gone
        os.close(self.fd)
        if fcntl is None:
            with suppress(OSError):
                os.remove(self.path)
        self.fd = None
        folder = os.path.dirname(os.path.abspath(self.path))
        while self.made_folder and folder.startswith(self.made_folder):  # out_dir up to made_folder, if empty
            try:
                os.rmdir(folder)
            except OSError:  # (not empty: the run wrote into it)
                break
            folder = os.path.dirname(folder)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _lock(fd):
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:  # a byte far past the text, so that others can still read who holds the lock
        os.lseek(fd, 2 ** 20, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)


def _read(fd):
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 200).decode(errors="replace").strip()


def checkpoint_path(out_dir, name, option="checkpoint_name"):
    """out_dir + name, accepting "ckpt", "ckpt.pt", "last", "last.pt"; a name that is a path
    (the option that gave it: a file name inside --out_dir) is one UserError saying how."""
    if not name.strip():
        raise UserError(f"--{option} is empty: give the name of a checkpoint in --out_dir (ckpt or last)")
    if "/" in name or os.sep in name:
        folder, file = os.path.split(name)
        stem = file.removesuffix(".pt")
        inside = os.path.normpath(os.path.join(out_dir, folder))  # the folder read as inside --out_dir
        here, there = os.path.join(folder, stem + ".pt"), os.path.join(inside, stem + ".pt")
        if not os.path.isfile(here) and os.path.isfile(there):
            folder = inside  # (the path is not there from here, but is from --out_dir)
        raise UserError(f"--{option}={name} is a path; {option} is the name of a file inside --out_dir: pass "
                        f"--out_dir={folder or '/'} --{option}={stem or 'ckpt'}")
    return os.path.join(out_dir, name if name.endswith(".pt") else name + ".pt")


PROJECT = os.path.dirname(os.path.abspath(__file__))  # where a relative out_dir run from here would be


def _recipe_for(folder):
    """The train.py arguments that write into folder: the recipe in config/ whose out_dir it
    is, else the CPU recipe pointed at it."""
    config_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config")  # (not PROJECT: tests move that)
    for name in sorted(os.listdir(config_dir)):
        with open(os.path.join(config_dir, name)) as f:
            m = re.search(r"^out_dir = [\"']([^\"']+)[\"']", f.read(), re.M)
        if m and m.group(1) == os.path.basename(os.path.normpath(folder)):
            given = "" if os.path.normpath(folder) == m.group(1) else f" --out_dir={folder}"
            return project_file(f"config/{name}") + given
    return f"{project_file('config/train_shakespeare_char_cpu.py')} --out_dir={folder}"


def missing_checkpoint(path, option="checkpoint_name"):
    """The UserError for a checkpoint file that is not at path: the checkpoints its folder
    holds instead (chosen with --option=NAME), or how to make one."""
    folder = os.path.dirname(path) or "."
    by_name = option.endswith("checkpoint_name")  # a name in out_dir; else (--baseline, --base) a path
    pick = lambda f: f"--{option}={f[:-3] if by_name else os.path.join(folder, f)}"  # noqa: E731
    where = "--out_dir" if by_name else f"--{option}"
    make = (f"train one (python {project_file('train.py')} {_recipe_for(folder)}) or download the "
            f"tutorial's (python {project_file('download_pretrained.py')} --out_dir={folder})")
    if os.path.isfile(folder):
        return UserError(f"{folder} is a file, not a folder: pass the folder that holds it ({where}="
                         f"{os.path.dirname(folder) or '.'})" + (f" and --{option}={os.path.basename(folder)}"
                                                                 if by_name else ""))
    if not os.path.isdir(folder):
        project = os.path.join(PROJECT, folder)
        if not os.path.isabs(folder) and os.path.isdir(project):  # run from another folder than the run's
            given = project if by_name else os.path.join(project, os.path.basename(path))  # (--baseline: a file)
            return UserError(f"{folder!r} does not exist in {os.getcwd()} (paths are read from the folder you run "
                             f"in), but {project} does: pass {where}={given}, or cd {PROJECT}")
        if by_name and os.path.dirname(os.path.normpath(folder)) == "":  # a folder here: any here that hold one?
            held = _runs_here(folder)
            if held:
                return UserError(f"{folder!r} does not exist; {_runs_hint(held, where)}; or {make}")
        return UserError(f"{folder!r} does not exist: {make}, or pass {where}=<the folder train.py wrote>")
    held = sorted(f for f in os.listdir(folder) if f.endswith(".pt") and os.path.isfile(os.path.join(folder, f)))
    if not held:
        runs = _runs_here(folder) if by_name and os.path.dirname(os.path.normpath(folder)) == "" else []
        if by_name and _holds_data(folder):  # (not a folder to train into)
            return UserError(f"checkpoint {path} not found: {folder} holds text to train on, not a run; "
                             + (_runs_hint(runs, where) if runs else f"pass {where}=<the folder train.py wrote> "
                                "(its config's out_dir, e.g. out-shakespeare-char-cpu)"))
        if runs:  # (--out_dir=. or data: a folder here, not a run's)
            return UserError(f"checkpoint {path} not found, and {folder} holds none; {_runs_hint(runs, where)}; "
                             f"or {make}")
        return UserError(f"checkpoint {path} not found, and {folder} holds none: {make}")
    if os.path.basename(path) == "ckpt.pt" and "last.pt" in held:  # a run stopped before its first ckpt.pt
        return UserError(f"checkpoint {path} not found, but {os.path.join(folder, 'last.pt')} is there (the latest "
                         f"state of its run): name it with {pick('last.pt')}")
    return UserError(f"checkpoint {path} not found; {folder} holds {', '.join(held)}: name one with {pick(held[0])}")


def _holds_data(folder):
    """Whether folder is a dataset's (what --dataset names: its prepare.py, or its two splits) or
    the project's data/ (datasets in its subfolders)."""
    has = lambda *names: all(os.path.isfile(os.path.join(folder, *n.split("/"))) for n in names)  # noqa: E731
    return has("prepare.py") or has("train.txt", "val.txt") or any(has(f"{d}/prepare.py") for d in os.listdir(folder))


def _runs_hint(runs, where):
    """'folders here that hold a checkpoint: a, b (pass e.g. --out_dir=a)'."""
    return (f"folders here that hold a checkpoint: {', '.join(runs[:3])}{', ...' if len(runs) > 3 else ''} "
            f"(pass e.g. {where}={runs[0]})")


def _runs_here(name):
    """The folders here that hold a checkpoint, the likeliest meant by name first: those whose
    name is close to it (out-shakespeare-char for out-shakespeare-char-cpu), then the newest."""
    when = {}
    for d in os.listdir("."):
        files = [os.path.join(d, f) for f in ("ckpt.pt", "last.pt")]
        times = [os.path.getmtime(f) for f in files if os.path.isfile(f)]
        if times:
            when[d] = max(times)
    close = difflib.get_close_matches(os.path.normpath(name), list(when), n=3, cutoff=0.6)
    return close + sorted((d for d in when if d not in close), key=lambda d: -when[d])
