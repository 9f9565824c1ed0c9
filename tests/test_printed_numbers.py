"""
The numbers the scripts print, recomputed from first principles on tiny models: sample.py's
KV cache peak (bits per sample, MiB, bits per cached token) from the cache geometry (layers x
KV heads x head dim x 2 tensors x stored width, plus scales and zero points per group);
eval_kv.py's bits per byte from one forward of the model with the window as local attention; train.py's parameter count,
tokens per iteration and val loss from the model and its own val batches.
An audit found every number below true; these keep them so.
"""
import dataclasses
import math
import re

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from checkpoint import load_model
from conftest import run_in_process, save_tiny_checkpoint, train
from loader import fixed_batches
from model import GPT

LAYERS, KV_HEADS, HS = 2, 2, 16  # save_tiny_checkpoint's model: 2 layers, 2 heads of 16 channels


def row_bits(kv_quant, group, bits_full):
    """Bits of one token's key (or value) row of one head, stored as kv_quant (no residual)."""
    if kv_quant == "none":
        return HS * bits_full
    if kv_quant in ("int8", "fp8_e4m3"):
        return HS * 8 + 16  # 8-bit codes, one float16 scale per token and head (symmetric)
    bits = int(kv_quant[3:])
    return HS * bits + (HS // group) * 2 * 16  # packed codes, a float16 scale and zero per group


def expected_peak(n, kv_quant="none", group=32, residual=32, keys="token", bits_full=32):
    """Peak bits one sample's caches hold over 1..n tokens (no window), from the geometry."""
    per_group = 1 if kv_quant == "none" or kv_quant[3:] in ("8",) or kv_quant.startswith("fp8") \
        or keys == "token" else group  # tokens quantized together (int4/int2 channel keys: G)
    best = (0, 1)
    for t in range(1, n + 1):
        c = 0 if kv_quant == "none" else max(0, (t - residual) // per_group * per_group)
        full = (t - c) * 2 * HS * bits_full
        if kv_quant != "none" and per_group > 1:  # keys per channel: a scale and zero per channel and G tokens
            k = c * HS * int(kv_quant[3:]) + (c // group) * HS * 2 * 16
            coded = k + c * row_bits(kv_quant, group, bits_full)
        else:
            coded = 2 * c * row_bits(kv_quant, group, bits_full) if c else 0
        bits = LAYERS * KV_HEADS * (full + coded)
        best = max(best, (bits, t))
    return best  # (bits, tokens held then)


def sample_line(folder, *flags, prompt="ab", new=20):
    code, _, err = run_in_process("sample.py", f"--out_dir={folder}", "--device=cpu", f"--start={prompt}",
                                  f"--max_new_tokens={new}", "--seed=1", *flags)
    assert code in (0, None), err
    m = re.search(r"KV cache peak ([\d,]+) bits per sample \(([\d.]+) MiB\), ([\d,.]+) bits per cached token", err)
    assert m, err
    return int(m[1].replace(",", "")), float(m[2]), float(m[3].replace(",", ""))


@pytest.mark.parametrize("flags, quant", [
    ((), dict()),
    (("--kv_quant=int8", "--kv_quant_residual=3"), dict(kv_quant="int8", residual=3)),
    (("--kv_quant=int4", "--kv_quant_group=8", "--kv_quant_residual=4"),
     dict(kv_quant="int4", group=8, residual=4, keys="channel")),
    (("--kv_quant=int2", "--kv_quant_group=4", "--kv_quant_residual=0", "--kv_quant_keys=token"),
     dict(kv_quant="int2", group=4, residual=0)),
])
def test_sample_kv_peak_is_the_cache_geometry(tmp_path, flags, quant):
    """The cache holds prompt + new - 1 tokens (the last byte drawn is never fed), in float32
    on a CPU: peak, MiB and bits per cached token (peak / tokens held then) follow."""
    save_tiny_checkpoint(tmp_path)
    peak, mib, per_token = sample_line(tmp_path, "--kv_window=0", *flags)
    bits, held = expected_peak(2 + 20 - 1, **quant)
    assert peak == bits
    assert mib == round(bits / 8 / 2 ** 20, 2)
    assert per_token == pytest.approx(bits / held, rel=1e-5)


def test_sample_window_and_sink_bound_the_peak(tmp_path):
    save_tiny_checkpoint(tmp_path)
    peak, _, per_token = sample_line(tmp_path, "--kv_window=8", "--kv_sink=2")
    assert peak == (8 + 2) * LAYERS * KV_HEADS * 2 * HS * 32
    assert per_token == LAYERS * KV_HEADS * 2 * HS * 32


def test_sample_bits_per_cached_token_leave_a_linear_state_apart(tmp_path):
    """Linear attention in layer 0, softmax in layer 1: a cached token costs layer 1's K and V
    alone; layer 0's state (S: hs x hs and z: hs per head, float32) is said apart, and the peak
    is both."""
    from checkpoint import save_checkpoint
    from model import GPTConfig, MODEL_ARG_KEYS
    model = GPT(GPTConfig(n_layer=LAYERS, n_head=KV_HEADS, n_embd=KV_HEADS * HS, bias=False, attention="linear",
                          linear_layers="0"))
    save_checkpoint(str(tmp_path / "ckpt.pt"), model, None, {k: getattr(model.config, k) for k in MODEL_ARG_KEYS},
                    {"block_size": 64}, 1, 5.0)
    for window, held in (("--kv_window=8", 8), ("--kv_window=0", 2 + 20 - 1)):
        code, _, err = run_in_process("sample.py", f"--out_dir={tmp_path}", "--device=cpu", "--start=ab",
                                      "--max_new_tokens=20", window)
        assert code in (0, None), err
        m = re.search(r"KV cache peak ([\d,]+) bits per sample \(([\d.]+) MiB\), ([\d,.]+) bits per cached token "
                      r"in the softmax layers, plus ([\d,]+) bits of fixed-size linear-attention state", err)
        assert m, err
        token = KV_HEADS * 2 * HS * 32  # one softmax layer's key and value rows
        state = KV_HEADS * (HS * HS + HS) * 32
        assert float(m[3].replace(",", "")) == token
        assert int(m[4].replace(",", "")) == state
        assert int(m[1].replace(",", "")) == held * token + state


def test_eval_kv_bits_per_byte_is_the_loss_of_the_window_it_names(tmp_path, data_dir):
    """The reference row "plain, window 16": -log2 p(next byte) averaged over the n_streams x
    stream_len bytes at load_streams' offsets of val.txt, for a model whose every layer keeps
    the 16 newest keys and values (a cache's window: a deeper layer's keys carry what their
    own window saw, so it is not a fresh forward over the last 16 bytes). Recomputed here
    by the local-attention masks of one full forward, not through a cache."""
    save_tiny_checkpoint(tmp_path)
    n, L = 2, 48
    code, out, err = run_in_process("eval_kv.py", f"--out_dir={tmp_path}", f"--dataset={data_dir}", "--device=cpu",
                                    f"--n_streams={n}", f"--stream_len={L}", "--dtype=float32",
                                    "--tensorboard=False", "--reference=unbounded", "--kv_window=16")
    assert code in (0, None), err
    row = next(line for line in out.splitlines() if line.startswith("| plain, window 16 (reference)"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    peak, per_token, bpb, kl = int(cells[1].replace(",", "")), float(cells[2].replace(",", "")), \
        float(cells[4]), float(cells[6])
    model, _ = load_model(str(tmp_path / "ckpt.pt"), "cpu")
    block = 16
    local = GPT(dataclasses.replace(model.config, window=block))
    local.load_state_dict(model.state_dict())
    local.eval()
    data = np.fromfile(str(data_dir / "val.txt"), dtype=np.uint8)
    offsets = [i * (len(data) - L - 1) // (n - 1) for i in range(n)]
    s = torch.tensor(np.stack([data[o:o + L + 1] for o in offsets]).astype(np.int64))
    x, y = s[:, :-1], s[:, 1:]
    with torch.no_grad():
        logits, _ = local(x)
    nll = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
    assert bpb == pytest.approx(nll.item() / math.log(2), abs=6e-5)  # (printed to 4 decimals)
    assert kl == 0
    assert peak == min(L, block) * LAYERS * KV_HEADS * 2 * HS * 32  # float32 storage
    assert per_token == pytest.approx(peak / L, abs=0.01)


def test_train_prints_params_tokens_and_val_loss(tmp_path, data_dir):
    """Parameters: every trainable tensor once (the tied embedding once, RoPE's frozen
    frequencies not at all); tokens per iteration: accumulation x batch x block; val loss: the
    mean cross entropy of the checkpoint over train.py's fixed val batches."""
    out = tmp_path / "out"
    printed = train(data_dir, out, "--max_iters=4", "--gradient_accumulation_steps=2")
    C, V = 32, 256
    per_layer = C * 3 * C + C * C + 2 * C * 4 * C + 2 * C  # qkv, proj, mlp, two LayerNorm weights
    params = 2 * per_layer + V * C + C
    assert f"model: {params / 1e6:.2f}M parameters" in printed
    assert f"{2 * 4 * 32:,} tokens per iteration" in printed
    model, ckpt = load_model(str(out / "ckpt.pt"), "cpu")
    model.eval()
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == params
    evaluated = train(data_dir, out, "--init_from=resume", "--eval_only=True")
    val = float(re.search(r"val loss ([\d.]+)", evaluated)[1])
    batches = fixed_batches(str(data_dir / "val.txt"), 32, 4, 2, 1337)
    with torch.no_grad():
        losses = [F.cross_entropy(model(xb)[0].flatten(0, 1).float(), yb.flatten()).item() for xb, yb, _ in batches]
    assert val == pytest.approx(sum(losses) / len(losses), abs=1e-4)
