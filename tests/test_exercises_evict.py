"""
The checks of assignment 4b (kv_evict), checked themselves: each wrong eviction rule below, a
mistake students make, fails first at the check it breaks with a message that names the
mistake and its rule in exercises/README.md; each correct alternative (plain H2O, scores per
query, other tie rules, finite priorities, ranks) passes, the trained-model checks included.
"""

import pytest

from conftest import H2O_OK
from exercises import checks_kv_evict
from exercises.checks_kv_evict import EVICT_CASES, evict_inputs

# what is wrong: (exercise, source, the first check that fails, words its message must hold[, slow])
WRONG = {}
OK = {}  # a correct alternative: (exercise, source)

def evict(old, new, title, words, slow=False):
    assert old in H2O_OK
    return ("kv_evict", H2O_OK.replace(old, new), title, words, slow)


SINKS = "the kv_sink first tokens always stay"
RECENT = "the kv_recent newest tokens always stay"
ONLY = "no other token is protected"
HEAVY = "heavy hitters stay, unattended tokens go first"
HEADS = "every head ranked by its own scores alone"
TIES = "at equal scores, a newer token is not ranked below an older one"
SHAPES = "returns float priorities shaped like scores, inputs untouched"

WRONG.update({
    "drops the sinks": evict("(pos < kv_sink) | ", "", SINKS, "the sinks must always stay"),
    "forgets the newest": evict(" | (pos >= seen - kv_recent)", "", RECENT, "the kv_recent newest must always stay"),
    "sinks by place in the cache": evict("keep = (pos < kv_sink)", "keep = torch.zeros_like(pos, dtype=torch.bool)\n"
                                         "        keep[..., :kv_sink] = True\n        keep = keep", SINKS,
                                         "no particular order"),
    "newest by place in the cache": evict(" | (pos >= seen - kv_recent)", "\n        keep[..., pos.size(-1) - "
                                          "kv_recent:] = True", RECENT, "no particular order"),
    "one newest token too many": evict("pos >= seen - kv_recent", "pos >= seen - kv_recent - 1", ONLY,
                                       "one too many"),
    "sinks up to kv_sink included": evict("pos < kv_sink", "pos <= kv_sink", ONLY, "protected with the sinks"),
    "keeps the least attended": evict("scores / (seen - pos)", "-scores", HEAVY, "rank by the scores"),
    "recency only": evict("scores / (seen - pos)", "pos.float()", HEAVY, "not by position"),
    "protected sent first": evict('float("inf")', 'float("-inf")', SINKS, "the sinks must always stay"),
    "writes into the scores": ("kv_evict", """
        def priority(scores, pos, seen, kv_sink, kv_recent):
            scores[(pos < kv_sink) | (pos >= seen - kv_recent)] = float("inf")
            return scores
        """, SHAPES, "changed its inputs", False),
    "integer ranks": evict('return torch.where(keep, float("inf"), scores / (seen - pos))',
                           'return torch.where(keep, float("inf"), scores).argsort(-1).argsort(-1)', SHAPES,
                           "must be floats"),
    "indices of the tokens to keep": evict('return torch.where(keep, float("inf"), scores / (seen - pos))',
                                           'return torch.where(keep, float("inf"), scores).topk(4, -1).indices'
                                           '.float()', SHAPES, "not the indices"),
    "indices from argsort": evict('return torch.where(keep, float("inf"), scores / (seen - pos))',
                                  'return torch.where(keep, float("inf"), scores / (seen - pos)).argsort(-1).float()',
                                  SHAPES, "look like the indices argsort returns"),
    "scores of the heads added slot by slot": evict("scores / (seen - pos)",
                                                    "scores.sum(1, keepdim=True).expand_as(scores)", HEADS,
                                                    "the other heads of its row"),
    "scores of the batch rows added": evict("scores / (seen - pos)", "scores.sum(0, keepdim=True).expand_as(scores)",
                                            HEADS, "the other batch rows"),
    "older first at equal scores": evict("scores / (seen - pos)", "scores + 1e-3 * (seen - pos)", TIES,
                                         "an older token"),
    "divided by the position, not the age": evict("scores / (seen - pos)", "scores / (pos + 1)", TIES,
                                                  "an older token"),
    "age outweighs attention": evict("scores / (seen - pos)", "scores / (seen - pos) ** 4",
                                     "trained model keeps the byte its text recalls (budget 10)",
                                     "keeping only the newest", True),
})

