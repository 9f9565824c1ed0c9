"""
Shared test helpers. Tests run on the CPU in seconds, on small text written into tmp_path.

    python -m pytest -q -n 2 tests              # everything, in two worker processes (pytest-xdist)
    python -m pytest -q -m "not slow" tests     # without torchrun and the longer training runs

Test modules import what they need from here (`from conftest import tiny, text, feed`);
no test module imports another.
"""
import contextlib
import functools
import io
import os
import random
import runpy
import signal
import subprocess
import sys
from unittest import mock

import pytest
import torch

# tiny models run fastest on one thread, and the test machines have two cores; the scripts
# run in this process choose their threads by OMP_NUM_THREADS (devices.pick_threads), not by
# the machine's load, so a result never depends on how busy the machine was
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

# the Ctrl-C tests need Ctrl-C to arrive: a runner that starts pytest in the background of a
# script (`&`) hands it SIGINT ignored, which Python and every script run from here would keep
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(REPO_ROOT, "..", "shared", "data")  # real corpora, on some machines
sys.path.insert(0, REPO_ROOT)  # so tests can import the repo's modules

from kv.policy import KVOptions  # noqa: E402 (needs the repo on sys.path)
from model import GPT, GPTConfig  # noqa: E402
from rope import rope_table  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)  # float32 rounding: the same computation in another order


@pytest.fixture(autouse=True)
def _compile_failures_stay_in_their_test(monkeypatch):
    """utils.compile_or_eager remembers a failed compile for the rest of the process: a test
    that makes one fail must not turn the compiled paths of later tests eager."""
    import utils
    monkeypatch.setattr(utils, "_COMPILE_FAILED", {})


@pytest.fixture(autouse=True)
def _compiled_steps_stay_in_their_test(monkeypatch, tmp_path):
    """stepcache.py keeps compiled decode steps, in the process and on disk, for later runs:
    each test starts with none (the scripts it runs too), so what it compiles and prints does
    not depend on the tests that ran before it."""
    import stepcache
    stepcache.forget()
    monkeypatch.setenv("DECODE_STEP_CACHE", str(tmp_path / "decode_steps"))
    yield
    stepcache.forget()


WORDS = ("the a king queen sword night day love death crown heart blood friend lord lady "
         "speaks holds sees keeps gives takes fair dark noble gentle old young and but with "
         "of to in upon my thy his her our what why when where thou thee good ill").split()


# -- models and their inputs ------------------------------------------------------------------

def tiny(**kw):
    """A small untrained model in eval mode, the same weights every call: 2 layers, 4 heads of
    8 channels, no biases; kw overrides GPTConfig fields."""
    torch.manual_seed(0)
    args = dict(n_layer=2, n_head=4, n_embd=32, bias=False)
    args.update(kw)
    return GPT(GPTConfig(**args)).eval()


