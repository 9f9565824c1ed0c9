"""The static-shape decode step (kv/static.py, generate.StaticDecoder) against its references:
the eager caches step by step (logits, bits held, codes), compiled against eager tokens at
temperature 0 for every cache kind it covers, one compilation over 300 tokens, batched rows
against single ones; the CUDA-graph path where CUDA exists."""

import dataclasses
import functools

import pytest
import torch
import torch._dynamo.testing

import attention
import kv.quant as kv_quant
from checkpoint import save_checkpoint
from conftest import TOL, run_script, text, tiny
from generate import StaticDecoder, generate, static_decoder, static_decoders
from kv.policy import KVOptions, held_bits
from kv.static import static_reason
from model import MODEL_ARG_KEYS

Q4 = dict(kv_quant="int4", kv_quant_group=4, kv_quant_residual=4)
# every cache kind the static step covers (small groups, residuals and windows, so that a
# few dozen tokens quantize, wrap the rings and drop groups out of sight)
KINDS = {
    "unbounded": dict(kv_window=0),
    "window+sink": dict(kv_window=8, kv_sink=2),
    "int8": dict(kv_window=0, kv_quant="int8", kv_quant_residual=4),
    "fp8_e4m3 window": dict(kv_window=6, kv_sink=1, kv_quant="fp8_e4m3", kv_quant_residual=3),
    "fp8_e5m2 no residual": dict(kv_window=0, kv_quant="fp8_e5m2", kv_quant_residual=0),
    "int4": dict(kv_window=0, **Q4),
    "int4 window+sink": dict(kv_window=12, kv_sink=3, **Q4),
    "int4 odd window": dict(kv_window=10, kv_sink=1, kv_quant="int4", kv_quant_group=4, kv_quant_residual=3),
    "int4 window no residual": dict(kv_window=10, kv_quant="int4", kv_quant_group=4, kv_quant_residual=0),
    "int4 token keys": dict(kv_window=0, kv_quant_keys="token", **Q4),
    "int2": dict(kv_window=0, kv_quant="int2", kv_quant_group=8, kv_quant_residual=0),
}
MODELS = {  # GQA/MQA, local windows beside a global layer, kv_share groups
    "mha": dict(),
    "mqa": dict(n_kv_head=1),
    "gqa local": dict(n_kv_head=2, window=20, global_layers="1"),
    # residual + group do not fit the window: the local layer keeps a shorter residual (its own flushes)
    "short local": dict(window=7, global_layers="1"),
    "kv_share": dict(n_layer=4, kv_share=2, n_kv_head=2),
}


def sharp(**kw):
    """tiny(), with logits spread wide enough that float rounding never flips a greedy choice."""
    model = tiny(**kw)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # tied: the embedding grows too
    return model


def assert_logits_along_a_text(model, kv, dec, B, L=46):
    """dec (capacity L, B rows) gives the eager caches' logits at every step of a text after a
    3-token eager prefill."""
    x = text(B=B, T=L, seed=3)
    caches = kv.make_caches(model, B, capacity=L)
    with torch.no_grad():
        model(x[:, :3], caches)
        dec.start(caches)
        for t in range(3, L):
            want, _ = model(x[:, t:t + 1], caches)
            torch.testing.assert_close(dec(x[:, t:t + 1]), want[:, -1], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kind, arch", [(k, a) for a in MODELS for k in KINDS
                                        if (k, a) != ("int2", "short local")])  # int2's key group is wider: eager
def test_static_step_equals_eager_caches(kind, arch):
    """Token by token after an eager prefill: the same logits and the same bits held as the
    eager caches at every step (the static step run eagerly: the layout, not the compiler)."""
    model = tiny(**MODELS[arch])
    kv = KVOptions(**KINDS[kind]).check()
    B, L, T0 = 2, 50, 13
    x = text(B=B, T=L)
    caches = kv.make_caches(model, B, capacity=L)
    dec = StaticDecoder(model, kv, B, L, compile=False)
    with torch.no_grad():
        model(x[:, :T0], caches)
        dec.start(caches)
        for t in range(T0, L):
            want, _ = model(x[:, t:t + 1], caches)
            torch.testing.assert_close(dec(x[:, t:t + 1]), want[:, -1], atol=2e-5, rtol=2e-5)
            assert held_bits(dec.caches) == held_bits(caches), t


