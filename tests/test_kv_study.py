"""
kv_study.py end to end on a tiny base checkpoint: the fine-tunes, the evaluation grid, the
frontier files (CSV, markdown, PNG), rows against the base's natural reference, resuming
(finished variants are skipped), and assignment 1's context table.

    python -m pytest -q tests/test_kv_study.py
"""
import contextlib
import csv
import io
import os
import runpy
import shlex
import subprocess
import sys
from unittest import mock

import pytest
import torch

from checkpoint import read_checkpoint
from conftest import REPO_ROOT, assert_user_error, run_in_process, train

TINY_BASE = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--max_iters=3", "--batch_size=2"]
SMALL = ["--iters=2", "--n_streams=1", "--stream_len=64", "--kv_quant_group=8", "--threads=1",
         "--tensorboard=False", "--context_streams=2"]


def study(*args):
    """Run kv_study.py in this process; returns what it printed (stdout and stderr)."""
    printed = io.StringIO()
    with mock.patch.object(sys, "argv", ["kv_study.py", *args]), contextlib.redirect_stdout(printed), \
            contextlib.redirect_stderr(printed):
        runpy.run_path(os.path.join(REPO_ROOT, "kv_study.py"), run_name="__main__")
    return printed.getvalue()


@pytest.fixture(scope="module")
def base_ckpt(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    train(data_dir, out, *TINY_BASE)
    return out / "ckpt.pt"


@pytest.mark.slow  # two fine-tunes in subprocesses
def test_tiny_study_end_to_end_and_resume(base_ckpt, tmp_path):
    folder = tmp_path / "study"
    printed = study(f"--base={base_ckpt}", f"--out={folder}", "--quick=True", "--variants=base,base_ft,mqa,qat_int2", *SMALL)
    for name in ("frontier.csv", "frontier.md", "frontier.png", "mqa/last.pt", "qat_int2/results.json"):
        assert (folder / name).exists(), name
    # no time left to guess before a fine-tune was timed; none left after the last variant
    assert "base done" in printed and "ETA after the first fine-tune" in printed.split("base done")[1].split("\n")[0]
    assert "ETA 0:00" in printed.split("qat_int2 done")[1].split("\n")[0]
    with open(folder / "frontier.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["variant"] for r in rows} == {"base", "base_ft", "mqa", "qat_int2"}
    ref = [r for r in rows if r["variant"] == "base" and "(reference)" in r["setting"]]
    assert len(ref) == 1 and float(ref[0]["delta_pct"]) == 0.0 and float(ref[0]["x_smaller"]) == 1.0
    # every row against the base's reference: the base's peak over the row's
    peak = float(ref[0]["kv_bits_peak"])
    assert all(abs(float(r["x_smaller"]) - peak / float(r["kv_bits_peak"])) < 1e-9 for r in rows)
    # the base's rows against the base; fine-tuned rows against base_ft (trained as long)
    ft = [r for r in rows if r["variant"] == "base_ft" and "(reference)" in r["setting"]][0]
    for r in rows:  # (strict: the worse of the two for a fine-tuned row)
        yard = ref[0] if r["variant"] == "base" else max((ref[0], ft), key=lambda m: float(r["bpb"]) / float(m["bpb"]))
        assert r["yardstick"] == yard["variant"]
        assert abs(float(r["delta_pct"]) - 100 * (float(r["bpb"]) / float(yard["bpb"]) - 1)) < 1e-9
        assert abs(float(r["delta_base_pct"]) - 100 * (float(r["bpb"]) / float(ref[0]["bpb"]) - 1)) < 1e-9
    assert "Largest reduction within 3%" in printed and "python eval_kv.py" in printed
    # each row's reproducing command holds KV settings eval_kv.py accepts
    from kv.policy import KVOptions
    for r in rows:
        flags = dict(a[2:].split("=", 1) for a in r["eval_command"].split() if a.startswith("--kv_"))
        kw = {k: type(KVOptions().settings()[k])(v) for k, v in flags.items()}
        KVOptions(**kw).check().check_unused()
    assert "mqa_share" not in printed  # only the variants asked for
    # a fine-tuned row's training command trains it again, bit for bit, in a folder of its own
    cmd = next(r["train_command"] for r in rows if r["variant"] == "mqa")
    assert f"--out_dir={folder / 'mqa_again'}" in cmd
    proc = subprocess.run(cmd.replace("python ", f"{sys.executable} "), shell=True, cwd=REPO_ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    a, b = read_checkpoint(str(folder / "mqa/last.pt")), read_checkpoint(str(folder / "mqa_again/last.pt"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])

    stamp = {p: os.stat(folder / p).st_mtime_ns for p in ("mqa/last.pt", "qat_int2/results.json")}
    again = study(f"--base={base_ckpt}", f"--out={folder}", "--quick=True", "--variants=base,base_ft,mqa,qat_int2", *SMALL)
    assert again.count("finished before, skipped") == 4
    assert stamp == {p: os.stat(folder / p).st_mtime_ns for p in stamp}
    with open(folder / "frontier.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    # other settings: never the old rows under the new labels. Another stream length re-evaluates
    # every variant (the fine-tunes stay); other fine-tune iterations redo the fine-tunes too
    longer = [a if not a.startswith("--stream_len") else "--stream_len=80" for a in SMALL]
    again = study(f"--base={base_ckpt}", f"--out={folder}", "--quick=True", "--variants=base,mqa", *longer)
    assert again.count("redone") == 2 and "stream_len 64 -> 80" in again and "fine-tuning" not in again
    assert "ETA after the first fine-tune" not in again  # no fine-tune left to time
    assert stamp["mqa/last.pt"] == os.stat(folder / "mqa/last.pt").st_mtime_ns
    with open(folder / "frontier.csv") as f:
        fresh = {r["setting"]: r["bpb"] for r in csv.DictReader(f) if r["variant"] == "base"}
    old = {r["setting"]: r["bpb"] for r in rows if r["variant"] == "base"}
    assert fresh.keys() == old.keys() and fresh != old  # 80 bytes, not the 64 measured before
    # a fine-tune cut short (Ctrl-C, a crash) leaves a last.pt at another iteration than its record:
    # it is done again, never scored as the finished one
    import shutil
    shutil.copyfile(base_ckpt, folder / "mqa" / "last.pt")  # iteration 3, not 3 + 2
    again = study(f"--base={base_ckpt}", f"--out={folder}", "--quick=True", "--variants=base,mqa", *longer)
    assert "mqa: done before with other settings (its last.pt (iteration 3) is not the end" in again
    assert "fine-tuning 2 iterations" in again and read_checkpoint(str(folder / "mqa/last.pt"))["iter_num"] == 5
    more = [a if not a.startswith("--iters") else "--iters=3" for a in longer]
    again = study(f"--base={base_ckpt}", f"--out={folder}", "--quick=True", "--variants=base,mqa", *more)
    assert "iters 2 -> 3" in again and "fine-tuning 3 iterations" in again
    assert "base: finished before, skipped" in again  # no fine-tune: its rows still hold
    assert read_checkpoint(str(folder / "mqa/last.pt"))["iter_num"] == 3 + 3  # the base's 3, then 3 more
    (folder / "mqa" / "finetune.json").unlink()  # as a fine-tune stopped before its end leaves the folder
    again = study(f"--base={base_ckpt}", f"--out={folder}", "--quick=True", "--variants=base,mqa", *more)
    assert "mqa: done before with other settings (its last fine-tune did not finish), redone" in again
    # the copy of the base that train.py set aside (another model's best) does not pile up
    assert sorted(p.name for p in (folder / "mqa").glob("*.pt")) == ["ckpt.pt", "last.pt"]
    # rows of an older grid (before its version was recorded) are redone, not reused
    import json
    record = json.loads((folder / "base" / "results.json").read_text())
    del record["settings"]["grid"]
    (folder / "base" / "results.json").write_text(json.dumps(record))
    again = study(f"--base={base_ckpt}", f"--out={folder}", "--quick=True", "--variants=base", *more)
    assert "base: done before with other settings (grid None -> " in again


def test_rows_read_at_evict_chunk_are_reproduced_at_that_chunk(base_ckpt, tmp_path):
    """--evict_chunk rows (h2o) are scored at their own chunk: their commands, the CSV and the
    title say so, and the command gives the row's bits per byte."""
    folder = tmp_path / "s"
    study(f"--base={base_ckpt}", f"--out={folder}", "--quick=True", "--variants=base", "--evict_chunk=1", *SMALL)
    with open(folder / "frontier.csv") as f:
        rows = list(csv.DictReader(f))
    exact = [r for r in rows if "h2o" in r["setting"]]
    assert exact and all(r["chunk"] == "1" and "--chunk=1 " in r["eval_command"] for r in exact)
    assert all(r["chunk"] == "16" and "--chunk=16 " in r["eval_command"] for r in rows if r not in exact)
    assert "(h2o and per-channel keys: chunk 1)" in (folder / "frontier.md").read_text()
    code, out, err = run_in_process("eval_kv.py", *exact[-1]["eval_command"].split()[2:])
    assert code == 0, err
    assert f"{float(exact[-1]['bpb']):.4f}" in out


@pytest.mark.slow  # a fine-tune in a subprocess
def test_context_table(base_ckpt, tmp_path):
    printed = study(f"--base={base_ckpt}", f"--out={tmp_path}", "--what=context", "--context_iters=0,2", *SMALL)
    assert "| 0 |" in printed and "| 2 |" in printed and "[16, 64)" in printed
    assert (tmp_path / "iters_2" / "last.pt").exists() and (tmp_path / "context.md").exists()
    again = study(f"--base={base_ckpt}", f"--out={tmp_path}", "--what=context", "--context_iters=0,2", *SMALL)
    assert again.count("done before, skipped") == 2 and "fine-tuned" not in again  # the rows recorded are used
    # other streams: the rows are evaluated again, on the fine-tune already made, and read as
    # those of a study made afresh with them
    tuned = (tmp_path / "iters_2" / "last.pt").read_bytes()
    more = [a if not a.startswith("--context_streams") else "--context_streams=3" for a in SMALL]
    again = study(f"--base={base_ckpt}", f"--out={tmp_path}", "--what=context", "--context_iters=0,2", *more)
    assert again.count("context_streams 2 -> 3), evaluated again") == 2 and "fine-tuned" not in again, again
    assert (tmp_path / "iters_2" / "last.pt").read_bytes() == tuned
    fresh = study(f"--base={base_ckpt}", f"--out={tmp_path / 'fresh'}", "--what=context", "--context_iters=0,2", *more)
    table = lambda printed: [line for line in printed.splitlines() if line.startswith("| ") and "iterations" not in line]
    assert table(again) == table(fresh) and len(table(fresh)) == 3
    # a fine-tune setting changed: that row's fine-tune is redone
    again = study(f"--base={base_ckpt}", f"--out={tmp_path}", "--what=context", "--context_iters=0,2", *more,
                  "--learning_rate=2e-3")
    assert "fine-tuned 2 iterations" in again and again.count("redone") == 1, again
    assert "(learning_rate 0.001 -> 0.002), redone" in again, again


def test_unknown_variant_is_one_error(base_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        study(f"--base={base_ckpt}", f"--out={tmp_path}", "--variants=base,nope", *SMALL)
    assert e.value.code == 2


def test_empty_variants_is_one_line_before_any_work(base_ckpt, tmp_path):
    for bad in (",", " , "):
        assert_user_error(kv_study(base_ckpt, tmp_path / "s", f"--variants={bad}"), "no variant named")
    assert not (tmp_path / "s").exists()


@pytest.mark.slow  # a fine-tune in a subprocess
def test_a_study_without_base_from_another_directory(base_ckpt, tmp_path, monkeypatch):
    """--variants without base: the base is measured anyway (every row is against its plain
    cache: a variant's own plain row is not 1.0x smaller); relative --base and --out from a
    directory other than the project's reach train.py as meant, and the commands printed run
    from there."""
    import shutil
    (tmp_path / "b").mkdir()
    shutil.copyfile(base_ckpt, tmp_path / "b" / "ckpt.pt")
    monkeypatch.chdir(tmp_path)
    printed = study("--base=b", "--out=st", "--quick=True", "--variants=mqa", *SMALL)
    assert "note: base added to --variants" in printed
    assert (tmp_path / "st" / "mqa" / "last.pt").exists() and not os.path.exists(os.path.join(REPO_ROOT, "st"))
    with open(tmp_path / "st" / "frontier.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows][0] == "base" and {r["variant"] for r in rows} == {"base", "mqa"}
    own = [r for r in rows if r["variant"] == "mqa" and "(reference)" in r["setting"]]
    assert len(own) == 1 and float(own[0]["x_smaller"]) == 2.0  # one K/V head of two
    assert "Baseline: b/ckpt.pt" in (tmp_path / "st" / "frontier.md").read_text()
    cmd = own[0]["eval_command"].split()
    assert os.path.samefile(cmd[1], os.path.join(REPO_ROOT, "eval_kv.py"))  # named from here
    code, out, err = run_in_process("eval_kv.py", *cmd[2:])
    assert code in (0, None), err
    assert f"{float(own[0]['bpb']):.4f}" in out
    script = own[0]["train_command"].split(" && python ")[1].split()[0]
    assert os.path.samefile(script, os.path.join(REPO_ROOT, "train.py"))
    # the same study rerun from another directory: its rows are reused, and their commands
    # name the study's folders from there
    monkeypatch.chdir(tmp_path / "b")
    again = study("--base=ckpt.pt", "--out=../st", "--quick=True", "--variants=base,mqa", *SMALL)
    assert again.count("finished before, skipped") == 2
    with open(tmp_path / "st" / "frontier.csv") as f:
        own = [r for r in csv.DictReader(f) if r["variant"] == "mqa" and "(reference)" in r["setting"]]
    code, out, err = run_in_process("eval_kv.py", *own[0]["eval_command"].split()[2:])
    assert code in (0, None), err
    assert f"{float(own[0]['bpb']):.4f}" in out


def test_best_within_takes_the_most_reduction_then_the_least_cost():
    from kv.study_report import best_within
    rows = [dict(x_smaller=15.1, delta_pct=0.86), dict(x_smaller=15.1, delta_pct=0.43),
            dict(x_smaller=25.6, delta_pct=1.30), dict(x_smaller=1.0, delta_pct=0.0)]
    assert best_within(rows, 1) is rows[1]
    assert best_within(rows, 3) is rows[2]
    assert best_within(rows, -1) is None


def test_eval_command_leaves_out_what_the_format_ignores():
    import kv_study
    from kv.policy import KVOptions
    row = dict(KVOptions(kv_window=32, kv_quant="int8", kv_quant_group=8, kv_quant_residual=0,
                         kv_quant_keys="token").settings(), checkpoint="out/ckpt.pt", chunk=32)
    cmd = kv_study.eval_command(row, "--dtype=float32")
    assert "--kv_quant=int8" in cmd and "--kv_quant_residual=0" in cmd
    assert "kv_quant_group" not in cmd and "kv_quant_keys" not in cmd


@pytest.mark.parametrize("inside", ["kv study", "kv_study"])  # (a folder name shlex must quote, and one it need not)
def test_the_reproducing_pair_evaluates_what_the_training_command_trains(inside, tmp_path, monkeypatch):
    """frontier.md's two commands for a fine-tuned row: the eval_kv command reads the folder the
    train command trains into (<variant>_again), whether the study's folder is under the
    directory it was run from (its commands then say it relative) or elsewhere."""
    import kv_study
    from kv.policy import KVOptions
    from kv.study_report import again
    monkeypatch.chdir(tmp_path)
    for folder in (tmp_path / inside, tmp_path.parent / inside):
        ckpt = str(folder / "mqa" / "ckpt.pt")
        row = dict(KVOptions(kv_window=32).settings(), checkpoint=ckpt, chunk=32)
        row.update(eval_command=kv_study.here(kv_study.eval_command(row, "--dtype=float32")),
                   train_command=kv_study.here(f"python train.py {shlex.quote('--out_dir=' + str(folder / 'mqa_again'))}"))
        train_dir = next(a for a in shlex.split(row["train_command"]) if a.startswith("--out_dir="))
        eval_dir = next(a for a in shlex.split(again(row)) if a.startswith("--out_dir="))
        assert eval_dir == train_dir and train_dir.endswith("mqa_again")
        assert again(dict(row, train_command="")) == row["eval_command"]  # nothing trained: the study's own


@pytest.mark.slow  # a fine-tune in a subprocess
def test_a_failed_fine_tune_says_why(base_ckpt, tmp_path):
    import kv_study
    from utils import UserError
    config = read_checkpoint(str(base_ckpt))["config"]
    with pytest.raises(UserError, match=r"the fine-tune in .* failed \(exit 2\): .*n_kv_head.*; see .*train\.log"):
        kv_study.fine_tune(str(base_ckpt), str(tmp_path / "v"), ["--n_kv_head=3"], 1, config)
    # a finished fine-tune in the folder comes back as it was when the next one fails at once,
    # its log too; the failed run's output is kept apart, and the error names it
    earlier = {"finetune.json": b'{"last_iter": 7}', "last.pt": b"earlier last", "ckpt.pt": b"earlier best",
               "train.log": b"earlier log"}
    for name, data in earlier.items():
        (tmp_path / "v" / name).write_bytes(data)
    with pytest.raises(UserError, match=r"unknown setting --bogus.*; see .*train_failed\.log"):
        kv_study.fine_tune(str(base_ckpt), str(tmp_path / "v"), ["--bogus=1"], 1, config)
    assert {name: (tmp_path / "v" / name).read_bytes() for name in earlier} == earlier
    assert sorted(os.listdir(tmp_path / "v")) == sorted([*earlier, "train_failed.log"])
    assert "unknown setting --bogus" in (tmp_path / "v" / "train_failed.log").read_text()
    kv_study.fine_tune(str(base_ckpt), str(tmp_path / "v"), [], 1, config)  # one that runs: no failure left to read
    assert not (tmp_path / "v" / "train_failed.log").exists()
    assert b"earlier" not in (tmp_path / "v" / "train.log").read_bytes()


def test_an_all_linear_base_is_refused(data_dir, tmp_path):
    out = tmp_path / "lin"
    train(data_dir, out, *TINY_BASE, "--attention=linear")
    with pytest.raises(SystemExit) as e:
        study(f"--base={out}", f"--out={tmp_path / 's'}", *SMALL)
    assert e.value.code == 2 and not (tmp_path / "s").exists()


@pytest.mark.parametrize("flags, variants, words", [
    (["--xl_mem=16"], "base,base_ft,qat_int4", "variant qat_int4 cannot be fine-tuned from"),
    (["--attention=linear", "--linear_layers=0", "--n_layer=2"], "base,gqa,qat_int2", "variant qat_int2 cannot be fine-tuned from"),
])
def test_a_variant_the_base_cannot_take_is_refused_before_any_work(data_dir, tmp_path, flags, variants, words):
    """An XL base cannot train through a quantized cache, nor can a base with a linear layer:
    one line before the first fine-tune (it came after the variants before it were trained)."""
    out = tmp_path / "b"
    train(data_dir, out, *TINY_BASE, *flags)
    assert_user_error(kv_study(out, tmp_path / "s", f"--variants={variants}"), words, "leave it out of --variants")
    assert not (tmp_path / "s").exists()


def test_a_group_that_does_not_divide_the_heads_blames_no_variant(data_dir, tmp_path):
    """--kv_quant_group=3 fits no grouped row of the grid, whatever the variants: the error
    says so, instead of sending the user to leave a QAT variant out (which then fails alike)."""
    out = tmp_path / "b"
    train(data_dir, out, *TINY_BASE)
    for variants in ("base,base_ft,qat_int2", "base,base_ft"):
        refused = kv_study(out, tmp_path / "s", f"--variants={variants}", "--kv_quant_group=3")
        assert_user_error(refused, "kv_quant_group=3 does not divide the head dimension")
        assert "variant" not in refused.stderr
    assert not (tmp_path / "s").exists()


def kv_study(base_ckpt, out, *args):
    """kv_study.py run in this process, as a finished process (its stderr whole, for
    assert_user_error); these runs stop at their start-up checks."""
    argv = [f"--base={base_ckpt}", f"--out={out}", *SMALL, *args]
    code, out, err = run_in_process("kv_study.py", *argv)
    return subprocess.CompletedProcess(["kv_study.py", *argv], code, out, err)


def test_settings_the_chosen_what_does_not_read_are_named(base_ckpt, tmp_path):
    """--what=context reads none of the frontier's settings (--variants, --quick, --iters, ...),
    the frontier none of context_*: a note names those given (these runs then stop at a
    start-up check, --min_lr above --learning_rate)."""
    stop = ["--min_lr=1", "--learning_rate=0.1"]
    proc = kv_study(base_ckpt, tmp_path / "c", "--what=context", "--variants=mqa", "--quick=True", *stop)
    assert_user_error(proc, "--min_lr=1 is above --learning_rate=0.1")
    assert ("note: --quick, --variants, --iters, --kv_quant_group, --n_streams, --stream_len apply to "
            "--what=frontier only: ignored here") in proc.stdout, proc.stdout
    proc = kv_study(base_ckpt, tmp_path / "f", *stop)  # SMALL sets --context_streams
    assert "note: --context_streams applies to --what=context only: ignored here" in proc.stdout, proc.stdout
    proc = run_in_process("kv_study.py", f"--base={base_ckpt}", f"--out={tmp_path / 'g'}", *stop)
    assert "ignored here" not in proc[1], proc[1]


def test_bad_context_iters_is_one_line_before_any_work(base_ckpt, tmp_path):
    for bad, words in (("a,b", "'a' is not a whole number"), ("5,-1", "'-1' is not a whole number"),
                       (",", "--context_iters is empty")):
        assert_user_error(kv_study(base_ckpt, tmp_path / "ctx", "--what=context", f"--context_iters={bad}"), words)
    assert not (tmp_path / "ctx").exists()


@pytest.mark.parametrize("what", ["frontier", "context"])
def test_a_base_that_does_not_record_its_block_size_is_one_line(base_ckpt, tmp_path, what):
    """A base checkpoint whose config has no block_size (edited, its checksums brought up to
    date): the study cannot size its streams or variants, and says so in one line."""
    from checkpoint import checksum
    ckpt = torch.load(base_ckpt, weights_only=True)
    del ckpt["config"]["block_size"]
    ckpt["crc32"] = {k: checksum(v) for k, v in ckpt.items() if k != "crc32"}
    torch.save(ckpt, tmp_path / "noblock.pt")
    refused = kv_study(tmp_path / "noblock.pt", tmp_path / "nb", f"--what={what}")
    assert_user_error(refused, "does not record the block_size it was trained at")
    assert not (tmp_path / "nb").exists()


def test_a_final_rate_above_the_peak_is_one_line_before_any_fine_tune(base_ckpt, tmp_path):
    """train.py refuses --min_lr above --learning_rate; the study says so at its start, not at
    its first fine-tune after the base's evaluation."""
    refused = kv_study(base_ckpt, tmp_path / "lr", "--learning_rate=1e-4", "--min_lr=1e-3")
    assert_user_error(refused, "--min_lr=0.001 is above --learning_rate=0.0001")
    assert not (tmp_path / "lr").exists()


def test_train_args_that_the_study_sets_itself_are_one_line(base_ckpt, tmp_path):
    """--train_args with a setting the study gives every fine-tune (it would train other than
    finetune.json records) or one a variant changes, or a word that is not --name=value: one
    line naming the flag to use, before any work."""
    for bad, words in (("--batch_size=2 --max_iters=3", "--max_iters is set by the study for every fine-tune (set it with kv_study.py's --iters)"),
                       ("--learning_rate=0.5", "kv_study.py's --learning_rate"), ("--dataset=x", "comes from the base"),
                       ("--n_kv_head=1", "--n_kv_head is what the variants change"),
                       ("batch_size=2", "'batch_size=2' is not --name=value"), ("'--batch_size=2", "No closing quotation")):
        assert_user_error(kv_study(base_ckpt, tmp_path / "ta", f"--train_args={bad}"), words)
    assert not (tmp_path / "ta").exists()


def test_out_that_cannot_take_the_results_is_one_line(base_ckpt, tmp_path):
    """--out a file, or a folder where frontier.csv goes: one line before the base is evaluated
    (and the file given is left alone)."""
    a_file = tmp_path / "results"
    a_file.write_text("mine")
    for what in ("frontier", "context"):
        proc = kv_study(base_ckpt, a_file, f"--what={what}", "--variants=base", "--context_iters=0")
        assert_user_error(proc, f"--out={a_file} is a file, not a folder")
    assert_user_error(kv_study(base_ckpt, a_file / "sub", "--variants=base"), "lies under", "which is a file")
    assert a_file.read_text() == "mine"
    folder = tmp_path / "study"
    (folder / "frontier.csv").mkdir(parents=True)
    proc = kv_study(base_ckpt, folder, "--variants=base")
    assert_user_error(proc, "frontier.csv is a folder", "--out")
    assert "|" not in proc.stdout and not (folder / "base").exists()  # nothing evaluated


@pytest.mark.parametrize("fast", [False, True])
def test_the_chunked_grid_holds_only_rows_a_chunk_scores_as_the_decoder(fast):
    """grid() runs at the study's chunk: none of its rows may be one eval_kv's chunk note
    warns about; exact_grid() (run at --evict_chunk) holds exactly those."""
    import eval_kv
    import kv_study
    assert all(eval_kv.chunk_note([s], 256) == "" for s in kv_study.grid(256, fast))
    assert all(eval_kv.chunk_note([s.check()], 256) != "" for s in kv_study.exact_grid(256, fast))


def test_a_group_the_head_size_cannot_take_is_one_line_before_any_fine_tune(base_ckpt, tmp_path):
    """The base's heads have 8 channels: int4/int2 groups of 16 are refused before base_ft trains."""
    proc = kv_study(base_ckpt, tmp_path / "s", "--variants=base_ft", "--kv_quant_group=16")
    assert_user_error(proc, "kv_quant_group=16 does not divide the head dimension 8")
    assert "fine-tun" not in proc.stdout + proc.stderr and not (tmp_path / "s").exists()  # no empty folder either


def test_a_variant_of_local_layers_says_its_wider_windows_do_not_bind(tmp_path, capsys):
    """Every layer attends 8 back: the grid's kv_window rows of 8 and more hold one cache, and
    kv_study says so rather than let their labels suggest otherwise."""
    import kv_study
    from checkpoint import save_checkpoint
    from kv.policy import KVOptions
    from model import GPT, GPTConfig, MODEL_ARG_KEYS
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, bias=False, window=8))
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, model, None, {k: getattr(model.config, k) for k in MODEL_ARG_KEYS}, {"block_size": 16}, 1, 5.0)
    x = torch.randint(0, 256, (1, 32))
    rows = kv_study.evaluate_variant(path, x, x, [KVOptions(kv_window=16), KVOptions(kv_window=32)], 16, 16, "loc")
    assert len({(r["bpb"], r["kv_bits_peak"]) for r in rows}) == 1  # one cache, whatever the label says
    assert "note: every softmax layer of loc attends 8 back" in capsys.readouterr().out


def test_rows_that_cannot_act_on_local_layers_are_left_out_and_said(tmp_path, capsys):
    """Every layer attends 8 back: per-channel int4 keys wait for groups of 32 tokens that never
    fill, and an h2o budget of 8 never binds, so those rows of the grid would hold the plain
    cache (or the per-token int4 row's) under their own labels: they are left out, said in a
    note; the per-token int4 row, which does act, stays."""
    import kv_study
    from checkpoint import save_checkpoint
    from kv.evaluate import evaluate
    from kv.policy import KVOptions
    from model import GPT, GPTConfig, MODEL_ARG_KEYS
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=64, bias=False, window=8))
    path = str(tmp_path / "ckpt.pt")
    args = {k: getattr(model.config, k) for k in MODEL_ARG_KEYS}
    save_checkpoint(path, model, None, args, {"block_size": 32}, 1, 5.0)
    x = torch.randint(0, 256, (1, 64))
    channel = KVOptions(kv_window=32, kv_quant="int4", kv_quant_group=32, kv_quant_residual=0)
    h2o = KVOptions(kv_window=32, kv_evict="h2o", kv_budget=8, kv_recent=4, kv_sink=2)
    token = KVOptions(kv_window=32, kv_quant="int4", kv_quant_group=32, kv_quant_residual=0, kv_quant_keys="token")
    rows = kv_study.evaluate_variant(path, x, x, [channel, h2o, token], 1, 32, "loc")
    assert [r["setting"] for r in rows] == ["plain, window 32 (reference)", "int4/g32/r0/token-keys, window 32"]
    out = capsys.readouterr().out
    assert "note: every softmax layer of loc attends 8 back" in out and \
        "int4/g32/r0, h2o 8 (recent 4, sink 2) would hold the cache of another row, so they are left out" in out, out
    # and they would indeed: scored, each is the plain cache's twin (up to float rounding)
    model.eval()
    ref, *idle = evaluate(model, x, x, [channel.__class__(kv_window=32), channel, h2o], 1, KVOptions(kv_window=32), 32)
    assert all(r["kv_bits_peak"] == ref["kv_bits_peak"] and abs(r["bpb"] - ref["bpb"]) < 1e-5 for r in idle)
    assert not any(kv_study.idle_on(s, GPTConfig(n_layer=1, n_head=2, n_embd=64, window=8, global_layers="0"))
                   for s in (channel, h2o))  # a global layer: they act there


def test_sigterm_stops_the_study_as_ctrl_c_does(tmp_path):
    """kill (SIGTERM) during the study: the same line and exit as Ctrl-C (a fine-tune running
    is then stopped by its KeyboardInterrupt handler), not a silent death that leaves it running."""
    code = ("import os, signal, sys\n"
            "import kv_study\n"
            "kv_study.study = lambda: os.kill(os.getpid(), signal.SIGTERM)\n"
            "sys.argv = ['kv_study.py', '--base=none.pt']\n"
            "kv_study.run_main(kv_study.main)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 143, proc.stderr
    assert "interrupted: the same command goes on from here" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(not hasattr(__import__("signal"), "pause"), reason="POSIX signals")
def test_a_fine_tune_that_ignores_ctrl_c_is_stopped_by_sigterm():
    """kv_study stopped (Ctrl-C to it alone, or kill) stops its fine-tune with SIGTERM, which
    train.py takes as Ctrl-C: a job started with & ignores SIGINT, and so does its train.py."""
    from kv.study_finetune import stop
    child = ("import signal, sys\n"
             "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
             "signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\n"
             "print('ready', flush=True)\n"
             "while True:\n"
             "    signal.pause()\n")
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    stop(proc)
    proc.stdout.close()
    assert proc.returncode == 7  # its own handler ran (not a kill after the minute's grace)


def test_quick_keeps_the_settings_a_config_file_gives(tmp_path, monkeypatch):
    """--quick=True fills in its smaller study only where nothing was given: a config file's
    iters and stream_len stay, as flags do (they were replaced right after 'Overriding: ...')."""
    import kv_study
    config = tmp_path / "small.py"
    config.write_text("iters = 7\nstream_len = 200\n")
    seen = {}
    monkeypatch.setattr(kv_study, "study", lambda: seen.update(iters=kv_study.iters, stream_len=kv_study.stream_len,
                                                                n_streams=kv_study.n_streams))
    monkeypatch.setattr(sys, "argv", ["kv_study.py", str(config), "--quick=True", "--n_streams=3"])
    for k in ("iters", "stream_len", "n_streams", "quick", "variants"):  # (main sets them in the module)
        monkeypatch.setattr(kv_study, k, getattr(kv_study, k))
    monkeypatch.setattr(kv_study, "use_threads", lambda n: "")  # (this process keeps its threads)
    monkeypatch.setattr(kv_study, "keep_freed_memory", lambda: None)
    with contextlib.redirect_stdout(io.StringIO()):
        kv_study.main()
    assert seen == dict(iters=7, stream_len=200, n_streams=3)
