"""Hostile values and bad input for the fused LM head: ignored rows and tiles, extreme logits, banned tokens,
closed forms, clear errors before any kernel."""
import math

import pytest
import torch

import covkernels as ck
import test_linear
from helpers import fma_rounds_once
from test_linear import IMPLS, STAT_FIELDS, check_against_reference, make_head, run_head, targets_for


@pytest.mark.parametrize("impl", IMPLS)
def test_whole_tiles_of_ignored_rows(impl):
    """The first 32 rows ignored (a whole row tile for any block of <= 32 rows), then every third."""
    hidden, weight, bias = make_head("flat", 48, 16, 257, torch.bfloat16)
    targets = targets_for(hidden, 257)
    targets[:32] = -100
    stats, (d_hidden, _, _) = check_against_reference(hidden, weight, bias, targets, torch.bfloat16,
                                                      impl=impl)
    assert (d_hidden[:32] == 0).all() and (stats.logp[:32] == 0).all() and (stats.entropy[:32] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_ignored_rows_take_no_part(impl):
    """Whatever finite values an ignored row's hidden state holds, nothing changes: its logits are computed
    (a tile is a matrix product) but masked, and its dz row is exactly 0, so it adds 0 * h to d_weight."""
    hidden, weight, bias = make_head("bt", 20, 16, 150, torch.bfloat16)
    targets = targets_for(hidden, 150, ignore_every=2)
    ignored = targets == -100
    garbage = hidden.clone()
    garbage[ignored] = torch.randn(garbage[ignored].shape).to(garbage.dtype) * 1e4
    clean = hidden.masked_fill(ignored[..., None], 0.0)
    stats, (d_hidden, _, _) = check_against_reference(garbage, weight, bias, targets, torch.bfloat16,
                                                      ref_hidden=clean, impl=impl)
    assert (d_hidden[ignored] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_in_an_ignored_hidden_row_reaches_only_d_weight(impl):
    """NaN in an ignored row's hidden state: outputs, d_hidden and d_bias stay exact; d_weight = dz.T @ hidden
    is NaN (0 * NaN), as in the unfused PyTorch. Documented: keep padding's hidden states finite (masking
    them would cost a copy of hidden)."""
    hidden, weight, bias = make_head("bt", 20, 16, 150, torch.bfloat16)
    targets = targets_for(hidden, 150, ignore_every=2)
    ignored = targets == -100
    poisoned = hidden.clone()
    poisoned[ignored] = float("nan")
    clean = hidden.masked_fill(ignored[..., None], 0.0)
    stats, (d_h, d_w, d_b) = run_head(ck, poisoned, weight, bias, targets, impl=impl)
    want, (w_h, _, w_b) = run_head(ck, clean, weight, bias, targets, impl=impl)
    for f in STAT_FIELDS:
        assert torch.equal(getattr(stats, f), getattr(want, f)), f
    assert torch.equal(d_h, w_h) and torch.equal(d_b, w_b)
    assert d_w.isnan().any()


@pytest.mark.parametrize("impl", IMPLS)
def test_all_rows_ignored(impl):
    hidden, weight, bias = make_head("bt", 10, 12, 90, torch.bfloat16)
    targets = torch.full(hidden.shape[:-1], -7)
    stats, grads = run_head(ck, hidden, weight, bias, targets, ignore_index=-7, impl=impl)
    for f in STAT_FIELDS:
        assert (getattr(stats, f) == 0).all(), f
    for name, g in zip(("d_hidden", "d_weight", "d_bias"), grads):
        assert (g == 0).all(), name


@pytest.mark.parametrize("impl", IMPLS)
def test_properties_and_closed_forms(impl):
    """logp <= 0, 0 <= entropy <= log V, 1/V <= sum p^2 <= 1; a zero hidden row without bias is uniform."""
    V = 300
    hidden, weight, _ = make_head("flat", 12, 20, V, torch.bfloat16, scale=6.0)
    hidden[0] = 0.0
    targets = targets_for(hidden, V, ignore_every=0)
    s, _ = run_head(ck, hidden, weight, None, targets, grads=(False, False, False), impl=impl)
    assert (s.logp <= 0).all() and (s.entropy >= 0).all() and (s.entropy <= math.log(V) + 1e-5).all()
    assert (s.sum_p2 >= 1 / V - 1e-7).all() and (s.sum_p2 <= 1 + 1e-6).all() and (s.sum_p2_logp <= 0).all()
    assert abs(s.entropy[0].item() - math.log(V)) < 1e-5 and abs(s.logp[0].item() + math.log(V)) < 1e-5
    assert abs(s.sum_p2[0].item() - 1 / V) < 1e-8
    assert torch.equal(s.p_target, s.logp.exp())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_huge_logits_stay_finite(dtype, impl):
    """Hidden states that make logits of about +-1e4 (softmax one-hot up to rounding): finite, and as close to
    the float64 truth as the rule allows (in fp32, where tl.fma rounds once, as on the GPU)."""
    if impl == "triton" and dtype == torch.float32 and not fma_rounds_once():
        pytest.skip("this Triton's interpreter rounds tl.fma twice; the GPU's FFMA rounds once")
    hidden, weight, bias = make_head("bt", 12, 16, 200, dtype, scale=3e3)
    targets = targets_for(hidden, 200)
    stats, grads = check_against_reference(hidden, weight, bias, targets, dtype, impl=impl)
    assert (stats.lse.abs() > 1e3).any()
    assert all(torch.isfinite(getattr(stats, f)).all() for f in STAT_FIELDS)
    assert all(torch.isfinite(g).all() for g in grads)
    assert (stats.logp <= 0).all() and (stats.entropy >= 0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_neg_inf_bias_is_probability_zero(dtype, impl):
    """-inf in the bias (a banned token) is legal: p = 0 there, gradient 0 for its bias and weight row."""
    V = 130
    hidden, weight, bias = make_head("flat", 10, 8, V, dtype)
    banned = torch.zeros(V, dtype=torch.bool)
    banned[::3] = True
    banned[64:128] = True  # a whole block of columns
    bias[banned] = float("-inf")
    allowed = torch.nonzero(~banned).flatten()
    pick = allowed[torch.randint(0, len(allowed), (10,), generator=torch.Generator().manual_seed(0))]
    targets = torch.where(targets_for(hidden, V) == -100, -100, pick)
    stats, grads = check_against_reference(hidden, weight, bias, targets, dtype, impl=impl)
    d_hidden, d_weight, d_bias = grads
    assert all(torch.isfinite(getattr(stats, f)).all() for f in STAT_FIELDS)
    assert torch.isfinite(d_hidden).all() and torch.isfinite(d_weight).all() and torch.isfinite(d_bias).all()
    assert (d_bias[banned] == 0).all() and (d_weight[banned] == 0).all()


def _no_launch(*args, **kwargs):
    raise AssertionError("a kernel was launched before the input was validated")


def _bad(h, w, b, t, **kw):
    return (h, w, b, t), kw


BAD_INPUTS = [
    ("hidden list", lambda h, w, b, t: _bad([1.0], w, b, t), TypeError, "hidden"),
    ("int hidden", lambda h, w, b, t: _bad(h.long(), w, b, t), TypeError, "hidden"),
    ("weight dtype differs", lambda h, w, b, t: _bad(h, w.bfloat16(), b, t), TypeError, "weight"),
    ("weight list", lambda h, w, b, t: _bad(h, [[1.0]], b, t), TypeError, "weight"),
    ("weight 1-D", lambda h, w, b, t: _bad(h, w[:, 0].contiguous(), b, t), ValueError, "weight"),
    ("weight 3-D", lambda h, w, b, t: _bad(h, w[None], b, t), ValueError, "weight"),
    ("weight D mismatch", lambda h, w, b, t: _bad(h, w[:, :-1], b, t), ValueError, "weight"),
    ("empty vocabulary", lambda h, w, b, t: _bad(h, w[:0], None, t.fill_(-100)), ValueError, "weight|vocab"),
    ("empty hidden dim", lambda h, w, b, t: _bad(h[..., :0], w[:, :0], b, t), ValueError, "hidden"),
    ("bias shape", lambda h, w, b, t: _bad(h, w, b[:-1], t), ValueError, "bias"),
    ("bias 2-D", lambda h, w, b, t: _bad(h, w, b[None], t), ValueError, "bias"),
    ("bias dtype differs", lambda h, w, b, t: _bad(h, w, b.double(), t), TypeError, "bias"),
    ("bias list", lambda h, w, b, t: _bad(h, w, [0.0] * 10, t), TypeError, "bias"),
    ("float targets", lambda h, w, b, t: _bad(h, w, b, t.float()), TypeError, "targets"),
    ("targets shape", lambda h, w, b, t: _bad(h, w, b, t[:, :-1]), ValueError, "targets"),
    ("weight on another device", lambda h, w, b, t: _bad(h, w.to("meta"), b, t), ValueError, "weight"),
    ("bias on another device", lambda h, w, b, t: _bad(h, w, b.to("meta"), t), ValueError, "bias"),
    ("targets on another device", lambda h, w, b, t: _bad(h, w, b, t.to("meta")), ValueError, "targets"),
    ("zero temperature", lambda h, w, b, t: _bad(h, w, b, t, temperature=0.0), ValueError, "temperature"),
    ("negative temperature", lambda h, w, b, t: _bad(h, w, b, t, temperature=-0.5), ValueError,
     "temperature"),
    ("target too large", lambda h, w, b, t: _bad(h, w, b, t.fill_(10)), ValueError, "targets must be in"),
    ("negative target", lambda h, w, b, t: _bad(h, w, b, t.fill_(-1)), ValueError, "targets must be in"),
    ("unknown impl", lambda h, w, b, t: _bad(h, w, b, t, impl="cuda"), ValueError, "impl"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
@pytest.mark.parametrize("fn", [ck.linear_logprobs_and_entropy, ck.linear_token_stats],
                         ids=["logprobs", "token_stats"])
def test_bad_input_raises_naming_the_argument(fn, case, monkeypatch):
    _, make, exc, match = case
    for name in ("linear_fwd", "linear_fwd_torch"):
        monkeypatch.setattr(f"covkernels.ops.lm_head.op.{name}", _no_launch)
    (h, w, b, t), kw = make(torch.randn(2, 3, 6), torch.randn(10, 6), torch.randn(10),
                            torch.randint(0, 10, (2, 3)))
    with pytest.raises(exc, match=match):
        fn(h, w, t, bias=b, **kw)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_fuzz_found_d_hidden_of_a_one_wide_head(impl):
    """`make fuzz` (test_linear's property test, 600 cases) found this fp32 case: D = 1, a bias, T = 1.244;
    the Triton kernels' d_hidden was 4.96e-6 off the float64 truth where the rule allows 4.958e-6."""
    test_linear.test_matches_reference_on_random_shapes.hypothesis.inner_test(
        dtype=torch.float32, D=1, V=240, rows=8, layout="flat", bias=True, temperature=1.2444106151262238,
        ignore_every=5, impl=impl, seed=60806)
