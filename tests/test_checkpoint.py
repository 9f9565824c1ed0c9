"""checkpoint.py: the tutorial's layout loads and computes what the hand-set model computes,
compiled and DDP-wrapped models save plain weights, conversions (MHA -> GQA, kv_share) are
the means they promise, interrupted saves keep the previous file, and bad or malicious
files are refused with one clear error."""

import os
import re

import pytest
import torch
import torch.distributed as dist

import checkpoint
import outdir
from checkpoint import convert_state_dict, load_model, read_checkpoint, save_checkpoint
from conftest import TOL, feed, run_script, save_tiny_checkpoint, text, tiny
from model import GPT, MODEL_ARG_KEYS, GPTConfig
from tutorial_reference import reference_logits
from utils import UserError


def save_tutorial_layout(path, model, prefix="_orig_mod.", **extra):
    ckpt = {"model": {prefix + k: v for k, v in model.state_dict().items()},
            "optimizer": {"state": {}, "param_groups": []},
            "model_args": {"n_layer": 2, "n_head": 4, "n_embd": 32, "bias": False, "dropout": 0.0},
            "config": {"batch_size": 4, "dataset": "shakespeare_char"}}
    ckpt.update(extra)
    torch.save(ckpt, path)


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_tutorial_layout_checkpoint_loads_and_matches_hand_set_model(tmp_path, prefix):
    """Saved from a compiled model, also under DDP (DDP(torch.compile(m)) and the other way)."""
    torch.manual_seed(3)
    hand = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, bias=False)).eval()
    with torch.no_grad():
        for p in hand.parameters():
            p.copy_(torch.randn_like(p) * 0.05) if p.requires_grad else None
    save_tutorial_layout(tmp_path / "ckpt.pt", hand, prefix)
    model, ckpt = load_model(str(tmp_path / "ckpt.pt"))
    idx = text(T=70)
    torch.testing.assert_close(model.eval()(idx)[0], hand(idx)[0], **TOL)
    torch.testing.assert_close(feed(model, idx, 1)[0],
                               reference_logits(hand.state_dict(), 2, 4, idx), **TOL)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's first import, inside torch
def test_compiled_and_ddp_wrapped_checkpoint_loads_into_a_plain_model(tmp_path):
    """torch.compile is lazy: the wrapper exists (and must be unwrapped) even if never run."""
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, bias=False))
    args = {k: getattr(model.config, k) for k in MODEL_ARG_KEYS}
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(torch.compile(model))
        for name, m in (("compiled", torch.compile(model)), ("ddp", wrapped)):
            save_checkpoint(str(tmp_path / f"{name}.pt"), m, None, args, {}, 1, 2.0)
            loaded, ckpt = load_model(str(tmp_path / f"{name}.pt"))
            assert set(ckpt["model"]) == set(model.state_dict()), name
            for k, v in model.state_dict().items():
                assert torch.equal(loaded.state_dict()[k], v), (name, k)
    finally:
        dist.destroy_process_group()


def test_a_best_val_loss_of_nan_reads_as_none_yet(tmp_path):
    """No loss is below nan: a checkpoint saying nan would never let a resume write ckpt.pt."""
    save_tutorial_layout(tmp_path / "ckpt.pt", tiny(), best_val_loss=float("nan"), iter_num=7)
    assert read_checkpoint(str(tmp_path / "ckpt.pt"))["best_val_loss"] == float("inf")


def test_nanogpt_style_best_val_loss_tensor_loads(tmp_path):
    """nanoGPT saves best_val_loss as a 0-d tensor; it is a number once read."""
    save_tutorial_layout(tmp_path / "ckpt.pt", tiny(), best_val_loss=torch.tensor(1.25), iter_num=7)
    ckpt = read_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["best_val_loss"] == 1.25 and isinstance(ckpt["best_val_loss"], float)


