"""generate.py against references: greedy decoding through the caches against recomputing
the whole sequence every step, top-k 1 against greedy, hand-computed KV bits, and every
cache policy under CPU bfloat16 autocast (as sample.py --dtype=bfloat16 runs them)."""

import pytest
import torch

import devices
from conftest import TOL, text, tiny
from generate import draw_noise, generate, generate_stream, pick_next, sample_next
from kv.policy import KVOptions, held_bits


def test_generate_cached_equals_recompute_past_block():
    m = tiny()
    prompt = text(B=1, T=5)
    out = generate(m, prompt, 60, temperature=0)
    seq = prompt
    for _ in range(60):
        logits, _ = m(seq)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_top_k_sampling():
    m = tiny()
    g = torch.Generator().manual_seed(0)
    prompt = text(B=3, T=4)
    out = generate(m, prompt, 30, temperature=1.0, top_k=1, generator=g)
    assert torch.equal(out, generate(m, prompt, 30, temperature=0))
    big = generate(m, prompt, 5, temperature=1.0, top_k=10_000, generator=g)  # clamps to 256
    assert big.shape == (3, 9)
    stats = {}
    list(generate_stream(m, prompt, 20, kv=KVOptions(kv_window=8), stats=stats))
    assert stats["kv_bits_peak"] == 2 * 2 * 3 * 4 * 8 * 8 * 32  # layers x k/v x B x heads x 8 tokens x hs x fp32
    assert stats["kv_bits_per_token"] == 2 * 2 * 4 * 8 * 32


@pytest.mark.parametrize("top_k", [1, 5, 255, 256, None])
def test_top_k_draws_as_the_textbook_rule(top_k):
    """sample_next against the plain rule (logits below the k-th largest of torch.topk set to
    -inf, softmax, torch.multinomial): the same draws from the same generator, ties included."""
    logits = torch.randn(4, 256)
    logits[0, :10] = logits[0].max()  # a tie at the top
    ga, gb = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for _ in range(50):
        want = logits / 0.7
        if top_k is not None:
            v, _ = torch.topk(want, min(top_k, 256))
            want = want.masked_fill(want < v[:, [-1]], float("-inf"))
        want = torch.multinomial(torch.softmax(want, dim=-1), 1, generator=ga)
        assert torch.equal(sample_next(logits, 0.7, top_k, generator=gb), want)


def test_a_tiny_temperature_samples_the_largest_logit():
    """logits / 1e-38 overflows float32 to inf (softmax would give nan): the draw is still the
    limit, the largest logit, as greedy decoding picks it."""
    logits = torch.randn(3, 256) * 5
    got = sample_next(logits, 1e-38, generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, logits.argmax(-1, keepdim=True))


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1e-3, 1e-38, 0])
@pytest.mark.parametrize("top_k", [None, 1, 5, 200, 255])
def test_the_compiled_steps_pick_draws_what_multinomial_draws(temperature, top_k):
    """pick_next (the rule a sampling StaticDecoder compiles) against sample_next, which draws
    with torch.multinomial: from generators in the same state, the same bytes, ties and rows
    that overflow at a tiny temperature included, and the generators end in the same state."""
    logits = torch.randn(6, 256, generator=torch.Generator().manual_seed(2)) * 3
    logits[0, :10] = logits[0].max()  # a tie at the top
    logits[1, 50:90] = logits[1].sort(descending=True).values[4]  # a tie across the 5th largest
    logits[2] += 1e5  # (overflows at 1e-38 alone)
    ga, gb = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    noise = torch.empty(6, 256)
    for _ in range(40):
        want = sample_next(logits, temperature, top_k, generator=ga)
        if temperature:
            draw_noise(noise, gb)
        assert torch.equal(pick_next(logits, temperature, top_k, noise), want)
    assert torch.equal(ga.get_state(), gb.get_state())


@pytest.mark.parametrize("options", [dict(), dict(kv_quant="int8"), dict(kv_quant="int4", kv_quant_group=8),
                                     dict(kv_evict="h2o", kv_budget=24, kv_recent=8, kv_sink=2),
                                     dict(kv_quant="fp8_e4m3", kv_evict="window", kv_budget=24, kv_sink=2)])
