"""The ruler's accounting against references: the reference is a plain sliding-window forward
at block_size; peak KV bits are what a token-by-token decoder holds, the same at every chunk;
full precision is stored at --dtype; a window of N holds N tokens whichever option says it;
a residual that leaves nothing to quantize is refused; rows land on one baseline's axis."""

import importlib
import math
from dataclasses import replace

import pytest
import torch
from torch.nn import functional as F

import eval_kv
import kv.evaluate as kv_evaluate
from checkpoint import save_checkpoint
from conftest import TOL, feed, text, tiny
from kv import peak as kv_peak
from kv.policy import KVOptions, held_bits
from model import GPT
from utils import UserError, run_main

W = 16  # the natural window (block_size) of these tests

# every policy, with room to quantize inside the window (KVOptions.check)
POLICIES = {
    "plain": dict(),
    "window": dict(kv_evict="window", kv_budget=8, kv_sink=2),
    "h2o": dict(kv_evict="h2o", kv_budget=8, kv_recent=3, kv_sink=2),
    "int8": dict(kv_quant="int8", kv_quant_residual=4),
    "fp8": dict(kv_quant="fp8_e4m3", kv_quant_residual=4),
    "int4": dict(kv_quant="int4", kv_quant_group=4, kv_quant_residual=4),
    "int2": dict(kv_quant="int2", kv_quant_group=4, kv_quant_residual=4),
    "int4+h2o": dict(kv_quant="int4", kv_quant_group=4, kv_quant_residual=2, kv_evict="h2o", kv_budget=8,
                     kv_recent=3, kv_sink=2),
}
MODELS = {"mha": dict(), "local window": dict(window=5, global_layers="1"), "gqa": dict(n_kv_head=2),
          "kv_share": dict(n_kv_head=1, kv_share=2),
          "two linear layers": dict(attention="linear", linear_layers="0,2", n_layer=3)}  # both states count


def settings(**extra):
    return [KVOptions(kv_window=W, **dict(p, **extra)).check() for p in POLICIES.values()]


def streams(B=2, L=48, seed=3):
    s = text(B, L + 1, seed)
    return s[:, :-1], s[:, 1:]


def decoded_peak(model, kv, x, dtype=torch.bfloat16):
    """The reference of decoder_peak: the real model decoding x (B, L) one byte at a time,
    the most bits its caches hold after any step, per stream."""
    caches = kv.make_caches(model, x.size(0), capacity=x.size(1), dtype=dtype)
    peak = 0
    with torch.no_grad():
        for t in range(x.size(1)):
            _, caches = model(x[:, t:t + 1], caches)
            peak = max(peak, held_bits(caches)[0])
    return peak // x.size(0)


@pytest.mark.parametrize("arch", MODELS, ids=list(MODELS))
def test_peak_is_what_a_decoder_holds(arch):
    # 130 bytes: past the horizon after which decoder_peak stops for a bounded cache
    m = tiny(**MODELS[arch])
    x, _ = streams(B=1, L=130)
    for name, kv in zip(POLICIES, settings()):
        start, stop = kv_peak.horizon(kv, m.config, 130)
        assert start == 0 and stop < 130, name
        assert kv_peak.decoder_peak(m, kv, 130) == decoded_peak(m, kv, x), name
    for unbounded in (KVOptions(kv_window=0), KVOptions(kv_window=0, kv_quant="int4", kv_quant_group=4,
                                                         kv_quant_residual=4).check()):
        # only growing: one chunk, then the last tokens one at a time (a local window: all of them)
        start, _ = kv_peak.horizon(unbounded, m.config, 130)
        assert start == (0 if arch == "local window" else 66 - (16 if unbounded.kv_quant != "none" else 0))
        assert kv_peak.decoder_peak(m, unbounded, 130) == decoded_peak(m, unbounded, x)