def test_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch):
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, bias=False))
    args = {k: getattr(model.config, k) for k in MODEL_ARG_KEYS}
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, model, None, args, {}, 1, 2.0)
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    def dies_half_way(obj, f, *a, **kw):
        if isinstance(f, (str, os.PathLike)):
            f = open(f, "wb")
        f.write(b"PK\x03\x04 half of a checkpoint")
        f.flush()
        raise OSError("disk full (simulated)")

    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(UserError, match="could not write .* the previous ckpt.pt is intact"):
        save_checkpoint(path, model, None, args, {}, 2, 1.0)
    monkeypatch.undo()
    ckpt = read_checkpoint(path)
    assert ckpt["iter_num"] == 1
    for k, v in saved.items():
        assert torch.equal(ckpt["model"][k], v), k


def test_a_disk_that_fills_under_torchs_own_writer_is_one_user_error(tmp_path, monkeypatch):
    """A full disk met by the file torch.save writes into: torch's zip writer reports it as a
    RuntimeError ("unexpected pos ..."), which is still the "could not write" line, and the
    previous checkpoint stays, with no temporary file left."""
    import builtins
    import errno
    import fileio
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, bias=False))
    args = {k: getattr(model.config, k) for k in MODEL_ARG_KEYS}
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, model, None, args, {}, 1, 2.0)

    class FillsUp:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 4096:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    monkeypatch.setattr(fileio, "open", lambda *a, **kw: FillsUp(builtins.open(*a, **kw)), raising=False)
    with pytest.raises(UserError, match=r"could not write .*\(No space left on device\); the previous ckpt.pt is intact"):
        save_checkpoint(path, model, None, args, {}, 2, 1.0)
    monkeypatch.undo()
    assert read_checkpoint(path)["iter_num"] == 1 and os.listdir(tmp_path) == ["ckpt.pt"]