@pytest.mark.parametrize("kind", ["unbounded", "int8", "fp8_e4m3 window", "int4 window+sink", "int2"])
def test_static_step_follows_eager_caches_under_bfloat16(kind):
    """Under bfloat16 autocast (sample.py's --dtype=bfloat16, the default on a GPU that has it)
    the static caches dequantize into bfloat16 as the eager ones do: the logits are the same
    at every step but one or two, where the attention's float32 sums round to the other
    neighbouring bfloat16. (Dequantized in float32, they differed at every step, and greedy
    text parted after 20-150 bytes.)"""
    model = tiny(n_kv_head=2, window=20, global_layers="1")
    kv = KVOptions(**KINDS[kind]).check()
    B, L, T0 = 2, 50, 13
    x = text(B=B, T=L)
    differ = []
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        caches = kv.make_caches(model, B, capacity=L)
        dec = StaticDecoder(model, kv, B, L, compile=False)
        model(x[:, :T0], caches)
        dec.start(caches)
        for t in range(T0, L):
            want, _ = model(x[:, t:t + 1], caches)
            got = dec(x[:, t:t + 1])
            assert got.dtype == torch.bfloat16
            torch.testing.assert_close(got.float(), want[:, -1].float(), atol=1e-2, rtol=1e-2)
            differ += [t] if not torch.equal(got, want[:, -1]) else []
    assert len(differ) <= (L - T0) // 4, differ


@pytest.mark.parametrize("kind", ["int8", "int4 window+sink", "int2"])
def test_static_codes_are_the_eager_codes(kind):
    """Layer 0 sees the same inputs in both, so its codes, scales and residual are bit for bit
    the eager cache's (deeper layers differ in float rounding from the attention above them)."""
    model = tiny()
    kv = KVOptions(**KINDS[kind]).check()
    x = text(B=2, T=41)
    eager = kv.make_caches(model, 2, capacity=41)
    dec = StaticDecoder(model, kv, 2, 41, compile=False)
    dec.start()
    with torch.no_grad():
        for t in range(41):
            model(x[:, t:t + 1], eager)
            dec(x[:, t:t + 1])
    e, s = eager[0], dec.caches[0]
    G = s.G
    slots = torch.cat([torch.nonzero(s.cpos == p).flatten() for p in e.pos_codes.tolist()])
    for mine, theirs in zip(s.k_codes + s.v_codes, e.k_codes + e.v_codes):
        per_token = mine.size(2) == s.cpos.numel()
        rows = slots if per_token else slots.view(-1, G)[:, 0] // G
        assert torch.equal(mine.index_select(2, rows).view(torch.uint8), theirs.view(torch.uint8))
    ring = torch.stack([torch.nonzero(s.rpos == p).flatten()[0] for p in e.pos_full.tolist()])
    assert torch.equal(s.k_res.index_select(2, ring), e.k_full)
    assert s.size_bits() == e.size_bits() and s.tokens() == e.tokens()


def test_batched_rows_equal_single_rows():
    """B prompts side by side give each row what it gets alone (sample.py's num_samples), from
    the eager caches and from a static step of batch 1 (given the decoder alone, generate uses
    its KV options, as generate.py's docstring shows)."""
    model = sharp(n_kv_head=2)
    kv = KVOptions(kv_window=8).check()
    prompts = text(B=3, T=5)
    together = generate(model, prompts, 30, temperature=0, kv=kv, decoder=StaticDecoder(model, kv, 3, 35, compile=False))
    one = StaticDecoder(model, kv, 1, 35, compile=False)
    for b in range(3):
        alone = generate(model, prompts[b:b + 1], 30, temperature=0, kv=kv)
        assert torch.equal(together[b:b + 1], alone)
        assert torch.equal(generate(model, prompts[b:b + 1], 30, temperature=0, kv=kv, decoder=one), alone)
        assert torch.equal(generate(model, prompts[b:b + 1], 30, temperature=0, decoder=one), alone)  # kv: the decoder's


