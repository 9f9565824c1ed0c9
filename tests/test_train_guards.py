"""train.py's guards around a resume and a diverging run: a later last.pt is never lost to a
resume from an older ckpt.pt, a run whose loss turns nan stops before writing it, a resume on
another text starts its own best val loss, and a foreign checkpoint's unreadable training state
or nan weights are one clear error.

    python -m pytest -q tests/test_train_guards.py
"""
import re
import shutil
import subprocess

import pytest
import torch

from checkpoint import checksum, load_model, read_checkpoint
from resume import restore_training_state
from conftest import TINY, assert_user_error, run_in_process, run_script, tiny_corpus, train, write_splits
from utils import UserError

N = 6


@pytest.fixture(scope="module")
def run_dir(data_dir, tmp_path_factory):
    """N iterations: ckpt.pt and last.pt both at iteration N."""
    out = tmp_path_factory.mktemp("run") / "out"
    train(data_dir, out, f"--max_iters={N}")
    return out


def resave(ckpt, path):
    ckpt["crc32"] = {k: checksum(v) for k, v in ckpt.items() if k != "crc32"}
    torch.save(ckpt, path)


def with_later_last(run_dir, tmp_path, later=N + 4):
    """A copy of the run whose last.pt says it was written at a later iteration than ckpt.pt."""
    out = tmp_path / "out"
    shutil.copytree(run_dir, out)
    last = read_checkpoint(str(out / "last.pt"))
    last["iter_num"] = later
    resave(last, out / "last.pt")
    return out, (out / "last.pt").read_bytes()


@pytest.mark.parametrize("max_iters", [N + 20, 2], ids=["continue", "finetune"])
def test_a_resume_from_an_older_ckpt_keeps_the_later_last_pt_aside(data_dir, run_dir, tmp_path, max_iters):
    """nanoGPT's resume reads ckpt.pt: going on from it (continue) or fine-tuning it must not
    lose the run's later last.pt, which moves aside when the new last.pt is first written."""
    out, before = with_later_last(run_dir, tmp_path)
    printed = train(data_dir, out, "--init_from=resume", f"--max_iters={max_iters}")
    assert f"resumed {out / 'ckpt.pt'} at iteration {N}" in printed
    assert f"this run keeps it as {out / f'last_{N + 4}.pt'}" in printed
    assert (out / f"last_{N + 4}.pt").read_bytes() == before
    assert read_checkpoint(str(out / "last.pt"))["iter_num"] == (max_iters if max_iters > N else N + max_iters)


def test_a_second_set_aside_takes_a_free_name(data_dir, run_dir, tmp_path):
    out, before = with_later_last(run_dir, tmp_path)
    (out / f"last_{N + 4}.pt").write_bytes(b"an earlier one")
    train(data_dir, out, "--init_from=resume", "--max_iters=2")
    assert (out / f"last_{N + 4}.pt").read_bytes() == b"an earlier one"
    assert (out / f"last_{N + 4}_2.pt").read_bytes() == before


def test_a_start_up_error_moves_nothing(data_dir, run_dir, tmp_path):
    out, before = with_later_last(run_dir, tmp_path)
    proc = run_script("train.py", *TINY, f"--dataset={data_dir}", f"--out_dir={out}", "--init_from=resume",
                      "--max_iters=2", "--xl_mem=8", "--xl_update=no_such_module:step")
    assert proc.returncode != 0
    assert (out / "last.pt").read_bytes() == before and not list(out.glob("last_*.pt"))


