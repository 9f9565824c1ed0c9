"""
sample.py: streams text from a checkpoint, reports speed and KV cache size, decodes UTF-8
across token boundaries, and fails with one line for each user mistake.

    python -m pytest -q tests/test_sample.py
"""
import contextlib
import io
import os
import runpy
import sys
from unittest import mock

import pytest
import torch

import generate
from conftest import REPO_ROOT, save_tiny_checkpoint, assert_user_error, run_script


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    """A folder holding ckpt.pt of a tiny untrained model, as train.py writes it."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("out"))


def sample(*args):
    """Run sample.py in this process; returns (exit code, stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    with mock.patch.object(sys, "argv", ["sample.py", "--device=cpu", *map(str, args)]), \
            contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            runpy.run_path(os.path.join(REPO_ROOT, "sample.py"), run_name="__main__")
        except SystemExit as e:
            code = e.code
    return code, stdout.getvalue(), stderr.getvalue()


def test_samples_from_a_checkpoint(out_dir, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes("Dobrý den, ".encode() + b"\xff")  # UTF-8, then a byte that is not
    proc = run_script("sample.py", f"--out_dir={out_dir}", "--device=cpu", f"--start=FILE:{prompt}",
                      "--num_samples=2", "--max_new_tokens=40", "--seed=3")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("Dobrý den, \\xff") == 2  # each sample starts with its prompt
    assert "---------------" in proc.stdout
    assert "tokens/s" in proc.stderr
    # float32 K and V, 2 layers x 32 channels each: 2 * 2 * 32 * 32 bits per cached token
    assert "4,096 bits per cached token" in proc.stderr


def test_a_prompt_that_names_a_file_without_FILE_says_how_to_read_it(out_dir, tmp_path, monkeypatch):
    """--start=prompt.txt (or file:prompt.txt) is the text itself, which a note says when such a
    file exists; FILE:~/... reads the file in the home folder; bytes that are not UTF-8 are
    echoed as \\xNN, as the text shows them."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompt.txt").write_bytes(b"ROMEO:")
    for given in ("prompt.txt", "file:prompt.txt"):
        code, out, err = sample(f"--out_dir={out_dir}", f"--start={given}", "--max_new_tokens=2")
        assert code in (0, None) and out.startswith(given), err
        assert f"the prompt is the text {given!r} itself; to read the file: --start=FILE:prompt.txt" in err
    code, out, err = sample(f"--out_dir={out_dir}", "--start=prompt", "--max_new_tokens=2")
    assert "note: the prompt" not in err
    monkeypatch.setenv("HOME", str(tmp_path))
    code, out, err = sample(f"--out_dir={out_dir}", "--start=FILE:~/prompt.txt", "--max_new_tokens=2")
    assert code in (0, None) and out.startswith("ROMEO:"), err
    code, out, err = sample(f"--out_dir={out_dir}", "--start=ab" + b"\xff".decode("utf-8", "surrogateescape"),
                            "--max_new_tokens=2")
    assert "Overriding: start = ab\\xff" in err and out.startswith("ab\\xff"), err


def test_a_seed_gives_the_same_samples_again_and_another_seed_others(out_dir):
    """As the README says: the same --seed and --num_samples, the same text; another seed,
    other text."""
    runs = [sample(f"--out_dir={out_dir}", "--num_samples=3", "--max_new_tokens=60", f"--seed={s}")[1]
            for s in (5, 5, 6)]
    assert runs[0] == runs[1] and runs[0] != runs[2] and runs[0].count("---------------") == 2


def test_sample_k_of_several_is_the_one_its_seed_plus_k_draws_alone(out_dir):
    """--num_samples=3 --seed=5: the samples --seed=5, 6 and 7 give alone (more samples only add
    others, as nanoGPT's loop of samples does)."""
    split = lambda out: out.split("---------------\n")
    three = split(sample(f"--out_dir={out_dir}", "--num_samples=3", "--max_new_tokens=40", "--seed=5")[1])
    alone = [split(sample(f"--out_dir={out_dir}", "--max_new_tokens=40", f"--seed={5 + k}")[1])[0] for k in range(3)]
    assert three == alone and len(set(three)) == 3


@pytest.mark.parametrize("quant", [["--kv_quant=int8"], ["--kv_quant=int4", "--kv_quant_group=8"]], ids=["int8", "int4"])
def test_a_quantized_cache_too_short_to_quantize_says_it_saves_nothing(out_dir, quant):
    """20 new bytes, and a residual of 32 full-precision tokens: the quantized cache holds as
    many bits as the plain one, and a note says so and what quantizes every token; with that
    advice it holds fewer bits, and no note."""
    peak = lambda err: int(err.split("KV cache peak ")[1].split(" bits")[0].replace(",", ""))
    common = [f"--out_dir={out_dir}", "--max_new_tokens=20"]
    _, _, plain = sample(*common)
    code, _, err = sample(*common, *quant)
    assert code in (0, None) and peak(err) == peak(plain), err
    advice = err.split("so it saves nothing here; ")[1].split(" quantizes every token")[0].split()
    code, _, err = sample(*common, *quant, *advice)
    assert code in (0, None) and peak(err) < peak(plain) and "saves nothing" not in err, err


def test_an_eviction_cache_says_its_peak_was_the_prompt(out_dir, tmp_path):
    """H2O holds a long prompt whole until the first decode step evicts down to the budget:
    the peak says so, and the decode steps' peak is the budget's size (4,096 bits a token)."""
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(b"abc" * 100)
    code, _, err = sample(f"--out_dir={out_dir}", f"--start=FILE:{prompt}", "--kv_evict=h2o", "--kv_budget=8",
                          "--max_new_tokens=5")
    assert code in (0, None), err
    assert f"KV cache peak {300 * 4096:,} bits per sample" in err
    assert "the peak is the 300-byte prompt" in err and f"held at most {8 * 4096:,} bits" in err
    code, _, err = sample(f"--out_dir={out_dir}", f"--start=FILE:{prompt}", "--kv_window=8", "--max_new_tokens=5")
    assert f"KV cache peak {8 * 4096:,} bits per sample" in err and "the peak is the" not in err


def test_streams_whole_characters(out_dir, monkeypatch):
    """Bytes are printed as they come, but never half a character; bad bytes are escaped."""
    payload = "é€".encode() + b"\xff" + "ž".encode()[:1]  # ends inside a character
    seen = []  # what had been printed when each token was produced

    def fake_stream(model, idx, max_new_tokens, stats=None, **kw):
        for b in payload:
            seen.append(sys.stdout.getvalue())
            yield torch.tensor([[b]])
        stats.update(kv_bits_peak=123, kv_bits_per_token=4.5)

    monkeypatch.setattr(generate, "generate_stream", fake_stream)
    code, out, err = sample(f"--out_dir={out_dir}", f"--max_new_tokens={len(payload)}")
    assert code == 0, err
    assert out == "####é€\\xff\\xc5\n"  # the text alone: the "Overriding: ..." lines go to stderr
    assert seen[1] == "####" and seen[2] == "####é"  # é waited for its second byte
    assert "KV cache peak 123 bits" in err


def test_control_bytes_are_shown_escaped(out_dir, monkeypatch):
    """An undertrained model's control bytes (shift-out, NUL, escape) would reach a terminal
    raw: they print as \\xNN, in the first sample and the others; newline and tab stay."""
    payload = b"a\x0e\x00\tb\x1b[2J\n\x7f"

    def fake_stream(model, idx, max_new_tokens, stats=None, **kw):
        for b in payload:
            yield torch.tensor([[b], [b]])  # (B, 1)

    monkeypatch.setattr(generate, "generate_stream", fake_stream)
    code, out, err = sample(f"--out_dir={out_dir}", f"--max_new_tokens={len(payload)}", "--num_samples=2")
    assert code == 0, err
    shown = "a\\x0e\\x00\tb\\x1b[2J\n\\x7f"
    assert out == f"####{shown}\n---------------\n####{shown}\n"


@pytest.mark.parametrize("case", ["no out_dir", "no checkpoint", "no prompt file", "empty prompt",
                                  "empty prompt file", "sink without a window", "trim without a window"])
def test_user_errors_are_one_line(out_dir, tmp_path, case):
    (tmp_path / "empty.txt").write_bytes(b"")
    args, fragments = {
        "no out_dir": ([f"--out_dir={tmp_path / 'nope'}"], ["nope", "does not exist", "python train.py"]),
        "no checkpoint": ([f"--out_dir={out_dir}", "--checkpoint_name=last"], ["last.pt not found", "holds ckpt.pt: name one with --checkpoint_name=ckpt"]),
        "no prompt file": ([f"--out_dir={out_dir}", f"--start=FILE:{tmp_path / 'missing.txt'}"], ["missing.txt"]),
        "empty prompt": ([f"--out_dir={out_dir}", "--start="], ["empty"]),
        "empty prompt file": ([f"--out_dir={out_dir}", f"--start=FILE:{tmp_path / 'empty.txt'}"], ["empty"]),
        "sink without a window": ([f"--out_dir={out_dir}", "--kv_sink=4"], ["kv_sink=4", "--kv_window"]),
        "trim without a window": ([f"--out_dir={out_dir}", "--kv_trim=kv.cache:keep_recent"], ["--kv_window=N"]),
    }[case]
    code, out, err = sample(*args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0]


def test_user_error_as_a_process(out_dir):
    proc = run_script("sample.py", f"--out_dir={out_dir}", "--checkpoint_name=last.pt")
    assert_user_error(proc, "last.pt")


def test_a_kv_trim_that_cannot_be_found_is_said_before_the_prompt(out_dir):
    code, out, err = sample(f"--out_dir={out_dir}", "--kv_window=8", "--kv_trim=exercises.kv_window:nope")
    assert code == 2 and out == "" and "has no 'nope'" in err


def test_a_kv_trim_given_by_its_file_samples_as_the_module_does(out_dir, tmp_path):
    """--kv_trim=path/to/file.py:function: the same text as the same function named as a
    module (kv.cache:keep_recent); a file that is not there is one line."""
    import shutil
    shutil.copy(os.path.join(REPO_ROOT, "kv", "cache.py"), tmp_path / "my_trim.py")
    common = [f"--out_dir={out_dir}", "--kv_window=8", "--max_new_tokens=30", "--temperature=0"]
    code, by_module, err = sample(*common, "--kv_trim=kv.cache:keep_recent")
    assert code in (0, None), err
    code, by_file, err = sample(*common, f"--kv_trim={tmp_path / 'my_trim.py'}:keep_recent")
    assert code in (0, None), err
    assert by_file == by_module and len(by_file) > 30
    code, out, err = sample(*common, f"--kv_trim={tmp_path / 'other.py'}:keep_recent")
    assert code == 2 and out == "" and "other.py: no such file" in err and len(err.strip().splitlines()) == 1


def test_trying_a_kv_trim_first_changes_neither_the_text_nor_what_works(out_dir, tmp_path, monkeypatch):
    """The trial call of a kv_trim plug-in leaves the run's random state alone: sampled (not
    greedy) text through kv.cache:keep_recent equals the ring buffer's, seed for seed. And it
    is made at the run's sizes: a trim that needs a window of more than 8 works at 32."""
    common = [f"--out_dir={out_dir}", "--kv_window=8", "--max_new_tokens=40", "--seed=7"]
    code, ring, err = sample(*common)
    assert code in (0, None), err
    code, trimmed, err = sample(*common, "--kv_trim=kv.cache:keep_recent")
    assert code in (0, None) and trimmed == ring, err
    (tmp_path / "wide_trim.py").write_text(
        "import torch\n"
        "def keep(k, v, pos, kv_window, kv_sink):\n"
        "    if k.size(2) <= kv_window:\n"
        "        return k, v, pos\n"
        "    idx = torch.topk(pos.float(), kv_window - 8).indices.sort().values  # needs kv_window > 8\n"
        "    return k[:, :, idx], v[:, :, idx], pos[idx]\n")
    code, out, err = sample(f"--out_dir={out_dir}", "--kv_window=32", "--max_new_tokens=60",
                            f"--kv_trim={tmp_path / 'wide_trim.py'}:keep")
    assert code in (0, None) and "error" not in err, err


def test_an_unwritten_kv_trim_stub_is_said_before_the_prompt(out_dir):
    """The exercise's stub plugged in as it is: one line saying what to write, and no text
    printed before it (the function is tried once before sampling starts)."""
    code, out, err = sample(f"--out_dir={out_dir}", "--kv_window=8", "--kv_trim=exercises.kv_window:keep_recent")
    assert code == 2 and out == "", out
    assert err.startswith("error: not implemented yet") and "exercises.check kv_window" in err, err


def test_an_out_dir_missing_here_but_in_the_project_says_where_it_is(tmp_path):
    """Run from another folder with a relative out_dir that names one of the project's folders
    (config/ stands in for a run's: nothing is written into the project): the error names the
    folder it looked in and the project's folder; --baseline, which takes a file, gets a file."""
    proc = run_script(os.path.join(REPO_ROOT, "sample.py"), "--out_dir=config", cwd=tmp_path)
    assert_user_error(proc, f"does not exist in {tmp_path}", f"--out_dir={os.path.join(REPO_ROOT, 'config')},")
    from outdir import missing_checkpoint
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        message = str(missing_checkpoint(os.path.join("config", "ckpt.pt"), "baseline"))
    finally:
        os.chdir(cwd)
    assert f"--baseline={os.path.join(REPO_ROOT, 'config', 'ckpt.pt')}," in message


def test_the_speed_printed_is_the_decode_steps_apart_from_the_prompt(out_dir, tmp_path):
    """A long prompt costs its own time, said apart: tokens/s counts the decode steps only."""
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(b"abc" * 100)
    code, _, err = sample(f"--out_dir={out_dir}", f"--start=FILE:{prompt}", "--max_new_tokens=5")
    assert code in (0, None), err
    assert " tokens/s decoding (1 sample; the 300-byte prompt read in " in err


def test_samples_that_cannot_fit_in_memory_are_one_line_before_any_work(out_dir, tmp_path, monkeypatch):
    """The KV caches, the prompt's logits and the MLP's values that the samples need at the
    least, against the memory free (patched to 16 MiB): 1,000 samples of 104 bytes on this model
    (2 layers, K and V of 2 heads x 16 channels, float32 on a CPU) need 57 MiB; under a window of
    8 bytes, or as 100 samples, they fit and run; so do they on a model of local attention."""
    import devices
    monkeypatch.setattr(devices, "memory_available", lambda dev: 2 ** 24)
    code, out, err = sample(f"--out_dir={out_dir}", "--num_samples=1000", "--max_new_tokens=100")
    need = 1000 * (2 * 2 * 2 * 16 * 104 * 4 + 4 * (256 * 4 + 8 * 32 * 4))  # caches; prompt: logits, MLP
    assert code == 2 and out == "" and err.strip().splitlines()[-1] == (
        f"error: 1000 samples of 4 + 100 bytes need at least {need / 2**20:,.1f} MiB on cpu, and 16.0 MiB is free: "
        "lower --num_samples or --max_new_tokens, or bound the cache (--kv_window=N)")
    for fits in (["--num_samples=100"], ["--num_samples=1000", "--kv_window=8"]):
        code, out, err = sample(f"--out_dir={out_dir}", "--max_new_tokens=100", *fits)
        assert code in (0, None) and "error" not in err, err
    # a model whose layers attend 8 back holds 8 tokens a layer whatever kv_window says
    from checkpoint import save_checkpoint
    from model import GPT, GPTConfig, MODEL_ARG_KEYS
    local = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, bias=False, window=8))
    save_checkpoint(str(tmp_path / "ckpt.pt"), local, None, {k: getattr(local.config, k) for k in MODEL_ARG_KEYS},
                    {"dataset": "shakespeare_char"}, 1, 5.0)
    code, out, err = sample(f"--out_dir={tmp_path}", "--max_new_tokens=100", "--num_samples=1000")
    assert code in (0, None) and "error" not in err, err


def test_a_long_prompt_under_a_window_counts_the_logits_of_one_piece(out_dir, tmp_path, monkeypatch):
    """Under a plain window the prompt is fed a window at a time, so its logits take a window's
    rows, not the whole prompt's: 20,000 bytes (10 MiB of logits in one pass, against 8 MiB
    free) fit under --kv_window=8; unbounded they do not, and the refusal names the prompt."""
    import devices
    monkeypatch.setattr(devices, "memory_available", lambda dev: 2 ** 23)
    prompt = tmp_path / "long.txt"
    prompt.write_bytes(b"To be, or not to be. " * 1000)
    code, out, err = sample(f"--out_dir={out_dir}", f"--start=FILE:{prompt}", "--max_new_tokens=2", "--kv_window=8")
    assert code in (0, None) and "error" not in err, err
    code, out, err = sample(f"--out_dir={out_dir}", f"--start=FILE:{prompt}", "--max_new_tokens=2")
    assert code == 2 and "or shorten the prompt" in err.strip().splitlines()[-1], err


def test_a_long_prompt_read_in_one_pass_says_its_time_grows_with_its_square(out_dir, tmp_path, monkeypatch):
    """Past LONG_PROMPT bytes a prompt fed whole gets a note pointing to --kv_window; under a
    window (read in pieces) it does not, nor does one of LONG_PROMPT bytes. (The memory free is
    patched to nothing: the notes come before that refusal, and no prompt is read.)"""
    import devices
    from sample import LONG_PROMPT
    monkeypatch.setattr(devices, "memory_available", lambda dev: 1)
    for size, args, noted in ((LONG_PROMPT + 1, [], True), (LONG_PROMPT + 1, ["--kv_window=8"], False),
                              (LONG_PROMPT, [], False)):
        prompt = tmp_path / f"p{size}.txt"
        prompt.write_bytes(b"x" * size)
        code, _, err = sample(f"--out_dir={out_dir}", f"--start=FILE:{prompt}", "--max_new_tokens=2", *args)
        assert code == 2 and (f"note: the {size:,}-byte prompt is read in one pass" in err) == noted, err


def test_a_window_past_the_trained_context_is_noted(tmp_path):
    """A model trained on 16-byte blocks sampled with --kv_window=32 reads distances it never
    saw: a note says so and which window stays within; --kv_window=16 gets none."""
    from checkpoint import save_checkpoint
    from model import GPT, GPTConfig, MODEL_ARG_KEYS
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, bias=False))
    save_checkpoint(str(tmp_path / "ckpt.pt"), model, None, {k: getattr(model.config, k) for k in MODEL_ARG_KEYS},
                    {"block_size": 16}, 1, 5.0)
    for window, noted in ((32, True), (16, False)):
        code, _, err = sample(f"--out_dir={tmp_path}", f"--kv_window={window}", "--max_new_tokens=2")
        assert code in (0, None), err
        assert ("note: kv_window=32 is longer than the 16 tokens of history this model was trained with: past "
                "them its layers read" in err and "(kv_window=16 stays within)" in err) == noted, err
    # a model of local layers with one global: the note is of that layer
    local = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, bias=False, window=8, global_layers="1"))
    save_checkpoint(str(tmp_path / "ckpt.pt"), local, None, {k: getattr(local.config, k) for k in MODEL_ARG_KEYS},
                    {"block_size": 16}, 1, 5.0)
    code, _, err = sample(f"--out_dir={tmp_path}", "--kv_window=32", "--max_new_tokens=2")
    assert code in (0, None) and "past them its global layers read distances" in err, err
    # trained with 16 tokens of XL memory before each block: its queries read 32 back
    save_checkpoint(str(tmp_path / "ckpt.pt"), model, None, {k: getattr(model.config, k) for k in MODEL_ARG_KEYS},
                    {"block_size": 16, "xl_mem": 16}, 1, 5.0)
    for window, noted in ((40, True), (32, False)):
        code, _, err = sample(f"--out_dir={tmp_path}", f"--kv_window={window}", "--max_new_tokens=2")
        assert ("longer than the 32 tokens" in err) == noted and code in (0, None), err
    # no window at all (sample.py's default): noted once a query would see more than 32 tokens
    # (the 4-byte prompt and 29 new bytes: the last query sees 32, the last byte is never read)
    for new, noted in ((30, True), (29, False)):
        code, _, err = sample(f"--out_dir={tmp_path}", "--kv_window=0", f"--max_new_tokens={new}")
        assert code in (0, None), err
        assert ("note: no kv_window" in err and "past the 32 tokens of history" in err
                and "(--kv_window=32 stays within)" in err) == noted, err


