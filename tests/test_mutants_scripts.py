"""
Tests found missing by a mutation audit of the scripts and reporting side (eval_kv's tables,
kv_study's judging, records and variants, sample.py's flags, plug-in paths, progress lines,
bench's byte counts). Each compares against a reference recomputed here (a frontier by brute
force, a cell from the CSV beside it, what a docstring or --help promises), never against
figures copied from a run.

    python -m pytest -q tests/test_mutants_scripts.py
"""
import csv
import re
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch

import kv_study
import plugins
import utils
from checkpoint import save_checkpoint
from conftest import run_in_process, save_tiny_checkpoint, tiny
from decode_timing import read_bytes
from fileio import write_json
from kv import report, study_report
from kv.study_finetune import fine_tune_command, fine_tune_state
from kv.study_variants import variant_args, variant_table
from model import GPTConfig


@pytest.fixture(scope="module")
def ckpt_dir(data_dir, tmp_path_factory):
    """out/ckpt.pt of a tiny untrained model whose config names the tiny corpus and block 32."""
    out = tmp_path_factory.mktemp("out")
    args = dict(n_layer=2, n_head=2, n_embd=32, bias=False, dropout=0.0)
    save_checkpoint(str(out / "ckpt.pt"), tiny(**args), None, args, dict(dataset=str(data_dir), block_size=32), 0, 5.0)
    return out


def table(md, header):
    """The cells of the markdown table whose header line starts with `header`: a list of rows."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header)) + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


# -- eval_kv's table and progress ---------------------------------------------------------------

def test_sweep_table_marks_the_brute_force_frontier_and_each_rows_own_buckets(ckpt_dir):
    """eval_kv_quick.md: the frontier column is the brute-force frontier of the CSV, each bucket cell its own row's."""
    code, _, err = run_in_process("eval_kv.py", f"--out_dir={ckpt_dir}", "--sweep=quick", "--n_streams=1",
                                  "--stream_len=96", "--kv_quant_group=16", "--device=cpu", "--tensorboard=False")
    assert code in (0, None), err
    with open(ckpt_dir / "eval_kv_quick.csv") as f:
        rows = list(csv.DictReader(f))
    md = (ckpt_dir / "eval_kv_quick.md").read_text()
    pts = [(float(r["kv_bits_per_token"]), float(r["bpb"])) for r in rows]
    beaten = lambda p: any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in pts)
    main = table(md, "| setting | peak KV")
    assert [c[0] for c in main] == [r["setting"] for r in rows]
    assert [c[-1] == "*" for c in main] == [not beaten(p) for p in pts]
    cols = [k for k in rows[0] if k.startswith("bpb[")]
    buckets = table(md, "| setting | " + cols[0][3:])
    assert [c[1:] for c in buckets] == [[f"{float(r[k]):.4f}" for k in cols] for r in rows]


def test_within_one_percent_is_either_way():
    """The table's 'Within 1%' list holds the rows within 1% of the baseline either way, and says so; those far
    below it are named apart as better (the rows of another checkpoint as the baseline), those far above not at all."""
    def row(name, bpb):
        return {"setting": name, "kv_bits_peak": 100, "kv_bits_per_token": 1.0, "x_smaller": 1.0, "bpb": bpb,
                "delta_pct": 100 * (bpb / 2.0 - 1), "kl_bits": 0.0, "baseline": "b", "bpb_base": 2.0,
                "kv_bits_peak_base": 100}
    rows = [row("ref", 2.0), row("close", 2.015), row("far below", 1.8), row("far above", 2.1)]
    line = next(s for s in report.markdown(rows, "t").splitlines() if s.startswith("Within 1%"))
    within, better = line.split(" More than 1% better: ")
    assert "(either way)" in within and re.findall(r"`([^`]+)`", within) == ["ref", "close"]
    assert re.findall(r"`([^`]+)`", better) == ["far below"]
    line = next(s for s in report.markdown(rows[:2], "t").splitlines() if s.startswith("Within 1%"))
    assert "better" not in line


