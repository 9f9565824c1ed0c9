"""exercises/check.py and its checks_*.py, checked themselves: every check passes on the
project's references, reports "not implemented yet" on the untouched stubs, and the right check
fails on a deliberately wrong implementation of each exercise (written here, into tmp modules)."""

import importlib
import sys
import textwrap

import pytest
import torch

from conftest import run_script
from exercises import check, checks_common

WRONG = {}  # exercise name -> {what is wrong: (source of a module, title of the check that must fail)}

WRONG["kv_window"] = {
    "forgets the sinks": ("""
        def keep_recent(k, v, pos, kv_window, kv_sink=0):
            keep = pos >= pos[-1] - kv_window + 1
            return k[:, :, keep], v[:, :, keep], pos[keep]
        """, "keeps the kv_sink first tokens of the text"),
    "keeps the oldest": ("""
        def keep_recent(k, v, pos, kv_window, kv_sink=0):
            return k[:, :, :kv_window + kv_sink], v[:, :, :kv_window + kv_sink], pos[:kv_window + kv_sink]
        """, "keeps the kv_window newest tokens"),
    "one too many": ("""
        def keep_recent(k, v, pos, kv_window, kv_sink=0):
            keep = (pos >= pos[-1] - kv_window) | (pos < kv_sink)
            return k[:, :, keep], v[:, :, keep], pos[keep]
        """, "drops everything else (at most kv_window + kv_sink tokens)"),
    "positions not trimmed with k and v": ("""
        def keep_recent(k, v, pos, kv_window, kv_sink=0):
            keep = (pos >= pos[-1] - kv_window + 1) | (pos < kv_sink)
            return k[:, :, keep], v[:, :, keep], pos[-int(keep.sum()):]
        """, "k and v rows stay with their positions, oldest first"),
}

WRONG["xl_memory"] = {
    "does not detach": ("""
        import torch
        def xl_step(mem_k, mem_v, mem_ok, k, v, mem_len):
            keys, vals = torch.cat([mem_k, k], 2), torch.cat([mem_v, v], 2)
            ok = torch.cat([mem_ok, mem_ok.new_ones(mem_ok.size(0), k.size(2))], 1)
            return keys, vals, ok, keys[:, :, -mem_len:], vals[:, :, -mem_len:], ok[:, -mem_len:]
        """, "memory detached, this step's keys keep their gradient"),
    "keeps too much": ("""
        import torch
        def xl_step(mem_k, mem_v, mem_ok, k, v, mem_len):
            keys, vals = torch.cat([mem_k, k], 2), torch.cat([mem_v, v], 2)
            ok = torch.cat([mem_ok, mem_ok.new_ones(mem_ok.size(0), k.size(2))], 1)
            return keys, vals, ok, keys.detach(), vals.detach(), ok
        """, "keeps the newest min(mem_len, m + T) tokens as memory"),
    "forgets the restarts": ("""
        import torch
        def xl_step(mem_k, mem_v, mem_ok, k, v, mem_len):
            keys, vals = torch.cat([mem_k, k], 2), torch.cat([mem_v, v], 2)
            ok = torch.ones(k.size(0), keys.size(2), dtype=torch.bool)
            return keys, vals, ok, keys[:, :, -mem_len:].detach(), vals[:, :, -mem_len:].detach(), ok[:, -mem_len:]
        """, "attends over memory then this step, with key_ok"),
}

LINEAR_OK = """
    import torch
    import torch.nn.functional as F
    def attention(q, k, v, mask, dropout_p):
        att = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-2, -1) * mask
        return (att @ v) / (att.sum(-1, keepdim=True) + 1e-6)   # the paper's denominator
    def recurrent_step(q, k, v, S, z):
        nums, dens = [], []
        for t in range(q.size(2)):
            S += k[:, :, t, :, None] * v[:, :, t, None, :]
            z += k[:, :, t]
            nums.append(torch.einsum("bhd,bhde->bhe", q[:, :, t], S))
            dens.append((q[:, :, t] * z).sum(-1, keepdim=True))
        return torch.stack(nums, 2), torch.stack(dens, 2)
    """

