"""
Checker rules (exercises/checks_*.py) that no wrong answer in tests/test_exercises_*.py reached:
for each, a mistake a student could plausibly make, and the check and message that must reject
it (as the first failure, or, where an earlier check meets the same mistake, as a failure of the
rule's own check after it). rule() makes each test, with its one-line docstring. The correct
answers edited here are conftest's (TRIM_OK, ...), which tests/test_exercises_*.py show passing.

Left untested on purpose, no plausible answer reaching them: the slow model checks of
assignments 1-3 and 4b (a fast check fails first, then they skip), the eviction budget (the
cache keeps it), "the normalisation changed between calls" and "attention() and
recurrent_step() disagree" (each needs a function right only on its own checks' inputs), and in
kv_quant gross_mistake's non-finite branch (the contract check meets it first), an average
error too large with the worst row in bounds (the levels, rounding and worst-row checks fail
first) and the model's loss (answers passing the fast checks, 2-bit ones included, pass it).
"""

from conftest import H2O_OK, INT4_OK, INT8_OK, LINEAR_OK, TRIM_OK, XL_OK
from exercises import check

TITLE = {c.fn.__name__: c.title for e in check.EXERCISES.values() for c in e.checks}


def edit(base, old, new):
    assert old in base, old
    return base.replace(old, new)


def rule(doc, exercise, source, check_fn, words, first=True):
    """A test: the checker, run on source, fails check_fn's check with words in its message and
    a README rule: as its first failure, or (first=False) after an earlier check met the mistake."""
    def test(exercise_checks):
        if first:
            exercise_checks.wrong_fails_first((exercise, source, TITLE[check_fn], words))
        else:
            results, printed = exercise_checks(exercise, source)
            assert [m for t, s, m in results if t == TITLE[check_fn] and s == "FAIL" and words in m
                    and "see exercises/README.md, 'Assignment" in m], printed
    test.__doc__ = doc
    return test


# -- assignment 1: keep_recent ----------------------------------------------------------------

TRIM_RETURN = "return k[:, :, keep], v[:, :, keep], pos[keep]"
TRIM_GATHER = edit(TRIM_OK, TRIM_RETURN, "idx = keep.nonzero().squeeze(1).view(1, 1, -1, 1).expand(k.size(0), k.size(1), "
                   "-1, 1)\n        return k.gather(2, idx), v.gather(2, idx), pos[keep]")

test_trim_returns_two_things = rule(
    "Assignment 1 rule 1, the return: (k, v) returned, pos forgotten.",
    "kv_window", edit(TRIM_OK, ", pos[keep]", ""), "check_trim_shapes", "must return (k, v, pos), got tuple of 2")
test_trim_returns_pos_as_a_list = rule(
    "Assignment 1 rule 1, three tensors: pos handed back as a Python list.",
    "kv_window", edit(TRIM_OK, "pos[keep]", "pos[keep].tolist()"), "check_trim_shapes", "must return three tensors")
test_trim_gathers_without_expanding_over_hs = rule(
    "Assignment 1 rule 1, the axes of k and v: gather with an index of one channel, not expanded over hs.",
    "kv_window", TRIM_GATHER, "check_trim_shapes", "every other axis stays whole")
test_trim_gather_also_breaks_the_rows = rule(
    "Assignment 1 rule 5, whole rows of the kept tokens: the same one-channel gather, met by the row check too.",
    "kv_window", TRIM_GATHER, "check_trim_rows", "the rows of another batch row or head", first=False)
test_trim_nonzero_left_two_dimensional = rule(
    "Assignment 1 rule 2, k and v read as (B, nkv, kept, hs): nonzero() not squeezed, k gains an axis "
    "(pos's shape fails first).",
    "kv_window", edit(TRIM_OK, TRIM_RETURN, "idx = torch.nonzero(keep)\n"
                      "        return k[:, :, idx], v[:, :, idx], pos[idx]"),
    "check_trim_recent", "must stay (B, nkv, kept, hs)", first=False)
test_trim_v_keeps_only_the_window = rule(
    "Assignment 1 rule 1, as many tokens in k and v: v cut to the window alone, without the sinks.",
    "kv_window", edit(TRIM_OK, "v[:, :, keep]", "v[:, :, -kv_window:]"), "check_trim_shapes",
    "select the same tokens from both")
