"""
A newcomer's first hour: the thread choice on a busy CPU, the dependencies that
requirements.txt must hold, the dataset prepared on first use (and the one line when there is
no network), progress and the end-of-run summary, and --help of every script.

    python -m pytest -q tests/test_newcomer.py
"""
import ast
import contextlib
import glob
import http.client
import importlib.util
import io
import os
import re
import runpy
import socket
import sys
import urllib.error
import urllib.request
from unittest import mock

import pytest
import torch

import loader
import devices
import utils
from checkpoint import save_checkpoint
from configurator import configure
from conftest import REPO_ROOT, tiny, tiny_corpus, train
from devices import pick_threads
from utils import UserError


# -- threads -----------------------------------------------------------------------------------

@pytest.fixture
def machine(monkeypatch):
    """Set the CPUs this process may use and the load on them: machine(cpus, load)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)

    def set_machine(cpus, load, running=0):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
        monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load), raising=False)
        monkeypatch.setattr(devices, "running_others", lambda: running)
    return set_machine


@pytest.mark.parametrize("cpus, load, expected", [
    (2, 0.0, 2),   # idle: every CPU
    (2, 0.4, 2),   # a little background work rounds away
    (2, 1.2, 1),   # one CPU busy
    (2, 2.0, 1),   # two busy processes: still at least one thread
    (2, 7.5, 1),   # a shared box with a queue
    (8, 2.6, 5),
    (4, -1.0, 4),  # never more threads than CPUs
])
def test_automatic_threads_are_the_free_cpus(machine, cpus, load, expected):
    machine(cpus, load)
    n, reason = pick_threads(0)
    assert n == expected
    assert reason == f"auto: {cpus} CPUs, load {max(load, 0):.1f}"


def test_work_started_seconds_ago_counts_before_the_average_shows_it(machine):
    machine(2, 0.3, running=2)  # two busy processes just started: the minute's average is still low
    assert pick_threads(0) == (1, "auto: 2 CPUs, load 2.0")
    machine(2, 0.3, running=0)
    assert pick_threads(0)[0] == 2


def test_explicit_threads_then_omp_num_threads_win(machine, monkeypatch):
    machine(2, 6.0)
    assert pick_threads(2) == (2, "--threads=2")
    assert pick_threads(3) == (3, "--threads=3, more than the 2 CPUs")  # given, and said
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert pick_threads(0) == (2, "OMP_NUM_THREADS=2")
    assert pick_threads(1) == (1, "--threads=1")  # the command line beats the environment
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")  # not a number: ignored, as OpenMP ignores it
    assert pick_threads(0)[0] == 1
    with pytest.raises(UserError, match="--threads must be 0"):
        pick_threads(-1)


def test_too_many_threads_name_the_most_accepted(machine, monkeypatch):
    """The refusal's advice agrees with what is accepted: the most it names passes, one more
    does not; the environment's alike."""
    machine(2, 0.0)
    with pytest.raises(UserError) as e:
        pick_threads(9)
    most = int(str(e.value).split("give at most ")[1].split()[0])
    assert pick_threads(most)[0] == most and "(2, one a CPU, is usually the fastest)" in str(e.value)
    with pytest.raises(UserError, match=f"--threads={most + 1} is far more"):
        pick_threads(most + 1)
    monkeypatch.setenv("OMP_NUM_THREADS", str(most + 1))
    with pytest.raises(UserError, match=f"set it to at most {most} "):
        pick_threads(0)


def test_threads_without_affinity_or_load_average(monkeypatch):
    """macOS has no sched_getaffinity, Windows no getloadavg: all CPUs, no load."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.delattr(os, "getloadavg", raising=False)
    monkeypatch.setattr(devices, "running_others", lambda: 0)  # no /proc there either
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert pick_threads(0) == (6, "auto: 6 CPUs, load 0.0")


def test_use_threads_sets_torch_and_says_thread_once(machine):
    machine(1, 0.0)
    before = torch.get_num_threads()
    try:
        assert devices.use_threads(0) == "1 thread (auto: 1 CPU, load 0.0)"
        assert torch.get_num_threads() == 1
        assert devices.use_threads(2) == "2 threads (--threads=2, more than the 1 CPU)"
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def run_in_process(script, *args):
    """Run a script as `python script args` in this process: (exit code, stdout, stderr)."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with mock.patch.object(sys, "argv", [script, *map(str, args)]), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        try:
            runpy.run_path(os.path.join(REPO_ROOT, script), run_name="__main__")
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