def text(B=2, T=40, seed=1):
    """Random bytes (B, T), the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, T), generator=g)


def feed(model, idx, step, kv=None, capacity=4):
    """Logits of idx fed `step` tokens at a time through one set of caches made by kv
    (KVOptions; default the plain unbounded cache, its buffer made small so it has to grow).
    Returns (logits (B, T, V), caches)."""
    kv = kv or KVOptions(kv_window=0)
    caches = kv.make_caches(model, idx.size(0), capacity=capacity)
    out = []
    for a in range(0, idx.size(1), step):
        logits, caches = model(idx[:, a:a + step], caches)
        out.append(logits)
    return torch.cat(out, dim=1), caches


def forward_at(model, idx, pos):
    """A cacheless forward of idx (B, T) with its tokens at the text positions pos (T,): the
    reference for a cache that keeps only some tokens (each at its own position)."""
    rot = rope_table(model.transformer.h[0].attn.rotary_emb.freqs, pos) if model.config.rope else None
    return model._blocks(idx, pos, rot, None)


def save_tiny_checkpoint(folder):
    """folder/ckpt.pt of a tiny untrained model (2 layers, 2 heads of 16 channels), as train.py
    writes it; returns folder."""
    from checkpoint import save_checkpoint
    from model import MODEL_ARG_KEYS
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, bias=False))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    args = {k: getattr(model.config, k) for k in MODEL_ARG_KEYS}
    save_checkpoint(str(folder / "ckpt.pt"), model, optimizer, args, {"n_layer": 2}, 10, 5.0)
    return folder


# -- text on disk ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def tiny_corpus(n_bytes=200_000, seed=0):
    """Deterministic English-ish text: short sentences, speakers and line breaks, ASCII only."""
    rng = random.Random(seed)
    parts, size = [], 0
    while size < n_bytes:
        words = rng.choices(WORDS, k=rng.randint(3, 12))
        line = " ".join(words).capitalize() + rng.choice(".!?,;")
        if rng.random() < 0.2:
            line = "\n" + rng.choice(WORDS).upper() + ":\n" + line
        parts.append(line + "\n")
        size += len(parts[-1])
    return "".join(parts)[:n_bytes].encode("ascii")


def write_splits(folder, data):
    """train.txt (the first 90% of data) and val.txt (the rest) in folder, as prepare.py splits."""
    n = int(len(data) * 0.9)
    (folder / "train.txt").write_bytes(data[:n])
    (folder / "val.txt").write_bytes(data[n:])
    return folder


@pytest.fixture
def tiny_data_dir(tmp_path):
    """A dataset directory (pass it as --dataset=...) with input.txt, train.txt and val.txt."""
    (tmp_path / "input.txt").write_bytes(tiny_corpus())
    return write_splits(tmp_path, tiny_corpus())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Like tiny_data_dir (train.txt and val.txt only), shared by the tests of a module."""
    return write_splits(tmp_path_factory.mktemp("data"), tiny_corpus())


# -- the scripts -------------------------------------------------------------------------------

# train.py settings of a tiny run on the CPU, a few seconds per handful of iterations
TINY = ["--device=cpu", "--dtype=float32", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
        "--batch_size=4", "--eval_iters=2", "--eval_interval=4", "--log_interval=2",
        "--warmup_iters=2", "--lr_decay_iters=20", "--reset_prob=0.3", "--dropout=0.0"]


