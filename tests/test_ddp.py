"""
train.py under torchrun (2 CPU processes, gloo) and gradient accumulation. The torchrun
runs are real subprocesses (marked slow); the references they are compared with run
train.py in this process, with a stand-in loader that serves the same rows.

    python -m pytest -q tests/test_ddp.py
"""
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch

import loader
from checkpoint import read_checkpoint
from conftest import REPO_ROOT, TINY, train
from loader import ByteLoader
from model import GPT, GPTConfig


def torchrun(*args, nproc=2):
    # (TMPDIR: torchrun's agent leaves a torchelastic_* folder behind in it at every run)
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=tmp)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "train.py", *TINY, *map(str, args)]
        return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)


def logged_losses(printed):
    return [float(v) for v in re.findall(r"iter \d+: loss (\d+\.\d+)", printed)]


class RanksInTurn(ByteLoader):
    """One process reading what 2 DDP ranks read: micro-step i gets rank i % 2's rows
    (rank r's loader is seeded with seed + r)."""

    def __init__(self, path, block_size, batch_size, reset_prob=0.1, seed=1337, device="cpu"):
        super().__init__(path, block_size, batch_size, reset_prob, seed, device)
        self.other = ByteLoader(path, block_size, batch_size, reset_prob, seed + 1, device)
        self.turn = 0

    def next(self):
        self.turn += 1
        return super().next() if self.turn % 2 else self.other.next()


class Halves(ByteLoader):
    """Rows of an 8-row loader, served batch_size rows at a time (all 8, or 4 and then 4)."""

    def __init__(self, path, block_size, batch_size, reset_prob=0.1, seed=1337, device="cpu"):
        super().__init__(path, block_size, 8, reset_prob, seed, device)
        self.part, self.queue = batch_size, []

    def next(self):
        if not self.queue:
            x, y, restarted = super().next()
            self.queue = [(x[i:i + self.part], y[i:i + self.part], restarted[i:i + self.part])
                          for i in range(0, 8, self.part)]
        return self.queue.pop(0)


def assert_close_weights(a, b, atol=2e-5):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=atol), (k, (a[k] - b[k]).abs().max())


@pytest.mark.slow
def test_two_processes_train_like_one_that_reads_both_ranks_rows(data_dir, tmp_path, monkeypatch):
    """2 ranks x 1 micro-step each = one process with 2 micro-steps over the same rows: same
    weights in the checkpoint, same logged (whole-batch) loss; rank 0 alone prints and writes."""
    args = [f"--dataset={data_dir}", "--max_iters=4", "--gradient_accumulation_steps=2"]
    proc = torchrun(*args, f"--out_dir={tmp_path / 'ddp'}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "DDP: 2 processes, backend gloo, 1 micro-steps each" in proc.stdout
    assert proc.stdout.count("iter 0: train loss") == 1  # the other rank is quiet
    names = sorted(os.listdir(tmp_path / "ddp"))
    assert len(names) == 3 and names[0] == "ckpt.pt" and names[2] == "last.pt"  # and 1 TensorBoard file

    monkeypatch.setattr(loader, "ByteLoader", RanksInTurn)
    printed = train(data_dir, tmp_path / "one", *args)
    ddp, one = read_checkpoint(str(tmp_path / "ddp" / "last.pt")), read_checkpoint(str(tmp_path / "one" / "last.pt"))
    # the plain model's names (no "module." or "_orig_mod."), trained as the single process trained
    assert set(ddp["model"]) == set(GPT(GPTConfig(**ddp["model_args"])).state_dict())
    assert ddp["iter_num"] == 4 and ddp["config"]["gradient_accumulation_steps"] == 2
    assert_close_weights(ddp["model"], one["model"])
    assert logged_losses(proc.stdout) == pytest.approx(logged_losses(printed), abs=2e-4)
    # the val loss is over the batches one process evaluates, whatever the number of processes:
    # at iteration 0 (the same weights) one process evaluating alone gives the same figures
    monkeypatch.undo()
    alone = train(data_dir, tmp_path / "alone", *args, "--eval_only=True")
    first = lambda text: re.search(r"iter 0: train loss (\d+\.\d+), val loss (\d+\.\d+)", text).groups()
    assert first(proc.stdout) == first(alone)


def test_accumulated_micro_steps_update_like_one_larger_batch(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(loader, "ByteLoader", Halves)
    whole = train(data_dir, tmp_path / "whole", "--max_iters=3", "--batch_size=8")
    split = train(data_dir, tmp_path / "split", "--max_iters=3", "--batch_size=4", "--gradient_accumulation_steps=2")
    a, b = read_checkpoint(str(tmp_path / "whole" / "last.pt")), read_checkpoint(str(tmp_path / "split" / "last.pt"))
    assert_close_weights(a["model"], b["model"], atol=1e-6)
    assert logged_losses(whole) == pytest.approx(logged_losses(split), abs=1e-5)
    assert len(logged_losses(whole)) == 1  # iteration 2 (log_interval=2)


@pytest.mark.slow
@pytest.mark.parametrize("model_args", [
    ["--n_layer=4", "--kv_share=2", "--n_kv_head=1", "--window=8", "--global_layers=0,1"],
    ["--n_layer=3", "--attention=linear", "--linear_layers=1"],
], ids=["gqa-window-kv_share", "linear-hybrid"])
def test_ddp_with_xl_memory(data_dir, tmp_path, model_args):
    """Every parameter gets a gradient (no find_unused_parameters needed), memory per rank."""
    proc = torchrun(f"--dataset={data_dir}", f"--out_dir={tmp_path}", "--max_iters=4", "--xl_mem=16",
                    "--gradient_accumulation_steps=4", *model_args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "iter 4: train loss" in proc.stdout and "val loss with memory" in proc.stdout
    assert read_checkpoint(str(tmp_path / "last.pt"))["iter_num"] == 4


def test_accumulation_steps_must_split_evenly_over_ranks(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        train(data_dir, tmp_path, "--gradient_accumulation_steps=3")
    assert e.value.code == 2
    assert "multiple of the 2 DDP processes" in capsys.readouterr().err
