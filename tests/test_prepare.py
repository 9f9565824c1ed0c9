"""
Dataset preparation: a 90/10 split by bytes, clear errors when there is nothing to split,
and on-demand preparation by loader.dataset_paths.

    python -m pytest -q tests/test_prepare.py
"""
import os
import shutil

import pytest

from conftest import REPO_ROOT, SHARED_DATA, assert_user_error, run_script, tiny_corpus
from loader import dataset_paths, prepare
from utils import UserError


def copy_scripts(root):
    """A copy of what the prepare scripts need, so tests never write into the repo's data/."""
    for name in ("utils.py", "fileio.py", "loader.py", "configurator.py", "data/svejk_char/prepare.py",
                 "data/shakespeare_char/prepare.py"):
        os.makedirs(os.path.dirname(root / name), exist_ok=True)
        shutil.copy(os.path.join(REPO_ROOT, name), root / name)


def test_split_is_90_10_by_bytes(tmp_path):
    source = tmp_path / "corpus.txt"
    source.write_bytes(tiny_corpus(12_345) + "ě".encode())  # the split counts bytes, not characters
    data = source.read_bytes()
    out = tmp_path / "ds"
    prepare(str(out), input_path=str(source))
    train, val = (out / "train.txt").read_bytes(), (out / "val.txt").read_bytes()
    assert len(train) == int(len(data) * 0.9) and train + val == data
    assert (out / "input.txt").read_bytes() == data
    prepare(str(out), input_path=str(out / "input.txt"))  # --input may name input.txt itself
    assert (out / "train.txt").read_bytes() == train


