"""eval_kv.py against references: the plain forward's loss, KL 0 when nothing is lost, the
sweep's files (the PNG opens), and one clear line for every kind of bad input."""

import csv
import importlib
import math
import os
import shutil

import pytest
import torch
from torch.nn import functional as F

import eval_kv
import kv.evaluate as kv_evaluate
from checkpoint import load_model, save_checkpoint
from conftest import assert_user_error, feed, run_in_process, run_script, tiny
from kv.policy import KVOptions
from utils import run_main

ARGS = dict(n_layer=2, n_head=2, n_embd=32, bias=False, dropout=0.0)
PLAIN = KVOptions(kv_window=0)  # the reference: the plain, unbounded cache


def tiny_model(**kw):
    return tiny(**dict(ARGS, **kw))


@pytest.fixture
def ckpt_dir(tmp_path, tiny_data_dir):
    """A checkpoint trained for a few steps on the tiny corpus (so attention is not uniform)."""
    model = tiny_model()
    data = torch.frombuffer(bytearray((tiny_data_dir / "train.txt").read_bytes()), dtype=torch.uint8).long()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(30):
        starts = torch.randint(0, len(data) - 33, (8,), generator=g)
        batch = torch.stack([data[s:s + 33] for s in starts])
        loss = model.loss(model(batch[:, :-1])[0], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path / "out"
    out.mkdir()
    config = dict(dataset=str(tiny_data_dir), block_size=32)
    save_checkpoint(str(out / "ckpt.pt"), model, None, ARGS, config, 30, loss.item())
    return out


def streams(tiny_data_dir, n=2, L=96):
    return kv_evaluate.load_streams(str(tiny_data_dir / "val.txt"), n, L)


def run(model, x, y, settings, chunk=16):
    """kv_evaluate.evaluate of settings (dicts of KVOptions fields) against the plain cache, every
    cache in float32 (so that the plain cache reproduces the forward exactly)."""
    return kv_evaluate.evaluate(model, x, y, [KVOptions(**s).check() for s in settings], chunk, PLAIN, block=16,
                            dtype=torch.float32)


def resave(ckpt, path):
    """torch.save a checkpoint edited by a test, its checksums (where it has them) brought up to date."""
    if "crc32" in ckpt:
        from checkpoint import checksum
        ckpt["crc32"] = {k: checksum(v) for k, v in ckpt.items() if k != "crc32"}
    torch.save(ckpt, path)


def test_plain_cache_reproduces_the_forward_loss_with_kl_zero(tiny_data_dir):
    m = tiny_model()
    x, y = streams(tiny_data_dir)
    loss = F.cross_entropy(m(x)[0].flatten(0, 1), y.flatten()).item() / math.log(2)
    # the plain cache again, through kv_trim (whose cache keeps everything when kv_window=0):
    # a cache of its own, so it is fed in lockstep and its KL computed
    trim = dict(kv_window=0, kv_trim="kv.cache:keep_recent")
    for chunk in (1, 16, 96):
        none, hooked = run(m, x, y, [dict(kv_window=0), trim], chunk)
        assert none["bpb"] == none["bpb_ref"] and none["kl_bits"] == 0.0
        assert abs(none["bpb"] - loss) < 1e-5
        assert abs(hooked["bpb"] - loss) < 1e-5 and hooked["kl_bits"] < 1e-6  # float rounding only
        assert none["x_smaller"] == 1.0 and none["delta_pct"] == 0.0  # the reference is the baseline
        assert none["kv_bits_per_token"] == 2 * 2 * 2 * 16 * 32  # layers, k and v, heads, head dim, fp32
    buckets = [k for k in none if k.startswith("bpb[")]
    assert buckets == ["bpb[0,16)", "bpb[16,32)", "bpb[32,64)", "bpb[64,96)"]


def test_plain_pass_in_segments_equals_one_pass(tiny_data_dir, monkeypatch):
    m = tiny_model(attention="naive")  # not fused: the plain pass reads REF_CHUNK bytes at a time
    x, y = streams(tiny_data_dir)
    whole = run(m, x, y, [dict()], 16)[0]
    monkeypatch.setattr(kv_evaluate, "REF_CHUNK", 24)  # 32-byte segments (a multiple of the chunk)
    parts = run(m, x, y, [dict(), dict(kv_quant="int8")], 16)
    assert abs(parts[0]["bpb"] - whole["bpb"]) < 1e-5 and parts[1]["kl_bits"] > 0


@pytest.mark.parametrize("options", [
    dict(kv_evict="h2o", kv_budget=500, kv_recent=8, kv_sink=4),
    dict(kv_evict="window", kv_budget=96, kv_sink=4),
    dict(kv_quant="int4", kv_quant_group=16, kv_quant_residual=200),  # everything stays in the residual
])
def test_lossless_settings_equal_the_plain_cache(tiny_data_dir, options):
    m = tiny_model(n_kv_head=1)
    x, y = streams(tiny_data_dir)
    _, r = run(m, x, y, [dict(), options], 1)
    assert abs(r["bpb"] - r["bpb_ref"]) < 1e-5 and r["kl_bits"] < 1e-6  # float32 rounding only


def test_what_a_chunk_scores_like_the_decoder_and_what_not(tiny_data_dir):
    """The chunk note's claims: a cache that quantizes each token as it arrives (no residual,
    keys per token) scores alike at any chunk; with a full-precision residual, a chunk reads its
    older tokens quantized where the decoder (chunk 1) still holds them in full precision."""
    m = tiny_model()
    x, y = streams(tiny_data_dir)
    at_once = dict(kv_quant="int4", kv_quant_group=16, kv_quant_keys="token", kv_quant_residual=0)
    residual = dict(kv_quant="int4", kv_quant_group=16, kv_quant_keys="token", kv_quant_residual=8)
    (_, a1, r1), (_, a32, r32) = (run(m, x, y, [dict(), at_once, residual], chunk) for chunk in (1, 32))
    assert abs(a1["bpb"] - a32["bpb"]) < 1e-6 and a1["kl_bits"] == pytest.approx(a32["kl_bits"], rel=0.05)
    assert abs(r1["bpb"] - r32["bpb"]) > 1e-5 and r32["kl_bits"] > 1.5 * r1["kl_bits"]  # further from the reference
    for options, noted in ((at_once, False), (residual, True), (dict(at_once, kv_quant_keys="channel"), True),
                           (dict(kv_quant="int8", kv_quant_residual=0), False), (dict(kv_window=8), False)):
        assert bool(eval_kv.chunk_note([KVOptions(**options).check()], 32)) == noted, options
        assert eval_kv.chunk_note([KVOptions(**options).check()], 1) == ""


def test_a_trim_rule_is_scored_by_the_decoder_alone_and_a_chunk_says_so(ckpt_dir, tiny_data_dir, tmp_path):
    """A kv_trim rule that keeps fewer tokens than its window (the newest half) changes what the
    decoder reads; a chunk applies it once per chunk, its queries reading every token of the
    chunk, so chunk 32 scores otherwise than chunk 1 (the decoder), and the chunk note says so;
    a rule equal to the window scores alike at any chunk, with no note."""
    (tmp_path / "half.py").write_text(
        "def keep_half(k, v, pos, kv_window, kv_sink=0):\n"
        "    keep = pos >= pos[-1] - kv_window // 2 + 1\n"
        "    return k[:, :, keep], v[:, :, keep], pos[keep]\n")
    m = load_model(str(ckpt_dir / "ckpt.pt"))[0].eval()  # trained a little: its attention is not uniform
    x, y = streams(tiny_data_dir)
    half, window = dict(kv_window=16, kv_trim=f"{tmp_path / 'half.py'}:keep_half"), dict(kv_window=16)
    (_, w1, h1), (_, w32, h32) = (run(m, x, y, [dict(), window, half], chunk) for chunk in (1, 32))
    assert abs(w32["bpb"] - w1["bpb"]) < 1e-5  # the window alone: alike
    assert abs(h1["bpb"] - w1["bpb"]) > 20 * abs(w32["bpb"] - w1["bpb"]) + 1e-4, (h1["bpb"], w1["bpb"])
    assert abs(h32["bpb"] - h1["bpb"]) > 20 * abs(w32["bpb"] - w1["bpb"]) + 1e-4, (h32["bpb"], h1["bpb"])
    note = eval_kv.chunk_note([KVOptions(**half).check()], 32)
    assert "a kv_trim rule runs once per chunk" in note and eval_kv.chunk_note([KVOptions(**half).check()], 1) == ""
    assert eval_kv.chunk_note([KVOptions(**window).check()], 32) == ""


def test_kl_and_bucket_bits_are_those_of_the_logits(tiny_data_dir):
    """The documented quantities, computed independently from the setting's own logits (the
    same cache fed the same chunks): kl_bits is the mean KL(reference || setting) in bits
    (F.kl_div's KL(target || input)), not the reverse; each bucket is bits per byte like the
    overall figure, so the buckets weighted by their lengths average to it."""
    m = tiny_model()
    with torch.no_grad():
        m.transformer.ln_f.weight *= 20  # peaky next-byte distributions: the two KLs differ
    x, y = streams(tiny_data_dir)
    _, r = run(m, x, y, [dict(), dict(kv_window=8)], 16)
    lp_ref = F.log_softmax(m(x)[0], dim=-1)  # the plain cache is the full forward
    lp = F.log_softmax(feed(m, x, 16, KVOptions(kv_window=8))[0], dim=-1)
    kl = F.kl_div(lp, lp_ref, log_target=True, reduction="none").sum(-1).mean().item() / math.log(2)
    reverse = F.kl_div(lp_ref, lp, log_target=True, reduction="none").sum(-1).mean().item() / math.log(2)
    assert abs(kl - reverse) > 0.01 * kl
    assert r["kl_bits"] == pytest.approx(kl, rel=1e-4)
    bpb = F.cross_entropy(lp.flatten(0, 1), y.flatten()).item() / math.log(2)
    assert r["bpb"] == pytest.approx(bpb, rel=1e-5)
    weighted = sum((hi - lo) * r[f"bpb[{lo},{hi})"] for lo, hi in kv_evaluate.buckets(16, x.size(1))) / x.size(1)
    assert weighted == pytest.approx(r["bpb"], rel=1e-5)


def test_compression_costs_bits_and_saves_memory(tiny_data_dir):
    m = tiny_model()
    x, y = streams(tiny_data_dir)
    settings = [dict(), dict(kv_quant="int2", kv_quant_group=16, kv_quant_residual=0),
                dict(kv_evict="h2o", kv_budget=24, kv_recent=8, kv_sink=4)]
    none, int2, h2o = run(m, x, y, settings, 1)
    assert int2["kl_bits"] > 1e-7 and h2o["kl_bits"] > 1e-7  # (a random model is nearly uniform)
    # int2, groups of 16: 2 bits + 2 x 16 / 16 per value; its peak per stream comes just
    # before the last key group fills (15 float32 keys in the residual, 80 tokens as codes)
    per_value = 2 * 2 * 2 * 16  # layers, k/v, heads, head dim
    assert int2["kv_bits_peak"] == per_value * (80 * 4 + 15 * 32)
    assert int2["x_smaller"] == none["kv_bits_peak"] / int2["kv_bits_peak"] > 3
    assert h2o["kv_bits_peak"] == per_value * 32 * 24  # fp32, the budget (the current token included)
    assert h2o["kv_bits_per_token"] < none["kv_bits_per_token"] / 2
    assert 1 in eval_kv.frontier([none, int2, h2o])  # fewer bits than none, better than... whatever is below it


def test_buckets_and_frontier():
    assert kv_evaluate.buckets(64, 4096) == [(0, 64), (64, 128), (128, 256), (256, 512), (512, 1024),
                                         (1024, 2048), (2048, 4096)]
    assert kv_evaluate.buckets(64, 100) == [(0, 64), (64, 100)]
    pts = [dict(kv_bits_per_token=b, bpb=l) for b, l in [(16, 2.0), (8, 2.1), (8, 2.05), (4, 2.3), (6, 2.4), (2, 3.0)]]
    assert eval_kv.frontier(pts) == {0, 2, 3, 5}
    # the grids give eviction budgets as fractions of the stream; h2o keeps half of it recent
    h2o = [s for s in eval_kv.sweep_settings("quick", 4096, 32, 32) if s.get("kv_evict") == "h2o"]
    assert [(s["kv_budget"], s["kv_recent"], s.get("kv_quant_residual")) for s in h2o] == [(1024, 512, None),
                                                                                        (1024, 512, 32)]


def test_points_above_the_plot_are_labelled_inside_it_without_overlap(tmp_path, monkeypatch):
    """Settings far worse than the rest are drawn at the top edge with a label: each label lies
    inside the figure (at the left edge too) and none covers another."""
    import kv.report as report
    figures = []
    monkeypatch.setattr(report, "save_png", lambda fig, path: figures.append(fig))
    rows = [dict(setting="plain, window 64 (reference)", kv_bits_per_token=256.0, bpb=2.0)]
    rows += [dict(setting=f"a setting with a long name number {n}, window 64", kv_bits_per_token=x, bpb=2.0 + 0.001 * n)
             for n, x in enumerate([4.0, 16.0, 64.0, 128.0])]
    rows += [dict(setting=f"a far worse setting with a long name number {n}, window 64", kv_bits_per_token=x, bpb=3.5)
             for n, x in enumerate([5.0, 6.0, 9.0, 200.0, 210.0, 16384.0])]
    for r in rows:
        r.update(bpb_base=2.0, baseline="plain, window 64")
    import matplotlib.pyplot as plt
    monkeypatch.setattr(plt, "close", lambda fig: None)
    report.plot(rows, str(tmp_path / "p.png"), "a title")
    [fig] = figures
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in fig.axes[0].texts]
    assert len(boxes) == 6
    width, height = fig.canvas.get_width_height()
    for n, a in enumerate(boxes):
        assert a.x0 >= 0 and a.x1 <= width and a.y0 >= 0 and a.y1 <= height
        assert not any(a.overlaps(b) for b in boxes[n + 1:])


