"""
Helpers the checks of several exercises share: the verdict (Failed, expect, expect_close),
random inputs, a tiny model and feeding it a few tokens at a time, small made-up corpora,
and a small model trained on the spot (a few seconds on a CPU) with its held-out text.
"""

import functools
import random

import torch
from torch.nn import functional as F

from kv.policy import KVOptions
from model import GPT, GPTConfig, loss_fn


class Failed(Exception):
    """A check's verdict: what went wrong and what to look at."""


class Skipped(Exception):
    """A check that cannot judge its rule because another check's rule is broken on its input
    (it would only repeat that failure under its own rule's name). exercises/check.py turns a
    failure into a SKIP too when an earlier check failed for the same reason: the same exception
    from the code under test, or the same message (ctx["reported"] remembers them)."""


def see(assignment, rule):
    """Where exercises/README.md states the rule a failure breaks (its "Assignment N, rules" list)."""
    return f"see exercises/README.md, 'Assignment {assignment}, rule {rule}'"


def short(xs, n=12):
    """A list for a message: the first and last n/2 items of a long one (a single value, which
    a wrong answer may be, as itself)."""
    try:
        xs = list(xs)
    except TypeError:  # (an int, or a 0-d tensor's .tolist(): the student's answer, not a crash here)
        return repr(xs)
    return str(xs) if len(xs) <= n else str(xs[:n // 2])[:-1] + ", ..., " + str(xs[-n // 2:])[1:]


def expect(ok, message):
    if not ok:
        raise Failed(message)


def max_err(a, b):
    """Largest absolute difference, relative to the size of b (0 when both are empty)."""
    if tuple(a.shape) != tuple(b.shape):  # (not the checker's crash: the answer's shape)
        raise Failed(f"a tensor of shape {tuple(a.shape)} came back where {tuple(b.shape)} was expected")
    if a.numel() == 0:
        return 0.0
    err = ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()
    return err if err == err else float("inf")  # nan: as far from b as can be (a comparison with nan is False)


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


def feed(model, idx, step, kv=None):
    """Logits of idx fed `step` tokens at a time through the caches of kv (KVOptions; default
    plain and unbounded), and the caches."""
    caches = (kv or KVOptions(kv_window=0)).make_caches(model, idx.size(0), capacity=idx.size(1))
    out = []
    for a in range(0, idx.size(1), step):
        logits, caches = model(idx[:, a:a + step], caches)
        out.append(logits)
    return torch.cat(out, dim=1), caches


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
        logits, _ = model(x)
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
