"""The fused pass against python_ref (float64) on fresh random inputs: values, gradients, layouts."""
import math

import pytest
import torch

import covkernels as ck
import python_ref as ref
from covkernels.ops.fused_pass.kernels import fused_bwd, fused_fwd
from helpers import LAYOUTS, make_logits, make_targets, upstream
from bench.tolerances import assert_close_to_ref, max_err

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
VOCABS = [1, 2, 127, 4099, 50257]
IMPLS = ["triton", "torch"]
STAT_FIELDS = ("logp", "entropy", "lse", "p_target", "sum_p2", "sum_p2_logp")


def _check_forward_backward(logits, targets, dtype, temperature, impl):
    """Outputs and the gradient for a random upstream gradient on (logp, entropy) against python_ref."""
    g_logp, g_ent = upstream(targets.shape)
    results = []
    for run, x in ((ck.token_stats, logits.clone()), (ref.token_stats, logits.double()),
                   (ref.token_stats, logits.clone())):
        x.requires_grad_()
        stats = run(x, targets, temperature=temperature, impl=impl)
        (grad,) = torch.autograd.grad((stats.logp * g_logp + stats.entropy * g_ent).sum(), x)
        results.append((stats, grad))
    (stats, grad), (truth, g64), (lowp, glow) = results
    for f in STAT_FIELDS:
        assert getattr(stats, f).dtype == torch.float32 and getattr(stats, f).shape == targets.shape
        assert_close_to_ref(getattr(stats, f), getattr(truth, f), getattr(lowp, f), dtype, "fwd", f)
    assert grad.dtype == dtype and grad.shape == logits.shape
    assert_close_to_ref(grad, g64, glow, dtype, "bwd", "grad")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("V", VOCABS, ids=lambda v: f"V{v}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(dtype, V, layout, impl):
    n_rows = 4 if V > 4096 else 10
    logits = make_logits(layout, n_rows, V, dtype, seed=V)
    _check_forward_backward(logits, make_targets(logits), dtype, 1.0, impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [0.3, 1.7])
@pytest.mark.parametrize("target_dtype", [torch.int32, torch.int64], ids=str)
def test_temperature_and_int32_targets(temperature, target_dtype, impl):
    logits = make_logits("bt", 8, 300, torch.bfloat16)
    targets = make_targets(logits, dtype=target_dtype)
    _check_forward_backward(logits, targets, torch.bfloat16, temperature, impl)


@pytest.mark.parametrize("splits", [2, 3, 7])
def test_rows_split_over_programs(splits):
    """Splitting a row over programs (used when rows are few) changes nothing beyond rounding."""
    logits = make_logits("sliced", 6, 3000, torch.bfloat16)
    logits[0, 0, :2000] = float("-inf")  # a whole split of -inf
    targets = make_targets(logits)
    one = fused_fwd(logits, targets, 1.25, -100, True, splits=1)
    many = fused_fwd(logits, targets, 1.25, -100, True, splits=splits)
    for a, b in zip(one, many):
        assert max_err(a, b) <= 1e-5 * (1 + a.abs().max().item())
    g_logp, g_ent = upstream(targets.shape)
    args = (logits, targets, one[5], one[1], g_logp, g_ent, 1.25, -100)
    d1 = fused_bwd(*args, torch.empty(logits.shape, dtype=logits.dtype), splits=1)
    d2 = fused_bwd(*args, torch.empty(logits.shape, dtype=logits.dtype), splits=splits)
    assert torch.equal(d1, d2)


@pytest.mark.parametrize("impl", IMPLS)
def test_inplace_backward_writes_gradient_into_logits(impl):
    """As in a trainer: logits are a non-leaf (here a slice of one), the gradient lands in their storage
    and flows on to the parameters unchanged."""
    hidden = make_logits("flat", 10, 500, torch.bfloat16).view(2, 5, 500)
    targets = make_targets(hidden[:, :4])
    g_logp, g_ent = upstream(targets.shape)
    grads = []
    for inplace in (False, True):
        h = hidden.clone().requires_grad_()
        logits = (h * 1.0)[:, :4]
        logp, ent = ck.logprobs_and_entropy(logits, targets, impl=impl, inplace_backward=inplace)
        (logp * g_logp + ent * g_ent).sum().backward()
        grads.append(h.grad)
        if inplace:
            assert torch.equal(logits.detach(), h.grad[:, :4])
    assert torch.equal(grads[0], grads[1])
    assert (grads[1][:, 4:] == 0).all()


@pytest.mark.parametrize("impl", ["auto", "torch"])
def test_gradcheck_float64(impl):
    logits = torch.randn(3, 4, 37, dtype=torch.float64, requires_grad=True)
    targets = make_targets(logits)
    assert torch.autograd.gradcheck(
        lambda x: ck.logprobs_and_entropy(x, targets, temperature=0.5, impl=impl), (logits,))


def test_float64_takes_the_torch_path():
    """The kernels accumulate in fp32 with fp32 scalars: fp64 logits go to the PyTorch path (impl="auto"), and
    impl="triton" says so."""
    logits = torch.randn(3, 37, dtype=torch.float64)
    targets = make_targets(logits)
    auto = ck.token_stats(logits, targets, temperature=0.7)
    torch_path = ck.token_stats(logits, targets, temperature=0.7, impl="torch")
    assert all(torch.equal(a, b) for a, b in zip(auto[:6], torch_path[:6]))
    with pytest.raises(ValueError, match="logits in bf16, fp16 or fp32"):
        ck.token_stats(logits, targets, impl="triton")


@pytest.mark.parametrize("impl", IMPLS)
def test_single_output_gradients(impl):
    """Only logp, or only entropy, in the loss: the other output's gradient is None, not garbage."""
    logits = make_logits("flat", 6, 200, torch.float32)
    targets = make_targets(logits)
    for pick in (0, 1):
        x = logits.clone().requires_grad_()
        out = ck.logprobs_and_entropy(x, targets, impl=impl)[pick].sum()
        x64 = logits.double().requires_grad_()
        ref.logprobs_and_entropy(x64, targets)[pick].sum().backward()
        out.backward()
        assert max_err(x.grad, x64.grad) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_properties_and_closed_forms(impl):
    V = 1000
    logits = make_logits("flat", 12, V, torch.bfloat16, scale=5.0)
    logits[0] = 0.0  # uniform row: entropy log V, logp -log V
    logits[1] = float("-inf")
    logits[1, 7] = 2.0  # one finite entry: one-hot
    targets = make_targets(logits, ignore_every=0)
    targets[1] = 7
    s = ck.token_stats(logits, targets, impl=impl)
    assert (s.logp <= 0).all() and (s.entropy >= 0).all() and (s.entropy <= math.log(V) + 1e-5).all()
    assert abs(s.entropy[0].item() - math.log(V)) < 1e-5 and abs(s.logp[0].item() + math.log(V)) < 1e-5
    assert abs(s.sum_p2[0].item() - 1 / V) < 1e-8
    assert s.entropy[1].item() == 0.0 and s.logp[1].item() == 0.0 and s.sum_p2[1].item() == 1.0


@pytest.mark.parametrize("kind", ["pg", "npg"])
def test_entropy_change_matches_reference(kind):
    logits = make_logits("bt", 8, 333, torch.bfloat16)
    targets = make_targets(logits)
    adv = torch.randn(targets.shape)
    got = ck.entropy_change(ck.token_stats(logits, targets), adv, kind=kind, lr=0.1)
    want = ref.entropy_change(ref.token_stats(logits.double(), targets), adv.double(), kind=kind, lr=0.1)
    assert max_err(got, want) < 1e-5