# -- training: progress, summary, hints --------------------------------------------------------

@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """A tiny run of train.py (12 iterations) and what it printed."""
    out = tmp_path_factory.mktemp("run") / "out"
    printed = train(data_dir, out, "--max_iters=12", "--threads=1")
    return out, printed


def test_training_shows_progress_and_a_summary(trained):
    out, printed = trained
    assert "1 thread (--threads=1)" in printed.splitlines()[[l.startswith("device") for l in
                                                              printed.splitlines()].index(True)]
    logs = [l for l in printed.splitlines() if re.match(r"iter \d+: loss", l)]
    assert len(logs) == 6  # every log_interval=2
    assert "16% done, ETA " in logs[0] and "100% done, ETA 0:00" in logs[-1]  # (2 of 12, rounded down)
    summary = printed.splitlines()[-2:]
    best = min((float(m.group(2)), int(m.group(1))) for m in
               re.finditer(r"iter (\d+): train loss \S+, val loss ([\d.]+)", printed))
    assert summary[0].startswith("done: 12 iterations in 0:")
    assert f"best val loss {best[0]:.4f} at iteration {best[1]}" in summary[0]
    assert f"{out / 'ckpt.pt'} (best val loss), {out / 'last.pt'} (latest)" in summary[0]
    # block_size=32 in the tiny settings: sampling keeps the context the model was trained on
    assert summary[1] == f"next: python sample.py --out_dir={out} --kv_window=32"


def test_eval_only_says_it_trains_nothing(data_dir, trained):
    out, _ = trained
    printed = train(data_dir, out, "--init_from=resume", "--eval_only=True")
    assert "eval_only: the checkpoint is evaluated once; nothing is trained or written" in printed
    assert "more iterations" not in printed and "done:" not in printed


def test_a_big_model_on_the_cpu_points_to_the_cpu_recipe(data_dir, tmp_path):
    printed = train(data_dir, tmp_path / "out", "--n_layer=6", "--n_head=6", "--n_embd=384",
                    "--block_size=8", "--batch_size=1", "--eval_iters=1", "--max_iters=1")
    assert "10.7M-parameter model trains for hours on a CPU" in printed
    assert "python train.py config/train_shakespeare_char_cpu.py" in printed


def test_sample_chooses_its_threads(tmp_path):
    model = tiny()
    save_checkpoint(str(tmp_path / "ckpt.pt"), model, None, {"n_layer": 2, "n_head": 4, "n_embd": 32,
                    "bias": False}, {}, 1, 5.0)
    code, _, err = run_in_process("sample.py", f"--out_dir={tmp_path}", "--device=cpu", "--max_new_tokens=3")
    assert code == 0, err
    assert "1 thread (OMP_NUM_THREADS=1)" in err.splitlines()[0]  # conftest sets OMP_NUM_THREADS=1
    code, _, err = run_in_process("sample.py", f"--out_dir={tmp_path}", "--device=cpu", "--max_new_tokens=3",
                                  "--threads=1")
    assert "1 thread (--threads=1)" in err.splitlines()[0]


# -- data on a fresh machine -------------------------------------------------------------------

@pytest.fixture
def fresh_data(tmp_path, monkeypatch):
    """data/shakespeare_char as a fresh clone has it (prepare.py only), no ../shared/data."""
    (tmp_path / "data" / "shakespeare_char").mkdir(parents=True)
    monkeypatch.setattr(loader, "DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(loader, "SHARED_DATA", str(tmp_path / "no_shared_data"))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "data" / "shakespeare_char"


def offline(url, *args, **kw):
    raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))