def test_sampled_rows_each_with_its_generator_draw_what_they_draw_alone():
    """A batch given a generator per row (sample.py's num_samples) samples in row b what row b's
    prompt samples alone from the b-th generator, eager and through a sampling static step (its
    noise drawn row by row); one prompt three times, three seeds: three texts."""
    model = tiny(n_kv_head=2)
    kv = KVOptions(kv_window=8).check()
    prompts = text(B=1, T=5).expand(3, -1)
    seeded = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]
    sampled = dict(temperature=1.0, top_k=20, kv=kv)
    together = generate(model, prompts, 30, **sampled, generator=seeded(5, 6, 7))
    dec = StaticDecoder(model, kv, 3, 35, compile=False, temperature=1.0, top_k=20)
    assert torch.equal(generate(model, prompts, 30, **sampled, generator=seeded(5, 6, 7), decoder=dec), together)
    for b in range(3):
        alone = generate(model, prompts[b:b + 1], 30, **sampled, generator=seeded(5 + b)[0])
        assert torch.equal(together[b:b + 1], alone)
    assert len({tuple(row.tolist()) for row in together}) == 3
    with pytest.raises(ValueError, match="2 generators for a batch of 3 rows"):
        generate(model, prompts, 4, **sampled, generator=seeded(5, 6))


@pytest.mark.parametrize("kind", KINDS)
def test_traced_step_gives_eager_tokens(kind):
    """The step as torch.compile traces it (dynamo and AOT autograd, run without inductor)
    generates what the eager caches generate, greedy, for a batch of 2; and its logits equal
    theirs at every step along a text (greedy bytes of a small model barely depend on the
    context: a step that lost it could still give the same tokens)."""
    model = sharp(n_layer=4, n_kv_head=2, kv_share=2, window=24, global_layers="2,3")
    kv = KVOptions(**KINDS[kind]).check()
    prompts = text(B=2, T=6)
    dec = StaticDecoder(model, kv, 2, 46, compile="aot_eager")
    assert dec.compiled
    out = generate(model, prompts, 40, temperature=0, kv=kv, decoder=dec)
    assert torch.equal(out, generate(model, prompts, 40, temperature=0, kv=kv))
    assert_logits_along_a_text(model, kv, dec, B=2)


@pytest.mark.parametrize("kind", ["window+sink", "int4"])
@pytest.mark.parametrize("samples", [False, True])
def test_one_compilation_over_300_tokens(kind, samples):
    """Positions, slots and masks are tensors: 300 tokens, one trace of the step (and none more
    for a second text through the same decoder), plus one of the int4 cache's group flush;
    the same for a decoder that samples in its step."""
    model = tiny()
    kv = KVOptions(**KINDS[kind]).check()
    counter = torch._dynamo.testing.CompileCounter()
    sampling = dict(temperature=0.9, top_k=50) if samples else {}
    dec = StaticDecoder(model, kv, 1, 305, compile=counter, **sampling)
    generate(model, text(B=1, T=5), 300, kv=kv, decoder=dec, **sampling)
    generate(model, text(B=1, T=5, seed=2), 300, kv=kv, decoder=dec, **sampling)
    if not samples:
        dec.start()
        x = text(B=1, T=20)
        for t in range(20):  # columns of a text, as eval_kv feeds them (strided)
            dec(x[:, t:t + 1])
    assert bool(dec.flushing) == (kind == "int4")
    assert counter.frame_count == 1 + bool(dec.flushing)