def test_generation_under_cpu_autocast_caches_bf16(options):
    """sample.py --dtype=bfloat16: the caches hold the K/V in bfloat16, every policy runs, and
    with the plain cache, decoding token by token gives the full forward's logits."""
    model = tiny(n_head=2)
    idx = torch.randint(0, 256, (1, 40))
    kv = KVOptions(kv_window=0, **dict(options, kv_quant_residual=4) if "kv_quant" in options else options).check()
    with torch.no_grad(), devices.autocast_ctx("cpu", "bfloat16"):
        caches = kv.make_caches(model, 1, capacity=40)
        logits, caches = model(idx[:, :20], caches)  # prefill
        steps = [model(idx[:, t:t + 1], caches)[0] for t in range(20, 40)]
        full, _ = model(idx, KVOptions(kv_window=0).make_caches(model, 1, capacity=40))
    if not options:
        assert caches[0].k.dtype == torch.bfloat16
        torch.testing.assert_close(torch.cat([logits] + steps, 1), full, atol=0.05, rtol=0.05)
    else:
        assert torch.isfinite(torch.cat(steps, 1).float()).all()
        assert 0 < caches[0].size_bits() < caches[0].tokens() * 2 * 32 * 32  # below a float32 cache


def test_bits_per_cached_token_of_a_hybrid_does_not_grow_with_the_prompt():
    """A model with a linear layer: its fixed-size state counts in the peak bits and apart
    (kv_bits_fixed), not per cached token, which is the softmax layers' bits over the window's
    tokens whatever the prompt's length."""
    from kv.policy import state_bits
    m = tiny(attention="linear", linear_layers="0")
    kv = KVOptions(kv_window=16).check()
    fixed = state_bits(kv.make_caches(m, 2, capacity=8))
    assert fixed > 0
    for T in (20, 60):
        stats = {}
        list(generate_stream(m, text(B=2, T=T), 5, kv=kv, stats=stats))
        assert stats["kv_bits_fixed"] == fixed
        assert stats["kv_bits_per_token"] == (stats["kv_bits_peak"] - fixed) / (2 * 16)


@pytest.mark.parametrize("arch", [dict(), dict(n_kv_head=1, window=5, global_layers="1"), dict(kv_share=2)])
@pytest.mark.parametrize("options", [dict(kv_window=8), dict(kv_window=8, kv_sink=3), dict(kv_window=1)])
def test_a_long_prompt_under_a_window_prefills_in_pieces_as_in_one_pass(arch, options):
    """generate.prefill feeds a prompt longer than the window in pieces of the window: every
    query sees the keys it would in one pass, so the logits, and the cache the decode steps go
    on from, are those of one forward."""
    from generate import prefill
    model = tiny(**arch)
    kv = KVOptions(**options).check()
    x = text(B=2, T=45)
    whole, pieces = kv.make_caches(model, 2, capacity=60), kv.make_caches(model, 2, capacity=60)
    with torch.no_grad():
        want, _ = model(x[:, :40], whole)
        torch.testing.assert_close(prefill(model, x[:, :40], pieces, kv), want[:, -1], **TOL)
        for t in range(40, 45):  # the decode steps after it
            a, _ = model(x[:, t:t + 1], whole)
            b, _ = model(x[:, t:t + 1], pieces)
            torch.testing.assert_close(b, a, **TOL)
    assert held_bits(pieces) == held_bits(whole)


def test_generate_stream_builds_no_autograd_graph_for_a_caller_with_grad_on():
    """bench.py and scripts of one's own iterate generate_stream without torch.no_grad: every
    forward it runs (prefill and decode steps) still runs without autograd, as sample.py's do."""
    model = tiny()
    modes = []
    hook = model.register_forward_hook(lambda m, args, out: modes.append((torch.is_grad_enabled(), out[0].requires_grad)))
    try:
        assert torch.is_grad_enabled()
        tokens = list(generate_stream(model, text(B=1, T=5), 6, kv=KVOptions(kv_window=4)))
    finally:
        hook.remove()
    assert len(tokens) == 6 and len(modes) >= 6 and set(modes) == {(False, False)}
