"""utils.py and devices.py: the dtype chosen for each device, torch.compile's fallback to eager, and glibc's
setting that keeps freed memory for the next big tensor."""

import contextlib
import io
import os
import subprocess
import sys

import pytest
import torch

import device_peaks
import devices
import utils
from conftest import REPO_ROOT, tiny


def test_pick_dtype_bfloat16_for_cpu_training_only_where_native(monkeypatch):
    for native in (True, False):
        monkeypatch.setattr(devices, "cpu_has_bf16", lambda: native)
        assert devices.pick_dtype("cpu", "auto", training=True) == ("bfloat16" if native else "float32")
        assert devices.pick_dtype("cpu", "") == "float32"  # inference: exact float32
        assert devices.pick_dtype("mps", "auto", training=True) == "float32"
    assert devices.pick_dtype("cpu", "bfloat16") == "bfloat16"
    for native in (True, False):  # float32 first; bfloat16 only where the CPU has it
        monkeypatch.setattr(devices, "cpu_has_bf16", lambda: native)
        with pytest.raises(utils.UserError, match="float16 is for GPUs; on the CPU use --dtype=float32") as e:
            devices.pick_dtype("cpu", "float16")
        assert ("bfloat16" in str(e.value)) == native


def test_emulated_bfloat16_on_the_cpu_is_said(monkeypatch, tmp_path):
    """--dtype=bfloat16 on a CPU that only emulates it (many times slower than float32) gets a
    note from train.py's device line and from sample.py; not where it is native, nor for float32."""
    from conftest import run_in_process, save_tiny_checkpoint
    for native in (True, False):
        monkeypatch.setattr(devices, "cpu_has_bf16", lambda: native)
        assert bool(devices.emulated_note("cpu", "bfloat16")) == (not native)
        assert not devices.emulated_note("cpu", "float32") and not devices.emulated_note("cuda", "bfloat16")
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: False)
    save_tiny_checkpoint(tmp_path)
    code, _, err = run_in_process("sample.py", f"--out_dir={tmp_path}", "--device=cpu", "--dtype=bfloat16",
                                  "--max_new_tokens=2", "--compile=False")
    assert code in (0, None) and "this CPU has no native bfloat16" in err, err
    threads = torch.get_num_threads()
    monkeypatch.setattr(devices, "keep_freed_memory", lambda: None)  # (this process's malloc stays as it is)
    try:
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            devices.start_device("cpu", "bfloat16", threads, "", False, 0, 1, 1)
    finally:
        torch.set_num_threads(threads)
    assert printed.getvalue().splitlines()[1].startswith("note: this CPU has no native bfloat16"), printed.getvalue()


def test_ddp_on_mps_is_refused_before_a_process_group_starts(monkeypatch):
    """torchrun on a Mac picks mps, and gloo (the backend off CUDA) takes no MPS tensors: one
    line saying to add --device=cpu, before any process group starts."""
    from utils import UserError
    monkeypatch.setattr(devices, "pick_device", lambda device: "mps")
    monkeypatch.setattr(devices.dist, "init_process_group", lambda **kw: pytest.fail("a process group started"))
    with pytest.raises(UserError, match="add --device=cpu under torchrun"):
        devices.start_device("", "", 1, "", True, 0, 2, 1)


