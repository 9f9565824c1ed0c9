"""
Tests found missing by a mutation audit of the training and I/O side (loader, checkpoints,
resume, one training step, settings, atomic files, KV quantization, peak bits, eval_kv's
measurement). Each compares against a reference computed here from first principles, or a
round trip; none against figures copied from a run.

    python -m pytest -q tests/test_mutants_io.py
"""
import copy
from contextlib import nullcontext

import pytest
import torch

from checkpoint import read_checkpoint, save_checkpoint
from configurator import configure
from conftest import tiny
from fileio import read_json, write_json
from kv.evaluate import load_streams, rebase
from kv.peak import decoder_peak
from kv.policy import KVOptions, held_bits
from kv.quant import ChannelFormat, make_formats, unpack
from kv.xl import make_xl_memory
from loader import ByteLoader
from model import GPT, MODEL_ARG_KEYS, GPTConfig, loss_fn
from resume import incomparable, other_val_batches, restore_training_state, resume_schedule
from steps import estimate_loss, train_step
from utils import UserError


# -- one training step and the evaluation -------------------------------------------------------

class Batches:
    """A loader that hands out the given batches in order."""

    def __init__(self, batches):
        self.batches = iter(batches)

    def next(self):
        return next(self.batches)


def batches(n, B=2, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        s = torch.randint(0, 256, (B, T + 1), generator=g)
        out.append((s[:, :-1], s[:, 1:], torch.zeros(B, dtype=torch.bool)))
    return out


@pytest.mark.parametrize("clip", ["none", "active"])
def test_train_step_is_one_clipped_step_on_the_mean_loss_of_its_micro_batches(clip):
    """train_step: one step on the mean loss of its micro-batches, the gradient clipped to grad_clip (0: never)."""
    model = tiny()
    data = batches(2)
    ref = copy.deepcopy(model)
    loss = sum(loss_fn(ref(x)[0], y) for x, y, _ in data) / len(data)
    loss.backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in ref.parameters()]  # (None: unused)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()
    grad_clip = 0.0 if clip == "none" else norm / 10
    factor = 1.0 if clip == "none" else grad_clip / (norm + 1e-6)  # clip_grad_norm_'s own formula
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    got = train_step(model, optimizer, scaler, Batches(data), nullcontext(), len(data), grad_clip=grad_clip)
    assert got.item() == pytest.approx(loss.item(), rel=1e-6)
    for p, p0, g in zip(model.parameters(), ref.parameters(), grads):
        torch.testing.assert_close(p.detach(), p0.detach() - factor * g, atol=1e-6, rtol=1e-5)
        assert p.grad is None  # ready for the next step


def test_rows_that_restarted_train_without_their_old_xl_memory():
    """train_step: a row the loader moved elsewhere in the text forgets its XL memory (not unrelated text)."""
    model = tiny()
    memory = make_xl_memory(model, 2, 16)
    (x0, _, _), (x, y, _) = batches(2)
    with torch.no_grad():
        model(x0, memory)  # the memory now holds the rows' previous text
    restarted = torch.ones(2, dtype=torch.bool)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    got = train_step(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), Batches([(x, y, restarted)]),
                     nullcontext(), 1, grad_clip=0.0, memory=memory)
    with torch.no_grad():
        assert got.item() == pytest.approx(loss_fn(model(x)[0], y).item(), rel=1e-6)  # as with no memory at all


def test_estimate_loss_is_the_mean_over_every_batch_and_leaves_the_model_training():
    """estimate_loss: each split's mean loss over all its batches, val_mem the val batches read with an XL memory."""
    model = tiny().train()
    sets = {"train": batches(3, seed=1), "val": batches(3, seed=2)}
    out = estimate_loss(model, sets, nullcontext(), mem_len=16, quiet=True)
    assert model.training
    model.eval()
    with torch.no_grad():
        for split, data in sets.items():
            expected = sum(loss_fn(model(x)[0], y).item() for x, y, _ in data) / len(data)
            assert out[split] == pytest.approx(expected, rel=1e-6), split
        memory = make_xl_memory(model, 2, 16)
        expected = sum(loss_fn(model(x, memory)[0], y).item() for x, y, _ in sets["val"]) / 3
    assert out["val_mem"] == pytest.approx(expected, rel=1e-6) and out["val_mem"] != out["val"]


