"""entropy_change_from_logits against python_ref (float64): values, layouts, masks, -inf, the first-order
gap, memory, compile and bad input."""
import os
import subprocess
import sys

import pytest
import torch

import covkernels as ck
import python_ref as ref
from covkernels.ops.entropy_change.kernels import entropy_change_fwd
from covkernels.ops.entropy_change.torch_path import entropy_change_fwd_torch
from covkernels.ops.common import layout
from helpers import fma_rounds_once, make_logits
from test_memory import AllocationLog
from bench.tolerances import assert_close_to_ref, max_err

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
IMPLS = ["triton", "torch"]
# Every layout of helpers.make_logits appears across the vocabularies: [B, T] leading dims, a slice that
# does not merge, rows of a wider buffer.
CASES = [(1, "bt"), (2, "sliced"), (257, "padded"), (5003, "bt")]


def row(x, k):
    """Row k of logits from helpers.make_logits (a writable view)."""
    return x[0, k] if x.dim() == 3 else x[k]


def make_pair(layout, n_rows, V, dtype, step=0.05, scale=3.0, seed=0):
    """(before, after): random logits and a random update of size `step`, both in `dtype` and `layout`;
    the first half of row 0 is -inf in both, and one entry of row 1 -inf only before (p = 0, dz = inf)."""
    before = make_logits(layout, n_rows, V, torch.float64, scale=scale, seed=seed)
    after = before + step * make_logits(layout, n_rows, V, torch.float64, scale=1.0, seed=seed + 1)
    if V > 2:
        row(before, 0)[: V // 2] = row(after, 0)[: V // 2] = float("-inf")
        row(before, 1)[1] = float("-inf")
    return before.to(dtype), after.to(dtype)


def row_mask_for(before, seed=3):
    mask = torch.rand(before.shape[:-1], generator=torch.Generator().manual_seed(seed)) > 0.3
    mask.view(-1)[0] = mask.view(-1)[1] = True
    return mask


def check_against_reference(before, after, dtype, temperature=0.7, row_mask=None, impl="triton"):
    got = ck.entropy_change_from_logits(before, after, temperature=temperature, row_mask=row_mask, impl=impl)
    truth = ref.entropy_change_from_logits(before.double(), after.double(), temperature=temperature,
                                           row_mask=row_mask)
    lowp = ref.entropy_change_from_logits(before, after, temperature=temperature, row_mask=row_mask)
    for name in ("predicted", "actual"):
        out = getattr(got, name)
        assert out.dtype == torch.float32 and out.shape == before.shape[:-1], name
        assert_close_to_ref(out, getattr(truth, name), getattr(lowp, name), dtype, "fwd", name)
    return got, truth


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("V, layout", CASES, ids=[f"V{v}-{lay}" for v, lay in CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(dtype, V, layout, impl):
    before, after = make_pair(layout, 4 if V > 4096 else 10, V, dtype, seed=V)
    mask = row_mask_for(before)
    got, truth = check_against_reference(before, after, dtype, row_mask=mask, impl=impl)
    assert (got.predicted[~mask] == 0).all() and (got.actual[~mask] == 0).all()
    if V > 1:
        # The case measures something: the changes are far above the tolerance.
        assert truth.predicted.abs().max() > 1e-3 and truth.actual.abs().max() > 1e-3


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [0.3, 1.7, 1.0])
def test_temperature(temperature, impl):
    before, after = make_pair("bt", 6, 700, torch.float32, seed=1)
    check_against_reference(before, after, torch.float32, temperature=temperature, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_large_logits(impl):
    if impl == "triton" and not fma_rounds_once():
        pytest.skip("this Triton's interpreter rounds tl.fma twice; a GPU (and Triton 3.9's interpreter) once")
    before, after = make_pair("bt", 6, 700, torch.float32, seed=1)
    shift = torch.tensor([3000.0, -5000.0])[:, None, None]  # offsets per sequence: softmax-invariant
    check_against_reference(before + shift, after + shift, torch.float32, temperature=0.7, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_update_is_exactly_zero_and_a_row_shift_changes_nothing(impl):
    before, after = make_pair("flat", 5, 300, torch.float32, seed=2)
    same = ck.entropy_change_from_logits(before, before.clone(), impl=impl)
    assert (same.predicted == 0).all() and (same.actual == 0).all()
    base = ck.entropy_change_from_logits(before, after, impl=impl)
    shifted = ck.entropy_change_from_logits(before, after + 2.5, impl=impl)
    assert max_err(shifted.predicted, base.predicted) <= 1e-6 and max_err(shifted.actual, base.actual) <= 1e-6


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_rows_give_zero_and_nan_stays_in_its_row(impl):
    before, after = make_pair("bt", 8, 129, torch.bfloat16, seed=4)
    mask = torch.ones(before.shape[:-1], dtype=torch.bool)
    mask[0, 1] = mask[1, 2] = False
    before[0, 1] = float("nan")  # masked: never contributes
    after[1, 2, 5] = float("nan")
    before[1, 0, 7] = float("nan")  # valid: that row is NaN, and only that row
    out = ck.entropy_change_from_logits(before, after, row_mask=mask.int(), impl=impl)
    assert out.predicted[0, 1] == 0 and out.actual[0, 1] == 0 and out.actual[1, 2] == 0
    assert out.predicted[1, 0].isnan() and out.actual[1, 0].isnan()
    finite = torch.ones_like(mask)
    finite[1, 0] = False
    assert out.predicted[finite].isfinite().all() and out.actual[finite].isfinite().all()
    none = ck.entropy_change_from_logits(before, after, row_mask=torch.zeros_like(mask), impl=impl)
    assert (none.predicted == 0).all() and (none.actual == 0).all()


def test_fp64_takes_the_torch_path_in_fp64():
    before, after = make_pair("bt", 6, 300, torch.float64, seed=5)
    got = ck.entropy_change_from_logits(before, after, temperature=0.7)
    want = ref.entropy_change_from_logits(before, after, temperature=0.7)
    assert got.predicted.dtype == torch.float64
    assert max_err(got.predicted, want.predicted) <= 1e-13 and max_err(got.actual, want.actual) <= 1e-13


@pytest.mark.parametrize("impl", IMPLS)
def test_gap_shrinks_like_the_step_squared(impl):
    """Lemma 1 is first order: halving the logit update quarters actual - predicted (fp32 inputs)."""
    before = make_logits("bt", 16, 1000, torch.float64, scale=2.0, seed=6)
    direction = make_logits("bt", 16, 1000, torch.float64, scale=1.0, seed=7)
    gaps, sizes = [], []
    for step in (0.2, 0.1, 0.05, 0.025):
        out = ck.entropy_change_from_logits(before.float(), (before + step * direction).float(), impl=impl)
        gaps.append((out.actual - out.predicted).norm().item())
        sizes.append(out.actual.norm().item())
    for big, small in zip(gaps, gaps[1:]):
        assert 3.5 < big / small < 4.5, gaps
    assert gaps[-1] < 0.1 * sizes[-1]  # and the prediction is close: within 10 % at the smallest step


def test_triton_launcher_allocates_only_row_vectors():
    before, after = make_pair("sliced", 64, 5000, torch.bfloat16)
    mask = torch.ones(before.shape[:-1], dtype=torch.bool)
    with AllocationLog() as log:
        entropy_change_fwd(before, after, mask, 0.7)
    assert sum(log.sizes) <= 2 * 64 * 4


def test_torch_path_works_in_bounded_blocks(monkeypatch):
    before, after = make_pair("sliced", 64, 5000, torch.bfloat16)
    mask = torch.ones(before.shape[:-1], dtype=torch.bool)
    monkeypatch.setattr(layout, "CHUNK_ELEMS", 2 * 4 * 5000)
    with AllocationLog() as log:
        entropy_change_fwd_torch(before, after, mask, 0.7)
    # fp32 temporaries of one block of 4 rows at a time: far below one [N, V] fp32 copy.
    assert max(log.sizes) <= 4 * 5000 * 4 and max(log.sizes) * 8 < 64 * 5000 * 4


@pytest.mark.parametrize("impl", IMPLS)
def test_compiles_whole(impl):
    before, after = make_pair("bt", 6, 300, torch.bfloat16, seed=8)

    def probe(b, a):
        change = ck.entropy_change_from_logits(b * 1.0, a, temperature=0.7, impl=impl)
        return change.predicted.sum(), change.actual.sum()

    torch._dynamo.reset()
    want = probe(before, after)
    got = torch.compile(probe, fullgraph=True, backend="aot_eager")(before, after)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_inputs_that_require_grad_give_detached_outputs():
    before = torch.randn(3, 40, requires_grad=True)
    out = ck.entropy_change_from_logits(before, before * 1.1)
    assert not out.predicted.requires_grad and not out.actual.requires_grad


@pytest.mark.parametrize("args, kwargs, error, match", [
    (([1.0], torch.zeros(2, 3)), {}, TypeError, "logits_before"),
    ((torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3)), {}, TypeError, "logits_before"),
    ((torch.zeros(2, 3), torch.zeros(2, 4)), {}, ValueError, "logits_after"),
    ((torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bfloat16)), {}, TypeError, "logits_after"),
    ((torch.zeros(2, 0), torch.zeros(2, 0)), {}, ValueError, "logits_before"),
    ((torch.zeros(2, 3), torch.zeros(2, 3)), {"temperature": 0.0}, ValueError, "temperature"),
    ((torch.zeros(2, 3), torch.zeros(2, 3)), {"temperature": float("inf")}, ValueError, "temperature"),
    ((torch.zeros(2, 3), torch.zeros(2, 3)), {"temperature": 1e-39}, ValueError, "temperature"),
    ((torch.zeros(2, 3), torch.zeros(2, 3)), {"temperature": 1e39}, ValueError, "temperature"),
    ((torch.zeros(2, 3), torch.zeros(2, 3)), {"row_mask": torch.ones(3, dtype=torch.bool)}, ValueError, "row_mask"),
    ((torch.zeros(2, 3), torch.zeros(2, 3)), {"row_mask": torch.ones(2)}, TypeError, "row_mask"),
    ((torch.zeros(2, 3), torch.zeros(2, 3)), {"impl": "cuda"}, ValueError, "impl"),
    ((torch.zeros(2, 3, dtype=torch.float64),) * 2, {"impl": "triton"}, ValueError, "impl"),
], ids=["not-a-tensor", "int-logits", "shape", "dtype", "empty-vocab", "temperature-0", "temperature-inf",
        "reciprocal-overflows", "reciprocal-underflows", "mask-shape", "mask-dtype", "impl", "fp64-triton"])
def test_rejects_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        ck.entropy_change_from_logits(*args, **kwargs)


def test_reference_closed_form_two_actions():
    """Two actions, logits (0, a) -> (0, a + h): H(a) is known in closed form; predicted = H'(a) h."""
    a, h = 0.8, 1e-4
    out = ref.entropy_change_from_logits(torch.tensor([[0.0, a]], dtype=torch.float64),
                                         torch.tensor([[0.0, a + h]], dtype=torch.float64))
    p = torch.sigmoid(torch.tensor(a, dtype=torch.float64))
    dh_da = -p * (1 - p) * a  # d/da of the binary entropy of sigmoid(a)
    assert out.predicted.item() == pytest.approx((dh_da * h).item(), rel=1e-12)
    assert out.actual.item() == pytest.approx((dh_da * h).item(), rel=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("N, V", [(16384, 151936), (64, 32000)])
def test_compiled_kernel_at_realistic_shapes(N, V):
    """N * V above 2^31 at the first shape (64-bit row offsets); rows checked in float64 at both ends."""
    g = torch.Generator(device="cuda").manual_seed(0)
    before = (torch.randn(N, V, device="cuda", generator=g) * 3).to(torch.bfloat16)
    after = (before.float() + 0.05 * torch.randn(N, V, device="cuda", generator=g)).to(torch.bfloat16)
    mask = torch.rand(N, device="cuda", generator=g) > 0.2
    got = ck.entropy_change_from_logits(before, after, temperature=0.7, row_mask=mask)
    rows = torch.cat([torch.arange(0, min(N, 32)), torch.arange(max(N - 32, 0), N)]).cuda()
    want = ref.entropy_change_from_logits(before[rows].double(), after[rows].double(), temperature=0.7,
                                          row_mask=mask[rows])
    for name in ("predicted", "actual"):
        truth = getattr(want, name)
        assert max_err(getattr(got, name)[rows], truth) <= 5e-5 * (1 + truth.abs().max().item()), name


def test_reference_agrees_with_the_tabular_formula():
    """For the tabular policy-gradient step dz = lr A (e_t - p), Lemma 1 is `entropy_change`
    (docs/entropy_dynamics.md#one-step-on-the-sampled-token)."""
    g = torch.Generator().manual_seed(9)
    z = 2 * torch.randn(7, 50, generator=g, dtype=torch.float64)
    t = torch.randint(0, 50, (7,), generator=g)
    adv = torch.randn(7, generator=g, dtype=torch.float64)
    step = 0.3 * adv[:, None] * (torch.nn.functional.one_hot(t, 50) - z.softmax(-1))
    tabular = ref.entropy_change(ref.token_stats(z, t), adv, kind="pg", lr=0.3)
    assert max_err(ref.entropy_change_from_logits(z, z + step).predicted, tabular) <= 1e-13


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_logits_whose_scaled_max_overflows_fp32(impl):
    """|x| near 3e38 at T < log2(e): x * log2(e) / T overflows fp32; the row is read again from its max (as the
    fused pass's safe mode) and stays exact."""
    before = torch.tensor([[3e38, -3e38, 0.0, 1e38], [1.0, 2.0, 3.0, 4.0]])
    after = before + torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.1, 0.0, 0.0, 0.0]])
    got = ck.entropy_change_from_logits(before, after, temperature=0.9, impl=impl)
    want = ref.entropy_change_from_logits(before.double(), after.double(), temperature=0.9)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all() and torch.allclose(g.double(), w, atol=1e-6), (g, w)
