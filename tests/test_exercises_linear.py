"""
The checks of assignment 3 (linear_attention), checked themselves: each wrong solution below,
a mistake students make, fails first at the check it breaks with a message that names the
mistake and its rule in exercises/README.md; each correct alternative passes.
"""

import pytest

from conftest import LINEAR_OK

# what is wrong: (exercise, source, the first check that fails, words its message must hold)
WRONG = {}
OK = {}  # a correct alternative: (exercise, source)

DENOMINATOR = "return ((att @ v) / (att.sum(-1, keepdim=True) + 1e-6)).to(dtype)   # the paper's denominator"
LAYERNORM_OK = LINEAR_OK.replace(DENOMINATOR, "return F.layer_norm(att @ v, (q.size(-1),)).to(dtype)")


def linear(old, new, title, words, base=LINEAR_OK):
    assert old in base
    return ("linear_attention", base.replace(old, new), title, words)


FORMULA = "attention: phi(q) phi(k)^T v, masked, normalised"
CAUSAL = "attention: causal, no output sees a later token"
MASK = "attention: follows any mask (windows, sinks, T < S)"
STATE = "recurrent_step: updates S and z in place"
PARALLEL = "recurrent_step: recurrent equals parallel"

WRONG.update({
    "ignores the mask": linear("* mask", "", CAUSAL, "the future leaks in"),
    "makes its own triangle": linear("* mask", "* torch.ones(q.size(2), k.size(2), dtype=torch.bool)"
                                     ".tril(k.size(2) - q.size(2))", MASK, "not your own triangle"),
    "its own triangle on top of the mask": linear("* mask", "* mask * torch.ones(q.size(2), k.size(2), "
                                                  "dtype=torch.bool).tril()", MASK, "ignores key"),
    "layer_norm with an eps of its own": linear("F.layer_norm(att @ v, (q.size(-1),))",
                                                "F.layer_norm(att @ v, (q.size(-1),), eps=1e-12)", FORMULA,
                                                "default eps", base=LAYERNORM_OK),
    "keeps the softmax": linear("att = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-2, -1) * mask",
                                "att = (q @ k.transpose(-2, -1) / q.size(-1) ** 0.5)"
                                ".masked_fill(~mask, -1e9).softmax(-1)",
                                FORMULA, "looks like softmax attention"),
    "phi without its + 1": linear("(F.elu(q) + 1) @ (F.elu(k) + 1)", "F.elu(q) @ F.elu(k)", FORMULA,
                                  "phi misses its + 1"),
    "a leftover 1/sqrt(hs) scale": linear("* mask\n", "* mask / q.size(-1) ** 0.5\n", FORMULA,
                                          "1/sqrt(hs) scale", base=LAYERNORM_OK),
    "not normalised": linear("(att @ v) / (att.sum(-1, keepdim=True) + 1e-6)", "att @ v", FORMULA,
                             "y is not normalised"),
    "masked with -inf": linear("att = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-2, -1) * mask",
                               "att = ((F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-2, -1)).masked_fill(~mask, "
                               "float('-inf'))", "attention: y shaped like q, in q's dtype, finite",
                               "a weight of -inf is not 0"),
    "float32 out for bfloat16 in": linear(".to(dtype)", "", "attention: y shaped like q, in q's dtype, finite",
                                          "cast the result to q.dtype"),
    "computed in bfloat16": linear("dtype, q, k, v = q.dtype, q.float(), k.float(), v.float()", "dtype = q.dtype",
                                   "attention: y shaped like q, in q's dtype, finite", "compute in float32"),
    "normalised over the text too": linear("(att @ v) / (att.sum(-1, keepdim=True) + 1e-6)",
                                           "F.layer_norm(att @ v, (q.size(-2), q.size(-1)))", FORMULA,
                                           "over hs, the last dimension, only"),
    "detached keys": linear("(F.elu(k) + 1)", "(F.elu(k.detach()) + 1)", "attention: gradients reach q, k and v "
                            "as the formula's do", "no gradient reaches k"),
    "state not updated in place": linear("S += ", "S = S + ", STATE, "update it in place"),
    "z not updated": linear("            z += k[:, :, t]\n", "", STATE, "z did not change"),
    "outer product transposed": linear("k[:, :, t, :, None] * v[:, :, t, None, :]",
                                       "v[:, :, t, :, None] * k[:, :, t, None, :]", STATE, "S holds v k^T"),
    "phi applied twice": linear("S += k[:, :, t, :, None]", "S += (F.elu(k[:, :, t]) + 1)[..., None]", STATE,
                                "already through phi"),
    "phi applied to q and k again": linear(
        "S += k[:, :, t, :, None]", "S += (F.elu(k[:, :, t]) + 1)[..., None]",
        STATE, "already through phi", base=LINEAR_OK.replace("z += k[:, :, t]", "z += F.elu(k[:, :, t]) + 1")
        .replace("q[:, :, t], S)", "F.elu(q[:, :, t]) + 1, S)").replace("(q[:, :, t] * z)", "((F.elu(q[:, :, t]) + 1) * z)")),
    "state restarted from zero": linear("        nums, dens = [], []\n", "        nums, dens = [], []\n"
                                        "        S.zero_()\n", STATE, "not from zero"),
    "reads out before adding the token": linear(
        "            S += k[:, :, t, :, None] * v[:, :, t, None, :]\n            z += k[:, :, t]\n"
        "            nums.append(torch.einsum(\"bhd,bhde->bhe\", q[:, :, t], S))\n"
        "            dens.append((q[:, :, t] * z).sum(-1, keepdim=True))\n",
        "            nums.append(torch.einsum(\"bhd,bhde->bhe\", q[:, :, t], S))\n"
        "            dens.append((q[:, :, t] * z).sum(-1, keepdim=True))\n"
        "            S += k[:, :, t, :, None] * v[:, :, t, None, :]\n            z += k[:, :, t]\n",
        PARALLEL, "read out before token t is added"),
    "normalised read-out": linear("nums.append(torch.einsum(\"bhd,bhde->bhe\", q[:, :, t], S))",
                                  "nums.append(F.layer_norm(torch.einsum(\"bhd,bhde->bhe\", q[:, :, t], S), "
                                  "(q.size(-1),)))", PARALLEL, "num comes back normalised"),
    "den without keepdim": linear("(q[:, :, t] * z).sum(-1, keepdim=True)", "(q[:, :, t] * z).sum(-1)",
                                  "recurrent_step: num/den shapes, fixed-size state", "den must be (B, h, T, 1)"),
})

