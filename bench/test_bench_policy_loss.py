"""pytest-benchmark: the whole policy loss, forward and backward to the logits, per method and provider.

Providers: covkernels.policy_loss (skipped, with the reason, while it is not importable), python_ref
eager, torch.compile(python_ref) and verl (torch log-probs + entropy, then core_algos' loss). Each is
first checked against python_ref in float64 on a small instance of the case (bench.policy.check).
Bytes per case are the fused pass's fwd_bwd count: the loss itself adds O(N) traffic to the 3 N V e of
the logits (two reads of the valid rows, one write of the gradient).
"""
import pytest
import torch

from bench import cases as C
from bench import policy, runner, timing
from bench.providers import Unavailable
from bench.suite import bench_mode, cached, skip_reason, time_with_pytest_benchmark


def pytest_generate_tests(metafunc):
    todo = [c for c in C.cases(bench_mode(metafunc.config), ops=("fwd_bwd",)) if c.pad]
    metafunc.parametrize("case", todo, ids=[c.name.split(" ", 1)[1].replace(" ", "-") for c in todo])
    metafunc.parametrize("method", policy.METHODS)
    metafunc.parametrize("provider", list(policy.PROVIDERS))


def _inputs(case, device):
    n_sets = C.n_input_sets(case, *runner._memory_facts(device))
    return cached(("policy", case),
                  lambda: [policy.make_policy_inputs(case, device, seed=s) for s in range(n_sets)])


def test_policy_loss(benchmark, case, method, provider, copy_gbps):
    reason = skip_reason(provider)
    if reason:
        pytest.skip(f"{provider}: {reason}")
    try:
        fn = policy.PROVIDERS[provider]()
    except Unavailable as e:
        pytest.skip(f"{provider}: {e}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loss_err, grad_err, ok = policy.check(fn, case, device, method)
    if not ok:
        message = f"{provider} {method}: off python_ref(float64): loss {loss_err:.2e}, grad {grad_err:.2e}"
        if policy.KINDS[provider] == "peer":
            pytest.skip(message)
        pytest.fail(message)
    sets = _inputs(case, device)
    bytes_moved = C.bytes_moved(case)

    def run(i):
        return policy.loss_and_grad(fn, sets[i % len(sets)], method)

    try:
        extra = {"case": case.name, "method": method, "provider": provider, "loss_err": loss_err,
                 "grad_err": grad_err, "bytes": bytes_moved, "input_sets": len(sets), "copy_gbps": copy_gbps,
                 "interpreted": not torch.cuda.is_available(),
                 "peak_extra_bytes": timing.peak_extra_bytes(run)}
        time_with_pytest_benchmark(benchmark, run, extra, copy_gbps, bytes_moved)
    except torch.cuda.OutOfMemoryError:
        pytest.skip(f"{provider}: out of memory at {case.name}")
