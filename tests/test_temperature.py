"""The temperature costs no accuracy (docs/numerics.md#temperature) on every path: with large logits and
temperatures that are not powers of two, the error against float64 stays within the tolerance rule against
plain PyTorch's x / T, forward and backward. A temperature fp32 cannot apply is a ValueError naming it."""
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import covkernels as ck
import python_ref as ref
from covkernels.distributed import vocab_parallel_token_stats
from helpers import fma_rounds_once
from bench.tolerances import assert_close_to_ref

FIELDS = ("logp", "entropy", "lse", "sum_p2", "sum_p2_logp")
# The kernels' accuracy with the temperature rests on a fused multiply-add; under an interpreter that rounds
# tl.fma twice (Triton 3.6's) the Triton path is only as good as x * fp32(log2(e) / T), which these cases beat.
UNFUSED = None if fma_rounds_once() else (
    "this Triton's interpreter rounds tl.fma twice; compiled kernels fuse it")


def _skip_unfused(impl):
    if impl == "triton" and UNFUSED:
        pytest.skip(UNFUSED)


def _logits(n, V, scale, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, V, generator=g, dtype=torch.float64) * scale).to(dtype)


def _logits_ref(a, t, T):
    return ref.token_stats(a, t, temperature=T)


def _check(stats_fn, x, targets, T, dtype, ref_fn=_logits_ref):
    """stats_fn(x, targets, T) -> TokenStats, checked against ref_fn (python_ref) in float64 (truth) and in
    `dtype` (plain PyTorch's x / T): the values, and the gradient of a random combination of logp and entropy."""
    g = torch.Generator().manual_seed(7)
    g_logp, g_ent = torch.randn(2, *targets.shape, generator=g)
    results = []
    for fn, inp in ((stats_fn, x), (ref_fn, x.double()), (ref_fn, x)):
        a = inp.clone().requires_grad_()
        s = fn(a, targets, T)
        (s.logp * g_logp.to(s.logp.dtype) + s.entropy * g_ent.to(s.logp.dtype)).sum().backward()
        results.append((s, a.grad))
    (got, got_grad), (truth, truth_grad), (plain, plain_grad) = results
    for f in FIELDS:
        assert_close_to_ref(getattr(got, f), getattr(truth, f), getattr(plain, f), dtype, "fwd", f)
    assert_close_to_ref(got_grad, truth_grad, plain_grad, dtype, "bwd", "gradient")
    return truth


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_issue_case_large_fp32_logits(impl):
    """fp32 logits ~1e3, T = 1.388, V = 1044: multiplying by fp32(1/T) gave an entropy error of 1.65e-5 where
    plain PyTorch's x / T has 2.55e-6."""
    _skip_unfused(impl)
    x = _logits(6, 1044, 1e3, seed=3)
    targets = torch.randint(0, 1044, (6,), generator=torch.Generator().manual_seed(4))
    _check(lambda a, t, T: ck.token_stats(a, t, temperature=T, impl=impl), x, targets, 1.388, torch.float32)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lm_head_large_logits(impl, dtype):
    """Logits hidden @ weight.T in the hundreds; the gradient checked through hidden."""
    _skip_unfused(impl)
    g = torch.Generator().manual_seed(5)
    hidden = (torch.randn(12, 32, generator=g, dtype=torch.float64) * 40).to(dtype)
    weight = (torch.randn(300, 32, generator=g, dtype=torch.float64) * 4).to(dtype)
    targets = torch.randint(0, 300, (12,), generator=g)
    truth = _check(lambda h, t, T: ck.linear_token_stats(h, weight, t, temperature=T, impl=impl), hidden, targets,
                   1.388, dtype, ref_fn=lambda h, t, T: ref.linear_token_stats(h, weight.to(h.dtype), t, temperature=T))
    assert (truth.lse.abs() > 300).any()


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_vocab_parallel_large_logits(one_rank, impl):
    _skip_unfused(impl)
    x = _logits(6, 1044, 1e3, seed=8)
    targets = torch.randint(0, 1044, (6,), generator=torch.Generator().manual_seed(9))
    _check(lambda a, t, T: vocab_parallel_token_stats(a, t, vocab_start=0, vocab_group=one_rank, temperature=T,
                                                      impl=impl), x, targets, 1.388, torch.float32)


def _offset_logits(offset, spread, V, seed, dtype=torch.float32):
    """Logits far from 0 with a small spread: x / T rounds relative to |x|, differences from the max do not."""
    g = torch.Generator().manual_seed(seed)
    x = (offset + torch.randn(3, V, generator=g, dtype=torch.float64) * spread).to(dtype)
    return x, torch.randint(0, V, (3,), generator=g)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("offset, spread, V, T, seed", [(-2005.9, 0.22, 2, 1.828, 239), (-2368.5, 0.27, 7, 0.4709, 222)])
def test_fuzz_cases_where_multiplying_by_1_over_T_lost_accuracy(impl, offset, spread, V, T, seed):
    """Two cases of a differential fuzz where x * fp32(1/T) put logp 1.5-3x further from float64 than x / T."""
    _skip_unfused(impl)
    x, targets = _offset_logits(offset, spread, V, seed)
    _check(lambda a, t, T: ck.token_stats(a, t, temperature=T, impl=impl), x, targets, T, torch.float32)


@given(offset=st.floats(-3e3, 3e3), spread=st.floats(0.1, 30.0),
       temperature=st.floats(0.3, 3.0).filter(lambda t: t not in (0.5, 1.0, 2.0)), V=st.integers(2, 300),
       seed=st.integers(0, 2**16), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       impl=st.sampled_from(["triton", "torch"]))
def test_property_temperature_costs_no_accuracy(offset, spread, temperature, V, seed, dtype, impl):
    assume(impl == "torch" or not UNFUSED)
    x, targets = _offset_logits(offset, spread, V, seed, dtype)
    _check(lambda a, t, T: ck.token_stats(a, t, temperature=T, impl=impl), x, targets, temperature, dtype)


@pytest.mark.parametrize("temperature", [1e-40, 1e-39, 1e39, 1e300])
def test_temperature_fp32_cannot_apply_is_an_error(temperature):
    x = torch.randn(2, 8)
    t = torch.tensor([1, 2])
    for call in (lambda: ck.token_stats(x, t, temperature=temperature),
                 lambda: ck.logprobs_and_entropy(x, t, temperature=temperature),
                 lambda: ck.linear_token_stats(x, torch.randn(5, 8), t, temperature=temperature)):
        with pytest.raises(ValueError, match="temperature"):
            call()


def test_extreme_logits_in_safe_mode():
    """Logits near the fp32 limit at T < log2(e): x * log2(e) / T overflows, the kernels switch that row to
    differences from the max and stay exact."""
    x = torch.tensor([[3e38, -3e38, 0.0, 1e38], [1.0, 2.0, 3.0, 4.0]])
    targets = torch.tensor([3, 0])
    for impl in ("triton", "torch"):
        got = ck.token_stats(x, targets, temperature=0.9, impl=impl)
        want = ref.token_stats(x.double(), targets, temperature=0.9)
        for f in FIELDS:
            w = getattr(want, f)
            assert torch.allclose(getattr(got, f).double(), w, rtol=1e-6, atol=1e-6), (impl, f)