test_trim_k_and_v_left_whole = rule(
    "Assignment 1 rule 1, k and v trimmed: only pos gets the mask.",
    "kv_window", edit(TRIM_OK, TRIM_RETURN, "return k, v, pos[keep]"), "check_trim_shapes",
    "k and v still hold all 20 tokens")
test_trim_pos_keeps_only_the_window = rule(
    "Assignment 1 rule 1, one mask for all three: pos cut to the window, k and v masked.",
    "kv_window", edit(TRIM_OK, "pos[keep]", "pos[-kv_window:]"), "check_trim_shapes", "one mask for all three")
test_trim_swaps_k_and_v = rule(
    "Assignment 1 rule 1, the order (k, v, pos): v's rows returned first, k's second.",
    "kv_window", edit(TRIM_OK, TRIM_RETURN, "return v[:, :, keep], k[:, :, keep], pos[keep]"), "check_trim_shapes",
    "returned v's rows where k's go")
test_trim_window_counts_the_sinks = rule(
    "Assignment 1 rule 4, nothing else kept: a window of the kv_window + kv_sink newest, and the sinks besides.",
    "kv_window", edit(TRIM_OK, "pos[-1] - kv_window + 1", "pos[-1] - kv_window - kv_sink + 1"), "check_trim_budget",
    "[12, 13, 14] should have gone")
test_trim_sinks_after_the_window = rule(
    "Assignment 1 rule 5, the cache's order: the window joined first, then the sinks.",
    "kv_window", edit(TRIM_OK, TRIM_RETURN, "w = pos >= pos[-1] - kv_window + 1\n        s = (pos < kv_sink) & ~w\n"
                      "        return (torch.cat([k[:, :, w], k[:, :, s]], 2),\n"
                      "                torch.cat([v[:, :, w], v[:, :, s]], 2),\n"
                      "                torch.cat([pos[w], pos[s]]))"),
    "check_trim_rows", "come back out of order")
test_trim_v_cut_from_the_end = rule(
    "Assignment 1 rule 5, the same tokens in k and v: v is its last n rows, n the number k keeps.",
    "kv_window", edit(TRIM_OK, "v[:, :, keep]", "v[:, :, -int(keep.sum()):]"), "check_trim_rows",
    "select the same tokens from k and v")

# -- assignment 2: xl_step --------------------------------------------------------------------

JOIN = "keys, vals = torch.cat([mem_k, k], 2), torch.cat([mem_v, v], 2)"
OK_ = "ok = torch.cat([mem_ok, mem_ok.new_ones(mem_ok.size(0), k.size(2))], 1)"
NEW_KV = "keys[:, :, -mem_len:].detach(), vals[:, :, -mem_len:].detach()"

test_xl_first_step_returns_none_flags = rule(
    "Assignment 2 rule 1, six tensors: with no memory yet, None for key_ok and new_ok.",
    "xl_memory", edit(XL_OK, "        " + JOIN, "        if mem_k.size(2) == 0:\n            return k, v, None, "
                      "k[:, :, -mem_len:].detach(), v[:, :, -mem_len:].detach(), None\n        " + JOIN),
    "check_xl_shapes", "must return six tensors")
test_xl_joined_in_the_b_t_h_layout = rule(
    "Assignment 2 rule 1, the axes: joined as (B, T, nkv, hs) along dim 1, never transposed back.",
    "xl_memory", edit(XL_OK, JOIN, "keys = torch.cat([mem_k.transpose(1, 2), k.transpose(1, 2)], 1)\n"
                      "        vals = torch.cat([mem_v.transpose(1, 2), v.transpose(1, 2)], 1)"),
    "check_xl_shapes", "keys has shape (2, 4, 2, 4)")
test_xl_key_ok_per_head = rule(
    "Assignment 2 rule 1, key_ok (B, tokens): the flags expanded over the heads, like keys.",
    "xl_memory", edit(XL_OK, OK_, OK_ + "[:, None].expand(-1, k.size(1), -1)"), "check_xl_shapes",
    "key_ok has shape (2, 2, 4)")