def test_a_failed_compile_leaves_other_compiled_steps_alone(monkeypatch, capsys):
    """One decoder whose compile fails (a backend refusing a dtype on some GPU) runs eager with
    one warning; a decoder compiled before it keeps its step (guarded, as on CUDA and MPS): it
    is not thrown away and compiled again at its next call, outside its probe and options."""
    import utils
    monkeypatch.setattr(utils, "_COMPILE_FAILED", {})
    model = tiny(n_layer=1)
    counter = torch._dynamo.testing.CompileCounter()
    first = StaticDecoder(model, KVOptions().check(), 1, 16, compile=counter)
    token = text(B=1, T=1)
    first(token)
    assert first.compiled and counter.frame_count == 1

    def broken(gm, example_inputs):
        raise RuntimeError("this backend has no kernel for that dtype here")
    second = StaticDecoder(model, KVOptions(kv_window=4).check(), 1, 16, compile=broken)
    assert not second.compiled and "torch.compile failed" in capsys.readouterr().err
    torch.testing.assert_close(second(token), first(token), **TOL)  # eager, and the first still right
    first.start()
    first(token)
    assert counter.frame_count == 1  # nothing compiled again


@pytest.mark.parametrize("kind", ["unbounded", "window+sink", "int4 window+sink", "int2"])
@pytest.mark.parametrize("how", [False, "aot_eager"])
def test_a_sampling_decoder_draws_the_eager_text(kind, how):
    """A decoder made to sample picks each byte inside its step (pick_next), from the same
    generator: the text the eager caches and torch.multinomial draw, for a batch of 2, top_k
    and temperature as given (run eagerly, and as torch.compile traces it)."""
    model = tiny(n_kv_head=2, window=24, global_layers="1")
    kv = KVOptions(**KINDS[kind]).check()
    prompts = text(B=2, T=6)
    for temperature, top_k in ((0.8, 30), (1.0, None), (0, None)):
        dec = StaticDecoder(model, kv, 2, 46, compile=how, temperature=temperature, top_k=top_k)
        assert dec.compiled == bool(how)
        draw = lambda **kw: generate(model, prompts, 40, temperature, top_k, kv=kv, generator=torch.Generator().manual_seed(5), **kw)
        assert torch.equal(draw(decoder=dec), draw())


def test_a_sampling_decoder_is_used_as_made():
    """A decoder samples at the temperature and top_k it was made for (generate refuses others),
    and returns either tokens (next_token) or logits (called), each refusing the other's call."""
    model = tiny()
    kv = KVOptions(kv_window=8).check()
    prompts = text(B=1, T=4)
    dec = StaticDecoder(model, kv, 1, 30, compile=False, temperature=0.8, top_k=20)
    for other in (dict(temperature=1.0, top_k=20), dict(temperature=0.8, top_k=None), dict(temperature=0.8)):
        with pytest.raises(ValueError, match="the decoder samples at temperature 0.8 and top_k 20"):
            generate(model, prompts, 5, kv=kv, decoder=dec, **other)
    # top_k 0 or past the vocabulary limits nothing, as in sample_next
    wide = StaticDecoder(model, kv, 1, 30, compile=False, temperature=0.8, top_k=256)
    g = lambda: torch.Generator().manual_seed(0)
    assert torch.equal(generate(model, prompts, 10, 0.8, 0, kv=kv, decoder=wide, generator=g()),
                       generate(model, prompts, 10, 0.8, None, kv=kv, generator=g()))
    greedy = StaticDecoder(model, kv, 1, 30, compile=False, temperature=0)  # top_k means nothing to greedy
    assert torch.equal(generate(model, prompts, 10, 0, 50, kv=kv, decoder=greedy), generate(model, prompts, 10, 0, kv=kv))
    dec.start()
    with pytest.raises(ValueError, match="made to sample"):
        dec(prompts[:, :1])
    logits_dec = StaticDecoder(model, kv, 1, 30, compile=False)
    logits_dec.start()
    with pytest.raises(ValueError, match="returns logits"):
        logits_dec.next_token(prompts[:, :1])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["int2"])
