"""Bad input to eval_kv.py --sweep, download_pretrained.py and bench.py: one clear line, exit
code 2, no traceback, found before the long work; the sweep's files written atomically, and a
file that cannot be written loses no results. (kv_study.py: tests/test_kv_study.py;
exercises/check.py: tests/test_exercises.py.)"""

import errno
import os
import runpy
import sys
from unittest import mock

import pytest

from checkpoint import save_checkpoint
from conftest import REPO_ROOT, assert_user_error, run_in_process, run_script, tiny
from kv import report
from utils import UserError

ARGS = dict(n_layer=1, n_head=2, n_embd=32, bias=False, dropout=0.0)
SWEEP = ["--sweep=quick", "--n_streams=1", "--stream_len=64", "--kv_quant_group=16", "--device=cpu"]


def writable(folder):
    """Whether a file can be made in folder (root writes into a chmod 0o555 folder anyway)."""
    probe = os.path.join(folder, "probe")
    try:
        open(probe, "w").close()
    except OSError:
        return False
    os.remove(probe)
    return True


@pytest.fixture
def read_only(tmp_path):
    """A folder no file can be made in (chmod 0o555); the test is skipped where that does not
    hold (as root)."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    if writable(folder):
        folder.chmod(0o755)
        pytest.skip("chmod 0o555 does not stop this user (root) from writing")
    yield folder
    folder.chmod(0o755)


@pytest.fixture
def ckpt_dir(tmp_path, tiny_data_dir):
    """An out_dir holding an untrained tiny checkpoint on the tiny corpus."""
    out = tmp_path / "out"
    out.mkdir()
    save_checkpoint(str(out / "ckpt.pt"), tiny(**ARGS), None, ARGS, dict(dataset=str(tiny_data_dir), block_size=32),
                    1, 5.0)
    return out


# -- eval_kv.py --sweep: the files it writes at the end ------------------------------------------

def test_sweep_with_a_folder_where_its_csv_goes_stops_before_the_run(ckpt_dir):
    (ckpt_dir / "eval_kv_quick.csv").mkdir()
    proc = run_script("eval_kv.py", f"--out_dir={ckpt_dir}", *SWEEP)
    assert_user_error(proc, "eval_kv_quick.csv is a folder", "--out_dir")
    assert "bits/byte" not in proc.stdout  # no sweep ran


def test_sweep_into_a_read_only_out_dir_stops_before_the_run(ckpt_dir, read_only):
    read_only.chmod(0o755)  # the checkpoint in it, then no more files
    (read_only / "ckpt.pt").write_bytes((ckpt_dir / "ckpt.pt").read_bytes())
    read_only.chmod(0o555)
    proc = run_script("eval_kv.py", f"--out_dir={read_only}", *SWEEP)
    assert_user_error(proc, f"cannot write into {read_only}", "--out_dir")
    assert "bits/byte" not in proc.stdout


def test_check_writable_on_a_read_only_disk(tmp_path, monkeypatch):
    """A read-only file system refuses even root: the check makes a real file, not os.access."""
    def refuse(**kw):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(report.tempfile, "mkstemp", refuse)
    with pytest.raises(UserError, match=r"cannot write into .*Read-only file system.*use another --out_dir"):
        report.check_writable(str(tmp_path / "eval_kv_quick"), [".csv"], False, "--out_dir")


def test_check_writable_names_what_is_in_the_way(tmp_path):
    prefix = str(tmp_path / "eval_kv_quick")
    report.check_writable(prefix, [".csv", ".md"], True, "--out_dir")  # nothing in the way
    assert os.listdir(tmp_path) == []  # and nothing left behind
    (tmp_path / "eval_kv_quick").write_text("a file where TensorBoard's folder goes")
    with pytest.raises(UserError, match="--tensorboard=False"):
        report.check_writable(prefix, [".csv"], True, "--out_dir")
    report.check_writable(prefix, [".csv"], False, "--out_dir")
    with pytest.raises(UserError, match="is not a folder"):
        report.check_writable(str(tmp_path / "nowhere" / "eval_kv_quick"), [".csv"], False, "--out_dir")


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "table.md")
    report.write_text(path, "the old table\n")

    def disk_full(f):
        f.write(b"half of the new ")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(UserError, match=r"could not write .*table\.md \(No space left on device\)"):
        report.write_file(path, disk_full)
    assert open(path).read() == "the old table\n"
    assert os.listdir(tmp_path) == ["table.md"]


def test_write_outputs_shows_the_table_before_a_write_that_fails(tmp_path):
    results = [dict(setting="plain, window 32 (reference)", kv_bits_peak=1024, kv_bits_per_token=16.0, x_smaller=1.0,
                    bpb=2.5, delta_pct=0.0, kl_bits=0.0, baseline="plain", bpb_base=2.5, kv_bits_peak_base=1024)]
    (tmp_path / "eval_kv_quick.csv").mkdir()  # the write fails
    shown = []
    with pytest.raises(UserError, match="eval_kv_quick.csv"):
        report.write_outputs(results, str(tmp_path / "eval_kv_quick"), "run", use_tb=False, png=False,
                             show=shown.append)
    assert shown and "plain, window 32 (reference)" in shown[0]
    report.write_outputs(results, str(tmp_path / "ok"), "run", use_tb=False, png=False)
    assert (tmp_path / "ok.csv").read_text().startswith("setting,kv_bits_peak")
    assert sorted(os.listdir(tmp_path)) == ["eval_kv_quick.csv", "ok.csv", "ok.md"]  # no temporaries


# -- download_pretrained.py: out_dir -------------------------------------------------------------

def download(*argv):
    """download_pretrained.main in this process (gdown is never reached: the errors come first)."""
    with mock.patch.object(sys, "argv", ["download_pretrained.py", *argv]):
        runpy.run_path(os.path.join(REPO_ROOT, "download_pretrained.py"), run_name="not_main")["main"]()


def test_download_with_an_empty_drive_id_is_one_line(tmp_path):
    """An empty id was sent to Google Drive and came back as a network error (offline) or a page."""
    assert_user_error(run_script("download_pretrained.py", "--drive_id=", f"--out_dir={tmp_path / 'o'}"),
                      "--drive_id is empty")
    assert not (tmp_path / "o").exists()


def test_download_into_a_file_is_one_line(tmp_path):
    pytest.importorskip("gdown")
    a_file = tmp_path / "ckpt.pt"
    a_file.write_bytes(b"an earlier download")
    assert_user_error(run_script("download_pretrained.py", f"--out_dir={a_file}"), "is a file, not a folder")
    with pytest.raises(UserError, match="which is a file"):
        download(f"--out_dir={a_file / 'sub'}")
    assert a_file.read_bytes() == b"an earlier download"


def test_download_under_a_read_only_folder_is_one_line(read_only):
    pytest.importorskip("gdown")
    proc = run_script("download_pretrained.py", f"--out_dir={read_only / 'out'}")
    assert_user_error(proc, "cannot be created", "Permission denied")


# -- bench.py: its own settings, all checked before the first benchmark --------------------------

# a model small enough to start in a second, its head dimension 32 (eval_kv's int4 rows group 32 values)
BENCH = ["--device=cpu", "--n_layer=1", "--n_head=1", "--n_embd=32", "--block_size=16", "--batch_size=2",
         "--bench_iters=2", "--bench_repeats=1", "--bench_lengths=8", "--n_streams=1", "--stream_len=32"]


@pytest.mark.parametrize("args,words", [
    (["--init_from=resume"], "--init_from: bench.py times models of the given shape with random weights"),
    (["--eval_only=True", "--overwrite=True"], "--eval_only and --overwrite: bench.py times"),
    (["--bench_lengths=abc"], "--bench_lengths=abc: 'abc' is not a number"),
    (["--bench_lengths=8,"], "an empty item"),
    (["--bench_lengths=0"], "'0' is not a number of new tokens (1 or more)"),
    (["--bench_lengths=-5"], "'-5' is not a number"),
    (["--bench_iters=0"], "--bench_iters must be at least 1, got 0"),
    (["--bench_repeats=0"], "--bench_repeats must be at least 1, got 0"),
    (["--bench_batch=0"], "--bench_batch must be at least 1"),
    (["--stream_len=0"], "--stream_len must be at least 1, got 0"),
    (["--n_streams=-1"], "--n_streams must be at least 1, got -1"),
    (["--batch_size=0"], "--batch_size must be at least 1"),  # train.py's settings, as train.py checks them
    (["--n_head=3"], "not a multiple of n_head=3"),
    (["--kv_quant=int4", "--kv_quant_group=64"], "kv_quant_group=64 does not divide the head dimension 32"),
    (["--n_head=2"], "eval_kv's row 'int4' groups kv_quant_group=32 values"),
    (["--kv_window=0"], "the generation table has its unbounded rows already"),
])
def test_bench_settings_are_checked_before_any_benchmark(tmp_path, args, words):
    """--what=all: a mistake in the eval_kv or generation settings must not wait for the
    training benchmark to finish."""
    code, out, err = run_in_process("bench.py", *BENCH, f"--dataset={tmp_path}", "--what=all", *args)
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err and lines[-1].startswith("error: ") and words in lines[-1], err
    assert "|" not in out  # no table: no benchmark ran


def test_bench_train_refuses_a_cache_format_its_step_would_not_use():
    """train.py trains through --kv_quant (QAT); bench's train rows time the plain step, so the
    flag is refused there rather than leaving a row named after train.py's step that is not it."""
    proc = run_script("bench.py", *BENCH, "--what=train", "--kv_quant=int4")
    assert_user_error(proc, "--what=train times train.py's step without quantization-aware training")


