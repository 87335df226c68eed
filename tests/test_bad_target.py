"""A target outside [0, V) with validate=False (docs/numerics.md#bad-input): EVERY output of its row is NaN
(logp, entropy, lse, p_target, sum_p2, sum_p2_logp, clamped entropy) and so is its gradient, on every path
(logits, LM head, vocabulary-parallel; Triton and PyTorch); the other rows are exact and nothing is read out
of bounds.
"""
import pytest
import torch

import covkernels as ck
import python_ref as ref
from covkernels.distributed import vocab_parallel_token_stats
from helpers import make_logits, make_targets, upstream
from bench.tolerances import max_err

N_ROWS, V, D = 6, 97, 12
BAD_ROWS = [1, 4]  # targets V and -3
KEEP = torch.tensor([i not in BAD_ROWS for i in range(N_ROWS)])
FIELDS = ("logp", "entropy", "lse", "p_target", "sum_p2", "sum_p2_logp")
IMPLS = ["triton", "torch"]
VOCAB_IMPLS = IMPLS


def bad_targets(ignore_every=0):
    t = make_targets(torch.empty(N_ROWS, V), ignore_every=ignore_every)
    t[BAD_ROWS[0]], t[BAD_ROWS[1]] = V, -3
    return t


def check_rows(stats, grad, want, want_grad, fields):
    """NaN in every field and every gradient element of the bad rows; the reference elsewhere."""
    for f in fields:
        got = getattr(stats, f)
        assert got[BAD_ROWS].isnan().all(), f"{f} is not NaN in a bad row: {got[BAD_ROWS]}"
        assert max_err(got[KEEP], getattr(want, f)[KEEP]) < 1e-5, f
    assert grad[BAD_ROWS].isnan().all(), "the gradient of a bad row is not NaN everywhere"
    ulp = 2**-8 if grad.dtype == torch.bfloat16 else 1e-6  # the gradient is stored in the logits' dtype
    assert max_err(grad[KEEP], want_grad[KEEP]) <= ulp * (1 + want_grad[KEEP].abs().max().item())


def reference(x, targets, fn=ref.token_stats, **kw):
    """python_ref in float64 with the bad targets replaced by 0 (their rows are not compared)."""
    x64 = x.double().requires_grad_()
    safe = torch.where(KEEP, targets, 0)
    s = fn(x64, safe, **kw)
    return s, x64


def grads(stats, x, fields=("logp", "entropy")):
    ups = upstream(stats.logp.shape) + (upstream(stats.logp.shape, seed=7)[0],)
    outs = [getattr(stats, f) for f in fields]
    return torch.autograd.grad(outs, x, ups[:len(outs)])[0]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("clamp_fraction", [None, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_logits_path(dtype, clamp_fraction, impl):
    logits = make_logits("flat", N_ROWS, V, dtype)
    targets = bad_targets()
    x = logits.clone().requires_grad_()
    s = ck.token_stats(x, targets, temperature=0.9, clamp_fraction=clamp_fraction, validate=False, impl=impl)
    want, x64 = reference(logits, targets, temperature=0.9, clamp_fraction=clamp_fraction)
    diff = FIELDS[:2] + (("clamped_entropy",) if clamp_fraction is not None else ())
    check_rows(s, grads(s, x, diff), want, grads(want, x64, diff), FIELDS + diff[2:])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("which", ["logp", "entropy"])
def test_gradient_is_nan_whichever_output_is_used(which, impl):
    """A loss on the entropy alone (or the log-prob alone) still gets a NaN gradient in a bad row."""
    logits = make_logits("bt", N_ROWS, V, torch.float32)
    targets = bad_targets().view(logits.shape[:-1])
    x = logits.clone().requires_grad_()
    logp, entropy = ck.logprobs_and_entropy(x, targets, validate=False, impl=impl)
    assert logp.view(-1)[BAD_ROWS].isnan().all() and entropy.view(-1)[BAD_ROWS].isnan().all()
    (grad,) = torch.autograd.grad((logp if which == "logp" else entropy).sum(), x)
    assert grad.view(N_ROWS, V)[BAD_ROWS].isnan().all() and grad.view(N_ROWS, V)[KEEP].isfinite().all()


@pytest.mark.parametrize("impl", IMPLS)
def test_ignored_rows_stay_zero_beside_bad_rows(impl):
    logits = make_logits("padded", N_ROWS, V, torch.float32)
    targets = bad_targets()
    targets[[2, 5]] = -100
    x = logits.clone().requires_grad_()
    s = ck.token_stats(x, targets, clamp_fraction=0.5, validate=False, impl=impl)
    (grad,) = torch.autograd.grad(s.logp.nan_to_num().sum() + s.clamped_entropy.nan_to_num().sum(), x)
    for f in FIELDS + ("clamped_entropy",):
        assert (getattr(s, f)[[2, 5]] == 0).all() and getattr(s, f)[BAD_ROWS].isnan().all(), f
    assert (grad[[2, 5]] == 0).all() and grad[BAD_ROWS].isnan().all() and grad[[0, 3]].isfinite().all()


def make_head(dtype):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(N_ROWS, D, generator=g).to(dtype)
    weight = (torch.randn(V, D, generator=g) * 0.5).to(dtype)
    bias = torch.randn(V, generator=g).to(dtype)
    return hidden, weight, bias


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lm_head_path(dtype, impl):
    hidden, weight, bias = make_head(dtype)
    targets = bad_targets()
    h = hidden.clone().requires_grad_()
    s = ck.linear_token_stats(h, weight, targets, bias=bias, temperature=1.3, validate=False, impl=impl)
    h64 = hidden.double().requires_grad_()
    want = ref.linear_token_stats(h64, weight.double(), torch.where(KEEP, targets, 0), bias=bias.double(),
                                  temperature=1.3)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]  # d_hidden is stored in hidden's dtype
    for f in FIELDS:
        got = getattr(s, f)
        assert got[BAD_ROWS].isnan().all(), f"{f} is not NaN in a bad row: {got[BAD_ROWS]}"
        assert max_err(got[KEEP], getattr(want, f)[KEEP]) < 1e-5, f
    d_h, d_h64 = grads(s, h), grads(want, h64)
    assert d_h[BAD_ROWS].isnan().all()
    assert max_err(d_h[KEEP], d_h64[KEEP]) < tol * (1 + d_h64[KEEP].abs().max().item())


@pytest.mark.parametrize("impl", VOCAB_IMPLS)
def test_vocab_parallel_path(one_rank, impl):
    logits = make_logits("flat", N_ROWS, V, torch.float32)
    targets = bad_targets()
    x = logits.clone().requires_grad_()
    s = vocab_parallel_token_stats(x, targets, vocab_start=0, vocab_group=one_rank, temperature=0.9,
                                   validate=False, impl=impl)
    want, x64 = reference(logits, targets, temperature=0.9)
    check_rows(s, grads(s, x), want, grads(want, x64), FIELDS)