def test_compiled_step_gives_eager_tokens_and_logits(kind):
    """The real thing: inductor's code (tens of seconds of compiling on a small CPU, so one kind
    here): greedy tokens equal to the eager caches', and the logits at every step along a text.
    int2 with no residual: the step quantizes the group it completes and must read its float16
    scales as stored (inductor once fused them in float32: logits 0.4 off on a trained model,
    other greedy text). The other kinds differ in settings only (the traced test above);
    unbounded: test_sample_compiled_gives_the_eager_text; int2 in a window, with its group flush
    compiled apart: tests/test_eval_kv.py. GQA with a local layer beside a global one
    (kv_share: the traced test)."""
    model = sharp(n_kv_head=2, window=24, global_layers="1")
    kv = KVOptions(**KINDS[kind]).check()
    dec = StaticDecoder(model, kv, 1, 46)  # (batch 2: the sample test)
    assert dec.compiled and not dec.flushing
    prompts = text(B=1, T=6)
    out = generate(model, prompts, 40, temperature=0, kv=kv, decoder=dec)
    assert torch.equal(out, generate(model, prompts, 40, temperature=0, kv=kv))
    assert_logits_along_a_text(model, kv, dec, B=1)


@pytest.mark.slow
def test_two_compiled_decoders_keep_to_their_own_caches():
    """On a CPU the compiled step skips dynamo's guard check (compiled ahead, its guards checked
    once on each decoder's own arguments): two decoders of the same kind and shape share one
    compiled step and its group flush (stepcache.py), and stepped in turn over two texts each
    give their own text's logits (the eager caches'; one's output is not overwritten by the
    other's next step), and neither is traced again; a call in another mode than the traced
    one is refused."""
    model = sharp(n_kv_head=2)
    kv = KVOptions(**KINDS["int4 window+sink"]).check()
    decs = [StaticDecoder(model, kv, 1, 30) for _ in range(2)]
    assert all(d.compiled and d.unguarded for d in decs)
    assert decs[1].step is decs[0].step and decs[1].origin == "reused"
    assert len(decs[0].flushes) == 1 and decs[1].flushes[0] is decs[0].flushes[0]
    xs = [text(B=1, T=30, seed=s) for s in (4, 5)]
    eager = [kv.make_caches(model, 1, capacity=30) for _ in xs]
    for d in decs:
        d.start()
    before = dict(torch._dynamo.utils.counters["stats"])
    with torch.no_grad():
        for t in range(30):
            got = [d(x[:, t:t + 1]) for d, x in zip(decs, xs)]
            for out, x, caches in zip(got, xs, eager):
                want, _ = model(x[:, t:t + 1], caches)
                torch.testing.assert_close(out, want[:, -1], atol=1e-4, rtol=1e-5)
    assert dict(torch._dynamo.utils.counters["stats"]) == before
    # what no guard checks any more: called under another autocast, or after the model changed
    # dtype, it says so instead of running the trace of another mode
    for d in decs:
        d.start()
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="no autocast and is called with .* bfloat16 autocast"):
        decs[0](xs[0][:, :1])
    model.double()
    with pytest.raises(ValueError, match="compiled for float32 weights.* called with float64 weights"):
        decs[1](xs[1][:, :1])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("kind", ["window+sink", "int4"])
def test_cuda_graphs_give_eager_tokens(kind, device):
    """On CUDA the compiled step is replayed as a CUDA graph (mode="reduce-overhead"): greedy,
    and sampling inside the step from a CUDA generator, the eager text. On a CPU the same path
    (asked for: static addresses, the probe's three calls, the step marked, its output copied)
    compiles without graphs, and its Python runs where CI can see it."""
    model = sharp(n_kv_head=2).to(device)
    kv = KVOptions(**KINDS[kind]).check()
    prompts = text(B=2, T=6).to(device)
    graphs = dict(cuda_graphs=True) if device == "cpu" else {}
    dec = StaticDecoder(model, kv, 2, 46, **graphs)
    assert dec.compiled and dec.cuda_graphs
    out = generate(model, prompts, 40, temperature=0, kv=kv, decoder=dec)
    assert torch.equal(out, generate(model, prompts, 40, temperature=0, kv=kv))
    dec = StaticDecoder(model, kv, 2, 46, temperature=0.8, top_k=50, **graphs)
    draw = lambda **kw: generate(model, prompts, 40, 0.8, 50, kv=kv,
                                 generator=torch.Generator(device).manual_seed(1), **kw)
    assert torch.equal(draw(decoder=dec), draw())