def test_eviction_without_a_window_and_sinks_are_noted_past_the_trained_context(tmp_path):
    """A 16-byte-block model: h2o without --kv_window may keep any token, and recency with a
    budget past 16 keeps tokens further back than 16 (noted, with the window that stays within);
    recency within 16, or h2o under --kv_window=16, is not. Sinks under a window sit 16 back from
    the query at position 16 (noted); a text that ends before it does not get the note."""
    from checkpoint import save_checkpoint
    from model import GPT, GPTConfig, MODEL_ARG_KEYS
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, bias=False))
    save_checkpoint(str(tmp_path / "ckpt.pt"), model, None, {k: getattr(model.config, k) for k in MODEL_ARG_KEYS},
                    {"block_size": 16}, 1, 5.0)
    evict = "note: no kv_window: kv_evict={} can keep tokens further back than the 16 tokens"
    sink = "the kv_sink=2 first tokens sit at distances its layers never saw"
    for args, new, note in ((["--kv_evict=h2o", "--kv_budget=8", "--kv_recent=2"], 20, evict.format("h2o")),
                            (["--kv_evict=window", "--kv_budget=20"], 20, evict.format("window")),
                            (["--kv_evict=window", "--kv_budget=16"], 20, None),
                            (["--kv_evict=h2o", "--kv_budget=8", "--kv_recent=2"], 12, None),
                            (["--kv_window=16", "--kv_evict=h2o", "--kv_budget=8", "--kv_recent=2"], 20, None),
                            (["--kv_window=8", "--kv_sink=2"], 14, sink),  # the last query: position 16
                            (["--kv_window=8", "--kv_sink=2"], 13, None)):
        code, _, err = sample(f"--out_dir={tmp_path}", f"--max_new_tokens={new}", *args)
        assert code in (0, None), err
        notes = [line for line in err.splitlines() if "never saw" in line]
        if note is None:
            assert notes == [], (args, new, err)
        else:
            assert len(notes) == 1 and note in notes[0], (args, new, err)
            assert "(add --kv_window=16 to stay within)" in notes[0] or "kv_sink" in note, notes


