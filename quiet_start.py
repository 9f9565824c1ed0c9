"""
Ctrl-C while a script is still starting (importing torch takes seconds): the process ends at
once with exit status 130, as a shell reports Ctrl-C, instead of printing a traceback from
inside an import, or carrying on when an import swallowed the interrupt. Nothing has been
written by then, so nothing is lost. A script imports this module before the slow imports and
calls done() after them, when Ctrl-C is its own to handle again:

    import quiet_start  # first
    import torch
    ...
    quiet_start.done()
"""
import os
import signal
import threading

_previous = None
# (only where Ctrl-C has Python's default meaning: a process started with it ignored, e.g.
# by `&` in a script, keeps ignoring it, and so does a thread that is not the main one)
if threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    _previous = signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))


def done():
    """The imports are over: Ctrl-C raises KeyboardInterrupt again (the scripts' run_main and
    train.py's loop handle it)."""
    global _previous
    if _previous is not None:
        signal.signal(signal.SIGINT, _previous)
        _previous = None
