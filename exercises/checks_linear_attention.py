"""
Checks of exercise 3, linear attention: attention(q, k, v, mask, dropout_p) and
recurrent_step(q, k, v, S, z), like attention_linear.linear_attention and linear_recurrent.
"""

import torch
from torch.nn import functional as F

import attention_linear
from kv.cache import visible
from exercises.checks_common import (TRAIN_BLOCK, Failed, Skipped, expect, expect_close, feed, max_err, play_text,
                                     randn, random_text, see, tiny_model, train_tiny)
from model import loss_fn


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
    m = visible(torch.arange(S - T, S), torch.arange(S), window=3, sink=1)
    m = m.expand(B, 1, T, S).clone()
    m[1, :, :, 1] = False
    return m


NOT_FINITE = ("y holds inf or nan: without a softmax a weight of -inf is not 0, multiply the weights by the "
              "mask instead (att * mask); and keep a denominator from being 0 (+ eps)")


def call_attention(impl, q, k, v, mask):
    given = [t.clone() for t in (q, k, v, mask)]  # (the checker's stay its own: a change in place is told so)
    y = impl.attention(*given, 0.0)
    expect(all(torch.equal(a, b) for a, b in zip(given, (q, k, v, mask))),
           "attention changed q, k, v or mask in place (e.g. F.elu(q, inplace=True), q.add_(1), mask.mul_): the "
           "model uses them after the call; compute new tensors (phi(q) = F.elu(q) + 1)")
    expect(torch.is_tensor(y), f"attention must return a tensor, got {type(y).__name__}")
    expect(tuple(y.shape) == tuple(q.shape),
           f"y has shape {tuple(y.shape)}, expected q's {tuple(q.shape)} (B, nh, T, hs)")
    return y


def check_linear_shapes(impl, ctx):
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (t.to(dtype) for t in qkv(T=3, S=7))
        y = call_attention(impl, q, k, v, causal(3, 7))
        expect(y.dtype == dtype, f"y came back as {y.dtype} for {dtype} inputs: cast the result to q.dtype")
        ctx["not_finite"] = not bool(torch.isfinite(y).all())  # the later checks then step aside
        expect(not ctx["not_finite"], NOT_FINITE)
    # "compute in float32": bfloat16 inputs give what the same values give as float32, rounded
    # once to bfloat16 (within 2 steps), not sums rounded at every step (dozens of steps off).
    # Against the function's own float32 result, so that a wrong formula is rule 2's to report
    q, k, v = (t.to(torch.bfloat16) for t in qkv(T=16, S=64, hs=32))
    y = call_attention(impl, q, k, v, causal(16, 64)).float()
    ref = call_attention(impl, q.float(), k.float(), v.float(), causal(16, 64))
    step = ref.abs().clamp_min(2 ** -6) * 2 ** -7  # one bfloat16 step, about
    steps = ((y - ref).abs() / step).max().item()
    if steps > 2:  # (nan: not finite, which the rules above report)
        raise Failed(f"for bfloat16 inputs y is up to {steps:.0f} bfloat16 steps from what the same values give "
                     "in float32: compute in float32 (q.float(), k.float(), v.float()) and cast y back at the end")


def mistakes(q, k, v, mask):
    """What attention() returns with the usual mistakes: (outputs, what is wrong, rule)."""
    phi, hs, T, S = attention_linear.phi, q.size(-1), q.size(-2), k.size(-2)
    w = phi(q) @ phi(k).transpose(-2, -1)

    def normalised(att):
        num = att @ v
        return [F.layer_norm(num, (hs,)), num / (att.sum(-1, keepdim=True) + attention_linear.EPS)]
    soft = (q @ k.transpose(-2, -1)).masked_fill(~mask, float("-inf"))
    return [
        ([(soft / hs ** 0.5).softmax(-1) @ v, soft.softmax(-1) @ v], "y looks like softmax attention: linear "
         "attention has no softmax, its weights are phi(q) . phi(k) with phi(x) = elu(x) + 1", 2),
        (normalised((F.elu(q) @ F.elu(k).transpose(-2, -1)) * mask), "phi misses its + 1: phi(x) = elu(x) + 1 "
         "(elu alone goes negative)", 2),
        (normalised(w * mask / hs ** 0.5), "the weights carry a 1/sqrt(hs) scale: linear attention has none "
         "(layer_norm hides it on large outputs, not on small ones)", 2),
        ([(w * mask) @ v], "y is not normalised: F.layer_norm(num, (hs,)), or num / (den + eps)", 3),
        (normalised(w), "y ignores the mask: multiply the weights by it (att * mask)", 4),
        (normalised(w * causal(T, S)), "y follows a causal triangle of its own, not the mask it is given: that "
         "mask may also hide a window's old keys, or another text's", 4),
    ]