test_xl_key_ok_of_floats = rule(
    "Assignment 2 rule 1, bool flags: this step's flags from torch.ones (floats), so the join is float.",
    "xl_memory", edit(XL_OK, "mem_ok.new_ones(mem_ok.size(0), k.size(2))", "torch.ones(k.size(0), k.size(2))"),
    "check_xl_shapes", "key_ok must be a bool tensor")
test_xl_key_ok_without_this_step = rule(
    "Assignment 2 rule 1, the same tokens in keys and key_ok: key_ok is mem_ok alone.",
    "xl_memory", edit(XL_OK, OK_, "ok = mem_ok"), "check_xl_shapes", "keys, vals and key_ok hold 4, 4 and 0 tokens")
test_xl_new_ok_from_the_old_memory = rule(
    "Assignment 2 rule 1, the same tokens in the new memory: new_ok sliced from mem_ok, not from key_ok.",
    "xl_memory", edit(XL_OK, "ok[:, -mem_len:]", "mem_ok[:, -mem_len:]"), "check_xl_shapes",
    "new_k, new_v and new_ok hold 4, 4 and 0 tokens")
test_xl_trims_before_attending = rule(
    "Assignment 2 rule 2, all of the memory attended: keys cut to mem_len before this step attends.",
    "xl_memory", edit(edit(XL_OK, JOIN, "keys, vals = torch.cat([mem_k, k], 2)[:, :, -mem_len:], "
                           "torch.cat([mem_v, v], 2)[:, :, -mem_len:]"), OK_, OK_ + "[:, -mem_len:]"),
    "check_xl_attend", "keys hold 6 tokens, expected m + T = 9")
test_xl_keys_and_values_swapped = rule(
    "Assignment 2 rule 2, keys then values: the two joins swapped.",
    "xl_memory", edit(XL_OK, JOIN, "keys, vals = torch.cat([mem_v, v], 2), torch.cat([mem_k, k], 2)"),
    "check_xl_attend", "keys differs from the reference")
test_xl_values_with_this_step_first = rule(
    "Assignment 2 rule 2, memory first for the values too: vals joined this step first.",
    "xl_memory", edit(XL_OK, "torch.cat([mem_v, v], 2)", "torch.cat([v, mem_v], 2)"), "check_xl_attend",
    "vals differs from the reference")
test_xl_key_ok_as_a_hiding_mask = rule(
    "Assignment 2 rule 2, key_ok True where visible: flags True where hidden (masked_fill's sense).",
    "xl_memory", edit(XL_OK, OK_, "ok = torch.cat([~mem_ok, mem_ok.new_zeros(mem_ok.size(0), k.size(2))], 1)"),
    "check_xl_attend", "key_ok must be mem_ok followed by True")
test_xl_memory_without_the_newest = rule(
    "Assignment 2 rule 3, min(mem_len, m + T) kept: the slices end at -1, the newest token left out.",
    "xl_memory", edit(XL_OK, NEW_KV + ", ok[:, -mem_len:]", (NEW_KV + ", ok[:, -mem_len:]").replace("-mem_len:",
                                                                                                "-mem_len:-1")),
    "check_xl_keep", "keeps 3 tokens, expected 4")
test_xl_memory_keys_and_values_swapped = rule(
    "Assignment 2 rule 3, the end of keys as new_k: the memory's keys and values swapped.",
    "xl_memory", edit(XL_OK, NEW_KV, "vals[:, :, -mem_len:].detach(), keys[:, :, -mem_len:].detach()"),
    "check_xl_keep", "new_k differs from the reference")
test_xl_memory_values_copied_from_keys = rule(
    "Assignment 2 rule 3, the end of vals as new_v: new_v sliced from keys (a copy-paste slip).",
    "xl_memory", edit(XL_OK, NEW_KV, "keys[:, :, -mem_len:].detach(), keys[:, :, -mem_len:].detach()"),
    "check_xl_keep", "new_v differs from the reference")
test_xl_join_detached_then_made_a_leaf = rule(
    "Assignment 2 rule 4, k's own gradient: the join detached, then requires_grad_() to silence the error.",
    "xl_memory", edit(XL_OK, JOIN, "keys = torch.cat([mem_k, k], 2).detach().requires_grad_()\n"
                      "        vals = torch.cat([mem_v, v], 2).detach().requires_grad_()"),
    "check_xl_detach", "does not reach k and v one to one")