OK.update({
    "denominator, token by token": ("linear_attention", LINEAR_OK),
    "layer_norm, einsum, state from cumulative sums": ("linear_attention", """
        import torch
        import torch.nn.functional as F
        def attention(q, k, v, mask, dropout_p):
            qf, kf = F.elu(q.float()) + 1, F.elu(k.float()) + 1
            att = torch.einsum("bhtd,bhsd->bhts", qf, kf) * mask
            return F.layer_norm(torch.einsum("bhts,bhsd->bhtd", att, v.float()), (q.size(-1),)).to(q.dtype)
        def recurrent_step(q, k, v, S, z):
            Ss = S[:, :, None] + torch.cumsum(k[..., :, None] * v[..., None, :], dim=2)   # (B, h, T, hs, hs)
            zs = z[:, :, None] + torch.cumsum(k, dim=2)
            num = torch.einsum("bhtd,bhtde->bhte", q, Ss)
            den = (q * zs).sum(-1, keepdim=True)
            S.copy_(Ss[:, :, -1])
            z.copy_(zs[:, :, -1])
            return num, den
        """),
    "layer_norm by hand, masked_fill with 0": ("linear_attention", """
        import torch
        import torch.nn.functional as F
        def phi(x):
            return torch.where(x > 0, x + 1, torch.exp(x))
        def attention(q, k, v, mask, dropout_p):
            att = (phi(q.float()) @ phi(k.float()).transpose(-2, -1)).masked_fill(~mask, 0.0)
            y = att @ v.float()
            mu, var = y.mean(-1, keepdim=True), y.var(-1, unbiased=False, keepdim=True)
            return ((y - mu) / torch.sqrt(var + 1e-5)).type_as(q)
        def recurrent_step(q, k, v, S, z):
            nums, dens = [], []
            for t in range(q.shape[2]):
                S.add_(torch.einsum("bhd,bhe->bhde", k[:, :, t], v[:, :, t]))
                z.add_(k[:, :, t])
                nums.append((q[:, :, t, :, None] * S).sum(-2))
                dens.append(torch.einsum("bhd,bhd->bh", q[:, :, t], z)[..., None])
            return torch.stack(nums, dim=2), torch.stack(dens, dim=2)
        """),
})


