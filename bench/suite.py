"""The body of a pytest-benchmark test: check the provider, then time it under the benchmark fixture.

Timing: pytest-benchmark's clock around each call, the call ending in torch.cuda.synchronize() so the
clock sees the GPU's work; input sets rotated between rounds (see timing.py). The algorithmic bytes,
GB/s (from pytest-benchmark's median), the fraction of the copy bandwidth, the error against python_ref
and the peak extra memory go into benchmark.extra_info, and so into --benchmark-json.
"""
import pytest
import torch

from . import cases as C
from . import check, runner, timing

GPU_ROUNDS, GPU_WARMUP = 20, 3
CPU_ROUNDS = 2  # interpreter: the checking call has warmed up; two rounds show repeated calls work

_INPUTS = {}  # the inputs of the last case only, whichever test file built them: a case is gigabytes


def bench_mode(config):
    """The suite's shapes: --bench-mode on a GPU ("default" if not given); always "tiny" on a CPU."""
    if not torch.cuda.is_available():
        return "tiny"
    return config.getoption("--bench-mode") or "default"


def cached(key, build):
    """build() once for `key`, dropping the previous key's inputs first."""
    if key not in _INPUTS:
        _INPUTS.clear()
        runner._free()
        _INPUTS[key] = build()
    return _INPUTS[key]


def case_inputs(case, device):
    """(CaseInputs, checked rows, float64 reference at those rows) of a case, built once."""
    def build():
        inputs = runner.CaseInputs(case, device, C.n_input_sets(case, *runner._memory_facts(device)))
        rows = C.check_rows(case, device)
        return inputs, rows, check.reference(case, *inputs.sets[0], inputs.grads, rows)
    return cached(("logprobs", case), build)


def skip_reason(name):
    """Why a provider is not run here, or None."""
    if name == "compiled_ref" and not torch.cuda.is_available():
        return "torch.compile not run on the CPU (minutes of compiling)"
    return None


def time_with_pytest_benchmark(benchmark, run, extra, copy_gbps, nbytes):
    """benchmark.pedantic over rotating inputs; fills in GB/s from its median."""
    on_gpu = torch.cuda.is_available()
    counter = iter(range(10**9))

    def target(i):
        out = run(i)
        if on_gpu:
            torch.cuda.synchronize()
        return out

    benchmark.extra_info.update(extra)
    benchmark.pedantic(target, setup=lambda: ((next(counter),), {}), iterations=1,
                       rounds=GPU_ROUNDS if on_gpu else CPU_ROUNDS, warmup_rounds=GPU_WARMUP if on_gpu else 0)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:  # absent with --benchmark-disable
        summary = timing.summarize([stats.stats.median * 1e3], nbytes, copy_gbps)
        benchmark.extra_info.update({k: summary[k] for k in ("median_ms", "gbps", "frac_copy")})


def bench_logprobs(benchmark, case, provider, copy_gbps):
    """One (case, provider) of the fused log-prob/entropy pass (fwd or fwd_bwd)."""
    fn, reason = runner.load(provider, skip_reason(provider.name))
    if fn is None:
        pytest.skip(f"{provider.name}: {reason}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    inputs, rows, ref_out = case_inputs(case, device)
    run = inputs.call(fn)
    try:
        errors, ok, _ = check.compare(case, provider, run(0), ref_out, rows)
        if not ok:
            message = f"{provider.name}: off python_ref(float64) by {errors} (not timed)"
            if provider.kind == "peer":
                pytest.skip(message)
            pytest.fail(message)
        extra = {"case": case.name, "provider": provider.name, "computes": "+".join(provider.computes),
                 "errors": errors, "bytes": C.bytes_moved(case), "input_sets": inputs.n_sets,
                 "interpreted": not torch.cuda.is_available(), "copy_gbps": copy_gbps,
                 "peak_extra_bytes": timing.peak_extra_bytes(run)}
        time_with_pytest_benchmark(benchmark, run, extra, copy_gbps, extra["bytes"])
    except torch.cuda.OutOfMemoryError:
        pytest.skip(f"{provider.name}: out of memory at {case.name}")
    finally:
        if provider.mutates and case.op == "fwd_bwd":
            inputs.build()
