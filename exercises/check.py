"""
Is my solution right? Checks the functions you wrote in exercises/ against the project's own.

    python -m exercises.check kv_window             # one assignment (or its number, 1..4)
    python -m exercises.check all                   # every one
    python -m exercises.check all --reference       # the same checks on the project's code
    python -m exercises.check linear_attention --module=my_pkg.my_attention   # another module
    python -m exercises.check kv_window --module=../mywork/trim.py             # or a file

Names: kv_window (1), xl_memory (2), linear_attention (3), kv_quant and kv_evict (4).
Each check prints one line, PASS or FAIL (with a hint), TODO while your function still
raises NotImplementedError, or SKIP when an earlier failure makes it pointless; the exit code is 0 only when every check passes. First come
property checks (shapes, what is kept, equivalences with the reference), then a tiny model
with your function plugged in, then a few seconds of training or evaluation on a CPU.
"""

import argparse
import importlib
import importlib.util
import os
import re
import sys
import sysconfig
import time
import traceback
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python exercises/check.py` works too
    sys.path.insert(0, ROOT)
import quiet_start  # noqa: E402  (before torch: Ctrl-C while it loads exits quietly)
import torch  # noqa: E402

# the checks, one module per exercise (after the path is set)
from exercises import (checks_common, checks_kv_evict, checks_kv_quant, checks_kv_window,  # noqa: E402
                       checks_linear_attention, checks_xl_memory)
from exercises.checks_common import Failed, Skipped, randn, see  # noqa: E402
from exercises.checks_kv_evict import (check_evict_heads, check_evict_model, check_evict_only,  # noqa: E402
                                       check_evict_recall, check_evict_recent, check_evict_scores,
                                       check_evict_shapes, check_evict_sinks, check_evict_ties, evict_inputs)
from exercises.checks_kv_quant import (check_quant_bias, check_quant_bits, check_quant_contract,  # noqa: E402
                                       check_quant_error, check_quant_levels, check_quant_model, check_quant_rows)
from exercises.checks_kv_window import (check_trim_budget, check_trim_long_text, check_trim_model,  # noqa: E402
                                        check_trim_recent, check_trim_rows, check_trim_shapes, check_trim_sinks,
                                        trim_inputs)
from exercises.checks_linear_attention import (causal, check_linear_cached, check_linear_causal,  # noqa: E402
                                               check_linear_formula, check_linear_grads, check_linear_mask,
                                               check_linear_model, check_linear_shapes, check_linear_training,
                                               check_recurrent_matches_attention, check_recurrent_parallel,
                                               check_recurrent_shapes, check_recurrent_state, qkv,
                                               recurrent_inputs)
from exercises.checks_xl_memory import (check_xl_attend, check_xl_detach, check_xl_grads, check_xl_keep,  # noqa: E402
                                        check_xl_model, check_xl_shapes, check_xl_training, xl_inputs)
from plugins import is_file_name, module_of_file, unwritten  # noqa: E402
from utils import UserError  # noqa: E402

quiet_start.done()  # the slow imports are over: Ctrl-C is KeyboardInterrupt again (also where this is imported)

# the checker's own files: a crash is reported at the innermost frame outside them
OWN_FILES = {os.path.abspath(m.__file__) for m in (checks_common, checks_kv_window, checks_xl_memory,
                                                    checks_linear_attention, checks_kv_quant, checks_kv_evict)}
OWN_FILES.add(os.path.abspath(__file__))


# -----------------------------------------------------------------------------
# the exercises, their stubs and references

@dataclass
class Check:
    title: str
    fn: object
    uses: tuple  # the functions of the module it calls
    slow: bool = False  # skipped when a check of the same functions failed before it
    rule: tuple = None  # (assignment, rule number) in exercises/README.md, named by a failure


@dataclass
class Exercise:
    name: str
    number: int
    title: str
    functions: tuple
    reference: dict  # function name -> "module:function" of the project's version
    checks: list = field(default_factory=list)


EXERCISES = {e.name: e for e in [
    Exercise("kv_window", 1, "bounded history", ("keep_recent",), {"keep_recent": "kv.cache:keep_recent"}, [
        Check("returns k, v (B, nkv, kept, hs) and pos (kept,) in the given dtypes", check_trim_shapes,
              ("keep_recent",), rule=(1, 1)),
        Check("keeps the kv_window newest tokens", check_trim_recent, ("keep_recent",), rule=(1, 2)),
        Check("keeps the kv_sink first tokens of the text", check_trim_sinks, ("keep_recent",), rule=(1, 3)),
        Check("drops everything else (at most kv_window + kv_sink tokens)", check_trim_budget, ("keep_recent",),
              rule=(1, 4)),
        Check("k and v rows stay with their positions, oldest first", check_trim_rows, ("keep_recent",), rule=(1, 5)),
        Check("tiny model: --kv_trim equals the ring-buffer cache", check_trim_model, ("keep_recent",), slow=True,
              rule=(1, 6)),
        Check("trained model sampled 10x past its training length", check_trim_long_text, ("keep_recent",),
              slow=True, rule=(1, 6)),
    ]),
    Exercise("xl_memory", 2, "TransformerXL memory", ("xl_step",), {"xl_step": "kv.xl:xl_step"}, [
        Check("returns six tensors of the right shapes and dtypes", check_xl_shapes, ("xl_step",), rule=(2, 1)),
        Check("attends over memory then this step, with key_ok", check_xl_attend, ("xl_step",), rule=(2, 2)),
        Check("keeps the newest min(mem_len, m + T) tokens as memory", check_xl_keep, ("xl_step",), rule=(2, 3)),
        Check("memory detached, this step's keys keep their gradient", check_xl_detach, ("xl_step",), rule=(2, 4)),
        Check("tiny model: --xl_update equals the reference memory", check_xl_model, ("xl_step",), slow=True,
              rule=(2, 5)),
        Check("one training step: gradients equal the reference's", check_xl_grads, ("xl_step",), slow=True,
              rule=(2, 4)),
        Check("short training on text that repeats block to block", check_xl_training, ("xl_step",), slow=True,
              rule=(2, 5)),
    ]),
    Exercise("linear_attention", 3, "linear attention", ("attention", "recurrent_step"),
             {"attention": "attention_linear:linear_attention",
              "recurrent_step": "attention_linear:linear_recurrent"}, [
        Check("attention: y shaped like q, in q's dtype, finite", check_linear_shapes, ("attention",), rule=(3, 1)),
        Check("attention: phi(q) phi(k)^T v, masked, normalised", check_linear_formula, ("attention",),
              rule=(3, 2)),
        Check("attention: causal, no output sees a later token", check_linear_causal, ("attention",), rule=(3, 4)),
        Check("attention: follows any mask (windows, sinks, T < S)", check_linear_mask, ("attention",), rule=(3, 4)),
        Check("attention: gradients reach q, k and v as the formula's do", check_linear_grads, ("attention",),
              rule=(3, 5)),
        Check("recurrent_step: num/den shapes, fixed-size state", check_recurrent_shapes, ("recurrent_step",),
              rule=(3, 7)),
        Check("recurrent_step: updates S and z in place", check_recurrent_state, ("recurrent_step",), rule=(3, 6)),
        Check("recurrent_step: recurrent equals parallel", check_recurrent_parallel, ("recurrent_step",),
              rule=(3, 7)),
        Check("recurrent_step equals attention on the same text", check_recurrent_matches_attention,
              ("attention", "recurrent_step"), rule=(3, 7)),
        Check("tiny model: cached decoding equals the full forward", check_linear_cached, ("attention",), slow=True,
              rule=(3, 8)),
        Check("tiny model: same logits and gradients as --attention=linear", check_linear_model, ("attention",),
              slow=True, rule=(3, 8)),
        Check("short training with your attention", check_linear_training, ("attention",), slow=True, rule=(3, 8)),
    ]),
    Exercise("kv_quant", 4, "KV quantization", ("quantize",), {"quantize": "kv.quant:int8_quantize"}, [
        Check("returns (tensors shaped (..., m), dequantize); dequantize gives x's shape",
              check_quant_contract, ("quantize",), rule=("4a", 1)),
        Check("bits per value, scales included (at most 9)", check_quant_bits, ("quantize",), rule=("4a", 2)),
        Check("the codes' levels are used (a ramp from -1 to 1)", check_quant_levels, ("quantize",), rule=("4a", 3)),
        Check("rounds to nearest: errors unbiased, not following x", check_quant_bias, ("quantize",),
              rule=("4a", 4)),
        Check("error near a plain quantizer of its format, on average and in the worst row", check_quant_error,
              ("quantize",), rule=("4a", 5)),
        Check("rows stand alone (joined, dropped, quantized one by one)", check_quant_rows, ("quantize",),
              rule=("4a", 6)),
        Check("trained model with your --kv_quant cache", check_quant_model, ("quantize",), slow=True,
              rule=("4a", 7)),
    ]),
    Exercise("kv_evict", 4, "KV eviction", ("priority",), {"priority": "kv.evict:h2o_priority"}, [
        Check("returns float priorities shaped like scores, inputs untouched", check_evict_shapes, ("priority",),
              rule=("4b", 1)),
        Check("the kv_sink first tokens always stay", check_evict_sinks, ("priority",), rule=("4b", 2)),
        Check("the kv_recent newest tokens always stay", check_evict_recent, ("priority",), rule=("4b", 3)),
        Check("no other token is protected", check_evict_only, ("priority",), rule=("4b", 4)),
        Check("heavy hitters stay, unattended tokens go first", check_evict_scores, ("priority",), rule=("4b", 5)),
        Check("every head ranked by its own scores alone", check_evict_heads, ("priority",), rule=("4b", 6)),
        Check("at equal scores, a newer token is not ranked below an older one", check_evict_ties, ("priority",),
              rule=("4b", 7)),
        Check("tiny model: --kv_evict keeps the budget, sinks and newest", check_evict_model, ("priority",),
              slow=True, rule=("4b", 8)),
        Check("trained model keeps the byte its text recalls (budget 10)", check_evict_recall, ("priority",),
              slow=True, rule=("4b", 8)),
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


class MissingFunction(Exception):
    """The module under test imports but lacks a function the checks call."""


class Impl:
    """The functions under test: a module's attributes, or the project's references."""

    def __init__(self, exercise, module=None, reference=False):
        self.functions, self.specs = {}, {}
        self.where = "the project's reference" if reference else (module or f"exercises.{exercise.name}")
        self.whose = "the reference's" if reference else "your"  # (in what a passing check reports)
        for name in exercise.functions:
            spec = exercise.reference[name] if reference else f"{module or 'exercises.' + exercise.name}:{name}"
            mod_name, fn_name = spec.split(":")
            mod = importlib.import_module(mod_name)
            if not callable(getattr(mod, fn_name, None)):  # (said as such, not as an AttributeError)
                raise MissingFunction(f"has no function {fn_name}; the checks call "
                                      f"{' and '.join(exercise.functions)} (see exercises/{exercise.name}.py)")
            self.functions[name] = getattr(mod, fn_name)
            self.specs[name] = spec

    def __getattr__(self, name):
        try:
            return self.__dict__["functions"][name]
        except KeyError:
            raise AttributeError(name) from None

    def spec(self, name):
        """"package.module:function", for the plug-in points that take a name."""
        return self.specs[name]


def user_frame(exc):
    """The innermost frame in exercises/ or the module under test, if any (else the innermost)."""
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [f for f in frames if os.path.abspath(f.filename) not in OWN_FILES and "site-packages" not in f.filename
            and not f.filename.startswith("<frozen")]  # (exit() raises in Python's own _sitebuiltins)
    return (mine or frames)[-1]


def shown(filename):
    """A file's name as a message shows it: relative to the project inside it, else whole."""
    path = os.path.abspath(filename)
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path


def where_it_broke(exc):
    """file:line of the innermost frame in exercises/ or the module under test, if any."""
    frame = user_frame(exc)
    return f"{shown(frame.filename)}:{frame.lineno}"


def not_implemented(names):
    """A TODO's message, naming the functions that still raise NotImplementedError: with
    quantize written, dequantize may be the one left."""
    return " and ".join(sorted(names)) + " not implemented yet"


def where_import_broke(exc):
    """file:line where importing the module under test raised: the innermost frame of the
    user's code, not of importlib, the checker or an installed package (None: no such frame)."""
    stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"]) + os.sep  # (importlib's own frames)
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<")
              and os.path.abspath(f.filename) not in OWN_FILES and "site-packages" not in f.filename
              and not os.path.realpath(f.filename).startswith(stdlib)]
    if not frames:
        return None  # raised by the checker's own import (no such module, no such function)
    return f"{shown(frames[-1].filename)}:{frames[-1].lineno}"


def run_exercise(exercise, module=None, reference=False, out=print, skip_slow=False):
    """Run the checks of one exercise (skip_slow: only the fast ones); returns a list of
    (check title, status, message), status PASS, FAIL, TODO (not implemented) or SKIP."""
    try:
        impl = Impl(exercise, module, reference)
    except (Exception, SystemExit) as e:  # a missing module or function, or the module's own code failed
        name, place = module or "exercises." + exercise.name, where_import_broke(e)
        if isinstance(e, MissingFunction):
            out(f"{exercise.name}: {name} {e}")
        elif place is None or isinstance(e, SyntaxError):  # (a syntax error names its line)
            hint = (" (--module takes a module name importable from here, e.g. mywork.trim, or a file: "
                    "--module=mywork/trim.py)") if isinstance(e, ModuleNotFoundError) and module else ""
            out(f"{exercise.name}: cannot import {name}: {type(e).__name__}: {e}{hint}")
        else:
            message = " ".join(str(e).split())[:300]
            out(f"{exercise.name}: cannot import {name}: your module raised {type(e).__name__} at import "
                f"({place}): {message}")
        # one failure, not one per check: the module is what is broken, and no check ran
        first, *rest = exercise.checks
        return [(first.title, "FAIL", "does not import")] + [(c.title, "SKIP", "does not import") for c in rest]
    out(f"{exercise.name} (assignment {exercise.number}, {exercise.title}): {impl.where}")
    todo = {}  # function -> the function that still raises NotImplementedError when it is called
    for name in exercise.functions:
        try:
            PROBES[name](impl)
        except (Exception, SystemExit) as e:  # (the checks will say what else is wrong, a sys.exit() too)
            if unwritten(e):
                todo[name] = user_frame(e).name
    # unfinished: the same, met by a check although the probe ran (quantize written, dequantize
    # still the stub): the slow checks of that function would only meet it again
    results, failed, unfinished = [], set(), {}
    # what one check learns for the next ones (e.g. the normalisation used; the functions whose
    # checks failed, so that a check of two functions can tell which one was already reported)
    ctx = {"reported": {}, "failed": failed}
    live = out is print and sys.stdout.isatty()  # (a terminal: each check's title shows while it runs)
    for check in exercise.checks:
        if skip_slow and check.slow:
            continue
        title = check.title.replace("your ", "the reference's ") if reference else check.title
        if live:
            print(f"  ....  {title}", end="\r", flush=True)
        t0 = time.time()
        waiting = {todo[f] for f in check.uses if f in todo}
        if check.slow:
            waiting |= {unfinished[f] for f in check.uses if f in unfinished}
        if waiting:
            status, msg = "TODO", not_implemented(waiting)
        elif check.slow and failed & set(check.uses):
            status, msg = "SKIP", "fix the failures above first"
        else:
            status, msg = run_check(check, impl, ctx)
            if status == "TODO":
                unfinished.update(dict.fromkeys(check.uses, ctx["unfinished"]))
        if status == "FAIL":  # (a SKIP points to a failure reported by another check, of its own functions)
            failed.update(check.uses)
        took = time.time() - t0
        timing = f" [{took:.1f}s]" if took >= 0.5 else ""
        out(f"  {status}  {title}" + (f": {msg}" if msg else "") + timing)
        results.append((check.title, status, msg))
    return results


NUMBER = re.compile(r"\d+(\.\d+)?(e[-+]?\d+)?")  # a size or value in a message: what differs between checks


def run_check(check, impl, ctx):
    """(status, message) of one check. A failure for a reason an earlier check reported already
    (the same exception from the same line of the code under test, or the same message, sizes
    and values aside: each check tries its own shapes) is a SKIP pointing to that check: it
    would only repeat the failure under another rule's name."""
    ctx.pop("case", None)  # a check names the input it is trying in ctx["case"]
    rule = check.rule  # the README's rule a failure points to
    try:
        detail = check.fn(impl, ctx)
        return "PASS", detail or ""
    except Skipped as e:
        return "SKIP", str(e)
    except (Failed, UserError) as e:  # UserError: a plug-in point refused the function
        msg = str(e)
        reason = NUMBER.sub("#", msg)
    except SystemExit as e:  # sys.exit() or exit() in the code under test: its failure, not the checker's end
        rule, where = None, where_it_broke(e)  # (no rule is broken: the checks could not run)
        reason = f"SystemExit at {where}"
        case = ctx.get("case")
        msg = (f"{case}: " if case else "") + f"your code called sys.exit() or exit() (code {e.code!r}, at " \
            f"{where}): a check cannot go on past it; remove the call (print, or raise an exception, to debug)"
    except Exception as e:
        if unwritten(e):  # a stub's raise, not an operation PyTorch lacks for a dtype (a bug to show)
            ctx["unfinished"] = user_frame(e).name  # for the slow checks of the same functions
            return "TODO", not_implemented({ctx["unfinished"]})
        where, raised = where_it_broke(e), f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
        reason = f"{NUMBER.sub('#', raised)} at {where}"  # the same error raised elsewhere is another bug
        case = ctx.get("case")
        called = "|".join(map(re.escape, check.uses))  # (the functions under test: not float() or the like)
        if isinstance(e, TypeError) and re.match(rf"({called})\(\) ", str(e)) and \
                os.path.abspath(user_frame(e).filename) in OWN_FILES:  # raised calling it: no line of it ran
            msg = (f"{case}: " if case else "") + f"calling your function failed: {raised} (compare its def line " \
                "with the stub's in exercises/)"
        else:
            msg = (f"{case}: " if case else "") + f"your code raised {raised} (at {where})"
    first = ctx["reported"].setdefault(reason, check.title)
    if first != check.title:
        return "SKIP", f'the same failure as "{first}" above'
    if rule and "README.md" not in msg:
        msg += "; " + see(*rule)
    return "FAIL", msg


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


def module_exists(name):
    """Whether --module=name names a module that can be found (its parent packages are imported
    to look: one of them that fails for another reason counts as found, and its error is
    reported with the checks)."""
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError as e:  # a parent package is missing, or is a module, not a package
        return not (e.name and (name == e.name or name.startswith(e.name + ".")))
    except (Exception, SystemExit):
        return True


class OneLineParser(argparse.ArgumentParser):
    """argparse, its errors one line (no usage block above them), exit code 2."""

    def error(self, message):
        own = message.startswith(("unrecognized", "the following", "argument "))  # argparse's own words
        print(f"error: {message}" + (" (python -m exercises.check --help shows the usage)" if own else ""),
              file=sys.stderr)
        raise SystemExit(2)


def main(argv=None):
    parser = OneLineParser(prog="python -m exercises.check", description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("name", help="all, " + ", ".join(EXERCISES) + ", or an assignment number 1..4")
    parser.add_argument("--reference", action="store_true", help="check the project's reference implementation instead")
    parser.add_argument("--module", help="check this module (package.module, or the path of a .py file) instead "
                                         "of exercises.NAME")
    parser.add_argument("--threads", type=int, default=1, help="torch's CPU threads (default 1: the models are "
                                                               "tiny, and more threads only wait for each other)")
    args = parser.parse_args(argv)
    if args.name == "all":
        names = list(EXERCISES)
    elif args.name in EXERCISES:
        names = [args.name]
    elif args.name in ALIASES:
        names = [n for n in ALIASES[args.name] if n in EXERCISES]
    else:
        parser.error(f"unknown exercise {args.name!r}: choose all, {', '.join(EXERCISES)} or 1..4")
    if args.module is not None and not args.module.strip():
        parser.error("--module is empty: give a module name (mywork.trim) or a file (mywork/trim.py), or leave "
                     "--module out to check exercises/NAME.py")
    if args.module and len(names) != 1:
        parser.error("--module checks one exercise: name it" + (f" ({args.name} is {' and '.join(names)})"
                                                                 if args.name in ALIASES else ""))
    if args.module and ":" in args.module and not os.path.exists(args.module):  # the plug-in form, module:function
        module = args.module.rsplit(":", 1)[0]
        parser.error(f"--module={args.module}: give the module alone, --module={module} (the checks call the "
                     "exercise's function names in it)")
    if args.module and args.reference:
        parser.error("--reference checks the project's code; --module checks yours: pick one")
    if args.module and os.getcwd() not in sys.path:  # `python path/to/exercises/check.py`: yours are here too
        sys.path.append(os.getcwd())
    if args.module and is_file_name(args.module):
        args.module = module_of_file(args.module, parser.error)
    elif args.module and not module_exists(args.module):
        parser.error(f"--module={args.module}: no such module here; give a module name importable from here "
                     "(mywork.trim) or a file (mywork/trim.py)")
    if args.threads < 1:
        parser.error(f"--threads must be 1 or more, got {args.threads}")
    torch.set_num_threads(args.threads)
    ok = run(names, args.module, args.reference)
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C: the checks stop, nothing to report
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
