"""Hostile values and bad input for the fused pass: row isolation, extreme logits, clear errors."""
import math

import pytest
import torch

import covkernels as ck
import python_ref as ref
from helpers import make_logits, make_targets, upstream
from bench.tolerances import max_err

IMPLS = ["triton", "torch"]


def _run(logits, targets, impl, **kw):
    x = logits.clone().requires_grad_()
    logp, ent = ck.logprobs_and_entropy(x, targets, impl=impl, **kw)
    g_logp, g_ent = upstream(targets.shape)
    (logp * g_logp + ent * g_ent).sum().backward()
    return logp.detach(), ent.detach(), x.grad


def _reference(logits, targets):
    x = logits.double().requires_grad_()
    logp, ent = ref.logprobs_and_entropy(x, targets)
    g_logp, g_ent = upstream(targets.shape)
    (logp * g_logp + ent * g_ent).sum().backward()
    return logp.detach(), ent.detach(), x.grad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("poison", ["nan", "inf"])
def test_bad_row_stays_in_its_row(impl, poison):
    """NaN or +inf in one row gives NaN in that row only; every other row is exact."""
    logits = make_logits("flat", 6, 777, torch.float32)
    targets = make_targets(logits, ignore_every=0)
    logits[2, 100] = float(poison)
    logp, ent, grad = _run(logits, targets, impl)
    assert logp[2].isnan() and ent[2].isnan()
    keep = torch.arange(6) != 2
    for got, exp in zip((logp, ent, grad), _reference(logits, targets)):
        assert max_err(got[keep], exp[keep]) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_ignored_rows_are_zero_and_never_read(impl):
    logits = make_logits("bt", 8, 300, torch.bfloat16)
    targets = make_targets(logits, ignore_every=2)
    ignored = targets == -100
    logits[ignored] = float("nan")  # would poison every output of these rows if they were read
    logp, ent, grad = _run(logits, targets, impl)
    assert (logp[ignored] == 0).all() and (ent[ignored] == 0).all() and (grad[ignored] == 0).all()
    assert logp[~ignored].isfinite().all() and grad[~ignored].isfinite().all()


