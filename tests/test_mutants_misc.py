"""
Tests found missing by a mutation audit of the modules earlier audits skipped: checkpoint
conversions and checksums, download_pretrained.py, gen_sample_data.py, the dataset
preparation, configurator's --help and suggestions, outdir and kv/quant.py's formats. Each
checks a documented promise as a user would see it, or against a layout built here by hand.

    python -m pytest -q tests/test_mutants_misc.py
"""
import os
import re
import runpy
import sys
from unittest import mock

import pytest
import torch

import outdir
import loader
from checkpoint import checksum, convert_state_dict, load_model
from conftest import REPO_ROOT, run_in_process, tiny_corpus
from configurator import configure
from kv.quant import make_formats
from loader import dataset_paths, prepare
from model import GPT, GPTConfig
from outdir import checkpoint_path
from utils import UserError

KEY = "transformer.h.{}.attn.c_attn.weight"


@pytest.mark.parametrize("share", [1, 4])
def test_a_shared_kv_model_converts_to_another_sharing(share):
    """kv_share=2 -> 1 or 4: each layer's K/V comes from the layer that held its group's K/V."""
    torch.manual_seed(0)
    src = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=32, bias=False, kv_share=2))
    w = {i: src.state_dict()[KEY.format(i)] for i in range(4)}
    kv_used = {i: w[i - i % 2][32:] for i in range(4)}  # what layer i attended with before
    new = GPTConfig(n_layer=4, n_head=4, n_embd=32, bias=False, kv_share=share)
    sd, notes = convert_state_dict(dict(src.state_dict()), src.config, new)
    for i in range(4):
        expected = w[i][:32]  # the queries are kept
        if i % share == 0:
            group = [kv_used[j] for j in range(i, i + share)]
            expected = torch.cat([expected, sum(group) / len(group)])
        torch.testing.assert_close(sd[KEY.format(i)], expected)
    GPT(new).load_state_dict(sd, strict=True)
    assert notes


def saved(path, **args):
    """A checkpoint in the tutorial's layout (no checksums) of a fresh model; returns the model."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**args))
    torch.save({"model": model.state_dict(), "model_args": args, "config": {}}, path)
    return model


def test_mha_to_gqa_pools_the_biases_too(tmp_path):
    """--n_kv_head=2 on a model with biases: each new K/V head's bias is the mean of its group's."""
    src = saved(tmp_path / "ckpt.pt", n_layer=1, n_head=4, n_embd=32, bias=True)
    model, _ = load_model(str(tmp_path / "ckpt.pt"), overrides={"n_kv_head": 2})
    b_old = src.state_dict()["transformer.h.0.attn.c_attn.bias"]
    heads = b_old[32:].view(2, 2, 2, 8)  # (k or v, new head, old head in its group, channel)
    expected = torch.cat([b_old[:32], heads.mean(2).flatten()])
    torch.testing.assert_close(model.state_dict()["transformer.h.0.attn.c_attn.bias"], expected)


def test_kv_heads_that_do_not_group_evenly_are_one_error(tmp_path):
    """3 K/V heads cannot be pooled into 2: refused with a message, not a reshape error."""
    saved(tmp_path / "ckpt.pt", n_layer=1, n_head=6, n_kv_head=3, n_embd=48, bias=False)
    with pytest.raises(UserError, match="cannot convert n_kv_head 3 -> 2"):
        load_model(str(tmp_path / "ckpt.pt"), overrides={"n_kv_head": 2})


def test_checksums_tell_apart_the_same_bytes_in_another_form():
    """A checksum covers a tensor's dtype and shape, and how lists nest, not only the bytes."""
    t = torch.arange(6, dtype=torch.float32)
    sums = {checksum(t), checksum(t.view(2, 3)), checksum(t.view(torch.int32))}
    assert len(sums) == 3
    assert len({checksum([]), checksum([[]]), checksum([[], []]), checksum([[1], 2]), checksum([1, [2]])}) == 5


def test_per_token_keys_need_a_group_that_divides_the_head_dimension():
    """kv_quant_keys=token (and eviction) groups keys like values: a bad group is refused early."""
    for channel_keys in (True, False):
        with pytest.raises(UserError, match="kv_quant_group=3 does not divide the head dimension 8"):
            make_formats("int4", 3, 8, channel_keys)