def test_a_diverging_run_stops_before_writing_nan(data_dir, run_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(run_dir, out)
    before = {p.name: p.read_bytes() for p in out.glob("*.pt")}
    proc = run_script("train.py", *TINY, f"--dataset={data_dir}", f"--out_dir={out}", "--init_from=resume",
                      "--resume_checkpoint_name=last", "--max_iters=40", "--learning_rate=1e6", "--grad_clip=0.0",
                      "--warmup_iters=0", "--decay_lr=False")
    assert_user_error(proc, "training diverged by iteration", "was not written", "lower --learning_rate")
    for p in out.glob("*.pt"):
        ckpt = read_checkpoint(str(p))
        assert all(bool(torch.isfinite(v).all()) for v in ckpt["model"].values()), p.name
    assert {p.name for p in out.glob("*.pt")} == set(before)


def test_a_loss_of_nan_before_any_step_blames_the_forward_pass(data_dir, tmp_path):
    """An attention plug-in that returns nan (a mask filled with -inf where a linear attention
    multiplies by 0): the first evaluation stops the run at once, naming the plug-in, not the
    learning rate; the run writes nothing (it used to train on until its first log step)."""
    plugin = tmp_path / "bad_attention.py"
    plugin.write_text("import torch\n\n\ndef attention(q, k, v, mask=None, dropout_p=0.0):\n"
                      "    T, S = q.size(-2), k.size(-2)\n"
                      "    future = torch.ones(T, S, dtype=torch.bool, device=q.device).triu(S - T + 1)\n"
                      "    return (q @ k.transpose(-2, -1)).masked_fill(future, float('-inf')) @ v  # -inf x v\n")
    proc = run_script("train.py", *TINY, f"--dataset={data_dir}", f"--out_dir={tmp_path / 'out'}", "--max_iters=40",
                      f"--attention={plugin}:attention")
    assert_user_error(proc, "val loss nan at iteration 0, before this run took a training step",
                      f"the plug-in --attention={plugin}:attention is where to look", "nothing was written")
    assert not (tmp_path / "out").exists()


def test_nan_weights_are_one_error(run_dir, tmp_path):
    ckpt = read_checkpoint(str(run_dir / "ckpt.pt"))
    name = next(iter(ckpt["model"]))
    ckpt["model"][name] = ckpt["model"][name].clone().fill_(float("nan"))
    resave(ckpt, tmp_path / "nan.pt")
    with pytest.raises(UserError, match=f"not finite numbers \\(nan or inf in {name}\\): its run diverged"):
        load_model(str(tmp_path / "nan.pt"))


def test_a_resume_on_another_text_starts_its_own_best(run_dir, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    write_splits(other, tiny_corpus(seed=7))
    out = tmp_path / "out"
    shutil.copytree(run_dir, out)
    printed = train(other, out, "--init_from=resume", "--resume_checkpoint_name=last", f"--max_iters={N + 2}")
    assert "chose 'continue'" in printed and f"-> {other}: the checkpoint's best val loss is not comparable" in printed
    assert "data position not restored (another dataset)" in printed


def test_an_evaluation_on_other_val_batches_says_it_is_not_comparable(data_dir, run_dir, tmp_path):
    """A checkpoint from before eval_windows drew its val batches as continuing rows: evaluating
    it now (independent windows) prints a val loss that is not its best's, and says so; the
    same evaluation on the batches it recorded says nothing."""
    out = tmp_path / "out"
    shutil.copytree(run_dir, out)
    printed = train(data_dir, out, "--init_from=resume", "--eval_only=True")
    assert "not comparable" not in printed, printed
    ckpt = read_checkpoint(str(out / "ckpt.pt"))
    del ckpt["config"]["eval_windows"]
    resave(ckpt, out / "ckpt.pt")
    for args in (["--eval_only=True"], ["--max_iters=0", "--eval_interval=1"]):  # (the tutorial's way)
        printed = train(data_dir, out, "--init_from=resume", *args)
        assert "eval_windows 'rows' -> 'random' (other val batches): this evaluation is not comparable" in printed
    printed = train(data_dir, out, "--init_from=resume", "--eval_only=True", "--eval_windows=rows")
    assert "not comparable" not in printed, printed


def test_eval_windows_random_with_xl_memory_is_refused(data_dir, tmp_path):
    proc = run_script("train.py", *TINY, f"--dataset={data_dir}", f"--out_dir={tmp_path / 'out'}", "--xl_mem=8",
                      "--eval_windows=random", "--max_iters=1")
    assert_user_error(proc, "--eval_windows=random gives every val row a window of its own")
    proc = run_script("train.py", *TINY, f"--dataset={data_dir}", f"--out_dir={tmp_path / 'out'}",
                      "--eval_windows=shuffled", "--max_iters=1")
    assert_user_error(proc, "--eval_windows must be one of auto, random, rows")


@pytest.mark.parametrize("flag", ["--batch_size=2", "--eval_iters=3", "--seed=5"])
def test_a_resume_that_evaluates_other_val_batches_starts_its_own_best(data_dir, run_dir, tmp_path, flag):
    """batch_size, eval_iters and seed draw the fixed val batches: a resume with another reads
    other bytes, so its val loss is not compared with the best recorded; the run's own best
    goes into ckpt.pt (the loss its evaluations printed), the old one kept aside, not lost."""
    out = tmp_path / "out"
    shutil.copytree(run_dir, out)
    old = (out / "ckpt.pt").read_bytes()
    printed = train(data_dir, out, "--init_from=resume", "--resume_checkpoint_name=last", f"--max_iters={N + 8}", flag)
    name, _, value = flag[2:].partition("=")
    assert f"{name} " in printed and f"-> {value} (other val batches): the checkpoint's best val loss is not comparable" \
        in printed, printed
    assert f"keeps it as {out / f'ckpt_{N}.pt'}" in printed and (out / f"ckpt_{N}.pt").read_bytes() == old
    losses = [float(line.split("val loss ")[1].split(",")[0]) for line in printed.splitlines()
              if line.startswith("iter ") and "val loss" in line]  # (the weights resumed evaluated too)
    assert read_checkpoint(str(out / "ckpt.pt"))["best_val_loss"] == pytest.approx(min(losses), abs=1e-4)


def test_a_fine_tune_that_only_gets_worse_leaves_the_weights_it_resumed_in_ckpt_pt(data_dir, run_dir, tmp_path):
    """Other val batches (--batch_size=2) make the checkpoint's best incomparable, but not the
    run's evaluation of the weights it resumed: when a rate far too high makes every trained
    evaluation worse, ckpt.pt holds those weights, not the worse end of the run as its best."""
    out = tmp_path / "out"
    shutil.copytree(run_dir, out)
    resumed = read_checkpoint(str(out / "last.pt"))["model"]
    printed = train(data_dir, out, "--init_from=resume", "--resume_checkpoint_name=last", "--resume_mode=finetune",
                    "--max_iters=2", "--eval_interval=1", "--batch_size=2", "--learning_rate=0.5", "--decay_lr=False",
                    "--warmup_iters=0")
    vals = {int(m[1]): float(m[2]) for m in re.finditer(r"iter (\d+): train loss [\d.]+, val loss ([\d.]+)", printed)}
    assert sorted(vals) == [N, N + 1, N + 2] and vals[N] < min(vals[N + 1], vals[N + 2]), printed  # (the premise)
    best = read_checkpoint(str(out / "ckpt.pt"))
    assert best["iter_num"] == N and best["best_val_loss"] == pytest.approx(vals[N], abs=1e-4)
    assert all(torch.equal(best["model"][k], v) for k, v in resumed.items())
    assert f"best val loss {vals[N]:.4f} at iteration {N};" in printed
    assert read_checkpoint(str(out / "last.pt"))["iter_num"] == N + 2  # the run's end is still there to go on from


@pytest.mark.parametrize("key,value", [
    ("rng", {"cpu": torch.zeros(3, dtype=torch.uint8)}),  # not a generator state
    ("rng", "garbage"), ("rng", [1, 2]),  # not a dict of states at all
    ("optimizer", {"state": "x", "param_groups": []}), ("optimizer", {"param_groups": "x", "state": {}}),
    ("optimizer", "garbage"), ("optimizer", [1]),
])
def test_an_unreadable_training_state_is_one_error(run_dir, key, value):
    """A hand-edited checkpoint (no checksums to catch it) whose random state or optimizer state
    is not what train.py saves: one UserError naming which, never a traceback or a note that
    the parameter shapes changed."""
    ckpt = read_checkpoint(str(run_dir / "last.pt"))
    model, _ = load_model(str(run_dir / "last.pt"))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    ckpt[key] = value
    what = "random state or data position" if key == "rng" else "optimizer state"
    with pytest.raises(UserError, match=f"the checkpoint's {what} cannot be restored"):
        restore_training_state(ckpt, "continue", optimizer, scaler, object(), (4, 32))


@pytest.mark.parametrize("case", ["no data position", "another block_size"])
def test_a_data_position_not_restored_says_why(run_dir, capsys, case):
    """The tutorial's checkpoints hold no data position: the note says so, not that the
    batch or block size changed (which it does say when they did)."""
    ckpt = read_checkpoint(str(run_dir / "last.pt"))
    model, _ = load_model(str(run_dir / "last.pt"))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    shape = (ckpt["config"]["batch_size"], ckpt["config"]["block_size"])
    if case == "no data position":
        del ckpt["loader"]
    else:
        shape = (shape[0], shape[1] * 2)
    assert restore_training_state(ckpt, "continue", optimizer, scaler, object(), shape) is False
    why = "the checkpoint holds none" if case == "no data position" else "batch_size or block_size changed"
    assert f"note: data position not restored ({why})" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["no groups", "one parameter fewer", "another shape"])
def test_an_optimizer_state_not_restored_says_why(run_dir, capsys, case):
    """An optimizer state that does not fit starts AdamW afresh with a note naming what does not
    fit: the count of groups (a hand-edited state), of parameters, or a parameter's shape."""
    ckpt = read_checkpoint(str(run_dir / "last.pt"))
    model, _ = load_model(str(run_dir / "last.pt"))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    state = ckpt["optimizer"]
    if case == "no groups":
        state["param_groups"], state["state"] = [], {}
    elif case == "one parameter fewer":
        state["param_groups"][0]["params"] = state["param_groups"][0]["params"][:-1]
    else:
        first = state["param_groups"][0]["params"][0]
        state["state"][first]["exp_avg"] = state["state"][first]["exp_avg"][:1]
    restore_training_state(ckpt, "finetune", optimizer, scaler, object(), (4, 32))
    why = {"no groups": f"the saved one has 0 parameter groups, this model's optimizer {len(optimizer.param_groups)}",
           "one parameter fewer": "the model's parameters changed",
           "another shape": "the parameter shapes changed"}[case]
    assert f"note: optimizer state not restored ({why}); starting AdamW afresh" in capsys.readouterr().out
    assert all(not s for s in optimizer.state.values())  # nothing restored


@pytest.mark.parametrize("iteration", [-10, "5"])
def test_a_checkpoint_with_an_impossible_iteration_is_one_error(iteration):
    from resume import resume_schedule
    with pytest.raises(UserError, match="is not a count of iterations"):
        resume_schedule({"iter_num": iteration}, "auto", 100)
    with pytest.raises(UserError, match="is not a count of iterations"):  # the tutorial's layout: its max_iters
        resume_schedule({"config": {"max_iters": iteration}}, "auto", 100)


def test_an_impossible_xl_mem_in_a_checkpoint_names_itself():
    from kv.policy import KVOptions
    with pytest.raises(UserError, match="the checkpoint's config says xl_mem=-3"):
        KVOptions(kv_window=-1).for_checkpoint({"xl_mem": -3})
    assert KVOptions(kv_window=8).for_checkpoint({"xl_mem": -3}).kv_window == 8  # a bound given is not its business


def test_a_resume_whose_model_beats_the_best_recorded_writes_ckpt_pt(data_dir, run_dir, tmp_path):
    """Ctrl-C between evaluations leaves a last.pt better than the best val loss it records: the
    resume's first evaluation finds it, and ckpt.pt (the best) must then hold that model, not
    only the summary name it."""
    out = tmp_path / "out"
    shutil.copytree(run_dir, out)
    last = read_checkpoint(str(out / "last.pt"))
    last["best_val_loss"] = 99.0  # the best evaluated before its iteration
    resave(last, out / "last.pt")
    (out / "ckpt.pt").unlink()  # (its ckpt.pt holds an older model)
    printed = train(data_dir, out, "--init_from=resume", "--resume_checkpoint_name=last", "--resume_mode=finetune",
                    "--max_iters=2", "--eval_interval=1", "--learning_rate=0", "--decay_lr=False")  # the model stays
    assert f"iter {N}: " in printed and "ckpt.pt written" in printed.split(f"iter {N}: ")[1].splitlines()[0]
    best = read_checkpoint(str(out / "ckpt.pt"))
    assert best["iter_num"] == N and f"at iteration {N};" in printed
    assert all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])