def test_first_training_offline_prints_both_ways_out(fresh_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(SystemExit) as info:
        train("shakespeare_char", tmp_path / "out", "--max_iters=2")
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not download "), lines
    assert loader.SOURCES["shakespeare_char"] in lines[0]  # fetch it by hand...
    assert "python data/shakespeare_char/prepare.py --input=PATH" in lines[0]  # ...or give a local copy
    assert "Traceback" not in lines[0] and os.listdir(fresh_data) == []  # no half-written file


def test_first_use_downloads_and_splits(fresh_data, monkeypatch):
    corpus = tiny_corpus(1000)
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(corpus))
    train_path, val_path = loader.dataset_paths("shakespeare_char")
    assert open(train_path, "rb").read() + open(val_path, "rb").read() == corpus
    assert (fresh_data / "input.txt").read_bytes() == corpus


def test_a_download_that_is_not_text_is_refused_unless_forced(fresh_data, monkeypatch, capsys):
    """Bytes with NUL in them (a wrong --url, a binary file) are refused as an --input of them
    is: one line, nothing written; --force=True takes them."""
    blob = b"\x00\x01binary" * 50
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(blob))
    with pytest.raises(UserError, match="is not text .*NUL bytes, the first at byte 0.*--force=True"):
        loader.dataset_paths("shakespeare_char")
    assert os.listdir(fresh_data) == []
    loader.prepare(str(fresh_data), url="file:///some/where", force=True)
    assert (fresh_data / "input.txt").read_bytes() == blob


def test_a_refused_first_use_download_names_the_prepare_command(fresh_data, tmp_path, monkeypatch, capsys):
    """A first training run that downloads text it refuses (NUL bytes, too short to split)
    says so in one line naming prepare.py's command (train.py has no --force or --url), and
    writes nothing."""
    for blob, words in ((b"\x00\x01binary" * 50, "is not text (it holds NUL bytes, the first at byte 0); give a "
                         "plain-text copy of the corpus: python data/shakespeare_char/prepare.py --input=PATH, or run "
                         "python data/shakespeare_char/prepare.py --force=True to train on these bytes anyway"),
                        (b"x", "has 1 bytes, too few to split into train.txt and val.txt; give a plain-text copy of "
                         "the corpus: python data/shakespeare_char/prepare.py --input=PATH")):
        monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(blob))
        with pytest.raises(SystemExit) as info:
            train("shakespeare_char", tmp_path / "out", "--max_iters=2")
        lines = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 2 and len(lines) == 1 and lines[0].endswith(words), lines
        assert "check --url" not in lines[0] and os.listdir(fresh_data) == []


def test_a_download_cut_short_is_one_line_and_leaves_nothing(fresh_data, monkeypatch):
    """The connection closes before the Content-Length is read (http.client.IncompleteRead,
    not an OSError): one line, no traceback and no partial input.txt."""
    class Cut(io.BytesIO):
        def read(self, *args):
            raise http.client.IncompleteRead(b"First Citizen:", 986)
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: Cut())
    with pytest.raises(UserError, match=r"could not download .* \(it ended after 14 of 1,000 bytes\); either fetch "
                                        r"it by hand into data/shakespeare_char/input.txt, or give a local copy"):
        loader.dataset_paths("shakespeare_char")
    assert os.listdir(fresh_data) == []


def test_a_binary_local_copy_names_the_prepare_command(fresh_data, tmp_path, monkeypatch):
    """The offline copy in ../shared/data is checked as an --input is; the error names that
    copy (no --input was typed) and the prepare.py command that would take it anyway."""
    shared = tmp_path / "shared" / "shakespeare_char"
    shared.mkdir(parents=True)
    (shared / "input.txt").write_bytes(b"ab\x00cdef" * 10)
    monkeypatch.setattr(loader, "SHARED_DATA", str(tmp_path / "shared"))
    with pytest.raises(UserError, match=r"^the local copy shared/shakespeare_char/input.txt is not text .*; give a "
                                        r"plain-text copy of the corpus, or run python data/shakespeare_char/"
                                        r"prepare.py --input=shared/shakespeare_char/input.txt --force=True to"):
        loader.dataset_paths("shakespeare_char")
    assert os.listdir(fresh_data) == []


