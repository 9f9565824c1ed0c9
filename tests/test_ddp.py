"""
train.py under torchrun (2 CPU processes, gloo), gradient accumulation and torch.compile'd
models. The torchrun runs are real subprocesses; the references they are compared with run
train.py in this process, with a stand-in loader that serves the same rows. Also bfloat16
autocast on the CPU: training against float32, generation with every cache policy.

    python -m pytest -q tests/test_ddp.py
"""
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import utils
from checkpoint import load_model, read_checkpoint, save_checkpoint
from conftest import REPO_ROOT
from model import GPT, MODEL_ARG_KEYS, GPTConfig, softmax_attention
from test_train import TINY, data_dir, train  # noqa: F401 (data_dir is a fixture)
from utils import ByteLoader


def torchrun(*args, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1")
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

    monkeypatch.setattr(utils, "ByteLoader", RanksInTurn)
    printed = train(data_dir, tmp_path / "one", *args)
    ddp, one = read_checkpoint(str(tmp_path / "ddp" / "last.pt")), read_checkpoint(str(tmp_path / "one" / "last.pt"))
    # the plain model's names (no "module." or "_orig_mod."), trained as the single process trained
    assert set(ddp["model"]) == set(GPT(GPTConfig(**ddp["model_args"])).state_dict())
    assert ddp["iter_num"] == 4 and ddp["config"]["gradient_accumulation_steps"] == 2
    assert_close_weights(ddp["model"], one["model"])
    assert logged_losses(proc.stdout) == pytest.approx(logged_losses(printed), abs=2e-4)


def test_accumulated_micro_steps_update_like_one_larger_batch(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(utils, "ByteLoader", Halves)
    whole = train(data_dir, tmp_path / "whole", "--max_iters=3", "--batch_size=8")
    split = train(data_dir, tmp_path / "split", "--max_iters=3", "--batch_size=4", "--gradient_accumulation_steps=2")
    a, b = read_checkpoint(str(tmp_path / "whole" / "last.pt")), read_checkpoint(str(tmp_path / "split" / "last.pt"))
    assert_close_weights(a["model"], b["model"], atol=1e-6)
    assert logged_losses(whole) == pytest.approx(logged_losses(split), abs=1e-5)
    assert len(logged_losses(whole)) == 1  # iteration 2 (log_interval=2)


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


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch, capsys):
    def broken_compile(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("Compiler: cc not found\nmore details")
        return run

    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, bias=False, dropout=0.1))
    monkeypatch.setattr(torch, "compile", broken_compile)
    rng = torch.get_rng_state()
    got = utils.compile_or_eager(model, lambda m: m(torch.zeros(1, 4, dtype=torch.long)))
    assert got is model
    assert torch.equal(torch.get_rng_state(), rng)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: torch.compile failed") and "cc not found" in err[0]


@pytest.mark.parametrize("window", [0, 64])
def test_training_forward_lets_sdpa_use_its_fast_kernels(monkeypatch, window):
    """No explicit mask in training without memory (window 0 or >= T): is_causal=True, which
    SDPA's flash and memory-efficient kernels take."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        calls.append((attn_mask is None, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, window=window, dropout=0.1))
    model(torch.zeros(2, 32, dtype=torch.long), return_states=False)
    assert calls == [(True, True)] * 2


# -- bfloat16 autocast on the CPU ----------------------------------------------------------

def test_pick_dtype_bfloat16_for_cpu_training_only_where_native(monkeypatch):
    for native in (True, False):
        monkeypatch.setattr(utils, "cpu_has_bf16", lambda: native)
        assert utils.pick_dtype("cpu", "auto", training=True) == ("bfloat16" if native else "float32")
        assert utils.pick_dtype("cpu", "") == "float32"  # inference: exact float32
        assert utils.pick_dtype("mps", "auto", training=True) == "float32"
    assert utils.pick_dtype("cpu", "bfloat16") == "bfloat16"
    with pytest.raises(utils.UserError, match="float16 is for GPUs"):
        utils.pick_dtype("cpu", "float16")


def test_cpu_autocast_computes_matmuls_in_bf16_and_attention_in_float32(monkeypatch):
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, bias=False, dropout=0.0))
    idx = torch.randint(0, 256, (2, 16))
    with utils.autocast_ctx("cpu", "bfloat16"):
        logits, _ = model(idx, return_states=False)
    assert logits.dtype == torch.bfloat16  # the matmuls ran in bfloat16
    assert seen == [(torch.float32,) * 3 + (False,)] * 2
    # the attention itself: float32 on the bfloat16 values, rounded back
    q, k, v = torch.randn(3, 2, 2, 16, 8).bfloat16()
    with utils.autocast_ctx("cpu", "bfloat16"):
        got = softmax_attention(q, k, v, "causal")
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, sdpa(q.float(), k.float(), v.float(), is_causal=True).bfloat16())
    with utils.autocast_ctx("cpu", "float32"):
        assert not torch.is_autocast_enabled("cpu")


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


@pytest.mark.parametrize("options", [dict(), dict(kv_quant="int8"), dict(kv_quant="int4", kv_quant_group=8),
                                     dict(kv_evict="h2o", kv_budget=24, kv_recent=8, kv_sink=2),
                                     dict(kv_quant="fp8_e4m3", kv_evict="window", kv_budget=24, kv_sink=2)])
def test_generation_under_cpu_autocast_caches_bf16(options):
    """sample.py --dtype=bfloat16: the caches hold the K/V in bfloat16, every policy runs, and
    with the plain cache, decoding token by token gives the full forward's logits."""
    from kvpolicy import make_cache_factory
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, bias=False, dropout=0.0)).eval()
    idx = torch.randint(0, 256, (1, 40))
    mk = make_cache_factory(**dict(options, kv_quant_residual=4) if "kv_quant" in options else options)
    with torch.no_grad(), utils.autocast_ctx("cpu", "bfloat16"):
        states = model.new_states(1, capacity=40, make_cache=mk)
        logits, states = model(idx[:, :20], states)  # prefill
        steps = [model(idx[:, t:t + 1], states)[0] for t in range(20, 40)]
        full, _ = model(idx, model.new_states(1, capacity=40))
    if not options:
        assert states[0].k.dtype == torch.bfloat16
        torch.testing.assert_close(torch.cat([logits] + steps, 1), full, atol=0.05, rtol=0.05)
    else:
        assert torch.isfinite(torch.cat(steps, 1).float()).all()
        assert 0 < states[0].size_bits() < states[0].tokens() * 2 * 32 * 32  # below a float32 cache