OK.update({
    "scores per query (divided by the age)": ("kv_evict", H2O_OK),
    "plain H2O with masked_fill": ("kv_evict", """
        def priority(scores, pos, seen, kv_sink, kv_recent):
            return scores.masked_fill((pos < kv_sink) | (pos >= seen - kv_recent), float("inf"))
        """),
    "ties go to the newer": ("kv_evict", """
        import torch
        def priority(scores, pos, seen, kv_sink, kv_recent):
            rank = scores + 1e-6 * pos.float() / seen
            return torch.where((pos < kv_sink) | (pos >= seen - kv_recent), float("inf"), rank)
        """),
    "finite priorities, normalised": ("kv_evict", """
        def priority(scores, pos, seen, kv_sink, kv_recent):
            protect = ((pos < kv_sink) | (pos >= seen - kv_recent)).float()
            return scores / scores.amax().clamp(min=1e-9) + 10.0 * protect
        """),
    "ranks as floats, ties to the newer": ("kv_evict", """
        import torch
        def priority(scores, pos, seen, kv_sink, kv_recent):
            key = torch.where((pos < kv_sink) | (pos >= seen - kv_recent), float("inf"), scores)
            order = pos.argsort(-1)                                             # oldest first
            order = order.gather(-1, key.gather(-1, order).argsort(dim=-1, stable=True))  # by score, then age
            ranks = torch.arange(key.size(-1), dtype=torch.float).expand_as(key)
            return torch.empty_like(ranks).scatter_(-1, order, ranks)          # slot j: token j's rank
        """),
    "finite ranks of the scores per query": ("kv_evict", """
        import torch
        def priority(scores, pos, seen, kv_sink, kv_recent):
            key = torch.where((pos < kv_sink) | (pos >= seen - kv_recent), float("inf"), scores / (seen - pos))
            ranks = key.argsort(dim=-1, stable=True).argsort(-1)
            return ranks.float()
        """),
    "float16 priorities": ("kv_evict", """
        import torch
        def priority(scores, pos, seen, kv_sink, kv_recent):
            keep = (pos < kv_sink) | (pos >= seen - kv_recent)
            return torch.where(keep, float("inf"), scores / (seen - pos)).half()
        """),
})


@pytest.mark.parametrize("what", list(WRONG))
def test_a_wrong_solution_fails_first_where_it_is_wrong(what, exercise_checks):
    exercise_checks.wrong_fails_first(WRONG[what])


@pytest.mark.parametrize("what", list(OK))
def test_a_correct_alternative_passes(what, exercise_checks):
    exercise_checks.correct_passes(OK[what])


def test_one_newest_too_few_is_blamed_on_the_newest_rule_alone(exercise_checks):
    """Too few protected: "no other token is protected" cannot judge, and must not blame rule 4."""
    source = H2O_OK.replace("pos >= seen - kv_recent", "pos > seen - kv_recent")
    results, printed = exercise_checks("kv_evict", source)
    assert [t for t, status, _ in results if status == "FAIL"] == [RECENT], printed
    assert [status for t, status, _ in results if t == ONLY] == ["SKIP"], printed
    later = [msg for t, status, msg in results if t in (HEAVY, TIES)]
    assert later and all("must stay is ranked below" in msg for msg in later), printed  # not "protected too"


