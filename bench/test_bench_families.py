"""pytest-benchmark: every (case, provider) of every family (bench/registry.py; generated in conftest.py),
checked against python_ref in float64 by bench/runner.py and then timed under the benchmark fixture.

Timing: pytest-benchmark's clock around each call, the call ending in torch.cuda.synchronize() so the
clock sees the GPU's work; input sets rotated between rounds (see timing.py). The provider's results row
(bench/runner.py's schema: errors, bytes or FLOPs, the figures of pytest-benchmark's rounds, peak extra
memory) goes into benchmark.extra_info, and so into --benchmark-json. A peer off the reference is skipped
with its errors; covkernels or the reference off fails.
"""
import pytest
import torch

from bench import registry, runner
from bench.providers import load

GPU_ROUNDS, GPU_WARMUP = 20, 3
CPU_ROUNDS = 2  # the checking call has warmed up; two rounds show that repeated calls work

_PREPARED = {}  # the inputs of the last case only, whichever family built them: a case is gigabytes


def _prepared(family, case, device):
    if case not in _PREPARED:
        _PREPARED.clear()
        runner.free()
        _PREPARED[case] = runner.prepare(family, case, device)
    return _PREPARED[case]


def test_family(benchmark, family, case, provider, copy_gbps, pytestconfig):
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu and not family.cpu_figures else "cpu")
    skips = registry.skips(family, on_gpu, pytestconfig.getoption("--compile"))
    fn, reason = load(provider, case, device, skips.get(provider.name))
    if fn is None:
        pytest.skip(f"{provider.name}: {reason}")
    try:
        prepared = _prepared(family, case, device)
    except torch.cuda.OutOfMemoryError:
        pytest.skip(f"out of memory at {case.name}")
    try:
        _check_and_time(benchmark, family, case, provider, fn, prepared, copy_gbps, on_gpu)
    except torch.cuda.OutOfMemoryError:
        pytest.skip(f"{provider.name}: out of memory at {case.name}")
    finally:
        if provider.mutates and case.backward:
            prepared[0].rebuild()  # the next provider must see the original inputs


def _check_and_time(benchmark, family, case, provider, fn, prepared, copy_gbps, on_gpu):
    copy_gbps = None if family.cpu_figures else copy_gbps
    row, run = runner.check_provider(family, case, provider, fn, prepared, copy_gbps)
    if row["status"] == "oom":
        raise torch.cuda.OutOfMemoryError(row["status"])
    if run is None:
        message = f"{provider.name}: {row['status']}, off python_ref(float64) by {row['errors']} (not timed)"
        if provider.kind == "peer":
            pytest.skip(message)
        pytest.fail(message)
    counter = iter(range(10**9))

    def target(i):
        out = run(i)
        if on_gpu:
            torch.cuda.synchronize()
        return out

    benchmark.pedantic(target, setup=lambda: ((next(counter),), {}), iterations=1,
                       rounds=GPU_ROUNDS if on_gpu else CPU_ROUNDS, warmup_rounds=GPU_WARMUP if on_gpu else 0)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:  # absent with --benchmark-disable
        runner.record(family, case, provider, row, [t * 1e3 for t in stats.stats.data], run)
    benchmark.extra_info.update(row, interpreted=not on_gpu)