def test_quick_sweep_writes_csv_markdown_and_png(ckpt_dir):
    proc = run_script("eval_kv.py", f"--out_dir={ckpt_dir}", "--sweep=quick", "--n_streams=2",
                      "--stream_len=160", "--kv_quant_group=16", "--device=cpu")
    assert proc.returncode == 0, proc.stderr
    prefix = ckpt_dir / "eval_kv_quick"
    with open(f"{prefix}.csv") as f:
        rows = list(csv.DictReader(f))
    # the reference (the checkpoint's block_size of 32 as a sliding window), the plain cache
    # read past it, and the grid's 7 settings, budgets scaled to the window
    assert len(rows) == 9 and rows[0]["setting"] == "plain, window 32 (reference)" and float(rows[0]["kl_bits"]) == 0.0
    assert rows[1]["setting"] == "plain, unbounded"
    assert any(r["setting"] == "int4/g16/r4/token-keys + h2o 10 (recent 5, sink 4), window 32" for r in rows)
    md = (ckpt_dir / "eval_kv_quick.md").read_text()
    assert "| setting | peak KV bits/stream | bits/token" in md and "Within 1% of the baseline" in md
    # the chunk's caveat (its quantized and evicting rows score otherwise than their bits' decoder)
    # is kept in the file, above the table, as said on the terminal
    [caveat] = [line for line in proc.stderr.splitlines() if line.startswith("note: at chunk 32")]
    assert caveat in md and md.index(caveat) < md.index("| setting")
    import matplotlib.image
    img = matplotlib.image.imread(f"{prefix}.png")
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert list(prefix.glob("events.out.tfevents.*"))  # TensorBoard scalars
    assert "bits/byte" in proc.stdout
    # another attention than the checkpoint's: named in the title and the file names, and the
    # checkpoint's own sweep stays as it was
    before = (ckpt_dir / "eval_kv_quick.csv").read_text()
    proc = run_script("eval_kv.py", f"--out_dir={ckpt_dir}", "--sweep=quick", "--n_streams=2", "--stream_len=160",
                      "--kv_quant_group=16", "--device=cpu", "--attention=naive")
    assert proc.returncode == 0, proc.stderr
    assert (ckpt_dir / "eval_kv_quick.csv").read_text() == before
    assert ", attention=naive" in (ckpt_dir / "eval_kv_quick_attention-naive.md").read_text().splitlines()[0]
    # scored by the decoder itself (chunk 1): no caveat, in the file or on the terminal
    proc = run_script("eval_kv.py", f"--out_dir={ckpt_dir}", "--sweep=quick", "--n_streams=1", "--stream_len=64",
                      "--kv_quant_group=16", "--device=cpu", "--chunk=1")
    assert proc.returncode == 0 and "note: at chunk" not in proc.stderr, proc.stderr
    [written] = [w for w in proc.stdout.split("wrote ")[1].split(", ") if w.endswith(".md")]
    assert "chunk" in written and "note: at chunk" not in open(written).read()
    assert open(written).readline().count("chunk") == 1  # the title says the chunk once


