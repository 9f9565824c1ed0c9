"""
Trust: what a hostile or careless user can do to the scripts. A table of bad inputs, each
answered by exit code 2 and one line "error: ...", no traceback and no file changed; then
one test per promise: a fresh run never replaces a checkpoint unasked, one run per out_dir,
a checkpoint is data (never code, never a huge allocation, checked for damage), preparation
and eval_kv never write where they should not, and a user's plug-in that fails is named with
its own lines only.

Most cases run the script inside this process (runpy, argv patched); a few run it for real.

    python -m pytest -q tests/test_trust.py
"""
import contextlib
import errno
import hashlib
import io
import os
import subprocess
import sys
import uuid
from unittest import mock

import pytest
import torch

import checkpoint
import fileio
import outdir
from checkpoint import checksum, load_model, read_checkpoint
from conftest import REPO_ROOT, TINY, run_in_process, run_script, tiny_corpus, train, write_splits
from model import GPT, GPTConfig
from utils import UserError


run = run_in_process  # (exit code, stdout, stderr) of a script run in this process


def snapshot(*folders):
    """Every file under the folders, with a hash of its bytes."""
    files = {}
    for folder in folders:
        for root, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    files[path] = hashlib.sha256(f.read()).hexdigest()
    return files


def plugin_module(folder, source):
    """A module of the user's (source) in folder, which is on sys.path; returns its name."""
    name = f"user_plugin_{uuid.uuid4().hex[:8]}"
    (folder / f"{name}.py").write_text(source)
    return name


MARKER_PLUGIN = """\
import pathlib
pathlib.Path(__file__).with_suffix(".imported").write_text("its top-level code ran")
from attention import softmax_attention as attend
"""


