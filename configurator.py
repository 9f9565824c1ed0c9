"""
Command-line configuration, nanoGPT style: a script's plain globals (ints, floats, bools, strings)
are its settings. Arguments are read in order: a path is a config file of Python assignments,
`--name=value` overrides one global. Mistakes are reported as one line, not a traceback.

    python train.py config/train_shakespeare_char.py --max_iters=100 --learning_rate=3e-4
    python train.py --help              # the script's docstring and every setting
    python gen_sample_data.py --block_size=32 --reset_prob=0.5

A script uses it as
    config = configure(globals(), sys.argv[1:])   # right after its settings
"""
import ast
import difflib
import os
import re
import sys
import types

from utils import UserError

PLAIN_TYPES = (int, float, bool, str)


# nanoGPT's settings that this project does not have, and what to use instead
_WANDB = "wandb is not supported here{tensorboard}"
ELSEWHERE = {"wandb_log": _WANDB, "wandb_project": _WANDB, "wandb_run_name": _WANDB,
             "init_from": "{reads}; GPT-2's weights do not fit this byte-level model",
             "real_data": "nanoGPT's bench.py setting: this bench.py always times batches of --dataset's text",
             "profile": "nanoGPT's bench.py setting: no profiler is built in (run the script under perf record "
                        "or python -m cProfile)"}
# ...and the values of them that ask for what the script does anyway: accepted, and said to be
# ignored (nanoGPT's `python sample.py --init_from=resume --out_dir=...` and the wandb lines of
# its config files work as they did there; wandb_project and wandb_run_name do nothing without
# wandb_log=True, which is refused)
_OFF, _ANYWAY = "nanoGPT's setting: wandb is off here, as with wandb_log=False", \
    "nanoGPT's setting: what this script does anyway"
SAME_HERE = {"wandb_log": (lambda text, known: text.strip().lower() in ("false", "0"), _OFF),
             "wandb_project": (lambda text, known: True, _OFF), "wandb_run_name": (lambda text, known: True, _OFF),
             "init_from": (lambda text, known: text.strip() == "resume" and "checkpoint_name" in known, _ANYWAY),
             "real_data": (lambda text, known: text.strip().lower() in ("true", "1") and "bench_iters" in known,
                           _ANYWAY)}


def _same_here(name, value, known):
    """Why the setting name=value (not one of this script's) changes nothing here, or None."""
    accepts, why = SAME_HERE.get(name, (None, None))
    return why if name not in known and accepts and accepts(str(value), known) else None


def _reads(known):
    if "checkpoint_name" in known:
        return "this script reads the checkpoint in --out_dir (--checkpoint_name names it)"
    if "base" in known:
        return "this script reads its base checkpoint from --base"
    return "this script starts from no checkpoint"


def _suggest(name, known):
    if name in ELSEWHERE:
        tb = ": TensorBoard scalars are written (--tensorboard=True, the default)" if "tensorboard" in known else \
            ": this script logs no scalars"  # (train.py, eval_kv.py and kv_study.py write TensorBoard's)
        return ELSEWHERE[name].format(reads=_reads(known), tensorboard=tb)
    if name == "config":
        script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0].endswith(".py") else "train.py"
        return f"a config file is given without a flag, as a path: python {script} config/NAME.py --name=value"
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(f"--{k}" for k in close) + "?"
    return "--help lists the settings"


def _coerce(where, value, default):
    """Check value against the type of default; an int is fine where a float is expected."""
    expected = type(default)
    if type(value) is int and expected in (int, float) and abs(value) >= 2**63:  # (torch's sizes and seeds are int64)
        raise UserError(f"{where}: {value} is too large a number (the limit is 2**63 - 1 = {2**63 - 1:,})")
    if type(value) is expected:
        return value
    if expected is float and type(value) is int:
        return float(value)
    hint = ""
    if expected is bool:
        hint = " (write True or False)"
    elif expected is int and type(value) is float and value.is_integer() and abs(value) < 2**63:
        hint = f" (write {int(value)})"
    raise UserError(f"{where}: expected {expected.__name__}, got {type(value).__name__} {value!r}{hint}")