# -- assignment 3: attention and recurrent_step ----------------------------------------------

Y = "((att @ v) / (att.sum(-1, keepdim=True) + 1e-6)).to(dtype)"
UPDATE = "            S += k[:, :, t, :, None] * v[:, :, t, None, :]\n            z += k[:, :, t]\n"
READ = ('            nums.append(torch.einsum("bhd,bhde->bhe", q[:, :, t], S))\n'
        "            dens.append((q[:, :, t] * z).sum(-1, keepdim=True))\n")
LOOP = "        nums, dens = [], []\n        for t in range(q.size(2)):\n" + UPDATE + READ
RETURN = "return torch.stack(nums, 2), torch.stack(dens, 2)"

test_linear_returns_the_weights_too = rule(
    "Assignment 3 rule 1, a tensor: (y, att) returned, as nn.MultiheadAttention does.",
    "linear_attention", edit(LINEAR_OK, Y, Y + ", att"), "check_linear_shapes",
    "attention must return a tensor, got tuple")
test_linear_under_no_grad = rule(
    "Assignment 3 rule 5, y carries a gradient: attention() decorated with @torch.no_grad().",
    "linear_attention", edit(LINEAR_OK, "    def attention(", "    @torch.no_grad()\n    def attention("),
    "check_linear_grads", "y carries no gradient")
test_linear_denominator_detached = rule(
    "Assignment 3 rule 5, the formula's gradient: the denominator detached, as if a constant.",
    "linear_attention", edit(LINEAR_OK, "att.sum(-1, keepdim=True)", "att.detach().sum(-1, keepdim=True)"),
    "check_linear_grads", "the gradient with respect to q differs")
test_recurrent_returns_the_state_too = rule(
    "Assignment 3 rule 7, (num, den): the state returned with them, (num, den, S, z).",
    "linear_attention", edit(LINEAR_OK, RETURN, RETURN + ", S, z"), "check_recurrent_shapes", "must return (num, den)")
test_recurrent_stacks_along_dim_1 = rule(
    "Assignment 3 rule 7, num (B, h, T, hs): the tokens stacked along dim 1.",
    "linear_attention", edit(LINEAR_OK, RETURN, RETURN.replace(", 2)", ", 1)")), "check_recurrent_shapes",
    "num must be (B, h, T, hs) = (2, 3, 9, 4), got (2, 9, 3, 4)")
test_recurrent_keeps_every_token_state = rule(
    "Assignment 3 rule 7, a fixed-size state: S and z set (.data) to the cumulative states of all T tokens.",
    "linear_attention", edit(LINEAR_OK, LOOP + "        " + RETURN,
                             "        Ss = S[:, :, None] + torch.cumsum(k[..., :, None] * v[..., None, :], 2)\n"
                             "        zs = z[:, :, None] + torch.cumsum(k, 2)\n        S.data, z.data = Ss, zs\n"
                             '        return torch.einsum("bhtd,bhtde->bhte", q, Ss), (q * zs).sum(-1, keepdim=True)'),
    "check_recurrent_shapes", "S and z must keep their shapes")
test_recurrent_update_outside_the_loop = rule(
    "Assignment 3 rule 6, S += phi(k_t) v_t^T per token: the update dedented out of the loop (the last token only).",
    "linear_attention", edit(LINEAR_OK, UPDATE + READ, READ + UPDATE.replace("            ", "        ")),
    "check_recurrent_state", "S after T tokens differs")
test_recurrent_z_sums_the_values = rule(
    "Assignment 3 rule 6, z += phi(k_t): z accumulates v_t instead.",
    "linear_attention", edit(LINEAR_OK, "z += k[:, :, t]", "z += v[:, :, t]"), "check_recurrent_state",
    "z after T tokens differs")
test_recurrent_reads_s_along_the_wrong_index = rule(
    "Assignment 3 rule 7, num_t = q_t^T S_t: S q_t instead, the read-out contracting S's second index.",
    "linear_attention", edit(LINEAR_OK, '"bhd,bhde->bhe"', '"bhe,bhde->bhd"'), "check_recurrent_parallel",
    "num differs from the reference")