def test_a_sweep_with_sinks_says_where_they_sit_as_one_setting_does(ckpt_dir):
    """--kv_sink adds sinks to a sweep's rows: past the 32 tokens the model was trained with they
    sit at distances it never saw, which the sweep says as the same setting alone does."""
    sink = "the kv_sink=2 first tokens sit at distances its layers never saw"
    common = [f"--out_dir={ckpt_dir}", "--n_streams=1", "--device=cpu", "--kv_sink=2"]
    for args in (["--sweep=quick", "--kv_quant_group=16"], ["--kv_window=32"]):
        proc = run_script("eval_kv.py", *common, "--stream_len=96", *args)
        assert proc.returncode == 0 and sink in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    proc = run_script("eval_kv.py", *common, "--stream_len=32", "--sweep=quick", "--kv_quant_group=16")  # (within it)
    assert proc.returncode == 0 and sink not in proc.stdout + proc.stderr, proc.stderr


def test_tensorboard_scalars_of_a_rerun_replace_the_last_ones(tmp_path):
    """Like the CSV, a rerun's TensorBoard scalars are its own table: one events file, this run's."""
    from kv.report import tensorboard_writer
    for value in (1.0, 2.0):
        with tensorboard_writer(str(tmp_path / "tb")) as tb:
            tb.add_scalar("x", value, 0)
    [events] = (tmp_path / "tb").glob("events.out.tfevents.*")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("x")] == [2.0]