# -- checkpoints and resuming -------------------------------------------------------------------

def test_a_grad_scalers_state_survives_a_checkpoint(tmp_path):
    """An enabled GradScaler (float16 training) is saved in the checkpoint and restored on resume."""
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, bias=False))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    scaler = torch.amp.GradScaler("cpu", init_scale=32.0)
    scaler.scale(torch.ones(()))
    scaler.update(new_scale=123.0)  # a scale the run has learned, not the default
    args = {k: getattr(model.config, k) for k in MODEL_ARG_KEYS}
    path = str(tmp_path / "last.pt")
    save_checkpoint(path, model, optimizer, args, {}, 3, 2.0, scaler=scaler)
    resumed = torch.amp.GradScaler("cpu")
    fresh = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    restore_training_state(read_checkpoint(path), "continue", fresh, resumed, None, (1, 1))
    assert resumed.state_dict() == scaler.state_dict()


def test_a_renamed_entry_is_damage_the_checksums_find(tmp_path):
    """The checksums cover the names in a checkpoint's dicts, not only their values."""
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, bias=False))
    args = {k: getattr(model.config, k) for k in MODEL_ARG_KEYS}
    path = tmp_path / "ckpt.pt"
    save_checkpoint(str(path), model, None, args, {"max_iters": 5, "dataset": "x"}, 3, 2.0)
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["max_iterz"] = ckpt["config"].pop("max_iters")  # damage to a name, the checksums kept
    torch.save(ckpt, path)
    with pytest.raises(UserError, match="checksum mismatch in config"):
        read_checkpoint(str(path))


def stepped(**kw):
    """A tiny model and its AdamW after one step (so that it holds moments)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, bias=False, **kw))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    model(torch.zeros(1, 4, dtype=torch.long))[0].sum().backward()
    optimizer.step()
    return model, optimizer


def test_adamw_moments_are_restored_onto_parameters_of_their_shapes_only():
    """AdamW moments are restored onto parameters of their shapes only (the fused step would not notice)."""
    _, saved = stepped()
    ckpt = {"optimizer": saved.state_dict()}
    off = torch.amp.GradScaler("cpu", enabled=False)
    _, same = stepped()
    same.state.clear()
    restore_training_state(ckpt, "finetune", same, off, None, (1, 1))
    want, got = saved.state_dict()["state"], same.state_dict()["state"]
    assert want.keys() == got.keys() and all(torch.equal(want[i]["exp_avg"], got[i]["exp_avg"]) for i in want)
    _, other = stepped(n_kv_head=1)  # c_attn is narrower: MHA -> MQA
    other.state.clear()
    restore_training_state(ckpt, "finetune", other, off, None, (1, 1))
    assert other.state_dict()["state"] == {}


@pytest.mark.parametrize("max_iters, expected", [(5, ("finetune", 6, 11, 6)), (6, ("finetune", 6, 12, 6)),
                                                 (7, ("continue", 6, 7, 0))])
def test_auto_resume_continues_only_below_max_iters(max_iters, expected):
    """resume_mode=auto continues only when max_iters is past the checkpoint; else it fine-tunes max_iters more."""
    assert resume_schedule({"iter_num": 6}, "auto", max_iters) == expected


def test_auto_resume_of_a_finished_run_with_its_own_max_iters_only_evaluates():
    """A checkpoint whose run reached its max_iters, resumed with the same: nothing to train."""
    ckpt = {"iter_num": 6, "config": {"max_iters": 6}}
    assert resume_schedule(ckpt, "auto", 6) == ("finetune", 6, 6, 6)
    assert resume_schedule(ckpt, "auto", 4) == ("finetune", 6, 10, 6)  # another max_iters: that many more
    assert resume_schedule(ckpt, "finetune", 6) == ("finetune", 6, 12, 6)
    # a fine-tune of 200 from 5000, cut at 5191: its own max_iters is not its end; it trains on
    assert resume_schedule({"iter_num": 5191, "config": {"max_iters": 200}}, "auto", 200) == ("finetune", 5191, 5391, 5191)


def test_another_text_or_other_val_batches_make_the_best_val_loss_incomparable(tmp_path):
    """Another dataset, or other val batches, make a resumed val loss incomparable with the checkpoint's best."""
    eval_set = dict(batch_size=4, eval_iters=2, seed=1)
    ckpt = {"model_args": {"n_layer": 2}, "config": dict(eval_set, dataset=str(tmp_path / "a"), block_size=32)}
    assert incomparable(ckpt, {"n_layer": 2}, 32, str(tmp_path / "a")) == [] == other_val_batches(ckpt, eval_set)
    assert "dataset" in " ".join(incomparable(ckpt, {"n_layer": 2}, 32, str(tmp_path / "b")))
    assert "eval_iters" in " ".join(other_val_batches(ckpt, dict(eval_set, eval_iters=5)))


