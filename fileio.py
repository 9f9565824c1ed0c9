"""
Files that never appear half-written: a checkpoint, a JSON record or a table is written to a temporary file beside its place and renamed over it once complete and on disk.

    from fileio import atomic_torch_save, read_json, write_json
    atomic_torch_save({"model": model.state_dict()}, "out/ckpt.pt")
    write_json("out/kv_study/mqa/results.json", {"rows": rows})
"""
import json
import os
import re

import torch


def atomic_write(path, write):
    """write(f) into a binary file that never appears truncated at path: the data goes to a
    temporary file named after this process (two processes never share one), which replaces
    path only once it is complete and on disk. On any failure (a full disk, kill -9) path is
    left as it was; the temporary file is removed here, or after a kill by the next write of
    path (remove_dead_temps) or, a checkpoint's, by the next training run in that folder."""
    remove_dead_temps(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(path))


def remove_dead_temps(path):
    """Remove the temporary files of path (path.PID.tmp) that a writer killed mid-write left:
    those of a process no longer running. A live writer's stays. Only where a process can be
    asked whether it runs without touching it (POSIX: signal 0)."""
    if os.name != "posix":
        return
    folder, name = os.path.split(path)
    temp = re.compile(re.escape(name) + r"\.(\d+)\.tmp")
    try:
        names = os.listdir(folder or ".")
    except OSError:
        return
    for n in names:
        m = temp.fullmatch(n)
        if m and not running(int(m.group(1))):
            try:
                os.remove(os.path.join(folder, n))
            except OSError:  # (removed by another writer meanwhile, or not ours to remove)
                pass


def running(pid):
    """Whether process pid runs (POSIX); this process counts as running."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only whether pid exists is checked
    except ProcessLookupError:
        return False
    except OSError:  # (PermissionError: it runs, as another user)
        return True
    return True


def atomic_torch_save(obj, path):
    """torch.save through atomic_write. A write that fails raises its OSError (a full disk),
    also where torch's zip writer turns it into a RuntimeError ("unexpected pos ...")."""
    def save(f):
        try:
            torch.save(obj, f)
        except RuntimeError as e:
            met = e.__cause__ or e.__context__
            if isinstance(met, OSError):
                raise met from None
            raise
    atomic_write(path, save)


def write_json(path, value):
    """value as JSON at path, atomically (atomic_write), its folder made if needed."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps(value, indent=1).encode()))


def read_json(path):
    """The JSON at path, or None when there is none or it cannot be read."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def fsync_dir(folder):
    """Make a rename in folder survive a power cut (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
