"""pytest-benchmark: forward and backward (the gradient of g_logp * logp + g_entropy * entropy).

Bytes per case: the forward's, then read logits Nv*V*e again + per-row vectors 24N + write the whole
gradient N*V*e (an in-place backward writes the same bytes into the logits and allocates nothing).
"""
from bench.suite import bench_logprobs

OP = "fwd_bwd"


def test_fwd_bwd(benchmark, case, provider, copy_gbps):
    bench_logprobs(benchmark, case, provider, copy_gbps)
