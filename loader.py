"""
The data: bytes as tokens, the byte loader that training reads, and dataset preparation.

    python -c "import loader; print(loader.encode('hé'), loader.decode(loader.encode('hé')))"
    python -c "import loader; print(loader.dataset_paths('shakespeare_char'))"
"""
import errno
import http.client
import os
import urllib.request

import numpy as np
import torch

from fileio import fsync_dir
from utils import UserError

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.path.join(REPO_DIR, "data")  # the named datasets, one folder each
SHARED_DATA = os.path.join(REPO_DIR, "..", "shared", "data")  # an offline machine's copies of the corpora
# where a named dataset's input.txt is downloaded from, when it is not here
SOURCES = {"shakespeare_char": "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"}
MARK = b"####"  # shown where the text jumps: a row restarted, or the text wrapped around

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
            raise UserError(_unusable(path))
        if block_size < 1 or batch_size < 1 or not 0.0 <= reset_prob <= 1.0:
            raise UserError(f"need block_size >= 1, batch_size >= 1 and 0 <= reset_prob <= 1; got "
                            f"{block_size}, {batch_size}, {reset_prob}")
        self.text = np.memmap(path, dtype=np.uint8, mode="r")  # bytes stay on disk until read
        self.period = len(MARK) + len(self.text)  # the layout is this period repeated twice
        if block_size + 1 > self.period:
            raise UserError(f"block_size={block_size} is longer than {path} "
                            f"({len(self.text)} bytes); use a smaller --block_size")
        self.block_size, self.batch_size, self.reset_prob = block_size, batch_size, reset_prob
        self.device, self.mark = device, True  # False: a jumped row starts with text, not "####"
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
        if self.mark:
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


EVAL_WINDOWS = ("auto", "random", "rows")


def eval_layout(eval_windows, xl_mem):
    """train.py's eval_windows resolved: "auto" is "rows" for a run with XL memory, else "random"."""
    return ("rows" if xl_mem else "random") if eval_windows == "auto" else eval_windows


def fixed_batches(path, block_size, batch_size, n_batches, seed, device="cpu", layout="random"):
    """The same n_batches batches every call (for the loss estimates). layout "random": each row
    of each batch is a window of the text at an offset of its own (batch_size x n_batches
    independent places: the estimate's spread is the smallest); "rows": each row continues the
    text from one batch to the next (the first batch restarts, and a row that runs past the end
    of the text starts it again), so an XL memory can be carried along, but the estimate covers
    only batch_size places."""
    random = layout == "random"  # every row jumps at every batch, with no "####" (it continues nothing)
    loader = ByteLoader(path, block_size, batch_size, reset_prob=1.0 if random else 0.0, seed=seed, device=device)
    loader.mark = not random
    return [loader.next() for _ in range(n_batches)]


def _prepare_command(data_dir):
    """The exact command a user should type to prepare data_dir."""
    script = os.path.relpath(os.path.join(data_dir, "prepare.py"))
    if os.path.isfile(os.path.join(data_dir, "input.txt")):
        return f"python {script}"
    shared = os.path.join(SHARED_DATA, os.path.basename(data_dir), "input.txt")
    path = os.path.relpath(shared) if os.path.isfile(shared) else "PATH"
    return f"python {script} --input={path}"


def _unusable(path):
    """What is wrong with a data file that is missing or empty, and what to do."""
    folder = os.path.dirname(path) or "."
    state = "is empty" if os.path.isfile(path) else "is missing"
    if os.path.isfile(os.path.join(folder, "prepare.py")):
        return f"data file {path} {state}; run {_prepare_command(folder)}"
    if os.path.isfile(os.path.join(folder, "input.txt")):
        return (f"data file {path} {state}; delete train.txt and val.txt in {folder}, and the next run "
                "splits them again from its input.txt")
    return (f"data file {path} {state}; write text into it, or put the whole corpus in {folder} as input.txt "
            "instead of train.txt and val.txt (it is split on first use)")


