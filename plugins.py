"""
A user's plug-ins (--attention, --kv_trim, --kv_evict, --kv_quant, --xl_update given as
package.module:function or path/to/file.py:function): importing one, and turning an exception
that passed through one into a UserError that names the setting and shows the plug-in's own
lines; telling an exercise stub that still raises NotImplementedError from an operation
PyTorch lacks (unwritten).

    python -c "import plugins; print(plugins.import_function('attention:naive_attention', 'attention'))"
"""
import os
import sys

from utils import UserError

_HERE = os.path.dirname(os.path.abspath(__file__))
_OWN = (_HERE, os.path.join(_HERE, "kv"))  # the folders of the project's own modules
_PLUGINS = {}  # the file of each user's plug-in module imported -> (setting, "package.module:function")
_PLUGIN_FUNCTIONS = {}  # (setting, "package.module:function") -> its function, each once, the latest resolved last
# how each setting's plug-in is called (README.md and exercises/README.md say what it must do)
PLUGIN_CALLS = {"attention": "(q, k, v, mask, dropout_p)", "kv_trim": "(k, v, pos, kv_window, kv_sink)",
                "kv_evict": "(scores, pos, seen, kv_sink, kv_recent)", "kv_quant": "(x)",
                "xl_update": "(mem_k, mem_v, mem_ok, k, v, mem_len)"}


def import_function(spec, option):
    """The function named by "package.module:function" (a user's plug-in), or a UserError;
    if the module fails to import, the error says why and shows the lines of its file."""
    import importlib
    import importlib.util
    mod_name, _, fn_name = spec.rpartition(":")  # (the last colon: a Windows path holds one)
    if not mod_name or not fn_name or is_file_name(fn_name):  # (C:\x\trim.py: a path without its function)
        raise UserError(f"--{option}={spec!r}: expected package.module:function (or path/to/file.py:function)")
    if is_file_name(mod_name):

        def refuse(message):
            raise UserError(message)

        mod_name = module_of_file(mod_name, refuse, f"--{option}")
    ours = mod_name in sys.modules  # imported already, before any plug-in: one of the project's own modules
    here, top = os.getcwd(), mod_name.split(".")[0]
    if here not in sys.path:  # a script's sys.path starts at its own folder, not the one you run in;
        sys.path.append(here)  # last, so that a file of yours never hides one of the project's
    mine = [p for p in (os.path.join(here, top + ".py"), os.path.join(here, top)) if os.path.exists(p)]
    theirs = importlib.util.find_spec(top) if top not in sys.modules else sys.modules[top].__spec__
    if mine and theirs is not None and theirs.origin and \
            not os.path.abspath(theirs.origin).startswith(os.path.abspath(mine[0])):
        raise UserError(f"--{option}={spec}: your {os.path.basename(mine[0])} here is hidden by a module named "
                        f"{top!r} that already exists ({theirs.origin}); rename your file")
    try:
        module = importlib.import_module(mod_name)
    except Exception as e:  # a plug-in is user code: any failure in it is the user's to fix
        if isinstance(e, ModuleNotFoundError) and e.name and (mod_name + ".").startswith(e.name + "."):
            raise UserError(f"--{option}={spec}: no module named {e.name!r} (check the spelling; "
                            "the module must be importable from the folder you run in)") from None
        raise UserError(f"--{option}={spec} failed to import: {_one_line(e)}",
                        _frames_in(e, _module_file(mod_name))) from None
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise UserError(f"--{option}={spec}: module {mod_name} has no {fn_name!r}")
    if not callable(fn):
        raise UserError(f"--{option}={spec!r} is not a function")
    # one of the project's own modules used as a plug-in (kv.cache:keep_recent) is no user's
    # file: an error passing through it (every cache calls attention) is not that plug-in's.
    # (A user's file beside train.py is imported here first; exercises/ is the student's.)
    path = os.path.abspath(getattr(module, "__file__", None) or "")
    if path and not (ours and os.path.dirname(path) in _OWN):
        _PLUGINS[path] = (option, spec)
    _PLUGIN_FUNCTIONS.pop((option, spec), None)
    _PLUGIN_FUNCTIONS[option, spec] = fn
    return fn


def is_file_name(name):
    """Whether a plug-in's module is given as the path of its file (mywork/trim.py)."""
    return name.endswith(".py") or "/" in name or os.sep in name


def module_of_file(path, error, flag="--module"):
    """The module name a plug-in's file (path/to/file.py) imports as, its folder added to
    sys.path; error(message) when the file is missing or its name is taken by another module."""
    import importlib.util
    path = os.path.expanduser(path)  # (the shell leaves ~ alone after --name=)
    if not os.path.isfile(path):
        if os.path.isfile(path + ".py"):
            error(f"{flag}={path}: no such file; did you mean {flag}={path}.py?")
        what = "a folder" if os.path.isdir(path) else "no such file"
        error(f"{flag}={path}: {what}; give a file (mywork/trim.py) or a module name (mywork.trim)")
    if not path.endswith(".py"):  # (Python imports a module's file by its .py name only)
        error(f"{flag}={path}: not a .py file; a plug-in is Python code in a file named like mywork/trim.py "
              "(or give a module name: mywork.trim)")
    folder, name = os.path.split(os.path.abspath(path))
    name = name[:-3]
    if not name.isidentifier():
        error(f"{flag}={path}: {name!r} cannot be a module name; rename the file (letters, digits, _)")
    found = importlib.util.find_spec(name) if name not in sys.modules else sys.modules[name].__spec__
    if found is not None and os.path.abspath(found.origin or "") != os.path.abspath(path):
        error(f"{flag}={path}: a module named {name!r} already exists ({found.origin}); rename your file")
    if folder not in sys.path:
        sys.path.append(folder)  # (last: the user's other files never shadow the project's modules)
    return name


