"""
Checks of exercise 2, TransformerXL memory: xl_step(mem_k, mem_v, mem_ok, k, v, mem_len),
like kv.xl.xl_step.
"""

import torch

from kv.xl import make_xl_memory, xl_step
from exercises.checks_common import (Failed, Skipped, expect, expect_close, randn, random_text, repeating_text,
                                     tiny_model)
from model import GPT, GPTConfig, loss_fn


def xl_inputs(m, T, B=2, H=2, hs=4, seed=0, dtype=torch.float32):
    mem_k, mem_v = randn(B, H, m, hs, seed=seed, dtype=dtype), randn(B, H, m, hs, seed=seed + 1, dtype=dtype)
    mem_ok = torch.ones(B, m, dtype=torch.bool)
    if m:
        mem_ok[1, :m // 2 + 1] = False  # row 1 restarted: part of its memory is another text
    k = randn(B, H, T, hs, seed=seed + 2, dtype=dtype).requires_grad_()
    v = randn(B, H, T, hs, seed=seed + 3, dtype=dtype).requires_grad_()
    return mem_k, mem_v, mem_ok, k, v


def call_xl(impl, m, T, mem_len, seed=0, dtype=torch.float32):
    args = xl_inputs(m, T, seed=seed, dtype=dtype)
    out = impl.xl_step(*args, mem_len)
    got = f"a {type(out).__name__} of {len(out)}" if isinstance(out, (tuple, list)) else f"a {type(out).__name__}"
    expect(isinstance(out, (tuple, list)) and len(out) == 6,
           f"xl_step must return six things: keys, vals, key_ok, new_k, new_v, new_ok; it returned {got}")
    expect(all(torch.is_tensor(t) for t in out), "xl_step must return six tensors")
    return args, out


XL_CASES = [(0, 4, 6), (5, 4, 6), (5, 4, 20), (6, 8, 3), (3, 3, 6)]  # (m, T, mem_len)


def check_xl_shapes(impl, ctx):
    # the number of tokens is judged by the next checks; here the axes and dtypes
    for (m, T, mem_len), dtype in [(c, torch.float32) for c in XL_CASES] + [((5, 4, 6), torch.bfloat16),
                                                                            ((0, 4, 6), torch.bfloat16)]:
        (mk, _, _, k, _), (keys, vals, ok, nk, nv, nok) = call_xl(impl, m, T, mem_len, dtype=dtype)
        B, H, _, hs = k.shape
        where = f"m={m}, T={T}, mem_len={mem_len}"
        for name, t in (("keys", keys), ("vals", vals), ("new_k", nk), ("new_v", nv)):
            expect(t.dim() == 4 and (t.size(0), t.size(1), t.size(3)) == (B, H, hs),
                   f"{where}: {name} has shape {tuple(t.shape)}, expected (B, nkv, tokens, hs) = ({B}, {H}, "
                   f"tokens, {hs}): join along dim 2, the token axis")
        for name, t, like in (("key_ok", ok, keys), ("new_ok", nok, nk)):
            expect(t.dim() == 2 and t.size(0) == B, f"{where}: {name} has shape {tuple(t.shape)}, expected "
                   f"(B, tokens) = ({B}, tokens)")
            expect(t.dtype == torch.bool, f"{name} must be a bool tensor, got {t.dtype}")
        expect(keys.size(2) == vals.size(2) == ok.size(1), f"{where}: keys, vals and key_ok hold "
               f"{keys.size(2)}, {vals.size(2)} and {ok.size(1)} tokens: the same tokens in all three")
        expect(nk.size(2) == nv.size(2) == nok.size(1), f"{where}: new_k, new_v and new_ok hold "
               f"{nk.size(2)}, {nv.size(2)} and {nok.size(1)} tokens: the same tokens in all three")
        for name, t in (("keys", keys), ("vals", vals), ("new_k", nk), ("new_v", nv)):
            expect(t.dtype == dtype, f"{name} came back as {t.dtype} for {dtype} k and v: keep k's dtype "
                   "(under autocast, training hands xl_step bfloat16 keys and values)")


def check_xl_attend(impl, ctx):
    for m, T, mem_len in XL_CASES:
        (mk, mv, mok, k, v), (keys, vals, ok, _, _, _) = call_xl(impl, m, T, mem_len)
        where = f"m={m}, T={T}"
        expect(keys.size(2) == m + T, f"{where}: keys hold {keys.size(2)} tokens, expected m + T = {m + T}: "
               "this step attends over all of the memory and all of its own tokens")
        if m and torch.equal(keys.detach(), torch.cat([k, mk], 2).detach()):
            raise Failed(f"{where}: keys hold this step's tokens first, then the memory: the memory comes "
                         "first (it is older), then this step's keys")
        expect_close(keys, torch.cat([mk, k], 2), f"{where}: keys",
                     "attend over the memory first, then this step's keys, joined along dim 2 (tokens)", tol=0)
        expect_close(vals, torch.cat([mv, v], 2), f"{where}: vals", "memory first, then this step's values", tol=0)
        want = torch.cat([mok, torch.ones(k.size(0), T, dtype=torch.bool)], 1)
        if torch.equal(ok, want):
            continue
        expect(tuple(ok.shape) == tuple(want.shape), f"{where}: key_ok has shape {tuple(ok.shape)}, expected "
               f"(B, m + T) = {tuple(want.shape)}: one flag per key, mem_ok followed by True for this step's tokens")
        expect(not (bool(ok.all()) and not bool(mok.all())), f"{where}: key_ok is all True, but row 1 restarted "
               "(mem_ok False): a restarted row must not see its old memory, key_ok = mem_ok followed by True for "
               "this step")
        expect(not (m and torch.equal(ok, torch.cat([want[:, m:], mok], 1))), f"{where}: key_ok puts this "
               "step's True first; it follows the order of keys: mem_ok first, then True for this step")
        raise Failed(f"{where}: key_ok must be mem_ok followed by True for this step's tokens "
                     "(a restarted row must not see its old memory)")


def check_xl_keep(impl, ctx):
    for m, T, mem_len in XL_CASES:
        (mk, mv, mok, k, v), (keys, vals, ok, nk, nv, nok) = call_xl(impl, m, T, mem_len)
        n = min(mem_len, m + T)
        where = f"m={m}, T={T}, mem_len={mem_len}"
        expect(nk.size(2) <= mem_len, f"{where}: the memory keeps {nk.size(2)} tokens, more than mem_len: "
               "keep only the newest min(mem_len, m + T), the end of keys")
        all_k, all_v = torch.cat([mk, k], 2).detach(), torch.cat([mv, v], 2).detach()
        if nk.size(2) == min(n, T) < n and torch.equal(nk.detach(), all_k[:, :, m + T - nk.size(2):]):
            raise Failed(f"{where}: the memory keeps only this step's {nk.size(2)} tokens: when T < mem_len "
                         "it carries older memory too; keep the newest min(mem_len, m + T) of keys, not of k")
        expect(nk.size(2) == n, f"{where}: the memory keeps {nk.size(2)} tokens, expected {n} "
               "(the newest min(mem_len, m + T))")
        expect(not (n < m + T and torch.equal(nk.detach(), all_k[:, :, :n])), f"{where}: the memory keeps the "
               f"oldest {n} tokens; keep the newest, the end of keys")
        if not torch.equal(nk.detach(), all_k[:, :, -n:]) and keys.shape == all_k.shape and \
                torch.equal(nk.detach(), keys.detach()[:, :, -n:]):  # the end of keys, as this step orders them
            raise Skipped(f"{where}: new_k is the end of keys, which are not memory then this step (see above)")
        expect_close(nk, all_k[:, :, -n:], f"{where}: new_k",
                     "keep the newest tokens (the end of keys), oldest first", tol=0)
        expect_close(nv, all_v[:, :, -n:], f"{where}: new_v", "keep the newest values", tol=0)
        if not torch.equal(nok, ok[:, -n:]):
            expect(not (bool(nok.all()) and not bool(ok[:, -n:].all())), f"{where}: new_ok is all True, but "
                   "some kept tokens belong to a restarted row: new_ok is key_ok of the tokens kept, the same slice")
            raise Failed(f"{where}: new_ok must be key_ok of the tokens kept, the same slice as new_k")


def check_xl_detach(impl, ctx):
    (_, _, _, k, v), (keys, vals, _, nk, nv, _) = call_xl(impl, 5, 4, 6)
    for name, t in (("new_k", nk), ("new_v", nv)):
        expect(not t.requires_grad, f"{name} still requires grad: .detach() it, or the next step's backward "
               "runs into this step's graph")
    for name, t in (("keys", keys), ("vals", vals)):
        expect(t.requires_grad, f"{name} carry no gradient: detach only the memory you keep, not what this step "
               "attends over (no .detach() on k or v, no torch.no_grad around the join)")
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
    memory = make_xl_memory(model, batches[0][0].size(0), mem_len, step_fn)
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
        ref, _ = xl_forward(model, xl_step, batches, 12)
        yours, memory = xl_forward(model, impl.xl_step, batches, 12)
    for i, (a, b) in enumerate(zip(yours, ref)):
        expect_close(a, b, f"logits of batch {i + 1}", "compare keys/key_ok and the memory kept with kv.xl.xl_step")
    expect(max(s.tokens() for s in memory) <= 12, "the memory grew beyond mem_len=12")
    return "3 batches, a row restarting, GQA, local windows"


def xl_step_grads(model, step_fn, batches, mem_len):
    model.train()
    memory = make_xl_memory(model, batches[0][0].size(0), mem_len, step_fn)
    for x, _ in batches:  # (no restarts: the gradient must stop at the last batch's start either way)
        logits, _ = model(x, memory)
    y = torch.roll(batches[-1][0], -1, dims=1)
    model.zero_grad(set_to_none=True)
    loss_fn(logits, y).backward()  # the last batch only: gradient must stop at its start
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def check_xl_grads(impl, ctx):
    model = tiny_model(**xl_config())
    batches = xl_batches()
    ref = xl_step_grads(model, xl_step, batches, 12)
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
    memory = make_xl_memory(model, batch, mem, impl.xl_step)
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
    memory = make_xl_memory(model, 4, mem, impl.xl_step)
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