def test_memory_that_runs_out_anyway_is_one_line():
    """An allocation that fails (numpy's, the CPU allocator's, a size past counting) is one
    line and exit 2; any other RuntimeError is a bug of ours, with its traceback."""
    import utils
    for e in (MemoryError("Unable to allocate 48.4 GiB"),
              RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 2560000001024 bytes"),
              RuntimeError("Storage size calculation overflowed with sizes=[1, 1000000000000000000]")):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as stop:
            utils.run_main(lambda: (_ for _ in ()).throw(e))
        assert stop.value.code == 2 and err.getvalue().count("\n") == 1
        assert err.getvalue().startswith("error: out of memory (") and "lower the sizes given" in err.getvalue()
    with pytest.raises(RuntimeError, match="a bug"):
        utils.run_main(lambda: (_ for _ in ()).throw(RuntimeError("a bug")))


@pytest.mark.parametrize("linear_layers", ["", "0,1"])
def test_an_all_linear_checkpoint_with_xl_memory_gets_no_window_note(tmp_path, linear_layers):
    """Every layer linear (by default or listed one by one), trained with XL memory before
    this was refused: no cache, so no kv_window taken from xl_mem, and no note claiming one."""
    from checkpoint import save_checkpoint
    from model import GPT, GPTConfig, MODEL_ARG_KEYS
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, bias=False, attention="linear", linear_layers=linear_layers))
    save_checkpoint(str(tmp_path / "ckpt.pt"), model, None, {k: getattr(model.config, k) for k in MODEL_ARG_KEYS},
                    {"block_size": 16, "xl_mem": 16}, 1, 5.0)
    code, _, err = sample(f"--out_dir={tmp_path}", "--max_new_tokens=20")
    assert code in (0, None), err
    assert "xl_mem this model was trained with" not in err and "note: no kv_window" not in err, err


