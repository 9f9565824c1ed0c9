"""
train.py end to end on tiny models (CPU): checkpoints and TensorBoard events, both resume
intents, eval-only runs that write nothing, one-line errors, and bfloat16 autocast against
float32. The first run is a real subprocess; the others run train.py inside the test
process (conftest.train), which saves importing torch again each time.

    python -m pytest -q tests/test_train.py
"""
import contextlib
import io
import math
import os
import re
import shutil

import pytest
import torch

from checkpoint import read_checkpoint
from conftest import TINY, assert_user_error, run_in_process, run_script, train
from model import GPT, MODEL_ARG_KEYS, GPTConfig

N = 6  # iterations of the shared run


@pytest.fixture(scope="module")
def base_run(data_dir, tmp_path_factory):
    """One fresh run of N iterations; tests copy its out_dir before changing anything."""
    out = tmp_path_factory.mktemp("base") / "out"
    proc = run_script("train.py", *TINY, f"--dataset={data_dir}", f"--out_dir={out}", f"--max_iters={N}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout


def copy_of(base_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(base_run[0], out)
    return out


def snapshot(folder):
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_fresh_run_writes_checkpoints_and_tensorboard(base_run):
    out, printed = base_run
    ckpt = read_checkpoint(str(out / "ckpt.pt"))  # weights_only: plain values only
    last = read_checkpoint(str(out / "last.pt"))
    for key in ("model", "optimizer", "model_args", "config", "iter_num", "best_val_loss",
                "scaler", "rng", "loader"):
        assert key in last, key
    assert set(last["model_args"]) == set(MODEL_ARG_KEYS)
    assert last["config"]["n_embd"] == 32 and last["config"]["max_iters"] == N
    # exactly N optimizer steps, evaluations at 0, every eval_interval and at the end
    assert last["iter_num"] == N
    assert all(s["step"] == N for s in last["optimizer"]["state"].values())
    evals = [line.split(":")[0] for line in printed.splitlines() if "train loss" in line]
    assert evals == ["iter 0", "iter 4", "iter 6"]
    # the header numbers the iterations as the log lines count them: the last is "iter N"
    logged = [int(line.split(":")[0][5:]) for line in printed.splitlines() if line.startswith("iter ") and "lr " in line]
    assert f"training iterations 1..{N}," in printed and logged[-1] == N
    assert ckpt["best_val_loss"] == last["best_val_loss"] < 6.0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out)).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "val/loss", "lr", "train/instant_loss", "tokens_per_s"} <= tags
    assert [e.step for e in events.Scalars("val/loss")] == [0, 4, 6]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_resume_continue_is_bit_exact(data_dir, tmp_path, dropout):
    """N iterations, then a resume up to N+M, equals N+M iterations in one go. (All in this
    process: another thread count would change float rounding.) Dropout > 0 also needs the
    global RNG restored."""
    split = tmp_path / "split"
    train(data_dir, split, f"--max_iters={N}", f"--dropout={dropout}")
    printed = train(data_dir, split, f"--max_iters={N + 3}", "--init_from=resume",
                 "--resume_checkpoint_name=last", f"--dropout={dropout}")
    assert "chose 'continue'" in printed and "goes on with" not in printed
    whole = tmp_path / "whole"
    train(data_dir, whole, f"--max_iters={N + 3}", f"--dropout={dropout}")

    a, b = read_checkpoint(str(split / "last.pt")), read_checkpoint(str(whole / "last.pt"))
    assert a["iter_num"] == b["iter_num"] == N + 3
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, state in b["optimizer"]["state"].items():
        assert torch.equal(a["optimizer"]["state"][i]["exp_avg_sq"], state["exp_avg_sq"])
    assert torch.equal(a["loader"]["pos"], b["loader"]["pos"])


def test_a_continued_run_with_other_settings_says_which_and_how_to_keep_them(data_dir, tmp_path):
    """The first run's --learning_rate and --batch_size not given again: the resume trains with
    the defaults (the command line wins, as in nanoGPT) and says so, with the flags that give
    the same run as an uninterrupted one; passing them gives exactly that run."""
    first = ["--learning_rate=5e-4", "--batch_size=3"]
    train(data_dir, tmp_path / "split", f"--max_iters={N}", *first)
    printed = train(data_dir, tmp_path / "other", f"--max_iters={N}", *first)  # (a copy to resume twice)
    printed = train(data_dir, tmp_path / "other", f"--max_iters={N + 2}", "--init_from=resume",
                    "--resume_checkpoint_name=last")
    note = [line for line in printed.splitlines() if "goes on with" in line]
    assert note and "learning_rate=" in note[0] and "batch_size=" in note[0], printed
    again = note[0].split("pass ")[1].split()
    assert sorted(again) == sorted(["--learning_rate=0.0005", "--batch_size=3"]), note
    printed = train(data_dir, tmp_path / "split", f"--max_iters={N + 2}", "--init_from=resume",
                    "--resume_checkpoint_name=last", *again)
    assert "goes on with" not in printed
    train(data_dir, tmp_path / "whole", f"--max_iters={N + 2}", *first)
    a, b = read_checkpoint(str(tmp_path / "split" / "last.pt")), read_checkpoint(str(tmp_path / "whole" / "last.pt"))
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_a_continued_run_not_given_dropout_keeps_the_checkpoints_and_says_nothing_of_it(data_dir, tmp_path):
    """dropout not given on the resume: the model keeps the checkpoint's 0.1 (train.py's default
    of 0.2 is not applied), so the note must not claim the run goes on with 0.2."""
    base = [a for a in TINY if not a.startswith("--dropout=")] + [f"--dataset={data_dir}", f"--out_dir={tmp_path}",
                                                                   "--threads=1", "--tensorboard=False"]
    assert run_in_process("train.py", *base, f"--max_iters={N}", "--dropout=0.1")[0] in (0, None)
    code, out, err = run_in_process("train.py", *base, f"--max_iters={N + 2}", "--init_from=resume",
                                    "--resume_checkpoint_name=last")
    assert code in (0, None), err
    assert "dropout" not in "".join(line for line in out.splitlines() if "goes on with" in line), out
    assert read_checkpoint(str(tmp_path / "last.pt"))["model_args"]["dropout"] == 0.1