def test_bench_eval_kv_alone_checks_its_own_settings():
    proc = run_script("bench.py", *BENCH, "--what=eval_kv", "--stream_len=0")
    assert_user_error(proc, "--stream_len must be at least 1")
    proc = run_script("bench.py", *BENCH, "--what=eval_kv", "--n_streams=-1")
    assert_user_error(proc, "--n_streams must be at least 1")


def test_bench_generation_rows_name_the_sink_and_keep_it_off_the_unbounded_rows(tmp_path):
    """--kv_sink=2 with the window of 6: the window's rows say so and hold window + sink
    tokens' bits; the unbounded rows hold every token's, as a cache without a sink does."""
    code, out, err = run_in_process("bench.py", *BENCH, f"--dataset={tmp_path}", "--what=generate", "--kv_window=6",
                                    "--kv_sink=2", "--bench_lengths=12", "--bench_batch=1")
    assert code in (0, None), err
    rows = {line.split("|")[2].strip(): line.split("|") for line in out.splitlines() if line.startswith("| 12 |")}
    assert set(rows) == {"unbounded", "6 + sink 2"}, out
    bits = {name: int(r[6].replace(",", "")) for name, r in rows.items()}
    per_token = int(rows["unbounded"][7].replace(",", ""))
    assert bits["unbounded"] == per_token * (4 + 12 - 1) and bits["6 + sink 2"] == per_token * (6 + 2), out