def test_everything_protected_is_blamed_on_rule_4(exercise_checks):
    """float("inf") for every token: nothing else may be protected (rule 4), not a rule about
    the newest."""
    results, printed = exercise_checks("kv_evict", H2O_OK.replace('torch.where(keep, float("inf"), scores / (seen - pos))',
                                                                  'torch.full_like(scores, float("inf"))'))
    failed = [(t, msg) for t, status, msg in results if status == "FAIL"]
    assert [t for t, _ in failed] == [ONLY] and "'Assignment 4b, rule 4'" in failed[0][1], printed
    assert "rule 3" not in failed[0][1], printed


def test_an_empty_slice_for_kv_recent_0_is_named(exercise_checks, monkeypatch):
    """x[-kv_recent:] with kv_recent=0 is all of x: everything is protected, which rule 4's
    check says as such (not that the sinks are wrong). (At kv_recent > 0 the same slice keeps one
    too many: the step's own token, the newest, is not among those ranked.)"""
    monkeypatch.setattr(checks_kv_evict, "EVICT_CASES", [(3, 0)])
    source = H2O_OK.replace("keep = (pos < kv_sink) | (pos >= seen - kv_recent)",
                            "keep = pos < kv_sink\n        newest = pos.argsort(-1)[..., -kv_recent:]\n"
                            "        keep = keep.scatter(-1, newest, True)")
    results, printed = exercise_checks("kv_evict", source)
    failed = [(t, msg) for t, status, msg in results if status == "FAIL"]
    assert [t for t, _ in failed] == [ONLY] and "[-0:], the whole tensor" in failed[0][1], printed
    assert "protected with the sinks" not in printed


@pytest.mark.parametrize("case", [c for c in EVICT_CASES if c[1] > 0])
def test_one_newest_too_few_names_the_boundary_token(case, exercise_checks, monkeypatch):
    """The token left unprotected is the oldest of the kv_recent newest: the message names it."""
    monkeypatch.setattr(checks_kv_evict, "EVICT_CASES", [case])
    source = H2O_OK.replace("pos >= seen - kv_recent", "pos > seen - kv_recent")
    results, printed = exercise_checks("kv_evict", source)
    seen = evict_inputs()[2]
    boundary = seen - case[1]
    message = [msg for t, status, msg in results if status == "FAIL" and t == RECENT]
    assert message and f"position {boundary} (= seen - kv_recent, the oldest" in message[0], printed
    assert "protect pos >= seen - kv_recent" in message[0], printed


def test_writing_into_the_scores_is_reported_once(exercise_checks):
    """Every check meets the same changed inputs: one FAIL, the others point to it."""
    results, printed = exercise_checks(*WRONG["writes into the scores"][:2])
    assert [t for t, status, _ in results if status == "FAIL"] == [SHAPES], printed
    assert all(status == "SKIP" and SHAPES in msg for _, status, msg in results[1:]), printed


def test_one_sink_and_one_newest_too_many_are_blamed_on_rule_4_alone(exercise_checks):
    """Too many protected: the score and tie checks would blame the protected extras (ranked
    above everything for that reason alone) on their own rules; they step aside instead."""
    source = H2O_OK.replace("pos < kv_sink", "pos <= kv_sink").replace("pos >= seen - kv_recent",
                                                                      "pos >= seen - kv_recent - 1")
    results, printed = exercise_checks("kv_evict", source)
    assert [t for t, status, _ in results if status == "FAIL"] == [ONLY], printed
    assert [status for t, status, _ in results if t in (HEAVY, TIES)] == ["SKIP", "SKIP"], printed


def test_indices_are_reported_once(exercise_checks):
    """argsort's indices instead of priorities: one FAIL under rule 1, which names the mistake;
    the sink, newest and tie checks meet the same values and point to it."""
    results, printed = exercise_checks(*WRONG["indices from argsort"][:2])
    assert [t for t, status, _ in results if status == "FAIL"] == [SHAPES], printed
    assert "'Assignment 4b, rule 1'" in printed, printed
    assert all(status == "SKIP" and SHAPES in msg for _, status, msg in results[1:]), printed