def test_first_use_prefers_the_local_copy(fresh_data, tmp_path, monkeypatch):
    shared = tmp_path / "shared" / "shakespeare_char"
    shared.mkdir(parents=True)
    (shared / "input.txt").write_bytes(tiny_corpus(1000))
    monkeypatch.setattr(loader, "SHARED_DATA", str(tmp_path / "shared"))
    monkeypatch.setattr(urllib.request, "urlopen", offline)  # the network is never asked
    train_path, _ = loader.dataset_paths("shakespeare_char")
    assert os.path.getsize(train_path) == 900


# -- dependencies ------------------------------------------------------------------------------

def third_party_imports():
    """Top-level names of the modules the project's own code (not the tests) imports, other
    than the standard library and the project's modules."""
    every = glob.glob(os.path.join(REPO_ROOT, "**", "*.py"), recursive=True)
    local = {os.path.splitext(os.path.relpath(p, REPO_ROOT))[0].split(os.sep)[0] for p in every}
    files = [p for p in every if not os.path.relpath(p, REPO_ROOT).startswith("tests" + os.sep)]
    names = set()
    for path in files:
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    return names - local - set(sys.stdlib_module_names)


def test_requirements_hold_every_runtime_import():
    with open(os.path.join(REPO_ROOT, "requirements.txt")) as f:
        required = {re.split(r"[<>=!~\[; ]", line.strip())[0].lower().replace("-", "_")
                    for line in f if line.strip() and not line.startswith("#")}
    missing = third_party_imports() - required
    assert not missing, f"imported by the project but not in requirements.txt: {missing}"
    # torch.utils.tensorboard needs the tensorboard package, and sweeps plot with matplotlib
    assert {"tensorboard", "matplotlib"} <= required and "pytest" not in required


def test_a_missing_optional_package_is_one_note(capsys):
    assert utils.has_module("torch", "nothing")
    assert not utils.has_module("no_such_package_here", "the sweep writes no .png")
    err = capsys.readouterr().err
    assert err == ("note: no_such_package_here is not installed, so the sweep writes no .png "
                   "(pip install -r requirements.txt installs it)\n")


def test_sweep_without_matplotlib_says_so_first_and_writes_the_rest(tiny_data_dir, tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib"
                        else find_spec(name, *a))
    save_checkpoint(str(tmp_path / "ckpt.pt"), tiny(), None, {"n_layer": 2, "n_head": 4, "n_embd": 32,
                    "bias": False}, {"dataset": str(tiny_data_dir), "block_size": 32}, 1, 5.0)
    code, out, err = run_in_process("eval_kv.py", f"--out_dir={tmp_path}", "--sweep=quick", "--n_streams=1",
                                    "--stream_len=64", "--kv_quant_group=8", "--device=cpu", "--tensorboard=False")
    assert code == 0, err
    assert err.startswith("note: matplotlib is not installed, so the sweep writes no .png")
    assert (tmp_path / "eval_kv_quick.csv").exists() and (tmp_path / "eval_kv_quick.md").exists()
    assert not (tmp_path / "eval_kv_quick.png").exists()
    assert ".png" not in out.splitlines()[-1]


def test_download_pretrained_offline_says_why_and_leaves_nothing(tmp_path, monkeypatch):
    import gdown

    def offline_gdown(**kw):
        try:
            raise socket.gaierror(-2, "Name or service not known")
        except OSError as e:  # requests wraps the resolver's error twice, as here
            raise ConnectionError("HTTPSConnectionPool(host='drive.google.com', port=443): Max retries "
                                  "exceeded with url: /uc?id=... (Caused by NameResolutionError(...") from e
    monkeypatch.setattr(gdown, "download", offline_gdown)
    out = tmp_path / "out-shakespeare-char"
    code, _, err = run_in_process("download_pretrained.py", f"--out_dir={out}")
    assert code == 2
    assert err.strip() == ("error: could not download the checkpoint from Google Drive (ConnectionError: "
                           "[Errno -2] Name or service not known); check the network, or copy the tutorial's "
                           f"ckpt.pt into {out}/ by hand")
    assert not out.exists()
    monkeypatch.setitem(sys.modules, "gdown", None)  # not installed: said before anything is made
    code, _, err = run_in_process("download_pretrained.py", f"--out_dir={out}")
    assert code == 2 and "gdown is not installed: pip install -r requirements.txt" in err and not out.exists()


