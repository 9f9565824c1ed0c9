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


def test_a_failed_download_removes_every_folder_it_made_and_gdowns_partial_file(tmp_path, monkeypatch):
    """--out_dir=a/b/c that did not exist: a refused file, a dropped connection (gdown leaves
    its <output><8 characters>.part) or Ctrl-C mid-way leave no file and none of a, b, c; a
    folder that was there before stays."""
    def partial_then(fail):
        def download(id=None, output=None, quiet=False, **kw):
            open(output + "abcd1234.part", "wb").write(b"half")  # what gdown writes as it goes
            raise fail
        return download

    for how in (fake_download(lambda p: open(p, "wb").write(b"<html>quota</html>")),
                partial_then(ConnectionError("connection reset")), partial_then(KeyboardInterrupt())):
        monkeypatch.setattr(gdown, "download", how)
        with pytest.raises((UserError, KeyboardInterrupt)):
            run([f"--out_dir={tmp_path / 'a' / 'b' / 'c'}"])
        assert os.listdir(tmp_path) == []
    (tmp_path / "kept").mkdir()
    with pytest.raises(KeyboardInterrupt):
        run([f"--out_dir={tmp_path / 'kept'}"])
    assert os.listdir(tmp_path) == ["kept"] and os.listdir(tmp_path / "kept") == []


def test_a_page_instead_of_the_checkpoint_says_what_it_likely_is(tmp_path, monkeypatch):
    monkeypatch.setattr(gdown, "download", fake_download(lambda p: open(p, "wb").write(b"<html>quota</html>")))
    with pytest.raises(UserError, match="the file Google Drive sent is not a checkpoint .*download quota.*try again later"):
        run([f"--out_dir={tmp_path}"])


def test_a_folder_named_ckpt_pt_is_one_error(tmp_path, monkeypatch):
    (tmp_path / "ckpt.pt").mkdir()
    monkeypatch.setattr(gdown, "download", fake_download(tutorial_checkpoint))
    for argv in ([f"--out_dir={tmp_path}"], [f"--out_dir={tmp_path}", "--force=True"]):
        with pytest.raises(UserError, match="ckpt.pt is a folder, not a checkpoint file"):
            run(argv)
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_weights_that_do_not_fit_their_model_are_refused_before_they_replace_anything(tmp_path, monkeypatch):
    """A file that reads as a checkpoint but whose weights are not the model its model_args
    describe (n_embd 16 saved as 32) is refused as load_model refuses it, and the ckpt.pt
    already there (--force=True) stays as it was."""
    def mismatched(path):
        tutorial_checkpoint(path)
        ckpt = torch.load(path, weights_only=True)
        ckpt["model_args"]["n_embd"] = 32
        torch.save(ckpt, path)
    from checkpoint import load_model
    mismatched(tmp_path / "probe.pt")
    with pytest.raises(UserError) as refused:
        load_model(str(tmp_path / "probe.pt"))
    os.remove(tmp_path / "probe.pt")
    tutorial_checkpoint(tmp_path / "ckpt.pt")
    before = (tmp_path / "ckpt.pt").read_bytes()
    monkeypatch.setattr(gdown, "download", fake_download(mismatched))
    with pytest.raises(UserError, match="a checkpoint, but not one this project can load") as downloaded:
        run([f"--out_dir={tmp_path}", "--force=True"])
    assert str(refused.value).split(": ", 1)[1] in str(downloaded.value)  # load_model's reason, whole
    assert (tmp_path / "ckpt.pt").read_bytes() == before and os.listdir(tmp_path) == ["ckpt.pt"]