def skip_if_not_finite(y, ctx, judged):
    """When y holds inf or nan: Skipped if the shapes check failed for it already (`judged`
    cannot be told), else Failed with that check's message."""
    if not bool(torch.isfinite(y).all()):
        if ctx.get("not_finite"):
            raise Skipped(f"y holds inf or nan (see above), so {judged} cannot be told")
        raise Failed(NOT_FINITE)


def check_linear_formula(impl, ctx):
    cases = [(6, 6, causal(6, 6), 1.0), (3, 9, causal(3, 9), 1.0), (4, 9, window_mask(2, 4, 9), 1.0),
             (6, 6, causal(6, 6), 1e-3)]  # small values: layer_norm's eps shows a leftover scale
    for T, S, mask, size in cases:
        q, k, v = qkv(T=T, S=S)
        v = v * size
        y = call_attention(impl, q, k, v, mask)
        skip_if_not_finite(y, ctx, "how it differs from the formula")
        refs = linear_references(q, k, v, mask)
        errs = {name: max_err(y, r) for name, r in refs.items()}
        best = min(errs, key=errs.get)
        if errs[best] >= 1e-3:
            for outputs, wrong, rule in mistakes(q, k, v, mask):
                if min(max_err(y, o) for o in outputs) < 1e-3:
                    if rule == 4:  # the mask checks below fail for it
                        raise Skipped(f"T={T}, S={S}: {wrong.split(':')[0]} (see below), so the formula cannot "
                                      "be told")
                    raise Failed(f"T={T}, S={S}: {wrong}; {see(3, rule)}")
            open_mask = torch.ones_like(mask)
            if max_err(call_attention(impl, q, k, v, open_mask), y) < 1e-6:
                raise Skipped(f"T={T}, S={S}: y stays the same when the mask lets every key through: it follows a "
                              "mask of its own (see below), so the formula cannot be told")
            if size != 1.0 and ctx.get("norm") == "layernorm":  # right at size 1, wrong at this size
                raise Failed(f"values of size {size:g}: y differs from layer_norm's by {errs['layernorm']:.2g} "
                             "(relative), where values of size 1 gave it: on small values layer_norm's eps counts: "
                             "F.layer_norm(num, (hs,)) with its default eps, and num as it is (not rescaled "
                             f"first); {see(3, 3)}")
            if errs["denominator"] < 0.05:  # close to the paper's form: its eps, not the formula
                raise Failed(f"T={T}, S={S}: y is within {errs['denominator']:.2g} (relative) of num / (den + 1e-6), "
                             "not within 1e-3: a larger eps in the denominator shrinks the outputs where the "
                             f"weights are small; add 1e-6 (attention_linear.EPS) to den, nothing more; {see(3, 3)}")
            raise Failed(f"T={T}, S={S}, values of size {size:g}: y is not (phi(q) phi(k)^T * mask) v normalised "
                         f"(relative error {errs['layernorm']:.2g} vs layer_norm, {errs['denominator']:.2g} vs the "
                         "denominator); phi(x) = elu(x) + 1, no softmax, no 1/sqrt(hs), each position normalised "
                         "on its own (layer_norm over hs, the last dimension, only)")
        expect(ctx.setdefault("norm", best) == best, "the normalisation changed between calls")
    return "normalised by " + {"layernorm": "layer_norm", "denominator": "the denominator"}[ctx["norm"]]