def test_progress_of_a_run_with_a_baseline_ends_at_its_total(ckpt_dir, monkeypatch):
    """eval_kv's progress bar counts the baseline's pass too, so it ends at 100%, not there halfway."""
    bars = []

    class Recorded(utils.Progress):
        def __init__(self, *a):
            super().__init__(*a)
            bars.append(self)
    monkeypatch.setattr(utils, "Progress", Recorded)
    code, _, err = run_in_process("eval_kv.py", f"--out_dir={ckpt_dir}", f"--baseline={ckpt_dir}", "--kv_quant=int8",
                                  "--kv_quant_residual=0", "--n_streams=1", "--stream_len=64", "--chunk=8", "--device=cpu")
    assert code in (0, None), err
    assert len(bars) == 1 and bars[0].done == bars[0].total


def test_progress_eta_is_the_time_left_at_the_rate_so_far(monkeypatch, capsys):
    """utils.Progress: ETA = (elapsed - time set aside) / steps done x steps left."""
    now = [0.0]
    monkeypatch.setattr(utils, "time", SimpleNamespace(time=lambda: now[0]))
    bar = utils.Progress(4, "x")
    now[0] = 40.0
    bar.step()
    bar.set_aside(10.0)
    now[0] = 80.0
    bar.step()
    first, second = capsys.readouterr().err.splitlines()
    assert " 25% " in first and "ETA 2:00" in first  # 40 s a step, 3 left
    assert " 50% " in second and "ETA 1:10" in second  # (80 - 10) / 2 a step, 2 left
    now[0] = 0.0
    bar = utils.Progress(2, "x")
    now[0] = 119.7
    bar.step()  # an ETA of 119.7 s reads as utils.clock writes it (2:00), not as 1:60
    assert f"ETA {utils.clock(119.7)}" in capsys.readouterr().err


def test_clock_reads_hours_from_the_first_hour_on():
    """utils.clock: m:ss below an hour, h:mm:ss from an hour on."""
    assert (utils.clock(59.6), utils.clock(3599), utils.clock(3600), utils.clock(3725)) == \
        ("1:00", "59:59", "1:00:00", "1:02:05")


# -- kv_study: judging, the frontier table, ETA --------------------------------------------------

def study_rows():
    """Rows as kv_study's evaluation leaves them: the base's and base_ft's references, and reductions."""
    def row(variant, setting, bpb, peak):
        return {"variant": variant, "setting": setting, "bpb": bpb, "kv_bits_peak": peak, "kv_bits_per_token": peak / 64,
                "train_command": "",
                "eval_command": f"python eval_kv.py --out_dir={variant}", "checkpoint": f"/s/{variant}/last.pt"}
    return [row("base", "plain, window 16 (reference)", 2.0, 1024), row("base", "int4, window 16", 2.1, 256),
            row("base_ft", "plain, window 16 (reference)", 1.9, 1024), row("mqa", "plain, window 16 (reference)", 1.95, 512),
            row("mqa", "int2, window 4", 2.2, 32), row("base_ft", "int8, window 16", 1.97, 512)]


@pytest.mark.parametrize("yardstick", ["strict", "same_training", "base"])
def test_every_row_is_judged_against_its_yardstick(yardstick, monkeypatch):
    """kv_study.judge: x smaller and delta vs base against the base; delta_pct against the yardstick --help describes."""
    monkeypatch.setattr(kv_study, "yardstick", yardstick)
    rows = study_rows()
    kv_study.judge(rows, "/s/base/ckpt.pt")
    base, ft = rows[0]["bpb"], rows[2]["bpb"]
    for r in rows:
        change = {name: 100 * (r["bpb"] / ref - 1) for name, ref in (("base", base), ("base_ft", ft))}
        if r["variant"] == "base" or yardstick == "base":
            want = "base"
        else:
            want = "base_ft" if yardstick == "same_training" else max(change, key=change.get)  # the worse for it
        assert r["yardstick"] == want and r["delta_pct"] == pytest.approx(change[want])
        assert r["delta_base_pct"] == pytest.approx(change["base"]) and r["x_smaller"] == 1024 / r["kv_bits_peak"]


