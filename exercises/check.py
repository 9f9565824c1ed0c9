"""
Is my solution right? Checks the functions you wrote in exercises/ against the project's own.

    python -m exercises.check kv_window             # one assignment (or its number, 1..4)
    python -m exercises.check all                   # every one
    python -m exercises.check all --reference       # the same checks on the project's code
    python -m exercises.check linear_attention --module=my_pkg.my_attention   # another file

Names: kv_window (1), xl_memory (2), linear_attention (3), kv_quant and kv_evict (4).
Each check prints one line, PASS or FAIL (with a hint), or TODO while your function still
raises NotImplementedError; the exit code is 0 only when every check passes. First come
property checks (shapes, what is kept, equivalences with the reference), then a tiny model
with your function plugged in, then a few seconds of training or evaluation on a CPU.
"""

import argparse
import functools
import importlib
import os
import random
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python exercises/check.py` works too
    sys.path.insert(0, ROOT)

import attention_linear  # noqa: E402  (the project's modules, after the path is set)
import kvcache  # noqa: E402
from model import GPT, GPTConfig, loss_fn  # noqa: E402
from utils import UserError  # noqa: E402


class Failed(Exception):
    """A check's verdict: what went wrong and what to look at."""


def expect(ok, message):
    if not ok:
        raise Failed(message)


def max_err(a, b):
    """Largest absolute difference, relative to the size of b (0 when both are empty)."""
    if a.numel() == 0:
        return 0.0
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


def expect_close(got, want, what, hint, tol=1e-4):
    expect(torch.is_tensor(got), f"{what} is {type(got).__name__}, not a tensor")
    expect(tuple(got.shape) == tuple(want.shape), f"{what} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    err = max_err(got, want)
    expect(err <= tol, f"{what} differs from the reference by {err:.2g} (relative); {hint}")


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(n_layer=2, n_head=4, n_embd=32, bias=False)
    args.update(kw)
    return GPT(GPTConfig(**args))


def random_text(B, T, seed=1):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


def feed(model, idx, step, **state_kw):
    """Logits of idx fed `step` tokens at a time through one set of caches, and the caches."""
    states = model.new_states(idx.size(0), **state_kw)
    out = []
    for a in range(0, idx.size(1), step):
        logits, states = model(idx[:, a:a + step], states)
        out.append(logits)
    return torch.cat(out, dim=1), states


# -----------------------------------------------------------------------------
# small corpora and a small trained model, made on the spot (a few seconds on a CPU)

WORDS = ("when shall we three meet again in thunder lightning or rain the hurly burly done "
         "battle lost and won fair is foul foul is fair hover through fog filthy air my lord "
         "good night sweet prince what news").split()


@functools.lru_cache(maxsize=None)
def play_text(n_bytes=100_000, seed=0):
    """English-like bytes: short lines of words, now and then a speaker's name."""
    rng = random.Random(seed)
    out, size = [], 0
    while size < n_bytes:
        line = " ".join(rng.choices(WORDS, k=rng.randint(3, 10))).capitalize() + rng.choice(".,;!?")
        if rng.random() < 0.25:
            line = rng.choice(WORDS).upper() + ":\n" + line
        out.append(line + "\n")
        size += len(out[-1])
    return torch.tensor(list("".join(out)[:n_bytes].encode("ascii")))


def repeating_text(n_blocks, block, seed=0):
    """Blocks of random letters, each a copy of the previous one with a tenth of it changed:
    predictable from the previous block, hardly at all from the block itself."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnop"
    cur = [rng.choice(letters) for _ in range(block)]
    out = []
    for _ in range(n_blocks):
        cur = [rng.choice(letters) if rng.random() < 0.1 else c for c in cur]
        out.extend(cur)
    return torch.tensor(list("".join(out).encode("ascii")))


def train_tiny(model, text, block, iters, batch=16, lr=3e-3, seed=1):
    """Plain next-byte training on random windows of text; returns the last 10 losses' mean."""
    model.train()
    opt = model.configure_optimizers(0.0, lr, (0.9, 0.99), "cpu")
    g = torch.Generator().manual_seed(seed)
    high = int(len(text) * 0.9) - block - 1  # the last tenth is held out
    losses = []
    for it in range(iters):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (it + 1) / 20)  # a short warm-up
        rows = torch.randint(0, high, (batch, 1), generator=g) + torch.arange(block + 1)
        x, y = text[rows[:, :-1]], text[rows[:, 1:]]
        logits, _ = model(x, return_states=False)
        loss = loss_fn(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return sum(losses[-10:]) / 10


TRAIN_BLOCK = 32  # the context length of the small trained model


@functools.lru_cache(maxsize=None)
def trained_model():
    """A 2-layer model trained for 200 steps on 32-byte blocks (about 3 s): enough to read
    play_text well inside its training length, and to fall apart far beyond it."""
    model = tiny_model(n_embd=64, n_head=2)  # heads of 32, like the CPU recipe's
    train_tiny(model, play_text(), TRAIN_BLOCK, 200)
    return model


def held_out(T, rows=4):
    """rows stretches of T+1 bytes from the held-out tenth of play_text: (x, y)."""
    text = play_text()
    start = int(len(text) * 0.9)
    idx = torch.stack([text[start + i * (T + 50):start + i * (T + 50) + T + 1] for i in range(rows)])
    return idx[:, :-1], idx[:, 1:]


def token_losses(logits, y):
    """Per-position loss (T,), averaged over the rows."""
    return F.cross_entropy(logits.transpose(1, 2).float(), y, reduction="none").mean(0)


# -----------------------------------------------------------------------------
# Exercise 1: bounded history, kvcache.keep_recent(k, v, pos, kv_window, kv_sink)

# (positions held before the trim, kv_window, kv_sink): a first trim, sinks, holes left by
# an earlier trim, a short history that must stay whole, a window of one, a long prefill
TRIM_CASES = [
    (list(range(20)), 5, 0),
    (list(range(20)), 5, 3),
    ([0, 1, 2, 3] + list(range(40, 47)), 6, 4),
    (list(range(4)), 8, 2),
    (list(range(12)), 1, 0),
    (list(range(30)), 8, 4),
]


def trim_inputs(pos, dtype=torch.float32):
    """k, v whose every row says which position and (batch, head) it belongs to."""
    p = torch.tensor(pos)
    B, H, hs = 2, 3, 4
    tag = torch.arange(B).view(B, 1, 1, 1) * 0.25 + torch.arange(H).view(1, H, 1, 1) * 0.0625
    k = (p.view(1, 1, -1, 1).float() + tag + torch.arange(hs) * 1e-3).to(dtype)
    return k, -k, p


def expected_kept(pos, window, sink):
    return [p for i, p in enumerate(pos) if i >= len(pos) - window or p < sink]


def call_trim(impl, pos, window, sink, dtype=torch.float32):
    k, v, p = trim_inputs(pos, dtype)
    out = impl.keep_recent(k.clone(), v.clone(), p.clone(), window, sink)
    expect(isinstance(out, (tuple, list)) and len(out) == 3,
           f"keep_recent must return (k, v, pos), got {type(out).__name__}"
           + (f" of {len(out)}" if isinstance(out, (tuple, list)) else ""))
    expect(all(torch.is_tensor(t) for t in out), "keep_recent must return three tensors (k, v, pos)")
    return (k, v, p), out


def kept_positions(out):
    return [int(x) for x in out[2].tolist()]


def check_trim_shapes(impl, ctx):
    for dtype in (torch.float32, torch.float16):
        (k, v, p), (k2, v2, p2) = call_trim(impl, list(range(20)), 5, 3, dtype=dtype)
        n = p2.numel()
        expect(p2.dim() == 1 and p2.dtype == torch.long, f"pos must stay a 1-D long tensor, got {p2.dtype} {tuple(p2.shape)}")
        for name, got in (("k", k2), ("v", v2)):
            want = (k.size(0), k.size(1), n, k.size(3))
            expect(tuple(got.shape) == want, f"{name} has shape {tuple(got.shape)}, expected {want} "
                   "(B, nkv, kept, hs): select along dim 2, the token axis")
            expect(got.dtype == dtype, f"{name} came back as {got.dtype}, given {dtype}: keep the dtype")


def check_trim_recent(impl, ctx):
    for pos, window, sink in TRIM_CASES:
        _, out = call_trim(impl, pos, window, sink)
        kept = kept_positions(out)
        newest = pos[-window:]
        missing = [p for p in newest if p not in kept]
        expect(not missing, f"pos={short(pos)}, kv_window={window}: the newest {len(newest)} must stay, "
               f"{short(missing)} went missing (kept {short(kept)})")


def check_trim_sinks(impl, ctx):
    for pos, window, sink in TRIM_CASES:
        _, out = call_trim(impl, pos, window, sink)
        kept = kept_positions(out)
        missing = [p for p in pos if p < sink and p not in kept]
        expect(not missing, f"pos={short(pos)}, kv_sink={sink}: positions < {sink} must stay, "
               f"{short(missing)} went missing; the sinks are positions in the text (pos < kv_sink)")


def check_trim_budget(impl, ctx):
    for pos, window, sink in TRIM_CASES:
        _, out = call_trim(impl, pos, window, sink)
        kept, want = kept_positions(out), expected_kept(pos, window, sink)
        extra = [p for p in kept if p not in want]
        expect(not extra and len(kept) <= window + sink,
               f"pos={short(pos)}, kv_window={window}, kv_sink={sink}: keeps {len(kept)} tokens, "
               f"expected {short(want)}; {short(extra)} should have gone")


def check_trim_rows(impl, ctx):
    for pos, window, sink in TRIM_CASES:
        (k, v, p), (k2, v2, p2) = call_trim(impl, pos, window, sink)
        kept = kept_positions((k2, v2, p2))
        expect(kept == sorted(kept) and len(set(kept)) == len(kept),
               f"positions must stay in order, oldest first, each once; got {short(kept)}")
        where = [pos.index(x) for x in kept if x in pos]
        expect(len(where) == len(kept), f"returned positions {short(kept)} that were not in pos")
        expect(torch.equal(k2, k[:, :, where]) and torch.equal(v2, v[:, :, where]),
               "the rows of k and v do not belong to the returned positions: select the same "
               "tokens from k, v and pos (one mask for all three)")


def check_trim_model(impl, ctx):
    model = tiny_model(n_kv_head=2).eval()
    idx = random_text(2, 60)
    trim = lambda layer, **kw: kvcache.TrimCache(trim_fn=impl.keep_recent, **kw)
    with torch.no_grad():
        for step in (1, 7):
            ring, _ = feed(model, idx, step, kv_window=8, kv_sink=3)
            yours, states = feed(model, idx, step, kv_window=8, kv_sink=3, make_cache=trim)
            expect_close(yours, ring, f"logits fed {step} byte(s) at a time",
                         "compare with kvcache.KVCache(recent=8, sink=3), the ring buffer")
            expect(states[0].tokens() <= 11, f"the cache holds {states[0].tokens()} tokens, at most 8 + 3 allowed")
    return "fed 1 and 7 bytes at a time"


def check_trim_long_text(impl, ctx):
    model = trained_model()
    L = TRAIN_BLOCK
    x, y = held_out(10 * L)
    trim = lambda layer, **kw: kvcache.TrimCache(trim_fn=impl.keep_recent, **kw)
    with torch.no_grad():
        full, _ = feed(model, x, 8)
        yours, _ = feed(model, x, 8, kv_window=L, kv_sink=4, make_cache=trim)
    inside = token_losses(full, y)[L // 2:L].mean().item()
    far_full = token_losses(full, y)[4 * L:].mean().item()
    far_yours = token_losses(yours, y)[4 * L:].mean().item()
    expect(far_yours < far_full - 0.5 and far_yours < inside + 0.5,
           f"loss 4-10x past the training length: {far_yours:.2f} with your trim, {far_full:.2f} "
           f"unbounded, {inside:.2f} inside the training length; keep the newest kv_window tokens")
    return (f"loss {far_full:.2f} unbounded -> {far_yours:.2f} with kv_window={L}, kv_sink=4 "
            f"({inside:.2f} inside the training length)")


def short(xs, n=12):
    xs = list(xs)
    return str(xs) if len(xs) <= n else str(xs[:n // 2])[:-1] + ", ..., " + str(xs[-n // 2:])[1:]


# -----------------------------------------------------------------------------
# Exercise 2: TransformerXL, kvcache.xl_step(mem_k, mem_v, mem_ok, k, v, mem_len)

def xl_inputs(m, T, B=2, H=2, hs=4, seed=0):
    mem_k, mem_v = randn(B, H, m, hs, seed=seed), randn(B, H, m, hs, seed=seed + 1)
    mem_ok = torch.ones(B, m, dtype=torch.bool)
    if m:
        mem_ok[1, :m // 2 + 1] = False  # row 1 restarted: part of its memory is another text
    k = randn(B, H, T, hs, seed=seed + 2).requires_grad_()
    v = randn(B, H, T, hs, seed=seed + 3).requires_grad_()
    return mem_k, mem_v, mem_ok, k, v


def call_xl(impl, m, T, mem_len, seed=0):
    args = xl_inputs(m, T, seed=seed)
    out = impl.xl_step(*args, mem_len)
    expect(isinstance(out, (tuple, list)) and len(out) == 6,
           "xl_step must return six things: keys, vals, key_ok, new_k, new_v, new_ok")
    expect(all(torch.is_tensor(t) for t in out), "xl_step must return six tensors")
    return args, out


XL_CASES = [(0, 4, 6), (5, 4, 6), (5, 4, 20), (6, 8, 3), (3, 3, 6)]  # (m, T, mem_len)


def check_xl_shapes(impl, ctx):
    for m, T, mem_len in XL_CASES:
        (mk, _, _, k, _), (keys, vals, ok, nk, nv, nok) = call_xl(impl, m, T, mem_len)
        B, H, _, hs = k.shape
        n = min(mem_len, m + T)
        for name, t, want in (("keys", keys, (B, H, m + T, hs)), ("vals", vals, (B, H, m + T, hs)),
                              ("key_ok", ok, (B, m + T)), ("new_k", nk, (B, H, n, hs)),
                              ("new_v", nv, (B, H, n, hs)), ("new_ok", nok, (B, n))):
            expect(tuple(t.shape) == want, f"m={m}, T={T}, mem_len={mem_len}: {name} has shape "
                   f"{tuple(t.shape)}, expected {want}")
        expect(ok.dtype == torch.bool and nok.dtype == torch.bool, "key_ok and new_ok must be bool tensors")
        expect(keys.dtype == k.dtype and nk.dtype == k.dtype, "keys and new_k must keep the dtype of k")


def check_xl_attend(impl, ctx):
    for m, T, mem_len in XL_CASES:
        (mk, mv, mok, k, v), (keys, vals, ok, _, _, _) = call_xl(impl, m, T, mem_len)
        expect_close(keys, torch.cat([mk, k], 2), f"m={m}, T={T}: keys",
                     "attend over the memory first, then this step's keys (torch.cat on dim 2)", tol=0)
        expect_close(vals, torch.cat([mv, v], 2), f"m={m}, T={T}: vals", "memory first, then this step's values", tol=0)
        want = torch.cat([mok, torch.ones(k.size(0), T, dtype=torch.bool)], 1)
        expect(torch.equal(ok, want), f"m={m}, T={T}: key_ok must be mem_ok followed by True for this "
               "step's tokens (a restarted row must not see its old memory)")


def check_xl_keep(impl, ctx):
    for m, T, mem_len in XL_CASES:
        (mk, mv, mok, k, v), (keys, vals, ok, nk, nv, nok) = call_xl(impl, m, T, mem_len)
        n = min(mem_len, m + T)
        expect(nk.size(2) <= mem_len, f"m={m}, T={T}: the memory keeps {nk.size(2)} tokens, more than mem_len={mem_len}")
        expect(nk.size(2) == n, f"m={m}, T={T}, mem_len={mem_len}: the memory keeps {nk.size(2)} tokens, "
               f"expected {n} (the newest min(mem_len, m + T))")
        all_k, all_v = torch.cat([mk, k], 2).detach(), torch.cat([mv, v], 2).detach()
        expect_close(nk, all_k[:, :, -n:], f"m={m}, T={T}, mem_len={mem_len}: new_k",
                     "keep the newest tokens (the end of keys), oldest first", tol=0)
        expect_close(nv, all_v[:, :, -n:], f"m={m}, T={T}, mem_len={mem_len}: new_v", "keep the newest values", tol=0)
        expect(torch.equal(nok, ok[:, -n:]), f"m={m}, T={T}: new_ok must be key_ok of the tokens kept")


def check_xl_detach(impl, ctx):
    (_, _, _, k, v), (keys, vals, _, nk, nv, _) = call_xl(impl, 5, 4, 6)
    expect(not nk.requires_grad and not nv.requires_grad,
           "new_k/new_v still require grad: .detach() them, or the next step's backward runs into this step")
    expect(keys.requires_grad and vals.requires_grad,
           "keys/vals carry no gradient: detach only the memory you keep, not what this step attends over")
    (keys.sum() + vals.sum()).backward()
    expect(k.grad is not None and torch.equal(k.grad, torch.ones_like(k)) and torch.equal(v.grad, torch.ones_like(v)),
           "the gradient of keys/vals does not reach k and v one to one: use k and v themselves in the concatenation")


def xl_batches(B=3, T=8, n=3):
    """n consecutive batches; row 1 restarts at the second one."""
    idx = random_text(B, n * T, seed=5)
    restarts = [torch.ones(B, dtype=torch.bool)] + [torch.zeros(B, dtype=torch.bool) for _ in range(n - 1)]
    restarts[1] = torch.tensor([False, True, False])
    return [(idx[:, i * T:(i + 1) * T], restarts[i]) for i in range(n)]


def xl_forward(model, step_fn, batches, mem_len):
    """Logits of consecutive batches with an XL memory, as train.py computes them."""
    memory = model.new_xl_states(batches[0][0].size(0), mem_len, step_fn)
    out = []
    for x, restarted in batches:
        for s in {id(s): s for s in memory}.values():
            s.restart(restarted)
        logits, _ = model(x, memory)
        out.append(logits)
    return out, memory


def xl_config():
    return dict(n_layer=3, n_kv_head=2, window=6, global_layers="0,2")


def check_xl_model(impl, ctx):
    model = tiny_model(**xl_config()).eval()
    batches = xl_batches()
    with torch.no_grad():
        ref, _ = xl_forward(model, kvcache.xl_step, batches, 12)
        yours, memory = xl_forward(model, impl.xl_step, batches, 12)
    for i, (a, b) in enumerate(zip(yours, ref)):
        expect_close(a, b, f"logits of batch {i + 1}", "compare keys/key_ok and the memory kept with kvcache.xl_step")
    expect(max(s.tokens() for s in memory) <= 12, "the memory grew beyond mem_len=12")
    return "3 batches, a row restarting, GQA, local windows"


def xl_step_grads(model, step_fn, batches, mem_len):
    model.train()
    memory = model.new_xl_states(batches[0][0].size(0), mem_len, step_fn)
    for i, (x, restarted) in enumerate(batches):
        logits, _ = model(x, memory)
    y = torch.roll(batches[-1][0], -1, dims=1)
    model.zero_grad(set_to_none=True)
    loss_fn(logits, y).backward()  # the last batch only: gradient must stop at its start
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def check_xl_grads(impl, ctx):
    model = tiny_model(**xl_config())
    batches = xl_batches()
    ref = xl_step_grads(model, kvcache.xl_step, batches, 12)
    try:
        yours = xl_step_grads(model, impl.xl_step, batches, 12)
    except NotImplementedError:
        raise
    except RuntimeError as e:
        raise Failed(f"backward failed ({str(e).splitlines()[0][:80]}...): detach the memory you keep") from None
    for name, g in ref.items():
        expect(name in yours, f"no gradient for {name}")
        expect_close(yours[name], g, f"the gradient of {name}",
                     "gradient flows into earlier batches through the memory: detach new_k and new_v")


def check_xl_training(impl, ctx):
    # one layer learns to copy from one block back within a hundred steps or so
    block, mem, batch, iters = 16, 16, 16, 250
    text = repeating_text(800, block)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=64, bias=False))
    opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.99), "cpu")
    n_train = 700 * block  # the last 100 blocks are held out
    starts = torch.randint(0, n_train // 2, (batch, 1), generator=torch.Generator().manual_seed(1))
    memory = model.new_xl_states(batch, mem, impl.xl_step)
    model.train()
    for it in range(iters):
        rows = (starts + it * block + torch.arange(block + 1)) % (n_train - 1)  # each row reads on
        logits, _ = model(text[rows[:, :-1]], memory)
        loss = loss_fn(logits, text[rows[:, 1:]])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    # held-out text, 8 consecutive blocks per row, memory carried along
    model.eval()
    memory = model.new_xl_states(4, mem, impl.xl_step)
    losses = []
    with torch.no_grad():
        for i in range(8):
            rows = n_train + torch.arange(4)[:, None] * 20 * block + i * block + torch.arange(block + 1)
            logits, _ = model(text[rows[:, :-1]], memory)
            if i > 0:  # the first block has no memory yet
                losses.append(loss_fn(logits, text[rows[:, 1:]]).item())
    val = sum(losses) / len(losses)
    expect(val < 2.0, f"held-out loss with memory {val:.2f} after {iters} steps; a model that cannot see the "
           "previous block gets about 2.77 (16 letters): is the memory passed on, the right tokens kept?")
    return f"held-out loss {val:.2f} with memory after {iters} steps (about 2.77 without)"


# -----------------------------------------------------------------------------
# Exercise 3: linear attention, attention(q, k, v, mask, dropout_p) and
# recurrent_step(q, k, v, S, z)


def linear_references(q, k, v, mask):
    """What a correct attention() returns, for each normalisation."""
    qf, kf = attention_linear.phi(q.float()), attention_linear.phi(k.float())
    att = (qf @ kf.transpose(-2, -1)) * mask
    num, den = att @ v.float(), att.sum(-1, keepdim=True)
    return {"layernorm": F.layer_norm(num, (q.size(-1),)), "denominator": num / (den + attention_linear.EPS)}


def qkv(B=2, nh=2, T=6, S=6, hs=8, seed=0):
    return randn(B, nh, T, hs, seed=seed), randn(B, nh, S, hs, seed=seed + 1), randn(B, nh, S, hs, seed=seed + 2)


def causal(T, S):
    return torch.ones(T, S, dtype=torch.bool).tril(S - T)


def window_mask(B, T, S):
    """(B, 1, T, S): causal, a local window of 3 plus one sink, and row 1 forbidden key 1."""
    m = kvcache.visible(torch.arange(S - T, S), torch.arange(S), recent=3, sink=1)
    m = m.expand(B, 1, T, S).clone()
    m[1, :, :, 1] = False
    return m


def call_attention(impl, q, k, v, mask):
    y = impl.attention(q, k, v, mask, 0.0)
    expect(torch.is_tensor(y), f"attention must return a tensor, got {type(y).__name__}")
    expect(tuple(y.shape) == tuple(q.shape), f"y has shape {tuple(y.shape)}, expected q's {tuple(q.shape)} (B, nh, T, hs)")
    return y


def check_linear_shapes(impl, ctx):
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (t.to(dtype) for t in qkv(T=3, S=7))
        y = call_attention(impl, q, k, v, causal(3, 7))
        expect(y.dtype == dtype, f"y came back as {y.dtype} for {dtype} inputs: cast the result to q.dtype")
        expect(bool(torch.isfinite(y).all()), "y holds inf or nan")


def check_linear_formula(impl, ctx):
    for T, S, mask in ((6, 6, causal(6, 6)), (3, 9, causal(3, 9)), (4, 9, window_mask(2, 4, 9))):
        q, k, v = qkv(T=T, S=S)
        y = call_attention(impl, q, k, v, mask)
        refs = linear_references(q, k, v, mask)
        errs = {name: max_err(y, r) for name, r in refs.items()}
        best = min(errs, key=errs.get)
        expect(errs[best] < 1e-3, f"T={T}, S={S}: y is not (phi(q) phi(k)^T * mask) v normalised "
               f"(relative error {errs['layernorm']:.2g} vs layer_norm, {errs['denominator']:.2g} vs the "
               "denominator); phi(x) = elu(x) + 1, no softmax, no 1/sqrt(hs)")
        expect(ctx.setdefault("norm", best) == best, "the normalisation changed between calls")
    return "normalised by " + {"layernorm": "layer_norm", "denominator": "the denominator"}[ctx["norm"]]


def check_linear_causal(impl, ctx):
    q, k, v = qkv(T=7, S=7)
    y = call_attention(impl, q, k, v, causal(7, 7))
    for t in range(6):
        k2, v2 = k.clone(), v.clone()
        k2[:, :, t + 1:] += randn(*k2[:, :, t + 1:].shape, seed=t + 10) * 3
        v2[:, :, t + 1:] += randn(*v2[:, :, t + 1:].shape, seed=t + 20) * 3
        y2 = call_attention(impl, q, k2, v2, causal(7, 7))
        expect(torch.allclose(y2[:, :, :t + 1], y[:, :, :t + 1], atol=1e-5),
               f"the output at position {t} changed when only later keys/values changed: "
               "the future leaks in; zero the weights where the mask is False")


def check_linear_mask(impl, ctx):
    B, T, S = 2, 4, 9
    q, k, v = qkv(B=B, T=T, S=S)
    mask = window_mask(B, T, S)
    y = call_attention(impl, q, k, v, mask)
    for b in range(B):
        for t in range(T):
            hidden = ~mask[b, 0, t]
            k2, v2 = k.clone(), v.clone()
            k2[b, :, hidden] += 3.0
            v2[b, :, hidden] -= 3.0
            y2 = call_attention(impl, q, k2, v2, mask)
            expect(torch.allclose(y2[b, :, t], y[b, :, t], atol=1e-5),
                   f"row {b}, query {t}: the output depends on keys the mask hides (a window, a sink, "
                   "another text): use the mask you are given, not your own triangle")


def user_model(impl, **kw):
    return tiny_model(attention=impl.spec("attention"), **kw)


def check_linear_cached(impl, ctx):
    model = user_model(impl, n_kv_head=2).eval()
    idx = random_text(2, 40)
    with torch.no_grad():
        full, _ = model(idx)
        for step in (1, 6):
            cached, _ = feed(model, idx, step)
            expect_close(cached, full, f"logits fed {step} byte(s) at a time over the KV cache",
                         "with a cache, T < S: the mask is not square (see the mask's last T rows)")
    return "fed 1 and 6 bytes at a time"


def check_linear_model(impl, ctx):
    norm = ctx.get("norm", "layernorm")
    yours = user_model(impl).eval()
    ref = tiny_model(attention="linear", linear_norm=norm).eval()
    ref.load_state_dict(yours.state_dict())
    idx = random_text(2, 50)
    with torch.no_grad():
        expect_close(yours(idx)[0], ref(idx)[0], "the logits",
                     f"the model with your attention should equal --attention=linear --linear_norm={norm}")
    # one training step: the gradients must agree too
    grads = []
    for m in (yours, ref):
        m.train()
        m.zero_grad(set_to_none=True)
        logits, _ = m(idx[:, :-1], return_states=False)
        loss_fn(logits, idx[:, 1:]).backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    for name, g in grads[1].items():
        expect(name in grads[0], f"no gradient reaches {name}: is the graph cut (.detach(), .item(), numpy)?")
        expect_close(grads[0][name], g, f"the gradient of {name}", "the backward pass differs from the reference's")
    return f"--linear_norm={norm}"


def check_linear_training(impl, ctx):
    model = user_model(impl, n_embd=64)
    loss = train_tiny(model, play_text(), TRAIN_BLOCK, 200)
    # byte frequencies alone give 3.18; layer_norm gets to about 2.6, the denominator to 1.2
    # and softmax to 1.0 in 200 steps; far lower means the model reads the answer
    expect(loss == loss and loss < 2.9, f"training loss {loss:.2f} after 200 steps, hardly better than byte "
           "frequencies (3.18): is the gradient flowing, the output normalised?")
    expect(loss > 0.4, f"training loss {loss:.2f} after 200 steps is too good to be true: does a position see "
           "the byte it must predict?")
    return f"loss {loss:.2f} after 200 steps on 32-byte blocks (3.18 from byte frequencies, softmax about 1.0)"


def recurrent_inputs(B=2, h=3, T=9, hs=4, seed=0):
    phi = attention_linear.phi
    q, k, v = phi(randn(B, h, T, hs, seed=seed)), phi(randn(B, h, T, hs, seed=seed + 1)), randn(B, h, T, hs, seed=seed + 2)
    S0, z0 = phi(randn(B, h, hs, hs, seed=seed + 3)), phi(randn(B, h, hs, seed=seed + 4))
    return q, k, v, S0, z0


def call_recurrent(impl, q, k, v, S, z):
    out = impl.recurrent_step(q, k, v, S, z)
    expect(isinstance(out, (tuple, list)) and len(out) == 2, "recurrent_step must return (num, den)")
    num, den = out
    B, h, T, hs = q.shape
    expect(torch.is_tensor(num) and tuple(num.shape) == (B, h, T, hs),
           f"num must be (B, h, T, hs) = {(B, h, T, hs)}, got {tuple(getattr(num, 'shape', ()))}")
    expect(torch.is_tensor(den) and tuple(den.shape) == (B, h, T, 1),
           f"den must be (B, h, T, 1) = {(B, h, T, 1)}, got {tuple(getattr(den, 'shape', ()))}")
    return num, den


def check_recurrent_shapes(impl, ctx):
    q, k, v, S0, z0 = recurrent_inputs()
    S, z = S0.clone(), z0.clone()
    call_recurrent(impl, q, k, v, S, z)
    expect(S.shape == S0.shape and z.shape == z0.shape, "S and z must keep their shapes: the state has a fixed size")


def check_recurrent_state(impl, ctx):
    q, k, v, S0, z0 = recurrent_inputs()
    S, z = S0.clone(), z0.clone()
    call_recurrent(impl, q, k, v, S, z)
    expect(not torch.equal(S, S0), "S did not change: update it in place (S += ...), the caller keeps only S and z")
    expect_close(S, S0 + k.transpose(-2, -1) @ v, "S after T tokens", "S += phi(k_t) v_t^T (outer product) per token")
    expect_close(z, z0 + k.sum(2), "z after T tokens", "z += phi(k_t) per token")


def check_recurrent_parallel(impl, ctx):
    q, k, v, S0, z0 = recurrent_inputs(T=13)
    num, den = call_recurrent(impl, q, k, v, S0.clone(), z0.clone())
    ref_num, ref_den = attention_linear.linear_parallel(q, k, v, S0, z0)
    expect_close(num, ref_num, "num", "num_t = q_t^T S_t, with token t already added to S")
    expect_close(den, ref_den, "den", "den_t = q_t . z_t, with token t already added to z")
    # fed in pieces, the state carries everything
    S, z = S0.clone(), z0.clone()
    parts = [call_recurrent(impl, q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], S, z) for a, b in ((0, 5), (5, 6), (6, 13))]
    expect_close(torch.cat([p[0] for p in parts], 2), ref_num, "num fed 5 + 1 + 7 tokens",
                 "the state must carry the history between calls")
    return "in one call and in pieces"


def check_recurrent_matches_attention(impl, ctx):
    q, k, v = qkv(T=8, S=8)
    y = call_attention(impl, q, k, v, causal(8, 8))
    phi = attention_linear.phi
    B, h, _, hs = q.shape
    S, z = torch.zeros(B, h, hs, hs), torch.zeros(B, h, hs)
    num, den = call_recurrent(impl, phi(q), phi(k), v, S, z)
    fixed = {"layernorm": F.layer_norm(num, (hs,)), "denominator": num / (den + attention_linear.EPS)}
    errs = {name: max_err(y, r) for name, r in fixed.items()}
    expect(min(errs.values()) < 1e-3, "your attention() and your recurrent_step() disagree on the same "
           f"text (relative error {min(errs.values()):.2g}): the fixed-size state must give the same outputs")


# -----------------------------------------------------------------------------
# Exercise 4a: quantization, quantize(x) -> ((tensors...), dequantize)

def quant_rows(seed=0, n=64):
    """(2, 3, 40, n) rows like real keys and values: magnitudes from 0.01 to 100 (a quantizer
    that ignores its scale fails), and one outlier channel 8x the others."""
    x = randn(2, 3, 40, n, seed=seed)
    x[..., 3] *= 8
    return x * 10 ** (4 * torch.rand(2, 3, 40, 1, generator=torch.Generator().manual_seed(seed + 1)) - 2)


def call_quantize(impl, x):
    out = impl.quantize(x)
    expect(isinstance(out, (tuple, list)) and len(out) == 2,
           f"quantize must return (payload, dequantize), got {type(out).__name__}")
    payload, inverse = out
    expect(isinstance(payload, (tuple, list)) and len(payload) > 0 and all(torch.is_tensor(t) for t in payload),
           "the payload must be a tuple of tensors, e.g. (codes, scale)")
    expect(callable(inverse), "the second thing returned must be the dequantize function")
    for i, t in enumerate(payload):
        expect(tuple(t.shape[:-1]) == tuple(x.shape[:-1]), f"payload tensor {i} has shape {tuple(t.shape)}: every "
               f"tensor must keep x's leading dimensions {tuple(x.shape[:-1])} and add one of its own (..., m)")
    return tuple(payload), inverse


def dequant(inverse, payload, like):
    y = inverse(*payload)
    expect(torch.is_tensor(y) and tuple(y.shape) == tuple(like.shape),
           f"dequantize must return a tensor shaped like x {tuple(like.shape)}, got {tuple(getattr(y, 'shape', ()))}")
    expect(y.is_floating_point(), f"dequantize must return floats, got {y.dtype}")
    return y.float()


def bits_per_value(payload, x):
    return sum(t.numel() * t.element_size() * 8 for t in payload) / x.numel()


def error_bound(bits):
    """The mean relative RMS error of a row allowed at `bits` per value: 0.1 at 8.25 bits (int8
    gets 0.01, fp8 e5m2 0.04), 0.5 at 6, 0.75 from 5 bits down (int2 in groups of 32: 0.49).
    Returning zeros scores 1."""
    return min(0.75, 2.0 ** (5 - min(bits, 8.25)))


def check_quant_contract(impl, ctx):
    for n in (64, 32, 16):
        x = randn(2, 3, 5, n, seed=n)
        payload, inverse = call_quantize(impl, x)
        dequant(inverse, payload, x)


def check_quant_bits(impl, ctx):
    x = quant_rows()
    payload, _ = call_quantize(impl, x)
    bits = bits_per_value(payload, x)
    widths = ", ".join(f"{t.dtype} {tuple(t.shape[-1:])}" for t in payload)
    expect(bits <= 9.0, f"{bits:.2f} bits per value ({widths}): store codes as int8/uint8/float8, at most "
           "9 bits per value with the scales (8-bit codes and one float16 scale per 64 values is 8.25)")
    ctx["bits"] = bits
    return f"{bits:.2f} bits per value ({widths}; float32 is 32)"


def check_quant_error(impl, ctx):
    x = quant_rows()
    payload, inverse = call_quantize(impl, x)
    y = dequant(inverse, payload, x)
    bits = bits_per_value(payload, x)
    rel = ((y - x).pow(2).mean(-1) / x.pow(2).mean(-1)).sqrt()  # per row
    worst, mean = rel.max().item(), rel.mean().item()
    bound = error_bound(bits)
    expect(mean == mean and mean <= bound,
           f"relative RMS error {mean:.3g} on average (allowed {bound:.3g} at {bits:.2f} bits per value): rows "
           "range from 0.01 to 100 in size; does every row use its own scale, and does dequantize multiply by it?")
    expect(worst < 1.0, f"a row comes back with a relative error of {worst:.3g}, worse than zeros: small rows "
           "need small scales (clamp the scale only to keep it from being 0)")
    return f"relative RMS error {mean:.2g} on average, {worst:.2g} in the worst row (allowed {bound:.2g})"


def check_quant_rows(impl, ctx):
    x1, x2 = quant_rows(seed=3), quant_rows(seed=5)[:, :, :7]
    p1, inv1 = call_quantize(impl, x1)
    p2, inv2 = call_quantize(impl, x2)
    y1, y2 = dequant(inv1, p1, x1), dequant(inv2, p2, x2)
    # what the cache does: rows of two calls joined, some dropped, read back by the last inverse
    both = tuple(torch.cat([a, b], 2) for a, b in zip(p1, p2))
    keep = torch.arange(x1.size(2) + x2.size(2)) % 3 != 1
    try:
        got = dequant(inv2, tuple(t[:, :, keep] for t in both), torch.cat([x1, x2], 2)[:, :, keep])
    except (NotImplementedError, Failed):
        raise
    except Exception as e:
        raise Failed(f"dequantize failed on the rows of two calls joined ({type(e).__name__}: "
                     f"{' '.join(str(e).split())[:100]}): it may use nothing but its arguments") from None
    expect(torch.allclose(got, torch.cat([y1, y2], 2)[:, :, keep], rtol=1e-3, atol=1e-6),
           "rows changed when payloads of two calls were joined and some rows dropped: each row's "
           "codes and scale must stand alone, and dequantize may use nothing but its arguments")
    alone = dequant(*reversed(call_quantize(impl, x1[:, :, 5:6])), x1[:, :, 5:6])
    expect(torch.allclose(alone, y1[:, :, 5:6], rtol=1e-3, atol=1e-6),
           "a row quantized alone comes back different than among others: no statistics over the "
           "whole tensor (the cache quantizes a few tokens at a time)")


def check_quant_model(impl, ctx):
    from kvpolicy import make_cache_factory
    model = trained_model()
    x, y = held_out(TRAIN_BLOCK, rows=16)
    make_cache = make_cache_factory(kv_quant=impl.spec("quantize"), kv_quant_residual=0)
    with torch.no_grad():
        plain, plain_states = model(x)
        yours, states = model(x, model.new_states(x.size(0), make_cache=make_cache))
    base, loss = token_losses(plain, y).mean().item(), token_losses(yours, y).mean().item()
    bits = GPT.states_bits(states)[0] / (x.numel())
    full = GPT.states_bits(plain_states)[0] / (x.numel())
    expect(loss <= base + 0.1, f"loss {loss:.3f} with your cache against {base:.3f} with the plain cache "
           f"({bits:.0f} KV bits per token): the error costs too much")
    return f"loss {base:.3f} -> {loss:.3f} with KV bits per token {full:.0f} -> {bits:.0f}"


# -----------------------------------------------------------------------------
# Exercise 4b: eviction, priority(scores, pos, seen, kv_sink, kv_recent) -> (B, nkv, n)

def evict_inputs(n=24, seen=60, seed=0):
    """Cached tokens of 2 x 3 heads in shuffled slots: positions 0..3, a sample of the middle
    and the newest; scores with zeros, ties and one heavy hitter per head."""
    g = torch.Generator().manual_seed(seed)
    pos = []
    for _ in range(6):
        middle = (torch.randperm(seen - 14, generator=g)[:n - 14] + 4).tolist()
        p = torch.tensor(list(range(4)) + middle + list(range(seen - 10, seen)))
        pos.append(p[torch.randperm(n, generator=g)])
    pos = torch.stack(pos).view(2, 3, n)
    scores = torch.rand(2, 3, n, generator=g) * (seen - pos)  # older tokens have collected more
    scores[..., ::5] = 0.0
    scores[..., 1::7] = scores[..., 2::7][..., :scores[..., 1::7].size(-1)]  # ties
    return scores, pos, seen


def call_priority(impl, scores, pos, seen, sink, recent):
    s, p = scores.clone(), pos.clone()
    rank = impl.priority(s, p, seen, sink, recent)
    expect(torch.is_tensor(rank) and tuple(rank.shape) == tuple(scores.shape),
           f"priority must return a tensor shaped like scores {tuple(scores.shape)}, "
           f"got {tuple(getattr(rank, 'shape', ())) or type(rank).__name__}")
    expect(rank.is_floating_point(), f"priorities must be floats (float('inf') for the protected), got {rank.dtype}")
    expect(torch.equal(s, scores) and torch.equal(p, pos), "priority changed its inputs: work on a copy "
           "(torch.where(...) makes one); the cache keeps adding to these scores")
    expect(not bool(rank.isnan().any()), "some priorities are nan")
    return rank


EVICT_CASES = [(4, 10), (2, 4), (0, 6), (3, 0)]  # (kv_sink, kv_recent)


def protected_above_rest(rank, must):
    """Is every protected token ranked above every other one, in every head?"""
    low = torch.where(must, rank, float("inf")).amin(-1)
    high = torch.where(must, float("-inf"), rank).amax(-1)
    return bool((low > high).all()) if bool(must.any()) else True


def check_evict_shapes(impl, ctx):
    scores, pos, seen = evict_inputs()
    call_priority(impl, scores, pos, seen, 4, 10)


def check_evict_sinks(impl, ctx):
    scores, pos, seen = evict_inputs()
    for sink, recent in EVICT_CASES:
        rank = call_priority(impl, scores, pos, seen, sink, recent)
        sinks = pos < sink
        may_go = ~sinks & (pos < seen - recent)
        expect(protected_above_rest(torch.where(sinks | may_go, rank, float("-inf")), sinks),
               f"kv_sink={sink}: a token at a position < {sink} is ranked below a token that may go: "
               "the sinks must always stay (give them float('inf'))")


def check_evict_recent(impl, ctx):
    scores, pos, seen = evict_inputs()
    for sink, recent in EVICT_CASES:
        rank = call_priority(impl, scores, pos, seen, sink, recent)
        new = pos >= seen - recent
        may_go = (pos >= sink) & ~new
        expect(protected_above_rest(torch.where(new | may_go, rank, float("-inf")), new),
               f"kv_recent={recent}, seen={seen}: a token at a position >= {seen - recent} is ranked below "
               "a token that may go: the kv_recent newest must always stay")


def check_evict_scores(impl, ctx):
    scores, pos, seen = evict_inputs()
    for sink, recent in EVICT_CASES:
        rank = call_priority(impl, scores, pos, seen, sink, recent)
        free = (pos >= sink) & (pos < seen - recent)
        s = scores.clone()
        heavy = torch.where(free, s, float("-inf")).argmax(-1, keepdim=True)  # the most attended
        s.scatter_(-1, heavy, 1e6)  # make it a clear heavy hitter
        rank = call_priority(impl, s, pos, seen, sink, recent)
        top = rank.gather(-1, heavy)
        unused = free & (s == 0)
        expect(bool((torch.where(unused, rank, float("-inf")) < top).all()),
               f"kv_sink={sink}, kv_recent={recent}: a token nobody attended to is ranked above the token "
               "with by far the largest attention: rank by the scores (higher = keep)")


def check_evict_model(impl, ctx):
    from kvpolicy import make_cache_factory
    budget, sink, recent = 10, 2, 3
    model = tiny_model(n_kv_head=2, n_layer=3, kv_share=1).eval()
    idx = random_text(2, 40)
    make_cache = make_cache_factory(kv_evict=impl.spec("priority"), kv_budget=budget, kv_sink=sink, kv_recent=recent)
    states = model.new_states(2, make_cache=make_cache)
    with torch.no_grad():
        for t in range(idx.size(1)):
            logits, states = model(idx[:, t:t + 1], states)
            for layer, cache in enumerate(states):
                held = cache.pos_q  # (B, nkv, n): what each head holds (eviction runs before a step's token is added)
                expect(held.size(-1) <= budget + 1, f"step {t}: layer {layer} holds {held.size(-1)} tokens, "
                       f"budget {budget} plus this step's")
                need = set(range(min(sink, t + 1))) | set(range(max(t + 1 - recent, 0), t + 1))
                for head in held.reshape(-1, held.size(-1)):
                    missing = need - set(head.tolist())
                    expect(not missing, f"step {t}: layer {layer} dropped {sorted(missing)}; the sinks and the "
                           f"{recent} newest must stay (kv_sink={sink}, kv_recent={recent})")
    return f"40 decode steps, budget {budget}, sinks and newest always held"


def check_evict_eval(impl, ctx):
    from kvpolicy import make_cache_factory
    model = trained_model()
    x, y = held_out(TRAIN_BLOCK, rows=32)
    budget, sink, recent = 12, 2, 4
    losses = {}
    with torch.no_grad():
        for name, options in (("plain", None), ("window", dict(kv_evict="window")),
                              ("yours", dict(kv_evict=impl.spec("priority"), kv_recent=recent))):
            make_cache = make_cache_factory(kv_budget=budget, kv_sink=sink, **options) if options else None
            logits, _ = feed(model, x, 1, make_cache=make_cache)
            losses[name] = token_losses(logits, y)[budget:].mean().item()
    expect(losses["yours"] <= losses["window"] + 0.05,
           f"loss {losses['yours']:.3f} with your rule, {losses['window']:.3f} keeping the newest "
           f"{budget - sink} (plain cache {losses['plain']:.3f}): your choice of tokens costs more than recency")
    return (f"budget {budget} of {TRAIN_BLOCK}: loss {losses['plain']:.3f} plain, {losses['window']:.3f} recency only, "
            f"{losses['yours']:.3f} yours")


# -----------------------------------------------------------------------------
# the exercises, their stubs and references

@dataclass
class Check:
    title: str
    fn: object
    uses: tuple  # the functions of the module it calls
    slow: bool = False  # skipped when a check of the same functions failed before it


@dataclass
class Exercise:
    name: str
    number: int
    title: str
    functions: tuple
    reference: dict  # function name -> "module:function" of the project's version
    checks: list = field(default_factory=list)


EXERCISES = {e.name: e for e in [
    Exercise("kv_window", 1, "bounded history", ("keep_recent",), {"keep_recent": "kvcache:keep_recent"}, [
        Check("returns k, v (B, nkv, kept, hs) and pos (kept,) in the given dtypes", check_trim_shapes, ("keep_recent",)),
        Check("keeps the kv_window newest tokens", check_trim_recent, ("keep_recent",)),
        Check("keeps the kv_sink first tokens of the text", check_trim_sinks, ("keep_recent",)),
        Check("drops everything else (at most kv_window + kv_sink tokens)", check_trim_budget, ("keep_recent",)),
        Check("k and v rows stay with their positions, oldest first", check_trim_rows, ("keep_recent",)),
        Check("tiny model: --kv_trim equals the ring-buffer cache", check_trim_model, ("keep_recent",), slow=True),
        Check("trained model sampled 10x past its training length", check_trim_long_text, ("keep_recent",), slow=True),
    ]),
    Exercise("xl_memory", 2, "TransformerXL memory", ("xl_step",), {"xl_step": "kvcache:xl_step"}, [
        Check("returns six tensors of the right shapes and dtypes", check_xl_shapes, ("xl_step",)),
        Check("attends over memory then this step, with key_ok", check_xl_attend, ("xl_step",)),
        Check("keeps the newest min(mem_len, m + T) tokens as memory", check_xl_keep, ("xl_step",)),
        Check("memory detached, this step's keys keep their gradient", check_xl_detach, ("xl_step",)),
        Check("tiny model: --xl_update equals the reference memory", check_xl_model, ("xl_step",), slow=True),
        Check("one training step: gradients equal the reference's", check_xl_grads, ("xl_step",), slow=True),
        Check("short training on text that repeats block to block", check_xl_training, ("xl_step",), slow=True),
    ]),
    Exercise("linear_attention", 3, "linear attention", ("attention", "recurrent_step"),
             {"attention": "attention_linear:linear_attention",
              "recurrent_step": "attention_linear:linear_recurrent"}, [
        Check("attention: y shaped like q, in q's dtype, finite", check_linear_shapes, ("attention",)),
        Check("attention: phi(q) phi(k)^T v, masked, normalised", check_linear_formula, ("attention",)),
        Check("attention: causal, no output sees a later token", check_linear_causal, ("attention",)),
        Check("attention: follows any mask (windows, sinks, T < S)", check_linear_mask, ("attention",)),
        Check("recurrent_step: num/den shapes, fixed-size state", check_recurrent_shapes, ("recurrent_step",)),
        Check("recurrent_step: updates S and z in place", check_recurrent_state, ("recurrent_step",)),
        Check("recurrent_step: recurrent equals parallel", check_recurrent_parallel, ("recurrent_step",)),
        Check("recurrent_step equals attention on the same text", check_recurrent_matches_attention,
              ("attention", "recurrent_step")),
        Check("tiny model: cached decoding equals the full forward", check_linear_cached, ("attention",), slow=True),
        Check("tiny model: same logits and gradients as --attention=linear", check_linear_model, ("attention",), slow=True),
        Check("short training with your attention", check_linear_training, ("attention",), slow=True),
    ]),
    Exercise("kv_quant", 4, "KV quantization", ("quantize",), {"quantize": "kvquant:int8_quantize"}, [
        Check("returns (tensors shaped (..., m), dequantize); dequantize gives x's shape",
              check_quant_contract, ("quantize",)),
        Check("bits per value, scales included (at most 9)", check_quant_bits, ("quantize",)),
        Check("error bound for its bits, rows of any size", check_quant_error, ("quantize",)),
        Check("rows stand alone (joined, dropped, quantized one by one)", check_quant_rows, ("quantize",)),
        Check("trained model with your --kv_quant cache", check_quant_model, ("quantize",), slow=True),
    ]),
    Exercise("kv_evict", 4, "KV eviction", ("priority",), {"priority": "kvevict:h2o_priority"}, [
        Check("returns float priorities shaped like scores, inputs untouched", check_evict_shapes, ("priority",)),
        Check("the kv_sink first tokens always stay", check_evict_sinks, ("priority",)),
        Check("the kv_recent newest tokens always stay", check_evict_recent, ("priority",)),
        Check("heavy hitters stay, unattended tokens go first", check_evict_scores, ("priority",)),
        Check("tiny model: --kv_evict keeps the budget, sinks and newest", check_evict_model, ("priority",), slow=True),
        Check("trained model decoding with a budget of 12 tokens", check_evict_eval, ("priority",), slow=True),
    ]),
]}
# one cheap call per function: a stub that still raises NotImplementedError skips its
# checks at once (the slow ones would train a model first)
PROBES = {
    "keep_recent": lambda impl: impl.keep_recent(*trim_inputs(list(range(6))), 3, 1),
    "xl_step": lambda impl: impl.xl_step(*xl_inputs(2, 3), 4),
    "attention": lambda impl: impl.attention(*qkv(T=2, S=2), causal(2, 2), 0.0),
    "recurrent_step": lambda impl: impl.recurrent_step(*recurrent_inputs(T=2)),
    "quantize": lambda impl: impl.quantize(randn(1, 1, 2, 16)),
    "priority": lambda impl: impl.priority(*evict_inputs(), 4, 10),
}
ALIASES = {"1": ["kv_window"], "2": ["xl_memory"], "3": ["linear_attention"], "4": ["kv_quant", "kv_evict"]}


class Impl:
    """The functions under test: a module's attributes, or the project's references."""

    def __init__(self, exercise, module=None, reference=False):
        self.functions, self.specs = {}, {}
        self.where = "the project's reference" if reference else (module or f"exercises.{exercise.name}")
        for name in exercise.functions:
            spec = exercise.reference[name] if reference else f"{module or 'exercises.' + exercise.name}:{name}"
            mod_name, fn_name = spec.split(":")
            self.functions[name] = getattr(importlib.import_module(mod_name), fn_name)
            self.specs[name] = spec

    def __getattr__(self, name):
        try:
            return self.__dict__["functions"][name]
        except KeyError:
            raise AttributeError(name) from None

    def spec(self, name):
        """"package.module:function", for the plug-in points that take a name."""
        return self.specs[name]


def where_it_broke(exc):
    """file:line of the innermost frame in exercises/ or the module under test, if any."""
    frames = traceback.extract_tb(exc.__traceback__)
    here = os.path.abspath(__file__)
    mine = [f for f in frames if os.path.abspath(f.filename) != here and "site-packages" not in f.filename]
    frame = (mine or frames)[-1]
    return f"{os.path.relpath(frame.filename, ROOT)}:{frame.lineno}"


def run_exercise(exercise, module=None, reference=False, out=print, skip_slow=False):
    """Run the checks of one exercise (skip_slow: only the fast ones); returns a list of
    (check title, status, message), status PASS, FAIL, TODO (not implemented) or SKIP."""
    try:
        impl = Impl(exercise, module, reference)
    except (ImportError, AttributeError, SyntaxError) as e:
        out(f"{exercise.name}: cannot import {module or 'exercises.' + exercise.name}: {type(e).__name__}: {e}")
        return [(c.title, "FAIL", "does not import") for c in exercise.checks]
    out(f"{exercise.name} (assignment {exercise.number}, {exercise.title}): {impl.where}")
    todo = set()
    for name in exercise.functions:
        try:
            PROBES[name](impl)
        except NotImplementedError:
            todo.add(name)
        except Exception:
            pass  # the checks will say what is wrong
    results, failed = [], set()
    ctx = {}  # what one check learns for the next ones (e.g. the normalisation used)
    for check in exercise.checks:
        if skip_slow and check.slow:
            continue
        t0 = time.time()
        if todo & set(check.uses):
            status, msg = "TODO", "not implemented yet"
        elif check.slow and failed & set(check.uses):
            status, msg = "SKIP", "fix the failures above first"
        else:
            try:
                detail = check.fn(impl, ctx)
                status, msg = "PASS", detail or ""
            except NotImplementedError:
                status, msg = "TODO", "not implemented yet"
            except Failed as e:
                status, msg = "FAIL", str(e)
            except UserError as e:  # a plug-in point refused the function
                status, msg = "FAIL", str(e)
            except Exception as e:
                first = " ".join(str(e).split())[:160]
                status, msg = "FAIL", f"your code raised {type(e).__name__}: {first} (at {where_it_broke(e)})"
        if status in ("FAIL", "SKIP"):
            failed.update(check.uses)
        took = time.time() - t0
        timing = f" [{took:.1f}s]" if took >= 0.5 else ""
        out(f"  {status}  {check.title}" + (f": {msg}" if msg else "") + timing)
        results.append((check.title, status, msg))
    return results


def summary(results):
    counts = {s: sum(1 for r in results if r[1] == s) for s in ("PASS", "FAIL", "TODO", "SKIP")}
    words = [f"{counts['PASS']} passed", f"{counts['FAIL']} failed"]
    if counts["TODO"]:
        words.append(f"{counts['TODO']} not implemented yet")
    if counts["SKIP"]:
        words.append(f"{counts['SKIP']} skipped")
    return ", ".join(words), counts["PASS"] == len(results)


def run(names, module=None, reference=False, out=print):
    """Run the named exercises; returns True when every check passed."""
    everything = []
    for name in names:
        results = run_exercise(EXERCISES[name], module, reference, out)
        line, _ = summary(results)
        out(f"  -> {name}: {line}")
        everything += results
    line, ok = summary(everything)
    out(f"summary: {line}" + ("" if ok else " (exit code 1)"))
    return ok


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m exercises.check", description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("name", help="all, " + ", ".join(EXERCISES) + ", or an assignment number 1..4")
    parser.add_argument("--reference", action="store_true", help="check the project's reference implementation instead")
    parser.add_argument("--module", help="check this module (package.module) instead of exercises.NAME")
    args = parser.parse_args(argv)
    if args.name == "all":
        names = list(EXERCISES)
    elif args.name in EXERCISES:
        names = [args.name]
    elif args.name in ALIASES:
        names = [n for n in ALIASES[args.name] if n in EXERCISES]
    else:
        parser.error(f"unknown exercise {args.name!r}: choose all, {', '.join(EXERCISES)} or 1..4")
    if args.module and len(names) != 1:
        parser.error("--module checks one exercise: name it")
    if args.module and args.reference:
        parser.error("--reference checks the project's code; --module checks yours: pick one")
    torch.set_num_threads(1)  # tiny models: more threads only wait for each other
    ok = run(names, args.module, args.reference)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
