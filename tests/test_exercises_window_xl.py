"""
The checks of assignments 1 and 2 (kv_window, xl_memory), checked themselves: each wrong
solution below, a mistake students make, fails first at the check it breaks with a message
that names the mistake and its rule in exercises/README.md; each correct alternative passes.
"""

import pytest

from conftest import TRIM_OK, XL_OK

# what is wrong: (exercise, source, the first check that fails, words its message must hold)
WRONG = {}
OK = {}  # a correct alternative: (exercise, source)

# -- assignment 1: keep_recent ----------------------------------------------------------------

def trim(old, new, title, words):
    assert old in TRIM_OK
    return ("kv_window", TRIM_OK.replace(old, new), title, words)


WRONG.update({
    "no more sinks than the window holds": trim("(pos < kv_sink)", "(pos < min(kv_sink, kv_window))",
                                                "keeps the kv_sink first tokens of the text", "positions < 6 must stay"),
    "forgets the sinks": trim(" | (pos < kv_sink)", "", "keeps the kv_sink first tokens of the text",
                              "text positions < kv_sink"),
    "the window keeps the oldest": ("kv_window", """
        def keep_recent(k, v, pos, kv_window, kv_sink=0):
            return k[:, :, :kv_window + kv_sink], v[:, :, :kv_window + kv_sink], pos[:kv_window + kv_sink]
        """, "keeps the kv_window newest tokens", "kept the oldest tokens"),
    "drops this step's token": ("kv_window", """
        import torch
        def keep_recent(k, v, pos, kv_window, kv_sink=0):
            keep = torch.zeros_like(pos, dtype=torch.bool)
            keep[-kv_window - 1:-1] = True
            keep |= pos < kv_sink
            return k[:, :, keep], v[:, :, keep], pos[keep]
        """, "keeps the kv_window newest tokens", "the newest token"),
    "one too many at the window's edge": trim("pos[-1] - kv_window + 1", "pos[-1] - kv_window",
                                              "drops everything else (at most kv_window + kv_sink tokens)",
                                              "one token too many"),
    "sinks up to kv_sink included": trim("pos < kv_sink", "pos <= kv_sink",
                                         "keeps the kv_sink first tokens of the text", "(none when kv_sink=0), not <="),
    "sinks by place in the cache": ("kv_window", """
        import torch
        def keep_recent(k, v, pos, kv_window, kv_sink=0):
            keep = pos >= pos[-1] - kv_window + 1
            keep[:kv_sink] = True
            return k[:, :, keep], v[:, :, keep], pos[keep]
        """, "keeps the kv_sink first tokens of the text", "chosen by position"),
    "positions left untrimmed": trim("pos[keep]", "pos", "returns k, v (B, nkv, kept, hs) and pos (kept,) "
                                     "in the given dtypes", "trim pos with the same mask"),
    "positions cut from the end": trim("pos[keep]", "pos[-int(keep.sum()):]",
                                       "k and v rows stay with their positions, oldest first",
                                       "select pos with the same mask"),
    "returns k twice": trim("v[:, :, keep]", "k[:, :, keep]", "k and v rows stay with their positions, oldest first",
                            "v came back equal to k"),
    "joins two slices": ("kv_window", """
        import torch
        def keep_recent(k, v, pos, kv_window, kv_sink=0):
            s = pos < kv_sink
            return (torch.cat([k[:, :, s], k[:, :, -kv_window:]], 2), torch.cat([v[:, :, s], v[:, :, -kv_window:]], 2),
                    torch.cat([pos[s], pos[-kv_window:]]))
        """, "k and v rows stay with their positions, oldest first", "appear twice"),
    "newest first": trim("return k[:, :, keep], v[:, :, keep], pos[keep]",
                         "return k[:, :, keep].flip(2), v[:, :, keep].flip(2), pos[keep].flip(0)",
                         "k and v rows stay with their positions, oldest first", "newest first"),
    "casts to float32": trim("k[:, :, keep], v[:, :, keep]", "k[:, :, keep].float(), v[:, :, keep].float()",
                             "returns k, v (B, nkv, kept, hs) and pos (kept,) in the given dtypes", "keep the dtype"),
    "positions as int32": trim("pos[keep]", "pos[keep].int()", "returns k, v (B, nkv, kept, hs) and pos (kept,) "
                               "in the given dtypes", "a 1-D long tensor"),
    "float masks joined with |": trim("keep = (pos >= pos[-1] - kv_window + 1) | (pos < kv_sink)",
                                      "keep = ((pos >= pos[-1] - kv_window + 1).float() | (pos < kv_sink).float()).bool()",
                                      "returns k, v (B, nkv, kept, hs) and pos (kept,) in the given dtypes",
                                      "your code raised NotImplementedError"),  # torch's, not a stub's: not a TODO
    "a parameter missing": trim("def keep_recent(k, v, pos, kv_window, kv_sink=0):",
                                "def keep_recent(k, v, pos, kv_window):",
                                "returns k, v (B, nkv, kept, hs) and pos (kept,) in the given dtypes",
                                "calling your function failed: TypeError: keep_recent() takes 4"),
    "returns pos first": trim("return k[:, :, keep], v[:, :, keep], pos[keep]",
                              "return pos[keep], k[:, :, keep], v[:, :, keep]",
                              "returns k, v (B, nkv, kept, hs) and pos (kept,) in the given dtypes",
                              "in the order (k, v, pos)"),
    "selects along the last axis": trim("k[:, :, keep], v[:, :, keep]", "k[..., keep], v[..., keep]",
                                        "returns k, v (B, nkv, kept, hs) and pos (kept,) in the given dtypes",
                                        "your code raised IndexError"),
})

