"""
exercises/check.py and its checks_*.py, checked themselves: every check passes on the project's
references, reports "not implemented yet" on the untouched stubs, names a rule of
exercises/README.md that exists, and crashes in a student's code come out as one line. The
wrong and correct solutions of each assignment are in tests/test_exercises_*.py.
"""

import os
import re
import sys

import pytest
import torch

from conftest import REPO_ROOT, assert_user_error, run_script
from exercises import check, checks_common
from kv.policy import KVOptions


@pytest.mark.parametrize("exercise", list(check.EXERCISES))
def test_every_check_passes_on_the_reference(exercise):
    printed = []
    results = check.run_exercise(check.EXERCISES[exercise], reference=True, out=printed.append)
    assert {status for _, status, _ in results} == {"PASS"}, "\n".join(printed)
    assert not any("your" in line for line in printed), "\n".join(printed)  # (the reference is nobody's own)


def readme_rules():
    """{assignment: number of rules} from the "### Assignment X, rules" lists of exercises/README.md."""
    rules, current = {}, None
    with open(f"{REPO_ROOT}/exercises/README.md") as f:
        for line in f:
            heading = re.match(r"### Assignment (\w+), rules$", line.strip())
            if heading:
                current = heading.group(1)
                rules[current] = 0
            elif line.startswith("#"):
                current = None
            elif current and re.match(rf"{rules[current] + 1}\. ", line):
                rules[current] += 1
    return rules


def test_every_rule_a_message_points_to_is_in_the_readme():
    rules = readme_rules()
    assert set(rules) == {"1", "2", "3", "4a", "4b"}, rules
    pointed = [c.rule for e in check.EXERCISES.values() for c in e.checks]
    assert None not in pointed  # every check names its rule
    for name in ("checks_kv_window", "checks_xl_memory", "checks_linear_attention", "checks_kv_quant",
                 "checks_kv_evict"):
        with open(f"{REPO_ROOT}/exercises/{name}.py") as f:
            pointed += [(a.strip("'\""), int(n)) for a, n in re.findall(r"see\(([\w'\"]+), (\d+)\)", f.read())]
    for assignment, n in pointed:
        assert 1 <= n <= rules[str(assignment)], (assignment, n)


def test_plugged_in_references_equal_the_built_in_policies():
    model = checks_common.tiny_model(n_kv_head=2).eval()
    idx = checks_common.random_text(2, 30)
    pairs = [(dict(kv_quant="int8", kv_quant_residual=4), dict(kv_quant="kv.quant:int8_quantize", kv_quant_residual=4)),
             (dict(kv_evict="h2o", kv_budget=9, kv_sink=2, kv_recent=3),
              dict(kv_evict="kv.evict:h2o_priority", kv_budget=9, kv_sink=2, kv_recent=3))]
    with torch.no_grad():
        for built_in, plugged in pairs:
            a, _ = checks_common.feed(model, idx, 1, KVOptions(kv_window=0, **built_in))
            b, _ = checks_common.feed(model, idx, 1, KVOptions(kv_window=0, **plugged))
            assert torch.equal(a, b), (built_in, plugged)


