"""AEnt: the clamped entropy (exact threshold, ties by index) and its controller, against python_ref."""
import math

import pytest
import torch

import covkernels as ck
import python_ref as ref
from covkernels.ops.clamped_entropy import kernels
from covkernels.ops.clamped_entropy.kernels import clamped_fwd
from helpers import LAYOUTS, make_logits, make_targets, upstream
from bench.tolerances import TOLERANCES, assert_close_to_ref

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _check(logits, targets, p, temperature, impl):
    dtype = logits.dtype
    g_logp, g_ent = upstream(targets.shape)
    g_cent = upstream(targets.shape, seed=9)[0]
    results = []
    for fn, x in ((ck.token_stats, logits.clone()), (ref.token_stats, logits.double()), (ref.token_stats, logits.clone())):
        x.requires_grad_()
        s = fn(x, targets, temperature=temperature, clamp_fraction=p, impl=impl)
        loss = (s.logp * g_logp + s.entropy * g_ent + s.clamped_entropy * g_cent).sum()
        results.append((s, torch.autograd.grad(loss, x)[0]))
    (s, grad), (t, g64), (lo, glo) = results
    for f in s._fields:
        assert_close_to_ref(getattr(s, f), getattr(t, f), getattr(lo, f), dtype, "fwd", f)
    assert_close_to_ref(grad, g64, glo, dtype, "bwd", "grad")
    return s


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("p", [0.0, 0.3, 0.97])
@pytest.mark.parametrize("V", [1, 2, 130, 4099])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clamped_entropy_matches_reference(dtype, V, p, impl):
    logits = make_logits("sliced", 6, V, dtype, seed=V)
    logits[0, 1] = logits[0, 1].float().round().to(dtype)  # many ties, some at the threshold
    logits[1, 0, ::3] = float("-inf") if V > 2 else logits[1, 0, ::3]
    s = _check(logits, make_targets(logits), p, 0.8, impl)
    assert (s.clamped_entropy >= 0).all()


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_and_int32_targets(layout, impl):
    logits = make_logits(layout, 8, 257, torch.bfloat16)
    _check(logits, make_targets(logits, dtype=torch.int32), 0.5, 1.3, impl)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_at_the_threshold_drop_the_lowest_indices(dtype):
    """Row [1, 1, 1, 1, 0, 2] with p = 0.5 drops 0 and the first two 1s: K = {index 2, 3, 5}."""
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 2.0]], dtype=dtype)
    s = ck.token_stats(logits, torch.tensor([0]), clamp_fraction=0.5, impl="triton")
    z = torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64)
    assert s.clamped_entropy.item() == pytest.approx(-(z.softmax(0) * z.log_softmax(0)).sum().item(), abs=1e-6)
    x = logits.clone().requires_grad_()
    ck.token_stats(x, torch.tensor([0]), clamp_fraction=0.5, impl="triton").clamped_entropy.sum().backward()
    assert (x.grad[0, [0, 1, 4]] == 0).all() and (x.grad[0, [2, 3, 5]] != 0).all()


def test_threshold_is_exact_on_adversarial_keys():
    """-0.0 equals +0.0, -inf sorts first, negative values order backwards by their bits."""
    logits = torch.tensor([[-0.0, 0.0, -1.0, -0.5, float("-inf"), 3.0, -2.5, 0.0]])
    for p in [i / 8 for i in range(8)]:
        got = clamped_fwd(logits, torch.tensor([5]), 1.0, -100, p, True)[6]
        want = ref.token_stats(logits.double(), torch.tensor([5]), clamp_fraction=p).clamped_entropy
        assert got.item() == pytest.approx(want.item(), abs=1e-6), p


