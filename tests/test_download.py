"""download_pretrained.py up to the network call: gdown is replaced by a fake that writes
a checkpoint in the tutorial's layout (or fails), and the result must load or be refused."""

import os
import runpy
import sys
from unittest import mock

import gdown
import pytest
import torch

from model import GPT, GPTConfig
from utils import UserError
from conftest import REPO_ROOT


def run(argv):
    with mock.patch.object(sys, "argv", ["download_pretrained.py", *argv]):
        runpy.run_path(os.path.join(REPO_ROOT, "download_pretrained.py"), run_name="not_main")["main"]()


def fake_download(write):
    def download(id=None, output=None, quiet=False, **kw):
        assert id == "14OPzCVBiCo-z9F6liAGAe0cyhPCtXycu"
        write(output)
        return output
    return download


def tutorial_checkpoint(path):
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, bias=False))
    torch.save({"model": m.state_dict(), "optimizer": {}, "config": {},
                "model_args": dict(n_layer=1, n_head=2, n_embd=16, bias=False, dropout=0.0)}, path)


def test_download_writes_a_loadable_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(gdown, "download", fake_download(tutorial_checkpoint))
    run([f"--out_dir={tmp_path}"])
    from checkpoint import load_model
    model, _ = load_model(str(tmp_path / "ckpt.pt"))
    assert model.config.n_embd == 16
    with pytest.raises(UserError, match="exists"):
        run([f"--out_dir={tmp_path}"])


def test_failed_or_broken_download_leaves_nothing(tmp_path, monkeypatch):
    def offline(**kw):
        raise ConnectionError("no route to host")
    monkeypatch.setattr(gdown, "download", offline)
    with pytest.raises(UserError, match="could not download"):
        run([f"--out_dir={tmp_path}"])
    monkeypatch.setattr(gdown, "download", fake_download(lambda p: open(p, "wb").write(b"<html>quota</html>")))
    with pytest.raises(UserError, match="corrupt|not a"):
        run([f"--out_dir={tmp_path}"])
    assert os.listdir(tmp_path) == []