@pytest.mark.parametrize("config", ["absent", None])
def test_a_checkpoint_without_recorded_settings_samples(tmp_path, config):
    """A hand-made checkpoint (model and model_args, no config or config None) samples as
    one whose config is empty: the same text."""
    folder = save_tiny_checkpoint(tmp_path)
    ckpt = torch.load(folder / "ckpt.pt", weights_only=True)
    ckpt.pop("crc32", None)
    ckpt["config"] = {}
    torch.save(ckpt, folder / "empty.pt")
    if config == "absent":
        del ckpt["config"]
    else:
        ckpt["config"] = config
    torch.save(ckpt, folder / "odd.pt")
    runs = [sample(f"--out_dir={folder}", f"--checkpoint_name={name}", "--max_new_tokens=20", "--seed=1")
            for name in ("empty.pt", "odd.pt")]
    assert [r[0] for r in runs] == [0, 0], runs[1][2]
    assert runs[0][1] == runs[1][1]


def test_local_layers_that_cannot_quantize_are_noted_as_eval_kv_notes_them(tmp_path):
    """A model with local windows of 6 and int4 keys grouped per channel over 8 tokens: its
    local layers quantize nothing, and sample.py says so as eval_kv does."""
    from checkpoint import save_checkpoint
    from kv.policy import KVOptions
    from model import GPT, GPTConfig, MODEL_ARG_KEYS
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, bias=False, window=6, global_layers="1"))
    save_checkpoint(str(tmp_path / "ckpt.pt"), model, None, {k: getattr(model.config, k) for k in MODEL_ARG_KEYS},
                    {"block_size": 16}, 1, 5.0)
    kv = KVOptions(kv_window=16, kv_quant="int4", kv_quant_group=8, kv_quant_residual=0)
    code, _, err = sample(f"--out_dir={tmp_path}", "--kv_window=16", "--kv_quant=int4", "--kv_quant_group=8",
                          "--kv_quant_residual=0", "--max_new_tokens=8")
    assert code in (0, None), err
    assert kv.check().local_residual(model.config)[1] in err


