"""How time, bandwidth and memory are measured (shared by the main job and the pytest-benchmark suite).

On a GPU: CUDA events around each call after a warm-up, the median over repeats, calls rotated over
several input sets so that L2 does not hold the inputs, and peak extra memory as
torch.cuda.max_memory_allocated during one call minus what was allocated before it (the inputs). The
copy bandwidth that the results are set against is measured in the same run. On a CPU: time.perf_counter
medians; with the Triton interpreter these are interpreter times, not speed figures. triton.testing.do_bench
is not used: it needs a GPU driver, which the interpreter does not have.
"""
import ctypes
import ctypes.util
import os
import re
import statistics
import time

import torch

# Repeats: enough for a stable median, bounded so a slow provider cannot eat the run.
GPU_WARMUP, GPU_MIN_REPS, GPU_MAX_REPS, GPU_TARGET_S = 3, 5, 50, 0.4
# On a CPU the checking call before timing is the warm-up. Interpreter times measure nothing but the
# interpreter (one call of a tiny case takes ~0.3 s), so one timed call there; three on a plain CPU.
CPU_WARMUP, CPU_REPS, INTERPRETER_REPS = 0, 3, 1


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def copy_bandwidth_gbps(nbytes=2**30, reps=20):
    """Device-to-device copy bandwidth in GB/s, counting read + write bytes; None without CUDA.

    The buffer is large (1 GiB by default, less if memory is short) so L2 plays no part."""
    if not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info()
    nbytes = int(min(nbytes, free // 4)) // 16 * 16
    buffers = [torch.ones(nbytes // 4, dtype=torch.float32, device="cuda"),
               torch.empty(nbytes // 4, dtype=torch.float32, device="cuda")]
    times = time_calls(lambda i: buffers[1].copy_(buffers[0]), reps=reps)
    buffers.clear()
    torch.cuda.empty_cache()
    return 2 * nbytes / (statistics.median(times) * 1e-3) / 1e9


def time_calls(fn, warmup=None, reps=None):
    """Times fn(i) for i = 0, 1, ... (fn picks input set i % n_sets); returns the per-call times in ms.

    GPU: `warmup` untimed calls (compilation, autotuning, allocator), then `reps` calls, each between two
    CUDA events, synchronising once at the end so that calls queue as in training. Without `reps`, as
    many as fit in about GPU_TARGET_S. CPU: perf_counter around each call.
    """
    if not torch.cuda.is_available():
        for i in range(CPU_WARMUP if warmup is None else warmup):
            fn(i)
        times = []
        if reps is None:
            reps = INTERPRETER_REPS if os.environ.get("TRITON_INTERPRET") == "1" else CPU_REPS
        for i in range(reps):
            t0 = time.perf_counter()
            fn(i)
            times.append((time.perf_counter() - t0) * 1e3)
        return times
    for i in range(GPU_WARMUP if warmup is None else warmup):
        fn(i)
    sync()
    if reps is None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(0)
        end.record()
        end.synchronize()
        est_s = max(start.elapsed_time(end) * 1e-3, 1e-6)
        reps = int(min(GPU_MAX_REPS, max(GPU_MIN_REPS, GPU_TARGET_S / est_s)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for i, (start, end) in enumerate(events):
        start.record()
        fn(i)
        end.record()
    sync()
    return [s.elapsed_time(e) for s, e in events]


def peak_extra_bytes(fn):
    """Peak memory allocated during one call of fn(0) beyond what was allocated before it (the inputs and
    anything else alive), outputs included; None without CUDA (the CPU allocator keeps no such count)."""
    if not torch.cuda.is_available():
        return None
    sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn(0)
    sync()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return int(peak)


def _rss_bytes(field):
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def peak_extra_rss_bytes(fn):
    """CPU (Linux): the resident-set high-water mark during one call of fn(0) above the resident set before
    it, outputs included; None where the mark cannot be reset (/proc/self/clear_refs). Freed heap memory
    is first handed back to the OS (glibc's malloc_trim), so that pages the call reuses count as new."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current VmRSS
        base = _rss_bytes("VmRSS")
    except (OSError, AttributeError):
        return None
    out = fn(0)
    peak = _rss_bytes("VmHWM") - base
    del out
    return peak


def summarize(times_ms):
    """Median and least time of one measurement's calls, and how many there were (a case's rates of the
    median give the bandwidth or the FLOP rate)."""
    return {"median_ms": statistics.median(times_ms), "min_ms": min(times_ms), "reps": len(times_ms)}