def main_error(monkeypatch, capsys, *argv):
    """Run eval_kv.main in-process (a fresh module: it keeps its settings in globals)."""
    mod = importlib.reload(eval_kv)
    monkeypatch.setattr("sys.argv", ["eval_kv.py", *map(str, argv)])
    with pytest.raises(SystemExit) as e:
        run_main(mod.main)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("args,words", [
    (["--kv_quant=int7"], "unknown kv_quant"),
    (["--kv_evict=h2o", "--kv_budget=8", "--kv_recent=8", "--kv_sink=4"], "smaller than kv_sink + kv_recent"),
    (["--kv_quant=int4", "--kv_quant_group=12", "--kv_quant_residual=8"], "does not divide the head dimension 16"),
    (["--kv_evict=h2o", "--kv_budget=10.5"], "--kv_budget: expected int"),  # whole tokens
    (["--sweep=huge"], "unknown sweep"),
    (["--sweep=quick", "--kv_quant=int8"], "runs its own grid"),
    (["--sweep=quick", "--kv_recent=4"], "runs its own grid of cache settings: drop --kv_recent"),  # not "add kv_evict"
    (["--sweep=quick", "--kv_quant_keys=token"], "drop --kv_quant_keys"),  # the grid chooses its keys: never ignored
    (["--stream_len=1000000"], "lower --stream_len"),
    (["--dataset=/nonexistent/data"], "no train.txt and val.txt"),
    (["--checkpoint_name=nope"], "not found"),
    (["--reference=unbounded", "--kv_sink=4"], "nothing is dropped here"),  # settings that would do nothing
    (["--kv_evict=window", "--kv_budget=16", "--kv_recent=4"], "drop --kv_recent"),
    (["--kv_quant=int8", "--kv_quant_group=16"], "applies to int4 and int2"),
    (["--kv_quant=exercises.kv_quant:quantize", "--kv_quant_keys=token"], "applies to int4 and int2"),  # whole rows
    (["--kv_quant_residual=8"], "applies to a quantized cache"),
    (["--kv_trim=kv.cache:keep_recent", "--kv_window=0"], "has no bound"),  # it would never be called
    (["--kv_quant=int4", "--kv_quant_group=-4"], "kv_quant_group must be an integer >= 1"),
    (["--kv_quant=exercises.kv_quant:quantize", "--kv_quant_residual=8"], "not implemented yet: assignment 4"),  # a stub
])
def test_bad_input_is_one_clear_line(ckpt_dir, monkeypatch, capsys, args, words):
    line = main_error(monkeypatch, capsys, f"--out_dir={ckpt_dir}", "--device=cpu", *args)
    assert words in line, line


def test_linear_attention_has_no_cache_to_set(tiny_data_dir, tmp_path, monkeypatch, capsys):
    """Every layer linear: a fixed-size state. Cache options are refused rather than reported
    as rows that did nothing, and the reference is the whole stream, not a window."""
    out = tmp_path / "lin"
    out.mkdir()
    args = dict(ARGS, attention="linear")
    save_checkpoint(str(out / "ckpt.pt"), tiny_model(attention="linear"), None, args,
                    dict(dataset=str(tiny_data_dir), block_size=32), 1, 5.0)
    for bad in (["--kv_quant=int8"], ["--kv_window=16"], ["--sweep=quick"], ["--kv_evict=h2o", "--kv_budget=16"]):
        line = main_error(monkeypatch, capsys, f"--out_dir={out}", "--device=cpu", *bad)
        assert "every layer of this model is linear attention" in line, line
    proc = run_script("eval_kv.py", f"--out_dir={out}", "--device=cpu", "--n_streams=1", "--stream_len=64")
    assert proc.returncode == 0, proc.stderr
    assert "history bound none" in proc.stdout + proc.stderr


def test_checkpoint_without_val_data(ckpt_dir, tmp_path, monkeypatch, capsys):
    ckpt = torch.load(ckpt_dir / "ckpt.pt", weights_only=True)
    ckpt["config"] = {"block_size": 32}
    resave(ckpt, ckpt_dir / "nodata.pt")
    line = main_error(monkeypatch, capsys, f"--out_dir={ckpt_dir}", "--checkpoint_name=nodata")
    assert "does not say which dataset" in line
    empty = tmp_path / "empty"
    empty.mkdir()
    line = main_error(monkeypatch, capsys, f"--out_dir={ckpt_dir}", f"--dataset={empty}")
    assert "no train.txt and val.txt" in line


def test_missing_checkpoint_from_the_command_line(tmp_path):
    proc = run_script("eval_kv.py", f"--out_dir={tmp_path}/nowhere", "--kv_quant=int8")
    assert_user_error(proc, "nowhere' does not exist", "python download_pretrained.py")


def test_xl_mem_of_the_checkpoint_bounds_the_history(ckpt_dir, monkeypatch, capsys):
    ckpt = torch.load(ckpt_dir / "ckpt.pt", weights_only=True)
    ckpt["config"]["xl_mem"] = 24
    resave(ckpt, ckpt_dir / "xl.pt")
    mod = importlib.reload(eval_kv)
    monkeypatch.setattr("sys.argv", ["eval_kv.py", f"--out_dir={ckpt_dir}", "--checkpoint_name=xl",
                                     "--stream_len=64", "--n_streams=1", "--kv_quant=int8", "--kv_quant_residual=8"])
    mod.main()
    out = capsys.readouterr()
    assert "history bound 24" in out.err
    # the reference holds the last 24 tokens: 2 layers x k/v x 2 heads x 16 channels x 16
    # bits (bfloat16) each; per token of the 64-byte stream
    peak = 2 * 2 * 2 * 16 * 16 * 24
    assert f"| plain, window 24 (reference) | {peak:,} | {peak / 64:,.2f} | 1.00 |" in out.out
    assert "| int8/r8, window 24 |" in out.out


