"""pytest-benchmark: the forward (log-prob and entropy of every row) per provider and case.

Bytes per case (valid rows Nv of N, e bytes per logit): read logits Nv*V*e + read targets 8N + write
logp, entropy 8N. Parametrised by conftest.pytest_generate_tests over bench.cases and bench.providers.
"""
from bench.suite import bench_logprobs

OP = "fwd"


def test_fwd(benchmark, case, provider, copy_gbps):
    bench_logprobs(benchmark, case, provider, copy_gbps)