@pytest.mark.slow
def test_bench_compiled_rows_draw_the_eager_text(tmp_path):
    """--compile=True: each generation row's compiled run, from the same seed, draws the bytes
    its eager run drew (the last column), so its tokens/s are for the same work."""
    code, out, err = run_in_process("bench.py", *BENCH, f"--dataset={tmp_path}", "--what=generate", "--kv_window=6",
                                    "--bench_lengths=12", "--bench_batch=1", "--compile=True")
    assert code in (0, None), err
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| 12 |")]
    assert len(rows) == 2 and all(r[4].strip() != "-" and r[8].strip() == "same" for r in rows), out


def test_bench_names_the_settings_its_chosen_rows_do_not_read(tmp_path):
    """--what=train with two generation settings (--kv_window, --bench_batch):
    a note names them, and the rows run as without them (the same table rows)."""
    code, out, err = run_in_process("bench.py", *BENCH, f"--dataset={tmp_path}", "--what=train", "--bench_iters=1",
                                    "--bench_repeats=1", "--kv_window=6", "--bench_batch=2")
    assert code in (0, None), err
    [note] = [line for line in out.splitlines() if line.startswith("note: --")]
    assert "--bench_batch" in note and "--kv_window" in note and "to other rows than --what=train's" in note, out
    plain = run_in_process("bench.py", *BENCH, f"--dataset={tmp_path}", "--what=train", "--bench_iters=1",
                           "--bench_repeats=1")[1]
    assert "--kv_window" not in plain and "--bench_batch" not in plain, plain
    rows = [[line.split("|")[1] for line in text.splitlines() if line.startswith("| ")] for text in (out, plain)]
    assert rows[0] == rows[1] and len(rows[0]) > 1, out