def train(data_dir, out_dir, *args):
    """Run train.py with TINY settings in this process (no new interpreter to start, and the
    loader can be monkeypatched); returns what it printed."""
    argv = ["train.py", *TINY, f"--dataset={data_dir}", f"--out_dir={out_dir}", *args]
    printed = io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only wait for each other on a busy machine
    try:
        with mock.patch.object(sys, "argv", argv), contextlib.redirect_stdout(printed):
            runpy.run_path(os.path.join(REPO_ROOT, "train.py"), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    return printed.getvalue()


def run_in_process(script, *args):
    """Run `python script args...` inside this process (no new interpreter to start); returns
    (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code, threads = 0, torch.get_num_threads()  # a script may choose its own threads: this process keeps its
    with mock.patch.object(sys, "argv", [script, *map(str, args)]), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(os.path.join(REPO_ROOT, script), run_name="__main__")
        except SystemExit as e:
            code = e.code
        finally:
            torch.set_num_threads(threads)
    return code, out.getvalue(), err.getvalue()


def run_script(script, *args, timeout=120, cwd=REPO_ROOT):
    """Run `python script args...` from the repo root; returns the CompletedProcess (text)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")  # the test machines have few cores
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_user_error(proc, *fragments):
    """A script failed the friendly way: non-zero exit, one line on stderr, no traceback."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# correct answers to the exercises (the student's files), which the checker tests run as they are
# and edit into the wrong answers a student could write
TRIM_OK = """
    import torch
    def keep_recent(k, v, pos, kv_window, kv_sink=0):
        keep = (pos >= pos[-1] - kv_window + 1) | (pos < kv_sink)
        return k[:, :, keep], v[:, :, keep], pos[keep]
    """
XL_OK = """
    import torch
    def xl_step(mem_k, mem_v, mem_ok, k, v, mem_len):
        keys, vals = torch.cat([mem_k, k], 2), torch.cat([mem_v, v], 2)
        ok = torch.cat([mem_ok, mem_ok.new_ones(mem_ok.size(0), k.size(2))], 1)
        return keys, vals, ok, keys[:, :, -mem_len:].detach(), vals[:, :, -mem_len:].detach(), ok[:, -mem_len:]
    """
LINEAR_OK = """
    import torch
    import torch.nn.functional as F
    def attention(q, k, v, mask, dropout_p):
        dtype, q, k, v = q.dtype, q.float(), k.float(), v.float()
        att = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-2, -1) * mask
        return ((att @ v) / (att.sum(-1, keepdim=True) + 1e-6)).to(dtype)   # the paper's denominator
    def recurrent_step(q, k, v, S, z):
        nums, dens = [], []
        for t in range(q.size(2)):
            S += k[:, :, t, :, None] * v[:, :, t, None, :]
            z += k[:, :, t]
            nums.append(torch.einsum("bhd,bhde->bhe", q[:, :, t], S))
            dens.append((q[:, :, t] * z).sum(-1, keepdim=True))
        return torch.stack(nums, 2), torch.stack(dens, 2)
    """
INT8_OK = """
    import torch
    def quantize(x):
        scale = (x.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-8)
        return (torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale.half().clamp(min=2 ** -24)), dequantize
    def dequantize(codes, scale):
        return codes.float() * scale.float()
    """
INT4_OK = """
    import torch
    def quantize(x):
        g = x.unflatten(-1, (-1, min(32, x.size(-1))))   # groups of 32 channels (16 for heads of 16)
        lo, hi = g.aminmax(dim=-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        codes = torch.round((g - lo) / scale).clamp(0, 15).to(torch.uint8).flatten(-2)
        low, high = codes.unflatten(-1, (2, -1)).unbind(-2)
        return (low | (high << 4), scale.squeeze(-1).half().clamp(min=2 ** -24), lo.squeeze(-1).half()), dequantize
    def dequantize(packed, scale, zero):
        codes = torch.cat([packed & 15, packed >> 4], -1).float().unflatten(-1, (scale.size(-1), -1))
        return (codes * scale.float()[..., None] + zero.float()[..., None]).flatten(-2)
    """
H2O_OK = """
    import torch
    def priority(scores, pos, seen, kv_sink, kv_recent):
        keep = (pos < kv_sink) | (pos >= seen - kv_recent)
        return torch.where(keep, float("inf"), scores / (seen - pos))   # attention per query, not in total
    """


@pytest.fixture
def exercise_checks(tmp_path, monkeypatch):
    """exercise_checks(exercise, source, slow=False): the checks of exercises/check.py run on a
    solution written from source (indented text is fine); returns ([(check title, status,
    message)], the printed report). slow=False skips the checks that train or run a model."""
    import importlib
    import textwrap
    from exercises import check
    monkeypatch.syspath_prepend(str(tmp_path))
    count = iter(range(10 ** 6))

    def run(exercise, source, slow=False):
        name = f"solution_{exercise}_{next(count)}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        importlib.invalidate_caches()
        printed = []
        try:
            results = check.run_exercise(check.EXERCISES[exercise], module=name, out=printed.append,
                                         skip_slow=not slow)
        finally:
            sys.modules.pop(name, None)
        return results, "\n".join(printed)

    def wrong_fails_first(entry):
        """entry = (exercise, source, title, words[, slow]): the first failing check is `title`,
        its message holds `words` and a README rule, and nothing prints a traceback."""
        exercise, source, title, words, *slow = entry
        results, printed = run(exercise, source, slow=bool(slow and slow[0]))
        failed = [(t, msg) for t, status, msg in results if status == "FAIL"]
        assert failed and failed[0][0] == title, printed
        assert words in failed[0][1] and "see exercises/README.md, 'Assignment" in failed[0][1], printed
        assert "Traceback" not in printed

    def correct_passes(entry, slow=True):
        """entry = (exercise, source): every check passes."""
        results, printed = run(*entry, slow=slow)
        assert {status for _, status, _ in results} == {"PASS"}, printed

    run.wrong_fails_first, run.correct_passes = wrong_fails_first, correct_passes
    return run