@pytest.mark.parametrize("objective", ["--xl_mem=16", "--kv_quant=int8"])
def test_a_resume_keeps_the_xl_memory_and_qat_it_was_trained_with(data_dir, tmp_path, objective):
    """The resume command names neither --xl_mem nor --kv_quant: the run goes on with the
    checkpoint's, bit for bit as the uninterrupted run; given again with another value, that wins,
    and a note says the run goes on with another objective than its checkpoint's run."""
    name, value = objective[2:].split("=")
    split, whole = tmp_path / "split", tmp_path / "whole"
    train(data_dir, split, f"--max_iters={N}", objective)
    printed = train(data_dir, split, f"--max_iters={N + 3}", "--init_from=resume", "--resume_checkpoint_name=last")
    assert re.search(rf"note: {name}='?{value}'? from the checkpoint, as it was trained", printed)
    assert ("XL memory restored: the rows go on" in printed) == (name == "xl_mem"), printed  # (said, and true below)
    train(data_dir, whole, f"--max_iters={N + 3}", objective)
    a, b = read_checkpoint(str(split / "last.pt")), read_checkpoint(str(whole / "last.pt"))
    assert a["config"][name] == b["config"][name] != 0
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    off = "0" if name == "xl_mem" else "none"
    shutil.copytree(split, tmp_path / "by_file")
    config_file = tmp_path / "off.py"  # a config file that restates the default gives it too
    config_file.write_text(f"{name} = {off if name == 'xl_mem' else repr(off)}\n")
    for folder, how in ((split, f"--{name}={off}"), (tmp_path / "by_file", str(config_file))):
        printed = train(data_dir, folder, f"--max_iters={N + 5}", "--init_from=resume",
                        "--resume_checkpoint_name=last", how)
        assert "from the checkpoint" not in printed
        note = [line for line in printed.splitlines() if "goes on with" in line]  # another objective: said
        assert note and f"{name}=" in note[0] and objective in note[0], printed
        assert str(read_checkpoint(str(folder / "last.pt"))["config"][name]) == off


def test_a_decay_past_the_run_is_said_with_the_last_learning_rate(data_dir, tmp_path):
    """TINY decays over 20 iterations: a run of 8 ends above min_lr, and the note gives the
    rate its last iteration used (the optimizer's, in last.pt), and the rate the flags it
    proposes end at (a run with them)."""
    def last_lr(folder):
        return read_checkpoint(str(folder / "last.pt"))["optimizer"]["param_groups"][0]["lr"]

    for run, given, proposed in ((8, [], ["--lr_decay_iters=8"]),
                                 (20, ["--warmup_iters=20"], ["--lr_decay_iters=20", "--warmup_iters=2"])):
        printed = train(data_dir, tmp_path / f"o{run}", f"--max_iters={run}", *given)
        line = printed.split(f"note: this run's {run} iterations end at learning rate ")[1].splitlines()[0]
        assert line.startswith(f"{last_lr(tmp_path / f'o{run}'):.2e}, not min_lr")
        assert line.split("; with ")[1].startswith(" ".join(proposed) + " it ends at ")
        printed = train(data_dir, tmp_path / f"p{run}", f"--max_iters={run}", *given, *proposed)
        assert line.endswith(f" it ends at {last_lr(tmp_path / f'p{run}'):.2e}") and "note: this run's" not in printed
    # a decay that ends before the warm-up: no cosine at all, said with the flag that gives one
    printed = train(data_dir, tmp_path / "cliff", "--max_iters=8", "--warmup_iters=4", "--lr_decay_iters=3",
                    "--min_lr=2e-4")
    assert "note: lr_decay_iters=3 ends before warm-up does" in printed and last_lr(tmp_path / "cliff") == 2e-4
    assert printed.split("note: lr_decay_iters=3")[1].splitlines()[0].endswith("--lr_decay_iters=8 decays it over the run")
    # a run continued on that schedule keeps it: no advice to change it mid-way
    printed = train(data_dir, tmp_path / "cliff", "--max_iters=12", "--init_from=resume", "--resume_checkpoint_name=last",
                    "--warmup_iters=4", "--lr_decay_iters=3", "--min_lr=2e-4")
    assert "chose 'continue'" in printed and "ends before warm-up does" not in printed, printed
    # two iterations cannot both warm up and decay: no flags are proposed
    printed = train(data_dir, tmp_path / "two", "--max_iters=2", "--lr_decay_iters=2")
    assert "note: this run's 2 iterations end at" in printed and "; with " not in printed
    # a run continued from iteration 8 to 12 still follows one schedule from iteration 0:
    # the note speaks of the schedule's 12 iterations, not of "this run's"
    printed = train(data_dir, tmp_path / "o8", "--max_iters=12", "--init_from=resume")
    line = printed.split("note: the schedule's 12 iterations (1..12, this run resuming after 8) end at learning rate ")[1]
    assert line.startswith(f"{last_lr(tmp_path / 'o8'):.2e}, not min_lr")