@pytest.mark.parametrize("digit_bits", [4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_both_digit_widths_keep_the_reference_set(dtype, digit_bits, monkeypatch):
    """The radix select's digit width follows the Triton version (select.DIGIT_BITS: 4 bits where
    tl.histogram lowers to warp ballots, 8 where to atomics); both keep the reference's set under any
    Triton: ties, -inf, signed zeros and negative values among the keys; V past one block (whole blocks
    and a masked tail)."""
    monkeypatch.setattr(kernels, "DIGIT_BITS", digit_bits)
    logits = make_logits("flat", 6, 4099, dtype, seed=digit_bits)
    logits[0] = logits[0].float().round().to(dtype)
    logits[1, ::4] = float("-inf")
    logits[2, :8] = torch.tensor([-0.0, 0.0, -1.0, -0.5, float("-inf"), 3.0, -2.5, 0.0], dtype=dtype)
    logits[3] = -logits[3].abs()
    targets = make_targets(logits)
    for p in (0.1, 0.5, 0.9):
        _check(logits, targets, p, 0.8, "triton")


def test_closed_forms():
    V = 10
    uniform = ck.token_stats(torch.zeros(2, V), torch.tensor([0, 1]), clamp_fraction=0.3)
    assert torch.allclose(uniform.clamped_entropy, torch.full((2,), math.log(7)))
    x = torch.randn(3, 50)
    s = ck.token_stats(x, torch.tensor([0, 1, 2]), clamp_fraction=0.0)
    assert torch.allclose(s.clamped_entropy, s.entropy, atol=1e-6)
    one = ck.token_stats(x, torch.tensor([0, 1, 2]), clamp_fraction=0.99)  # one token kept
    # 0 up to fp32 rounding: the kernels' base-2 reference rounds m * log2(e) / T, so even the max entry's
    # weight is 2^(a rounding error) (the tolerance table's fp32 forward bound).
    assert (one.clamped_entropy >= 0).all() and (one.clamped_entropy <= TOLERANCES[torch.float32]["fwd"]).all()


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_clamp_fraction(bad):
    with pytest.raises(ValueError, match="clamp_fraction"):
        ck.token_stats(torch.randn(2, 5), torch.tensor([0, 1]), clamp_fraction=bad)


def test_controller_follows_the_rule_step_by_step():
    entropies = [0.5] * 35 + [0.01] * 40 + [0.1] * 5 + [10.0] * 5 + [0.0] * 4000
    kw = dict(coef=2e-4, entropy_low=0.05, entropy_high=0.23, lr=1e-3, coef_min=1e-5, coef_max=3e-3, warmup=29)
    ctl = ck.AEntController(**kw)
    got = [ctl.update(torch.tensor(h, dtype=torch.float64)) for h in entropies]
    want = ref.aent_coef_trajectory(entropies, **kw)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert got[:29] == [2e-4] * 29 and got[29] < 2e-4  # warm-up, then H above the band lowers lambda
    assert min(got) == 1e-5 and got[-1] == 3e-3  # clipped at both ends


def test_controller_state_round_trip():
    ctl = ck.AEntController(warmup=0)
    for h in (0.01, 0.02, 0.5):
        ctl.update(h)
    resumed = ck.AEntController(warmup=0)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.update(0.3) == ctl.update(0.3) and resumed.steps == ctl.steps == 4
    with pytest.raises(ValueError, match="coef"):
        ck.AEntController(coef=1.0)
    with pytest.raises(ValueError, match="finite"):
        ctl.update(float("nan"))


@pytest.mark.parametrize("method", ["ppo", "clip_cov", "kl_cov"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum-norm"])
def test_policy_loss_with_aent_matches_reference(method, agg):
    from test_policy_loss import SELECTIVE, make_batch, run
    batch = make_batch(dtype=torch.float64)
    kw = dict(method=method, loss_agg_mode=agg, aent_coef=0.3, clamp_fraction=0.4, **SELECTIVE)
    loss, metrics, grad = run(ck, *batch, dtype=torch.float64, **kw)
    want, want_metrics, want_grad = run(ref, *batch, dtype=torch.float64, **kw)
    assert abs(loss.item() - want.item()) < 1e-12 and (grad - want_grad).abs().max() < 1e-12
    for k in ("clamped_entropy", "aent_coef"):
        assert abs(metrics[k].item() - want_metrics[k].item()) < 1e-12
    plain, _, _ = run(ck, *batch, dtype=torch.float64, **{**kw, "aent_coef": 0.0})
    assert loss < plain  # the bonus lowers the loss by 0.3 * agg(H~) > 0


def test_policy_loss_module_drives_the_controller():
    from test_policy_loss import make_batch
    batch = make_batch()
    ctl = ck.AEntController(coef=1e-3, warmup=0)
    loss_fn = ck.PolicyLoss("clip_cov", aent_coef=ctl)
    for _ in range(3):
        loss, metrics = loss_fn(*batch)
        assert metrics["aent_coef"].item() == pytest.approx(ctl.coef)
        ctl.update(metrics["clamped_entropy"])  # H~ ~ 3 nats is far above the band: lambda falls
    assert ctl.coef < 1e-3 and loss_fn.config["clamp_fraction"] == ctl.clamp_fraction
    with pytest.raises(ValueError, match="clamp_fraction"):
        ck.policy_loss(*batch, aent_coef=0.1)


def test_policy_loss_with_aent_compiles_and_never_syncs():
    from test_policy_loss import make_batch
    from test_policy_loss_contract import NoHostSync
    batch = make_batch()
    x = batch[0].clone().requires_grad_()
    with NoHostSync():
        loss, _ = ck.policy_loss(x, *batch[1:], aent_coef=0.1, clamp_fraction=0.3, validate=False)
        loss.backward()
    torch._dynamo.reset()
    fn = torch.compile(lambda x: ck.policy_loss(x, *batch[1:], aent_coef=0.1, clamp_fraction=0.3,
                                                validate=False)[0], fullgraph=True, backend="aot_eager")
    y = batch[0].clone().requires_grad_()
    fn(y).backward()
    assert torch.allclose(loss.detach(), fn(batch[0]).detach(), atol=1e-6) and torch.allclose(x.grad, y.grad, atol=1e-6)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_out_of_range_target_without_validation_is_nan_in_its_row_only(impl):
    logits = make_logits("flat", 4, 50, torch.float32)
    targets = torch.tensor([3, 50, -7, 10])
    x = logits.clone().requires_grad_()
    s = ck.token_stats(x, targets, clamp_fraction=0.3, validate=False, impl=impl)
    (s.logp.nan_to_num() + s.clamped_entropy.nan_to_num()).sum().backward()
    assert s.logp[1].isnan() and s.logp[2].isnan() and x.grad[1:3].isnan().all()
    want = ref.token_stats(logits.double(), torch.tensor([3, 0, 0, 10]), clamp_fraction=0.3)
    assert (s.clamped_entropy[[0, 3]].double() - want.clamped_entropy[[0, 3]]).abs().max() < 1e-5
    assert x.grad[[0, 3]].isfinite().all()


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_ties_are_ranked_on_the_raw_logits(impl):
    """x[0] > x[1] by one ulp; after the temperature they round to one value. The rule ranks the raw
    logits, so x[1] (the lower logit) is removed, not x[0] (the lower index)."""
    x = torch.tensor([[2.6642916202545166, 2.6642913818359375, 5.0, 6.0]], requires_grad=True)
    T = 1.2900063897440808
    assert x[0, 0] > x[0, 1] and x[0, 0] * (1 / T) == x[0, 1] * (1 / T)
    s = ck.token_stats(x, torch.tensor([3]), temperature=T, clamp_fraction=0.25, impl=impl)
    s.clamped_entropy.sum().backward()
    assert x.grad[0, 1] == 0 and (x.grad[0, [0, 2, 3]] != 0).all()


def test_reference_ranks_the_raw_logits():
    """python_ref's own rule: a one-ulp pair in fp32 that x / T rounds to one value; the lower logit, x[1],
    is removed, not the lower index."""
    x = torch.tensor([[1.3539097309112549, 1.3539096117019653, 5.0, 6.0]], requires_grad=True)
    T = 1.2900063897440808
    assert x[0, 0] > x[0, 1] and x[0, 0] / T == x[0, 1] / T
    ref.token_stats(x, torch.tensor([3]), temperature=T, clamp_fraction=0.25).clamped_entropy.sum().backward()
    assert x.grad[0, 1] == 0 and (x.grad[0, [0, 2, 3]] != 0).all()


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_near_ties_after_the_temperature_keep_the_reference_set(impl):
    """Rows of 20 distinct levels, each held by a pair of logits one ulp apart in random order; the cut
    (17 of 40 removed) splits a pair. At temperatures that are not powers of two many pairs round to one
    value: the removed set (where the clamped gradient is 0) must still be python_ref's in float64."""
    g = torch.Generator().manual_seed(5)
    levels = torch.randn(16, 20, generator=g) * 3
    pairs = torch.stack([levels, levels.nextafter(torch.tensor(float("inf")))], -1).flatten(1)
    logits = pairs.gather(1, torch.argsort(torch.rand(16, 40, generator=g), 1))
    targets = torch.zeros(16, dtype=torch.long)
    for T in (0.7, 1.2900063897440808, 3.1):
        x = logits.clone().requires_grad_()
        s = ck.token_stats(x, targets, temperature=T, clamp_fraction=0.43, impl=impl)
        s.clamped_entropy.sum().backward()
        x64 = logits.double().requires_grad_()
        want = ref.token_stats(x64, targets, temperature=T, clamp_fraction=0.43)
        want.clamped_entropy.sum().backward()
        assert ((x64.grad == 0).sum(1) == 17).all()
        assert torch.equal(x.grad == 0, x64.grad == 0), T
        assert (s.clamped_entropy.double() - want.clamped_entropy).abs().max() < 1e-5
