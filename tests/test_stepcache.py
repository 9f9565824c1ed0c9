"""stepcache.py: a decode step compiled ahead is compiled once, then reused by later decoders
of its kind in the process and loaded by later runs; each against the eager caches' logits.
A step whose guards fail on the new decoder's arguments, or a file that cannot be read, is
compiled again; the hash changes with the project's sources."""

import os
import runpy
import shutil

import pytest
import torch

import stepcache
from conftest import REPO_ROOT, text, tiny
from generate import SLOTS_STEP, StaticDecoder
from kv.policy import KVOptions

KV = dict(kv_window=8, kv_sink=2)  # a ring with sinks: the cheapest step to compile that wraps


def assert_eager_logits(model, kv, dec, L=30):
    """dec gives the eager caches' logits at every step of a text (its own caches, from empty)."""
    x = text(B=1, T=L, seed=3)
    caches = kv.make_caches(model, 1, capacity=L)
    dec.start()
    with torch.no_grad():
        for t in range(L):
            want, _ = model(x[:, t:t + 1], caches)
            torch.testing.assert_close(dec(x[:, t:t + 1]), want[:, -1], atol=1e-4, rtol=1e-5)


def files():
    return sorted(os.listdir(stepcache.folder())) if os.path.isdir(stepcache.folder()) else []


@pytest.mark.slow
def test_a_step_is_compiled_once_then_reused_and_loaded(monkeypatch):
    """The first decoder compiles and saves its step; a second of the kind in the process reuses
    it (for a text of another length too, within SLOTS_STEP); after the process's steps are forgotten (a later run), a third loads the file. A
    decoder of another batch size does not take the saved step (its guards fail), a file
    that cannot be read is compiled again and rewritten, and another user's file is not
    loaded. Every one gives the eager logits."""
    model = tiny(n_kv_head=2)
    kv = KVOptions(**KV).check()
    first = StaticDecoder(model, kv, 1, 30)
    assert StaticDecoder(model, kv, 1, 35).step is first.step  # another text length, the same buffers
    assert first.compiled and first.origin == "compiled" and first.unguarded
    [saved] = files()
    again = StaticDecoder(model, kv, 1, 30)
    assert again.origin == "reused" and again.step is first.step
    stepcache.forget()
    os.utime(os.path.join(stepcache.folder(), saved), (1, 1))
    later = StaticDecoder(model, kv, 1, 30)
    assert later.origin == "loaded" and later.step is not first.step and later.unguarded
    assert os.path.getmtime(os.path.join(stepcache.folder(), saved)) > 1  # a load counts as a use
    assert "loaded the decode step" in later.compile_line()
    for dec in (first, again, later):
        assert_eager_logits(model, kv, dec)

    k = saved[:-len(".bin")]
    with torch.no_grad():
        assert stepcache.find(k, StaticDecoder(model, kv, 1, 30, compile=False).args) is later.step
        assert stepcache.find(k, StaticDecoder(model, kv, 2, 30, compile=False).args) is None  # guards: batch 2
        # capacities are rounded up to whole SLOTS_STEP: 31 and 30 share the step, 65 does not
        assert stepcache.find(k, StaticDecoder(model, kv, 1, 31, compile=False).args) is later.step
        assert stepcache.find(k, StaticDecoder(model, kv, 1, SLOTS_STEP + 1, compile=False).args) is None
        assert stepcache.find(k, StaticDecoder(tiny(n_kv_head=1), kv, 1, 30, compile=False).args) is None

    path = os.path.join(stepcache.folder(), saved)
    with open(path, "wb") as f:
        f.write(b"not a compiled function")
    stepcache.forget()
    with torch.no_grad():
        assert stepcache.find(k, later.args) is None
    fresh = StaticDecoder(model, kv, 1, 30)
    assert fresh.origin == "compiled"
    assert_eager_logits(model, kv, fresh)
    stepcache.forget()
    with torch.no_grad():
        if hasattr(os, "getuid"):  # a file of another user's is code this user never ran: not loaded
            uid = os.getuid()
            with monkeypatch.context() as m:
                m.setattr(stepcache.os, "getuid", lambda: uid + 1)
                assert stepcache.find(k, later.args) is None
        assert stepcache.find(k, later.args) is not None  # rewritten whole


