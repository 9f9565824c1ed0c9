"""
The machine a script runs on: its device (cuda, cuda:N, mps, cpu) and dtype, chosen once at
start-up when not given, autocast, the CPU threads torch uses (fewer on a busy machine), the
memory free for new tensors, glibc's setting that keeps freed memory for the next step, and
train.py's start on them (start_device: under torchrun also the DDP process group).

    python -c "import devices; print(devices.pick_device('auto'), devices.pick_dtype('cpu', 'auto', training=True), devices.pick_threads())"
"""
import ctypes
import os
import re
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist

from utils import UserError



def mps_available():
    """Whether this torch build and machine have Apple's MPS device."""
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def pick_device(device):
    """"" or "auto" -> the best available of cuda, mps, cpu; an explicit name is checked."""
    if device in ("", "auto"):
        return "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    m = re.fullmatch(r"cpu|mps|cuda(?::(\d+))?", device)
    if m is None:
        raise UserError(f"--device={device}: unknown device; use auto, cpu, cuda, cuda:N or mps")
    use = "use --device=auto or --device=cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device={device}: CUDA is not available here; {use}")
        if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
            raise UserError(f"--device={device}: this machine has "
                            f"{torch.cuda.device_count()} CUDA device(s)")
    if device == "mps" and not mps_available():
        raise UserError(f"--device={device}: MPS is not available here; {use}")
    if m.group(1) is not None:  # cuda:N becomes the current device: synchronize(), pin_memory() and the
        torch.cuda.set_device(device)  # capability checks then act on it, not on GPU 0
    return device


def synchronizer(device):
    """A function that waits for the work queued on device (CUDA, MPS); a no-op on the CPU."""
    if device.startswith("cuda"):
        return lambda: torch.cuda.synchronize(device)
    if device == "mps":
        return torch.mps.synchronize
    return lambda: None


def cpu_has_bf16():
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX): there bfloat16
    matmuls run 2-3x faster than float32 ones; elsewhere they are emulated and slower."""
    return any(getattr(torch.cpu, name, lambda: False)()
               for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def pick_dtype(device, dtype, training=False):
    """"" or "auto" -> bfloat16 on GPUs that compute in it (Ampere and later), else float16 on
    cuda; for training on a CPU with native bfloat16, bfloat16; float32 elsewhere (inference
    on the CPU, MPS)."""
    device_type = device.split(":")[0]
    if dtype in ("", "auto"):
        if device_type == "cuda":  # (is_bf16_supported() also says yes where bfloat16 is only emulated)
            return "bfloat16" if torch.cuda.get_device_capability(device) >= (8, 0) else "float16"
        return "bfloat16" if device_type == "cpu" and training and cpu_has_bf16() else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"--dtype={dtype}: unknown dtype; use auto, float32, bfloat16 or float16")
    if dtype == "float16" and device_type == "cpu":
        raise UserError("--dtype=float16 is for GPUs; on the CPU use --dtype=float32"
                        + (" or --dtype=bfloat16 (native on this CPU)" if cpu_has_bf16() else ""))
    if dtype == "float16" and device_type == "mps" and training:  # (train.py's loss scaling is CUDA's)
        raise UserError("--dtype=float16 trains without loss scaling on MPS (small gradients vanish); "
                        "use --dtype=bfloat16 or --dtype=float32")
    return dtype


def emulated_note(device, dtype):
    """A note where dtype is emulated on device, many times slower than float32 (bfloat16 on a
    CPU without native bfloat16: a matmul 50x slower on a 2-core AMD EPYC), else ''."""
    if dtype == "bfloat16" and device.split(":")[0] == "cpu" and not cpu_has_bf16():
        return ("note: this CPU has no native bfloat16 (AVX512-BF16 or AMX): it is emulated, many times slower "
                "than --dtype=float32")
    return ""


def autocast_ctx(device, dtype):
    """Mixed precision (torch.autocast) for bfloat16/float16; a no-op context for float32."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))