OK.update({
    "positions after the window's start": ("kv_window", TRIM_OK.replace("pos >= pos[-1] - kv_window + 1",
                                                                        "pos > pos[-1] - kv_window")),
    "places in the cache for the window": ("kv_window", """
        import torch
        def keep_recent(k, v, pos, kv_window, kv_sink=0):
            keep = (torch.arange(pos.numel()) >= pos.numel() - kv_window) | (pos < kv_sink)
            return k[:, :, keep], v[:, :, keep], pos[keep]
        """),
    "index_select, nothing to do when short": ("kv_window", """
        import torch
        def keep_recent(k, v, pos, kv_window, kv_sink=0):
            if pos.numel() <= kv_window:
                return k, v, pos
            idx = torch.nonzero((pos < kv_sink) | (pos > pos[-1] - kv_window)).squeeze(1)
            return k.index_select(2, idx), v.index_select(2, idx), pos.index_select(0, idx)
        """),
})

# -- assignment 2: xl_step --------------------------------------------------------------------

def xl(old, new, title, words):
    assert old in XL_OK
    return ("xl_memory", XL_OK.replace(old, new), title, words)


WRONG.update({
    "an empty float32 memory at the start": xl(
        "    def xl_step(mem_k, mem_v, mem_ok, k, v, mem_len):\n",
        "    def xl_step(mem_k, mem_v, mem_ok, k, v, mem_len):\n"
        "        if mem_k.size(2) == 0:\n"
        "            mem_k = mem_v = torch.zeros(k.size(0), k.size(1), 0, k.size(3))\n",
        "returns six tensors of the right shapes and dtypes", "keep k's dtype"),
    "memory not detached": xl("keys[:, :, -mem_len:].detach(), vals[:, :, -mem_len:].detach()",
                              "keys[:, :, -mem_len:], vals[:, :, -mem_len:]",
                              "memory detached, this step's keys keep their gradient", "new_k still requires grad"),
    "values not detached": xl("vals[:, :, -mem_len:].detach()", "vals[:, :, -mem_len:].clone()",
                              "memory detached, this step's keys keep their gradient", "new_v still requires grad"),
    "this step's keys detached": xl("torch.cat([mem_k, k], 2)", "torch.cat([mem_k, k.detach()], 2)",
                                    "memory detached, this step's keys keep their gradient",
                                    "keys carry no gradient"),
    "all under no_grad": ("xl_memory", """
        import torch
        @torch.no_grad()
        def xl_step(mem_k, mem_v, mem_ok, k, v, mem_len):
            keys, vals = torch.cat([mem_k, k], 2), torch.cat([mem_v, v], 2)
            ok = torch.cat([mem_ok, mem_ok.new_ones(mem_ok.size(0), k.size(2))], 1)
            return keys, vals, ok, keys[:, :, -mem_len:], vals[:, :, -mem_len:], ok[:, -mem_len:]
        """, "memory detached, this step's keys keep their gradient", "no torch.no_grad"),
    "keeps everything": xl("keys[:, :, -mem_len:].detach(), vals[:, :, -mem_len:].detach(), ok[:, -mem_len:]",
                           "keys.detach(), vals.detach(), ok",
                           "keeps the newest min(mem_len, m + T) tokens as memory", "more than mem_len"),
    "the memory keeps the oldest": xl("keys[:, :, -mem_len:].detach(), vals[:, :, -mem_len:].detach(), ok[:, -mem_len:]",
                           "keys[:, :, :mem_len].detach(), vals[:, :, :mem_len].detach(), ok[:, :mem_len]",
                           "keeps the newest min(mem_len, m + T) tokens as memory", "keeps the oldest"),
    "memory from this step only": xl(
        "keys[:, :, -mem_len:].detach(), vals[:, :, -mem_len:].detach(), ok[:, -mem_len:]",
        "k[:, :, -mem_len:].detach(), v[:, :, -mem_len:].detach(), ok[:, -min(mem_len, k.size(2)):]",
        "keeps the newest min(mem_len, m + T) tokens as memory", "only this step's"),
    "new_ok from the front": xl("ok[:, -mem_len:]", "ok[:, :min(mem_len, ok.size(1))]",
                                "keeps the newest min(mem_len, m + T) tokens as memory", "new_ok must be key_ok"),
    "new_ok forgets the restarts": xl("ok[:, -mem_len:]", "torch.ones_like(ok[:, -mem_len:])",
                                      "keeps the newest min(mem_len, m + T) tokens as memory", "new_ok is all True"),
    "forgets the restarts": xl("torch.cat([mem_ok, mem_ok.new_ones(mem_ok.size(0), k.size(2))], 1)",
                               "torch.ones(k.size(0), mem_ok.size(1) + k.size(2), dtype=torch.bool)",
                               "attends over memory then this step, with key_ok", "key_ok is all True"),
    "this step first": xl("torch.cat([mem_k, k], 2), torch.cat([mem_v, v], 2)",
                          "torch.cat([k, mem_k], 2), torch.cat([v, mem_v], 2)",
                          "attends over memory then this step, with key_ok", "the memory comes first"),
    "key_ok with this step first": xl("torch.cat([mem_ok, mem_ok.new_ones(mem_ok.size(0), k.size(2))], 1)",
                                      "torch.cat([mem_ok.new_ones(mem_ok.size(0), k.size(2)), mem_ok], 1)",
                                      "attends over memory then this step, with key_ok", "mem_ok first"),
    "memory in float32": xl("return keys, vals, ok, keys[:, :, -mem_len:].detach(), vals[:, :, -mem_len:].detach()",
                            "return keys, vals, ok, keys[:, :, -mem_len:].detach().float(), "
                            "vals[:, :, -mem_len:].detach().float()",
                            "returns six tensors of the right shapes and dtypes", "keep k's dtype"),
    "five things returned": xl(", ok[:, -mem_len:]", "", "returns six tensors of the right shapes and dtypes",
                               "it returned a tuple of 5"),
    "joins along the heads": xl("torch.cat([mem_k, k], 2), torch.cat([mem_v, v], 2)",
                                "torch.cat([mem_k, k], 1), torch.cat([mem_v, v], 1)",
                                "returns six tensors of the right shapes and dtypes", "your code raised RuntimeError"),
})