def test_a_run_that_cannot_fit_in_memory_is_one_line_before_it_trains(data_dir, tmp_path, monkeypatch, capsys):
    """The fixed eval batches and one micro-batch's logits and activations, against the memory
    free (patched): TINY needs about 0.5 MiB, so 256 KiB refuses it in one line naming the
    settings to lower, before any iteration or file; 4 MiB lets it run."""
    import devices
    monkeypatch.setattr(devices, "memory_available", lambda dev: 2 ** 18)
    with pytest.raises(SystemExit) as e:
        train(data_dir, tmp_path / "o", "--max_iters=2")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and re.fullmatch(
        r"error: batch_size=4 x block_size=32 \(and eval_iters=2 fixed batches a split\) need at least 0\.\d MiB "
        r"on cpu, and 0\.2 MiB is free: lower --batch_size .*--block_size or --eval_iters", err[0]), err
    assert not (tmp_path / "o" / "last.pt").exists()
    monkeypatch.setattr(devices, "memory_available", lambda dev: 2 ** 22)
    assert "done: 2 iterations" in train(data_dir, tmp_path / "o", "--max_iters=2")


def test_a_run_continued_past_its_decay_says_it_trains_at_min_lr(data_dir, tmp_path):
    """TINY decays over 20 iterations: a finished run of 20 continued to 24 trains every
    iteration at min_lr (as its last.pt's optimizer shows), and the note says so with the
    fine-tune that would warm up and decay again (which does not end at min_lr after 4)."""
    def last_lr(folder):
        return read_checkpoint(str(folder / "last.pt"))["optimizer"]["param_groups"][0]["lr"]

    out = tmp_path / "o"
    assert "trains at it" not in train(data_dir, out, "--max_iters=20", "--lr_decay_iters=20")
    printed = train(data_dir, out, "--max_iters=24", "--init_from=resume", "--resume_checkpoint_name=last")
    assert "chose 'continue'" in printed and "note: the schedule reached min_lr=0.0001 at iteration 20: every " \
        "iteration of this continued run trains at it; --resume_mode=finetune --max_iters=4 trains as many" in printed
    assert last_lr(out) == 1e-4
    printed = train(data_dir, out, "--max_iters=4", "--init_from=resume", "--resume_checkpoint_name=last",
                    "--resume_mode=finetune", "--lr_decay_iters=8")
    assert "trains at it" not in printed and last_lr(out) > 1e-4


def test_the_next_command_of_a_linear_model_has_no_window(data_dir, tmp_path):
    """A fixed-size state does not drift past block_size, and sample.py refuses a kv_window for it."""
    printed = train(data_dir, tmp_path / "o", "--max_iters=2", "--attention=linear")
    assert printed.strip().splitlines()[-1] == f"next: python sample.py --out_dir={tmp_path / 'o'}"


def test_the_next_command_pastes_into_a_shell_with_a_space_in_the_path(data_dir, tmp_path):
    import shlex
    out = tmp_path / "my run"
    printed = train(data_dir, out, "--max_iters=2", "--attention=linear")
    line = printed.strip().splitlines()[-1]
    assert line.startswith("next: ") and shlex.split(line[len("next: "):]) == ["python", "sample.py", f"--out_dir={out}"]


def test_the_next_command_names_a_plugin_attention(data_dir, tmp_path):
    """sample.py runs a plug-in only when named on its command line: the printed command does."""
    printed = train(data_dir, tmp_path / "o", "--max_iters=2", "--attention=attention_linear:linear_attention")
    assert printed.strip().splitlines()[-1] == (f"next: python sample.py --out_dir={tmp_path / 'o'} --kv_window=32 "
                                                "--attention=attention_linear:linear_attention")


@contextlib.contextmanager
def signal_in_the_loop(monkeypatch, signum, batch):
    """Within: the training loop's batch-th batch sends signum to this process, which holds
    Python's default handler for it, as a terminal starts it (pytest started in the background
    of a script inherits Ctrl-C ignored). Batches count once the training loop's handler
    (utils.StopAfterStep) is installed."""
    import signal
    import loader
    import utils
    start = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
    real_next, calls = loader.ByteLoader.next, {"n": 0}

    def next_with_signal(self):
        in_loop = isinstance(getattr(signal.getsignal(signum), "__self__", None), utils.StopAfterStep)
        calls["n"] += in_loop
        if calls["n"] == batch:
            os.kill(os.getpid(), signum)
        return real_next(self)

    monkeypatch.setattr(loader.ByteLoader, "next", next_with_signal)
    previous = signal.signal(signum, start)
    try:
        yield
    finally:
        signal.signal(signum, previous)
        monkeypatch.undo()


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_ctrl_c_writes_last_pt_and_the_resume_is_bit_exact(data_dir, tmp_path, monkeypatch, signame):
    """Ctrl-C (or SIGTERM, as `kill` or a job scheduler sends it) in iteration 3 (between log
    steps): the run stops after that iteration with last.pt written and the command to go on,
    exit 128 + the signal; going on equals the uninterrupted run."""
    import signal
    signum = getattr(signal, signame)
    split = tmp_path / "split"
    printed = io.StringIO()
    with signal_in_the_loop(monkeypatch, signum, 3), pytest.raises(SystemExit) as e, \
            contextlib.redirect_stderr(printed):
        train(data_dir, split, f"--max_iters={N + 3}")
    assert e.value.code == 128 + signum
    said = "Ctrl-C" if signame == "SIGINT" else "SIGTERM"
    assert f"{said}: stopping after this iteration and writing last.pt" in printed.getvalue()
    assert read_checkpoint(str(split / "last.pt"))["iter_num"] == 3
    printed = train(data_dir, split, f"--max_iters={N + 3}", "--init_from=resume", "--resume_checkpoint_name=last")
    assert "chose 'continue'" in printed
    whole = tmp_path / "whole"
    train(data_dir, whole, f"--max_iters={N + 3}")
    a, b = read_checkpoint(str(split / "last.pt")), read_checkpoint(str(whole / "last.pt"))
    assert a["iter_num"] == b["iter_num"] == N + 3
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_an_interrupted_fine_tune_gives_the_command_for_the_iterations_left(data_dir, tmp_path, monkeypatch):
    """Ctrl-C in a fine-tune at a longer context (iteration 3 of 6): the line is a whole
    command, the run's own flags kept (its block_size) and max_iters the iterations left; run
    as printed, it trains those on the fine-tuned model and ends where the fine-tune would."""
    import shlex
    import signal
    train(data_dir, tmp_path, f"--max_iters={N}")
    tune = ["--init_from=resume", "--resume_mode=finetune", "--max_iters=6", "--block_size=48"]
    with signal_in_the_loop(monkeypatch, signal.SIGINT, 3):
        code, out, err = run_in_process("train.py", *TINY, f"--dataset={data_dir}", f"--out_dir={tmp_path}", *tune)
    assert code == 130, out + err
    line = [s for s in out.splitlines() if s.startswith("interrupted with")][0]
    assert f"interrupted with {N + 3} iterations done;" in line and "the 3 iterations left" in line, line
    command = shlex.split(line.split("on a fresh schedule of their own: python train.py ")[1])
    assert "--block_size=48" in command and command.count("--max_iters=3") == 1 and "--max_iters=6" not in command
    code, out, err = run_in_process("train.py", *command)
    assert code in (0, None) and "block_size" not in err, out + err
    saved = read_checkpoint(str(tmp_path / "last.pt"))
    assert saved["iter_num"] == N + 6 and saved["config"]["block_size"] == 48