def test_peak_does_not_depend_on_the_chunk():
    m = tiny(n_kv_head=2)
    x, y = streams()
    ref = KVOptions(kv_window=W)
    by_chunk = {chunk: kv_evaluate.evaluate(m, x, y, settings(), chunk, ref, block=W) for chunk in (1, W, 48)}
    for rows in by_chunk.values():
        assert [r["kv_bits_peak"] for r in rows] == [r["kv_bits_peak"] for r in by_chunk[1]]
    for r, kv in zip(by_chunk[1], settings()):
        assert r["kv_bits_peak"] == decoded_peak(m, kv, x), r["setting"]
        assert r["kv_bits_per_token"] == r["kv_bits_peak"] / 48


def sliding_window_nll(model, x, y, w):
    """The reference's reference: one cacheless forward of the whole stream through the same
    weights with every layer's attention masked to a sliding window of w tokens (the mask a
    local-attention model trains with)."""
    windowed = GPT(replace(model.config, window=w, global_layers="")).eval()
    windowed.load_state_dict(model.state_dict())
    logits, _ = windowed(x)
    return F.cross_entropy(logits.transpose(1, 2), y, reduction="none")


@pytest.mark.parametrize("attention", ["softmax", "naive"])
def test_reference_is_a_sliding_window_forward_at_block_size(attention):
    m = tiny(attention=attention)
    x, y = streams(L=150)
    with torch.no_grad():
        want = sliding_window_nll(m, x, y, W).mean().item() / math.log(2)
    ref = eval_kv.reference_options({"block_size": W}, "natural")
    assert ref == KVOptions(kv_window=W)
    for chunk in (1, 7, W):
        [r] = kv_evaluate.evaluate(m, x, y, [ref], chunk, ref, block=W, dtype=torch.float32)
        assert abs(r["bpb"] - want) < 1e-5 and r["kl_bits"] == 0.0 and r["x_smaller"] == 1.0
    # an XL model's natural context is its memory
    assert eval_kv.reference_options({"block_size": W, "xl_mem": 24}, "natural").kv_window == 24


def test_windowed_reference_costs_T_times_window(monkeypatch):
    # every attention call of the reference pass sees at most window + piece keys, not the stream
    m = tiny()
    seen = []
    for block in m.transformer.h:
        fn = block.attn.attend
        block.attn.attend = lambda q, k, v, mask, p, fn=fn: seen.append(k.size(2)) or fn(q, k, v, mask, p)
    x, y = streams(L=600)
    kv_evaluate.evaluate(m, x, y, [KVOptions(kv_window=W)], W, KVOptions(kv_window=W), block=W)
    piece = kv_evaluate.ReferencePass(m, x, y, KVOptions(kv_window=W)).piece
    assert piece < 600 and max(seen) <= W + piece


def test_full_precision_is_stored_at_dtype():
    m = tiny()
    x, y = streams()
    ref = KVOptions(kv_window=W)
    lo, = kv_evaluate.evaluate(m, x, y, [ref], W, ref, block=W)  # bfloat16 by default
    hi, = kv_evaluate.evaluate(m, x, y, [ref], W, ref, block=W, dtype=torch.float32)
    assert hi["kv_bits_peak"] == 2 * lo["kv_bits_peak"] == 2 * 2 * 4 * 8 * 32 * W  # layers, k/v, heads, hs
    assert lo["bpb"] != hi["bpb"] and abs(lo["bpb"] - hi["bpb"]) < 0.01  # really stored: rounded, a little
    caches = KVOptions(kv_window=W, kv_quant="int8", kv_quant_residual=4).make_caches(m, 1, dtype=torch.bfloat16)
    logits, caches = m(x[:1, :10], caches)
    assert caches[0].k_full.dtype == torch.bfloat16 and logits.dtype == torch.float32
    # bfloat16 storage reads back the same at every chunk: the chunk's own keys are rounded too
    plain = KVOptions(kv_window=0)
    caches_1 = plain.make_caches(m, 2, dtype=torch.bfloat16)
    one = torch.cat([m(x[:, t:t + 1], caches_1)[0] for t in range(48)], dim=1)
    whole, _ = m(x, plain.make_caches(m, 2, dtype=torch.bfloat16))
    torch.testing.assert_close(one, whole, **TOL)