test_recurrent_den_read_before_z_is_updated = rule(
    "Assignment 3 rule 7, den_t with token t in z: z updated after the read-out, S before it.",
    "linear_attention", edit(LINEAR_OK, "            z += k[:, :, t]\n" + READ, READ + "            z += k[:, :, t]\n"),
    "check_recurrent_parallel", "den differs from the reference")
test_recurrent_decode_fast_path_reads_first = rule(
    "Assignment 3 rule 7, the state carried between calls: a one-token fast path that reads out before adding.",
    "linear_attention", edit(LINEAR_OK, "        nums, dens = [], []\n", "        if q.size(2) == 1:\n"
                             '            num = torch.einsum("bhd,bhde->bhe", q[:, :, 0], S)[:, :, None]\n'
                             "            den = (q[:, :, 0] * z).sum(-1, keepdim=True)[:, :, None]\n"
                             "            S += k[:, :, 0, :, None] * v[:, :, 0, None, :]\n            z += k[:, :, 0]\n"
                             "            return num, den\n        nums, dens = [], []\n"),
    "check_recurrent_parallel", "num fed 5 + 1 + 7 tokens")

test_linear_a_large_eps = rule(
    "Assignment 3 rule 3: the paper's denominator with an eps of 1e-2 instead of 1e-6.",
    "linear_attention", edit(LINEAR_OK, "+ 1e-6)", "+ 1e-2)"), "check_linear_formula", "a larger eps in the denominator")
test_linear_phi_in_place = rule(
    "Assignment 3 rule 1: phi applied in place (elu with inplace=True, then add_): the caller's q and k change.",
    "linear_attention", edit(LINEAR_OK, "att = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-2, -1) * mask",
                             "att = F.elu(q, inplace=True).add_(1) @ F.elu(k, inplace=True).add_(1).transpose(-2, -1)"
                             " * mask"),
    "check_linear_shapes", "attention changed q, k, v or mask in place")

# -- assignment 4a: quantize ------------------------------------------------------------------

INT2_PER_ROW = """
    import torch
    def quantize(x):
        lo, hi = x.aminmax(dim=-1, keepdim=True)
        scale = ((hi - lo) / 3).clamp(min=1e-8)
        c = torch.round((x - lo) / scale).clamp(0, 3).to(torch.uint8).unflatten(-1, (4, -1))
        packed = c[..., 0, :] | (c[..., 1, :] << 2) | (c[..., 2, :] << 4) | (c[..., 3, :] << 6)
        return (packed, scale.half().clamp(min=2 ** -24), lo.half()), dequantize
    def dequantize(packed, scale, zero):
        return torch.cat([(packed >> s) & 3 for s in (0, 2, 4, 6)], -1).float() * scale.float() + zero.float()
    """
CODES = "torch.round(x / scale).clamp(-127, 127).to(torch.int8)"
QRET = f"return ({CODES}, scale.half().clamp(min=2 ** -24)), dequantize"
DEQ = "    def dequantize(codes, scale):\n        return codes.float() * scale.float()"

test_quant_returns_a_flat_tuple = rule(
    "Assignment 4a rule 1, (payload, dequantize): codes, scale and dequantize in one flat tuple.",
    "kv_quant", edit(INT8_OK, QRET, QRET.replace("return (", "return ").replace(")), dequantize", "), dequantize")),
    "check_quant_contract", "must return (payload, dequantize)")
test_quant_forgets_dequantize = rule(
    "Assignment 4a rule 1, a tuple of tensors as payload: (codes, scale) returned, no dequantize.",
    "kv_quant", edit(INT8_OK, QRET, QRET.replace("return (", "return ").replace(")), dequantize", ")")),
    "check_quant_contract", "the payload must be a tuple of tensors")
test_quant_returns_dequantize_called = rule(
    "Assignment 4a rule 1, dequantize returned: its result returned instead, dequantize(codes, scale).",
    "kv_quant", edit(INT8_OK, QRET, f"codes, s = {CODES}, scale.half().clamp(min=2 ** -24)\n"
                     "        return (codes, s), dequantize(codes, s)"),
    "check_quant_contract", "must be the dequantize function")