@pytest.mark.parametrize("impl", IMPLS)
def test_all_rows_ignored(impl):
    logits = make_logits("bt", 6, 50, torch.bfloat16)
    targets = torch.full(logits.shape[:-1], -7)
    logp, ent, grad = _run(logits, targets, impl, ignore_index=-7)
    assert (logp == 0).all() and (ent == 0).all() and (grad == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_huge_and_neg_inf_logits(impl, dtype):
    """Logits of +-1e4 and -inf entries (legal: probability 0) against the float64 reference."""
    logits = make_logits("flat", 6, 1025, torch.float64, scale=1.0)
    logits = torch.where(logits > 0, 1e4, -1e4) * torch.rand(logits.shape, dtype=torch.float64)
    logits[0, ::2] = float("-inf")
    logits[3, :-1] = float("-inf")
    logits = logits.to(dtype)
    targets = make_targets(logits, ignore_every=0)
    targets[0] = 1
    logp, ent, grad = _run(logits, targets, impl)
    want = _reference(logits, targets)
    assert (logp <= 0).all() and (ent >= 0).all()
    assert max_err(logp, want[0]) <= 2e-7 * 1e4 and max_err(ent, want[1]) < 1e-4
    assert max_err(grad, want[2]) <= 2**-7
    assert logp[3].item() == (0.0 if targets[3] == 1024 else float("-inf"))


@pytest.mark.parametrize("impl", IMPLS)
def test_target_out_of_range_without_validation(impl):
    """validate=False: a bad target never reads out of bounds; its row is NaN, the others exact."""
    logits = make_logits("flat", 5, 64, torch.float32)
    targets = make_targets(logits, ignore_every=0)
    targets[1], targets[3] = 64, -5
    logp, ent, grad = _run(logits, targets, impl, validate=False)
    assert logp[1].isnan() and logp[3].isnan() and grad[1].isnan().all() and grad[3].isnan().all()
    keep = torch.tensor([True, False, True, False, True])
    want = _reference(logits, torch.where(keep, targets, 0))
    assert max_err(logp[keep], want[0][keep]) < 1e-5 and max_err(grad[keep], want[2][keep]) < 1e-5


def test_temperature_scales_gradient():
    """d/dz of z/T: halving T doubles nothing but rescales the gradient by 1/T (checked in float64)."""
    x = torch.randn(4, 9, dtype=torch.float64)
    targets = torch.tensor([0, 3, 8, 1])
    for T in (0.25, 4.0):
        a = x.clone().requires_grad_()
        ck.logprobs_and_entropy(a, targets, temperature=T)[0].sum().backward()
        b = (x / T).requires_grad_()
        ck.logprobs_and_entropy(b, targets)[0].sum().backward()
        assert torch.allclose(a.grad, b.grad / T, atol=1e-12)


BAD_INPUTS = [
    ("logits list", lambda x, t: ([1.0], t), {}, TypeError, "logits"),
    ("int logits", lambda x, t: (x.long(), t), {}, TypeError, "logits"),
    ("float targets", lambda x, t: (x, t.float()), {}, TypeError, "targets"),
    ("shape mismatch", lambda x, t: (x, t[:, :-1]), {}, ValueError, "targets must have shape"),
    ("empty vocab", lambda x, t: (x[..., :0], t), {}, ValueError, "vocabulary"),
    ("zero temperature", lambda x, t: (x, t), {"temperature": 0.0}, ValueError, "temperature"),
    ("negative temperature", lambda x, t: (x, t), {"temperature": -1.0}, ValueError, "temperature"),
    ("nan temperature", lambda x, t: (x, t), {"temperature": float("nan")}, ValueError, "temperature"),
    ("string temperature", lambda x, t: (x, t), {"temperature": "hot"}, TypeError, "temperature"),
    ("unknown impl", lambda x, t: (x, t), {"impl": "cuda"}, ValueError, "impl"),
    ("target too large", lambda x, t: (x, t.fill_(10)), {}, ValueError, "targets must be in"),
    ("negative target", lambda x, t: (x, t.fill_(-1)), {}, ValueError, "targets must be in"),
    ("float ignore_index", lambda x, t: (x, t), {"ignore_index": 1.5}, TypeError, "ignore_index"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
@pytest.mark.parametrize("fn", [ck.logprobs_and_entropy, ck.token_stats], ids=["logprobs", "token_stats"])
def test_bad_input_raises_naming_the_argument(fn, case, monkeypatch):
    _, make, kwargs, exc, match = case
    monkeypatch.setattr("covkernels.ops.fused_pass.op.fused_fwd", _no_launch)
    monkeypatch.setattr("covkernels.ops.fused_pass.op.fused_fwd_torch", _no_launch)
    logits, targets = make(torch.randn(2, 3, 10), torch.randint(0, 10, (2, 3)))
    with pytest.raises(exc, match=match):
        fn(logits, targets, **kwargs)


def _no_launch(*args, **kwargs):
    raise AssertionError("a kernel was launched before the input was validated")


def test_entropy_change_rejects_bad_arguments():
    stats = ck.token_stats(torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="kind"):
        ck.entropy_change(stats, torch.ones(2), kind="sgd")
    with pytest.raises(ValueError, match="lr"):
        ck.entropy_change(stats, torch.ones(2), lr=0.0)


def test_uniform_entropy_is_log_v_for_odd_sizes():
    for V in (1, 2, 3, 4097):
        s = ck.token_stats(torch.zeros(2, V, dtype=torch.bfloat16), torch.tensor([0, V - 1]))
        assert torch.allclose(s.entropy, torch.full((2,), math.log(V)), atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["strided", "expanded"])
def test_non_contiguous_targets(impl, kind):
    """Targets are read by row index: a strided or expanded (stride 0) tensor must not be read as if flat."""
    logits = make_logits("flat", 6, 50, torch.float32)
    if kind == "strided":
        targets = torch.randint(0, 50, (6, 2), generator=torch.Generator().manual_seed(0))[:, 1]
    else:
        targets = torch.tensor(7).expand(6)
    assert not targets.is_contiguous()
    for clamp in (None, 0.3):
        got = ck.token_stats(logits, targets, impl=impl, clamp_fraction=clamp)
        want = ref.token_stats(logits.double(), targets.contiguous(), clamp_fraction=clamp)
        assert max_err(got.logp, want.logp) < 1e-5 and max_err(got.entropy, want.entropy) < 1e-5
    logp, ent, grad = _run(logits, targets, impl)
    assert max_err(grad, _reference(logits, targets.contiguous())[2]) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["four_dim_slice", "transposed"])
def test_inplace_backward_through_a_copying_layout(impl, layout):
    """Layouts two strides cannot describe are read through a copy; in place, the gradient must still land
    in the logits' own storage (not be lost in the copy)."""
    g = torch.Generator().manual_seed(0)
    if layout == "four_dim_slice":
        base = torch.randn(2, 3, 5, 40, generator=g)
        view = lambda t: t[:, :-1, :-1, :]  # noqa: E731
    else:
        base = torch.randn(40, 6, generator=g)
        view = lambda t: t.t()  # noqa: E731
    targets = torch.randint(0, 40, view(base).shape[:-1], generator=g)
    grads = []
    for inplace in (False, True):
        h = base.clone().requires_grad_()
        logits = view(h * 1.0)
        logp, ent = ck.logprobs_and_entropy(logits, targets, impl=impl, inplace_backward=inplace)
        (logp.sum() + 0.5 * ent.sum()).backward()
        grads.append(h.grad)
    assert torch.equal(grads[0], grads[1])