def forged(ckpt, path, config=None, **model_args):
    """Save ckpt with model_args (and config) changed and the checksum recomputed, as a
    forger would: only the checks after the checksum's can catch it."""
    ckpt = dict(ckpt, model_args=dict(ckpt["model_args"], **model_args), config=dict(ckpt["config"], **config or {}))
    ckpt.pop("crc32", None)
    ckpt["crc32"] = {k: checksum(v) for k, v in ckpt.items()}
    torch.save(ckpt, path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Folders the bad inputs run against: data, a trained out_dir ('good'), a folder of bad
    checkpoints ('bad'), plug-in modules on sys.path, and an out_dir whose lock is held."""
    root = tmp_path_factory.mktemp("trust")
    (root / "data").mkdir()
    data = write_splits(root / "data", tiny_corpus())
    good = root / "good"
    train(data, good, "--max_iters=2", "--tensorboard=False")
    bad = root / "bad"
    bad.mkdir()
    plugins = root / "plugins"
    plugins.mkdir()
    sys.path.insert(0, str(plugins))
    ckpt = torch.load(good / "ckpt.pt", weights_only=True)
    raw = (good / "ckpt.pt").read_bytes()
    (bad / "corrupt.pt").write_bytes(raw[:3000] + bytes(200) + raw[3200:])
    (bad / "trunc.pt").write_bytes(raw[: len(raw) // 3])
    (bad / "junk.pt").write_bytes(b"<html>quota exceeded</html>")
    (bad / "empty.pt").write_bytes(b"")
    (bad / "folder.pt").mkdir()
    torch.save({"model": {}, "model_args": {}, "x": _Evil()}, bad / "evil.pt")
    torch.save({"weights": torch.zeros(2)}, bad / "foreign.pt")
    forged(ckpt, bad / "bomb.pt", n_embd=8192, n_layer=8)  # 26 GB if believed
    forged(ckpt, bad / "strtype.pt", n_layer="2")
    forged(ckpt, bad / "heads.pt", n_head=5)
    marker = plugin_module(plugins, MARKER_PLUGIN)
    forged(ckpt, bad / "plugin.pt", attention=f"{marker}:attend")
    elsewhere = root / "elsewhere"  # a folder a checkpoint names, holding only input.txt
    elsewhere.mkdir()
    (elsewhere / "input.txt").write_bytes(tiny_corpus(5000))
    forged(ckpt, bad / "elsewhere.pt", config=dict(dataset=str(elsewhere)))
    forged(ckpt, bad / "updir.pt", config=dict(dataset=".."))
    files = root / "files"
    files.mkdir()
    (files / "a_file").write_text("not a folder")
    (files / "empty.txt").write_bytes(b"")
    (files / "one_byte.txt").write_bytes(b"x")
    locked = root / "locked"
    lock = outdir.claim(str(locked), fresh=True, overwrite=False)  # a live run holds it
    yield dict(root=root, data=data, good=good, bad=bad, files=files, locked=locked, marker=plugins / marker,
               elsewhere=elsewhere)
    lock.release()
    sys.path.remove(str(plugins))


T = ["train.py", *TINY, "--dataset={data}", "--out_dir={root}/new", "--max_iters=2", "--tensorboard=False"]
S = ["sample.py", "--device=cpu", "--out_dir={good}", "--max_new_tokens=3"]
SB = ["sample.py", "--device=cpu", "--out_dir={bad}", "--max_new_tokens=3"]
E = ["eval_kv.py", "--device=cpu", "--out_dir={good}", "--stream_len=64", "--n_streams=1", "--dataset={data}"]
EB = ["eval_kv.py", "--device=cpu", "--out_dir={bad}", "--stream_len=64", "--n_streams=1"]
R = ["train.py", *TINY, "--dataset={data}", "--out_dir={bad}", "--init_from=resume", "--max_iters=4",
     "--tensorboard=False"]
P = ["data/shakespeare_char/prepare.py"]
G = ["gen_sample_data.py", "--dataset={data}"]

# (command, the text the one error line must hold); every case must exit with code 2
BAD_INPUTS = [
    # settings whose range is obvious (item 10)
    (T + ["--learning_rate=-1"], "--learning_rate must be at least 0, got -1"),
    (T + ["--learning_rate=1e999"], "--learning_rate must be a finite number, at least 0, got inf"),
    (T + ["--min_lr=-0.1"], "--min_lr must be at least 0"),
    (T + ["--beta1=1.0"], "--beta1 must be in [0, 1), got 1.0"),
    (T + ["--beta2=-0.5"], "--beta2 must be in [0, 1)"),
    (T + ["--dropout=1.0"], "--dropout must be in [0, 1)"),
    (T + ["--weight_decay=-0.1"], "--weight_decay must be at least 0"),
    (T + ["--grad_clip=-1"], "--grad_clip must be at least 0"),
    (T + ["--warmup_iters=-5"], "--warmup_iters must be at least 0"),
    (T + ["--min_lr=1e-2", "--learning_rate=1e-3"], "--min_lr=0.01 is above --learning_rate=0.001: the rate would rise"),
    (T + ["--reset_prob=1.5"], "--reset_prob must be in [0, 1]"),
    (T + ["--seed=99999999999999999999999"], "--seed: 99999999999999999999999 is too large a number"),  # (past what torch's seeds hold)
    (S + ["--seed=-99999999999999999999999"], "--seed: -99999999999999999999999 is too large a number"),
    (T + ["--seed=5000000000000000000"], "--seed must be in [-4611686018427387904, "),  # (an int64 past torch's seeds)
    (T + ["--threads=99999"], "--threads=99999 is far more than the"),  # (torch's thread pool crashed)
    (T + ["--batch_size=0"], "--batch_size must be at least 1"),
    (T + ["--block_size=-3"], "--block_size must be at least 1"),
    (T + ["--max_iters=-1"], "--max_iters must be 0 or more"),
    (T + ["--eval_interval=0"], "--eval_interval must be at least 1"),
    (T + ["--last_save_budget=0"], "--last_save_budget must be in (0, 1]"),
    (T + ["--threads=-2"], "--threads must be 0"),
    (T + ["--xl_mem=-1"], "--xl_mem must be 0"),
    (T + ["--kv_quant=int4", "--kv_quant_group=16", "--window=8"], "over kv_quant_group=16 tokens, more than the "
     "local window of 8: the inference cache quantizes nothing in the local layers"),  # (QAT would train on it)
    (T + ["--n_head=5"], "not a multiple of n_head=5"),
    (T + ["--n_layer=0"], "must be positive"),
    (T + ["--window=-1"], "window must be >= 0"),
    (T + ["--init_from=gpt2"], "--init_from must be 'scratch' or 'resume'"),
    (T + ["--resume_mode=later"], "--resume_mode must be"),
    (T + ["--dtype=float16"], "float16 is for GPUs"),
    (T + ["--device=tpu"], "unknown device"),
    (T + ["--learning_rate=fast"], "expected float"),
    (S + ["--temperature=inf"], "--temperature must be a finite number, at least 0, got inf"),  # (not "expected float")
    (S + ["--temperature=nan"], "--temperature must be a finite number, at least 0, got nan"),
    (T + ["--learning_rate=inf"], "--learning_rate must be a finite number, at least 0, got inf"),
    (T + ["--no_such_setting=1"], "unknown setting --no_such_setting"),
    (T + ["{files}/no_config.py"], "config file"),
    (T + ["--attention=softmaxx"], "unknown attention"),
    (T + ["--attention=no_such_module_xyz:fn"], "no module named 'no_such_module_xyz'"),
    (T + ["--xl_mem=8", "--xl_update=no_such_module_xyz:fn"], "--xl_update=no_such_module_xyz:fn: no module"),
    (T + ["--dataset={root}/no_such_folder"], "no_such_folder"),
    # an unusable out_dir, found before any work (item 9)
    (T + ["--out_dir="], "--out_dir is empty"),
    (T + ["--kv_share=3"], "kv_share must be between 1 (off) and n_layer=2"),
    (T + ["--out_dir={files}/a_file"], "is a file, not a folder"),
    (T + ["--out_dir={files}/a_file/sub"], "which is a file"),
    # one run per out_dir (item 2); a fresh run never replaces checkpoints unasked (item 1)
    (T + ["--out_dir={locked}"], "another training run (pid"),
    (T + ["--out_dir={good}"], "already holds ckpt.pt and last.pt"),
    # bad checkpoints: one line naming the file (items 3-6, 12)
    (R + ["--resume_checkpoint_name=nope"], "nope.pt not found"),
    (T + ["--init_from=resume", "--out_dir={root}/no_run"], "there is no run in it to resume"),
    (R + ["--resume_checkpoint_name=corrupt"], "corrupt.pt is corrupt"),
    (R + ["--resume_checkpoint_name=plugin"], "names the plug-in attention="),
    (R + ["--resume_checkpoint_name=bomb"], "model_args n_layer=8, n_embd=8192 do not fit its weights"),
    (SB + ["--checkpoint_name=corrupt"], "corrupt.pt is corrupt"),
    # a path where a file name inside out_dir belongs: how to say it
    (S + ["--checkpoint_name=out-x/last.pt"], "--checkpoint_name=out-x/last.pt is a path; checkpoint_name is the "
     "name of a file inside --out_dir: pass --out_dir=out-x --checkpoint_name=last"),
    (E + ["--checkpoint_name=/tmp/o/ckpt"], "pass --out_dir=/tmp/o --checkpoint_name=ckpt"),
    (S + ["--checkpoint_name="], "--checkpoint_name is empty: give the name of a checkpoint in --out_dir"),
    (R + ["--resume_checkpoint_name=o/last.pt"], "pass --out_dir=o --resume_checkpoint_name=last"),
    (SB + ["--checkpoint_name=trunc"], "trunc.pt is corrupt or truncated"),
    (SB + ["--checkpoint_name=junk"], "junk.pt is corrupt or not a checkpoint (Unsupported operand"),
    (SB + ["--checkpoint_name=empty"], "empty.pt is empty (0 bytes), not a checkpoint"),
    (SB + ["--checkpoint_name=folder"], "folder.pt is a folder"),
    (SB + ["--checkpoint_name=evil"], "evil.pt was refused: it asks to load posix.system"),
    (SB + ["--checkpoint_name=foreign"], "holds weights alone"),
    (SB + ["--checkpoint_name=bomb"], "do not fit its weights"),
    (SB + ["--checkpoint_name=strtype"], "model_args n_layer='2' should be of type int"),
    (SB + ["--checkpoint_name=heads"], "describe no model this code can build"),
    (SB + ["--checkpoint_name=plugin"], "add --attention="),
    (EB + ["--checkpoint_name=plugin"], "names the plug-in attention="),
    (EB + ["--checkpoint_name=bomb"], "do not fit its weights"),
    # a dataset named by a checkpoint is only read (item 8)
    (EB + ["--checkpoint_name=elsewhere"], "a folder named by a checkpoint is only read"),
    (EB + ["--checkpoint_name=updir"], "not a folder under data/"),
    # sample.py and eval_kv.py settings
    (S + ["--temperature=-1"], "--temperature must be at least 0"),
    (S + ["--top_k=-5"], "--top_k must be at least 0"),
    (S + ["--max_new_tokens=-1"], "--max_new_tokens must be 0 or more"),
    (S + ["--num_samples=0"], "--num_samples must be at least 1, got 0"),
    (S + ["--start="], "the prompt is empty"),
    (S + ["--start=FILE:{files}/none.txt"], "prompt file"),
    (S + ["--start=FILE:{files}/empty.txt"], "is empty"),
    (S + ["--out_dir={root}/nothing_here"], "does not exist"),
    (S + ["--checkpoint_name=nope"], "nope.pt not found"),
    (S + ["--kv_quant=int7"], "unknown kv_quant"),
    (S + ["--kv_evict=h2o"], "needs a budget"),
    (S + ["--kv_window=-2"], "kv_window must be an integer >= -1"),
    (S + ["--kv_quant=no_such_module_xyz:q"], "no module named"),
    (E + ["--n_streams=0"], "--n_streams must be at least 1"),
    (E + ["--stream_len=0"], "--stream_len must be at least 1"),
    (E + ["--chunk=-1"], "--chunk must be at least 0"),
    # preparation validates before it replaces anything (item 7)
    (P + ["--input={files}/empty.txt"], "is empty"),
    (P + ["--input=/dev/zero"], "not a regular file (a device or a pipe)"),
    (P + ["--input={files}/one_byte.txt"], "too few to split"),
    (P + ["--input={files}/none.txt"], "no such file"),
    (P + ["--input={files}"], "a folder; give the text file in it"),
    (G + ["--split=test"], "--split=test: use train or val"),
    (G + ["--n_batches=-1"], "--n_batches must be at least 1"),
    (G + ["--n_batches=0"], "--n_batches must be at least 1 (the batches to print)"),  # (printed nothing, exit 0)
    (G + ["--block_size=0"], "block_size >= 1"),
    (G + ["--reset_prob=2.0"], "reset_prob <= 1"),
    (["sample.py", "stray=word"], "bad argument 'stray=word'"),
]


def fill(args, world):
    return [a.format(**world) for a in args]


@pytest.mark.parametrize("command,expected", BAD_INPUTS, ids=[" ".join(c[0:1] + c[-1:]) for c, _ in BAD_INPUTS])
def test_bad_input_gets_one_line_and_changes_nothing(world, command, expected):
    watched = (world["root"], os.path.join(REPO_ROOT, "data"))
    before = snapshot(*watched)
    code, out, err = run(*fill(command, world))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, out[-2000:], err[-2000:])
    assert "Traceback" not in out + err
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], err
    assert lines[-1] == errors[0], err  # nothing after the error line
    assert snapshot(*watched) == before, "a file was changed, created or removed"
    assert not world["marker"].with_suffix(".imported").exists(), "a checkpoint's plug-in was imported"


@pytest.mark.slow
@pytest.mark.parametrize("command,expected", [
    (T + ["--learning_rate=-1"], "--learning_rate must be at least 0"),
    (SB + ["--checkpoint_name=evil"], "was refused: it asks to load posix.system"),
    (P + ["--input={files}/empty.txt"], "is empty"),
], ids=["train", "sample", "prepare"])
def test_bad_input_as_a_real_process(world, command, expected):
    before = snapshot(world["root"], os.path.join(REPO_ROOT, "data"))
    script, *args = fill(command, world)
    proc = run_script(os.path.join(REPO_ROOT, script), *args, cwd=world["root"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()  # status lines (device, ...) may come first
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], proc.stderr
    assert expected in lines[-1], proc.stderr
    assert snapshot(world["root"], os.path.join(REPO_ROOT, "data")) == before
    assert not (world["root"] / "pwned.txt").exists()


# -- item 1: a fresh run never destroys a checkpoint unasked ----------------------------------

def test_fresh_run_refuses_an_out_dir_with_checkpoints_unless_overwrite(world, tmp_path):
    out = tmp_path / "out"
    train(world["data"], out, "--max_iters=2", "--tensorboard=False")
    best = (out / "ckpt.pt").read_bytes()
    code, _, err = run(*fill(T, world), f"--out_dir={out}")
    assert code == 2 and "already holds ckpt.pt and last.pt" in err and "--overwrite=True" in err, err
    assert (out / "ckpt.pt").read_bytes() == best
    # --overwrite=True with a setting that fails its check: the earlier run is still there
    for bad in ("--kv_share=0", "--dataset=nosuchdata", "--kv_quant=int7", "--kv_quant=int4 --kv_quant_group=7"):
        code, _, err = run(*fill(T, world), f"--out_dir={out}", "--overwrite=True", *bad.split())
        assert code == 2 and (out / "ckpt.pt").read_bytes() == best and (out / "last.pt").exists(), err
    (out / "ckpt_2.pt").write_bytes(best)  # what a resume set aside belongs to the earlier run too
    code, _, err = run(*fill(T, world), f"--out_dir={out}")  # and the refusal names it: --overwrite removes it
    assert code == 2 and "already holds ckpt.pt, last.pt and ckpt_2.pt" in err, err
    code, printed, _ = run(*fill(T, world), f"--out_dir={out}", "--overwrite=True", "--max_iters=1", "--seed=7")
    assert code == 0 and "--overwrite=True: removed ckpt.pt, last.pt and ckpt_2.pt" in printed
    assert read_checkpoint(out / "last.pt")["iter_num"] == 1 and not (out / "ckpt_2.pt").exists()
    # evaluating a run from scratch writes nothing, so it is not refused
    code, _, err = run(*fill(T, world), f"--out_dir={out}", "--eval_only=True")
    assert code == 0, err


# -- item 2: one run per out_dir ----------------------------------------------------------------

def test_lock_is_refused_while_held_and_taken_over_when_its_holder_died(tmp_path):
    held = outdir.claim(str(tmp_path), fresh=True, overwrite=False)
    with pytest.raises(UserError, match=rf"another training run \(pid {os.getpid()} on .*\) is writing into"):
        outdir.claim(str(tmp_path), fresh=False, overwrite=False)
    held.release()
    assert not (tmp_path / "train.lock").exists()
    # what kill -9 leaves: the lock file (its OS lock died with the process) and temporary files
    (tmp_path / "train.lock").write_text("pid 99999999 on somewhere\n")
    (tmp_path / "last.pt.4242.tmp").write_bytes(b"half")
    (tmp_path / "ckpt.pt.tmp").write_bytes(b"half")
    (tmp_path / "notes.tmp").write_bytes(b"the user's")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        lock = outdir.claim(str(tmp_path), fresh=True, overwrite=False)
    assert "took over" in out.getvalue() and "pid 99999999 on somewhere" in out.getvalue()
    assert "removed ckpt.pt.tmp, last.pt.4242.tmp" in out.getvalue()
    assert sorted(os.listdir(tmp_path)) == ["notes.tmp", "train.lock"]
    assert (tmp_path / "train.lock").read_text().startswith(f"pid {os.getpid()} on ")
    lock.release()


def test_a_lock_that_cannot_be_removed_is_released_quietly(tmp_path, monkeypatch, capfd):
    """A folder made read-only during the run: removing train.lock fails, which must not hide
    the error the run is ending with (the OS lock ends with the file's closing anyway): nothing
    raised, nothing printed on stdout or stderr."""
    lock = outdir.claim(str(tmp_path), fresh=True, overwrite=False)

    def refused(path):
        raise PermissionError(1, "Operation not permitted", path)

    monkeypatch.setattr(outdir.os, "remove", refused)
    capfd.readouterr()  # (what claiming said, if anything)
    lock.release()
    assert capfd.readouterr() == ("", "")
    monkeypatch.undo()
    outdir.claim(str(tmp_path), fresh=False, overwrite=False).release()  # nobody holds it now


def test_space_is_counted_for_the_new_file_beside_both_checkpoints(tmp_path, monkeypatch):
    """Once ckpt.pt and last.pt exist, rewriting one writes a temporary copy beside both: a
    disk that holds two checkpoints and not a third is refused at the start, not mid-run."""
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, bias=False))
    one = 3 * sum(p.numel() * p.element_size() for p in model.parameters()) + 2 ** 20
    monkeypatch.setattr(outdir.shutil, "disk_usage", lambda p: mock.Mock(free=int(2.5 * one)))
    with pytest.raises(UserError, match="MiB free; this model's checkpoints need about"):
        outdir.check_space(str(tmp_path), model)
    for name in ("ckpt.pt", "last.pt"):
        (tmp_path / name).write_bytes(b"")
    outdir.check_space(str(tmp_path), model)  # both there: one more file fits


def test_temporary_names_are_unique_per_process(tmp_path, monkeypatch):
    seen = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: (seen.append(f.name), real_save(obj, f)))
    fileio.atomic_torch_save({"x": 1}, str(tmp_path / "last.pt"))
    assert seen == [f"{tmp_path / 'last.pt'}.{os.getpid()}.tmp"]
    assert os.listdir(tmp_path) == ["last.pt"]



@pytest.mark.skipif(os.name != "posix", reason="a process is asked whether it runs by signal 0 (POSIX)")
def test_a_killed_writers_temporary_file_goes_at_the_next_write(tmp_path):
    """kill -9 during a write leaves results.json.PID.tmp (a kv_study or eval_kv run killed):
    the next write of results.json removes it. A live writer's file, and another file's, stay."""
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for name in (f"results.json.{dead.pid}.tmp", f"results.json.{live.pid}.tmp",
                     f"other.json.{dead.pid}.tmp", "results.json.tmp"):
            (tmp_path / name).write_text("half")
        fileio.write_json(str(tmp_path / "results.json"), {"rows": [1]})
        assert sorted(os.listdir(tmp_path)) == sorted(["results.json", f"results.json.{live.pid}.tmp",
                                                       f"other.json.{dead.pid}.tmp", "results.json.tmp"])
        assert fileio.read_json(str(tmp_path / "results.json")) == {"rows": [1]}
    finally:
        live.kill()
        live.wait()

# -- items 3 and 4: a checkpoint is data: no code, no allocation it does not hold -----------

def test_plugin_named_by_a_checkpoint_runs_only_when_the_user_names_it(world):
    bad, marker = world["bad"], world["marker"].with_suffix(".imported")
    name = read_checkpoint(bad / "plugin.pt")["model_args"]["attention"]
    for script, *more in (["sample.py"], ["eval_kv.py", f"--dataset={world['data']}", "--stream_len=64"]):
        code, _, err = run(script, "--device=cpu", f"--out_dir={bad}", "--checkpoint_name=plugin", *more)
        assert code == 2 and f"names the plug-in attention='{name}'" in err and f"--attention={name}" in err
        assert not marker.exists()
    code, out, err = run("sample.py", "--device=cpu", f"--out_dir={bad}", "--checkpoint_name=plugin",
                         f"--attention={name}", "--max_new_tokens=3", "--start=ab")
    assert code == 0 and out.startswith("ab"), err
    assert marker.exists()  # the user asked for it
    marker.unlink()


def test_sizes_are_checked_against_the_tensors_before_anything_is_built(world, monkeypatch):
    built = []
    monkeypatch.setattr(checkpoint, "GPT", lambda config: built.append(config))
    with pytest.raises(UserError, match="n_layer=8, n_embd=8192 do not fit its weights"):
        load_model(world["bad"] / "bomb.pt")
    assert built == []


# -- items 5 and 6: damage is found, and reported as one line naming the file ----------------

def test_random_damage_is_refused_or_harmless(world, tmp_path):
    """Overwritten bytes (1-20) and truncations: every copy is refused with a UserError naming
    it, or loads exactly what was saved (bytes that no reader looks at)."""
    good = world["good"] / "last.pt"
    raw, saved = good.read_bytes(), read_checkpoint(good)
    g = torch.Generator().manual_seed(0)
    refused = 0
    for i in range(60):
        data = bytearray(raw)
        if i % 4 == 3:
            data = data[:int(torch.randint(len(raw), (1,), generator=g))]
        else:
            n = int(torch.randint(1, 21, (1,), generator=g))
            for at, value in zip(torch.randint(len(raw), (n,), generator=g), torch.randint(256, (n,), generator=g)):
                data[int(at)] = int(value)
        path = tmp_path / f"copy{i}.pt"
        path.write_bytes(bytes(data))
        try:
            loaded = read_checkpoint(path)
            load_model(path)
        except UserError as e:
            assert str(path) in str(e)
            refused += 1
            continue
        assert checksum(loaded) == checksum(saved), f"copy {i} loaded changed values without an error"
    assert refused > 50


def test_checkpoint_without_checksum_loads_with_one_note(world, tmp_path, capsys):
    ckpt = read_checkpoint(world["good"] / "ckpt.pt")  # read_checkpoint drops the checksum
    torch.save(ckpt, tmp_path / "tutorial.pt")
    load_model(tmp_path / "tutorial.pt")
    load_model(tmp_path / "tutorial.pt")
    err = capsys.readouterr().err
    assert err.count("has no checksum") == 1 and "tutorial.pt" in err


# -- item 7: preparation checks before it replaces ---------------------------------------------

def test_prepare_keeps_a_good_input_when_given_a_bad_one(tmp_path):
    from loader import prepare
    prepare(str(tmp_path), input_path=_write(tmp_path / "good.txt", tiny_corpus(1000)))
    before = snapshot(tmp_path)
    for bad in (b"", b"x"):
        with pytest.raises(UserError):
            prepare(str(tmp_path), input_path=_write(tmp_path / "bad.txt", bad))
        os.remove(tmp_path / "bad.txt")
        assert snapshot(tmp_path) == before


def _write(path, data):
    path.write_bytes(data)
    return str(path)


# -- item 8: eval_kv reads a checkpoint's dataset folder, never writes there ---------------

def test_eval_kv_does_not_prepare_a_folder_a_checkpoint_names(world):
    code, _, err = run(*fill(EB, world), "--checkpoint_name=elsewhere")
    assert code == 2 and "only read" in err
    assert sorted(os.listdir(world["elsewhere"])) == ["input.txt"]
    # named on the command line, the same folder is the user's choice: prepared and used
    code, _, err = run(*fill(EB, world), "--checkpoint_name=elsewhere", f"--dataset={world['elsewhere']}")
    assert code == 0, err
    assert sorted(os.listdir(world["elsewhere"])) == ["input.txt", "train.txt", "val.txt"]
    for name in ("train.txt", "val.txt"):
        os.remove(world["elsewhere"] / name)


# -- item 9: a full disk, at start-up and during a write -----------------------------------------

def test_full_disk_at_start_is_one_line_before_any_work(world, tmp_path, monkeypatch):
    monkeypatch.setattr(outdir.shutil, "disk_usage", lambda p: mock.Mock(free=1000))
    code, out, err = run(*fill(T, world), f"--out_dir={tmp_path / 'out'}")
    assert code == 2 and "MiB free; this model's checkpoints need about" in err, err
    assert "iter 0" not in out and not (tmp_path / "out").exists()  # (the folder it made is gone again)


def test_full_disk_during_a_write_keeps_the_previous_checkpoint(world, tmp_path, monkeypatch):
    out = tmp_path / "out"
    train(world["data"], out, "--max_iters=2", "--tensorboard=False")
    before = snapshot(out)
    real_save = torch.save

    def disk_fills(obj, f):
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[:1000])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_fills)
    code, _, err = run(*fill(T, world), f"--out_dir={out}", "--init_from=resume", "--resume_checkpoint_name=last",
                       "--max_iters=4")  # (the same max_iters would only evaluate the finished run)
    assert code == 2 and "could not write" in err and "No space left on device" in err, err
    assert "is intact" in err and "Traceback" not in err
    assert snapshot(out) == before  # the previous files as they were, no temporary file left


# -- item 11: a user's plug-in that fails: which setting, which plug-in, its own lines ---------

def plugin_failure(err, name):
    """The error line, and the frames under it; checks that they are the plug-in's alone."""
    lines = err.strip().splitlines()
    lines = lines[[line.startswith("error: ") for line in lines].index(True):]  # status lines may come first
    assert "Traceback" not in err and not any(line.startswith("error: ") for line in lines[1:]), err
    files = [line.split('"')[1] for line in lines[1:] if line.startswith('  File "')]
    assert files and all(f.endswith(f"{name}.py") for f in files), err
    return lines


@pytest.mark.parametrize("source,expected", [
    ("import math\nraise RuntimeError('broken at import')\n", "failed to import: RuntimeError: broken at import"),
    ("def attend(q, k, v, mask, p)\n    return q\n", "failed to import: SyntaxError"),
    ("import no_such_dependency_xyz\n", "failed to import: ModuleNotFoundError"),
])
def test_plugin_that_fails_to_import(world, tmp_path, source, expected):
    name = plugin_module(world["root"] / "plugins", source)
    code, _, err = run(*fill(T, world), f"--out_dir={tmp_path}", f"--attention={name}:attend")
    assert code == 2
    lines = plugin_failure(err, name)
    assert lines[0].startswith(f"error: --attention={name}:attend ") and expected in lines[0]


def test_plugin_that_raises_is_named_with_its_own_frames(world, tmp_path):
    name = plugin_module(world["root"] / "plugins", "def attend(q, k, v, mask, p):\n    return helper(q)\n\n"
                         "def helper(q):\n    return q @ q  # (B, nh, T, hs) @ (B, nh, T, hs): wrong shapes\n")
    code, out, err = run(*fill(T, world), f"--out_dir={tmp_path}", f"--attention={name}:attend")
    assert code == 2 and "iter 1" not in out
    lines = plugin_failure(err, name)
    assert lines[0].startswith(f"error: --attention={name}:attend failed: RuntimeError")
    assert sum(line.startswith('  File "') for line in lines) == 2  # attend and helper, nothing of torch's


def test_xl_update_plugin_is_tried_before_the_first_evaluation(world, tmp_path):
    name = plugin_module(world["root"] / "plugins", "def step(*args):\n    raise ValueError('my bug')\n")
    code, out, err = run(*fill(T, world), f"--out_dir={tmp_path}", "--xl_mem=8", f"--xl_update={name}:step")
    assert code == 2 and "iter 0" not in out, out
    assert plugin_failure(err, name)[0] == f"error: --xl_update={name}:step failed: ValueError: my bug"


@pytest.mark.parametrize("body, expected", [
    ("keys, vals = torch.cat([mem_k, k], 2), torch.cat([mem_v, v], 2)\n"
     "    ok = torch.cat([mem_ok, mem_ok.new_ones(k.size(0), k.size(2))], 1)\n"
     "    return keys, vals, ok, keys[:, :, -mem_len:], vals[:, :, -mem_len:], ok[:, -mem_len:]\n",
     "new_k and new_v must be cut off from the autograd graph (.detach())"),
    ("return k, v, mem_ok, k.detach(), v.detach()\n", "must return six tensors"),
    ("ok = mem_ok.new_ones(k.size(0), k.size(2))\n"  # forgets the memory: wrong from the second step on
     "    return k, v, ok, k[:, :, -mem_len:].detach(), v[:, :, -mem_len:].detach(), ok[:, -mem_len:]\n",
     "keys must be shaped"),
    ("keys, vals = torch.cat([mem_k, k], 2), torch.cat([mem_v, v], 2)\n"
     "    ok = torch.cat([mem_ok, mem_ok.new_ones(k.size(0), k.size(2))], 1)\n"
     "    return keys, vals, ok, keys[:, :, -mem_len:].detach().double(), vals[:, :, -mem_len:].detach(), "
     "ok[:, -mem_len:]\n", "new_k must be torch.float32"),
], ids=["not detached", "five things", "memory forgotten", "memory in float64"])
def test_xl_update_plugin_returning_the_wrong_things_is_one_line(world, tmp_path, body, expected):
    """What a user's XL step returns is checked against xl_step's contract before training:
    not the "backward through the graph a second time" or unpacking tracebacks it led to."""
    name = plugin_module(world["root"] / "plugins", "import torch\n\ndef step(mem_k, mem_v, mem_ok, k, v, mem_len):\n"
                         "    " + body)
    code, out, err = run(*fill(T, world), f"--out_dir={tmp_path}", "--xl_mem=8", f"--xl_update={name}:step")
    assert code == 2 and "iter 0" not in out and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: --xl_update={name}:step") and expected in line, err


def test_kv_trim_plugin_returning_the_wrong_things_is_one_line(world):
    """(pos, k, v) in the wrong order: one line saying what came back, not an IndexError deep
    in the cache."""
    name = plugin_module(world["root"] / "plugins", "def trim(k, v, pos, kv_window, kv_sink=0):\n"
                         "    return pos[-kv_window:], k[:, :, -kv_window:], v[:, :, -kv_window:]\n")
    code, out, err = run(*fill(S, world), f"--kv_trim={name}:trim", "--kv_window=4", "--start=To be or not")
    assert code == 2 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: --kv_trim={name}:trim must return (k, v, pos)") and "it returned (4,) int64 on cpu" in line


def test_an_operation_torch_lacks_is_not_taken_for_an_unwritten_stub(world):
    """PyTorch raises NotImplementedError for `|` on float masks: that is a bug in the user's
    function, shown with its line, not "not implemented yet" (a stub's raise)."""
    name = plugin_module(world["root"] / "plugins", "import torch\n\ndef trim(k, v, pos, kv_window, kv_sink=0):\n"
                         "    keep = (pos > pos[-1] - kv_window).float() | (pos < kv_sink).float()\n"
                         "    return k[:, :, keep.bool()], v[:, :, keep.bool()], pos[keep.bool()]\n")
    code, out, err = run(*fill(S, world), f"--kv_trim={name}:trim", "--kv_window=4")
    assert code == 2
    assert plugin_failure(err, name)[0].startswith(f"error: --kv_trim={name}:trim failed: NotImplementedError")


def test_an_unwritten_stub_names_its_exercise(world):
    code, out, err = run(*fill(S, world), "--kv_trim=exercises.kv_window:keep_recent", "--kv_window=4")
    assert code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: not implemented yet: assignment 1") and "exercises.check kv_window" in line


def test_kv_evict_plugin_that_raises(world):
    name = plugin_module(world["root"] / "plugins", "def rule(*args):\n    raise KeyError('oops')\n")
    code, out, err = run(*fill(S, world), f"--kv_evict={name}:rule", "--kv_budget=2", "--max_new_tokens=8")
    assert code == 2
    assert plugin_failure(err, name)[0].startswith(f"error: --kv_evict={name}:rule failed: KeyError")


@pytest.mark.parametrize("status", ["0", "None"])
def test_a_plug_in_that_exits_mid_run_is_a_failure(world, status):
    """sys.exit() in a plug-in is not the script's end: exit code 2 and one line naming it
    (it ended the run with exit 0 and no text)."""
    name = plugin_module(world["root"] / "plugins", f"import sys\n\ndef trim(k, v, pos, kv_window, kv_sink=0):\n"
                         f"    sys.exit({status})\n")
    code, out, err = run(*fill(S, world), f"--kv_trim={name}:trim", "--kv_window=4", "--max_new_tokens=8")
    assert code == 2
    assert plugin_failure(err, name)[0].startswith(f"error: --kv_trim={name}:trim failed: SystemExit")


def test_kv_evict_rule_with_a_wrong_result_is_refused_before_any_eviction(world):
    """The first eviction may come late in a long run (after kv_budget tokens): a rule is tried
    on a small input at the start, so a broken one is one line before any work."""
    name = plugin_module(world["root"] / "plugins", "def rule(scores, pos, seen, kv_sink, kv_recent):\n"
                         "    return pos  # positions, not float priorities\n")
    code, out, err = run(*fill(E, world), f"--kv_evict={name}:rule", "--kv_budget=200")
    assert code == 2 and "|" not in out and " bytes of " not in err  # (the line that starts the evaluation)
    assert err.strip().splitlines()[-1].startswith("error: kv_evict rule rule must return float priorities")


def test_kv_quant_plugin_that_raises_on_its_test_input(world):
    name = plugin_module(world["root"] / "plugins", "def quantize(x):\n    return x.foo()\n")
    code, out, err = run(*fill(S, world), f"--kv_quant={name}:quantize")
    assert code == 2
    assert plugin_failure(err, name)[0].startswith(f"error: kv_quant={name}:quantize failed on a test input: "
                                                   "AttributeError")


@pytest.mark.parametrize("command", [S, S + ["--temperature=0"], E], ids=["sample", "sample greedy", "eval_kv"])
def test_a_quantizer_that_returns_nan_is_one_line_naming_it(world, command):
    """A plug-in whose scale is nan: sample.py stopped in torch.multinomial with a traceback, or
    at temperature 0 printed NUL bytes and exit 0; eval_kv printed nan bits per byte, exit 0.
    Now one line naming the plug-in, exit 2."""
    name = plugin_module(world["root"] / "plugins", "import torch\n\ndef quantize(x):\n"
                         "    scale = (x.abs().amax(-1, keepdim=True) * float('nan')).half()\n"
                         "    return (torch.zeros_like(x, dtype=torch.int8), scale), lambda c, s: c.float() * s.float()\n")
    code, out, err = run(*fill(command, world), f"--kv_quant={name}:quantize", "--kv_quant_residual=0")
    assert code == 2 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ") and "came out nan or inf" in line and f"--kv_quant={name}:quantize" in line, err


# -- item 12: sample.py's error comes on its own line ----------------------------------------

def test_sample_error_after_the_prompt_starts_a_new_line(world):
    name = plugin_module(world["root"] / "plugins",
                         "from attention import softmax_attention\n\n"
                         "def attend(q, k, v, mask, p):\n"
                         "    if q.size(2) == 1:\n        raise ArithmeticError('fails on the decode step')\n"
                         "    return softmax_attention(q, k, v, mask, p)\n")
    code, out, err = run(*fill(S, world), f"--attention={name}:attend", "--start=To be")
    # what came before the failing step: the prompt and the byte its prefill picked, as a run of
    # that one byte prints them, or the prompt alone where UTF-8 decoding held that byte back; the
    # line ended
    _, first, _ = run(*fill(S, world), "--start=To be", "--max_new_tokens=1")
    assert code == 2 and out in (first.rstrip("\n") + "\n", "To be\n"), (out, first)
    assert plugin_failure(err, name)[0].startswith(f"error: --attention={name}:attend failed: ArithmeticError")


STUCK = """
import ctypes, sys
sys.path.insert(0, {root!r})
import utils
utils.SignalWatch.__init__.__defaults__ = (0.5, True)  # grace 0.5 s (5 s in the scripts)
libc = ctypes.CDLL(None)
def main():
    with utils.stop_on_sigterm():
        {body}
utils.run_main(main)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="libc's system() as the long operation")
@pytest.mark.parametrize("case", ["at once", "clean stop", "handled, then a long wait"])
def test_a_signal_stops_a_script_stuck_in_one_long_operation(case, tmp_path):
    """Python runs a signal's handler only between operations, so a script inside one long
    call (a forward over a huge block_size; here libc's system(), which the signal does not
    end) would stop minutes later. utils.SignalWatch ends it (exit 143 for SIGTERM) when no
    handler has run and the call goes on; never the first signal under StopAfterStep (a clean
    stop after the step), nor one the script has handled (its clean-up may wait long)."""
    import signal
    body = {"at once": 'libc.system(b"echo ready; exec sleep 8 >/dev/null 2>&1")',
            "clean stop": 'with utils.StopAfterStep() as stop:\n'
                          '            libc.system(b"echo ready; sleep 2")\n'
                          '            print("asked", stop.asked, flush=True)',
            "handled, then a long wait": 'try:\n            print("ready", flush=True)\n'
                                         '            libc.sleep(8)\n'  # (interrupted: the handler runs)
                                         '        except utils.Terminated:\n'
                                         '            libc.system(b"sleep 2")\n            print("cleaned up")'}[case]
    script = tmp_path / "stuck.py"
    script.write_text(STUCK.format(root=REPO_ROOT, body=body))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    if case == "at once":
        assert proc.returncode == 143 and "SIGTERM: stopped at once, inside an operation" in err, (out, err)
    elif case == "clean stop":
        assert proc.returncode == 0 and f"asked {int(signal.SIGTERM)}" in out, (out, err)
    else:
        assert proc.returncode == 0 and "cleaned up" in out and "stopped at once" not in err, (out, err)