# -- settings -----------------------------------------------------------------------------------

def test_a_bool_is_not_taken_for_a_number(tmp_path):
    """--n_layer=True (or a config file's n_layer = True) is refused, not read as 1."""
    g = dict(max_iters=10, learning_rate=0.1)
    for name in g:
        with pytest.raises(UserError, match=f"expected {type(g[name]).__name__}, got bool"):
            configure(dict(g), [f"--{name}=True"])
    path = tmp_path / "cfg.py"
    path.write_text("max_iters = False\n")
    with pytest.raises(UserError, match="expected int, got bool"):
        configure(dict(g), [str(path)])


# -- files that never appear half-written --------------------------------------------------------

def test_write_json_that_fails_leaves_the_previous_file(tmp_path):
    """A JSON record whose write fails midway keeps the previous record whole."""
    path = str(tmp_path / "results.json")
    write_json(path, {"rows": [1, 2]})
    with pytest.raises(TypeError):
        write_json(path, {"rows": [object()]})  # a value JSON cannot hold: this write fails
    assert read_json(path) == {"rows": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


# -- KV quantization ----------------------------------------------------------------------------

@pytest.mark.parametrize("far", [False, True], ids=["near0", "far"])
@pytest.mark.parametrize("name", ["int8", "fp8_e4m3", "fp8_e5m2", "int4", "int2"])
def test_every_group_spans_its_whole_code_range_and_nothing_is_clipped(name, far):
    """kv/quant.py's promises: a group's extreme value gets the largest code (no level wasted), and none is clipped."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, 16, generator=g)
    x[..., 3] *= 20
    if far:
        x = 300 + 0.05 * x
    for fmt in make_formats(name, 8, 16, channel_keys=True):
        payload = fmt.quantize(x)
        codes = (unpack(payload[0], fmt.bits) if payload[0].dtype == torch.uint8 else payload[0]).float()
        scale = payload[1].float()
        if name in ("int8", "fp8_e4m3", "fp8_e5m2"):  # symmetric, one scale per row
            qmax = 127.0 if name == "int8" else torch.finfo(payload[0].dtype).max
            floor = x.abs().amax(-1) / qmax < 2 ** -14  # rows under the smallest scale cannot reach qmax
            assert ((codes.abs().amax(-1) == qmax) | floor).all() and not floor.all()
            assert (x.abs().amax(-1, keepdim=True) <= qmax * scale).all()
            continue
        qmax, zero = 2.0 ** fmt.bits - 1, payload[2].float()
        if isinstance(fmt, ChannelFormat):  # one channel over 8 tokens
            groups, codes = x.unflatten(2, (-1, 8)), codes.unflatten(2, (-1, 8))
            scale, zero, dim = scale.unsqueeze(3), zero.unsqueeze(3), 3
        else:  # 8 channels of one token
            groups, codes = x.unflatten(-1, (-1, 8)), codes.unflatten(-1, (-1, 8))
            scale, zero, dim = scale.unsqueeze(-1), zero.unsqueeze(-1), -1
        assert (codes.amax(dim) == qmax).all()
        assert (zero <= groups.amin(dim, keepdim=True)).all()
        assert (zero + qmax * scale >= groups.amax(dim, keepdim=True)).all()


# -- peak KV bits -------------------------------------------------------------------------------

@pytest.mark.parametrize("model_kw, options", [
    (dict(), dict(kv_window=0)),
    (dict(), dict(kv_window=0, kv_quant="int2", kv_quant_group=8, kv_quant_residual=5)),
    (dict(), dict(kv_window=12, kv_quant="int4", kv_quant_group=8, kv_quant_residual=4)),
    (dict(), dict(kv_evict="h2o", kv_budget=20, kv_recent=4, kv_sink=2)),
    (dict(n_layer=4, kv_share=2), dict(kv_window=0, kv_quant="int8", kv_quant_residual=3)),
    (dict(n_layer=3, attention="linear", linear_layers="0,1"), dict(kv_window=0)),
])
def test_decoder_peak_is_the_peak_of_a_real_token_by_token_decode(model_kw, options):
    """decoder_peak is the most bits the real caches hold while the model decodes a text byte by byte."""
    model = tiny(**model_kw)
    kv = KVOptions(**options).check()
    L = 70
    idx = torch.randint(0, 256, (1, L), generator=torch.Generator().manual_seed(0))
    caches = kv.make_caches(model, 1, capacity=L, dtype=torch.float32)
    peak = held_bits(caches)[0]
    with torch.no_grad():
        for t in range(L):
            _, caches = model(idx[:, t:t + 1], caches)
            peak = max(peak, held_bits(caches)[0])
    assert decoder_peak(model, kv, L, dtype=torch.float32) == peak


# -- the data -----------------------------------------------------------------------------------

def test_a_jump_can_land_on_every_start_of_the_period(tmp_path):
    """A row that jumps may start at each of the P = 4 + len(text) places of the first period, and only there."""
    path = tmp_path / "small.txt"
    path.write_bytes(b"abcdefghijklmnopqrstuvwxyz")
    loader = ByteLoader(str(path), block_size=4, batch_size=8, reset_prob=1.0, seed=0)
    seen = set()
    for _ in range(100):
        _, _, restarted = loader.next()
        assert restarted.all()
        seen |= set((loader.state_dict()["pos"] - 4).tolist())
    assert seen == set(range(4 + 26))


# -- eval_kv's measurement --------------------------------------------------------------------

def test_load_streams_are_stretches_of_the_file_from_end_to_end_and_y_is_the_next_byte(tmp_path):
    """eval_kv's streams: the file's bytes at even offsets from its start to its end; y is x one byte on."""
    data = bytes(torch.randint(0, 256, (1000,), generator=torch.Generator().manual_seed(0)).tolist())
    path = tmp_path / "val.txt"
    path.write_bytes(data)
    n, L = 4, 100
    x, y = load_streams(str(path), n, L)
    starts = [data.index(bytes(row.tolist())) for row in x]  # (random bytes: no stretch repeats)
    for row_x, row_y, o in zip(x, y, starts):
        assert bytes(row_x.tolist()) == data[o:o + L] and bytes(row_y.tolist()) == data[o + 1:o + L + 1]
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert starts[0] == 0 and starts[-1] + L + 1 == len(data) and max(gaps) - min(gaps) <= 1


def test_rebase_states_each_row_against_the_baseline():
    """delta_pct: the change in bits per byte from the baseline, in percent; x_smaller: how many times fewer KV bits."""
    rows = [dict(bpb=2.2, kv_bits_peak=250), dict(bpb=1.8, kv_bits_peak=2000)]
    rebase(rows, "base", 1000, 2.0)
    for r in rows:
        assert r["bpb"] == pytest.approx(2.0 * (1 + r["delta_pct"] / 100))
        assert r["kv_bits_peak"] * r["x_smaller"] == pytest.approx(1000)
    assert rows[0]["delta_pct"] > 0 > rows[1]["delta_pct"] and rows[0]["x_smaller"] > 1 > rows[1]["x_smaller"]