def test_a_resume_goes_on_with_the_text_it_was_trained_on(data_dir, run_dir, tmp_path):
    """No --dataset given: the checkpoint's, not the default's (Shakespeare), as for xl_mem."""
    out = tmp_path / "out"
    shutil.copytree(run_dir, out)
    code, out, err = run_in_process("train.py", *TINY, f"--out_dir={out}", "--init_from=resume",
                                    "--resume_checkpoint_name=last", f"--max_iters={N + 2}", "--threads=1")
    assert code in (0, None), err
    assert f"note: dataset='{data_dir}' from the checkpoint" in out
    assert "not comparable" not in out and "data position not restored" not in out


def test_continue_with_nothing_left_to_train_is_one_error(run_dir):
    code, out, err = run_in_process("train.py", *TINY, f"--out_dir={run_dir}", "--init_from=resume",
                                    "--resume_mode=continue", f"--max_iters={N}")
    assert_user_error(subprocess.CompletedProcess([], code, out, err), f"already at iteration {N}: nothing to train",
                      "--resume_mode=finetune")


@pytest.mark.parametrize("flags, fragments", [
    (["--attention=linear", "--xl_mem=16"], ["xl_mem=16", "every layer of this model is linear", "--xl_mem=0"]),
    (["--attention=linear", "--window=8"], ["--window=8", "every layer of this model is linear", "drop --window"]),
    (["--n_kv_head=-1"], ["n_kv_head must be >= 0"]),
])
def test_a_setting_the_model_would_ignore_is_refused_before_anything_is_written(data_dir, tmp_path, flags, fragments):
    code, out, err = run_in_process("train.py", *TINY, f"--dataset={data_dir}", f"--out_dir={tmp_path / 'o'}",
                                    "--max_iters=2", *flags)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    assert not (tmp_path / "o").exists()


