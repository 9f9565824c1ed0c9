"""
Bad input at the edges of the scripts: an output that cannot be written (a reader that stops,
a full device), prompts that are not UTF-8 or not a file, dataset folders that cannot be
written or are half there, a prepare.py given the wrong file, and a plug-in with the wrong
signature. Each is one line "error: ..." (or, for a reader that stops, a quiet exit), never a
traceback, and nothing already prepared is lost.

    python -m pytest -q tests/test_bad_input_io.py
"""
import errno
import os
import subprocess
import sys

import pytest

import loader
from conftest import (REPO_ROOT, TINY, assert_user_error, run_in_process, run_script, save_tiny_checkpoint, tiny_corpus,
                      write_splits)
from loader import ByteLoader, dataset_paths, prepare
from utils import UserError


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    """A folder holding ckpt.pt of a tiny untrained model, as train.py writes it."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("out"))


run = run_in_process  # (exit code, stdout, stderr) of a script run in this process


def environment(buffered):
    """The environment of a script run, its stdout buffered (Python's default) or not."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONUNBUFFERED", None)
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    return env


def error_lines(stderr):
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


# -- an output that cannot be written ----------------------------------------------------------

def test_sample_whose_reader_stops_exits_quietly(out_dir):
    """python sample.py | head -c 100: no traceback (there were two), exit status 141."""
    proc = subprocess.Popen([sys.executable, "sample.py", f"--out_dir={out_dir}", "--device=cpu",
                             "--max_new_tokens=5000"], cwd=REPO_ROOT, env=environment(buffered=True),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert len(proc.stdout.read(100)) == 100
    proc.stdout.close()  # the reader stops, as head does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert error_lines(err) == []


@pytest.mark.parametrize("buffered", [True, False])
def test_help_into_a_closed_pipe_exits_quietly(buffered):
    """Buffered, the output fails only at the final flush; that is handled too."""
    proc = subprocess.Popen([sys.executable, "train.py", "--help"], cwd=REPO_ROOT, env=environment(buffered),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the script has started: its first write fails
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert error_lines(err) == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
@pytest.mark.parametrize("buffered", [True, False])
def test_output_to_a_full_device_is_one_line(out_dir, buffered):
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO_ROOT, env=environment(buffered),
                              stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
        assert_user_error(proc, "error: could not write the output: No space left on device")
        proc = subprocess.run([sys.executable, "sample.py", f"--out_dir={out_dir}", "--device=cpu",
                               "--max_new_tokens=5"], cwd=REPO_ROOT, env=environment(buffered),
                              stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert proc.returncode == 2  # the status lines on stderr come first, then the one error line
    assert error_lines(proc.stderr) == ["error: could not write the output: No space left on device; "
                                        "make room where it goes, or send it elsewhere"]


# -- prompts -------------------------------------------------------------------------------

def test_prompt_bytes_that_are_not_utf8_reach_the_model_as_they_are(out_dir):
    proc = subprocess.run([sys.executable, b"sample.py", f"--out_dir={out_dir}".encode(), b"--device=cpu",
                           b"--start=\xff\xfeab", b"--max_new_tokens=3"], cwd=REPO_ROOT, env=environment(True),
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.startswith(b"\\xff\\xfeab")  # the prompt's bytes, escaped as the model's are


def test_prompt_file_that_is_a_folder(out_dir, tmp_path):
    code, _, err = run("sample.py", "--device=cpu", f"--out_dir={out_dir}", f"--start=FILE:{tmp_path}")
    assert code == 2 and error_lines(err) == [f"error: prompt file {str(tmp_path)!r} is a folder; "
                                              "--start=FILE:path reads the prompt from the file at path"]


# -- dataset folders -----------------------------------------------------------------------

def refuse_writes(monkeypatch, code=errno.EROFS):
    """loader's writes fail as on a read-only file system (reading still works)."""
    def fake_open(path, mode="r", *args, **kw):
        if "w" in mode:
            raise OSError(code, os.strerror(code), path)
        return open(path, mode, *args, **kw)
    monkeypatch.setattr(loader, "open", fake_open, raising=False)


def test_dataset_on_a_read_only_file_system(tmp_path, monkeypatch):
    (tmp_path / "input.txt").write_bytes(tiny_corpus(1000))
    refuse_writes(monkeypatch)
    with pytest.raises(UserError, match=r"cannot write train.txt and val.txt into .*Read-only file system\); "
                                        "make the folder writable, or copy the dataset"):
        dataset_paths(str(tmp_path))
    assert os.listdir(tmp_path) == ["input.txt"]


def test_dataset_in_a_folder_without_write_permission(tmp_path):
    """The same for real, as train.py sees it (not as root, whom permissions do not stop)."""
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "input.txt").write_bytes(tiny_corpus(1000))
    ds.chmod(0o555)
    try:
        if os.access(ds, os.W_OK):
            pytest.skip("this user may write a folder of mode 0o555 (root)")
        proc = run_script("train.py", *TINY, f"--dataset={ds}", f"--out_dir={tmp_path / 'out'}", "--max_iters=1")
        assert_user_error(proc, f"cannot write train.txt and val.txt into {ds}", "make the folder writable")
        assert os.listdir(ds) == ["input.txt"]
    finally:
        ds.chmod(0o755)


def test_train_and_val_are_replaced_together_or_not_at_all(tmp_path, monkeypatch):
    prepare(str(tmp_path), input_path=str(write_file(tmp_path / "a.txt", tiny_corpus(1000))))
    before = {name: (tmp_path / name).read_bytes() for name in ("input.txt", "train.txt", "val.txt")}
    real_fsync, calls = os.fsync, []

    def disk_fills_at_the_third_file(fd):
        calls.append(fd)
        if len(calls) == 3:  # input.txt and train.txt are written, val.txt is not
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", disk_fills_at_the_third_file)
    new = write_file(tmp_path / "b.txt", tiny_corpus(2000, seed=1))
    with pytest.raises(UserError, match="cannot write input.txt and train.txt and val.txt .* free some space"):
        prepare(str(tmp_path), input_path=str(new), force=True)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.txt", "input.txt", "train.txt", "val.txt"]


def write_file(path, data):
    path.write_bytes(data)
    return path


def test_folder_with_train_but_no_val_says_which_is_missing(tmp_path):
    (tmp_path / "train.txt").write_bytes(tiny_corpus(1000))
    with pytest.raises(UserError) as info:
        dataset_paths(str(tmp_path))
    assert str(info.value).startswith(f"{tmp_path} has train.txt but no val.txt; add val.txt, or put")


@pytest.mark.parametrize("name", ["train.txt", "val.txt"])
@pytest.mark.parametrize("with_input", [False, True])
def test_a_folder_named_train_or_val_txt_is_named_as_a_folder(tmp_path, name, with_input):
    """A folder where train.txt or val.txt belongs is what is wrong, with or without a corpus
    beside it: not 'no train.txt' nor a folder that cannot be written."""
    (tmp_path / name).mkdir()
    if with_input:
        (tmp_path / "input.txt").write_bytes(tiny_corpus(1000))
    with pytest.raises(UserError, match=f"{tmp_path / name} is a folder, not a text file; move it away"):
        dataset_paths(str(tmp_path))
    assert (tmp_path / name).is_dir() and not (tmp_path / ({"train.txt", "val.txt"} - {name}).pop()).exists()


def test_empty_val_in_a_folder_says_what_to_do(tmp_path):
    write_splits(tmp_path, tiny_corpus(1000))
    (tmp_path / "val.txt").write_bytes(b"")
    with pytest.raises(UserError) as info:
        ByteLoader(str(tmp_path / "val.txt"), 8, 2)
    message = str(info.value)
    assert "val.txt is empty" in message and "prepare.py" not in message and "as input.txt" in message
    (tmp_path / "input.txt").write_bytes(tiny_corpus(1000))
    with pytest.raises(UserError, match="delete train.txt and val.txt in .* splits them again"):
        ByteLoader(str(tmp_path / "val.txt"), 8, 2)


@pytest.mark.parametrize("setting, words", [("", "--dataset is empty; name a dataset (known: "),
                                            ("..", "--dataset=.. is not a dataset name (known: ")], ids=["empty", "updir"])
def test_empty_dataset_setting_lists_the_known_ones(setting, words):
    with pytest.raises(UserError) as info:
        dataset_paths(setting)
    assert str(info.value).startswith(words) and "shakespeare_char" in str(info.value)


# -- prepare.py given the wrong file -------------------------------------------------------

def prepared(tmp_path):
    """A prepared dataset folder; returns (folder, its files' bytes)."""
    ds = tmp_path / "ds"
    prepare(str(ds), input_path=str(write_file(tmp_path / "corpus.txt", tiny_corpus(1000))))
    return ds, {name: (ds / name).read_bytes() for name in ("input.txt", "train.txt", "val.txt")}


@pytest.mark.parametrize("data, words", [(b"\x7fELF\x02\x01\x01\x00\x00" * 50, "is not text (it holds NUL bytes"),
                                         (b"123456789", "differs from the")], ids=["binary", "9 bytes"])
def test_prepare_refuses_to_replace_the_text_unless_forced(tmp_path, data, words):
    ds, before = prepared(tmp_path)
    bad = write_file(tmp_path / "bad.bin", data)
    with pytest.raises(UserError, match="--force=True") as info:
        prepare(str(ds), input_path=str(bad))
    assert words in str(info.value)
    assert {name: (ds / name).read_bytes() for name in before} == before
    prepare(str(ds), input_path=str(bad), force=True)
    assert (ds / "input.txt").read_bytes() == data


def test_prepare_with_the_same_text_again_is_fine(tmp_path):
    ds, before = prepared(tmp_path)
    prepare(str(ds), input_path=str(tmp_path / "corpus.txt"))
    assert {name: (ds / name).read_bytes() for name in before} == before


def test_prepare_script_refuses_a_binary_input(tmp_path):
    for name in ("utils.py", "fileio.py", "loader.py", "configurator.py", "data/svejk_char/prepare.py"):
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        (tmp_path / name).write_bytes(open(os.path.join(REPO_ROOT, name), "rb").read())
    ds = tmp_path / "data" / "svejk_char"
    assert run_script("data/svejk_char/prepare.py", f"--input={write_file(tmp_path / 'a.txt', tiny_corpus(1000))}",
                      cwd=tmp_path).returncode == 0
    proc = run_script("data/svejk_char/prepare.py", f"--input={sys.executable}", cwd=tmp_path)
    assert_user_error(proc, "is not text", "--force=True")
    assert (ds / "input.txt").read_bytes() == tiny_corpus(1000)


def test_a_folder_of_binary_bytes_trains_with_a_note(tmp_path):
    """A folder whose input.txt is not text (a program, say: --dataset named the wrong folder)
    is split on first use as any other, and train.py says what it reads; text gets no note."""
    from conftest import train
    binary, text = tmp_path / "bin", tmp_path / "text"
    for folder, data in ((binary, open(sys.executable, "rb").read(100_000)), (text, tiny_corpus(1000))):
        folder.mkdir()
        (folder / "input.txt").write_bytes(data)
    printed = train(binary, tmp_path / "o1", "--max_iters=1")
    first = open(sys.executable, "rb").read().index(0)
    assert f"note: {binary / 'train.txt'} holds NUL bytes (the first at byte {first:,}): a binary file" in printed
    assert "NUL" not in train(text, tmp_path / "o2", "--max_iters=1")


# -- a plug-in with the wrong signature ----------------------------------------------------

@pytest.mark.parametrize("setting, source, expected", [
    ("attention", "def attn(q, k):\n    return q\n",
     "attn() takes 2 positional arguments but 5 were given; it is called as attn(q, k, v, mask, dropout_p)"),
    ("kv_trim", "def attn(k, v, pos):\n    return k, v, pos\n",
     "attn() takes 3 positional arguments but 5 were given; it is called as attn(k, v, pos, kv_window, kv_sink)"),
    ("kv_quant", "def attn(x, bits):\n    return x\n",
     "attn() missing 1 required positional argument: 'bits'; it is called as attn(x)"),
], ids=["attention", "kv_trim", "kv_quant"])
def test_plugin_called_with_arguments_it_does_not_take(out_dir, tmp_path, monkeypatch, setting, source, expected):
    name = f"wrong_signature_{setting}"
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    more = ["--kv_window=8"] if setting == "kv_trim" else []
    code, _, err = run("sample.py", "--device=cpu", f"--out_dir={out_dir}", f"--{setting}={name}:attn",
                       "--max_new_tokens=3", *more)
    assert code == 2
    lines = err[err.index("error: "):].splitlines()
    assert "Traceback" not in err
    assert lines[0] == f"error: --{setting}={name}:attn cannot be called: TypeError: {expected}"
    assert lines[1:] == [f'  File "{tmp_path / name}.py", line 1, in attn', f"    {source.splitlines()[0]}"]


@pytest.mark.parametrize("started", ["plain", "ignoring Ctrl-C", "imports done"])
def test_ctrl_c_while_a_script_imports_ends_it_quietly(started):
    """A script imports quiet_start before torch: Ctrl-C until its done() ends the process
    at once (exit 130, nothing printed, nothing run after); a process started with Ctrl-C
    ignored keeps ignoring it; after done() Ctrl-C is a KeyboardInterrupt again."""
    import signal
    code = ("import os, signal, quiet_start\n"
            + ("quiet_start.done()\n" if started == "imports done" else "")
            + "os.kill(os.getpid(), signal.SIGINT)\n"
            "import torch\nprint('went on')\n")
    # (as a terminal starts it, whatever this test process inherited: a background job ignores Ctrl-C)
    how = signal.SIG_IGN if started == "ignoring Ctrl-C" else signal.SIG_DFL
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, how), timeout=120)
    if started == "plain":
        assert (proc.returncode, proc.stdout, proc.stderr) == (130, "", "")
    elif started == "ignoring Ctrl-C":
        assert proc.returncode == 0 and proc.stdout == "went on\n"
    else:
        assert proc.returncode != 0 and "KeyboardInterrupt" in proc.stderr and "went on" not in proc.stdout


def test_a_built_in_used_as_a_plug_in_does_not_take_the_blame_for_another(out_dir, tmp_path, monkeypatch):
    """kv.cache:keep_recent given as --kv_trim (a project module, through which every cache
    calls attention) and then a broken attention plug-in in the same process: the error names
    the attention plug-in, not the trim."""
    from kv.policy import KVOptions
    KVOptions(kv_window=8, kv_trim="kv.cache:keep_recent").check()
    (tmp_path / "wrong_signature_attention2.py").write_text("def attn(q, k):\n    return q\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, _, err = run("sample.py", "--device=cpu", f"--out_dir={out_dir}",
                       "--attention=wrong_signature_attention2:attn", "--max_new_tokens=3")
    assert code == 2 and "error: --attention=wrong_signature_attention2:attn cannot be called" in err, err
    # one that fails once called: the error, and no prompt printed before it as if sampling had begun
    (tmp_path / "failing_attention.py").write_text("def attn(q, k, v, mask, dropout_p):\n    raise ValueError('my bug')\n")
    code, out, err = run("sample.py", "--device=cpu", f"--out_dir={out_dir}", "--attention=failing_attention:attn",
                         "--max_new_tokens=3", "--start=ROMEO:")
    assert code == 2 and "error: --attention=failing_attention:attn failed: ValueError: my bug" in err, err
    assert out == "", out


def test_a_users_plug_in_beside_the_projects_modules_still_names_itself(tmp_path, monkeypatch):
    """A user's file in the project's own folder (here: a folder counted as one) is imported by
    the plug-in setting, not before: an error in it is still that plug-in's, with its lines."""
    import plugins
    (tmp_path / "rootattn_user.py").write_text("def attn(q, k, v, mask, dropout_p):\n    raise ValueError('my bug')\n")
    monkeypatch.setattr(plugins, "_OWN", (str(tmp_path),))
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = plugins.import_function("rootattn_user:attn", "attention")
    try:
        fn(None, None, None, None, 0.0)
    except ValueError as e:
        err = plugins.plugin_error(e)
    assert "--attention=rootattn_user:attn failed: ValueError: my bug" in str(err)
    assert any("rootattn_user.py" in line for line in err.details)


def test_a_plug_in_module_in_the_folder_you_run_in_is_found(out_dir, tmp_path):
    """`--attention=myattn:attend` and `--kv_trim=mypkg.trim:keep_recent`, the modules in the
    folder the script runs in (not the project's): sampled as the same settings written as file
    paths are; `python path/to/exercises/check.py --module=mypkg.trim` finds it there too."""
    (tmp_path / "myattn.py").write_text("from attention import softmax_attention as attend\n")
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "trim.py").write_text("from kv.cache import keep_recent\n")
    sample = os.path.join(REPO_ROOT, "sample.py")
    common = ["--device=cpu", f"--out_dir={out_dir}", "--max_new_tokens=12", "--seed=2", "--kv_window=6"]
    for by_name, by_path in ((["--attention=myattn:attend"], [f"--attention={tmp_path / 'myattn.py'}:attend"]),
                             (["--kv_trim=mypkg.trim:keep_recent"],
                              [f"--kv_trim={tmp_path / 'mypkg' / 'trim.py'}:keep_recent"])):
        here = run_script(sample, *common, *by_name, cwd=tmp_path)
        there = run_script(sample, *common, *by_path)
        assert here.returncode == 0 == there.returncode, here.stderr + there.stderr
        assert here.stdout == there.stdout
    proc = run_script(os.path.join(REPO_ROOT, "exercises", "check.py"), "kv_window", "--module=mypkg.trim",
                      cwd=tmp_path, timeout=300)
    assert proc.returncode == 0 and "passed, 0 failed" in proc.stdout, proc.stdout + proc.stderr


def test_a_plug_in_file_named_like_a_project_module_is_named_as_hidden(out_dir, tmp_path):
    """attention.py in the folder you run in, named as --attention=attention:fn: the project's
    attention module would be imported in its place, silently; one line says so instead."""
    (tmp_path / "attention.py").write_text("def naive_attention(*args, **kwargs):\n    raise RuntimeError('mine')\n")
    proc = run_script(os.path.join(REPO_ROOT, "sample.py"), "--device=cpu", f"--out_dir={out_dir}",
                      "--attention=attention:naive_attention", "--max_new_tokens=3", cwd=tmp_path)
    assert_user_error(proc, "your attention.py here is hidden by a module named 'attention'", "rename your file")