def _parse(name, text, default):
    """The value of --name=text, typed like default."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        value = text  # a bare word such as shakespeare_char
    if isinstance(default, str) and not isinstance(value, str):
        value = text  # --global_layers=0 or 0,5 means the text itself, not a number or a tuple
    if isinstance(default, bool) and text in ("true", "false"):
        value = text == "true"
    if type(default) is float and text.strip().lower().lstrip("+-") in ("inf", "infinity", "nan"):
        value = float(text)  # a float all the same: the script's range check says what is allowed
    if name in PATH_SETTINGS and isinstance(default, str) and isinstance(value, str) and value.startswith("~"):
        value = os.path.expanduser(value)  # (the shell expands ~ only at a word's start, not after --out_dir=)
    return _coerce(f"--{name}", value, default)


PATH_SETTINGS = ("out_dir", "dataset", "base", "out", "baseline", "input")  # the scripts' settings that name a path


def _near_file(path):
    """'; did you mean X?' for a config file named nearly as one that exists (a lost '.py',
    a letter off, or the config/ folder left out), else ''."""
    if not os.path.dirname(path) and os.path.isdir("config"):  # (a recipe's name, nearly: its stem)
        stems = [n[:-3] for n in os.listdir("config") if n.endswith(".py")]
        stem = path[:-3] if path.endswith(".py") else path
        close = difflib.get_close_matches(stem, stems, n=1, cutoff=0.8)
        if close:
            return f"; did you mean {os.path.join('config', close[0] + '.py')}?"
    folder = os.path.dirname(path) or "."
    try:
        names = [n for n in os.listdir(folder) if n.endswith(".py")]
    except OSError:
        return ""
    name = os.path.basename(path)
    close = [n for n in names if n in (name + ".py", name + "y")]
    if not close and not os.path.samefile(folder, _HERE):  # (a letter off: not among the project's own scripts)
        close = difflib.get_close_matches(name, names, n=1)
    return f"; did you mean {os.path.join(os.path.dirname(path), close[0])}?" if close else ""


def _run_config_file(path, g, known):
    """Exec a config file with the current settings visible; return the settings it changed and
    the names it assigns (a setting assigned its default is still given by the file)."""
    if os.path.isdir(path):
        flag = "out_dir" if "out_dir" in known else "base" if "base" in known else None  # where a run's folder goes
        named = f" (a run's folder is named with --{flag}={path})" if flag else ""
        raise UserError(f"config file {path} is a folder; give the path of a Python file of settings{named}")
    if not os.path.isfile(path):
        here = os.path.join(_HERE, path)
        if not os.path.isabs(path) and os.path.isfile(here):  # run from another folder
            raise UserError(f"config file {path} not found in {os.getcwd()} (paths are read from the folder "
                            f"you run in): give {here}, or cd {_HERE}")
        raise UserError(f"config file {path} not found" + _near_file(path))
    scope = {k: g[k] for k in known}
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"config file {path} cannot be read ({e.strerror})") from None
    if path.endswith(".pt") or b"\0" in data[:4096]:
        flag = " (a run's folder is named with --out_dir=FOLDER)" if "out_dir" in known else ""
        raise UserError(f"config file {path} is not a Python file of settings but a checkpoint or another binary "
                        f"file{flag}")
    try:
        tree = ast.parse(data, path)
        exec(compile(tree, path, "exec"), scope)
    except KeyboardInterrupt:
        raise
    except SystemExit as e:  # sys.exit() or raise SystemExit: it would end the script without a word
        raise UserError(f"config file {path} exits (SystemExit: {e.code}); a config file only assigns "
                        "settings") from None
    except BaseException as e:  # a config file is user input: any failure in it is a user error
        detail = " ".join(str(e).split())
        raise UserError(f"config file {path}: {type(e).__name__}: {detail}") from None
    assigned = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    updates, ignored = {}, {}
    for name, value in scope.items():
        if name.startswith("_") or isinstance(value, types.ModuleType):
            continue  # builtins, private helpers, imports
        if _same_here(name, value, known):
            ignored[name] = value
            continue
        if name not in known:
            suggestion = _suggest(name, known)
            helper = " (a name of your own, e.g. a loop variable, starts with _ and is left alone)" \
                if suggestion == "--help lists the settings" else ""
            script = os.path.basename(sys.argv[0]) if sys.argv else ""
            if os.path.basename(path).startswith("train_") and script not in ("train.py", ""):  # config/train_*.py
                helper = f" ({path} configures train.py; {script} takes its own settings, e.g. --out_dir=)"
            raise UserError(f"config file {path}: unknown setting '{name}'; {suggestion}{helper}")
        value = _coerce(f"config file {path}: {name}", value, g[name])
        if value != g[name]:
            updates[name] = value
    return updates, assigned & set(known), ignored


_SETTING = re.compile(r"^\s*(\w+)\s*(?::\s*\w+\s*)?=\s*.+?\s+#\s*(.+)$")
_HEADER = re.compile(r"^#\s*(\w[^-].*)$")
_HERE = os.path.dirname(os.path.abspath(__file__))
_SHARED = ("kv/policy.py", "train.py")  # where settings that a script takes over from elsewhere are described


def _described(path, fields=False):
    """(header, name, description) for each `name = value  # description` line of a file, in
    order; header is the last comment line standing alone right above a setting ('' before
    any), so the end of a comment about other code heads no group. Only lines at the margin
    (a script's globals: an indented `temperature=temperature,  # ...` is an argument), or
    indented ones too where fields (a dataclass's fields)."""
    out, header, previous = [], "", ""
    if not path or not os.path.isfile(path):
        return out
    with open(path) as f:
        for line in f:
            m = _SETTING.match(line)
            if m and (fields or not line[:1].isspace()):
                above = _HEADER.match(previous.strip())
                header = above.group(1).strip() if above else header
                out.append((header, m.group(1), m.group(2).strip()))
            previous = line
    return out


def print_help(g, known):
    """The script's docstring, then every setting with its default and description, grouped
    under the comment headers of the script (or of the file that defines it)."""
    print((g.get("__doc__") or "").strip() + "\n\nsettings (override with --name=value, or in a config file):")
    own = [e for e in _described(g.get("__file__")) if e[1] in known]
    order = [name for _, name, _ in own]
    notes = {name: (header, text) for header, name, text in own}
    for where in _SHARED:  # settings a script takes over keep the groups of their own file
        for header, name, text in _described(os.path.join(_HERE, where), fields=where.startswith("kv/")):
            group = "KV cache" if where.startswith("kv/") else header
            notes.setdefault(name, (f"{group} ({where})" if group else where, text))
    shown = None
    for name in order + [k for k in known if k not in order]:
        header, text = notes.get(name, ("", ""))
        if header != shown:
            print(f"\n  {header}:" if header else "")
            shown = header
        print(f"  --{name}={g[name]!r}" + (f"  {text}" if text else ""))


def configure(g, argv=None, echo=None, given=None):
    """Apply config files and --name=value overrides from argv (default sys.argv[1:]) to the
    globals dict g in place; return the settings {name: value}, the snapshot checkpoints save.
    echo: where the "Overriding" lines go (default stdout; sample.py keeps stdout for the text).
    given: a set that receives the names of the settings a flag or a config file set, even to
    their defaults (a resume keeps the checkpoint's value of some settings unless given)."""
    argv = sys.argv[1:] if argv is None else argv
    echo = echo or sys.stdout
    # settings: the plain public globals; a name in capitals is a constant
    known = [k for k, v in g.items() if not k.startswith("_") and not k.isupper() and isinstance(v, PLAIN_TYPES)]
    flagged = {}  # the settings given as --name=value so far: a later config file may not change them
    for arg in argv:
        if arg in ("-h", "--help"):
            print_help(g, known)
            sys.exit(0)
        name, eq, text = arg[2:].partition("=")  # first "=" only: values may hold "="
        if arg.startswith("--") and eq and name:
            if why := _same_here(name, text, known):
                print(f"Ignoring: {name} = {text} ({why})", file=echo)
                continue
            if name == "init_from" and "checkpoint_name" in known:  # (known here, as resume alone)
                raise UserError(f"--init_from={text}: only resume, which is what this script does: "
                                f"{_suggest(name, known)}")
            if name not in known:
                raise UserError(f"unknown setting --{name}; {_suggest(name, known)}")
            updates = {name: _parse(name, text, g[name])}
            flagged[name] = arg
            assigned = {name}
        elif arg.startswith("--") and arg[2:] in known:  # --name value, as argparse takes it
            raise UserError(f"--{arg[2:]} needs its value after '=': --{arg[2:]}=VALUE (no space)")
        elif arg.startswith("--") and name and not eq and _suggest(name, known).startswith("did you mean"):
            raise UserError(f"bad argument '{arg}': expected --name=value; {_suggest(name, known)}")
        elif arg.startswith("-") or ("=" in arg and not os.path.exists(arg)):
            raise UserError(f"bad argument '{arg}': expected --name=value or a config file path")
        else:
            updates, assigned, ignored = _run_config_file(arg, g, known)
            undone = [flagged[n] for n in flagged if n in updates]
            if undone:  # (applying it would silently undo the flag: a run in the wrong --out_dir, say)
                script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0].endswith(".py") else "train.py"
                raise UserError(f"config file {arg} comes after {' '.join(undone)} and sets "
                                f"{', '.join(n.split('=')[0][2:] for n in undone)} too; put config files first "
                                f"so that the flags win: python {script} {arg} {' '.join(undone)} ...")
            print(f"Overriding config with {arg}:", file=echo)
            for name, value in ignored.items():
                print(f"Ignoring: {name} = {value!r} ({_same_here(name, value, known)})", file=echo)
        if given is not None:
            given |= assigned
        for name, value in updates.items():
            shown = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") \
                if isinstance(value, str) else value  # (bytes of the command line that are not UTF-8: \xNN)
            print(f"Overriding: {name} = {shown}", file=echo)
            g[name] = value
    return {k: g[k] for k in known}
