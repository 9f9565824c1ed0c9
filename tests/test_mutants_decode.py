"""Decode-side checks that a mutation audit of generate.py and kv/ found missing: each test
compares against a reference (the full forward, token-by-token feeding, one-row runs, the
textbook sampling rule), never against numbers copied from a run."""

import pytest
import torch

import generate as generate_module
from conftest import TOL, feed, text, tiny
from generate import StaticDecoder, generate, generate_stream, prefill, sample_next
from kv.policy import KVOptions, held_bits


# -- sampling -----------------------------------------------------------------------------------

@pytest.mark.parametrize("top_k", [1, 128, 255])
def test_top_k_never_draws_outside_the_k_largest(top_k):
    """top_k=k (k = V - 1 included) never draws a byte outside the k largest logits."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 256, generator=g) * 0.01  # every byte about as likely
    allowed = torch.zeros(64, 256, dtype=torch.bool).scatter_(1, torch.topk(logits, top_k).indices, True)
    for _ in range(20):
        drawn = sample_next(logits, 1.0, top_k, generator=g)
        assert allowed.gather(1, drawn).all()


def test_top_k_of_0_or_of_every_byte_draws_as_no_top_k():
    """top_k=0 (sample.py's "all") and top_k >= V draw what top_k=None draws, seed for seed."""
    logits = torch.randn(4, 256, generator=torch.Generator().manual_seed(0))
    want = sample_next(logits, 0.8, None, generator=torch.Generator().manual_seed(1))
    for top_k in (0, 256, 1000):
        assert torch.equal(sample_next(logits, 0.8, top_k, generator=torch.Generator().manual_seed(1)), want)


def test_a_tiny_temperature_picks_each_rows_own_largest():
    """A tiny temperature draws each row's own largest logit, whatever the other rows hold."""
    logits = torch.randn(4, 256, generator=torch.Generator().manual_seed(0))
    logits += torch.tensor([[0.0], [-50.0], [30.0], [-200.0]])  # rows far apart
    got = sample_next(logits, 1e-38, generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, logits.argmax(-1, keepdim=True))
    for b in range(4):  # and one row alone draws what it draws in the batch
        assert torch.equal(sample_next(logits[b:b + 1], 1e-38), got[b:b + 1])


def test_a_small_temperature_still_samples_among_tied_maxima():
    """A small temperature is not greedy: tied largest logits are all drawn, nothing else."""
    logits = torch.zeros(256, 256)
    logits[:, 7] = logits[:, 200] = 1.0
    g = torch.Generator().manual_seed(0)
    for temperature in (1e-3, 1e-38):
        drawn = sample_next(logits, temperature, generator=g).flatten()
        assert set(drawn.tolist()) == {7, 200}


def test_the_generator_alone_decides_the_samples():
    """generate(generator=g) draws from g alone: same seed same text, whatever the global RNG."""
    m = tiny()
    prompt = text(B=2, T=4)
    runs = []
    for global_seed, seed in ((1, 0), (2, 0), (1, 1)):
        torch.manual_seed(global_seed)
        runs.append(generate(m, prompt, 30, temperature=1.0, generator=torch.Generator().manual_seed(seed)))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


# -- generate_stream: the prefill/decode split and its stats ------------------------------------

def test_peak_bits_of_an_unbounded_cache_count_every_token_fed():
    """kv_bits_peak of an unbounded cache is the prompt plus every new byte but the last (never fed)."""
    m = tiny()
    prompt, stats = text(B=2, T=5), {}
    out = torch.cat([prompt] + list(generate_stream(m, prompt, 12, temperature=0, stats=stats)), 1)
    caches = KVOptions(kv_window=0).make_caches(m, 2, capacity=out.size(1))
    with torch.no_grad():
        m(out[:, :-1], caches)
    assert stats["kv_bits_peak"] == stats["kv_bits_peak_decode"] == held_bits(caches)[0]


def test_peak_bits_count_the_whole_prompt_an_eviction_cache_holds():
    """kv_bits_peak counts the whole prompt an eviction cache holds until the first decode step."""
    m = tiny()
    kv = KVOptions(kv_window=0, kv_evict="h2o", kv_budget=8, kv_recent=2).check()
    prompt, stats = text(B=1, T=30), {}
    list(generate_stream(m, prompt, 6, temperature=0, kv=kv, stats=stats))
    caches = kv.make_caches(m, 1, capacity=36)
    prefill(m, prompt, caches, kv)
    assert stats["kv_bits_peak"] == held_bits(caches)[0] > stats["kv_bits_peak_decode"]


# -- kv/cache.py: chunks against token-by-token feeding -----------------------------------------

def chunks_then_steps(m, x, kv, first, dtype=None):
    """Logits of x fed as one chunk of `first` tokens, then a token at a time."""
    caches = kv.make_caches(m, x.size(0), capacity=4, dtype=dtype)
    with torch.no_grad():
        out = [m(x[:, :first], caches)[0]] + [m(x[:, t:t + 1], caches)[0] for t in range(first, x.size(1))]
    return torch.cat(out, 1)


@pytest.mark.parametrize("window, sink", [(4, 0), (7, 0), (5, 2)])
def test_a_first_chunk_just_past_the_window_sees_what_single_tokens_see(window, sink):
    """A first chunk of window + 1 tokens gives token-by-token logits (its last query skips key 0)."""
    m = tiny()
    kv = KVOptions(kv_window=window, kv_sink=sink).check()
    x = text(T=window + sink + 6)
    with torch.no_grad():
        want, _ = feed(m, x, 1, kv)
    for first in (window + 1, window + sink + 1):
        torch.testing.assert_close(chunks_then_steps(m, x, kv, first), want, **TOL)


def test_a_16_bit_ring_cache_shows_a_chunk_its_own_keys_as_stored():
    """A bfloat16 ring cache under a float32 model shows an overflowing chunk its keys as stored."""
    # eval_kv's default: full precision stored at bfloat16 while the model computes in float32
    m = tiny()
    kv = KVOptions(kv_window=6, kv_sink=1).check()
    x = text(T=24)
    want = chunks_then_steps(m, x, kv, 1, dtype=torch.bfloat16)
    torch.testing.assert_close(chunks_then_steps(m, x, kv, 15, dtype=torch.bfloat16), want, **TOL)


# -- kv/policy.py: which cache each layer gets -------------------------------------------------

@pytest.mark.parametrize("options", [dict(kv_window=6, kv_sink=2), dict(kv_window=9, kv_sink=2), dict(),
                                     dict(kv_evict="window", kv_budget=6, kv_sink=2)])
def test_sinks_never_reach_behind_a_local_window(options):
    """kv_sink adds no sinks behind a local window, and KVOptions() (kv_window=-1) is unbounded."""
    # every layer local (window 6): a kv_window at or past 6, or an eviction budget of 6, binds
    # nothing, so the cached logits are the full forward's; KVOptions() is model.py's docstring's
    m = tiny(window=6)
    x = text(T=24)
    with torch.no_grad():
        want, _ = m(x)
    kv = KVOptions(**options)
    for step in (1, 5):
        torch.testing.assert_close(feed(m, x, step, kv)[0], want, **TOL)


# -- kv/static.py -------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [dict(kv_window=0), dict(kv_window=6, kv_sink=1),
                                     dict(kv_window=0, kv_quant="int4", kv_quant_group=4, kv_quant_residual=4)])