def test_eviction_rule_errors_are_one_line(tmp_path, monkeypatch):
    from utils import UserError
    with pytest.raises(UserError, match="unknown kv_evict"):
        KVOptions(kv_evict="lru", kv_budget=8).check()
    with pytest.raises(UserError, match="no module named"):
        KVOptions(kv_evict="no_such_module:rule", kv_budget=8).check()
    (tmp_path / "summing_rule.py").write_text("def rule(scores, pos, seen, kv_sink, kv_recent):\n"
                                              "    return scores.sum(-1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    bad = KVOptions(kv_window=0, kv_evict="summing_rule:rule", kv_budget=4)
    with pytest.raises(UserError, match="must return float priorities shaped like scores"):
        checks_common.feed(checks_common.tiny_model().eval(), checks_common.random_text(1, 10), 1, bad)


def test_code_that_crashes_is_one_line_with_its_place(exercise_checks):
    results, printed = exercise_checks("kv_window", """
        def keep_recent(k, v, pos, kv_window, kv_sink=0):
            return k[:, :, pos > "oops"], v, pos
        """)
    assert {status for _, status, _ in results} <= {"FAIL", "SKIP"}
    assert "your code raised TypeError" in printed and ".py:3" in printed and "Traceback" not in printed


@pytest.mark.parametrize("source,error", [
    ("import torch\nx = torhc.zeros(1)\n", "NameError at import ({}:2): name 'torhc' is not defined"),
    ("def keep_recent(k, v, pos, kv_window, kv_sink=0):\n    return k, v, pos\n\nraise RuntimeError('no GPU')\n",
     "RuntimeError at import ({}:4): no GPU"),
    ("import torch\nx = torch.zeross(1)\n", "AttributeError at import ({}:2): module 'torch' has no attribute"),
])
def test_a_module_that_fails_at_import_is_one_line_with_its_place(exercise_checks, tmp_path, source, error):
    """The module's own code raises while it is imported: the checker names the error and the
    line, one failure is counted for it (the others skip: no check ran), and no traceback."""
    results, printed = exercise_checks("kv_window", source)
    assert [status for _, status, _ in results] == ["FAIL"] + ["SKIP"] * (len(results) - 1), printed
    assert {msg for _, _, msg in results} == {"does not import"}, printed
    assert "your module raised " + error.format(tmp_path / "solution_kv_window_0.py") in printed, printed
    assert "Traceback" not in printed
    (tmp_path / "plug.py").write_text(source)
    proc = run_script("-m", "exercises.check", "kv_window", f"--module={tmp_path / 'plug.py'}")
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert "your module raised " + error.format(tmp_path / "plug.py") in proc.stdout.splitlines()[0]


def test_a_missing_function_is_still_named_as_such(exercise_checks, tmp_path):
    """A module without the function the checks call (a name not callable counts): said as
    such, with the file to copy it from; --module given a folder says it is one."""
    for source in ("def other():\n    pass\n", "keep_recent = 3\n"):
        results, printed = exercise_checks("kv_window", source)
        assert "has no function keep_recent; the checks call keep_recent (see exercises/kv_window.py)" in printed \
            and "your module raised" not in printed and "AttributeError" not in printed, printed
    proc = run_script("-m", "exercises.check", "kv_window", f"--module={tmp_path}")
    assert_user_error(proc, f"--module={tmp_path}: a folder; give a file")
    (tmp_path / "mine.py").write_text("def other():\n    pass\n")  # given without its .py
    proc = run_script("-m", "exercises.check", "kv_window", f"--module={tmp_path / 'mine'}")
    assert_user_error(proc, f"no such file; did you mean --module={tmp_path / 'mine'}.py?")


# each exercise file's functions, as shipped: stubs that raise NotImplementedError
STUBS = {"kv_window": ["keep_recent"], "xl_memory": ["xl_step"], "linear_attention": ["attention", "recurrent_step"],
         "kv_quant": ["quantize", "dequantize"], "kv_evict": ["priority"]}


def edited(name):
    """Whether exercises/<name>.py holds a student's code (the README says to solve them in
    place) rather than its stubs: then the tests of untouched stubs do not apply to it."""
    with open(os.path.join(REPO_ROOT, "exercises", f"{name}.py")) as f:
        text = f.read()
    return not all(f"implement {fn} in exercises/{name}.py" in text for fn in STUBS[name])


def test_untouched_stubs_report_not_implemented():
    if any(edited(name) for name in STUBS):
        pytest.skip("exercises/ holds your solutions: this test is for the stubs as shipped")
    proc = run_script("-m", "exercises.check", "all")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = [l.strip() for l in proc.stdout.splitlines() if l.startswith("  ") and not l.startswith("  ->")]
    assert lines and all(l.startswith("TODO") and l.endswith("not implemented yet") for l in lines), proc.stdout
    assert "keep_recent not implemented yet" in proc.stdout and "dequantize not" not in proc.stdout, proc.stdout
    assert "0 passed, 0 failed" in proc.stdout.splitlines()[-1]


def test_command_line_names_and_errors():
    proc = run_script("-m", "exercises.check", "nope")
    assert proc.returncode == 2 and "unknown exercise" in proc.stderr
    proc = run_script("-m", "exercises.check", "2", "--threads=2")  # an assignment's number (and the threads)
    assert "xl_memory" in proc.stdout and "kv_window" not in proc.stdout
    assert proc.returncode == 1 or edited("xl_memory") and proc.returncode == 0, proc.stdout  # (a stub: not passed)
    proc = run_script("-m", "exercises.check", "all", "--module=exercises.kv_window")
    assert proc.returncode == 2 and "--module checks one exercise" in proc.stderr
    # each error one line, without argparse's usage block
    for args, words in ((["4", "--module=q.py"], "(4 is kv_quant and kv_evict)"),
                        (["kv_window", "--module=mytrim:keep_recent"], "give the module alone, --module=mytrim "),
                        (["kv_window", "--bogus=x"], "unrecognized arguments: --bogus=x"),
                        (["kv_window", "--threads=0"], "--threads must be 1 or more, got 0")):
        proc = run_script("-m", "exercises.check", *args)
        assert proc.returncode == 2 and proc.stdout == "", proc.stdout
        assert len(proc.stderr.splitlines()) == 1 and words in proc.stderr, proc.stderr


def test_ctrl_c_in_a_check_stops_quietly(tmp_path):
    """Ctrl-C while a check runs (here raised by the function under check): exit 130, no traceback."""
    (tmp_path / "plug.py").write_text("def keep_recent(*args, **kwargs):\n    raise KeyboardInterrupt\n")
    proc = run_script("-m", "exercises.check", "kv_window", f"--module={tmp_path / 'plug.py'}")
    assert proc.returncode == 130 and "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert proc.stderr.strip() == "interrupted", proc.stderr


@pytest.mark.parametrize("call, code", [("sys.exit(0)", "0"), ("exit()", "None"), ("sys.exit(3)", "3")])
def test_a_sys_exit_in_the_code_under_check_is_a_failure(tmp_path, call, code):
    """A debugging exit() or sys.exit() in the student's function fails the check it ends (its
    place named), the rest of the run still prints, and the exit code is 1: not 0 with no
    summary, as if everything had passed."""
    (tmp_path / "plug.py").write_text(f"import sys\n\n\ndef keep_recent(*args, **kwargs):\n    {call}\n")
    proc = run_script("-m", "exercises.check", "kv_window", f"--module={tmp_path / 'plug.py'}", timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    [failed] = [line for line in proc.stdout.splitlines() if line.startswith("  FAIL")]
    assert f"your code called sys.exit() or exit() (code {code}, at {tmp_path / 'plug.py'}:5)" in failed, failed
    assert "summary: 0 passed, 1 failed" in proc.stdout and "Traceback" not in proc.stdout + proc.stderr


def test_module_given_as_a_file_outside_the_project(tmp_path):
    (tmp_path / "mytrim.py").write_text("from kv.cache import keep_recent  # the reference, as a student's file\n")
    proc = run_script("-m", "exercises.check", "kv_window", f"--module={tmp_path / 'mytrim.py'}", timeout=300)
    assert proc.returncode == 0 and "kv_window (assignment 1" in proc.stdout and "mytrim" in proc.stdout, proc.stdout
    proc = run_script("-m", "exercises.check", "kv_window", f"--module={tmp_path / 'missing.py'}")
    assert proc.returncode == 2 and "no such file" in proc.stderr
    (tmp_path / "mytrim").write_text("from kv.cache import keep_recent\n")  # a file without .py
    proc = run_script("-m", "exercises.check", "kv_window", f"--module={tmp_path / 'mytrim'}")
    assert proc.returncode == 2 and "not a .py file" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_one_crash_is_reported_once(exercise_checks):
    """The same exception in every check: the first check fails, the later ones say SKIP and
    point to it rather than blaming a rule each; the run still fails."""
    results, printed = exercise_checks("kv_window", """
        def keep_recent(k, v, pos, kv_window, kv_sink=0):
            keep = (pos >= pos[-1] - kv_window + 1) | (pos < kv_sinks)
            return k[:, :, keep], v[:, :, keep], pos[keep]
        """)
    first = results[0][0]
    assert [(t, status) for t, status, _ in results if status != "SKIP"] == [(first, "FAIL")], printed
    assert "your code raised NameError" in results[0][2], printed
    assert all(first in msg and "README" not in msg for _, _, msg in results[1:5]), printed
    assert not check.summary(results)[1]


def test_another_crash_is_still_reported(exercise_checks):
    """Only the same exception steps aside: a check that meets another one fails with it."""
    results, printed = exercise_checks("kv_window", """
        def keep_recent(k, v, pos, kv_window, kv_sink=0):
            if len(pos) == 20 and kv_sink == 3:
                raise ValueError("twenty")
            keep = (pos >= pos[-1] - kv_window + 1) | (pos < kv_sink)
            return k[:, :, keep], v[:, :, keep], pos[keep][:1]
        """)
    failed = [msg for _, status, msg in results if status == "FAIL"]
    assert len(failed) == 2 and "ValueError: twenty" in failed[0] and "ValueError" not in failed[1], printed


def test_a_module_that_does_not_exist_is_a_usage_error():
    """--module names no module to be found: one line and exit code 2, as a missing file gets."""
    for name in ("mywork.nonexist", "nonexist_module_xyz"):
        proc = run_script("-m", "exercises.check", "kv_window", f"--module={name}")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
        assert f"--module={name}: no such module" in proc.stderr and proc.stdout == "", proc.stdout + proc.stderr


def test_an_empty_module_is_a_usage_error_not_the_default():
    """--module='' (a variable left empty) checked exercises/NAME.py as if nothing were given."""
    proc = run_script("-m", "exercises.check", "kv_window", "--module=")
    assert proc.returncode == 2 and "--module is empty" in proc.stderr and proc.stdout == "", proc.stdout + proc.stderr


def test_a_module_that_imports_a_missing_one_is_named_with_its_place(tmp_path):
    """The module is there; an import inside it fails: reported as the module's own error, at
    its line, not as a --module that cannot be found."""
    (tmp_path / "plug.py").write_text("import torch\nimport no_such_package_xyz\n")
    proc = run_script("-m", "exercises.check", "kv_window", f"--module={tmp_path / 'plug.py'}")
    first = proc.stdout.splitlines()[0]
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert f"your module raised ModuleNotFoundError at import ({tmp_path / 'plug.py'}:2)" in first, first
    assert "--module takes" not in first, first


def test_importing_the_checker_leaves_ctrl_c_alone():
    """A program that imports exercises.check (pytest does) keeps Python's Ctrl-C: a
    KeyboardInterrupt it can handle, not the exit at once that quiet_start sets while torch loads."""
    proc = run_script("-c", "import signal, exercises.check; "
                            "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)")
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stdout + proc.stderr


def test_on_a_terminal_each_check_is_named_while_it_runs(monkeypatch, capsys):
    """A check that hangs shows which one it is: on a terminal its title is printed before it
    runs (then overwritten by its result); in a log or a pipe, only the results."""
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    check.run_exercise(check.EXERCISES["kv_window"], reference=True, skip_slow=True)
    out = capsys.readouterr().out
    first = check.EXERCISES["kv_window"].checks[0].title
    assert f"  ....  {first}\r  PASS  {first}" in out, out