WRONG["linear_attention"] = {
    "leaks the future": (LINEAR_OK.replace("* mask", ""), "attention: causal, no output sees a later token"),
    "makes its own triangle": (LINEAR_OK.replace("* mask", "* torch.ones(q.size(2), k.size(2)).tril(k.size(2) - q.size(2))"),
                               "attention: follows any mask (windows, sinks, T < S)"),
    "keeps the softmax": (LINEAR_OK.replace("att = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-2, -1) * mask",
                                            "att = (q @ k.transpose(-2, -1)).masked_fill(~mask, -1e9).softmax(-1)"),
                          "attention: phi(q) phi(k)^T v, masked, normalised"),
    "state not updated in place": (LINEAR_OK.replace("S += ", "S = S + ").replace("z += ", "z = z + "),
                                   "recurrent_step: updates S and z in place"),
    "reads out before adding the token": (LINEAR_OK.replace(
        "            S += k[:, :, t, :, None] * v[:, :, t, None, :]\n            z += k[:, :, t]\n", "").replace(
        "        return torch.stack", "            S += k[:, :, t, :, None] * v[:, :, t, None, :]\n"
        "            z += k[:, :, t]\n        return torch.stack"), "recurrent_step: recurrent equals parallel"),
}

INT8_OK = """
    import torch
    def quantize(x):
        scale = (x.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-8)
        return (torch.round(x / scale).to(torch.int8), scale.half()), dequantize
    def dequantize(codes, scale):
        return codes.float() * scale.float()
    """

WRONG["kv_quant"] = {
    "ignores its scale": (INT8_OK.replace("codes.float() * scale.float()", "codes.float() / 127"),
                          "error bound for its bits, rows of any size"),
    "float32 codes": (INT8_OK.replace("torch.round(x / scale).to(torch.int8)", "torch.round(x / scale)"),
                      "bits per value, scales included (at most 9)"),
    "one scale for the whole tensor": (INT8_OK.replace("x.abs().amax(-1, keepdim=True)",
                                                       "x.abs().amax().expand(*x.shape[:-1], 1)"),
                                       "rows stand alone (joined, dropped, quantized one by one)"),
    "dequantize remembers the last input": ("""
        import torch
        def quantize(x):
            scale = (x.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-8)
            codes = torch.round(x / scale).to(torch.int8)
            return (codes, scale.half()), lambda codes, s: codes.float() * scale
        """, "rows stand alone (joined, dropped, quantized one by one)"),
}

H2O_OK = """
    import torch
    def priority(scores, pos, seen, kv_sink, kv_recent):
        keep = (pos < kv_sink) | (pos >= seen - kv_recent)
        return torch.where(keep, float("inf"), scores / (seen - pos))   # attention per query, not in total
    """

WRONG["kv_evict"] = {
    "drops the sinks": (H2O_OK.replace("(pos < kv_sink) | ", ""), "the kv_sink first tokens always stay"),
    "forgets the newest": (H2O_OK.replace(" | (pos >= seen - kv_recent)", ""), "the kv_recent newest tokens always stay"),
    "keeps the least attended": (H2O_OK.replace("scores / (seen - pos)", "-scores"),
                                 "heavy hitters stay, unattended tokens go first"),
    "writes into the scores": ("""
        def priority(scores, pos, seen, kv_sink, kv_recent):
            scores[(pos < kv_sink) | (pos >= seen - kv_recent)] = float("inf")
            return scores
        """, "returns float priorities shaped like scores, inputs untouched"),
}


def write_module(tmp_path, monkeypatch, name, source):
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    sys.modules.pop(name, None)
    return name


def statuses(exercise, **kw):
    printed = []
    results = check.run_exercise(check.EXERCISES[exercise], out=printed.append, **kw)
    return {title: status for title, status, _ in results}, "\n".join(printed)


@pytest.mark.parametrize("exercise", list(check.EXERCISES))
def test_every_check_passes_on_the_reference(exercise):
    got, printed = statuses(exercise, reference=True)
    assert set(got.values()) == {"PASS"}, printed


