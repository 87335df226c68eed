"""The fused LM head against python_ref (float64) on fresh random inputs: statistics, the gradients of
hidden, weight and bias, layouts, hostile values and bad input."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import covkernels as ck
import python_ref as ref
from helpers import LAYOUTS, make_logits, make_targets, upstream
from bench.tolerances import assert_close_to_ref

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
IMPLS = ["triton", "torch"]
STAT_FIELDS = ("logp", "entropy", "lse", "p_target", "sum_p2", "sum_p2_logp")
# (D, V, layout of hidden, bias): odd sizes, V = 1 and 2, every layout, with and without bias.
SHAPES = [(1, 1, "flat", True), (7, 2, "bt", False), (40, 127, "sliced", True), (7, 300, "padded", False),
          (1, 127, "bt", False), (40, 300, "flat", True)]


def make_head(layout, n_rows, D, V, dtype, bias=True, scale=3.0, seed=0):
    """hidden [..., D] in `layout` (see helpers.make_logits), weight [V, D], bias [V] or None; logits of
    standard deviation about `scale`."""
    hidden = make_logits(layout, n_rows, D, dtype, scale=1.0, seed=seed)
    g = torch.Generator().manual_seed(seed + 1000)
    weight = (torch.randn(V, D, generator=g, dtype=torch.float64) * scale / math.sqrt(D)).to(dtype)
    b = torch.randn(V, generator=g, dtype=torch.float64).to(dtype) if bias else None
    return hidden, weight, b


def run_head(lib, hidden, weight, bias, targets, grads=(True, True, True), cast=None, seed=2, **kw):
    """(TokenStats, gradients of the inputs asked for) of lib.linear_token_stats for a random upstream
    gradient on (logp, entropy); cast upcasts every input (the float64 truth); without it layouts are kept."""
    cast = cast or (lambda x: x.detach())
    h, w = cast(hidden), cast(weight)
    b = None if bias is None else cast(bias)
    leaves = [x.requires_grad_() for x, need in zip((h, w, b), grads) if need and x is not None]
    stats = lib.linear_token_stats(h, w, targets, bias=b, **kw)
    g_logp, g_ent = upstream(targets.shape, seed=seed)
    out = torch.autograd.grad((stats.logp * g_logp + stats.entropy * g_ent).sum(), leaves) if leaves else ()
    return stats, list(out)


def check_against_reference(hidden, weight, bias, targets, dtype, grads=(True, True, True), ref_hidden=None,
                            **kw):
    """The kernel, plain PyTorch in `dtype` and the float64 truth on the same inputs (ref_hidden in place of
    hidden for the two references when given); the tolerance rule on every statistic and gradient. Returns
    the kernel's (stats, gradients)."""
    stats, got = run_head(ck, hidden, weight, bias, targets, grads, **kw)
    ref_hidden = hidden if ref_hidden is None else ref_hidden
    truth, want = run_head(ref, ref_hidden, weight, bias, targets, grads, cast=lambda x: x.double(), **kw)
    lowp, plain = run_head(ref, ref_hidden, weight, bias, targets, grads, **kw)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for f in STAT_FIELDS:
        x = getattr(stats, f)
        assert x.dtype == out_dtype and x.shape == targets.shape, f
        assert_close_to_ref(x, getattr(truth, f), getattr(lowp, f), dtype, "fwd", f)
    assert stats.clamped_entropy is None
    named = [(n, x) for n, x, need in zip(("d_hidden", "d_weight", "d_bias"), (hidden, weight, bias), grads)
             if need and x is not None]
    for (name, x), g, g64, glow in zip(named, got, want, plain):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        assert_close_to_ref(g, g64, glow, dtype, "bwd", name)
    return stats, got