def prepared(tmp_path):
    ds = tmp_path / "ds"
    (tmp_path / "a.txt").write_bytes(tiny_corpus(1000))
    prepare(str(ds), input_path=str(tmp_path / "a.txt"))
    return ds, {name: (ds / name).read_bytes() for name in ("input.txt", "train.txt", "val.txt")}


def test_another_text_of_the_same_size_is_not_taken_for_the_same(tmp_path):
    """An --input of the same length but other bytes would replace input.txt: refused unless forced."""
    ds, before = prepared(tmp_path)
    other = bytearray(tiny_corpus(1000))
    other[500] = ord("#") if other[500] != ord("#") else ord("$")
    (tmp_path / "b.txt").write_bytes(bytes(other))
    with pytest.raises(UserError, match="differs from the .* --force=True"):
        prepare(str(ds), input_path=str(tmp_path / "b.txt"))
    assert {name: (ds / name).read_bytes() for name in before} == before


def test_a_nul_byte_anywhere_in_the_input_is_found(tmp_path):
    """Text whose first NUL byte lies far past its start is refused, naming that byte."""
    head = tiny_corpus(5000)
    (tmp_path / "a.bin").write_bytes(head + b"\0\1\2" + tiny_corpus(500))
    with pytest.raises(UserError, match=f"the first at byte {len(head):,}"):
        prepare(str(tmp_path / "ds"), input_path=str(tmp_path / "a.bin"))
    assert not (tmp_path / "ds" / "train.txt").exists()


def test_a_folder_path_is_never_filled_from_the_offline_copy_of_a_dataset_of_its_name(tmp_path, monkeypatch):
    """--dataset=some/path/shakespeare_char (empty) is the user's folder: refused, not prepared."""
    shared = tmp_path / "shared"
    (shared / "shakespeare_char").mkdir(parents=True)
    (shared / "shakespeare_char" / "input.txt").write_bytes(tiny_corpus(1000))
    monkeypatch.setattr(loader, "SHARED_DATA", str(shared))
    mine = tmp_path / "mine" / "shakespeare_char"
    mine.mkdir(parents=True)
    with pytest.raises(UserError, match="put the corpus there as input.txt"):
        dataset_paths(str(mine))
    assert os.listdir(mine) == []


def test_a_checkpoint_name_may_end_in_pt_or_not():
    """checkpoint_name=ckpt and checkpoint_name=ckpt.pt name the same file."""
    assert checkpoint_path("run", "ckpt") == checkpoint_path("run", "ckpt.pt") == os.path.join("run", "ckpt.pt")


def test_a_checkpoint_name_that_is_a_path_is_refused_with_the_folder_where_the_file_is(tmp_path, monkeypatch):
    """--checkpoint_name=../runs/ckpt: the folder suggested is the one from here when the file is
    there, else the one inside --out_dir when it is there (as out_dir + name would read it)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "runs").mkdir(parents=True)
    (tmp_path / "out" / "runs" / "ckpt.pt").write_bytes(b"x")
    inside = os.path.join("out", "runs")
    with pytest.raises(UserError, match=re.escape(f"pass --out_dir={inside} --checkpoint_name=ckpt")):
        checkpoint_path("out", "runs/ckpt")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "ckpt.pt").write_bytes(b"x")  # there from here too: the path as typed
    with pytest.raises(UserError, match="pass --out_dir=runs --checkpoint_name=ckpt"):
        checkpoint_path("out", "runs/ckpt")


def test_help_lists_each_setting_under_its_header_with_its_own_description(tmp_path, capsys):
    """--help: every setting below a comment header stays in its group; a script's own description
    of a setting beats train.py's (out_dir here)."""
    script = tmp_path / "script.py"
    script.write_text('"""A script."""\n# Group one\nalpha = 1  # the first\nbeta = 2  # the second\n\n'
                      '# Group two\nout_dir = "o"  # my own folder\n')
    g = {"__doc__": "A script.", "__file__": str(script), "alpha": 1, "beta": 2, "out_dir": "o"}
    with pytest.raises(SystemExit):
        configure(g, ["--help"])
    shown = capsys.readouterr().out.split("settings (override with --name=value, or in a config file):\n")[1]
    assert shown == ("\n  Group one:\n  --alpha=1  the first\n  --beta=2  the second\n"
                     "\n  Group two:\n  --out_dir='o'  my own folder\n")