def test_ctrl_c_prints_every_sample_as_far_as_it_got(out_dir, monkeypatch):
    """Ctrl-C after 3 new bytes of 3 samples side by side: the first (streamed) ends there, the
    other two are printed as far as they got, a line says where it stopped, and the exit is
    Ctrl-C's (130); the bytes are those the model drew (the same seed without Ctrl-C)."""
    import generate
    real = generate.generate_stream

    def interrupted(*args, **kwargs):
        for i, token in enumerate(real(*args, **kwargs)):
            if i == 3:
                raise KeyboardInterrupt
            yield token

    code, whole, _ = sample(f"--out_dir={out_dir}", "--num_samples=3", "--max_new_tokens=3", "--start=ab")
    assert code in (0, None)
    monkeypatch.setattr(generate, "generate_stream", interrupted)
    code, out, err = sample(f"--out_dir={out_dir}", "--num_samples=3", "--max_new_tokens=100", "--start=ab")
    assert code == 130 and out == whole, (out, whole)
    assert err.strip().splitlines()[-1] == "stopped after 3 of 100 new bytes; the 2 other samples above stop there too"


def test_a_plug_in_file_under_the_home_folder_is_found_by_tilde(out_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "hometrim.py").write_text("from kv.cache import keep_recent as keep\n")
    code, out, err = sample(f"--out_dir={out_dir}", "--kv_trim=~/hometrim.py:keep", "--kv_window=4",
                            "--max_new_tokens=3")
    assert code in (0, None), err