@pytest.mark.parametrize("exercise,wrong", [(e, w) for e in WRONG for w in WRONG[e]])
def test_the_right_check_fails_on_a_wrong_implementation(exercise, wrong, tmp_path, monkeypatch):
    source, title = WRONG[exercise][wrong]
    name = write_module(tmp_path, monkeypatch, f"wrong_{exercise}", source)
    got, printed = statuses(exercise, module=name, skip_slow=True)
    assert title in got, sorted(got)
    assert got[title] == "FAIL", printed
    assert "Traceback" not in printed


@pytest.mark.parametrize("exercise,source", [("linear_attention", LINEAR_OK), ("kv_quant", INT8_OK),
                                             ("kv_evict", H2O_OK)])
def test_other_correct_solutions_pass(exercise, source, tmp_path, monkeypatch):
    name = write_module(tmp_path, monkeypatch, f"ok_{exercise}", source)
    got, printed = statuses(exercise, module=name, skip_slow=exercise == "linear_attention")
    assert set(got.values()) == {"PASS"}, printed
    if exercise == "linear_attention":
        assert "normalised by the denominator" in printed


def test_plugged_in_references_equal_the_built_in_policies():
    from kvpolicy import make_cache_factory
    model = checks_common.tiny_model(n_kv_head=2).eval()
    idx = checks_common.random_text(2, 30)
    pairs = [(dict(kv_quant="int8", kv_quant_residual=4), dict(kv_quant="kvquant:int8_quantize", kv_quant_residual=4)),
             (dict(kv_evict="h2o", kv_budget=9, kv_sink=2, kv_recent=3),
              dict(kv_evict="kvevict:h2o_priority", kv_budget=9, kv_sink=2, kv_recent=3))]
    with torch.no_grad():
        for built_in, plugged in pairs:
            a, _ = checks_common.feed(model, idx, 1, make_cache=make_cache_factory(**built_in))
            b, _ = checks_common.feed(model, idx, 1, make_cache=make_cache_factory(**plugged))
            assert torch.equal(a, b), (built_in, plugged)


def test_eviction_rule_errors_are_one_line(tmp_path, monkeypatch):
    from kvpolicy import make_cache_factory
    from utils import UserError
    with pytest.raises(UserError, match="unknown kv_evict"):
        make_cache_factory(kv_evict="lru", kv_budget=8)
    with pytest.raises(UserError, match="does not import"):
        make_cache_factory(kv_evict="no_such_module:rule", kv_budget=8)
    name = write_module(tmp_path, monkeypatch, "summing_rule", """
        def rule(scores, pos, seen, kv_sink, kv_recent):
            return scores.sum(-1)
        """)
    bad = make_cache_factory(kv_evict=f"{name}:rule", kv_budget=4)
    with pytest.raises(UserError, match="must return float priorities shaped like scores"):
        checks_common.feed(checks_common.tiny_model().eval(), checks_common.random_text(1, 10), 1, make_cache=bad)


def test_code_that_crashes_is_one_line_with_its_place(tmp_path, monkeypatch):
    name = write_module(tmp_path, monkeypatch, "crashing", """
        def keep_recent(k, v, pos, kv_window, kv_sink=0):
            return k[:, :, pos > "oops"], v, pos
        """)
    got, printed = statuses("kv_window", module=name, skip_slow=True)
    assert set(got.values()) <= {"FAIL", "SKIP"}
    assert "your code raised TypeError" in printed and "crashing.py:3" in printed


def test_untouched_stubs_report_not_implemented():
    proc = run_script("-m", "exercises.check", "all")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = [l.strip() for l in proc.stdout.splitlines() if l.startswith("  ") and not l.startswith("  ->")]
    assert lines and all(l.startswith("TODO") and l.endswith("not implemented yet") for l in lines), proc.stdout
    assert "0 passed, 0 failed" in proc.stdout.splitlines()[-1]


def test_command_line_names_and_errors():
    proc = run_script("-m", "exercises.check", "nope")
    assert proc.returncode == 2 and "unknown exercise" in proc.stderr
    proc = run_script("-m", "exercises.check", "2")  # an assignment's number
    assert proc.returncode == 1 and "xl_memory" in proc.stdout and "kv_window" not in proc.stdout
    proc = run_script("-m", "exercises.check", "all", "--module=exercises.kv_window")
    assert proc.returncode == 2 and "--module checks one exercise" in proc.stderr