def test_a_misspelt_setting_names_every_close_one():
    """'did you mean' offers each setting the misspelling is close to, not only the closest."""
    with pytest.raises(UserError, match="did you mean") as info:
        configure({"n_head": 4, "n_kv_head": 4, "n_embd": 32}, ["--n_heads=2"])
    assert "--n_head" in str(info.value) and "--n_kv_head" in str(info.value)


def test_a_run_refused_leaves_none_of_the_folders_it_made(tmp_path):
    """--out_dir=a/b/c with a/ missing: released before writing anything, a/ is gone again."""
    lock = outdir.claim(str(tmp_path / "a" / "b" / "c"), fresh=True, overwrite=False)
    assert (tmp_path / "a" / "b" / "c" / "train.lock").exists()
    lock.release()
    assert os.listdir(tmp_path) == []


def download(argv, write, monkeypatch):
    gdown = pytest.importorskip("gdown")
    monkeypatch.setattr(gdown, "download", lambda id=None, output=None, **kw: write(output) or output)
    with mock.patch.object(sys, "argv", ["download_pretrained.py", *argv]):
        runpy.run_path(os.path.join(REPO_ROOT, "download_pretrained.py"), run_name="not_main")["main"]()


def tutorial_checkpoint(n_embd):
    def write(path):
        m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=n_embd, bias=False))
        args = dict(n_layer=1, n_head=2, n_embd=n_embd, bias=False, dropout=0.0)
        torch.save({"model": m.state_dict(), "optimizer": {}, "config": {}, "model_args": args}, path)
    return write


def test_download_with_force_replaces_the_checkpoint(tmp_path, monkeypatch):
    """--force=True replaces an existing ckpt.pt with the new download."""
    download([f"--out_dir={tmp_path}"], tutorial_checkpoint(16), monkeypatch)
    download([f"--out_dir={tmp_path}", "--force=True"], tutorial_checkpoint(32), monkeypatch)
    model, _ = load_model(str(tmp_path / "ckpt.pt"))
    assert model.config.n_embd == 32 and os.listdir(tmp_path) == ["ckpt.pt"]


def test_a_download_error_names_the_root_cause_however_deep():
    """error_detail: the outer error's type with the innermost cause's message."""
    import download_pretrained
    try:
        try:
            try:
                raise OSError("Name or service not known")
            except OSError as e:
                raise ConnectionError("max retries exceeded") from e
        except ConnectionError:
            raise RuntimeError("download failed")  # (implicitly chained: __context__)
    except RuntimeError as e:
        assert download_pretrained.error_detail(e) == "RuntimeError: Name or service not known"


def test_gen_sample_data_prints_consecutive_rows_of_the_split_asked_for(tmp_path):
    """Rows of --split=val, escaped; each row continues its text of the last batch unless marked [restart]."""
    val = tiny_corpus(300).decode().replace("e ", "\t").replace("d ", "\r")  # and its newlines
    (tmp_path / "train.txt").write_bytes(b"T" * 500)
    (tmp_path / "val.txt").write_bytes(val.encode())
    code, out, _ = run_in_process("gen_sample_data.py", f"--dataset={tmp_path}/", "--split=val", "--batch_size=2",
                                  "--block_size=16", "--reset_prob=0.5", "--n_batches=8", "--seed=3")
    rows = [re.fullmatch(r"batch +(\d+) row (\d) (\[restart\]| {9}) \|(.*)\|", line)
            for line in out.splitlines() if line.startswith("batch")]
    assert code == 0 and len(rows) == 16 and all(rows), out
    assert [(int(m[1]), int(m[2])) for m in rows] == [(i, r) for i in range(8) for r in range(2)]
    layout, last = ("####" + val) * 3, {}
    for m in rows:
        text = m[4].replace("\\n", "\n").replace("\\t", "\t").replace("\\r", "\r")
        assert len(text) == 16
        if m[3] == "[restart]":  # a jump: "####" over its first 4 bytes, then the text
            assert text.startswith("####") and text[4:] in layout
            text = text[4:]
        else:
            assert last[m[2]] + text in layout, (last[m[2]], text)
        last[m[2]] = text
    marks = [(rows[2 * i][3], rows[2 * i + 1][3]) for i in range(1, 8)]
    assert any(a != b for a, b in marks)  # (the seed makes one row jump while the other goes on)