def test_notes_on_chunked_compression_and_a_baseline_of_another_dataset(ckpt_dir, tiny_data_dir, monkeypatch, capsys):
    """At chunk > 1 a quantized or evicting row is not the token-by-token decoder its bits
    describe, and a baseline trained on other text reads text it never learned: each said,
    and only where it applies."""
    ckpt = torch.load(ckpt_dir / "ckpt.pt", weights_only=True)
    ckpt["config"]["dataset"] = "svejk_char"
    resave(ckpt, ckpt_dir / "other.pt")
    ckpt["config"]["dataset"] = os.path.relpath(tiny_data_dir) + "/"  # the scored folder, written another way
    resave(ckpt, ckpt_dir / "same.pt")

    def notes(*args):  # the note lines of one run, with the settings' defaults reset
        monkeypatch.setattr("sys.argv", ["eval_kv.py", f"--out_dir={ckpt_dir}", "--stream_len=64", "--n_streams=1",
                                         *args])
        importlib.reload(eval_kv).main()
        return [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]

    said = notes("--kv_quant=int8", "--kv_quant_residual=8", f"--baseline={ckpt_dir / 'other.pt'}")
    chunked = [n for n in said if n.startswith("note: at chunk 32 a chunk's tokens past the full-precision residual")]
    assert len(chunked) == 1 and "eviction" not in chunked[0]  # only what this run does
    assert any(f"{ckpt_dir / 'other.pt'} was trained on svejk_char" in n for n in said)
    said = notes("--kv_evict=h2o", "--kv_budget=16")
    chunked = [n for n in said if n.startswith("note: at chunk 32 eviction runs once per chunk")]
    assert len(chunked) == 1 and "precision" not in chunked[0]
    # a residual and a key group that fill the 32-token window hold more than the plain window
    bigger = [n for n in notes("--kv_quant=int4", "--kv_quant_group=16", "--kv_quant_residual=16", "--chunk=1")
              if "hold at least the reference's bits" in n]
    assert len(bigger) == 1 and bigger[0].startswith("note: int4/g16/r16, window 32 hold")
    assert not [n for n in notes("--kv_quant=int8", "--kv_quant_residual=8") if "reference's bits" in n]
    # a format wider than full precision, with a residual of 4 of the 32 tokens: the format is named, not the residual
    bigger = [n for n in notes("--kv_quant=tutorial_user_quantizer:wide_codes", "--kv_quant_residual=4", "--chunk=1")
              if "hold at least the reference's bits" in n]
    assert len(bigger) == 1 and "as many bits per value as full precision" in bigger[0] and "residual" not in bigger[0]
    # every token quantized, yet unbounded against the 32-token window: the note says that, not the residual
    bigger = [n for n in notes("--kv_quant=int8", "--kv_quant_residual=0", "--kv_window=0")
              if "hold at least the reference's bits" in n]
    assert len(bigger) == 1 and "more tokens than the reference's bound" in bigger[0] and "residual" not in bigger[0]
    # unbounded with a residual of 16, over 256 bytes: the residual fills half the reference's window but a
    # sliver of what the row keeps; the tokens kept are the reason
    bigger = [n for n in notes("--kv_quant=int8", "--kv_quant_residual=16", "--kv_window=0", "--stream_len=256")
              if "hold at least the reference's bits" in n]
    assert len(bigger) == 1 and "more tokens than the reference's bound" in bigger[0] and "residual" not in bigger[0]
    for args in (["--kv_quant=int8", "--kv_quant_residual=8", "--chunk=1"],  # the decoder itself
                 ["--kv_window=16"],  # nothing approximate at chunk 32
                 [f"--baseline={ckpt_dir / 'same.pt'}"]):
        assert not [n for n in notes(*args) if n.startswith("note: at chunk") or "was trained on" in n], args


def test_rows_a_chunk_cannot_tell_apart_are_said_to_be_alike(tiny_data_dir):
    """With key groups of 8 at chunk 16, residuals of 4 and 8 quantize the same tokens before
    any query reads them: the rows score alike (said, as their bits still differ); the decoder
    (chunk 1) tells them apart."""
    m = tiny_model()
    x, y = streams(tiny_data_dir)
    rows = [dict(kv_quant="int4", kv_quant_group=8, kv_quant_residual=r) for r in (4, 8)] + [dict(kv_quant="int8")]
    settings = [KVOptions(**s).check() for s in rows]
    chunked, decoded = run(m, x, y, rows, 16), run(m, x, y, rows, 1)
    assert chunked[0]["bpb"] == chunked[1]["bpb"] and chunked[0]["kv_bits_peak"] != chunked[1]["kv_bits_peak"]
    assert eval_kv.residual_twins(settings, chunked) == [f"{chunked[0]['setting']} and {chunked[1]['setting']}"]
    assert decoded[0]["bpb"] != decoded[1]["bpb"] and eval_kv.residual_twins(settings, decoded) == []