test_quant_scale_squeezed = rule(
    "Assignment 4a rule 1, payload shaped (..., m): the scale squeezed to (...,), unsqueezed again in dequantize.",
    "kv_quant", edit(edit(INT8_OK, "scale.half()", "scale.squeeze(-1).half()"), "* scale.float()",
                     "* scale.float()[..., None]"),
    "check_quant_contract", "payload tensor 1 has shape (2, 3, 5)")
test_quant_groups_left_unflattened = rule(
    "Assignment 4a rule 1, dequantize gives x's shape: the groups of 32 never flattened back.",
    "kv_quant", edit(INT4_OK, "(codes * scale.float()[..., None] + zero.float()[..., None]).flatten(-2)",
                     "codes * scale.float()[..., None] + zero.float()[..., None]"),
    "check_quant_contract", "got (2, 3, 5, 2, 32)")
test_quant_dequantize_returns_the_codes = rule(
    "Assignment 4a rule 1, floats back: a first draft of dequantize that returns the int8 codes.",
    "kv_quant", edit(INT8_OK, "return codes.float() * scale.float()", "return codes"), "check_quant_contract",
    "must return floats, got torch.int8")
test_quant_stores_the_inverse_scale = rule(
    "Assignment 4a rule 1, finite scales: 127 / absmax stored in float16, inf for a row of zeros.",
    "kv_quant", edit(INT8_OK, "scale = (x.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-8)\n        " + QRET
                     + "\n" + DEQ,
                     "inv = 127 / x.abs().amax(-1, keepdim=True).clamp(min=1e-8)\n"
                     "        return (torch.round(x * inv).to(torch.int8), inv.half()), dequantize\n"
                     "    def dequantize(codes, inv):\n        return codes.float() / inv.float()"),
    "check_quant_contract", "payload tensor 1 (float16) holds inf")
test_quant_codes_from_a_scale_it_does_not_store = rule(
    "Assignment 4a rule 4, nothing far off: the scale stored as float8 (floor 2**-9), codes from the unrounded one.",
    "kv_quant", edit(INT8_OK, f"{CODES}, scale.half().clamp(min=2 ** -24)", "torch.round(x / scale).clamp(-127, 127)"
                     ".to(torch.int8), scale.clamp(min=2 ** -9).to(torch.float8_e4m3fn)"),
    "check_quant_bias", "some values come back far off")
test_quant_rounds_away_from_zero = rule(
    "Assignment 4a rule 4, errors not following x: codes rounded away from 0 (sign times ceil of |x| / scale).",
    "kv_quant", edit(INT8_OK, CODES, "(torch.ceil((x / scale).abs()) * torch.sign(x)).clamp(-127, 127).to(torch.int8)"),
    "check_quant_bias", "values come back pushed away from 0")
test_quant_dithered_rounding = rule(
    "Assignment 4a rule 4, to nearest: floor after a fixed random offset per channel. It repeats itself, and its "
    "errors neither lean nor follow x, but a value often lands on the farther of its two levels.",
    "kv_quant", edit(INT8_OK, CODES, "torch.floor(x / scale + torch.rand(x.size(-1), generator=torch.Generator()"
                     ".manual_seed(0))).clamp(-127, 127).to(torch.int8)"),
    "check_quant_bias", "come back at a level farther from them")
test_quant_rows_by_view = rule(
    "Assignment 4a rule 1: x.view(-1, n), which fails on the slice of a larger tensor the cache passes.",
    "kv_quant", edit(INT8_OK, "scale = (x.abs()", "x = x.view(-1, x.size(-1)).view(x.shape)\n        scale = (x.abs()"),
    "check_quant_contract", "view size is not compatible")
test_quant_unclamped_in_bfloat16 = rule(
    "Assignment 4a rule 5: codes computed in x's own dtype, not clamped: right in float32, while in bfloat16 "
    "x / scale reaches 128 and wraps to -128.",
    "kv_quant", edit(INT8_OK, CODES, "(x / scale.half().to(x.dtype)).round().to(torch.int8)"),
    "check_quant_error", "with x in bfloat16")
test_quant_two_bits_with_a_zero_point_per_row = rule(
    "Assignment 4a rule 5, the worst row, not a small one: 2-bit codes with a zero point per row, no groups.",
    "kv_quant", INT2_PER_ROW, "check_quant_error", "does every row get a scale that fits")