@pytest.mark.parametrize("what", list(WRONG))
def test_a_wrong_solution_fails_first_where_it_is_wrong(what, exercise_checks):
    exercise_checks.wrong_fails_first(WRONG[what])


@pytest.mark.parametrize("what", list(OK))
def test_a_correct_alternative_passes(what, exercise_checks):
    exercise_checks.correct_passes(OK[what], slow=False)


@pytest.mark.parametrize("what,check", [("makes its own triangle", MASK), ("ignores the mask", CAUSAL)])
def test_a_mask_mistake_fails_the_mask_rule_alone(what, check, exercise_checks):
    """The formula check meets a mask mistake first and steps aside ("see below") rather than
    cite rule 4 itself; the gradients of a wrong output differ too, and that check steps aside
    instead of blaming the backward pass (rule 5): one mistake, one FAIL."""
    results, printed = exercise_checks(*WRONG[what][:2])
    statuses = {title: (status, msg) for title, status, msg in results}
    assert [t for t, (status, _) in statuses.items() if status == "FAIL"] == [check], printed
    assert statuses[FORMULA][0] == "SKIP" and "(see below)" in statuses[FORMULA][1], printed
    assert statuses["attention: gradients reach q, k and v as the formula's do"][0] == "SKIP", printed


def test_a_normalisation_over_the_text_is_not_blamed_on_the_mask(exercise_checks):
    """layer_norm over (T, hs) lets later tokens into earlier outputs: the mask check, which
    would see hidden keys move the output, steps aside instead of saying "use the mask"."""
    results, printed = exercise_checks(*WRONG["normalised over the text too"][:2])
    statuses = {title: (status, msg) for title, status, msg in results}
    assert statuses[MASK][0] == "SKIP" and "not your own triangle" not in printed, printed


def test_a_mask_mistake_does_not_hide_a_formula_mistake(exercise_checks):
    """Its own triangle and phi without its + 1: two mistakes, two checks that fail."""
    source = WRONG["makes its own triangle"][1].replace("(F.elu(q) + 1) @ (F.elu(k) + 1)", "F.elu(q) @ F.elu(k)")
    results, printed = exercise_checks("linear_attention", source)
    failed = {title: msg for title, status, msg in results if status == "FAIL"}
    assert list(failed) == [FORMULA, MASK] and "phi misses its + 1" in failed[FORMULA], printed


def test_inf_weights_are_blamed_on_the_finite_output_rule_alone(exercise_checks):
    """masked_fill(-inf) without a softmax gives nan: the causality, mask and gradient checks
    cannot judge such an output and say SKIP, not 'the future leaks in' or 'detached'."""
    results, printed = exercise_checks(*WRONG["masked with -inf"][:2])
    statuses = {title: status for title, status, _ in results}
    assert [t for t, s in statuses.items() if s == "FAIL"] == ["attention: y shaped like q, in q's dtype, finite"], \
        printed
    assert [s for t, s in statuses.items() if t.startswith("attention: gradients")] == ["SKIP"], printed


def test_nan_where_the_shapes_check_saw_none_still_fails(exercise_checks):
    """A later check that meets inf or nan the shapes check did not see fails with its message:
    stepping aside is only for a failure already reported."""
    source = LINEAR_OK.replace(DENOMINATOR, "y = ((att @ v) / (att.sum(-1, keepdim=True) + 1e-6)).to(dtype)\n"
                               "        return y * float('nan') if q.size(-2) == 6 else y")
    results, printed = exercise_checks("linear_attention", source)
    statuses = {title: (status, detail) for title, status, detail in results}
    assert statuses["attention: y shaped like q, in q's dtype, finite"][0] == "PASS", printed
    status, detail = statuses["attention: phi(q) phi(k)^T v, masked, normalised"]
    assert status == "FAIL" and "y holds inf or nan" in detail, printed