def plugin_error(e):
    """A UserError for exception e if it passed through a user's plug-in (which setting,
    which plug-in, and the plug-in's own frames), or if it is a TypeError from calling one
    with arguments its signature does not take; else None."""
    import traceback
    frames = [f for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename) in _PLUGINS]
    if not frames:
        return call_error(e)
    option, spec = _PLUGINS[os.path.abspath(frames[-1].filename)]
    return UserError(f"--{option}={spec} failed: {_one_line(e)}", _frames_in(e, frames[-1].filename))


def not_finite(what):
    """A UserError for scores or losses that came out nan or inf: it names the plug-ins loaded
    (the likely cause), else the checkpoint."""
    used = [f"--{option}={spec}" for option, spec in _PLUGIN_FUNCTIONS]
    why = (f"check {', '.join(used)}: a plug-in that returns nan or inf (a zero scale, a division by zero) "
           "makes them" if used else "the checkpoint's weights may hold them (a run that diverged): try another")
    return UserError(f"{what} came out nan or inf; {why}")


def call_error(e):
    """A UserError for a TypeError raised where a plug-in is called, before any line of it
    runs ("attn() takes 2 positional arguments but 5 were given"), or None. The message
    starts with the function's name, which is how the plug-in is recognised."""
    if not isinstance(e, TypeError):
        return None
    for (option, spec), fn in reversed(_PLUGIN_FUNCTIONS.items()):  # the latest first
        name = getattr(fn, "__qualname__", None)
        if name and str(e).startswith(f"{name}()"):
            call = PLUGIN_CALLS.get(option)
            how = f"; it is called as {spec.partition(':')[2]}{call}" if call else ""
            return UserError(f"--{option}={spec} cannot be called: {_one_line(e)}{how}", _definition(fn))
    return None


def _definition(fn):
    """The traceback-style lines of where a function is defined (its def line), or []."""
    import linecache
    code = getattr(fn, "__code__", None)
    if code is None:
        return []
    line = linecache.getline(code.co_filename, code.co_firstlineno).strip()
    return [f'  File "{code.co_filename}", line {code.co_firstlineno}, in {fn.__name__}', f"    {line}"]


def _one_line(e):
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def _module_file(mod_name):
    import importlib.util
    try:
        spec = importlib.util.find_spec(mod_name)
    except Exception:  # its package failed to import too
        return None
    return spec.origin if spec is not None else None


def _frames_in(e, path):
    """The traceback lines of exception e that lie in the file path (a syntax error: its line)."""
    import traceback
    if path is None:
        return []
    path = os.path.abspath(path)
    if isinstance(e, SyntaxError) and e.filename and os.path.abspath(e.filename) == path:
        return [f'  File "{e.filename}", line {e.lineno}', f"    {(e.text or '').strip()}"]
    frames = [f for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename) == path]
    return "".join(traceback.format_list(frames)).rstrip("\n").splitlines()


def unwritten(e):
    """Whether NotImplementedError e is a function left unwritten: raised by a `raise` line of
    Python code outside the installed packages (an exercise stub), not by an operation PyTorch
    lacks for a dtype (`"bitwise_or_cpu" not implemented for 'Float'`), which is a bug to show."""
    import linecache
    import traceback
    import torch
    if not isinstance(e, NotImplementedError) or e.__traceback__ is None:
        return False
    frame = traceback.extract_tb(e.__traceback__)[-1]
    installed = (os.path.dirname(torch.__file__) + os.sep, "site-packages", "dist-packages")
    if any(part in os.path.abspath(frame.filename) for part in installed):
        return False
    return linecache.getline(frame.filename, frame.lineno).lstrip().startswith("raise")


def unwritten_message(e):
    """The one line for NotImplementedError e raised by a `raise` line (see unwritten): an
    exercise stub's own text and its checker; or, for a method of the project's that a class
    must define (Cache.size_bits), which method, where, and that a subclass lacks it."""
    import traceback
    frame = traceback.extract_tb(e.__traceback__)[-1]
    path = os.path.abspath(frame.filename)
    exercise = stub_exercise(e)
    if exercise == "all" and path.startswith(os.path.dirname(os.path.abspath(__file__)) + os.sep):
        return (f"not implemented: {frame.name} ({os.path.relpath(path)}:{frame.lineno}) raises NotImplementedError"
                f"{': ' + str(e) if str(e) else ''}; a class built on it must define {frame.name} itself")
    return f"not implemented yet: {e or frame.name} (python -m exercises.check {exercise} shows what is missing)"


def stub_exercise(e):
    """The exercise whose stub raised e (kv_window for exercises/kv_window.py), else "all"."""
    import traceback
    path = traceback.extract_tb(e.__traceback__)[-1].filename
    folder, name = os.path.split(os.path.splitext(path)[0])
    return name if os.path.basename(folder) == "exercises" else "all"