def test_a_missing_folder_names_the_recipe_that_writes_there(tmp_path, monkeypatch):
    """Each recipe's own folder gets that recipe (the GPU model's folder is not told to hold the
    CPU model); any other folder gets the CPU recipe pointed at it. Run outside the project, the
    command names its files by their paths (python train.py would not be found there)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config_dir = os.path.join(repo, "config")
    monkeypatch.chdir(tmp_path)  # where no recipe's folder exists
    # nor beside the code (a student who trained the CPU recipe has its folder there)
    monkeypatch.setattr(outdir, "PROJECT", str(tmp_path / "project"))
    train_py = re.escape(f"python {repo}/train.py {config_dir}/")
    for name in ("train_shakespeare_char.py", "train_shakespeare_char_cpu.py", "train_svejk_char.py"):
        g = {}
        with open(os.path.join(config_dir, name)) as f:
            exec(f.read(), g)  # the recipe's out_dir
        with pytest.raises(UserError, match=rf"does not exist: train one \({train_py}{name}\) or"):
            read_checkpoint(os.path.join(g["out_dir"], "ckpt.pt"))
        elsewhere = tmp_path / "runs" / g["out_dir"]  # the same name in another place: that recipe, told where
        with pytest.raises(UserError, match=rf"train one \({train_py}{name} --out_dir={elsewhere}\)"):
            read_checkpoint(str(elsewhere / "ckpt.pt"))
    with pytest.raises(UserError, match=rf"train one \({train_py}train_shakespeare_char_cpu.py "
                                        rf"--out_dir={tmp_path / 'mine'}\)"):
        read_checkpoint(str(tmp_path / "mine" / "ckpt.pt"))
    monkeypatch.chdir(repo)  # in the project: the names as the README writes them
    with pytest.raises(UserError, match=r"train one \(python train.py config/train_shakespeare_char_cpu.py "):
        read_checkpoint(str(tmp_path / "mine" / "ckpt.pt"))


def test_bad_checkpoints_give_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="holds none: train one .* or download the tutorial's"):
        read_checkpoint(str(tmp_path / "nope.pt"))
    save_tutorial_layout(tmp_path / "last.pt", tiny())  # a run stopped before it wrote ckpt.pt
    with pytest.raises(UserError, match="last.pt is there .*--checkpoint_name=last"):
        read_checkpoint(str(tmp_path / "ckpt.pt"))
    with pytest.raises(UserError, match="last.pt is there .*--resume_checkpoint_name=last"):
        read_checkpoint(str(tmp_path / "ckpt.pt"), option="resume_checkpoint_name")  # as train.py names it
    with pytest.raises(UserError, match="nope.pt not found; .* holds last.pt: name one with --checkpoint_name=last$"):
        read_checkpoint(str(tmp_path / "nope.pt"))
    with pytest.raises(UserError, match=f"name it with --baseline={tmp_path / 'last.pt'}$"):  # a path, not a name
        read_checkpoint(str(tmp_path / "ckpt.pt"), option="baseline")
    with pytest.raises(UserError, match="last.pt is a file, not a folder: pass the folder that holds it"):
        read_checkpoint(str(tmp_path / "last.pt" / "ckpt.pt"))  # --out_dir=.../last.pt
    good = tmp_path / "good.pt"
    save_tutorial_layout(good, tiny())
    data = good.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="trunc.pt") as e:
        read_checkpoint(str(tmp_path / "trunc.pt"))
    # the way out names the checkpoints beside it, and how to pick one (a name, or a path)
    assert str(e.value).endswith("use another checkpoint (beside it: good.pt, last.pt, e.g. "
                                 "--checkpoint_name=good.pt) or retrain"), str(e.value)
    with pytest.raises(UserError, match=f"e.g. --baseline={tmp_path / 'good.pt'}\\) or retrain$"):
        read_checkpoint(str(tmp_path / "trunc.pt"), option="baseline")
    with pytest.raises(UserError, match=r"use another checkpoint \(beside it: good.pt, last.pt\) or retrain$"):
        read_checkpoint(str(tmp_path / "trunc.pt"), option=None)  # no setting picks one (download_pretrained)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="junk.pt") as e:
        read_checkpoint(str(tmp_path / "junk.pt"))
    # the broken neighbour (cut short: no zip's end) is not offered, so no error sends to another
    assert "(beside it: good.pt, last.pt, e.g. --checkpoint_name=good.pt)" in str(e.value), str(e.value)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(UserError, match=r"empty.pt is empty \(0 bytes\), not a checkpoint"):
        read_checkpoint(str(tmp_path / "empty.pt"))
    import pickle
    # pickle protocol 4 starts with an opcode torch's safe loader refuses: code is still named as
    # code (a name on the stack, STACK_GLOBAL), and data is told to be saved again
    (tmp_path / "object.pt").write_bytes(pickle.dumps(os.getcwd, protocol=4))
    with pytest.raises(UserError, match=rf"object.pt was refused: it asks to load {os.name}.getcwd, which is code"):
        read_checkpoint(str(tmp_path / "object.pt"))
    torch.save({"model": {"w": torch.zeros(2)}, "model_args": {}}, tmp_path / "p4.pt", pickle_protocol=4)
    with pytest.raises(UserError, match="p4.pt was written with pickle protocol 4 or later"):
        read_checkpoint(str(tmp_path / "p4.pt"))
    torch.save({"weights": torch.zeros(2), "step": 3}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="not a checkpoint of this project"):
        read_checkpoint(str(tmp_path / "foreign.pt"))
    torch.save(tiny().state_dict(), tmp_path / "bare.pt")
    with pytest.raises(UserError, match=r"holds weights alone \(a state_dict.*without the model_args"):
        read_checkpoint(str(tmp_path / "bare.pt"))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_pickle_with_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": {}, "model_args": {}, "x": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="refused"):
        read_checkpoint(str(tmp_path / "evil.pt"))
    assert not (tmp_path / "pwned.txt").exists()


def test_convert_mha_to_gqa_mean_pools_and_trains(tmp_path):
    src = tiny()
    save_tutorial_layout(tmp_path / "ckpt.pt", src)
    model, ckpt = load_model(str(tmp_path / "ckpt.pt"), overrides={"n_kv_head": 2})
    assert ckpt["conversions"]
    for i in range(2):
        w_old = src.state_dict()[f"transformer.h.{i}.attn.c_attn.weight"]
        w_new = model.state_dict()[f"transformer.h.{i}.attn.c_attn.weight"]
        assert w_new.shape == (32 + 2 * 2 * 8, 32)
        torch.testing.assert_close(w_new[:32], w_old[:32])
        k_old = w_old[32:64].view(4, 8, 32)
        v_old = w_old[64:].view(4, 8, 32)
        torch.testing.assert_close(w_new[32:48].view(2, 8, 32), (k_old[0::2] + k_old[1::2]) / 2)
        torch.testing.assert_close(w_new[48:].view(2, 8, 32), (v_old[0::2] + v_old[1::2]) / 2)
    # the converted model trains: a few steps on one batch lower its loss
    model.train()
    opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.99), "cpu")
    idx = text(B=4, T=33)
    losses = []
    for _ in range(20):
        logits, _ = model(idx[:, :-1])
        loss = model.loss(logits, idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_convert_kv_share_averages_group():
    src = tiny(n_layer=4)
    old, new = src.config, GPTConfig(n_layer=4, n_head=4, n_embd=32, bias=False, kv_share=2)
    sd, notes = convert_state_dict(dict(src.state_dict()), old, new)
    w = src.state_dict()
    key = "transformer.h.{}.attn.c_attn.weight"
    torch.testing.assert_close(sd[key.format(0)][32:], (w[key.format(0)][32:] + w[key.format(1)][32:]) / 2)
    assert sd[key.format(1)].shape == (32, 32) and notes
    GPT(new).load_state_dict(sd)


def test_a_hand_edited_checkpoint_says_what_changed_and_how_to_keep_the_edit(tmp_path):
    """Dropping the optimizer (as people do before sharing a file) or scaling a weight: the
    error names what is missing or changed, and how to keep such an edit: without its
    checksums the file loads (with a note)."""
    model = tiny()
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, model, model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu"),
                    {k: getattr(model.config, k) for k in MODEL_ARG_KEYS}, {}, 1, 5.0)
    ckpt = torch.load(path, weights_only=True)
    del ckpt["optimizer"]
    torch.save(ckpt, path)
    with pytest.raises(UserError, match=r"missing: optimizer\).*delete its 'crc32' entry"):
        read_checkpoint(path)
    ckpt["model"]["lm_head.weight"] = ckpt["model"]["lm_head.weight"] * 1.01
    torch.save(ckpt, path)
    with pytest.raises(UserError, match=r"missing: optimizer; checksum mismatch in model\)"):
        read_checkpoint(path)
    del ckpt["crc32"]
    torch.save(ckpt, path)
    assert "optimizer" not in read_checkpoint(path) and load_model(path)[0] is not None


@pytest.mark.parametrize("change", ["wpe", "vocab"])
def test_a_nanogpt_checkpoint_is_named_not_called_corrupt(tmp_path, change):
    """nanoGPT's GPT has learned positions (wpe) and a tokenizer's vocabulary: its file is
    refused as another kind of model, in one line, not as a corrupt one of ours."""
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, bias=False))
    sd = model.state_dict()
    if change == "wpe":
        sd["transformer.wpe.weight"] = torch.zeros(64, 32)
    else:
        sd["transformer.wte.weight"] = sd["lm_head.weight"] = torch.zeros(65, 32)
    save_tutorial_layout(tmp_path / "ckpt.pt", model)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    ckpt["model"] = {"_orig_mod." + k: v for k, v in sd.items()}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    with pytest.raises(UserError, match="another kind of GPT") as info:
        load_model(str(tmp_path / "ckpt.pt"))
    assert ("transformer.wpe" if change == "wpe" else "a vocabulary of 65 tokens") in str(info.value)
    assert "corrupt" not in str(info.value)


@pytest.mark.parametrize("edit, words", [
    (dict(model_args={"n_layer": 2, "n_head": 4, "n_embd": 32, "bias": False, "dropout": -1.0}),
     "describe no model this code can build (dropout must be between 0 and 1, got -1.0"),
    (dict(model_args={"n_layer": 2, "n_head": 4, "n_embd": 32, "bias": False, "dropout": float("nan")}),
     "describe no model this code can build (dropout must be between 0 and 1, got nan"),
    (dict(config={"kv_quant": None, "xl_mem": None}), None),
    (dict(config={"dataset": 5}), "its config says dataset=5, which is not a string"),
    (dict(config={"block_size": "x"}), "its config says block_size='x', which is not a whole number >= 0"),
    (dict(config={"block_size": -64}), "its config says block_size=-64, which is not a whole number >= 0"),
    (dict(config={"xl_mem": -1}), "its config says xl_mem=-1, which is not a whole number >= 0"),
    (dict(config={"learning_rate": float("nan")}), "its config says learning_rate=nan, which is not a number >= 0"),
])
def test_settings_no_run_writes_are_one_clear_error(tmp_path, edit, words):
    """A file without checksums (another program's) whose settings no training run writes:
    one UserError naming them, not a ValueError or TypeError where they are first used (a nan
    dropout only once training). Settings recorded as None load as not recorded."""
    save_tutorial_layout(tmp_path / "odd.pt", tiny(), **edit)
    if words is None:  # a setting recorded as None reads as not recorded
        load_model(str(tmp_path / "odd.pt"))
        return
    with pytest.raises(UserError, match=words.replace("(", r"\(")):
        load_model(str(tmp_path / "odd.pt"))


def test_a_missing_folder_names_the_folders_here_that_hold_a_checkpoint(tmp_path, monkeypatch):
    """sample.py's default --out_dir=out, run where training wrote another folder: the error
    names it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(outdir, "PROJECT", str(tmp_path / "project"))
    (tmp_path / "out-shakespeare-char-cpu").mkdir()
    (tmp_path / "out-shakespeare-char-cpu" / "last.pt").write_bytes(b"")
    (tmp_path / "notes").mkdir()
    with pytest.raises(UserError) as e:
        read_checkpoint(os.path.join("out", "ckpt.pt"))
    said = str(e.value)
    assert "folders here that hold a checkpoint: out-shakespeare-char-cpu (pass e.g. " \
           "--out_dir=out-shakespeare-char-cpu)" in said and "notes" not in said and "\n" not in said


def test_the_folder_named_first_is_the_likeliest_meant(tmp_path, monkeypatch):
    """Among many folders that hold a checkpoint, a name close to the one given comes first
    (out-shakespeare-char for out-shakespeare-char-cpu); with none close, the newest run."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(outdir, "PROJECT", str(tmp_path / "project"))
    for i, name in enumerate(["a-run", "b-run", "c-run", "out-shakespeare-char-cpu", "z-newest"]):
        (tmp_path / name).mkdir()
        (tmp_path / name / "ckpt.pt").write_bytes(b"")
        os.utime(tmp_path / name / "ckpt.pt", (1e9 + i, 1e9 + i))
    for given, first in (("out-shakespeare-char", "out-shakespeare-char-cpu"), ("out", "z-newest")):
        with pytest.raises(UserError) as e:
            read_checkpoint(os.path.join(given, "ckpt.pt"))
        assert f"folders here that hold a checkpoint: {first}, " in str(e.value) and \
            f"(pass e.g. --out_dir={first})" in str(e.value), str(e.value)


def test_a_folder_here_without_a_checkpoint_names_the_runs_here(tmp_path, monkeypatch):
    """sample.py --out_dir=. (or data, or config) where runs sit in other folders here: the
    error names them, not only how to train into the folder given."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(outdir, "PROJECT", str(tmp_path / "project"))
    (tmp_path / "out-run").mkdir()
    (tmp_path / "out-run" / "last.pt").write_bytes(b"")
    (tmp_path / "data").mkdir()
    for folder in (".", "data"):
        with pytest.raises(UserError) as e:
            read_checkpoint(os.path.join(folder, "ckpt.pt"))
        assert f"and {folder} holds none; folders here that hold a checkpoint: out-run (pass e.g. " \
            "--out_dir=out-run); or train one" in str(e.value), str(e.value)


def test_a_dataset_folder_given_as_out_dir_is_named_so_not_offered_to_train_into(tmp_path, monkeypatch):
    """sample.py --out_dir=data (the datasets) or data/NAME (one of them): the error says it holds
    text, not a run, and never proposes training into it; with a run here, it names that run."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(outdir, "PROJECT", str(tmp_path / "project"))
    (tmp_path / "data" / "tiny").mkdir(parents=True)
    (tmp_path / "data" / "tiny" / "prepare.py").write_text("")
    (tmp_path / "split").mkdir()
    for f in ("train.txt", "val.txt"):
        (tmp_path / "split" / f).write_text("text")
    for folder in ("data", os.path.join("data", "tiny"), "split"):
        with pytest.raises(UserError) as e:
            read_checkpoint(os.path.join(folder, "ckpt.pt"))
        assert f"{folder} holds text to train on, not a run; pass --out_dir=<the folder train.py wrote>" \
            in str(e.value) and "train one" not in str(e.value), str(e.value)
    (tmp_path / "out-run").mkdir()
    (tmp_path / "out-run" / "ckpt.pt").write_bytes(b"")
    with pytest.raises(UserError, match="holds text to train on, not a run; folders here that hold a checkpoint: "
                                        "out-run"):
        read_checkpoint(os.path.join("data", "ckpt.pt"))


def test_an_attention_override_on_a_hybrid_is_one_clear_error(tmp_path):
    """A model mixing linear and softmax layers, run with --attention=naive (for h2o, say): one
    line naming the mix, not GPTConfig's complaint about linear_layers the user never gave;
    --attention=linear (what it is) loads it as saved."""
    model = tiny(attention="linear", linear_layers="0")
    args = {k: getattr(model.config, k) for k in MODEL_ARG_KEYS}
    save_checkpoint(str(tmp_path / "ckpt.pt"), model, None, args, {}, 1, 5.0)
    with pytest.raises(UserError, match=r"--attention=naive: .*ckpt.pt mixes linear attention \(layers 0\) with softmax"):
        load_model(str(tmp_path / "ckpt.pt"), "cpu", {"attention": "naive"})
    loaded, _ = load_model(str(tmp_path / "ckpt.pt"), "cpu", {"attention": "linear"})
    idx = text(T=20)
    torch.testing.assert_close(loaded.eval()(idx)[0], model(idx)[0], **TOL)
    # a softmax checkpoint given linear_layers alone is no hybrid: GPTConfig's own words
    plain = tiny()
    save_checkpoint(str(tmp_path / "plain.pt"), plain, None, {k: getattr(plain.config, k) for k in MODEL_ARG_KEYS},
                    {}, 1, 5.0)
    with pytest.raises(UserError, match="^linear_layers needs --attention=linear"):
        load_model(str(tmp_path / "plain.pt"), "cpu", {"linear_layers": "0"})


@pytest.mark.parametrize("kw", [dict(), dict(n_layer=4, n_kv_head=1, window=8, global_layers="2,3", kv_share=2, bias=False),
                                dict(attention="linear", linear_layers="0"), dict(rope=False, attention="naive")])
def test_the_shape_check_builds_the_shapes_meta_builds_without_allocating(kw):
    """checkpoint's shapes-only build gives every state-dict shape a model built under
    torch.device("meta") has, with no parameter or buffer bigger than half a head on the CPU."""
    config = GPTConfig(**dict(dict(n_layer=2, n_head=4, n_embd=32), **kw))
    with checkpoint._ParametersOnMeta():
        model = GPT(config)
    with torch.device("meta"):
        reference = GPT(config)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    held = [v for v in list(model.parameters()) + list(model.buffers()) if v.device.type != "meta"]
    assert all(v.numel() <= config.head_dim // 2 for v in held)


def test_loading_a_checkpoint_does_not_import_the_compiler(tmp_path):
    """An eager sample.py run never imports torch._dynamo (1.3 s, a third of its start-up):
    neither the checkpoint's shape check nor generate.py's imports pull it in."""
    save_tiny_checkpoint(tmp_path)
    probe = (f"import runpy, sys\nsys.argv = ['sample.py', '--out_dir={tmp_path}', '--max_new_tokens=5', '--device=cpu']\n"
             "try:\n    runpy.run_path('sample.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print('compiler imported' if 'torch._dynamo' in sys.modules else 'compiler not imported')\n")
    proc = run_script("-c", probe)
    assert proc.returncode == 0, proc.stderr
    assert "KV cache peak" in proc.stderr and proc.stdout.strip().endswith("compiler not imported"), proc.stdout


def test_running_a_checkpoint_with_another_attention_says_so(tmp_path, capsys):
    """A model trained with a plug-in attention, run as softmax (what the plug-in error offers):
    a note that its weights compute something else; naive and softmax, the same function, none."""
    model = tiny(attention="tutorial_user_attention:attend")
    args = {k: getattr(model.config, k) for k in MODEL_ARG_KEYS}
    save_checkpoint(str(tmp_path / "ckpt.pt"), model, None, args, {}, 1, 5.0)
    capsys.readouterr()
    load_model(str(tmp_path / "ckpt.pt"), "cpu", {"attention": "softmax"})
    err = capsys.readouterr().err
    assert "was trained with attention=tutorial_user_attention:attend; run as attention=softmax" in err, err
    naive = tiny(attention="naive")
    save_checkpoint(str(tmp_path / "naive.pt"), naive, None, {k: getattr(naive.config, k) for k in MODEL_ARG_KEYS},
                    {}, 1, 5.0)
    load_model(str(tmp_path / "naive.pt"), "cpu", {"attention": "softmax"})
    assert "note" not in capsys.readouterr().err


@pytest.mark.parametrize("change,words", [
    (lambda t: t.to(torch.float8_e4m3fn), "is float8_e4m3fn, not a dense tensor of float32"),
    (lambda t: t.to_sparse(), "is sparse_coo on cpu, not a dense tensor"),
    (lambda t: torch.empty_like(t, device="meta"), "is strided on meta, not a dense tensor"),
    (lambda t: t.to(torch.int8), "is int8, not a dense tensor of float32"),
])
def test_weights_of_another_kind_of_tensor_are_one_line(tmp_path, change, words):
    """Valid torch files whose weights are float8, sparse, on the meta device or integers:
    refused by name before anything reads their values (nan checks crashed on them)."""
    ckpt = torch.load(save_tiny_checkpoint(tmp_path) / "ckpt.pt", weights_only=True)
    ckpt.pop("crc32", None)
    ckpt["model"] = {k: change(v) for k, v in ckpt["model"].items()}
    torch.save(ckpt, tmp_path / "odd.pt")
    with pytest.raises(UserError, match=words):
        load_model(str(tmp_path / "odd.pt"))


@pytest.mark.parametrize("key", ["n_head", "n_layer", "bias"])
def test_model_args_lacking_a_size_say_which_not_gpt2s_defaults(tmp_path, key):
    ckpt = torch.load(save_tiny_checkpoint(tmp_path) / "ckpt.pt", weights_only=True)
    ckpt.pop("crc32", None)
    del ckpt["model_args"][key]
    torch.save(ckpt, tmp_path / "lacks.pt")
    with pytest.raises(UserError, match=f"its model_args lack {key} \\(they hold "):
        load_model(str(tmp_path / "lacks.pt"))