def test_a_window_of_n_is_n_tokens_whichever_option_says_it():
    m = tiny()
    idx = text(T=40)
    for sink in (0, 3):
        ring, caches = feed(m, idx, 1, KVOptions(kv_window=10 - sink, kv_sink=sink))
        evict, evicts = feed(m, idx, 1, KVOptions(kv_evict="window", kv_budget=10, kv_sink=sink).check())
        torch.testing.assert_close(evict, ring, **TOL)
        assert caches[0].tokens() == evicts[0].tokens() == 10
    # h2o with every non-sink token recent is the window too
    h2o, _ = feed(m, idx, 1, KVOptions(kv_evict="h2o", kv_budget=10, kv_recent=7, kv_sink=3).check())
    torch.testing.assert_close(h2o, ring, **TOL)


@pytest.mark.parametrize("kw,words", [
    (dict(kv_window=16, kv_quant="int2"), ["kv_quant_residual=32", "kv_window=16",
                                            "use --kv_quant_keys=token (keys grouped per token, as values) with "
                                            "kv_quant_residual at most 15, or raise kv_window"]),
    (dict(kv_window=16, kv_quant="int4", kv_quant_residual=0), ["use a kv_quant_group of at most 16", "use --kv_quant_keys=token "
                                                                "(keys grouped per token, as values), or raise"]),
    (dict(kv_window=40, kv_quant="int4", kv_quant_group=16), ["kv_quant_group=16", "at most 24"]),
    (dict(kv_window=32, kv_quant="int8"), ["the token that leaves it", "at most 31"]),
    (dict(kv_evict="h2o", kv_budget=20, kv_recent=8, kv_sink=4, kv_quant="int8", kv_quant_residual=16),
     ["kv_quant_residual=16", "21 in all"]),
])
def test_a_residual_that_leaves_nothing_to_quantize_is_refused(kw, words):
    with pytest.raises(UserError) as e:
        KVOptions(**kw).check()
    for w in words:
        assert w in str(e.value), str(e.value)
    assert "at most 0" not in str(e.value) and "at most -" not in str(e.value)  # no way that fixes nothing
    KVOptions(kv_window=64, kv_quant="int4", kv_quant_group=32, kv_quant_residual=32).check()  # just fits


def test_a_local_window_clamps_the_residual_with_a_note():
    m = tiny(window=6, global_layers="1")
    kv = KVOptions(kv_window=0, kv_quant="int4", kv_quant_group=4, kv_quant_residual=8).check()
    residual, note = kv.local_residual(m.config)
    assert residual == 2 and "window 6" in note and "kv_quant_residual=2" in note
    caches = kv.make_caches(m, 1)
    assert caches[0].residual == 2 and caches[1].residual == 8  # the local layer, the global one
    _, caches = feed(m, text(B=1, T=30), 1, kv)
    assert caches[0].k_codes is not None  # something is quantized in the local layer
    assert KVOptions(kv_quant="int4", kv_quant_group=8).local_residual(m.config)[1].endswith("lower kv_quant_group")
    assert KVOptions(kv_window=4, kv_quant="int8", kv_quant_residual=2).local_residual(m.config) == (2, None)


def test_sweep_budgets_follow_the_window_and_fit():
    for span in (32, 64, 4096):
        for kind in ("quick", "full"):
            grid = eval_kv.sweep_settings(kind, span, 16, 32, bounded=span < 4096)
            for s in grid:
                KVOptions(**dict(dict(kv_window=span if span < 4096 else 0), **s)).check()
                if span < 4096:  # the user's --kv_sink joins the window's rows, not the unbounded one
                    KVOptions(**dict(dict(kv_window=span, kv_sink=4), **s)).check()
            assert (dict(kv_window=0, kv_sink=0) in grid) == (span < 4096)
    h2o = [s for s in eval_kv.sweep_settings("quick", 64, 32, 32, bounded=True) if s.get("kv_evict") == "h2o"]
    assert [(s["kv_budget"], s["kv_recent"], s.get("kv_quant_residual")) for s in h2o] == [(16, 8, None), (16, 8, 7)]