def check_linear_causal(impl, ctx):
    q, k, v = qkv(T=7, S=7)
    y = call_attention(impl, q, k, v, causal(7, 7))
    skip_if_not_finite(y, ctx, "whether later keys leak in")
    for t in range(6):
        k2, v2 = k.clone(), v.clone()
        k2[:, :, t + 1:] += randn(*k2[:, :, t + 1:].shape, seed=t + 10) * 3
        v2[:, :, t + 1:] += randn(*v2[:, :, t + 1:].shape, seed=t + 20) * 3
        y2 = call_attention(impl, q, k2, v2, causal(7, 7))
        ctx["leaks"] = not torch.allclose(y2[:, :, :t + 1], y[:, :, :t + 1], atol=1e-5)  # for the mask check
        expect(not ctx["leaks"],
               f"the output at position {t} changed when only later keys/values changed: "
               "the future leaks in; zero the weights where the mask is False, and normalise each position "
               "on its own (over hs only, not over T)")


def check_linear_mask(impl, ctx):
    B, T, S = 2, 4, 9
    q, k, v = qkv(B=B, T=T, S=S)
    mask = window_mask(B, T, S)
    y = call_attention(impl, q, k, v, mask)
    skip_if_not_finite(y, ctx, "whether hidden keys leak in")
    if ctx.get("leaks"):  # (the mask ignored, or a normalisation over T: either shows here as a leak too)
        raise Skipped("later tokens leak into earlier outputs (see above), so whether y follows a window's mask "
                      "cannot be told")
    for b in range(B):
        for t in range(T):
            hidden = ~mask[b, 0, t]
            k2, v2 = k.clone(), v.clone()
            k2[b, :, hidden] += 3.0
            v2[b, :, hidden] -= 3.0
            y2 = call_attention(impl, q, k2, v2, mask)
            expect(torch.allclose(y2[b, :, t], y[b, :, t], atol=1e-5),
                   f"row {b}, query {t}: the output depends on keys the mask hides (a window, a sink, "
                   "another text): use the mask you are given, not your own triangle (tril(ones(T, S)) is "
                   "causal only when T = S)")
            for s in mask[b, 0, t].nonzero().flatten().tolist():
                k2, v2 = k.clone(), v.clone()  # (not a shift of every channel alike: layer_norm removes it)
                k2[b, :, s] += randn(*k2[b, :, s].shape, seed=s + 30)
                v2[b, :, s] += randn(*v2[b, :, s].shape, seed=s + 40) * 3
                y2 = call_attention(impl, q, k2, v2, mask)
                expect(not torch.allclose(y2[b, :, t], y[b, :, t], atol=1e-5),
                       f"row {b}, query {t}: the output ignores key {s}, which the mask lets through: use the "
                       "mask you are given, not your own triangle (tril(ones(T, S)) is causal only when T = S: "
                       "when T < S it hides cached keys)")