@pytest.mark.parametrize("options, words", [
    (dict(kv_evict="h2o", kv_budget=16, kv_recent=4), "kv_evict=h2o"),
    (dict(kv_trim="kv.cache:keep_recent", kv_window=8), "kv_trim"),
    (dict(kv_quant="kv.quant:int8_quantize"), "user's quantizer"),
])
def test_eager_kinds_say_why(options, words):
    model = tiny()
    kv = KVOptions(**dict(dict(kv_window=0), **options)).check()
    assert words in static_reason(kv, model.config)
    notes = []
    assert static_decoder(model, kv, 1, 10, say=notes.append) is None
    assert words in notes[0]
    with pytest.raises(ValueError):
        StaticDecoder(model, kv, 1, 10, compile=False)


def test_fp8_stays_eager_where_the_device_cannot_compile_it(monkeypatch):
    """fp8 caches stay eager on MPS (no float8 tensors there) and fp8_e4m3 on GPUs before
    Ada (the compiler's Triton has no e4m3 there), where compiling the step would fail and
    turn compiling off for every later kind; elsewhere, and fp8_e5m2 on any GPU, they compile."""
    config = tiny().config
    for name in ("fp8_e4m3", "fp8_e5m2"):
        kv = KVOptions(kv_window=0, kv_quant=name)
        assert static_reason(kv, config, torch.device("cpu")) is None
        assert "MPS" in static_reason(kv, config, torch.device("mps"))
    capability = {"cuda:0": (8, 0), "cuda:1": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: capability[str(d)])
    e4m3, e5m2 = KVOptions(kv_window=0, kv_quant="fp8_e4m3"), KVOptions(kv_window=0, kv_quant="fp8_e5m2")
    assert "older than Ada" in static_reason(e4m3, config, torch.device("cuda:0"))
    assert static_reason(e4m3, config, torch.device("cuda:1")) is None
    assert static_reason(e5m2, config, torch.device("cuda:0")) is None
    assert static_reason(KVOptions(kv_window=0, kv_quant="int8"), config, torch.device("mps")) is None


def test_a_new_option_is_named_and_kept_eager(monkeypatch):
    """An option added to KVOptions (the way kv/policy.py says) is not silently compiled as a
    plain cache, nor labelled as one: the step stays eager and describe() names it. So does a
    new attention kind, even a softmax variant, and a new format kv/static.py cannot read."""
    @dataclasses.dataclass(frozen=True)
    class WithGrid(KVOptions):
        kv_grid: float = 0.0  # round K/V to this grid

    model = tiny()
    kv = WithGrid(kv_window=0, kv_grid=0.25).check()
    assert "kv_grid" in static_reason(kv, model.config)
    assert kv.compressed and "kv_grid=0.25" in kv.describe()
    assert not WithGrid(kv_window=0).compressed and static_reason(WithGrid(kv_window=0), model.config) is None
    monkeypatch.setitem(attention.ATTENTION, "sharp", functools.partial(attention.softmax_attention, scale=2.0))
    assert "attention=sharp" in static_reason(KVOptions(kv_window=0), tiny(attention="sharp").config)
    monkeypatch.setattr(kv_quant, "FORMATS", kv_quant.FORMATS + ("grid",))
    assert "does not know" in static_reason(KVOptions(kv_window=0, kv_quant="grid"), model.config)


def test_a_note_is_said_once_per_model():
    """eval_kv's decoders (static_decoders): a cache kind that stays eager says why once, not
    once per setting or per evaluation of a sweep."""
    notes = []
    decoders = static_decoders(tiny(attention="linear"), say=notes.append)
    for _ in range(3):
        assert decoders(KVOptions(kv_window=0), 1, 10) is None
    assert len(notes) == 1 and notes[0].startswith("note: the decode step stays eager: attention=linear")


def test_linear_attention_stays_eager():
    model = tiny(attention="linear")
    assert "attention=linear" in static_reason(KVOptions(kv_window=0), model.config)