def test_frontier_md_puts_each_change_in_its_own_column():
    """frontier.md: 'vs base' holds the change against the base, 'vs yardstick' the one against the yardstick."""
    rows = study_rows()
    kv_study.judge(rows, "/s/base/ckpt.pt")
    md = study_report.markdown(rows, "t")
    cells = {(c[0], c[1]): c for c in table(md, "| variant | setting")}
    for r in rows:
        c = cells[r["variant"], r["setting"]]
        assert c[5] == report.signed_pct(r["delta_base_pct"])
        assert c[6] == f"{report.signed_pct(r['delta_pct'])} ({r['yardstick']})"
    for line in md.splitlines():  # the summary: each change once, the base's not twice
        if line.startswith("**Largest reduction"):
            r = next(r for r in rows if f"({r['variant']}, {r['setting']}:" in line)
            said = f"{report.signed_pct(r['delta_pct'])} vs {r['yardstick']}"
            assert said in line and line.count(" vs ") == (1 if r["yardstick"] == "base" else 2), line
    without = [r for r in study_rows() if r["variant"] != "base_ft"]
    kv_study.judge(without, "/s/base/ckpt.pt")
    assert "No base_ft among the variants" in study_report.markdown(without, "t")
    assert "No base_ft among the variants" not in study_report.markdown(without, "t", yardstick="base")


def test_eta_counts_fine_tunes_and_evaluations_apart():
    """kv_study.eta: the variants left, each fine-tune at the mean fine-tune time, each variant at the mean evaluation."""
    spent = {"fine-tune": [100.0, 140.0], "evaluation": [10.0, 20.0]}
    assert kv_study.eta([("mqa", ["--n_kv_head=1"]), ("base_ft", None), ("gqa", None)], spent) == "ETA 2:45"
    assert kv_study.eta([("mqa", [])], {"fine-tune": [], "evaluation": [5.0]}) == "ETA after the first fine-tune"


# -- kv_study: what a rerun may reuse -----------------------------------------------------------

@pytest.mark.parametrize("name, value, part", [
    ("iters", 7, 0), ("learning_rate", 3e-3, 0), ("min_lr", 3e-5, 0), ("kv_quant_group", 8, 0),
    ("train_args", "--batch_size=8", 0), ("n_streams", 9, 1), ("stream_len", 99, 1), ("evict_chunk", 1, 1),
    ("dtype", "float32", 1), ("kv_quant_group", 8, 1), ("quick", True, 1)])
def test_every_setting_that_changes_a_result_is_in_its_record(name, value, part, monkeypatch):
    """kv_study.run_settings: a fine-tune or evaluation setting given anew changes the record, so a rerun redoes it."""
    ckpt = {"iter_num": 3, "best_val_loss": 1.5}
    before = kv_study.run_settings(ckpt, "/b/ckpt.pt", 16)[part]
    monkeypatch.setattr(kv_study, name, value)
    assert kv_study.run_settings(ckpt, "/b/ckpt.pt", 16)[part] != before
    assert kv_study.run_settings(ckpt, "/b/ckpt.pt", 8)[1] != kv_study.run_settings(ckpt, "/b/ckpt.pt", 16)[1]  # chunk


def test_a_fine_tune_is_finished_only_with_its_settings_and_its_last_iteration(tmp_path):
    """fine_tune_state: a last.pt at another iteration than recorded (cut short) or other settings is not finished."""
    save_tiny_checkpoint(tmp_path)  # iteration 10
    shutil.copyfile(tmp_path / "ckpt.pt", tmp_path / "last.pt")
    tuned = {"iters": 2}
    for record, finished in [({"settings": tuned, "last_iter": 10}, True), ({"settings": tuned, "last_iter": 12}, False),
                             ({"settings": {"iters": 3}, "last_iter": 10}, False)]:
        write_json(str(tmp_path / "finetune.json"), record)
        assert fine_tune_state(str(tmp_path), [], tuned)[2] is finished, record
    assert fine_tune_state(str(tmp_path / "none"), None, tuned)[2]  # the base needs no fine-tune


def test_the_fine_tune_command_trains_with_the_studys_schedule():
    """fine_tune_command: K iterations resumed as a fine-tune, warm-up K/10, cosine from learning_rate to min_lr."""
    hyper = dict(learning_rate=3e-3, min_lr=2e-5, threads=1, tensorboard=False, train_args="--dropout=0.1")
    cmd = fine_tune_command("/s/mqa", ["--n_kv_head=1"], 200, dict(dataset="d", batch_size=4, block_size=64), hyper)
    flags = dict(a[2:].split("=", 1) for a in cmd[2:])
    assert {k: flags[k] for k in ("init_from", "resume_mode", "out_dir", "n_kv_head", "dropout", "block_size")} == \
        dict(init_from="resume", resume_mode="finetune", out_dir="/s/mqa", n_kv_head="1", dropout="0.1", block_size="64")
    assert [float(flags[k]) for k in ("max_iters", "warmup_iters", "lr_decay_iters", "learning_rate", "min_lr")] == \
        [200, 20, 200, 3e-3, 2e-5]