def check_linear_grads(impl, ctx):
    q, k, v = qkv(T=4, S=9)
    mask = window_mask(2, 4, 9)
    mine = [t.clone().requires_grad_() for t in (q, k, v)]
    theirs = [t.clone().requires_grad_() for t in (q, k, v)]
    y = call_attention(impl, *mine, mask)
    expect(y.requires_grad, "y carries no gradient: no torch.no_grad, .detach() or .item() in attention()")
    skip_if_not_finite(y, ctx, "its gradient")
    refs = linear_references(*theirs, mask)
    norm = ctx.get("norm") or min(refs, key=lambda n: max_err(y, refs[n]))
    if max_err(y, refs[norm]) > 1e-4:  # the output differs already: its gradient cannot match
        raise Skipped("y itself differs from the formula's (see above; here 4 queries over 9 keys, under a "
                      "window mask), so its gradient cannot be compared")
    w = randn(*y.shape, seed=9)
    (y.float() * w).sum().backward()
    (refs[norm] * w).sum().backward()
    for name, a, b in zip("qkv", mine, theirs):
        expect(a.grad is not None and bool(a.grad.abs().sum() > 0), f"no gradient reaches {name}: is it "
               "detached (.detach(), .data, torch.no_grad around its use)?")
        expect_close(a.grad, b.grad, f"the gradient with respect to {name}",
                     "the backward pass differs from the formula's: no in-place change of an input, "
                     "nothing computed outside autograd", tol=1e-3)
    return "q, k and v"


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
        logits, _ = m(idx[:, :-1])
        loss_fn(logits, idx[:, 1:]).backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    for name, g in grads[1].items():
        expect(name in grads[0], f"no gradient reaches {name}: is the graph cut (.detach(), .item(), numpy)?")
        expect_close(grads[0][name], g, f"the gradient of {name}", "the backward pass differs from the "
                     "reference's: is q, k or v detached inside attention(), or scaled by a constant the formula "
                     "does not have (1/sqrt(hs))?")
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
    given = [t.clone() for t in (q, k, v)]
    out = impl.recurrent_step(*given, S, z)
    expect(all(torch.equal(a, b) for a, b in zip(given, (q, k, v))),
           "recurrent_step changed q, k or v in place: only S and z are updated in place; compute new tensors "
           "from the others")
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
    ctx["state_wrong"] = True  # until every expectation below holds: the later checks step aside
    call_recurrent(impl, q, k, v, S, z)
    expect(not torch.equal(S, S0), "S did not change: update it in place (S += ...), the caller keeps only S and z")
    want = S0 + k.transpose(-2, -1) @ v
    if max_err(S, want) > 1e-4:
        phi = attention_linear.phi
        for other, wrong in ((S0 + v.transpose(-2, -1) @ k, "S holds v k^T: the outer product takes k first, "
                              "S[d, e] += phi(k)_d v_e"),
                             (S0 + phi(k).transpose(-2, -1) @ v, "q and k come already through phi: do not "
                              "apply phi again"),
                             (k.transpose(-2, -1) @ v, "S must start from the S it is given (the history), "
                              "not from zero")):
            expect(max_err(S, other) > 1e-4, wrong)
    expect_close(S, want, "S after T tokens", "S += phi(k_t) v_t^T (outer product) per token")
    expect(not torch.equal(z, z0), "z did not change: z += phi(k_t) for each token, in place")
    expect_close(z, z0 + k.sum(2), "z after T tokens", "z += phi(k_t) per token, from the z it is given")
    ctx["state_wrong"] = False


def reads_own_state(impl, q, k, v, S0, z0):
    """Whether recurrent_step, fed one token at a time, reads out num = q_t^T S and den = q_t . z
    with the S and z it leaves behind (right or wrong): then a wrong read-out is the state's fault.
    The read-out may carry the state's mistake too: q through phi again as k was, or S stored
    transposed and read as S q. A call that changes neither S nor z in place shows nothing of
    the state it read."""
    S, z = S0.clone(), z0.clone()
    phi = attention_linear.phi
    for t in range(q.size(2)):
        before = S.clone(), z.clone()
        num, den = call_recurrent(impl, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], S, z)
        if torch.equal(S, before[0]) and torch.equal(z, before[1]):
            return False
        if not any(max(max_err(num[:, :, 0], (qt[..., :, None] * S).sum(-2)),
                       max_err(den[:, :, 0, 0], (qt * z).sum(-1))) <= 1e-4 or
                   max(max_err(num[:, :, 0], (S * qt[..., None, :]).sum(-1)),
                       max_err(den[:, :, 0, 0], (qt * z).sum(-1))) <= 1e-4
                   for qt in (q[:, :, t], phi(q[:, :, t]))):
            return False
    return True