# -- the script: one baseline, one axis ----------------------------------------------------

ARGS = dict(n_layer=2, n_head=2, n_embd=32, bias=False, dropout=0.0)


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, data_dir):
    """Two untrained checkpoints on the tiny corpus: plain multi-head (block 32) and MQA (block 16)."""
    out = {}
    for name, kw, block in (("mha", dict(), 32), ("mqa", dict(n_kv_head=1), 16)):
        folder = tmp_path_factory.mktemp(name)
        model_args = dict(ARGS, **kw)
        save_checkpoint(str(folder / "ckpt.pt"), tiny(**model_args), None, model_args,
                        dict(dataset=str(data_dir), block_size=block), 0, 9.9)
        out[name] = folder
    return out


def run_main_out(monkeypatch, capsys, *argv):
    mod = importlib.reload(eval_kv)
    monkeypatch.setattr("sys.argv", ["eval_kv.py", "--device=cpu", "--n_streams=1", "--stream_len=64", *argv])
    run_main(mod.main)
    return capsys.readouterr()


def test_every_run_prints_peak_and_bits_per_token(two_checkpoints, monkeypatch, capsys):
    out = run_main_out(monkeypatch, capsys, f"--out_dir={two_checkpoints['mha']}", "--kv_quant=int4",
                       "--kv_quant_group=16", "--kv_quant_residual=4")
    # the reference: 32 bfloat16 tokens of 2 layers x k/v x 2 heads x 16 channels
    peak = 2 * 2 * 2 * 16 * 16 * 32
    assert f"| plain, window 32 (reference) | {peak:,} | {peak / 64:,.2f} | 1.00 | " in out.out
    row = next(line for line in out.out.splitlines() if line.startswith("| int4/g16/r4, window 32 |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert int(cells[1].replace(",", "")) < peak and cells[2].endswith(f"{int(cells[1].replace(',', '')) / 64:,.2f}")


def test_baseline_puts_another_model_on_the_same_axis(two_checkpoints, monkeypatch, capsys):
    mha, mqa = two_checkpoints["mha"], two_checkpoints["mqa"]
    alone = run_main_out(monkeypatch, capsys, f"--out_dir={mha}").out
    out = run_main_out(monkeypatch, capsys, f"--out_dir={mqa}", f"--baseline={mha}").out
    # the MQA model's reference: 16 tokens of one KV head, against the plain model's 32 of two
    base_peak, peak = 2 * 2 * 2 * 16 * 16 * 32, 2 * 2 * 1 * 16 * 16 * 16
    assert f"| plain, window 16 (reference) | {peak:,} | {peak / 64:,.2f} | {base_peak / peak:.2f} | " in out
    bpb_base = float(next(l for l in alone.splitlines() if l.startswith("| plain, window 32")).split("|")[5])
    assert f"{bpb_base:.4f} bits per byte, {base_peak:,} peak KV bits" in out


def test_a_difference_that_rounds_to_nothing_has_no_minus_sign():
    """A compiled reference a rounding error below the baseline's pass read -0.00% in the table."""
    from kv.report import signed_pct
    assert [signed_pct(x) for x in (-0.001, 0.004, -0.0, -0.006, 1.234)] == ["+0.00%", "+0.00%", "+0.00%", "-0.01%", "+1.23%"]


def test_an_option_not_yet_built_in_is_followed_token_by_token(monkeypatch):
    """A new cache option (KVOptions.others() names it) may bound its cache in a way horizon()
    does not know: the decoder's peak is then followed over every token, not guessed."""
    kv = KVOptions(kv_window=0)
    assert kv_peak.horizon(kv, tiny().config, 130)[0] > 0  # only growing: the early tokens in one chunk
    monkeypatch.setattr(KVOptions, "others", lambda self: [("kv_new_bound", 16)])
    assert kv_peak.horizon(kv, tiny().config, 130) == (0, 130)
