"""
kill -9 during training: a real training process is killed (SIGKILL, which nothing can
catch) at seeded random points, most of them inside a checkpoint write, then resumed from
last.pt, again and again until the run ends. Nothing may be lost: after every kill the
checkpoints on disk read cleanly, every resume works (it takes over the dead run's lock and
removes its temporary files), and the result equals an uninterrupted run to the last bit.

The test starts one driver process (this file run as a script), which imports torch once
and forks a child for each attempt; a child arms its kill point and runs train.py.

    python -m pytest -q tests/test_faults.py
    python tests/test_faults.py OUT_DIR DATA_DIR PLAN_JSON    # what the test runs
"""
import json
import os
import random
import runpy
import signal
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

# a tiny model that writes last.pt at every iteration (last_save_budget=1: never skipped)
ARGS = ["--device=cpu", "--dtype=float32", "--threads=1", "--n_layer=1", "--n_head=2", "--n_embd=16",
        "--block_size=16", "--batch_size=4", "--max_iters=40", "--eval_interval=10", "--eval_iters=2",
        "--log_interval=1", "--last_save_budget=1.0", "--warmup_iters=5", "--lr_decay_iters=40",
        "--dropout=0.0", "--reset_prob=0.3", "--tensorboard=False"]
KILLS, IN_WRITES = 16, 11  # as in the measurement


def kill_plan(seed=0):
    """Where each attempt dies: inside the n-th checkpoint write after `frac` of its bytes,
    around the n-th rename of a finished temporary file, before the n-th optimizer step, or
    in the n-th batch the loader makes (evaluation batches included)."""
    rng = random.Random(seed)
    plan = [dict(at=rng.choice(["write", "write", "rename"]), n=rng.randint(1, 3), frac=rng.random())
            for _ in range(IN_WRITES)]
    plan += [dict(at=rng.choice(["step", "batch"]), n=rng.randint(1, 6), frac=rng.random())
             for _ in range(KILLS - IN_WRITES)]
    rng.shuffle(plan)
    return plan


def arm(spec):
    """Make this process SIGKILL itself at the point spec names."""
    import io
    import torch
    import loader
    count = [0]

    def due():
        count[0] += 1
        return count[0] == spec["n"]

    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if spec["at"] == "write":
        real_save = torch.save

        def save(obj, f):
            if not due():
                return real_save(obj, f)
            buf = io.BytesIO()
            real_save(obj, buf)
            f.write(buf.getvalue()[:int(spec["frac"] * len(buf.getvalue()))])
            f.flush()
            os.fsync(f.fileno())
            die()
        torch.save = save
    elif spec["at"] == "rename":
        real_replace = os.replace

        def replace(src, dst):
            if not (str(dst).endswith(".pt") and due()):
                return real_replace(src, dst)
            if spec["frac"] >= 0.5:  # just after the rename, before the folder is synced
                real_replace(src, dst)
            die()
        os.replace = replace
    else:
        cls, name = (torch.optim.AdamW, "step") if spec["at"] == "step" else (loader.ByteLoader, "next")
        real = getattr(cls, name)

        def wrapped(self, *a, **kw):
            if due():
                die()
            return real(self, *a, **kw)
        setattr(cls, name, wrapped)


def drive(out_dir, data_dir, plan):
    """Run train.py in out_dir until it finishes, attempt i dying as plan[i] says; print one
    JSON line per attempt: how it ended, and whether the checkpoints on disk then read."""
    import torch
    torch.set_num_threads(1)  # the forked children must not inherit a running thread pool
    import checkpoint  # noqa: F401 (imported once here, for all the children)
    import train  # noqa: F401
    from checkpoint import read_checkpoint
    from utils import UserError
    os.makedirs(out_dir, exist_ok=True)
    for i, spec in enumerate(plan + [None]):
        resumed = os.path.exists(os.path.join(out_dir, "last.pt"))
        argv = ["train.py", *ARGS, f"--dataset={data_dir}", f"--out_dir={out_dir}"]
        argv += ["--init_from=resume", "--resume_checkpoint_name=last"] if resumed else []
        pid = os.fork()
        if pid == 0:  # the child: one attempt, its output in its own log
            log = os.open(os.path.join(out_dir, f"attempt{i}.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(log, 1)
            os.dup2(log, 2)
            code = 1
            try:
                if spec:
                    arm(spec)
                sys.argv = argv
                runpy.run_path(os.path.join(REPO_ROOT, "train.py"), run_name="__main__")
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        readable = {}
        for name in ("ckpt.pt", "last.pt"):
            if os.path.exists(os.path.join(out_dir, name)):
                try:
                    readable[name] = read_checkpoint(os.path.join(out_dir, name))["iter_num"]
                except UserError as e:
                    readable[name] = str(e)
        print(json.dumps(dict(attempt=i, spec=spec, resumed=resumed, killed=killed,
                              code=os.WEXITSTATUS(status) if os.WIFEXITED(status) else None, on_disk=readable)),
              flush=True)
        if not killed:
            return


@pytest.mark.slow  # 17 + 1 short training runs: about 25 s of CPU
@pytest.mark.skipif(not hasattr(os, "fork"), reason="the driver forks its attempts")
def test_kill_9_at_random_points_loses_nothing_and_resumes_exactly(tmp_path):
    from checkpoint import checksum, read_checkpoint
    from conftest import run_script, tiny_corpus, write_splits
    data = write_splits(tmp_path, tiny_corpus(20_000))
    runs = {}
    for name, plan in (("whole", []), ("killed", kill_plan())):
        proc = run_script(__file__, tmp_path / name, data, json.dumps(plan), timeout=600)
        assert proc.returncode == 0, proc.stderr
        runs[name] = [json.loads(line) for line in proc.stdout.splitlines()]
    attempts = runs["killed"]
    assert [a["killed"] for a in attempts] == [True] * (len(attempts) - 1) + [False]
    assert attempts[-1]["code"] == 0 and runs["whole"][-1]["code"] == 0
    kills = attempts[:-1]
    assert len(kills) >= 12 and sum(a["spec"]["at"] in ("write", "rename") for a in kills) >= 8, kills
    for a in attempts:  # after every kill, what is on disk reads cleanly
        assert all(isinstance(it, int) for it in a["on_disk"].values()), a
    for i, a in enumerate(attempts[1:], 1):
        log = (tmp_path / "killed" / f"attempt{i}.log").read_text()
        assert "Traceback" not in log and "error:" not in log, log
        assert "took over" in log  # the dead run's lock
        if a["resumed"]:
            assert "resumed" in log
    # the interrupted run ends where the uninterrupted one does, to the last bit
    out = tmp_path / "killed"
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".log")) == ["ckpt.pt", "last.pt"]
    for name in ("last.pt", "ckpt.pt"):
        a, b = read_checkpoint(tmp_path / "whole" / name), read_checkpoint(out / name)
        for key in ("model", "optimizer", "model_args", "iter_num", "best_val_loss", "rng", "loader"):
            assert checksum(a[key]) == checksum(b[key]), (name, key)
    assert read_checkpoint(out / "last.pt")["iter_num"] == 40


if __name__ == "__main__":
    drive(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