def test_a_second_ctrl_c_stops_at_once_and_says_how_to_go_on(data_dir, tmp_path, monkeypatch):
    """Ctrl-C twice within one iteration: the run stops at once (exit 130), saying which
    iteration last.pt holds. Where this run wrote it (its log steps write it: iteration 8 of a
    resume from 6), the line gives the command that goes on, and that command resumes from
    there; where it holds the earlier run's iteration, no command (it would not go on from
    this run)."""
    import shlex
    import signal
    import loader
    import utils
    train(data_dir, tmp_path, f"--max_iters={N}")
    more = ["--init_from=resume", "--resume_checkpoint_name=last", f"--max_iters={N + 6}", "--last_save_budget=1.0"]

    def stopped_at_once(batch):
        """The line a resume stopped by two Ctrl-C in its batch-th batch prints."""
        real_next, calls = loader.ByteLoader.next, {"n": 0}

        def next_with_two_signals(self):
            calls["n"] += isinstance(getattr(signal.getsignal(signal.SIGINT), "__self__", None), utils.StopAfterStep)
            if calls["n"] == batch:  # the second before the iteration the first asked to end has ended
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
            return real_next(self)

        monkeypatch.setattr(loader.ByteLoader, "next", next_with_two_signals)
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            code, out, err = run_in_process("train.py", *TINY, f"--dataset={data_dir}", f"--out_dir={tmp_path}", *more)
        finally:
            signal.signal(signal.SIGINT, previous)
            monkeypatch.undo()
        line = [s for s in out.splitlines() if "stopped at once" in s]
        assert code == 130 and line, out + err
        return line[0]

    line = stopped_at_once(1)  # in the resume's first iteration: last.pt is still the first run's
    assert line.endswith(f"last.pt holds iteration {N} (an earlier run's: this one did not write it)"), line
    line = stopped_at_once(4)  # iteration 8 was logged, and last.pt written with it
    held = read_checkpoint(str(tmp_path / "last.pt"))["iter_num"]
    assert held > N and f"last.pt holds iteration {held}. To go on from it: python train.py " in line
    assert line.endswith("--init_from=resume --resume_checkpoint_name=last") and f"--max_iters={N + 6}" in line
    assert line.count("--init_from=") == 1
    code, out, err = run_in_process("train.py", *shlex.split(line.split("To go on from it: python train.py ")[1]))
    assert code == 0 and f"last.pt at iteration {held}," in out + err, out + err
    assert read_checkpoint(str(tmp_path / "last.pt"))["iter_num"] == N + 6


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_before_the_loop_stops_at_once_and_cleans_up(data_dir, tmp_path, monkeypatch, signame):
    """Ctrl-C or SIGTERM during start-up (here: while out_dir's space is checked, the lock
    held): the run stops at once saying so, exit 128 + the signal, and leaves no train.lock;
    the handler it set for SIGTERM is gone afterwards."""
    import signal
    import outdir
    signum = getattr(signal, signame)
    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(outdir, "check_space", lambda *a, **kw: os.kill(os.getpid(), signum))
    with pytest.raises(SystemExit) as e:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            train(data_dir, tmp_path, f"--max_iters={N}")
    assert e.value.code == 128 + signum
    assert os.listdir(tmp_path) == [] and signal.getsignal(signal.SIGTERM) is before


