"""policy_loss / token_loss / selections against python_ref, and the properties docs/selection.md and
docs/losses.md promise."""
import pytest
import torch

import covkernels as ck
import python_ref as ref
from bench.tolerances import assert_close_to_ref, max_err

METHODS = ["ppo", "clip_cov", "kl_cov"]
CENTERINGS = ["batch", "state"]
AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
# Ratios and bounds large enough that a small batch selects several tokens (the defaults select 1).
SELECTIVE = dict(clip_cov_ratio=0.1, clip_cov_lb=0.05, clip_cov_ub=2.0, kl_cov_ratio=0.1, entropy_coef=0.01)


def make_batch(B=4, T=12, V=67, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    old_logp = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64), -1)
    old_logp = old_logp.gather(-1, targets[..., None]).squeeze(-1).float()
    advantages = torch.randn(B, T, generator=g) * 1.5
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[-1] = False  # a sequence with no valid token
    return logits, targets, old_logp, advantages, mask


def run(lib, logits, targets, old_logp, advantages, mask, seed=0, dtype=None, **kw):
    """(loss, metrics, d loss / d logits) of lib.policy_loss; dtype upcasts every float input."""
    cast = (lambda x: x.to(dtype)) if dtype else (lambda x: x)
    x = cast(logits).clone().requires_grad_()
    loss, metrics = lib.policy_loss(x, targets, cast(old_logp), cast(advantages), mask,
                                    generator=torch.Generator().manual_seed(seed), **kw)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), metrics, grad


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("centering", CENTERINGS)
@pytest.mark.parametrize("method", METHODS)
def test_matches_reference_float64(method, centering, agg):
    """In float64 both sides compute the same scores, so selections, losses and gradients agree exactly."""
    batch = make_batch(dtype=torch.float64)
    kw = dict(method=method, centering=centering, loss_agg_mode=agg, **SELECTIVE)
    loss, metrics, grad = run(ck, *batch, dtype=torch.float64, **kw)
    want_loss, want_metrics, want_grad = run(ref, *batch, dtype=torch.float64, **kw)
    assert abs(loss.item() - want_loss.item()) <= 1e-12 * (1 + abs(want_loss.item()))
    assert max_err(grad, want_grad) <= 1e-12
    assert metrics.keys() == want_metrics.keys()
    for k in metrics:
        assert abs(metrics[k].double().item() - want_metrics[k].double().item()) <= 1e-12, k
    if method != "ppo":
        assert metrics["n_selected"] > 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_matches_reference_low_precision(method, dtype):
    batch = make_batch(dtype=dtype, seed=3)
    kw = dict(method=method, centering="batch", **SELECTIVE)
    loss, metrics, grad = run(ck, *batch, **kw)
    truth = run(ref, *batch, dtype=torch.float64, **kw)
    lowp = run(ref, *batch, **kw)
    assert_close_to_ref(loss, truth[0], lowp[0], dtype, "fwd", "loss")
    assert_close_to_ref(grad, truth[2], lowp[2], dtype, "bwd", "grad")
    assert metrics["n_selected"] == truth[1]["n_selected"]


def test_clip_cov_random_subset_follows_the_generator():
    g = torch.Generator().manual_seed(5)
    scores = torch.rand(6, 50, generator=g) * 3
    mask = torch.rand(6, 50, generator=g) > 0.2
    clipped = torch.rand(6, 50, generator=g) > 0.8
    picks = []
    for seed in (0, 0, 1):
        kw = dict(ratio=0.05, lb=0.5, ub=2.5, clipped=clipped)
        got = ck.clip_cov_select(scores, mask, generator=torch.Generator().manual_seed(seed), **kw)
        want = ref.clip_cov_select(scores, mask, generator=torch.Generator().manual_seed(seed), **kw)
        assert torch.equal(got, want)
        picks.append(got)
    candidates = mask & ~clipped & (scores > 0.5) & (scores < 2.5)
    assert torch.equal(picks[0], picks[1]) and not torch.equal(picks[0], picks[2])
    assert (picks[0] <= candidates).all() and picks[0].sum() == int(0.05 * mask.sum().item())


def test_clip_cov_bounds_are_strict_and_fewer_candidates_than_n():
    scores = torch.tensor([[1.0, 5.0, 1.5, 4.999, 0.5, 7.0]])
    mask = torch.ones_like(scores, dtype=torch.bool)
    sel = ck.clip_cov_select(scores, mask, ratio=1.0, lb=1.0, ub=5.0)
    assert sel.tolist() == [[False, False, True, True, False, False]]


def test_kl_cov_takes_largest_signed_scores_with_row_major_ties():
    scores = torch.tensor([[0.5, -9.0, 2.0, 2.0], [2.0, 1.0, 2.0, -3.0]])
    mask = torch.tensor([[True, True, True, True], [True, True, False, True]])
    # 7 valid tokens: n = floor(7 r) = 1, 2, 3 of the three tied 2.0s (flat 2, 3, 4; flat 6 is invalid).
    cases = ((0.25, [[0, 0, 1, 0], [0, 0, 0, 0]]), (0.4, [[0, 0, 1, 1], [0, 0, 0, 0]]),
             (0.45, [[0, 0, 1, 1], [1, 0, 0, 0]]))
    for ratio, expect in cases:
        got = ck.kl_cov_select(scores, mask, ratio=ratio)
        assert got.int().tolist() == expect
        assert torch.equal(got, ref.kl_cov_select(scores, mask, ratio=ratio))