def no_autocast(device_type):
    """A context that turns autocast off for code meant to run at full precision (a no-op,
    and nearly free, when autocast is off: this sits on the decode step)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


def pick_threads(requested=0):
    """(threads, reason) for torch's CPU work: requested > 0 (--threads=N) wins, then
    OMP_NUM_THREADS, else the CPUs this process may use minus the load already on them, at
    least 1. torch's default (one per core) assumes idle cores: on a busy machine its
    threads wait for each other at every operation, many times slower than fewer threads."""
    if requested < 0:
        raise UserError(f"--threads must be 0 (chosen automatically) or a number of threads, got {requested}")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    most = 4 * cpus  # (torch's thread pool crashes at tens of thousands; past the CPUs threads only wait)
    plural = "s" if cpus != 1 else ""
    if requested > most:
        raise UserError(f"--threads={requested} is far more than the {cpus} CPU{plural} this process may use: "
                        f"give at most {most} ({cpus}, one a CPU, is usually the fastest), or 0 to choose "
                        "automatically")
    if requested > 0:  # (more threads than CPUs only wait for each other: said on the device line)
        return requested, f"--threads={requested}" + (f", more than the {cpus} CPU{plural}" if requested > cpus else "")
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > most:
        raise UserError(f"OMP_NUM_THREADS={env} is far more than the {cpus} CPU{plural} this process may use: "
                        f"set it to at most {most} ({cpus}, one a CPU, is usually the fastest), or pass --threads=N")
    if env.isdigit() and int(env) > 0:
        return int(env), f"OMP_NUM_THREADS={env}"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0  # runnable processes, last minute
    # the minute's average lags: work started seconds ago shows only in the processes running now
    load = max(load, running_others())
    n = min(cpus, max(1, cpus - round(load)))
    return n, f"auto: {cpus} CPU{'s' if cpus != 1 else ''}, load {load:.1f}"


def running_others():
    """Processes running or ready to run right now, this one not counted (Linux's /proc/loadavg;
    0 elsewhere)."""
    try:
        with open("/proc/loadavg") as f:
            return max(int(f.read().split()[3].split("/")[0]) - 1, 0)
    except (OSError, ValueError, IndexError):
        return 0


def use_threads(requested=0):
    """Set torch's CPU threads by pick_threads; returns the words for the device line,
    e.g. "1 thread (auto: 2 CPUs, load 1.6)"."""
    n, reason = pick_threads(requested)
    torch.set_num_threads(n)
    return f"{n} thread{'s' if n != 1 else ''} ({reason})"


def memory_available(dev):
    """Bytes free for new tensors on device dev: CUDA's free memory, Linux's MemAvailable for
    the CPU; None where it is not known (MPS, other systems)."""
    try:
        if dev.startswith("cuda"):  # free on the GPU, and what torch holds there unused
            d = torch.device(dev)
            return torch.cuda.mem_get_info(d)[0] + torch.cuda.memory_reserved(d) - torch.cuda.memory_allocated(d)
        if dev == "cpu":
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
    except (OSError, ValueError, RuntimeError):
        pass
    return None


def in_bytes(n):
    """n bytes in GiB, or in MiB below one GiB."""
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def keep_freed_memory():
    """Ask glibc's malloc to keep the memory a process frees, for its next allocations.
    By default it maps each big block (above a threshold of at most 32 MB) fresh from the OS
    and unmaps it on free, and trims its heap, so every step over big activations touches
    new pages: measured on a 2-core CPU, 60-120k page faults in a forward over 4 x 4096 bytes
    side by side (~0.1 s of 0.9 s), 15% of a float32 training step of the GPU recipe. The
    price: the process keeps the memory it once used. A no-op off Linux/glibc."""
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(-4, 0)  # M_MMAP_MAX = 0: serve big blocks from the heap, not one mapping each
    mallopt(-1, 2 ** 31 - 1)  # M_TRIM_THRESHOLD: never give the heap's free top back


def start_device(device, dtype, threads, backend, ddp, local_rank, world_size, micro_steps):
    """train.py's device and dtype for this process (device, dtype: the settings, '' = chosen
    here), its CPU threads and, under torchrun (ddp), its DDP process group with backend ('' =
    nccl on CUDA, gloo elsewhere); says which, returns (device, dtype)."""
    dev = pick_device(device)
    if ddp:
        if dev.startswith("cuda"):
            dev = f"cuda:{local_rank}"  # the GPU of this process
            torch.cuda.set_device(dev)
        if dev == "mps":  # (gloo, the one backend off CUDA, holds CPU and CUDA tensors only)
            raise UserError("DDP runs on CUDA GPUs or CPUs, and this run's device is mps: add --device=cpu under "
                            "torchrun, or train on mps in one process (python train.py ...)")
        if backend == "nccl" and not dev.startswith("cuda"):
            raise UserError(f"--backend=nccl runs on CUDA GPUs, and this run's device is {dev}: use --backend=gloo "
                            "on CPUs (or leave --backend empty: it picks one)")
        try:
            dist.init_process_group(backend=backend or ("nccl" if dev.startswith("cuda") else "gloo"))
        except RuntimeError as e:  # a backend this build of torch lacks (mpi, ucc), a rendezvous that fails
            raise UserError(f"DDP could not start (--backend={backend or 'auto'}): {' '.join(str(e).split())[:200]}; "
                            "--backend=gloo runs anywhere") from None
        print(f"DDP: {world_size} processes, backend {dist.get_backend()}, "
              f"{micro_steps} micro-steps each per iteration")
    elif backend:
        print(f"note: --backend={backend} is for runs under torchrun; this run is one process and starts no "
              "process group")
    dt = pick_dtype(dev, dtype, training=True)
    thread_words = use_threads(threads)  # also on a GPU: the data loading runs on the CPU
    device_type = dev.split(":")[0]
    if device_type == "cpu":
        keep_freed_memory()  # a CPU step's big activations reuse memory instead of page-faulting
    print(f"device {dev} ({'auto' if device in ('', 'auto') else 'given'}), "
          f"dtype {dt} ({'auto' if dtype in ('', 'auto') else 'given'})"
          + (f", {thread_words}" if device_type == "cpu" else ""))
    if note := emulated_note(dev, dt):
        print(note)
    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls
    return dev, dt