def _write_files(data_dir, files):
    """Write files {name: bytes} into data_dir, all or none: each goes to a temporary file of
    this process first, and only once all are complete and on disk do they replace their
    names, so train.txt and val.txt always come from the same text. A failure (a read-only
    folder, a full disk) leaves data_dir as it was and is one UserError."""
    temporary = {}
    try:
        for name, data in files.items():
            temporary[name] = os.path.join(data_dir, f"{name}.{os.getpid()}.tmp")
            with open(temporary[name], "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for name, tmp in temporary.items():
            os.replace(tmp, os.path.join(data_dir, name))
    except OSError as e:
        raise _cannot_write(data_dir, " and ".join(files), e) from None
    finally:
        for tmp in temporary.values():
            if os.path.isfile(tmp):
                os.remove(tmp)
    fsync_dir(data_dir)


def _cannot_write(data_dir, names, e):
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        todo = "free some space there"
    else:
        todo = "make the folder writable, or copy the dataset (its input.txt is enough) to a folder you can write"
    return UserError(f"cannot write {names} into {data_dir} ({e.strerror or e}); {todo}")


def _check_input(data, target, where, fix, force, same=False):
    """Refuse an input (an --input, a download) that is not text, or that would replace a
    different input.txt (same: it is that input.txt). fix: what to give instead; force: how
    to pass --force=True (a flag of prepare.py, or on first use the prepare.py command)."""
    if b"\0" in data:
        raise UserError(f"{where} is not text (it holds NUL bytes, the first at byte {data.index(0):,}); {fix}, "
                        f"or {force} to train on these bytes anyway")
    if os.path.isfile(target) and not same:
        old_size = os.path.getsize(target)
        if old_size != len(data) or _read(target, os.path.relpath(target)) != data:
            raise UserError(f"{where} differs from the {os.path.relpath(target)} already there ({old_size:,} "
                            f"bytes): checkpoints trained on the old text would be scored on the new one; {force} "
                            "to replace it, or put the new text as input.txt in a folder of its own and "
                            "train with --dataset=that/folder/")


def _force(data_dir, first_use, *flags):
    """How to pass --force=True: prepare.py's own flag, or on a first use (a training run that
    prepares the data) the prepare.py command that takes it."""
    if not first_use:
        return "pass --force=True"
    return f"run python {' '.join([os.path.relpath(os.path.join(data_dir, 'prepare.py')), *flags])} --force=True"


def _download(url, target, data_dir):
    """The bytes at url, read whole before anything is written; a failure is one UserError."""
    print(f"downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.read()
    except http.client.IncompleteRead as e:  # the connection closed early: a partial file
        reason = f"it ended after {len(e.partial):,} of {len(e.partial) + (e.expected or 0):,} bytes"
    except (OSError, ValueError, http.client.HTTPException) as e:  # URLError and timeouts are OSErrors
        reason = getattr(e, "reason", None) or str(e) or type(e).__name__
    raise UserError(f"could not download {url} ({reason}); either fetch it by hand into {os.path.relpath(target)}, "
                    f"or give a local copy: {_prepare_command(data_dir)}")


def not_text(path, head=2 ** 20):
    """A note when the first head bytes of a split hold NUL bytes (a binary file, not text:
    perhaps not the folder meant), else ''. Read as bytes all the same: a byte model can."""
    try:
        with open(path, "rb") as f:
            data = f.read(head)
    except OSError:  # (the loader says what is wrong with it)
        return ""
    if b"\0" not in data:
        return ""
    return (f"note: {path} holds NUL bytes (the first at byte {data.index(0):,}): a binary file, not text; "
            "the model learns its bytes all the same (was --dataset meant to name another folder?)")


def _corpus(data, where, fix="give a plain-text copy of the corpus"):
    """data, if it splits into a non-empty train.txt and val.txt; else one UserError."""
    if not data:
        raise UserError(f"{where} is empty: {fix}")
    if int(len(data) * 0.9) in (0, len(data)):
        raise UserError(f"{where} has {len(data)} bytes, too few to split into train.txt and val.txt; {fix}")
    return data


def _read(path, where):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"{where}: cannot read it ({e.strerror or e})") from None


def prepare(data_dir, input_path=None, url=None, force=False, fetch=False, first_use=False):
    """Split data_dir/input.txt into train.txt (first 90% of the bytes) and val.txt (the rest).
    input_path is copied to input.txt first; url is downloaded when there is no input.txt, or
    (fetch: a --url given) in any case. Every input is checked before it replaces a file: a bad
    one leaves data_dir as it was. An input_path or a download that is not text (NUL bytes),
    or that differs from the input.txt already there, is refused unless force. first_use: a
    training run prepares the data, so errors name the prepare.py command, not its flags."""
    try:
        os.makedirs(data_dir, exist_ok=True)
    except OSError as e:
        raise _cannot_write(os.path.dirname(os.path.abspath(data_dir)), os.path.basename(data_dir), e) from None
    target = os.path.join(data_dir, "input.txt")
    files = {}  # what is written, all at once at the end
    if input_path and fetch:
        raise UserError(f"--input={input_path} and --url={url} both give the text; give one of them")
    local = os.path.join(SHARED_DATA, os.path.basename(data_dir), "input.txt")
    if not input_path and not fetch and not os.path.exists(target) and os.path.isfile(local):
        print(f"using the local copy {os.path.relpath(local)}" + (" (--url=URL downloads instead)" if url else ""))
        input_path, first_use = local, True  # (errors then name the copy, as a training run's first use does)
    if input_path:
        where = f"the local copy {os.path.relpath(input_path)}" if first_use else f"--input={input_path}"
        if not os.path.isfile(input_path):
            raise UserError(f"{where}: " + ("a folder; give the text file in it (e.g. input.txt)"
                                            if os.path.isdir(input_path) else
                                            "not a regular file (a device or a pipe); give a text file"
                                            if os.path.exists(input_path) else "no such file"))
        data = _corpus(_read(input_path, where), where)
        same = os.path.exists(target) and os.path.samefile(input_path, target)
        if not force:
            _check_input(data, target, where, "give a plain-text copy of the corpus",
                         _force(data_dir, first_use, f"--input={os.path.relpath(input_path)}"), same)
        if not same:
            files["input.txt"] = data
    elif os.path.exists(target) and not fetch:
        data = _corpus(_read(target, os.path.relpath(target)), os.path.relpath(target))
    else:
        if not url:
            raise UserError(f"{os.path.relpath(target)} not found and there is no download source;"
                            f" give a plain-text copy of the corpus: {_prepare_command(data_dir)}")
        data = _download(url, target, data_dir)
        where = f"the download from {url}"
        # checked as an --input is: a wrong --url (a binary file, a snippet) leaves nothing behind
        fix = ("give a plain-text copy of the corpus: " + _prepare_command(data_dir)) if first_use else "check --url"
        data = _corpus(data, where, fix)
        if not force:
            _check_input(data, target, where, fix, _force(data_dir, first_use, *([f"--url={url}"] if fetch else [])))
        files["input.txt"] = data
    n = int(len(data) * 0.9)
    files["train.txt"], files["val.txt"] = data[:n], data[n:]
    _write_files(data_dir, files)
    where = os.path.relpath(data_dir)
    where = os.path.abspath(data_dir) if where == "." or where.startswith("..") else where  # never just "."
    print(f"{where}: train.txt has {n:,} bytes, "
          f"val.txt has {len(data) - n:,} bytes")


def dataset_dir(dataset):
    """The folder of a dataset setting: a name under data/, or a directory path."""
    return dataset if os.sep in dataset or "/" in dataset else os.path.join(DATA_DIR, dataset)


def same_dataset(a, b):
    """Whether two dataset settings (a name, or a path, perhaps relative) name one folder."""
    return os.path.realpath(dataset_dir(a)) == os.path.realpath(dataset_dir(b))


def known_datasets():
    """The names of the datasets under data/ (those with a prepare.py)."""
    return sorted(d for d in os.listdir(DATA_DIR) if os.path.isfile(os.path.join(DATA_DIR, d, "prepare.py")))


def dataset_paths(dataset):
    """(train_path, val_path) of a dataset: a name under data/, or a directory path. Prepares it
    on first use from its input.txt, an offline copy in ../shared/data, or its download source;
    otherwise says which command prepares it."""
    is_dir_path = os.sep in dataset or "/" in dataset
    if not dataset.strip():
        raise UserError(f"--dataset is empty; name a dataset (known: {', '.join(known_datasets())}) or give "
                        "the path of a folder holding the corpus as input.txt")
    if not is_dir_path and dataset in (".", ".."):
        raise UserError(f"--dataset={dataset} is not a dataset name (known: {', '.join(known_datasets())}); "
                        f"to use a folder, give its path with a slash: --dataset={dataset}/")
    data_dir = dataset_dir(dataset)
    train, val = os.path.join(data_dir, "train.txt"), os.path.join(data_dir, "val.txt")
    if os.path.isfile(train) and os.path.isfile(val):
        return train, val
    for path in (train, val):
        if os.path.exists(path) and not os.path.isfile(path):  # (a folder of that name: nothing to read or write)
            raise UserError(f"{path} is a folder, not a text file; move it away (train.txt and val.txt are split "
                            "from the corpus, input.txt, on first use)")
    if os.path.isfile(os.path.join(data_dir, "input.txt")):
        prepare(data_dir)
        return train, val
    local = os.path.join(SHARED_DATA, os.path.basename(data_dir), "input.txt")
    if not is_dir_path and os.path.isfile(local):  # an offline machine's local copy of the corpus
        print(f"preparing {dataset} from the local copy {os.path.relpath(local)}")
        prepare(data_dir, input_path=local, first_use=True)
        return train, val
    if not is_dir_path and dataset in SOURCES:
        print(f"preparing {dataset} (first use)")
        prepare(data_dir, url=SOURCES[dataset], first_use=True)
        return train, val
    if not is_dir_path and not os.path.isdir(data_dir):
        # a bare name is one under data/ only, wherever the run starts; a folder of that name
        # here that holds a dataset is pointed to, as a path
        if any(os.path.isfile(os.path.join(dataset, name)) for name in ("val.txt", "train.txt", "input.txt")):
            raise UserError(f"--dataset={dataset}: no dataset {dataset} under data/; for the folder {dataset} here, "
                            f"give its path: --dataset=./{dataset}")
        raise UserError(f"--dataset={dataset}: unknown dataset; known: {', '.join(known_datasets())}")
    if is_dir_path and not os.path.isdir(data_dir):
        what = "it is a file, not a folder" if os.path.exists(data_dir) else "there is no such folder"
        raise UserError(f"no train.txt and val.txt in {data_dir}: {what}; give a folder holding the corpus "
                        "as input.txt")
    if not os.path.isfile(os.path.join(data_dir, "prepare.py")):
        have = [name for name in ("train.txt", "val.txt") if os.path.isfile(os.path.join(data_dir, name))]
        if have:
            missing = "val.txt" if have == ["train.txt"] else "train.txt"
            raise UserError(f"{data_dir} has {have[0]} but no {missing}; add {missing}, or put the whole corpus "
                            "there as input.txt (train.txt and val.txt are then split from it on first use)")
        raise UserError(f"no train.txt and val.txt in {data_dir}; "
                        f"put the corpus there as input.txt (it is split on first use)")
    raise UserError(f"dataset {dataset} is not prepared; run {_prepare_command(data_dir)}")