def test_a_triangle_not_shifted_for_t_below_s_is_blamed_on_the_mask_rule(exercise_checks):
    """tril(ones(T, S)) is the causal mask only when T = S; the formula check says that the
    output does not follow the mask it is given (rule 4), not that the formula is wrong."""
    source = LINEAR_OK.replace("* mask", "* torch.ones(q.size(2), k.size(2), dtype=torch.bool).tril()")
    results, printed = exercise_checks("linear_attention", source)
    failed = [(t, msg) for t, status, msg in results if status == "FAIL"]
    assert [t for t, _ in failed] == [MASK], printed
    assert "causal only when T = S" in failed[0][1] and "'Assignment 3, rule 4'" in failed[0][1], printed
    assert [status for t, status, _ in results if t == FORMULA] == ["SKIP"], printed


def test_one_shape_mistake_fails_once(exercise_checks):
    """Returning (B, T, nh * hs) (the model's job) meets every attention check at its own
    sizes: the first fails, the others point to it instead of citing rules 2, 4 and 7."""
    source = LINEAR_OK.replace(DENOMINATOR, "y = ((att @ v) / (att.sum(-1, keepdim=True) + 1e-6)).to(dtype)\n"
                               "        return y.transpose(1, 2).flatten(2)")
    results, printed = exercise_checks("linear_attention", source)
    failed = [t for t, status, _ in results if status == "FAIL"]
    assert failed == ["attention: y shaped like q, in q's dtype, finite"], printed
    assert "the same failure as" in printed


@pytest.mark.parametrize("broken", ["attention", "recurrent_step"])
def test_attention_and_recurrent_step_disagreeing_names_the_one_already_reported(broken, exercise_checks):
    """The disagreement comes from a mistake an earlier check of that function reported: the
    check names the function and steps aside (one mistake, one FAIL)."""
    if broken == "attention":  # no normalisation at all
        source = LINEAR_OK.replace(DENOMINATOR, "return (att @ v).to(dtype)")
    else:  # the outer product transposed
        source = LINEAR_OK.replace("k[:, :, t, :, None] * v[:, :, t, None, :]", "v[:, :, t, :, None] * k[:, :, t, None, :]")
    results, printed = exercise_checks("linear_attention", source)
    statuses = {t: (status, msg) for t, status, msg in results}
    status, detail = statuses["recurrent_step equals attention on the same text"]
    assert status == "SKIP" and f"your {broken}() differs" in detail and "(see above)" in detail, printed
    assert len([t for t, status, _ in results if status == "FAIL"]) == 1, printed


@pytest.mark.parametrize("what", ["state not updated in place", "z not updated", "outer product transposed",
                                  "phi applied twice", "phi applied to q and k again", "state restarted from zero"])
def test_a_state_mistake_fails_the_state_rule_alone(what, exercise_checks):
    """A state updated wrongly (S = S + ... among them, which only shows once the state is carried
    from call to call) makes the read-out differ too: the later recurrent checks step aside."""
    results, printed = exercise_checks(*WRONG[what][:2])
    statuses = {title: status for title, status, _ in results}
    assert [t for t, status in statuses.items() if status == "FAIL"] == [STATE], printed
    assert statuses[PARALLEL] == "SKIP" and "(see above)" in printed, printed


@pytest.mark.parametrize("state", ["S += ", "z += "])
def test_a_state_mistake_does_not_hide_a_read_out_mistake(state, exercise_checks):
    """Not in place and read out before adding the token: two mistakes, two checks that fail."""
    source = WRONG["reads out before adding the token"][1].replace(state, state[0] + " = " + state[0] + " + ")
    results, printed = exercise_checks("linear_attention", source)
    failed = {title: msg for title, status, msg in results if status == "FAIL"}
    assert list(failed) == [STATE, PARALLEL] and "read out before token t is added" in failed[PARALLEL], printed


def test_a_recurrent_step_mistake_leaves_attentions_model_checks_running(exercise_checks):
    """The check of both functions steps aside for recurrent_step's failure: attention, which no
    check failed, still gets its model checks, as it does while recurrent_step is a stub."""
    source = LINEAR_OK.replace("k[:, :, t, :, None] * v[:, :, t, None, :]", "v[:, :, t, :, None] * k[:, :, t, None, :]")
    results, printed = exercise_checks("linear_attention", source, slow=True)
    statuses = {t: status for t, status, _ in results}
    assert statuses["recurrent_step equals attention on the same text"] == "SKIP", printed
    assert statuses["tiny model: cached decoding equals the full forward"] == "PASS", printed
