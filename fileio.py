"""
Files that never appear half-written: a checkpoint, a JSON record or a table is written to a temporary file beside its place and renamed over it once complete and on disk.

    from fileio import atomic_torch_save, read_json, write_json
    atomic_torch_save({"model": model.state_dict()}, "out/ckpt.pt")
    write_json("out/kv_study/mqa/results.json", {"rows": rows})
"""
import json
import os

import torch


def atomic_write(path, write):
    """write(f) into a binary file that never appears truncated at path: the data goes to a
    temporary file named after this process (two processes never share one), which replaces
    path only once it is complete and on disk. On any failure (a full disk, kill -9) path is
    left as it was; the temporary file is removed here, or after a kill (a checkpoint's) by
    the next training run in that folder."""
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