def test_ctrl_c_at_the_start_of_an_overwriting_run_offers_nothing_of_the_old_run(data_dir, tmp_path, monkeypatch):
    """A fresh run with --overwrite=True stopped during start-up: the earlier run's last.pt is
    still there, untouched, and the line says it is not this run's (no command that would
    fine-tune the old model)."""
    import signal
    import outdir
    train(data_dir, tmp_path, f"--max_iters={N}")
    before = (tmp_path / "last.pt").read_bytes()
    monkeypatch.setattr(outdir, "check_space", lambda *a, **kw: os.kill(os.getpid(), signal.SIGINT))
    code, out, err = run_in_process("train.py", *TINY, f"--dataset={data_dir}", f"--out_dir={tmp_path}",
                                    "--max_iters=2", "--overwrite=True")
    line = [s for s in out.splitlines() if "stopped at once" in s]
    assert code == 130 and line, out + err
    assert line[0].endswith(f"last.pt holds iteration {N} (an earlier run's: this one did not write it)"), line
    assert (tmp_path / "last.pt").read_bytes() == before


def test_a_refused_run_leaves_no_folder_it_made(data_dir, tmp_path):
    """A run refused after it made its out_dir (here: float16 on a CPU) removes it again; a
    folder that was there before stays."""
    with pytest.raises(SystemExit):
        train(data_dir, tmp_path / "new" / "sub", f"--max_iters={N}", "--dtype=float16")
    assert not (tmp_path / "new").exists()  # (the parent it made too)
    with pytest.raises(SystemExit):
        train(data_dir, tmp_path, f"--max_iters={N}", "--dtype=float16")
    assert tmp_path.is_dir() and os.listdir(tmp_path) == []


def test_a_signal_in_the_last_iteration_lets_the_run_finish(data_dir, tmp_path, monkeypatch):
    """SIGTERM while the last iteration runs: nothing is left to stop, so the run ends as
    planned (its summary, exit 0), not as an interrupted one."""
    import signal
    with signal_in_the_loop(monkeypatch, signal.SIGTERM, N):
        printed = train(data_dir, tmp_path / "o", f"--max_iters={N}")
    assert "done: " in printed and "interrupted" not in printed
    assert read_checkpoint(str(tmp_path / "o" / "last.pt"))["iter_num"] == N


def test_a_run_started_with_ctrl_c_ignored_keeps_ignoring_it(data_dir, tmp_path, monkeypatch):
    """`nohup python train.py ... &`: the launcher chose to ignore SIGINT, so a SIGINT in the
    training loop changes nothing and the run ends as planned."""
    import signal
    import loader
    real_next = loader.ByteLoader.next

    def next_with_ctrl_c(self):
        os.kill(os.getpid(), signal.SIGINT)
        return real_next(self)

    monkeypatch.setattr(loader.ByteLoader, "next", next_with_ctrl_c)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        printed = train(data_dir, tmp_path / "o", f"--max_iters={N}")
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # and left as it was
    finally:
        signal.signal(signal.SIGINT, previous)
    assert "interrupted" not in printed and "done: " in printed
    assert read_checkpoint(str(tmp_path / "o" / "last.pt"))["iter_num"] == N


def test_a_resume_takes_a_model_setting_given_at_its_default(data_dir, tmp_path):
    """A naive-attention run resumed with --attention=softmax (train.py's default, given on
    the command line) trains softmax attention from then on: a value given is never dropped
    for being the default."""
    train(data_dir, tmp_path, "--max_iters=2", "--attention=naive")
    train(data_dir, tmp_path, "--max_iters=4", "--init_from=resume", "--resume_checkpoint_name=last",
          "--attention=softmax")
    assert read_checkpoint(str(tmp_path / "last.pt"))["model_args"]["attention"] == "softmax"


def test_a_resume_trains_with_the_optimizer_settings_it_is_given(data_dir, base_run, tmp_path):
    """The moments come from the checkpoint, the hyperparameters from the resume's command line
    (restore_training_state): the AdamW groups in the new last.pt hold the --weight_decay and
    --beta2 given (the base run's were 0.1 and 0.99), the no-decay group still none."""
    out = copy_of(base_run, tmp_path)
    first = read_checkpoint(str(out / "last.pt"))["optimizer"]["param_groups"]
    assert first[0]["weight_decay"] != 0.05 and tuple(first[0]["betas"]) != (0.9, 0.9)
    train(data_dir, out, "--init_from=resume", "--resume_checkpoint_name=last", f"--max_iters={N + 1}",
          "--weight_decay=0.05", "--beta2=0.9")
    groups = read_checkpoint(str(out / "last.pt"))["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert all(tuple(g["betas"]) == (0.9, 0.9) for g in groups)


def test_a_checkpoint_without_optimizer_resumes_and_says_why(data_dir, base_run, tmp_path):
    """A file shared without its optimizer (and its checksums, as the corrupt-file error
    says): the resume starts AdamW afresh and says the checkpoint held none."""
    out = copy_of(base_run, tmp_path)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    del ckpt["optimizer"], ckpt["crc32"]
    torch.save(ckpt, out / "last.pt")
    printed = train(data_dir, out, "--init_from=resume", "--resume_checkpoint_name=last", "--max_iters=2")
    assert "optimizer state not restored (the checkpoint holds none)" in printed, printed


def test_a_finetune_all_warm_up_says_so(data_dir, base_run, tmp_path):
    """--warmup_iters as long as the fine-tune: the schedule note does not promise a cosine
    the run never reaches, and agrees with the note on the final learning rate."""
    out = copy_of(base_run, tmp_path)
    tiny = [a for a in TINY if not a.startswith(("--warmup_iters=", "--lr_decay_iters="))]
    code, printed, err = run_in_process("train.py", *tiny, f"--dataset={data_dir}", f"--out_dir={out}", "--threads=1",
                                        "--init_from=resume", "--resume_checkpoint_name=last", "--resume_mode=finetune",
                                        "--max_iters=4", "--warmup_iters=4")
    assert code in (0, None), err
    assert "warm-up 4, no cosine" in printed and "cosine to min_lr at its end" not in printed, printed
    assert "end at learning rate" in printed


def test_the_tutorials_resume_of_a_finished_run_only_evaluates_it(data_dir, base_run, tmp_path):
    """nanoGPT's loop stops at max_iters: resuming a run that reached its own max_iters with the
    same command evaluates it and trains nothing (it started a whole second run at the peak
    rate); another max_iters still fine-tunes that many more."""
    out = copy_of(base_run, tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix == ".pt"}
    printed = train(data_dir, out, "--init_from=resume", "--resume_checkpoint_name=ckpt.pt", f"--max_iters={N}")
    assert "the checkpoint's run is finished" in printed and "--resume_mode=finetune --max_iters=K" in printed
    assert [line.split(":")[0] for line in printed.splitlines() if "val loss" in line and line.startswith("iter")] \
        == [f"iter {N}"], printed
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.suffix == ".pt"} == before
    printed = train(data_dir, out, "--init_from=resume", "--max_iters=2")
    assert "chose 'finetune'" in printed and read_checkpoint(str(out / "last.pt"))["iter_num"] == N + 2