OK.update({
    "narrow and clone": ("xl_memory", """
        import torch
        def xl_step(mem_k, mem_v, mem_ok, k, v, mem_len):
            keys, vals = torch.cat((mem_k, k), dim=2), torch.cat((mem_v, v), dim=2)
            key_ok = torch.cat((mem_ok, torch.ones(k.shape[0], k.shape[2], dtype=torch.bool)), dim=1)
            n = min(mem_len, keys.shape[2])
            start = keys.shape[2] - n
            return (keys, vals, key_ok, keys.narrow(2, start, n).detach().clone(),
                    vals.narrow(2, start, n).detach().clone(), key_ok.narrow(1, start, n).clone())
        """),
    "memory joined from detached copies": ("xl_memory", """
        import torch
        def xl_step(mem_k, mem_v, mem_ok, k, v, mem_len):
            key_ok = torch.cat([mem_ok, mem_ok.new_ones(k.size(0), k.size(2))], 1)
            new_k = torch.cat([mem_k, k.detach()], 2)[:, :, -mem_len:]
            new_v = torch.cat([mem_v, v.detach()], 2)[:, :, -mem_len:]
            return torch.cat([mem_k, k], 2), torch.cat([mem_v, v], 2), key_ok, new_k, new_v, key_ok[:, -mem_len:]
        """),
    "first step apart": ("xl_memory", """
        import torch
        def xl_step(mem_k, mem_v, mem_ok, k, v, mem_len):
            T = k.size(2)
            if mem_k.size(2) == 0:
                ok = torch.ones(k.size(0), T, dtype=torch.bool, device=k.device)
                keys, vals = k, v
            else:
                keys, vals = torch.cat([mem_k, k], 2), torch.cat([mem_v, v], 2)
                ok = torch.cat([mem_ok, torch.ones(k.size(0), T, dtype=torch.bool, device=k.device)], 1)
            cut = max(0, keys.size(2) - mem_len)
            return keys, vals, ok, keys[:, :, cut:].detach(), vals[:, :, cut:].detach(), ok[:, cut:]
        """),
})


@pytest.mark.parametrize("what", list(WRONG))
def test_a_wrong_solution_fails_first_where_it_is_wrong(what, exercise_checks):
    exercise_checks.wrong_fails_first(WRONG[what])