def sample_command(out):
    """The `next: python sample.py ...` line a run ends with, as argv."""
    import shlex
    [line] = [s for s in out.splitlines() if s.startswith("next: python sample.py ")]
    return shlex.split(line[len("next: python sample.py "):])


@pytest.mark.parametrize("flags, window_given", [([], True), (["--window=16"], False), (["--window=64"], True)])
def test_the_sample_command_bounds_a_cache_past_what_the_model_saw(data_dir, tmp_path, flags, window_given):
    """A global layer, or a local one wider than block_size (32 here, with a note), would see
    more history than in training: the next: line bounds the cache at block_size; local layers
    within it need no bound. The command runs."""
    code, out, err = run_in_process("train.py", *TINY, f"--dataset={data_dir}", f"--out_dir={tmp_path}",
                                    "--max_iters=2", *flags)
    assert code in (0, None), err
    args = sample_command(out)
    assert ("--kv_window=32" in args) == window_given, out
    assert ("is wider than --block_size=32" in out) == (flags == ["--window=64"]), out
    code, text, err = run_in_process("sample.py", *args, "--max_new_tokens=40", "--device=cpu")
    assert code in (0, None), err


def test_the_sample_command_of_a_quantization_aware_run_uses_its_format(data_dir, tmp_path):
    """Trained through int4 with per-token keys in groups of 8: the next: line samples through
    the same format (every token quantized: residual 0), and sample.py runs it."""
    code, out, err = run_in_process("train.py", *TINY, f"--dataset={data_dir}", f"--out_dir={tmp_path}",
                                    "--max_iters=2", "--kv_quant=int4", "--kv_quant_group=8", "--kv_quant_keys=token")
    assert code in (0, None), err
    args = sample_command(out)
    for flag in ("--kv_quant=int4", "--kv_quant_group=8", "--kv_quant_keys=token", "--kv_quant_residual=0"):
        assert flag in args, out
    code, text, err = run_in_process("sample.py", *args, "--max_new_tokens=40", "--device=cpu")
    assert code in (0, None) and "KV cache peak" in err, err