def test_resume_finetune_runs_exactly_k_more_iterations(data_dir, base_run, tmp_path):
    out = copy_of(base_run, tmp_path)
    printed = train(data_dir, out, "--init_from=resume", "--resume_checkpoint_name=last.pt",
                 "--block_size=64", "--max_iters=3", "--n_layer=3")
    assert "chose 'finetune'" in printed
    assert "n_layer=2 from the checkpoint" in printed  # the architecture is the checkpoint's
    last = read_checkpoint(str(out / "last.pt"))
    assert last["iter_num"] == N + 3
    assert last["model_args"]["n_layer"] == 2 and last["config"]["block_size"] == 64
    # the optimizer state was kept (same shapes): its step count goes on from the checkpoint
    assert all(s["step"] == N + 3 for s in last["optimizer"]["state"].values())
    # a fresh schedule: evaluated at its start, then at its end
    evals = [line.split(":")[0] for line in printed.splitlines() if "train loss" in line]
    assert evals == [f"iter {N}", f"iter {N + 3}"]


def test_a_finetune_schedule_fits_its_iterations_unless_flags_set_it(data_dir, base_run, tmp_path):
    """A config file's warm-up and lr_decay_iters are for the run from scratch: a fine-tune of
    K iterations warms up for K/10 and reaches min_lr at its end; a flag keeps its value."""
    recipe = tmp_path / "recipe.py"
    recipe.write_text("warmup_iters = 100\nlr_decay_iters = 5000\nlearning_rate = 1e-3\nmin_lr = 1e-4\n")
    tiny = [a for a in TINY if not a.startswith(("--warmup_iters=", "--lr_decay_iters="))]
    K = 10
    for flags, warmup in (([], 1), (["--warmup_iters=3"], 3)):
        out = tmp_path / f"out{warmup}"
        shutil.copytree(base_run[0], out)
        proc = run_script("train.py", recipe, *tiny, f"--dataset={data_dir}", f"--out_dir={out}", "--init_from=resume",
                          "--resume_checkpoint_name=last", "--resume_mode=finetune", f"--max_iters={K}", *flags)
        assert proc.returncode == 0, proc.stderr
        assert f"schedule fits its {K} iterations: warm-up {warmup}," in proc.stdout
        last = read_checkpoint(str(out / "last.pt"))
        assert (last["config"]["warmup_iters"], last["config"]["lr_decay_iters"]) == (warmup, K)
        progress = (K - 1 - warmup) / (K - warmup)  # the fine-tune's last iteration, K - 1 of its schedule
        lr = 1e-4 + 0.5 * (1 + math.cos(math.pi * progress)) * (1e-3 - 1e-4)
        assert last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(lr, rel=1e-9)
    # a warm-up longer than the fine-tune: the note gives the rate its last iteration reaches
    out = tmp_path / "long_warmup"
    shutil.copytree(base_run[0], out)
    code, printed, err = run_in_process("train.py", *tiny, f"--dataset={data_dir}", f"--out_dir={out}", "--init_from=resume",
                                        "--resume_checkpoint_name=last", "--resume_mode=finetune", "--max_iters=2",
                                        "--warmup_iters=12")
    assert code in (0, None), err
    lr = read_checkpoint(str(out / "last.pt"))["optimizer"]["param_groups"][0]["lr"]
    assert f"no cosine: the warm-up takes them all, the rate climbing to {lr:.2e} (learning_rate=" in printed