@pytest.mark.parametrize("what", list(OK))
def test_a_correct_alternative_passes(what, exercise_checks):
    exercise_checks.correct_passes(OK[what])


def test_one_newest_too_few_is_blamed_on_the_window_rule_alone(exercise_checks):
    """A window of one kept as none: k and v both come back empty, which says nothing about
    whether v holds the rows of k."""
    source = TRIM_OK.replace("pos >= pos[-1] - kv_window + 1", "pos > pos[-1] - kv_window + 1")
    results, printed = exercise_checks("kv_window", source)
    assert [t for t, status, _ in results if status == "FAIL"] == ["keeps the kv_window newest tokens"], printed


OLDEST_WITH_SINKS = """
    import torch
    def keep_recent(k, v, pos, kv_window, kv_sink=0):
        keep = (torch.arange(pos.numel()) < kv_window) | (pos < kv_sink)
        return k[:, :, keep], v[:, :, keep], pos[keep]
    """


@pytest.mark.parametrize("source", [WRONG["the window keeps the oldest"][1], OLDEST_WITH_SINKS], ids=["slices", "mask"])
def test_keeping_the_oldest_fails_the_window_rule_alone(source, exercise_checks):
    """The oldest tokens kept in place of the newest: the window check (rule 2) fails; the sink
    and budget checks, which meet the old tokens as extra ones, step aside rather than blame a
    `<=` among the sinks (rule 3) or too many tokens (rule 4)."""
    results, printed = exercise_checks("kv_window", source)
    status = {t: s for t, s, _ in results}
    assert [t for t, s in status.items() if s == "FAIL"] == ["keeps the kv_window newest tokens"], printed
    assert status["keeps the kv_sink first tokens of the text"] == "SKIP", printed
    assert status["drops everything else (at most kv_window + kv_sink tokens)"] == "SKIP", printed
    assert "not <=" not in printed, printed


@pytest.mark.parametrize("what", ["sinks by place in the cache", "sinks up to kv_sink included"])
def test_false_sinks_fail_the_sink_rule_alone(what, exercise_checks):
    """Tokens kept as sinks that are none: the sink check (rule 3) fails; the budget check, which
    meets the same extra tokens, steps aside rather than blame rule 4."""
    results, printed = exercise_checks(*WRONG[what][:2])
    failed = [t for t, status, _ in results if status == "FAIL"]
    assert failed == ["keeps the kv_sink first tokens of the text"], printed
    assert [status for t, status, _ in results if t.startswith("drops everything else")] == ["SKIP"], printed
    assert "'Assignment 1, rule 3'" in printed, printed


@pytest.mark.parametrize("what", ["sinks by place in the cache", "sinks up to kv_sink included"])
def test_false_sinks_next_to_a_window_one_too_wide_still_fail_the_sink_rule(what, exercise_checks):
    """Two mistakes: tokens kept as sinks that are none, and one token too many at the window's
    edge. The edge token does not hide the false sinks from the sink check (rule 3), and the
    budget check names the edge (rule 4): each mistake fails its own check."""
    source = WRONG[what][1].replace("pos[-1] - kv_window + 1", "pos[-1] - kv_window")
    results, printed = exercise_checks("kv_window", source)
    failed = {t: msg for t, status, msg in results if status == "FAIL"}
    assert list(failed) == ["keeps the kv_sink first tokens of the text",
                            "drops everything else (at most kv_window + kv_sink tokens)"], printed
    assert WRONG[what][3] in failed["keeps the kv_sink first tokens of the text"], printed
    assert "one token too many" in failed["drops everything else (at most kv_window + kv_sink tokens)"], printed


@pytest.mark.parametrize("what", ["one too many at the window's edge", "sinks up to kv_sink included",
                                  "sinks by place in the cache", "joins two slices", "positions left untrimmed",
                                  "selects along the last axis"])
def test_trim_messages_do_not_write_out_the_answer(what, exercise_checks):
    """A message says what is wrong and which rule it breaks, not the line that fixes it."""
    results, printed = exercise_checks(*WRONG[what][:2])
    failed = " ".join(msg for _, status, msg in results if status == "FAIL")
    for code in ("pos >=", "pos[-1] -", "pos < kv_sink", "[:, :, keep]", "pos[keep]", "pos[-kv_window:]"):
        assert code not in failed, (code, printed)


@pytest.mark.parametrize("what", ["returns pos first", "this step first"])
def test_an_order_mistake_fails_once(what, exercise_checks):
    """The wrong order of what is returned, or of memory and this step, is one FAIL: the checks
    after it that meet only its consequences step aside."""
    results, printed = exercise_checks(*WRONG[what][:2])
    assert len([t for t, status, _ in results if status == "FAIL"]) == 1, printed