def test_settings_a_run_cannot_use_are_said_not_dropped_silently(data_dir, run_dir, tmp_path):
    """--backend outside torchrun and --overwrite on a resume change nothing: each gets a note,
    and the run trains as it would without them (the same weights)."""
    outs = {}
    for name, extra in (("plain", []), ("noted", ["--backend=gloo", "--overwrite=True"])):
        out = tmp_path / name
        shutil.copytree(run_dir, out)
        printed = train(data_dir, out, "--init_from=resume", "--max_iters=2", "--dropout=0.0", *extra)
        assert ("--backend=gloo is for runs under torchrun" in printed) == bool(extra), printed
        assert ("--overwrite=True applies to a run from scratch only" in printed) == bool(extra), printed
        assert f"resumed {out / 'ckpt.pt'} at iteration {N}" in printed
        outs[name] = read_checkpoint(str(out / "last.pt"))["model"]
    for k, v in outs["plain"].items():
        assert torch.equal(v, outs["noted"][k]), k


def test_a_setting_recorded_as_none_resumes_as_one_not_recorded(data_dir, run_dir, tmp_path):
    """Another program's checkpoint may record kv_quant or xl_mem as None: the resume goes on as
    with the keys absent (the same weights), not with a TypeError."""
    from resume import OBJECTIVE_KEYS
    weights = []
    for name, edit in (("absent", lambda cfg, k: cfg.pop(k, None)), ("none", lambda cfg, k: cfg.__setitem__(k, None))):
        out = tmp_path / name
        shutil.copytree(run_dir, out)
        ckpt = read_checkpoint(str(out / "ckpt.pt"))
        for k in OBJECTIVE_KEYS:
            edit(ckpt["config"], k)
        resave(ckpt, out / "ckpt.pt")
        train(data_dir, out, "--init_from=resume", "--max_iters=2", "--dropout=0.0")
        weights.append(read_checkpoint(str(out / "last.pt"))["model"])
    for k, v in weights[0].items():
        assert torch.equal(v, weights[1][k]), k


