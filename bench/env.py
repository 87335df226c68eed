"""Where the benchmarks run: the interpreter switch, the device's description and the versions.

`use_interpreter_without_gpu()` must be called before anything imports covkernels (or Liger): Triton reads
TRITON_INTERPRET when a @triton.jit function is defined, so set later it has no effect.
"""
import datetime
import importlib.metadata
import os
import platform
import re
import subprocess


def use_interpreter_without_gpu():
    """Sets TRITON_INTERPRET=1 when no CUDA device is present; returns True when the kernels interpret."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return interpreting()


def interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def device():
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def device_name():
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu {platform.machine()} (Triton interpreter)" if interpreting() else f"cpu {platform.machine()}"


def cpu_name():
    """The CPU's model name (Linux), else the machine type, with the number of cores this process may use."""
    name = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} cores"


def slug(name):
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3': the results file of that device."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def l2_bytes():
    """L2 size of the current GPU (50 MiB, an H100's, if torch does not say); 0 on the CPU."""
    import torch

    if not torch.cuda.is_available():
        return 0
    return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20))


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit():
    """HEAD of the repository holding this file, or None (no git, not a checkout, ...)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             check=False, cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def describe(copy_gbps):
    """Everything the results file says about where and with what it was measured."""
    import torch

    info = {"name": device_name(), "interpreted": interpreting(), "copy_gbps": copy_gbps,
            "sm_count": None, "memory_bytes": None, "l2_bytes": None, "capability": None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(sm_count=props.multi_processor_count, memory_bytes=props.total_memory,
                    l2_bytes=l2_bytes(), capability=f"{props.major}.{props.minor}")
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                "triton": _version("triton")}
    for dist in ("trl", "verl", "liger-kernel", "flash-attn", "cut-cross-entropy"):
        versions[dist] = _version(dist)
    return {"device": info, "versions": versions, "git_commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