def test_pick_dtype_on_gpus_by_what_they_compute_in(monkeypatch):
    """bfloat16 on the GPU asked for where it computes in it (Ampere, 8.0, and later), float16
    with loss scaling before: is_bf16_supported() says yes where bfloat16 is only emulated,
    and asks about the current GPU, not cuda:N. float16 training on MPS has no loss scaling."""
    capability = {"cuda": (7, 0), "cuda:0": (7, 0), "cuda:1": (8, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: capability[str(d)])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert devices.pick_dtype("cuda", "auto") == devices.pick_dtype("cuda:0", "auto", training=True) == "float16"
    assert devices.pick_dtype("cuda:1", "auto", training=True) == "bfloat16"
    assert devices.pick_dtype("mps", "float16") == "float16"  # sampling: nothing to scale
    with pytest.raises(utils.UserError, match="without loss scaling on MPS"):
        devices.pick_dtype("mps", "float16", training=True)


@pytest.mark.parametrize("name", [n for n, _, _ in device_peaks.PEAK_FLOPS] + [n for n, _ in device_peaks.PEAK_BANDWIDTH])
def test_each_listed_gpu_gets_its_own_peaks(name, monkeypatch):
    """A GPU whose name holds another listed name (L40 holds L4, GH200 holds H200) gets its
    own row of the tables, not the other's."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: f"NVIDIA {name}")
    flops = {n: (half, tf32) for n, half, tf32 in device_peaks.PEAK_FLOPS}
    if name in flops:
        assert (device_peaks.peak_flops("cuda", "bfloat16"), device_peaks.peak_flops("cuda", "float32")) == flops[name]
    bandwidth = dict(device_peaks.PEAK_BANDWIDTH)
    if name in bandwidth:
        assert device_peaks.peak_bandwidth("cuda") == bandwidth[name]
    assert device_peaks.peak_flops("cpu", "float32") is None and device_peaks.peak_bandwidth("mps") is None


@pytest.mark.parametrize("name,listed", [("NVIDIA RTX A1000 6GB Laptop GPU", None), ("NVIDIA RTX A1000", None),
                                         ("NVIDIA GeForce RTX 4090 Laptop GPU", None),
                                         ("NVIDIA A100-SXM4-40GB", "A100"), ("NVIDIA A100-PCIE-40GB", "A100"),
                                         ("NVIDIA A100-SXM4-80GB", "A100-SXM4-80GB"), ("NVIDIA H200 NVL", "H200 NVL"),
                                         ("NVIDIA GeForce RTX 4090", "RTX 4090")])
def test_a_gpu_gets_the_row_of_its_own_name_only(name, listed, monkeypatch):
    """Names are matched as words: "A100" is not in "RTX A1000", and a laptop part is not the
    desktop part of its number; a name with no row of its own gets no figures."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: name)
    expected = dict(device_peaks.PEAK_BANDWIDTH).get(listed)
    assert device_peaks.peak_bandwidth("cuda") == expected
    flops = {n: half for n, half, _ in device_peaks.PEAK_FLOPS}
    assert device_peaks.peak_flops("cuda", "bfloat16") == flops.get(listed if listed != "A100-SXM4-80GB" else "A100")


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch, capsys):
    def broken_compile(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("Compiler: cc not found\nmore details")
        return run

    model = tiny(n_layer=1, n_head=2, n_embd=16, dropout=0.1).train()
    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(utils, "_COMPILE_FAILED", {})
    rng = torch.get_rng_state()
    got = utils.compile_or_eager(model, lambda m: m(torch.zeros(1, 4, dtype=torch.long)))
    assert got is model
    assert torch.equal(torch.get_rng_state(), rng)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: torch.compile failed") and "cc not found" in err[0]
    # the same function again (a sweep's next row) runs eager at once, without a second try or warning
    probed = []
    other = tiny(n_layer=1, n_head=2, n_embd=16)
    assert utils.compile_or_eager(other, probed.append) is other
    assert probed == [] and capsys.readouterr().err == ""
    # another function is still tried
    assert utils.compile_or_eager(lambda t: t + 1, probed.append) is not None and len(probed) == 1


def test_fixed_arguments_compile_ahead_or_fall_back_quietly(monkeypatch, capsys):
    """fixed_args: compiled ahead for those arguments and called without the guard check (the
    same result as the function); where torch cannot compile ahead, the usual compiled function,
    with no warning."""
    fn = lambda x, w: torch.tanh(x @ w) + 1  # noqa: E731
    args = (torch.randn(3, 4), torch.randn(4, 5))
    ahead = utils.compile_or_eager(fn, lambda f: f(*args), fixed_args=args, backend="eager", fullgraph=True)
    assert ahead is not fn and not hasattr(ahead, "aot_compile")
    args[0].copy_(torch.randn(3, 4))  # a decoder's buffers change in place only
    torch.testing.assert_close(ahead(*args), fn(*args))

    real_compile = torch.compile

    def no_ahead(f, **kw):  # a torch whose compiled functions cannot compile ahead
        compiled = real_compile(f, **kw)

        def refuse(example):
            raise RuntimeError("aot_compile: unsupported")
        compiled.aot_compile = refuse
        return compiled

    monkeypatch.setattr(torch, "compile", no_ahead)
    guarded = utils.compile_or_eager(fn, lambda f: f(*args), fixed_args=args, backend="eager", fullgraph=True)
    assert guarded is not fn and hasattr(guarded, "aot_compile")
    torch.testing.assert_close(guarded(*args), fn(*args))
    assert capsys.readouterr().err == ""


def transparent_hugepages_always(path="/sys/kernel/mm/transparent_hugepage/enabled"):
    """Is the kernel's transparent hugepage mode `always` (e.g. "[always] madvise never")?"""
    try:
        with open(path) as f:
            return "[always]" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
@pytest.mark.skipif(transparent_hugepages_always(), reason="transparent hugepages set to always: a 64 MB "
                    "block faults in 2 MB pages, so the page-fault counts this test reads differ")
def test_keep_freed_memory_reuses_big_blocks():
    """After keep_freed_memory() the pages of a freed 64 MB tensor serve the next one (after a
    few rounds, while the heap settles: 7 here): no new pages touched. Without it (the reference)
    glibc maps every such block afresh, 16k page faults each time."""
    code = ("import resource, sys, torch\n"
            "from devices import keep_freed_memory\n"
            "if sys.argv[1] == 'keep': keep_freed_memory()\n"
            "faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "for _ in range(16):\n"
            "    f0 = faults(); torch.ones(2 ** 24).sum(); print(faults() - f0)\n")
    counts = {}
    for mode in ("keep", "default"):
        proc = subprocess.run([sys.executable, "-c", code, mode], cwd=REPO_ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        counts[mode] = [int(n) for n in proc.stdout.split()]
    assert min(counts["default"]) > 10_000, counts  # the case keep_freed_memory is for
    assert max(counts["keep"][-4:]) < 1_000, counts


@pytest.mark.parametrize("signame, exc", [("SIGINT", KeyboardInterrupt), ("SIGTERM", "Terminated")])
def test_a_second_signal_stops_at_once_as_its_own_kind(signame, exc):
    """The first signal asks the loop to stop after its step; a second stops at once: Ctrl-C as
    a KeyboardInterrupt (exit 130), SIGTERM as Terminated (exit 143, as before the loop)."""
    import signal
    import utils
    signum = getattr(signal, signame)
    exc = getattr(utils, exc) if isinstance(exc, str) else exc
    with utils.StopAfterStep() as stop:
        if signum not in stop.signals:
            pytest.skip(f"{signame} is ignored in this process")
        stop._handler(signum, None)
        assert stop.asked == signum
        with pytest.raises(exc) as e:
            stop._handler(signum, None)
    assert isinstance(e.value, utils.Terminated) == (signame == "SIGTERM")


def test_the_compile_probe_leaves_nothing_to_trace_at_the_first_training_step():
    """train.py compiles the model with steps.compile_probe: a forward and backward of a dummy
    batch. The training steps after it find that trace (the probe fills the RoPE table first;
    traced without it, the first real step traced the model again)."""
    import torch._dynamo.testing
    from steps import compile_probe
    model = tiny(n_layer=1, n_head=2, n_embd=16)
    counter = torch._dynamo.testing.CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counter)
    compile_probe(compiled, "cpu", contextlib.nullcontext(), (2, 8))
    traced = counter.frame_count
    for _ in range(2):  # training steps on real batches of that shape
        x = torch.randint(0, 256, (2, 8))
        logits, _ = compiled(x)
        model.loss(logits, torch.roll(x, -1, 1)).backward()
    assert traced > 0 and counter.frame_count == traced


def test_a_project_file_is_named_as_typed_where_the_process_runs(tmp_path, monkeypatch):
    """The commands printed (next: python sample.py ..., train one ...) name the project's files
    as they are typed from the folder run in: bare in the project, a relative path from a
    folder above it, the absolute path from elsewhere."""
    monkeypatch.chdir(REPO_ROOT)
    assert utils.project_file("sample.py") == "sample.py" and utils.project_file("config/x.py") == "config/x.py"
    monkeypatch.chdir(os.path.dirname(REPO_ROOT))
    assert utils.project_file("sample.py") == os.path.join(os.path.basename(REPO_ROOT), "sample.py")
    monkeypatch.chdir(tmp_path)
    assert utils.project_file("sample.py") == os.path.join(REPO_ROOT, "sample.py")


def test_a_protocol_method_left_undefined_is_named_not_sent_to_the_exercises(capsys):
    """A cache class built on kv.cache.Cache without size_bits: the base's bare `raise
    NotImplementedError` names the method and its file, and no exercise checker."""
    from kv.cache import Cache

    class Partial(Cache):
        def update(self, k, v):
            return k, v, None

    with pytest.raises(SystemExit) as exit_:
        utils.run_main(lambda: Partial().size_bits())
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1, err
    assert "size_bits (" in err and "cache.py:" in err and "must define size_bits" in err and "exercises" not in err, err