@pytest.mark.parametrize("origin,end_iter,interval", [(0, 300, 100), (0, 250, 100), (60, 310, 50), (0, 7, 1), (5, 9, 20)])
def test_evaluations_left_counts_what_the_loop_will_run(origin, end_iter, interval):
    """The ETA's count of evaluations to come equals the evaluations train.py's loop runs after
    each iteration (every eval_interval from origin, and one at end_iter)."""
    from steps import evaluations_left
    runs = [it for it in range(origin + 1, end_iter + 1) if (it - origin) % interval == 0 or it == end_iter]
    for it in range(origin, end_iter + 1):
        assert evaluations_left(it, origin, end_iter, interval) == len([r for r in runs if r > it]), it


def test_a_checkpoint_name_taken_by_a_folder_is_refused_before_training(data_dir, run_dir, tmp_path):
    """last.pt a folder: the resume would train, then fail to write it (and say the disk is full)."""
    out = tmp_path / "out"
    shutil.copytree(run_dir, out)
    (out / "last.pt").unlink()
    (out / "last.pt").mkdir()
    before = (out / "ckpt.pt").read_bytes()
    code, printed, err = run_in_process("train.py", *TINY, f"--dataset={data_dir}", f"--out_dir={out}",
                                        "--init_from=resume", f"--max_iters={N + 2}")
    assert code == 2 and f"{out / 'last.pt'} is a folder, where this run writes its checkpoint file" in err, err
    assert "train loss" not in printed and (out / "ckpt.pt").read_bytes() == before


def test_nan_in_the_optimizer_state_is_said_at_the_start(data_dir, run_dir, tmp_path):
    """Finite weights but a nan AdamW moment: the first step would make the weights nan and the
    divergence message would blame the learning rate; the resume says what is wrong first."""
    out = tmp_path / "out"
    shutil.copytree(run_dir, out)
    ckpt = read_checkpoint(str(out / "last.pt"))
    state = ckpt["optimizer"]["state"]
    state[next(iter(state))]["exp_avg_sq"].fill_(float("nan"))
    resave(ckpt, out / "last.pt")
    code, printed, err = run_in_process("train.py", *TINY, f"--dataset={data_dir}", f"--out_dir={out}",
                                        "--init_from=resume", "--resume_checkpoint_name=last", f"--max_iters={N + 2}")
    assert code == 2 and "the checkpoint's optimizer state holds nan or inf" in err, err
    assert "train loss" not in printed


def test_percent_done_reaches_100_only_at_the_end():
    from steps import percent_done
    assert percent_done(5010, 0, 5020) == 99 and percent_done(5020, 0, 5020) == 100  # (a continued run's last logs)
    assert percent_done(5005, 5000, 5020) == 25 and percent_done(0, 0, 3) == 0 and percent_done(2, 0, 3) == 66


def test_a_finished_run_resumed_as_it_was_is_evaluated_without_claiming_out_dir(data_dir, run_dir, tmp_path):
    """The same command again on a finished run only evaluates it: like --max_iters=0 it writes
    nothing, so what would stop a run that writes (here a folder named last.pt) does not stop it."""
    out = tmp_path / "out"
    shutil.copytree(run_dir, out)
    (out / "last.pt").unlink()
    (out / "last.pt").mkdir()
    printed = train(data_dir, out, "--init_from=resume", f"--max_iters={N}")
    assert "the checkpoint's run is finished" in printed and f"iter {N}: train loss" in printed, printed
