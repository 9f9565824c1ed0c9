"""
Shared test helpers. Tests run on the CPU in seconds, on small text written into tmp_path.

    python -m pytest -q tests
"""
import functools
import os
import random
import subprocess
import sys

import pytest
import torch

# tiny models run fastest on one thread, and the test machines have two cores
torch.set_num_threads(1)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(REPO_ROOT, "..", "shared", "data")  # real corpora, on some machines
sys.path.insert(0, REPO_ROOT)  # so tests can import the repo's modules

WORDS = ("the a king queen sword night day love death crown heart blood friend lord lady "
         "speaks holds sees keeps gives takes fair dark noble gentle old young and but with "
         "of to in upon my thy his her our what why when where thou thee good ill").split()


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


@pytest.fixture
def tiny_data_dir(tmp_path):
    """A dataset directory (pass it as --dataset=...) with input.txt, train.txt and val.txt."""
    data = tiny_corpus()
    n = int(len(data) * 0.9)
    (tmp_path / "input.txt").write_bytes(data)
    (tmp_path / "train.txt").write_bytes(data[:n])
    (tmp_path / "val.txt").write_bytes(data[n:])
    return tmp_path


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