def test_another_text_or_reference_is_named_and_keeps_the_own_sweep(ckpt_dir, tmp_path):
    """--dataset (not the checkpoint's), --reference=unbounded, --dtype=float32, a window of
    one's own, --chunk=1 and --checkpoint_name=last each name the sweep's files, so the checkpoint's own sweep stays;
    a plain rerun says it replaces it."""
    from conftest import tiny_corpus, write_splits
    (tmp_path / "other_text").mkdir()
    other = write_splits(tmp_path / "other_text", tiny_corpus(seed=3))
    common = [f"--out_dir={ckpt_dir}", "--n_streams=1", "--stream_len=64", "--device=cpu", "--tensorboard=False"]
    code, out, err = run_in_process("eval_kv.py", *common, f"--dataset={other}", "--kv_quant=int8",
                                    "--kv_quant_residual=8")
    assert code in (0, None), err
    assert "was trained on" in err and "other_text's val split" in err and "| int8" in out
    new, replaced = {}, {}
    shutil.copy(ckpt_dir / "ckpt.pt", ckpt_dir / "last.pt")  # (another file, for --checkpoint_name=last)
    for name, extra in (("own", []), ("text", [f"--dataset={other}"]), ("reference", ["--reference=unbounded"]),
                        ("dtype", ["--dtype=float32"]), ("window", ["--kv_window=16"]), ("chunk", ["--chunk=1"]),
                        ("last", ["--checkpoint_name=last"]), ("again", [])):
        before = set(os.listdir(ckpt_dir))
        code, out, err = run_in_process("eval_kv.py", *common, "--sweep=quick", "--kv_quant_group=8", *extra)
        assert code in (0, None), err
        new[name] = {os.path.splitext(f)[0] for f in set(os.listdir(ckpt_dir)) - before}
        replaced[name] = "note: this sweep replaces the one in" in err
    assert new == {"own": {"eval_kv_quick"}, "text": {"eval_kv_quick_text-of-other_text"},
                   "reference": {"eval_kv_quick_reference-unbounded"}, "dtype": {"eval_kv_quick_dtype-float32"},
                   "window": {"eval_kv_quick_kv_window-16"}, "chunk": {"eval_kv_quick_chunk-1"},
                   "last": {"eval_kv_quick_last"}, "again": set()}
    assert replaced == {"own": False, "text": False, "reference": False, "dtype": False, "window": False,
                        "chunk": False, "last": False, "again": True}
    # the title names the reference it got: --reference=unbounded under a kv_window is that window
    for extra, named in (([], "reference plain, unbounded"), (["--kv_window=16"], "reference plain, window 16")):
        code, out, err = run_in_process("eval_kv.py", *common, "--reference=unbounded", *extra)
        title = next(line for line in out.splitlines() if line.startswith("### "))
        assert code in (0, None) and title.endswith(", " + named), title


def test_a_sweep_under_a_window_of_ones_own_fits_its_grid_to_it(ckpt_dir):
    """--sweep=quick --kv_window=4 with key groups of 8 tokens: the grid's residuals, budgets
    and key groups fit the 4 tokens its rows keep (keys grouped per token, said), every row
    but the reference and the unbounded one keeps that window, and the reference is the
    first row, as in a single evaluation."""
    import csv
    code, out, err = run_in_process("eval_kv.py", f"--out_dir={ckpt_dir}", "--sweep=quick", "--kv_window=4",
                                    "--kv_quant_group=8", "--n_streams=1", "--stream_len=64", "--device=cpu",
                                    "--tensorboard=False")
    assert code in (0, None), err
    assert "groups keys per token" in err
    with open(os.path.join(ckpt_dir, "eval_kv_quick_kv_window-4.csv")) as f:
        rows = list(csv.DictReader(f))
    single = run_in_process("eval_kv.py", f"--out_dir={ckpt_dir}", "--n_streams=1", "--stream_len=64",
                            "--device=cpu")[1]
    reference = [line for line in single.splitlines() if "(reference)" in line][0].split("|")[1].strip()
    assert rows[0]["setting"] == reference
    rest = [r["setting"] for r in rows[1:] if r["setting"] != "plain, unbounded"]
    assert len(rest) == len(rows) - 2 and all(s.endswith(", window 4") for s in rest), rows
    grouped = [s for s in rest if s.startswith(("int4", "int2")) and "+" not in s]  # (eviction: keys per token anyway)
    assert grouped and all("/token-keys" in s for s in grouped), rest


@pytest.mark.slow
def test_compiled_chunk_1_gives_the_eager_figures(ckpt_dir):
    """eval_kv.py --chunk=1 --compile=True (the compiled static-cache step of the reference's
    plain window and of int2 in it, whose loss moves on this barely trained model, with the group
    flush compiled apart) prints the figures the eager caches give. In this process: no second
    interpreter to start."""
    args = [f"--out_dir={ckpt_dir}", "--chunk=1", "--n_streams=1", "--stream_len=160", "--kv_window=32",
            "--kv_quant=int2", "--kv_quant_group=4", "--kv_quant_residual=4", "--dtype=float32", "--device=cpu",
            "--threads=1"]
    out = {}
    for c in ("False", "True"):
        code, printed, err = run_in_process("eval_kv.py", *args, f"--compile={c}")
        assert code in (0, None), err
        out[c] = [line for line in printed.splitlines() if "int2" in line and "|" in line]
    assert "compiled the decode step for int2" in err
    assert out["True"] and out["True"] == out["False"]


def test_a_bound_past_every_local_window_changes_nothing_and_says_so(tiny_data_dir):
    """On a model whose every layer attends 8 back, a window of 16, sinks behind it, or a
    budget of 12 leave every loss as it is: the rows equal the plain cache's, and a note says so."""
    m = tiny_model(window=8)
    x, y = streams(tiny_data_dir)
    idle = [dict(kv_window=16, kv_sink=2), dict(kv_window=0, kv_evict="h2o", kv_budget=12, kv_recent=4)]
    plain, *rows = run(m, x, y, [dict(kv_window=0)] + idle)
    for r in rows:
        assert abs(r["bpb"] - plain["bpb"]) < 1e-6 and r["kl_bits"] < 1e-6, r["setting"]
    notes = [KVOptions(**s).check().local_note(m.config) for s in idle]
    assert notes == ["note: every layer of this model attends at most 8 tokens back (--window=8), so kv_window=16, "
                     "kv_sink=2 changes nothing", "note: every layer of this model attends at most 8 tokens back "
                     "(--window=8), so kv_budget=12 changes nothing"]
    assert KVOptions(kv_window=4, kv_sink=2).local_note(m.config) is None  # a tighter bound does bind
    tight = KVOptions(kv_window=4, kv_sink=2, kv_evict="window", kv_budget=12).check().local_note(m.config)
    assert tight.endswith("so kv_budget=12 changes nothing")  # the window binds first, and its sinks count