def test_static_step_stores_16_bit_as_the_eager_caches(options):
    """StaticDecoder(dtype=bfloat16) under a float32 model gives the eager bfloat16 caches' logits."""
    # eval_kv --compile=True: full precision stored at bfloat16 (its default), the model in float32
    m = tiny()
    kv = KVOptions(**options).check()
    x = text(B=2, T=30)
    caches = kv.make_caches(m, 2, capacity=30, dtype=torch.bfloat16)
    dec = StaticDecoder(m, kv, 2, 30, compile=False, dtype=torch.bfloat16)
    with torch.no_grad():
        m(x[:, :9], caches)
        dec.start(caches)
        for t in range(9, 30):
            want, _ = m(x[:, t:t + 1], caches)
            torch.testing.assert_close(dec(x[:, t:t + 1]), want[:, -1], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("options", [dict(kv_window=0, kv_quant="int8", kv_quant_residual=6),
                                     dict(kv_window=6, kv_sink=1, kv_quant="fp8_e4m3", kv_quant_residual=3)])
@pytest.mark.parametrize("T0", [0, 2])
def test_static_step_before_the_residual_fills(options, T0):
    """The static int8/fp8 step matches the eager caches before the residual first fills."""
    # eval_kv starts it on empty caches, sample.py after a prompt shorter than kv_quant_residual
    m = tiny()
    kv = KVOptions(**options).check()
    x = text(B=2, T=14)
    caches = kv.make_caches(m, 2, capacity=14)
    dec = StaticDecoder(m, kv, 2, 14, compile=False)
    with torch.no_grad():
        if T0:
            m(x[:, :T0], caches)
        dec.start(caches if T0 else None)
        for t in range(T0, 14):
            want, _ = m(x[:, t:t + 1], caches)
            torch.testing.assert_close(dec(x[:, t:t + 1]), want[:, -1], atol=2e-5, rtol=2e-5)


def logits_drawn_from(monkeypatch, *args, **kw):
    """generate(*args, **kw), recording the logits each new byte is drawn from: (steps, B, V)."""
    seen = []

    def record(logits, *a):
        seen.append(logits.clone())
        return sample_next(logits, *a)
    monkeypatch.setattr(generate_module, "sample_next", record)
    generate(*args, **kw)
    return torch.stack(seen)


@pytest.mark.parametrize("options", [dict(kv_window=8, kv_sink=1),
                                     dict(kv_window=0, kv_quant="int4", kv_quant_group=4, kv_quant_residual=4)])
def test_a_static_decoder_goes_on_from_the_prompt(options, monkeypatch):
    """generate(decoder=...) decodes on from the prefilled prompt: every step has the eager logits."""
    # (logits, not greedy text: the greedy bytes of a tiny model barely depend on the context)
    m = tiny(n_kv_head=2)
    kv = KVOptions(**options).check()
    prompt = text(B=2, T=12)
    want = logits_drawn_from(monkeypatch, m, prompt, 25, temperature=0, kv=kv)
    got = logits_drawn_from(monkeypatch, m, prompt, 25, temperature=0, kv=kv,
                            decoder=StaticDecoder(m, kv, 2, 40, compile=False))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_a_decoder_refuses_other_options_and_steps_past_its_capacity():
    """A decoder for other KV options is refused, and stepping past its capacity is a ValueError."""
    m = tiny()
    kv = KVOptions(kv_window=8)
    dec = StaticDecoder(m, kv, 1, 10, compile=False)
    x = text(B=1, T=11)
    with pytest.raises(ValueError, match="other KV options"):
        generate(m, x[:, :3], 4, kv=KVOptions(kv_window=0), decoder=dec)
    dec.start()
    for t in range(10):
        dec(x[:, t:t + 1])
    with pytest.raises(ValueError, match="capacity"):
        dec(x[:, 10:])