def test_prepare_script_with_input(tmp_path):
    copy_scripts(tmp_path)
    source = tmp_path / "novel.txt"
    source.write_bytes(tiny_corpus(1000))
    script = str(tmp_path / "data/svejk_char/prepare.py")
    proc = run_script(script, f"--input={source}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "train.txt has 900 bytes, val.txt has 100 bytes" in proc.stdout
    assert (tmp_path / "data/svejk_char/val.txt").read_bytes() == tiny_corpus(1000)[900:]


def test_svejk_without_input_is_a_clear_error(tmp_path):
    copy_scripts(tmp_path)
    proc = run_script("data/svejk_char/prepare.py", cwd=tmp_path)
    assert_user_error(proc, "input.txt not found", "python data/svejk_char/prepare.py --input=")
    # a wrong --input fails before touching anything, so the real script can be run
    proc = run_script("data/svejk_char/prepare.py", f"--input={tmp_path / 'missing.txt'}")
    assert_user_error(proc, "missing.txt: no such file")


@pytest.mark.parametrize("corpus", ["shakespeare_char", "svejk_char"])
def test_prepare_script_alone_takes_the_offline_copy_a_training_run_would(tmp_path, corpus):
    """python data/NAME/prepare.py with no flags, no input.txt and ../shared/data/NAME/input.txt
    beside the project (an offline machine): the copy is split, as train.py's first use does,
    and nothing is downloaded."""
    repo = tmp_path / "project"
    copy_scripts(repo)
    shared = tmp_path / "shared" / "data" / corpus
    shared.mkdir(parents=True)
    (shared / "input.txt").write_bytes(tiny_corpus(1000))
    proc = run_script(f"data/{corpus}/prepare.py", cwd=repo)
    assert proc.returncode == 0 and "using the local copy" in proc.stdout and "downloading" not in proc.stdout, \
        proc.stdout + proc.stderr
    assert (repo / f"data/{corpus}/val.txt").read_bytes() == tiny_corpus(1000)[900:]


def test_failed_download_suggests_input(tmp_path):
    with pytest.raises(UserError, match="could not download .* --input="):
        prepare(str(tmp_path), url="http://127.0.0.1:9/input.txt")  # nothing listens on port 9


def test_prepare_script_checks_a_url_download_as_an_input(tmp_path):
    """--url gets --input's checks: not text (NUL bytes), too short to split, a text other than
    the input.txt already there; each refusal is one line that writes nothing, --force=True
    takes the bytes. A --url given is downloaded even when input.txt is there."""
    copy_scripts(tmp_path)
    ds, script = tmp_path / "data/shakespeare_char", "data/shakespeare_char/prepare.py"
    binary, short, text = tmp_path / "bin.txt", tmp_path / "one.txt", tmp_path / "text.txt"
    binary.write_bytes(b"ab\x00cdef")
    short.write_bytes(b"a")
    text.write_bytes(tiny_corpus(1000))
    proc = run_script(script, f"--url={binary.as_uri()}", cwd=tmp_path)
    assert_user_error(proc, f"the download from {binary.as_uri()} is not text (it holds NUL bytes, the first at "
                            "byte 2); check --url, or pass --force=True to train on these bytes anyway")
    proc = run_script(script, f"--url={short.as_uri()}", cwd=tmp_path)
    assert_user_error(proc, "has 1 bytes, too few to split into train.txt and val.txt; check --url")
    assert sorted(os.listdir(ds)) == ["prepare.py"]
    proc = run_script(script, f"--url={binary.as_uri()}", "--force=True", cwd=tmp_path)
    assert proc.returncode == 0 and "train.txt has 6 bytes, val.txt has 1 bytes" in proc.stdout, proc.stderr
    before = {name: (ds / name).read_bytes() for name in ("input.txt", "train.txt", "val.txt")}
    proc = run_script(script, f"--url={text.as_uri()}", cwd=tmp_path)  # was: input.txt split, --url ignored
    assert_user_error(proc, f"the download from {text.as_uri()} differs from the data/shakespeare_char/input.txt "
                            "already there (7 bytes)", "pass --force=True to replace it")
    proc = run_script(script, f"--url={text.as_uri()}", f"--input={text}", cwd=tmp_path)
    assert_user_error(proc, f"--input={text} and --url={text.as_uri()} both give the text; give one of them")
    assert {name: (ds / name).read_bytes() for name in before} == before
    proc = run_script(script, f"--url={text.as_uri()}", "--force=True", cwd=tmp_path)
    assert proc.returncode == 0 and (ds / "val.txt").read_bytes() == tiny_corpus(1000)[900:], proc.stderr
    proc = run_script(script, f"--url={text.as_uri()}", cwd=tmp_path)  # the same text again: fine
    assert proc.returncode == 0 and "train.txt has 900 bytes" in proc.stdout, proc.stderr


def test_dataset_paths_prepares_or_explains(tmp_path):
    (tmp_path / "input.txt").write_bytes(tiny_corpus(1000))
    train, val = dataset_paths(str(tmp_path))  # only input.txt there: split on demand
    assert os.path.getsize(train) == 900 and os.path.getsize(val) == 100
    with pytest.raises(UserError, match="input.txt"):
        dataset_paths(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="unknown dataset; known: .*shakespeare_char"):
        dataset_paths("no_such_dataset")


def test_a_bare_name_of_a_folder_here_is_pointed_to_its_path(tmp_path, monkeypatch):
    """--dataset=tinyds names a dataset under data/; when ./tinyds is a folder, the error says
    how to give it (--dataset=./tinyds), which then reads it."""
    (tmp_path / "tinyds").mkdir()
    (tmp_path / "tinyds" / "input.txt").write_bytes(tiny_corpus(1000))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"^--dataset=tinyds: no dataset tinyds under data/; for the folder "
                                        r"tinyds here, give its path: --dataset=\./tinyds$"):
        dataset_paths("tinyds")
    (tmp_path / "tinyds" / "input.txt").unlink()
    (tmp_path / "tinyds" / "val.txt").write_bytes(tiny_corpus(100))  # val.txt alone: what eval_kv.py reads
    with pytest.raises(UserError, match=r"--dataset=\./tinyds$"):
        dataset_paths("tinyds")
    (tmp_path / "tinyds" / "input.txt").write_bytes(tiny_corpus(1000))
    (tmp_path / "tinyds" / "val.txt").unlink()
    (tmp_path / "notes").mkdir()  # a folder here that holds no dataset: not pointed to
    for name in ("otherds", "notes"):
        with pytest.raises(UserError, match=r"unknown dataset; known: [a-z_, ]+$"):
            dataset_paths(name)
    train, _ = dataset_paths("./tinyds")
    assert os.path.getsize(train) == 900


@pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason="no ../shared/data on this machine")
def test_real_shakespeare_split(tmp_path):
    prepare(str(tmp_path), input_path=os.path.join(SHARED_DATA, "shakespeare_char", "input.txt"))
    assert os.path.getsize(tmp_path / "train.txt") == 1_003_854  # of 1,115,394 bytes
    assert os.path.getsize(tmp_path / "val.txt") == 111_540