def targets_for(hidden, V, **kw):
    """helpers.make_targets for an LM head: targets of shape hidden.shape[:-1] in [0, V), some ignored."""
    return make_targets(torch.empty(*hidden.shape[:-1], V), **kw)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("D,V,layout,bias", SHAPES, ids=[f"D{d}-V{v}-{lay}-{'bias' if b else 'nobias'}"
                                                         for d, v, lay, b in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(dtype, D, V, layout, bias, impl):
    hidden, weight, b = make_head(layout, 12, D, V, dtype, bias=bias, seed=D * V)
    targets = targets_for(hidden, V)
    stats, (d_hidden, *_) = check_against_reference(hidden, weight, b, targets, dtype, impl=impl)
    ignored = targets == -100
    assert ignored.any() and (d_hidden[ignored] == 0).all()
    for f in STAT_FIELDS:
        assert (getattr(stats, f)[ignored] == 0).all(), f


def _strided(x, how):
    """x's values in another layout: "transposed" (a transpose of a contiguous tensor: the last dim not
    contiguous), "wide" (rows of a wider buffer), "every-other" (every other element of a longer buffer)."""
    if how == "transposed":
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if how == "wide":
        return torch.cat([x, torch.full((*x.shape[:-1], 5), float("nan"), dtype=x.dtype)], -1)[..., :-5]
    if how == "every-other":
        return torch.stack([x, torch.full_like(x, float("nan"))], -1).flatten(-2)[..., ::2]
    raise ValueError(how)


LAYOUT_CASES = [("hidden", "transposed"), ("weight", "transposed"), ("weight", "wide"),
                ("bias", "every-other")]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("which,how", LAYOUT_CASES, ids=[f"{w}-{h}" for w, h in LAYOUT_CASES])
def test_strided_operands(which, how, impl):
    """Any layout of hidden, weight and bias gives the same numbers (the unused elements of the buffers
    around them are NaN, so reading one shows), and gradients of the operands' shapes."""
    hidden, weight, bias = make_head("flat", 20, 24, 150, torch.bfloat16)
    targets = targets_for(hidden, 150)
    ops = {"hidden": hidden, "weight": weight, "bias": bias}
    ops[which] = _strided(ops[which], how)
    assert torch.equal(ops[which], {"hidden": hidden, "weight": weight, "bias": bias}[which])
    assert not ops[which].is_contiguous()
    check_against_reference(ops["hidden"], ops["weight"], ops["bias"], targets, torch.bfloat16, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_temperature_and_int32_targets(dtype, impl):
    hidden, weight, bias = make_head("bt", 16, 24, 300, dtype)
    targets = targets_for(hidden, 300, dtype=torch.int32)
    check_against_reference(hidden, weight, bias, targets, dtype, temperature=0.7, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("grads", [(True, False, False), (False, True, True), (False, True, False)],
                         ids=["hidden", "weight-bias", "weight"])
def test_gradients_of_a_subset_of_the_inputs(grads, impl):
    """A frozen LM head (only hidden needs a gradient) and a frozen trunk (only the head does)."""
    hidden, weight, bias = make_head("sliced", 10, 9, 200, torch.bfloat16)
    check_against_reference(hidden, weight, bias, targets_for(hidden, 200), torch.bfloat16, grads, impl=impl)


@pytest.mark.parametrize("impl", ["auto", "torch"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradcheck_float64(bias, impl):
    hidden, weight, b = make_head("bt", 6, 5, 11, torch.float64, bias=bias)
    targets = targets_for(hidden, 11)
    inputs = tuple(x.clone().requires_grad_() for x in (hidden, weight, b) if x is not None)

    def fn(h, w, b=None):
        return ck.linear_logprobs_and_entropy(h, w, targets, bias=b, temperature=0.7, impl=impl)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("impl", ["auto", "torch"])
def test_float64_inputs_give_float64_to_float64_precision(impl):
    hidden, weight, bias = make_head("bt", 8, 13, 150, torch.float64)
    check_against_reference(hidden, weight, bias, targets_for(hidden, 150), torch.float64, impl=impl)


def test_float64_refuses_the_triton_kernels():
    hidden, weight, bias = make_head("bt", 4, 5, 20, torch.float64)
    with pytest.raises(ValueError, match="hidden in bf16, fp16 or fp32"):
        ck.linear_logprobs_and_entropy(hidden, weight, targets_for(hidden, 20), impl="triton")


@given(dtype=st.sampled_from(DTYPES), D=st.integers(1, 48), V=st.integers(1, 300),
       rows=st.integers(1, 8).map(lambda n: 2 * n), layout=st.sampled_from(LAYOUTS), bias=st.booleans(),
       temperature=st.floats(0.3, 3.0), ignore_every=st.sampled_from([0, 2, 5]), impl=st.sampled_from(IMPLS),
       seed=st.integers(0, 2**16))
def test_matches_reference_on_random_shapes(dtype, D, V, rows, layout, bias, temperature, ignore_every, impl,
                                            seed):
    hidden, weight, b = make_head(layout, rows, D, V, dtype, bias=bias, seed=seed)
    targets = targets_for(hidden, V, ignore_every=ignore_every, seed=seed)
    stats, (d_hidden, *_) = check_against_reference(hidden, weight, b, targets, dtype,
                                                    temperature=temperature, impl=impl)
    assert (stats.logp <= 0).all() and (stats.entropy >= 0).all()
    assert (d_hidden[targets == -100] == 0).all()