def test_finetune_of_a_converted_model_writes_its_own_best(data_dir, base_run, tmp_path):
    """After a conversion (here MHA -> MQA) the checkpoint's best val loss is another model's:
    ckpt.pt must end up holding the converted model, not stay the old one."""
    out = copy_of(base_run, tmp_path)
    before = read_checkpoint(str(out / "ckpt.pt"))
    old_best = before["best_val_loss"]
    printed = train(data_dir, out, "--init_from=resume", "--resume_checkpoint_name=last",
                    "--n_kv_head=1", "--max_iters=2", "--eval_interval=1")
    assert "n_kv_head 2 -> 1" in printed and "not comparable" in printed
    assert "converted: n_kv_head 2 -> 1" in printed
    best = read_checkpoint(str(out / "ckpt.pt"))
    assert best["model_args"]["n_kv_head"] == 1 and best["iter_num"] >= N
    # the best from before the change is kept, as it was, beside it
    kept = out / f"ckpt_{before['iter_num']}.pt"
    assert (f"{out / 'ckpt.pt'} (iteration {before['iter_num']}) is the best of another run (n_kv_head 2 -> 1); "
            f"this run keeps it as {kept}") in printed
    assert kept.read_bytes() == (base_run[0] / "ckpt.pt").read_bytes()
    vals = {int(m[1]): float(m[2]) for m in re.finditer(r"iter (\d+): train loss [\d.]+, val loss ([\d.]+)", printed)}
    assert best["best_val_loss"] == pytest.approx(min(vals.values()), abs=1e-4)  # (the converted start's included)
    # so it is when the converted run was cut short before it wrote a ckpt.pt of its own, and
    # its last.pt (the converted model, nothing changed against it) is resumed
    cut = copy_of(base_run, tmp_path / "cut")
    shutil.copyfile(out / "last.pt", cut / "last.pt")
    printed = train(data_dir, cut, "--init_from=resume", "--resume_checkpoint_name=last", "--resume_mode=finetune",
                    "--max_iters=2", "--eval_interval=1")
    assert "not comparable" not in printed and "is the best of another run (n_kv_head 2 -> 1)" in printed
    assert (cut / kept.name).read_bytes() == (base_run[0] / "ckpt.pt").read_bytes()
    assert read_checkpoint(str(cut / "ckpt.pt"))["model_args"]["n_kv_head"] == 1
    # an unchanged model keeps the best it had: a fine-tune that does not beat it leaves ckpt.pt alone
    again = copy_of(base_run, tmp_path / "again")
    printed = train(data_dir, again, "--init_from=resume", "--resume_checkpoint_name=last",
                    "--max_iters=1", "--learning_rate=0", "--decay_lr=False")
    assert "not comparable" not in printed
    assert read_checkpoint(str(again / "ckpt.pt"))["best_val_loss"] == old_best


def test_resume_from_the_tutorials_layout(data_dir, tmp_path):
    """A checkpoint with only model, optimizer, model_args and config (no iteration,
    RNG or data position) is trained further as a finished run."""
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, bias=False))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    args = {"n_layer": 2, "n_head": 2, "n_embd": 32, "bias": False, "dropout": 0.0}
    (tmp_path / "out").mkdir()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "model_args": args,
                "config": {"max_iters": 50, "block_size": 32}}, tmp_path / "out" / "ckpt.pt")
    printed = train(data_dir, tmp_path / "out", "--init_from=resume", "--max_iters=3", "--block_size=64")
    assert "chose 'finetune'" in printed
    assert read_checkpoint(str(tmp_path / "out" / "last.pt"))["iter_num"] == 53


def test_eval_only_and_zero_iterations_write_nothing(data_dir, base_run, tmp_path):
    out = copy_of(base_run, tmp_path)
    before = snapshot(out)
    printed = train(data_dir, out, "--init_from=resume", "--max_iters=0", "--eval_interval=1")
    assert f"iter {N}: train loss" in printed and "val loss" in printed
    printed = train(data_dir, out, "--init_from=resume", "--resume_checkpoint_name=last", "--eval_only=True")
    assert "val loss" in printed
    printed = train(data_dir, out, "--init_from=resume", "--eval_only=True", "--max_iters=5")  # (a fine-tune's size)
    assert "val loss" in printed and "schedule" not in printed, printed  # nothing is trained: no schedule to fit
    assert snapshot(out) == before
    fresh = tmp_path / "fresh"
    for flag in ("--eval_only=True", "--max_iters=0"):
        printed = train(data_dir, fresh, flag)
        assert "the new, untrained model is evaluated once; nothing is trained or written" in printed
        assert "iter 0: train loss" in printed and not fresh.exists()
    # in a folder that holds a checkpoint, the line says how to evaluate that one instead, and
    # the command it gives evaluates it
    printed = train(data_dir, out, "--max_iters=0")
    assert f"nothing is trained or written (to evaluate {out / 'ckpt.pt'} instead: --init_from=resume)" in printed
    assert snapshot(out) == before
    (out / "ckpt.pt").unlink()  # a run stopped before its first ckpt.pt: last.pt alone
    printed = train(data_dir, out, "--max_iters=0")
    how = printed.split(f"(to evaluate {out / 'last.pt'} instead: ")[1].split(")")[0]
    assert how == "--init_from=resume --resume_checkpoint_name=last", printed
    printed = train(data_dir, out, "--max_iters=0", *how.split())
    assert f"iter {N}: train loss" in printed


def test_user_errors_are_one_line(data_dir, tmp_path):
    proc = run_script("train.py", *TINY, f"--dataset={data_dir}", f"--out_dir={tmp_path}", "--init_from=resume")
    assert_user_error(proc, "ckpt.pt")
    proc = run_script("train.py", "--resume_mode=later", f"--dataset={data_dir}")
    assert_user_error(proc, "resume_mode")
    # options that would do nothing without the one they refine
    proc = run_script("train.py", *TINY, f"--dataset={data_dir}", f"--out_dir={tmp_path}", "--global_layers=1")
    assert_user_error(proc, "--window=N")
    proc = run_script("train.py", *TINY, f"--dataset={data_dir}", f"--out_dir={tmp_path}", "--linear_layers=0")
    assert_user_error(proc, "--attention=linear")
    for group in (0, -4):  # (-4 "divides" 32: refused for what it is)
        code, _, err = run_in_process("train.py", *TINY, f"--dataset={data_dir}", f"--out_dir={tmp_path}",
                                      "--kv_quant=int4", f"--kv_quant_group={group}")
        assert code == 2 and err.startswith("error: kv_quant_group must be an integer >= 1") and err.count("\n") == 1, err