def check_recurrent_parallel(impl, ctx):
    q, k, v, S0, z0 = recurrent_inputs(T=13)
    num, den = call_recurrent(impl, q, k, v, S0.clone(), z0.clone())
    ref_num, ref_den = attention_linear.linear_parallel(q, k, v, S0, z0)
    wrong = max(max_err(num, ref_num), max_err(den, ref_den)) > 1e-4
    if wrong and ctx.get("state_wrong") and reads_own_state(impl, q, k, v, S0, z0):
        raise Skipped("S or z is updated wrongly (see above), so the read-out cannot be compared with the reference")
    qk = (q * k).sum(-1, keepdim=True)  # what token t adds to its own read-out
    expect(max_err(num, ref_num - qk * v) > 1e-4 or max_err(den, ref_den - qk) > 1e-4,
           "num and den are read out before token t is added: add it to S and z first, then read out with q_t")
    for normed in (F.layer_norm(ref_num, (q.size(-1),)), ref_num / (ref_den + attention_linear.EPS)):
        expect(max_err(num, normed) > 1e-4, "num comes back normalised: return the raw num_t = q_t^T S_t (and "
               "den_t = q_t . z_t); the caller normalises")
    expect_close(num, ref_num, "num", "num_t = q_t^T S_t, with token t already added to S")
    expect_close(den, ref_den, "den", "den_t = q_t . z_t, with token t already added to z")
    # fed in pieces, the state carries everything
    S, z = S0.clone(), z0.clone()
    parts = [call_recurrent(impl, q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], S, z) for a, b in ((0, 5), (5, 6), (6, 13))]
    pieces = torch.cat([p[0] for p in parts], 2)
    if ctx.get("state_wrong") and max_err(pieces, ref_num) > 1e-4:  # right in one call: S, z carry it wrong
        raise Skipped("S or z is not updated as it should be (see above), so what the state carries between "
                      "calls cannot be told")
    expect_close(pieces, ref_num, "num fed 5 + 1 + 7 tokens", "the state must carry the history between calls")
    return "in one call and in pieces"


def check_recurrent_matches_attention(impl, ctx):
    q, k, v = qkv(T=8, S=8)
    y = call_attention(impl, q, k, v, causal(8, 8))
    skip_if_not_finite(y, ctx, "whether recurrent_step agrees with it")
    phi = attention_linear.phi
    B, h, _, hs = q.shape
    S, z = torch.zeros(B, h, hs, hs), torch.zeros(B, h, hs)
    num, den = call_recurrent(impl, phi(q), phi(k), v, S, z)
    fixed = {"layernorm": F.layer_norm(num, (hs,)), "denominator": num / (den + attention_linear.EPS)}
    errs = {name: max_err(y, r) for name, r in fixed.items()}
    if min(errs.values()) < 1e-3:
        return
    att = (phi(q) @ phi(k).transpose(-2, -1)) * causal(8, 8)  # the reference's weights
    num_ref, den_ref = att @ v, att.sum(-1, keepdim=True)
    attention_ok = y.shape == num_ref.shape and min(
        max_err(y, r) for r in (F.layer_norm(num_ref, (hs,)), num_ref / (den_ref + attention_linear.EPS))) < 1e-3
    recurrent_ok = num.shape == num_ref.shape and den.shape == den_ref.shape and max(
        max_err(num, num_ref), max_err(den, den_ref)) < 1e-3
    blamed = [name for name, ok in (("attention", attention_ok), ("recurrent_step", recurrent_ok)) if not ok]
    if blamed and all(name in ctx.get("failed", ()) for name in blamed):  # their own checks above met the mistake
        raise Skipped(f"your {'() and your '.join(blamed)}() differ{'s' if len(blamed) == 1 else ''} from the "
                      "formula already (see above), so whether the two agree cannot be told")
    at_fault = ("your attention() (your recurrent_step() gives the reference's num and den)" if recurrent_ok else
                "your recurrent_step() (your attention() gives the reference's outputs)" if attention_ok else
                "both")
    raise Failed(f"your attention() and your recurrent_step() disagree on the same text (relative error "
                 f"{min(errs.values()):.2g}); the one to fix: {at_fault}")