# -- --help ------------------------------------------------------------------------------------

SCRIPTS = sorted({os.path.relpath(p, REPO_ROOT) for p in glob.glob(os.path.join(REPO_ROOT, "*.py"))
                  + glob.glob(os.path.join(REPO_ROOT, "data", "*", "prepare.py"))
                  if "configure(globals()" in open(p).read() and "__main__" in open(p).read()})


def test_the_readme_names_every_script_that_takes_help():
    """The README's list of the scripts that take --help is the scripts (a module run by
    mistake prints nothing: the list tells which files are scripts)."""
    readme = open(os.path.join(REPO_ROOT, "README.md")).read()
    listed = readme.split("Every script (")[1].split(")")[0]
    named = {os.path.basename(s) for s in SCRIPTS if not s.startswith("data")}
    assert named | {"data/*/prepare.py", "python -m exercises.check"} == set(re.findall(r"`([^`]+)`", listed))


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_describes_every_setting(script, capsys):
    assert {"train.py", "sample.py", "eval_kv.py", "bench.py", "gen_sample_data.py"} <= set(SCRIPTS)
    g = runpy.run_path(os.path.join(REPO_ROOT, script), run_name="help_check")  # main() does not run
    with pytest.raises(SystemExit) as info:
        configure(g, ["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out.split("\nsettings (override with --name=value")[1]  # after the docstring
    settings = [l for l in out.splitlines() if l.startswith("  --")]
    names = [l[4:].split("=", 1)[0] for l in settings]
    assert names and len(names) == len(set(names))
    for line in settings:  # `  --name=default  description`
        assert re.fullmatch(r"  --\w+=.+?  \S.*", line), f"{script}: no description: {line}"
    assert not [n for n in names if n.isupper()], "a constant is not a setting"
    if "threads" in g:
        assert "0 = automatic" in settings[names.index("threads")]
    if script == "train.py":  # grouped under the file's comment headers, in the file's order
        headers = [l.strip() for l in out.splitlines() if l.startswith("  ") and l.strip().endswith(":")
                   and not l.startswith("  --")]
        assert headers[:2] == ["I/O:", "data:"] and headers[-1] == "system:"


def test_help_and_readme_name_every_kind_in_the_tables(capsys):
    """The lists a user reads (--help, the README) are written by hand: a kind added to one of
    the name tables (ATTENTION, ATTENTION_LAYERS, kv/quant.py's FORMATS, kv/evict.py's POLICIES)
    must be added there too, or nobody learns it exists."""
    from attention import ATTENTION
    from kv.evict import POLICIES
    from kv.quant import FORMATS
    from model import ATTENTION_LAYERS

    def help_line(script, name):
        g = runpy.run_path(os.path.join(REPO_ROOT, script), run_name="help_check")
        with pytest.raises(SystemExit):
            configure(g, ["--help"])
        return next(l for l in capsys.readouterr().out.splitlines() if l.startswith(f"  --{name}="))

    readme = open(os.path.join(REPO_ROOT, "README.md")).read()
    row = lambda name: next(l for l in readme.splitlines() if l.startswith(f"| `{name}`"))
    attention_line = next(l for l in readme.splitlines() if "`--attention=" in l)
    kinds = {"attention": (list(ATTENTION) + list(ATTENTION_LAYERS), help_line("train.py", "attention"),
                           attention_line),
             "kv_quant": (FORMATS, help_line("sample.py", "kv_quant"), row("kv_quant")),
             "kv_evict": (list(POLICIES), help_line("eval_kv.py", "kv_evict"), row("kv_evict"))}
    for setting, (names, helped, readme_line) in kinds.items():
        for name in names:
            assert re.search(rf"\b{name}\b", helped), f"--help of {setting} does not name {name}: {helped}"
            assert re.search(rf"\b{name}\b", readme_line), f"README's {setting} line does not name {name}"