def test_bf16_training_on_cpu_follows_the_float32_run(data_dir, tmp_path):
    """Same seed, same rows: the bfloat16 run's losses stay close to the float32 run's, and
    its checkpoint holds float32 weights like any other."""
    def losses(out):
        return [float(m) for m in re.findall(r"iter \d+: loss ([\d.]+)", out)]
    ref = train(data_dir, tmp_path / "fp32", "--max_iters=8")
    out = train(data_dir, tmp_path / "bf16", "--max_iters=8", "--dtype=bfloat16")
    assert "dtype bfloat16 (given)" in out
    a, b = losses(ref), losses(out)
    assert len(a) == len(b) >= 4 and a != b
    assert max(abs(x - y) for x, y in zip(a, b)) < 0.05, (a, b)
    sd = read_checkpoint(tmp_path / "bf16" / "ckpt.pt")["model"]
    assert all(t.dtype == torch.float32 for t in sd.values())


def test_a_relative_dataset_folder_is_recorded_for_any_directory(data_dir, tmp_path, monkeypatch):
    """--dataset=../corpus/ from one directory: the checkpoint names the folder itself, so
    eval_kv.py run from another directory reads the same text (not ../corpus/ from there)."""
    shutil.copytree(data_dir, tmp_path / "corpus")
    (tmp_path / "work").mkdir()
    (tmp_path / "else" / "where").mkdir(parents=True)  # (../corpus/ from here is no folder)
    monkeypatch.chdir(tmp_path / "work")
    train("../corpus/", tmp_path / "out", "--max_iters=2")
    saved = read_checkpoint(str(tmp_path / "out" / "ckpt.pt"))["config"]["dataset"]
    assert os.path.samefile(saved, tmp_path / "corpus") and os.path.isabs(saved)
    monkeypatch.chdir(tmp_path / "else" / "where")
    code, printed, err = run_in_process("eval_kv.py", f"--out_dir={tmp_path / 'out'}", "--n_streams=1",
                                        "--stream_len=64", "--device=cpu", "--threads=1")
    assert code in (0, None), err
    # a checkpoint of before, naming the folder relative to where it ran: resumed from there, the
    # new one names the folder itself
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    ckpt["config"]["dataset"] = "../corpus/"
    ckpt.pop("crc32", None)  # (edited: its checksums go, as the error for an edited file says)
    torch.save(ckpt, tmp_path / "out" / "ckpt.pt")
    monkeypatch.chdir(tmp_path / "work")
    code, printed, err = run_in_process("train.py", *TINY, f"--out_dir={tmp_path / 'out'}", "--init_from=resume",
                                        "--max_iters=4", "--threads=1")
    assert code in (0, None), err
    assert os.path.samefile(read_checkpoint(str(tmp_path / "out" / "last.pt"))["config"]["dataset"], tmp_path / "corpus")
    assert os.path.isabs(read_checkpoint(str(tmp_path / "out" / "last.pt"))["config"]["dataset"])


def test_the_architecture_note_says_whether_a_flag_or_the_default_disagrees(data_dir, base_run, tmp_path):
    """A resume takes n_layer, n_head, n_embd from the checkpoint: the note names what it
    overrules: a flag ("--n_layer says"), a config file ("the config says") or train.py's default."""
    out = copy_of(base_run, tmp_path)
    bare = [a for a in TINY if not a.startswith(("--n_layer=", "--n_head=", "--n_embd="))]
    code, printed, err = run_in_process("train.py", *bare, f"--dataset={data_dir}", f"--out_dir={out}", "--n_layer=3",
                                        "--init_from=resume", "--eval_only=True")
    assert code in (0, None), err
    assert "note: n_layer=2 from the checkpoint (--n_layer says 3)" in printed
    assert "note: n_head=2 from the checkpoint (train.py's default is 6)" in printed, printed
    (tmp_path / "deeper.py").write_text("n_layer = 3\n")
    code, printed, err = run_in_process("train.py", str(tmp_path / "deeper.py"), *bare, f"--dataset={data_dir}",
                                        f"--out_dir={out}", "--init_from=resume", "--eval_only=True")
    assert code in (0, None) and "note: n_layer=2 from the checkpoint (the config says 3)" in printed, err


def test_a_resume_goes_on_with_its_dataset_whatever_a_recipe_file_names(data_dir, tmp_path):
    """A recipe's config file names a dataset (the CPU recipe: shakespeare_char). Resuming a
    run trained on another text with it (the README's Czech command, then its resume command)
    goes on with the checkpoint's text, and says so; only --dataset switches."""
    from conftest import tiny_corpus, write_splits
    from loader import same_dataset
    other = tmp_path / "other"
    other.mkdir()
    write_splits(other, tiny_corpus(seed=5))
    recipe = tmp_path / "recipe.py"
    recipe.write_text(f"dataset = {str(other)!r}\n")
    out = tmp_path / "out"
    base = [str(recipe), *TINY, f"--out_dir={out}", "--threads=1", "--tensorboard=False"]
    dataset = lambda: read_checkpoint(str(out / "last.pt"))["config"]["dataset"]
    code, _, err = run_in_process("train.py", *base, f"--dataset={data_dir}", f"--max_iters={N}")
    assert code in (0, None) and same_dataset(dataset(), str(data_dir)), err
    resume = ["--init_from=resume", "--resume_checkpoint_name=last"]
    code, printed, err = run_in_process("train.py", *base, f"--max_iters={N + 2}", *resume)
    assert code in (0, None), err
    assert f"from the checkpoint, as it was trained (the config file says {str(other)!r}" in printed, printed
    assert same_dataset(dataset(), str(data_dir))
    code, printed, err = run_in_process("train.py", *base, f"--max_iters={N + 4}", f"--dataset={other}", *resume)
    assert code in (0, None), err
    assert "as it was trained" not in printed and same_dataset(dataset(), str(other))