def test_window_eviction_and_the_history_bound_have_two_names():
    kv = KVOptions(kv_window=64, kv_evict="window", kv_budget=16, kv_sink=4).check()
    assert kv_evaluate.label(kv) == "evict-window 16 (sink 4), window 64"


def test_a_budget_past_the_window_changes_nothing_and_says_so(tiny_data_dir):
    """On any model, h2o with a budget at least kv_window + kv_sink evicts nothing the window
    has not dropped: the row equals the window's, and a note says so; a smaller budget binds."""
    m = tiny_model()
    x, y = streams(tiny_data_dir)
    window, idle, binds = (dict(kv_window=16, kv_sink=2), dict(kv_window=16, kv_sink=2, kv_evict="h2o", kv_budget=18),
                           dict(kv_window=16, kv_sink=2, kv_evict="h2o", kv_budget=17))
    _, w, i, b = run(m, x, y, [dict(kv_window=0), window, idle, binds])
    assert abs(i["bpb"] - w["bpb"]) < 1e-6 and abs(b["bpb"] - w["bpb"]) > 1e-6
    assert KVOptions(**idle).check().local_note(m.config) == ("note: kv_window=16 and kv_sink=2 keep at most 18 "
                                                            "tokens, so kv_budget=18 changes nothing")
    assert KVOptions(**binds).check().local_note(m.config) is None


def test_a_budget_past_the_references_window_says_so_too(ckpt_dir):
    """Without --kv_window every setting keeps the reference's window (its block, 32 here): an
    h2o budget of 40 evicts nothing, its row equals the reference's, and eval_kv says why."""
    code, out, err = run_in_process("eval_kv.py", f"--out_dir={ckpt_dir}", "--kv_evict=h2o", "--kv_budget=40",
                                    "--kv_recent=8", "--n_streams=1", "--stream_len=96", "--device=cpu")
    assert code in (0, None), err
    assert "note: the reference's window of 32 keeps at most 32 tokens, so kv_budget=40 changes nothing" in err
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| plain, window 32") or
            line.startswith("| h2o 40")]
    assert len(rows) >= 2 and rows[0][5:7] == rows[1][5:7], out  # (the first table) bits per byte and the change


def test_a_plugged_in_attention_is_never_scored_through_h2o(tmp_path, tiny_data_dir):
    """h2o computes softmax attention itself: on a model with a user's attention, --kv_evict=h2o
    is one line, and the quick sweep leaves its h2o rows out (saying so) instead of scoring
    softmax under the plug-in's name."""
    from conftest import run_in_process
    plug = "tutorial_user_attention:attend"
    save_checkpoint(str(tmp_path / "ckpt.pt"), tiny_model(attention=plug), None, dict(ARGS, attention=plug),
                    dict(dataset=str(tiny_data_dir), block_size=32), 1, 5.0)
    common = (f"--out_dir={tmp_path}", f"--attention={plug}", "--n_streams=1", "--stream_len=64", "--device=cpu")
    code, _, err = run_in_process("eval_kv.py", *common, "--kv_evict=h2o", "--kv_budget=16", "--kv_recent=4")
    assert code == 2 and err.count("\n") == 1 and "ranks keys by the softmax attention" in err, err
    code, out, err = run_in_process("eval_kv.py", *common, "--sweep=quick", "--kv_quant_group=8", "--tensorboard=False")
    assert code == 0, err
    assert "the grid leaves out h2o" in err and "h2o" not in out and "evict-window" in out


def test_kv_trim_on_a_model_of_local_windows_needs_no_kv_window(tiny_data_dir, tmp_path):
    """Every layer of this model attends 8 back: its caches are bounded, so --kv_trim is called
    (and gives the plain cache's figures) without a --kv_window of its own."""
    out = tmp_path / "local"
    out.mkdir()
    save_checkpoint(str(out / "ckpt.pt"), tiny_model(window=8), None, dict(ARGS, window=8),
                    dict(dataset=str(tiny_data_dir), block_size=32), 1, 5.0)
    code, printed, err = run_in_process("eval_kv.py", f"--out_dir={out}", "--device=cpu", "--n_streams=1",
                                        "--stream_len=64", "--kv_window=0", "--kv_trim=kv.cache:keep_recent")
    assert code in (0, None), err
    table = [line.split("|") for line in printed.splitlines() if line.startswith("| ") and line.count("|") == 9]
    bpb = {cells[1].strip(): cells[5] for cells in table[1:]}  # (the first line: the header)
    trim = [k for k in bpb if k.startswith("trim kv.cache:keep_recent")]
    ref = [k for k in bpb if k.endswith("(reference)")]
    assert len(trim) == len(ref) == 1 and bpb[trim[0]] == bpb[ref[0]], bpb


def test_ctrl_c_during_a_sweep_says_nothing_was_written_and_keeps_the_last_one(ckpt_dir, monkeypatch, capsys):
    """Ctrl-C while a sweep runs (here: in its first long evaluation, after the dry run): exit
    130, a line saying nothing was written, and the earlier sweep's CSV byte for byte."""
    mod = importlib.reload(eval_kv)
    earlier = ckpt_dir / "eval_kv_quick.csv"
    earlier.write_text("setting\nthe earlier sweep\n")
    real, calls = mod.evaluate, {"n": 0}

    def evaluate(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # (the first is the dry run on 2 bytes)
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(mod, "evaluate", evaluate)
    monkeypatch.setattr("sys.argv", ["eval_kv.py", f"--out_dir={ckpt_dir}", "--sweep=quick", "--n_streams=1",
                                     "--stream_len=64", "--kv_quant_group=16", "--device=cpu"])
    with pytest.raises(SystemExit) as e:
        run_main(mod.main)
    err = capsys.readouterr().err
    assert e.value.code == 130 and "Traceback" not in err
    assert "stopped before the sweep ended: nothing was written" in err and "earlier sweep's, untouched" in err
    assert earlier.read_text() == "setting\nthe earlier sweep\n"


def test_dataset_folder_with_val_txt_alone(ckpt_dir, tiny_data_dir, tmp_path, monkeypatch, capsys):
    """--dataset=FOLDER needs only val.txt there (eval_kv reads nothing else): the same bits
    per byte as the full folder it came from."""
    only = tmp_path / "val_only"
    only.mkdir()
    shutil.copyfile(tiny_data_dir / "val.txt", only / "val.txt")

    def bpb(folder):
        monkeypatch.setattr("sys.argv", ["eval_kv.py", f"--out_dir={ckpt_dir}", "--stream_len=64", "--n_streams=1",
                                         f"--dataset={folder}/"])
        importlib.reload(eval_kv).main()
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith("| plain")]  # the table

    assert bpb(only) == bpb(tiny_data_dir) != []
    assert not (only / "train.txt").exists()  # nothing written into the folder