def test_capacity_is_checked():
    model = tiny()
    kv = KVOptions(kv_window=0)
    dec = StaticDecoder(model, kv, 1, 8, compile=False)
    with pytest.raises(ValueError):
        generate(model, text(B=1, T=4), 6, kv=kv, decoder=dec)  # 4 + 6 > 8
    with pytest.raises(ValueError):
        generate(model, text(B=2, T=2), 3, kv=kv, decoder=dec)  # batch 2, made for 1
    out = generate(model, text(B=1, T=4), 4, temperature=0, kv=kv, decoder=dec)
    torch.testing.assert_close(out, generate(model, text(B=1, T=4), 4, temperature=0, kv=kv), **TOL)


def test_eval_kv_decodes_through_the_hook():
    """eval_kv's evaluate at chunk 1 with `decode`: the settings whose caches allow it (the
    reference's own too) run the static step, the others the eager caches; same results."""
    from eval_kv import evaluate
    model = tiny()
    x = text(B=2, T=33)
    y = torch.roll(x, -1, 1)
    ref = KVOptions(kv_window=0)
    settings = [ref, KVOptions(kv_window=0, **Q4).check(),
                KVOptions(kv_window=0, kv_evict="h2o", kv_budget=16, kv_recent=4).check()]
    made = []

    def decode(kv, B, L, dtype):
        made.append(static_decoder(model, kv, B, L, compile=False, dtype=dtype))
        return made[-1]

    want = evaluate(model, x, y, settings, 1, ref, 16, dtype=torch.float32)
    got = evaluate(model, x, y, settings, 1, ref, 16, dtype=torch.float32, decode=decode)
    assert [d is not None for d in made] == [True, True, False]  # h2o stays eager
    for a, b in zip(want, got):
        assert a["setting"] == b["setting"] and a["kv_bits_peak"] == b["kv_bits_peak"]
        assert abs(a["bpb"] - b["bpb"]) < 1e-5 and b["kl_bits"] < a["kl_bits"] + 1e-5


@pytest.fixture(scope="module")
def sharp_ckpt(tmp_path_factory):
    """A folder holding ckpt.pt of sharp() (untrained, decisive), as train.py writes it."""
    model = sharp(n_head=2)
    args = {k: getattr(model.config, k) for k in MODEL_ARG_KEYS}
    d = tmp_path_factory.mktemp("out")
    save_checkpoint(str(d / "ckpt.pt"), model, model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu"), args,
                    {"n_layer": 2}, 10, 5.0)
    return d


def samples(out_dir, *args, temperature=0):
    proc = run_script("sample.py", f"--out_dir={out_dir}", "--device=cpu", f"--temperature={temperature}", "--max_new_tokens=30",
                      "--kv_window=16", "--start=To be", *args, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split("---------------\n"), proc.stderr


def test_sample_runs_the_samples_as_one_batch(sharp_ckpt):
    """sample.py --num_samples=3: three rows of one batch, each the text one sample gives."""
    three, err = samples(sharp_ckpt, "--num_samples=3")
    one, _ = samples(sharp_ckpt, "--num_samples=1")
    assert len(three) == 3 and len(one) == 1
    assert three == one * 3
    assert "3 samples side by side" in err


@pytest.mark.slow
def test_sample_compiled_gives_the_eager_text(sharp_ckpt):
    """sample.py --compile=True: inductor's step samples the text eager sampling draws from the
    same seed (the bytes picked inside the step, as torch.multinomial picks them); a second
    run loads the step the first compiled (stepcache.py) and samples the same text."""
    compiled, err = samples(sharp_ckpt, "--num_samples=2", "--compile=True", "--top_k=40", temperature=0.8)
    eager, _ = samples(sharp_ckpt, "--num_samples=2", "--top_k=40", temperature=0.8)
    assert "compiled the decode step in" in err
    assert compiled == eager
    loaded, err = samples(sharp_ckpt, "--num_samples=2", "--compile=True", "--top_k=40", temperature=0.8)
    assert "loaded the decode step in" in err and "an earlier run compiled it" in err
    assert loaded == eager