def test_the_folder_is_pruned_least_recently_used_first(tmp_path, monkeypatch):
    """Past MAX_BYTES, the steps used longest ago go first; the one just saved stays whatever its
    size, and files that are not steps are never touched."""
    monkeypatch.setattr(stepcache, "MAX_BYTES", 250)
    names = {}
    for age, letter in enumerate("abcde"):  # a: used last; e: used first
        names[letter] = letter * 40 + ".bin"
        (tmp_path / names[letter]).write_bytes(b"x" * 100)
        os.utime(tmp_path / names[letter], (1000 - age, 1000 - age))
    (tmp_path / "notes.txt").write_bytes(b"x" * 1000)
    (tmp_path / ("f" * 40 + ".bin")).write_bytes(b"x" * 100)  # the one just saved: the oldest of all
    os.utime(tmp_path / ("f" * 40 + ".bin"), (1, 1))
    stepcache.prune(str(tmp_path), keep="f" * 40 + ".bin")
    assert sorted(os.listdir(tmp_path)) == sorted([names["a"], "f" * 40 + ".bin", "notes.txt"])
    monkeypatch.setattr(stepcache, "MAX_BYTES", 50)
    stepcache.prune(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_a_folder_that_cannot_hold_the_steps_is_said_once(tmp_path, monkeypatch, capsys):
    """DECODE_STEP_CACHE naming a file (no folder can be made there): the step is kept in the
    process and a note says, once, that later runs compile it again; a writable folder gets the
    file and no note."""
    class Step:  # what keep() asks of a compiled function: serialize(f).serialized_data
        @staticmethod
        def serialize(f):
            return type("Saved", (), {"serialized_data": b"step"})()
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("DECODE_STEP_CACHE", str(blocker))
    monkeypatch.setattr(stepcache, "_HERE", {})
    monkeypatch.setattr(stepcache, "_UNSAVED", set())
    for k in ("1" * 40, "2" * 40):
        stepcache.keep(k, Step())
    err = capsys.readouterr().err
    assert err.count(f"note: the compiled decode step cannot be saved in {blocker} (") == 1, err
    assert "later runs compile it again" in err and blocker.read_text() == "x"
    assert stepcache._HERE["1" * 40] is not None  # kept for this process all the same
    monkeypatch.setenv("DECODE_STEP_CACHE", str(tmp_path / "steps"))
    stepcache.keep("3" * 40, Step())
    assert capsys.readouterr().err == "" and (tmp_path / "steps" / ("3" * 40 + ".bin")).read_bytes() == b"step"


def test_nothing_is_written_where_the_cache_is_turned_off(monkeypatch):
    """DECODE_STEP_CACHE= (empty): steps are kept in the process only."""
    monkeypatch.setenv("DECODE_STEP_CACHE", "")
    assert stepcache.folder() is None
    with torch.no_grad():
        assert stepcache.find("0" * 40, ()) is None
    monkeypatch.setenv("DECODE_STEP_CACHE", "/some/where")
    assert stepcache.folder() == "/some/where"


def test_the_hash_changes_with_the_project_sources(tmp_path):
    """A step saved before an edit of any of the project's .py files is never loaded after it."""
    for name in os.listdir(REPO_ROOT):
        if name.endswith(".py"):
            shutil.copy(os.path.join(REPO_ROOT, name), tmp_path / name)
    shutil.copytree(os.path.join(REPO_ROOT, "kv"), tmp_path / "kv", ignore=shutil.ignore_patterns("__pycache__"))
    key = lambda: runpy.run_path(str(tmp_path / "stepcache.py"))["key"]("a step")
    before = key()
    assert key() == before and before != stepcache.key("another step")
    with open(tmp_path / "kv" / "static.py", "a") as f:
        f.write("\n# an edit\n")
    assert key() != before