def test_bench_says_an_out_dir_flag_is_not_read(tmp_path):
    """--out_dir (a checkpoint's folder, as sample.py takes it) gets a note that bench.py times
    random weights; a config file that sets out_dir for train.py gets none."""
    config = tmp_path / "cfg.py"
    config.write_text(f"out_dir = {str(tmp_path / 'run')!r}\n")
    args = (*BENCH, f"--dataset={tmp_path}", "--what=generate", "--bench_lengths=4", "--bench_batch=1")
    for extra, noted in (([f"--out_dir={tmp_path}"], True), ([str(config)], False), ([], False)):
        code, out, err = run_in_process("bench.py", *extra, *args)
        assert code in (0, None), err
        assert ("note: --out_dir is not read: bench.py times a model of the config's shape with random weights"
                in out) == noted, out


def test_bench_train_runs_its_plain_loop_at_the_threads_given(tmp_path, monkeypatch):
    """--threads=1 is every row's thread count, the plain loop's too: its 'vs plain' ratios then
    compare loops, not a thread count the user did not ask for. Without --threads the plain loop
    runs at torch's default and --bench_ablation adds the row of the threads chosen."""
    import torch
    monkeypatch.setattr("devices.pick_threads", lambda requested=0: (requested or 1, "stub"))  # auto: 1

    def threads_of(*args):
        before = torch.get_num_threads()
        torch.set_num_threads(3)  # torch's default as bench.py starts (run_in_process puts it back)
        try:
            code, out, err = run_in_process("bench.py", *BENCH, f"--dataset={tmp_path}", "--what=train",
                                            "--bench_iters=1", "--bench_repeats=1", *args)
        finally:
            torch.set_num_threads(before)
        assert code in (0, None), err
        return {c[1].strip(): c[3].strip() for c in (line.split("|") for line in out.splitlines())
                if len(c) > 4 and c[1].strip() not in ("loop", "---")}

    assert set(threads_of("--threads=1").values()) == {"1"}
    rows = threads_of("--bench_ablation=True")
    assert rows["plain eager loop"] == "3" and rows["+ 1 threads (auto)"] == "1" and rows["train.py step"] == "1", rows


def test_bench_eval_kv_leaves_out_h2o_for_an_attention_it_cannot_rank(tmp_path):
    """h2o computes softmax itself: for a model with a plug-in attention, its row would time
    softmax under the plug-in's name. bench leaves the row out and says why, as eval_kv does."""
    args = ("bench.py", *BENCH, f"--dataset={tmp_path}", "--what=eval_kv", "--n_streams=1", "--stream_len=16",
            "--bench_repeats=1")
    code, out, err = run_in_process(*args, "--attention=tests.tutorial_user_attention:attend")
    assert code in (0, None), err
    assert "h2o" not in "".join(line for line in out.splitlines() if line.startswith("|")), out
    assert "no int4 + h2o row" in out and "tests.tutorial_user_attention:attend" in out, out
    code, out, err = run_in_process(*args)  # softmax: the row is there
    assert code in (0, None), err
    assert any(line.startswith("| int4 + h2o") for line in out.splitlines()), out


def test_bench_generation_of_a_linear_model_has_one_fixed_state_row(tmp_path):
    """Linear attention in every layer keeps a fixed-size state: no window row (sample.py refuses
    --kv_window on such a model), no bits per cached token, no KV-cache baseline."""
    code, out, err = run_in_process("bench.py", *BENCH, f"--dataset={tmp_path}", "--what=generate", "--attention=linear",
                                    "--bench_lengths=8", "--bench_batch=1", "--baseline=True")
    assert code in (0, None), err
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| 8 |")]
    assert [r[2].strip() for r in rows] == ["fixed state"] and rows[0][7].strip() == "-", out
    assert "no tutorial-style baseline" in out