def test_variants_are_the_models_the_study_describes():
    """kv/study_variants: local windows block/4 in the lower half, *_local at block/4 and /8 everywhere; every QAT at the study's group."""
    def config(name):
        flags = dict(a[2:].split("=", 1) for a in variant_args(name, 64, 4, 8))
        c = GPTConfig(n_layer=4, n_head=4, n_embd=64, window=int(flags.get("window", 0)),
                      global_layers=flags.get("global_layers", ""), kv_share=int(flags.get("kv_share", 1)))
        return flags, [c.window if c.is_local(i) else 0 for i in range(4)]
    assert config("local")[1] == [16, 16, 0, 0]
    assert config("mqa_share_int2_local")[1] == [16] * 4 and config("gqa_int2_local")[1] == [8] * 4
    for name in variant_table(64, 4):
        flags = config(name)[0] if name != "base" else {}
        if "kv_quant" in flags:
            assert (flags["kv_quant_group"], flags["kv_quant_keys"]) == ("8", "token"), name


# -- sample.py's flags ----------------------------------------------------------------------------

def sample(out_dir, *args):
    code, out, err = run_in_process("sample.py", f"--out_dir={out_dir}", "--device=cpu", *args)
    assert code in (0, None), err
    return out, err


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("sample"))


def test_top_k_1_is_greedy_whatever_the_seed(sample_dir):
    """--top_k is applied: drawing among the one likeliest byte is greedy decoding (--temperature=0)."""
    greedy, _ = sample(sample_dir, "--temperature=0", "--max_new_tokens=30", "--seed=1")
    top1, _ = sample(sample_dir, "--temperature=1.0", "--top_k=1", "--max_new_tokens=30", "--seed=2")
    assert top1 == greedy


def test_a_prompt_file_is_read_byte_for_byte(sample_dir, tmp_path):
    """--start=FILE:path gives the model the file's bytes as they are: the text starts with them, spaces and newline included."""
    (tmp_path / "p.txt").write_bytes(b"  ROMEO:\n")
    out, _ = sample(sample_dir, f"--start=FILE:{tmp_path / 'p.txt'}", "--max_new_tokens=3", "--temperature=0")
    assert out.startswith("  ROMEO:\n")


def test_peak_bits_are_per_sample_whatever_the_batch(sample_dir):
    """sample.py's 'KV cache peak N bits per sample' is one sample's, the same in a batch of 3."""
    peak = lambda n: re.search(r"KV cache peak ([\d,]+) bits per sample", sample(
        sample_dir, f"--num_samples={n}", "--max_new_tokens=20")[1]).group(1)
    assert peak(3) == peak(1)


# -- plug-ins and bench's byte counts ---------------------------------------------------------------

def test_a_plug_in_file_is_found_from_the_folder_you_run_in(tmp_path, monkeypatch):
    """--kv_trim=mywork/file.py:fn reads mywork/ under the folder you run in, not under the project."""
    (tmp_path / "mywork").mkdir()
    (tmp_path / "mywork" / "mutant_trim_here.py").write_text("def keep(*a):\n    return 'mine'\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(plugins, "_PLUGINS", {})
    monkeypatch.setattr(plugins, "_PLUGIN_FUNCTIONS", {})
    try:
        assert plugins.import_function("mywork/mutant_trim_here.py:keep", "kv_trim")() == "mine"
    finally:
        sys.modules.pop("mutant_trim_here", None)


def test_a_decode_step_reads_bytes_not_bits():
    """decode_timing.read_bytes (bench's bandwidth fraction): 4 bytes a float32 weight, each buffer at its own width."""
    model = tiny()
    dec = SimpleNamespace(buffers=lambda: [torch.zeros(3, 5, dtype=torch.bfloat16), torch.zeros(7, dtype=torch.int8)])
    assert read_bytes(model, dec) == 4 * sum(p.numel() for p in model.parameters()) + 2 * 15 + 7