test_quant_scale_kept_in_the_closure = rule(
    "Assignment 4a rule 6, dequantize reads only its arguments: one scale per call, held by the closure.",
    "kv_quant", edit(INT8_OK, "/ 127).clamp(min=1e-8)\n        " + QRET + "\n" + DEQ, "/ 127).clamp(min=1e-8).amax()\n"
                     f"        return ({CODES},), lambda codes: codes.float() * scale"),
    "check_quant_rows", "rows changed when payloads of two calls", first=False)

# -- assignment 4b: priority ------------------------------------------------------------------


test_evict_protection_as_inf_times_mask = rule(
    "Assignment 4b rule 1, no nan: protection added as inf * mask, and 0 * inf is nan.",
    "kv_evict", edit(H2O_OK, 'torch.where(keep, float("inf"), scores / (seen - pos))',
                     'scores / (seen - pos) + float("inf") * keep.float()'),
    "check_evict_shapes", "some priorities are nan")
test_evict_newest_taken_from_pos = rule(
    "Assignment 4b rule 3: the newest taken from pos.max(), not seen. The step's own token (seen - 1) is not "
    "ranked, so pos.max() is seen - 2 and the rule protects one token too many, as it would in the cache.",
    "kv_evict", edit(H2O_OK, "(pos >= seen - kv_recent)", "(pos > pos.amax(-1, keepdim=True) - kv_recent)"),
    "check_evict_only", "is protected with the newest, one too many")
test_evict_newest_one_past_pos = rule(
    "Assignment 4b rule 3: the newest found as pos.max() + 1, right only while the step's token directly follows "
    "the ranked ones; a quantized cache keeps its residual's newest apart.",
    "kv_evict", edit(H2O_OK, "(pos >= seen - kv_recent)", "(pos > pos.amax(-1, keepdim=True) + 1 - kv_recent)"),
    "check_evict_only", "find the newest from seen, not from pos")
test_evict_protection_by_a_finite_mark = rule(
    "Assignment 4b rule 2: the protected given a finite 100, which a heavy hitter's score outgrows.",
    "kv_evict", edit(H2O_OK, 'float("inf")', "100.0"), "check_evict_scores", "not a finite mark")


def test_a_wrong_shape_is_not_reported_as_the_answers_crash(exercise_checks):
    """The every-token state above: no check blames the checker's own comparison on the
    answer ("your code raised ... checks_common.py"); a shape mismatch is named as one."""
    source = edit(LINEAR_OK, LOOP + "        " + RETURN,
                  "        Ss = S[:, :, None] + torch.cumsum(k[..., :, None] * v[..., None, :], 2)\n"
                  "        zs = z[:, :, None] + torch.cumsum(k, 2)\n        S.data, z.data = Ss, zs\n"
                  '        return torch.einsum("bhtd,bhtde->bhte", q, Ss), (q * zs).sum(-1, keepdim=True)')
    results, printed = exercise_checks("linear_attention", source)
    assert "checks_common.py" not in printed and "FAIL" in printed, printed


def test_protecting_unattended_tokens_is_not_blamed_on_the_sinks(exercise_checks):
    """Tokens with a zero score protected too: rule 4's general message names them; the sink
    rule's ("position 4 is protected with the sinks") is kept for an off-by-one at the sinks."""
    source = edit(H2O_OK, "(pos >= seen - kv_recent)", "(pos >= seen - kv_recent) | (scores == 0)")
    results, printed = exercise_checks("kv_evict", source)
    failed = [m for _, status, m in results if status == "FAIL"]
    assert failed and "are neither sinks nor among the newest" in failed[0], printed
    assert "protected with the sinks" not in printed, printed


def test_key_ok_without_this_step_is_not_blamed_on_a_restart(exercise_checks):
    """key_ok = mem_ok alone: at m=0 there is no memory and nothing restarted; the attend check
    names key_ok's shape, not "key_ok is all True, but row 1 restarted"."""
    results, printed = exercise_checks("xl_memory", edit(XL_OK, OK_, "ok = mem_ok"))
    [message] = [m for t, status, m in results if status == "FAIL" and t == TITLE["check_xl_attend"]]
    assert "key_ok has shape (2, 0), expected (B, m + T) = (2, 4)" in message, printed