@pytest.mark.parametrize("method", METHODS)
def test_all_masked_batch_gives_zero_loss_and_gradient(method):
    logits, targets, old_logp, advantages, mask = make_batch()
    loss, metrics, grad = run(ck, logits, targets, old_logp, advantages, torch.zeros_like(mask), method=method,
                              entropy_coef=0.1)
    assert loss.item() == 0.0 and (grad == 0).all()
    assert all(torch.isfinite(v).all() for v in metrics.values())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", ["single_token", "equal_advantages", "n_above_valid"])
def test_degenerate_batches_match_reference(method, case):
    logits, targets, old_logp, advantages, mask = make_batch(dtype=torch.float64)
    kw = dict(method=method, **SELECTIVE)
    if case == "single_token":
        mask = torch.zeros_like(mask)
        mask[1, 3] = True
    elif case == "equal_advantages":
        advantages = torch.full_like(advantages, 0.7)  # every batch-centered score is 0
    else:
        kw.update(clip_cov_ratio=5.0, kl_cov_ratio=5.0, clip_cov_lb=-10.0, clip_cov_ub=10.0)
    got = run(ck, logits, targets, old_logp, advantages, mask, **kw)
    want = run(ref, logits, targets, old_logp, advantages, mask, **kw)
    assert abs(got[0].item() - want[0].item()) < 1e-12 and max_err(got[2], want[2]) < 1e-12
    assert got[1]["n_selected"] == want[1]["n_selected"]


def test_kl_cov_on_policy_adds_nothing_and_never_clips():
    logits, targets, _, advantages, mask = make_batch(dtype=torch.float64)
    logp = ck.logprobs_and_entropy(logits, targets)[0]  # exactly on-policy: |logp - old_logp| = 0
    loss, metrics = ck.policy_loss(logits, targets, logp, advantages, mask, method="kl_cov", kl_cov_ratio=0.5)
    plain, _ = ck.policy_loss(logits, targets, logp, advantages, mask, method="kl_cov", kl_cov_ratio=0.5,
                              ppo_kl_coef=0.0)
    assert loss.item() == plain.item() and metrics["ppo_kl"] == 0
    far = logp - 3.0  # ratio e^3, far outside any PPO clip: KL-Cov's pg term is still -A * rho
    loss, _ = ck.token_loss(logp, far, advantages, mask, method="kl_cov", ppo_kl_coef=0.0, loss_agg_mode="token-sum")
    want = (-advantages.double() * torch.exp(torch.tensor(3.0, dtype=torch.float64)))[mask].sum()
    assert torch.allclose(loss, want, rtol=1e-12)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_global_denominators_make_micro_batches_add_up(agg):
    """Two micro-batches with the global token / sequence counts give the gradient of the whole batch."""
    logits, targets, old_logp, advantages, mask = make_batch(B=6, dtype=torch.float64)
    kw = dict(method="ppo", loss_agg_mode=agg, entropy_coef=0.01,
              num_tokens=mask.sum(), num_seqs=(mask.sum(-1) > 0).sum())
    whole = run(ck, logits, targets, old_logp, advantages, mask, **kw)
    parts = [run(ck, *(x[sl] for x in (logits, targets, old_logp, advantages, mask)), **kw)
             for sl in (slice(0, 2), slice(2, 6))]
    assert abs(whole[0].item() - sum(p[0].item() for p in parts)) < 1e-12
    assert max_err(whole[2], torch.cat([p[2] for p in parts])) < 1e-12


def test_rollout_is_weights_and_aliases():
    batch = make_batch(dtype=torch.float64)
    w = torch.rand(batch[0].shape[:2], dtype=torch.float64)
    for alias, method in ((ck.ppo_loss, "ppo"), (ck.clip_cov_loss, "clip_cov"), (ck.kl_cov_loss, "kl_cov")):
        a, _ = alias(*batch, rollout_is_weights=w, generator=torch.Generator().manual_seed(0))
        b, _ = ref.policy_loss(*batch, method=method, rollout_is_weights=w, generator=torch.Generator().manual_seed(0))
        assert abs(a.item() - b.item()) < 1e-12


def test_token_loss_and_cov_scores_match_reference():
    logits, targets, old_logp, advantages, mask = make_batch(dtype=torch.float64)
    advantages = advantages.double()
    stats = ref.token_stats(logits, targets)
    for centering in CENTERINGS:
        got = ck.cov_scores(stats.logp, advantages, mask, centering=centering, entropy=stats.entropy)
        want = ref.cov_scores(stats.logp, advantages, mask, centering=centering, entropy=stats.entropy)
        assert max_err(got, want) < 1e-12
    a, ma = ck.token_loss(stats.logp, old_logp.double(), advantages.double(), mask, method="clip_cov", **SELECTIVE,
                          entropy=stats.entropy, generator=torch.Generator().manual_seed(2))
    b, mb = ref.token_loss(stats.logp, old_logp.double(), advantages.double(), mask, method="clip_cov",
                           **SELECTIVE, entropy=stats.entropy, generator=torch.Generator().manual_seed(2))
    assert abs(a.item() - b.item()) < 1e-12 and ma["n_selected"] == mb["n_selected"]


def test_mixed_input_dtypes_are_promoted():
    logits, targets, old_logp, advantages, mask = make_batch()
    logp, ent = ck.logprobs_and_entropy(logits, targets)
    base, _ = ck.token_loss(logp, old_logp, advantages, mask, entropy=ent, method="kl_cov", kl_cov_ratio=0.2)
    mixed, _ = ck.token_loss(logp, old_logp.double(), advantages.bfloat16().float(), mask, entropy=ent,
                             method="kl_cov", kl_cov_ratio=0.2)
    low, _ = ck.token_loss(logp, old_logp.double(), advantages.bfloat16(), mask, entropy=ent, method="kl_cov",
                           kl_cov_ratio=0.2)
    assert base.dtype == low.dtype == torch.float32 and torch.equal(mixed, low)