def test_a_linear_baseline_is_its_unbounded_self(ckpt_dir, tiny_data_dir, tmp_path):
    """--baseline= an all-linear model (a fixed state, no window): its line says so, with the
    bits per byte its own evaluation gives its reference row (it was labelled window 32)."""
    from conftest import run_in_process
    lin = tmp_path / "lin"
    lin.mkdir()
    save_checkpoint(str(lin / "ckpt.pt"), tiny_model(attention="linear"), None, dict(ARGS, attention="linear"),
                    dict(dataset=str(tiny_data_dir), block_size=32), 1, 5.0)
    common = ("--stream_len=64", "--n_streams=1", "--device=cpu", "--tensorboard=False")
    code, out, err = run_in_process("eval_kv.py", f"--out_dir={ckpt_dir}", f"--baseline={lin}", *common)
    assert code in (0, None), err
    line = next(s for s in out.splitlines() if s.startswith("Baseline: "))
    assert line.startswith(f"Baseline: {lin / 'ckpt.pt'}, plain, unbounded (reference), "), line
    code, own, err = run_in_process("eval_kv.py", f"--out_dir={lin}", *common)
    row = next(s for s in own.splitlines() if s.startswith("| plain, unbounded (reference)"))
    bpb = line.split("(reference), ")[1].split(" bits per byte")[0]
    assert f"| {bpb} |" in row, (line, row)


def test_streams_that_overlap_in_the_val_text_are_said(ckpt_dir, tiny_data_dir):
    """More streams than the val text holds side by side: the note says so, with how many fit,
    exactly when two of the streams load_streams places score a byte in common (counted from
    their offsets); streams that fit get no note."""
    from conftest import run_in_process
    size, L = (tiny_data_dir / "val.txt").stat().st_size, 64

    def shared(n):  # any byte scored by two streams? (stream i scores offset + 1 .. offset + L)
        starts = kv_evaluate.stream_offsets(size, n, L)
        return any(b + 1 <= a + L for a, b in zip(starts, starts[1:]))

    fit = next(n for n in range(2, size) if shared(n + 1))
    common = (f"--out_dir={ckpt_dir}", f"--stream_len={L}", "--device=cpu", "--tensorboard=False")
    code, _, err = run_in_process("eval_kv.py", *common, f"--n_streams={fit + 1}")
    assert code in (0, None), err
    assert f"note: {fit + 1} streams of {L} bytes overlap in the {size:,}-byte val text" in err
    assert f"{fit} such streams fit side by side" in err
    code, _, err = run_in_process("eval_kv.py", *common, f"--n_streams={fit}")
    assert code in (0, None) and "bytes overlap in" not in err, err


def test_a_sweep_of_unbounded_rows_sizes_its_budgets_by_the_stream(ckpt_dir):
    """--sweep=quick --kv_window=0: every row keeps the whole stream of 128 bytes, so the
    eviction budgets are a quarter of that (32), not of the reference's window of 32 (8, at
    least 10 with the sinks)."""
    code, out, err = run_in_process("eval_kv.py", f"--out_dir={ckpt_dir}", "--sweep=quick", "--kv_window=0",
                                    "--kv_quant_group=8", "--n_streams=1", "--stream_len=128", "--device=cpu",
                                    "--tensorboard=False")
    assert code in (0, None), err
    assert "| h2o 32 (recent 16, sink 4), unbounded |" in out and "| evict-window 32 (sink 4), unbounded |" in out, out


def test_streams_that_cannot_fit_in_memory_are_one_line_before_any_work(ckpt_dir, monkeypatch, capsys):
    """The streams' bytes and losses, and the log-probabilities of a piece of every stream side by
    side, against the memory free (patched to 32 MiB): 1,000 streams of 64 bytes hold 62.5 MiB of
    float32 log-probabilities at once (1,000 x 64 x 256 x 4 bytes), and are refused in one line
    before a stream is read; 10 such streams run."""
    import devices
    monkeypatch.setattr(devices, "memory_available", lambda dev: 2 ** 25)
    with monkeypatch.context() as m:
        m.setattr(kv_evaluate, "load_streams", lambda *a: pytest.fail("the streams were read"))
        line = main_error(m, capsys, f"--out_dir={ckpt_dir}", "--device=cpu", "--n_streams=1000", "--stream_len=64")
    assert line.startswith("error: 1,000 streams of 64 bytes need at least ") and line.endswith(
        "on cpu, and 32.0 MiB is free: lower --n_streams or --stream_len (or --chunk)"), line
    need = float(line.split("need at least ")[1].split(" MiB")[0])
    assert 2 * 1000 * 64 * 256 * 4 / 2 ** 20 <= need < 160, line
    err = run_main_ok(monkeypatch, capsys, f"--out_dir={ckpt_dir}", "--device=cpu", "--n_streams=10", "--stream_len=64")
    assert "error" not in err and "plain" in err, err


def run_main_ok(monkeypatch, capsys, *argv):
    """Run eval_kv.main in-process to its end; its stderr."""
    mod = importlib.reload(eval_kv)
    monkeypatch.setattr("sys.argv", ["eval_kv.py", *map(str, argv)])
    run_main(mod.main)
    return capsys.readouterr().err
