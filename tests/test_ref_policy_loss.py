"""Tests of the policy-loss reference itself: closed forms, edge cases, and verl's own functions."""
import math
import types

import pytest
import torch

import python_ref as ref
from python_ref.policy_loss import AGG_MODES, METHODS

F64 = torch.float64


def t64(x):
    return torch.tensor(x, dtype=F64)


def random_batch(B=4, T=9, seed=0, spread=1.0):
    """logp, old_logp, advantages, mask [B, T] float64; row 1 is fully masked, the rest partly."""
    g = torch.Generator().manual_seed(seed)
    logp = -3 * torch.rand(B, T, generator=g, dtype=F64)
    old = (logp + spread * torch.randn(B, T, generator=g, dtype=F64)).clamp(max=0)
    adv = 2 * torch.randn(B, T, generator=g, dtype=F64)
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[1] = False
    mask[:, 0] = mask[:, 0] | (torch.arange(B) != 1)
    return logp, old, adv, mask


def grad_of(fn, x):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    (g,) = torch.autograd.grad(out, x)
    return out.detach(), g


# --- aggregation ---------------------------------------------------------------------------------------

L3 = [[1.0, 2.0, 3.0], [4.0, float("nan"), 6.0], [7.0, 8.0, 9.0]]
M3 = [[1, 1, 0], [0, 0, 0], [0, 1, 1]]


@pytest.mark.parametrize("mode, kwargs, expected", [
    ("token-sum", {}, 20.0),
    ("token-mean", {}, 5.0),
    ("token-mean", {"num_tokens": 10}, 2.0),
    ("token-mean", {"num_tokens": t64(8.0)}, 2.5),
    ("seq-mean-token-sum", {}, 10.0),
    ("seq-mean-token-sum", {"num_seqs": 4}, 5.0),
    ("seq-mean-token-mean", {}, 5.0),
    ("seq-mean-token-mean", {"num_seqs": 5}, 2.0),
    ("seq-mean-token-sum-norm", {}, 10.0 / 3),
    ("seq-mean-token-sum-norm", {"horizon": 4}, 2.5),
    ("seq-mean-token-sum-norm", {"num_seqs": 4, "horizon": 5}, 1.0),
], ids=lambda v: str(v) if not isinstance(v, dict) else ",".join(v) or "local")
def test_agg_closed_form(mode, kwargs, expected):
    # The NaN sits at a masked entry: masked entries never contribute.
    loss = ref.agg_loss(t64(L3), torch.tensor(M3, dtype=torch.bool), mode, **kwargs)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_agg_all_masked_is_zero_with_zero_grad(mode):
    mask = torch.zeros(2, 3, dtype=torch.bool)
    loss, g = grad_of(lambda x: ref.agg_loss(x, mask, mode), torch.full((2, 3), float("inf"), dtype=F64))
    assert loss.item() == 0 and torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("mode", AGG_MODES)
def test_global_denominators_make_micro_batches_add_up(mode):
    """Two micro-batches, each aggregated with the whole batch's denominators, sum to the whole batch."""
    _, _, loss_mat, mask = random_batch(B=6, T=7, seed=1)
    num_tokens, num_seqs = mask.sum(), int((mask.sum(-1) > 0).sum())
    whole, g_whole = grad_of(lambda x: ref.agg_loss(x, mask, mode), loss_mat)

    def micro(x):
        return sum(ref.agg_loss(x[rows], mask[rows], mode, num_tokens=num_tokens, num_seqs=num_seqs)
                   for rows in (slice(0, 2), slice(2, 6)))
    split, g_split = grad_of(micro, loss_mat)
    torch.testing.assert_close(split, whole)
    torch.testing.assert_close(g_split, g_whole)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_token_loss_micro_batches_match_whole_batch(mode):
    """The same through token_loss (PPO with an entropy bonus): gradient accumulation is exact."""
    logp, old, adv, mask = random_batch(B=6, T=7, seed=2)
    ent = torch.rand(6, 7, dtype=F64)
    num_tokens, num_seqs = int(mask.sum()), int((mask.sum(-1) > 0).sum())

    def loss(x, rows, **kw):
        return ref.token_loss(x[rows], old[rows], adv[rows], mask[rows], entropy=ent[rows], entropy_coef=0.01,
                              loss_agg_mode=mode, **kw)[0]
    whole, g_whole = grad_of(lambda x: loss(x, slice(None)), logp)
    split, g_split = grad_of(lambda x: sum(loss(x, r, num_tokens=num_tokens, num_seqs=num_seqs)
                                           for r in (slice(0, 3), slice(3, 6))), logp)
    torch.testing.assert_close(split, whole)
    torch.testing.assert_close(g_split, g_whole)


# --- PPO -----------------------------------------------------------------------------------------------

RATIOS, ADVS = [1.5, 0.5, 1.1, 5.0], [1.0, 1.0, -1.0, -2.0]


def ppo_case(**kwargs):
    old = t64([[-2.0] * 4])
    logp = old + torch.log(t64([RATIOS]))
    return grad_of(lambda x: ref.token_loss(x, old, t64([ADVS]), torch.ones(1, 4), **kwargs)[0], logp)


def test_ppo_closed_form():
    # token 0: clipped at 1.2; 1: unclipped; 2: A < 0 inside the clip range; 3: dual clip -A*c = 6.
    loss, g = ppo_case()
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1 + 6.0) / 4, rel=1e-12)
    torch.testing.assert_close(g, t64([[0.0, -0.5, 1.1, 0.0]]) / 4)
    logp, old = torch.log(t64([RATIOS])) - 2, t64([[-2.0] * 4])
    _, metrics = ref.token_loss(logp, old, t64([ADVS]), torch.ones(1, 4))
    assert metrics["pg_clipfrac"].item() == 0.25 and metrics["pg_clipfrac_lower"].item() == 0.25
    assert metrics["ppo_kl"].item() == pytest.approx(-sum(math.log(r) for r in RATIOS) / 4, rel=1e-12)
    assert metrics["n_selected"].item() == 0


def test_ppo_without_dual_clip_and_asymmetric_range():
    loss, g = ppo_case(clip_ratio_c=None, clip_ratio_high=0.28)
    assert loss.item() == pytest.approx((-1.28 - 0.5 + 1.1 + 10.0) / 4, rel=1e-12)
    torch.testing.assert_close(g, t64([[0.0, -0.5, 1.1, 10.0]]) / 4)


def test_ppo_clamps_the_log_ratio_at_20():
    # Without the dual clip an unclipped A < 0 token grows with rho; verl clamps log rho to [-20, 20].
    loss, g = grad_of(lambda x: ref.token_loss(x, t64([[-30.0]]), t64([[-1.0]]), torch.ones(1, 1),
                                               clip_ratio_c=None)[0], t64([[-1.0]]))
    assert loss.item() == pytest.approx(math.exp(20), rel=1e-12) and g.item() == 0


# --- covariance scores and selections ------------------------------------------------------------------

# logp - mean = [1, -1, 1, -1], A - mean = [1.875, -2.125, 0.375, -0.125] (exact in binary).
LOGP4, ADV4, COV4 = [[-1.0, -3.0, -1.0, -3.0]], [[2.0, -2.0, 0.5, 0.0]], [[1.875, 2.125, 0.375, 0.125]]


def test_cov_scores_closed_forms():
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    logp, adv = t64([LOGP4[0] + [5.0]]).requires_grad_(), t64([ADV4[0] + [7.0]])
    batch = ref.cov_scores(logp, adv, mask)
    assert not batch.requires_grad
    torch.testing.assert_close(batch, t64([COV4[0] + [0.0]]))
    ent = t64([[0.5, 2.0, 1.0, 0.0, 9.0]])
    state = ref.cov_scores(logp, adv, mask, centering="state", entropy=ent)
    torch.testing.assert_close(state, t64([[-1.0, 2.0, 0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="entropy"):
        ref.cov_scores(logp, adv, mask, centering="state")


def test_clip_cov_candidates_have_strict_bounds():
    scores = t64([[0.5, 1.0, 2.0, 4.9, 5.0, 3.0]])
    mask = torch.ones(1, 6, dtype=torch.bool)
    assert ref.clip_cov_select(scores, mask, ratio=1.0).nonzero()[:, 1].tolist() == [2, 3, 5]
    clipped = torch.tensor([[False, False, False, True, False, False]])
    assert ref.clip_cov_select(scores, mask, ratio=1.0, clipped=clipped).nonzero()[:, 1].tolist() == [2, 5]
    # ratio 0.01 of 6 tokens still selects max(1, 0) = 1.
    assert ref.clip_cov_select(scores, mask, ratio=0.01).sum().item() == 1


def test_clip_cov_random_rule():
    """n smallest float32 keys of one torch.rand(mask.shape) draw, made on every call."""
    g = torch.Generator().manual_seed(3)
    scores = 1 + 3 * torch.rand(8, 50, generator=g, dtype=F64)
    mask = torch.rand(8, 50, generator=g) < 0.7
    cand = mask & (scores > 1) & (scores < 3.5)
    n = max(1, int(0.05 * int(mask.sum())))
    for seed in range(4):
        keys = torch.rand(8, 50, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        expected = cand & (keys <= keys[cand].sort().values[n - 1])
        g = torch.Generator().manual_seed(seed)
        sel = ref.clip_cov_select(scores, mask, ratio=0.05, ub=3.5, generator=g)
        assert torch.equal(sel, expected) and sel.sum().item() == n
    selections = {tuple(ref.clip_cov_select(scores, mask, ratio=0.05, ub=3.5,
                                            generator=torch.Generator().manual_seed(s)).flatten().tolist())
                  for s in range(3)}
    assert len(selections) == 3


def test_clip_cov_draws_keys_even_without_candidates():
    g, g_expected = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    sel = ref.clip_cov_select(torch.zeros(3, 4, dtype=F64), torch.ones(3, 4), generator=g)
    torch.rand(3, 4, generator=g_expected)
    assert not sel.any() and torch.equal(g.get_state(), g_expected.get_state())


def test_kl_cov_takes_largest_signed_scores_ties_row_major():
    scores = t64([[1.0, 3.0, 3.0], [3.0, -9.0, 3.0], [8.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 1], [0, 1, 1]])
    # N_valid = 8, n = int(0.375 * 8) = 3; the masked 8 and the large |-9| are never taken.
    sel = ref.kl_cov_select(scores, mask, ratio=0.375)
    assert sel.flatten().nonzero().squeeze(1).tolist() == [1, 2, 3]
    assert ref.kl_cov_select(scores, mask, ratio=5.0).sum().item() == 8  # n > N_valid: all valid
    assert not ref.kl_cov_select(scores, torch.zeros(3, 3), ratio=0.5).any()
    # Many ties, where an unstable sort would pick others: the first n in row-major order.
    many = (torch.arange(2000) % 7 == 0).to(F64).view(40, 50)
    sel = ref.kl_cov_select(many, torch.ones(40, 50), ratio=0.025)
    assert torch.equal(sel.flatten().nonzero().squeeze(1), torch.arange(0, 350, 7))


def test_clip_cov_equal_keys_go_in_row_major_order(monkeypatch):
    rand = torch.rand
    monkeypatch.setattr(torch, "rand", lambda *args, **kwargs: torch.zeros_like(rand(*args, **kwargs)))
    scores = 2 + (torch.arange(2000) % 3 == 0).to(F64).view(40, 50)  # candidates: the 2s (the 3s are >= ub)
    sel = ref.clip_cov_select(scores, torch.ones(40, 50), ratio=0.025, ub=2.5)
    assert torch.equal(sel.flatten().nonzero().squeeze(1), torch.tensor([i for i in range(80) if i % 3][:50]))


# --- Clip-Cov and KL-Cov losses ------------------------------------------------------------------------

def test_clip_cov_loss_closed_form():
    # On-policy, so rho = 1, nothing is clipped and loss_i = -A; tokens 0 and 1 are the candidates.
    logp, adv, mask = t64(LOGP4), t64(ADV4), torch.ones(1, 4)
    loss, g = grad_of(lambda x: ref.token_loss(x, logp, adv, mask, method="clip_cov", clip_cov_ratio=0.5)[0],
                      logp)
    assert loss.item() == pytest.approx(-0.5 / 4, rel=1e-12)  # selected tokens stay in the denominator
    torch.testing.assert_close(g, t64([[0.0, 0.0, -0.5, 0.0]]) / 4)
    _, metrics = ref.token_loss(logp, logp, adv, mask, method="clip_cov", clip_cov_ratio=0.5)
    assert metrics["n_selected"].item() == 2 and metrics["pg_clipfrac"].item() == 0.5
    assert metrics["cov_mean"].item() == 1.125 and metrics["cov_max"].item() == 2.125
    # n = 1: the candidate with the smaller key of this generator's draw.
    keys = torch.rand(1, 4, generator=torch.Generator().manual_seed(0))
    dropped = 0 if keys[0, 0] < keys[0, 1] else 1
    loss = ref.token_loss(logp, logp, adv, mask, method="clip_cov", clip_cov_ratio=0.25,
                          generator=torch.Generator().manual_seed(0))[0]
    assert loss.item() == pytest.approx(-(2.0 - 2.0 + 0.5 - ADV4[0][dropped]) / 4, rel=1e-12)


def test_kl_cov_loss_closed_form():
    delta = [0.1, -0.2, 0.3, 0.0]
    old, adv, mask = t64(LOGP4) - t64([delta]), t64(ADV4), torch.ones(1, 4)
    loss, g = grad_of(lambda x: ref.token_loss(x, old, adv, mask, method="kl_cov", kl_cov_ratio=0.25,
                                               ppo_kl_coef=0.5)[0], t64(LOGP4))
    pg = [-a * math.exp(d) for a, d in zip(ADV4[0], delta, strict=True)]
    # Token 1 has the largest score (2.125) and gets 0.5 * |-0.2|.
    assert loss.item() == pytest.approx((sum(pg) + 0.1) / 4, rel=1e-12)
    g_expected = t64([pg]) + t64([[0, -0.5, 0, 0]])
    torch.testing.assert_close(g, g_expected / 4)
    metrics = ref.token_loss(t64(LOGP4), old, adv, mask, method="kl_cov", kl_cov_ratio=0.25)[1]
    assert metrics["ppo_kl"].item() == pytest.approx(0.15, rel=1e-12) and metrics["n_selected"].item() == 1


@pytest.mark.parametrize("mode", AGG_MODES)
def test_kl_cov_on_policy_is_minus_advantage(mode):
    logp, _, adv, mask = random_batch(seed=4)
    kw = {"method": "kl_cov", "kl_cov_ratio": 0.3, "loss_agg_mode": mode}
    loss, g = grad_of(lambda x: ref.token_loss(x, x.detach(), adv, mask, **kw)[0], logp)
    _, g_pg = grad_of(lambda x: ref.agg_loss(-adv * torch.exp(x - x.detach()), mask, mode), logp)
    torch.testing.assert_close(loss, ref.agg_loss(-adv, mask, mode))
    torch.testing.assert_close(g, g_pg)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", AGG_MODES)
def test_all_masked_batch_gives_zero_loss_grad_and_metrics(method, mode):
    logp = torch.full((2, 3), float("nan"), dtype=F64)
    old = torch.full((2, 3), float("inf"), dtype=F64)
    loss, g = grad_of(lambda x: ref.token_loss(x, old, old, torch.zeros(2, 3), entropy=x, entropy_coef=0.1,
                                               method=method, loss_agg_mode=mode)[0], logp)
    metrics = ref.token_loss(logp, old, old, torch.zeros(2, 3), entropy=logp, method=method,
                             loss_agg_mode=mode)[1]
    assert loss.item() == 0 and torch.equal(g, torch.zeros_like(g))
    assert all(v.item() == 0 for v in metrics.values())


def test_rollout_weights_and_entropy_bonus():
    logp, old, adv, mask = random_batch(seed=6)
    ent = torch.rand_like(logp)
    base, metrics = ref.token_loss(logp, old, adv, mask, entropy=ent)
    weighted = ref.token_loss(logp, old, adv, mask, rollout_is_weights=torch.full_like(logp, 3.0))[0]
    bonus = ref.token_loss(logp, old, adv, mask, entropy=ent, entropy_coef=0.2)[0]
    torch.testing.assert_close(weighted, 3 * base)
    torch.testing.assert_close(bonus, base - 0.2 * ref.agg_loss(ent, mask))
    torch.testing.assert_close(metrics["entropy"], ref.agg_loss(ent, mask))


# --- from logits ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, alias", [("ppo", ref.ppo_loss), ("clip_cov", ref.clip_cov_loss),
                                           ("kl_cov", ref.kl_cov_loss)], ids=["ppo", "clip_cov", "kl_cov"])
def test_policy_loss_from_logits_and_aliases(method, alias):
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 5, 11, generator=g, dtype=F64)
    targets = torch.randint(0, 11, (3, 5), generator=g)
    targets[0, 2] = -100
    _, old, adv, _ = random_batch(B=3, T=5, seed=7)
    mask = torch.ones(3, 5)
    kw = {"entropy_coef": 0.01, "kl_cov_ratio": 0.2, "clip_cov_ratio": 0.2}

    def seeded():
        return torch.Generator().manual_seed(0)
    loss, g_logits = grad_of(lambda z: ref.policy_loss(z, targets, old, adv, mask, method=method,
                                                       temperature=0.7, generator=seeded(), **kw)[0], logits)
    stats = ref.token_stats(logits, targets, temperature=0.7)
    expected = ref.token_loss(stats.logp, old, adv, mask.bool() & (targets != -100), entropy=stats.entropy,
                              method=method, generator=seeded(), **kw)[0]
    torch.testing.assert_close(loss, expected)
    aliased = alias(logits, targets, old, adv, mask, temperature=0.7, generator=seeded(), **kw)[0]
    torch.testing.assert_close(aliased, loss)
    assert torch.isfinite(g_logits).all() and not g_logits[0, 2].any()


# --- validation ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, name", [
    ({"method": "grpo"}, "method"), ({"centering": "token"}, "centering"),
    ({"loss_agg_mode": "mean"}, "loss_agg_mode"), ({"clip_ratio": -0.1}, "clip_ratio"),
    ({"clip_ratio": None}, "clip_ratio"),
    ({"clip_ratio_high": -0.1}, "clip_ratio_high"), ({"clip_cov_ratio": -1e-3}, "clip_cov_ratio"),
    ({"kl_cov_ratio": -1e-3}, "kl_cov_ratio"), ({"clip_cov_lb": 5.0}, "clip_cov_lb"),
    ({"clip_ratio_c": 1.0}, "clip_ratio_c"), ({"entropy_coef": 0.1}, "entropy"),
    ({"centering": "state"}, "entropy"), ({"entropy": torch.zeros(2, 2)}, "entropy"),
    ({"rollout_is_weights": torch.ones(3)}, "rollout_is_weights"),
    ({"old_logp": torch.full((2, 3), 0.1)}, "old_logp"),
    ({"old_logp": torch.full((2, 3), math.nan)}, "old_logp"),
    ({"advantages": torch.full((2, 3), math.inf)}, "advantages"),
    ({"response_mask": torch.ones(2, 2)}, "response_mask"),
    ({"num_tokens": -1}, "num_tokens"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_validation_names_the_argument(kwargs, name):
    args = {"logp": -torch.ones(2, 3), "old_logp": -torch.ones(2, 3), "advantages": torch.ones(2, 3),
            "response_mask": torch.ones(2, 3)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        ref.token_loss(**args)


def test_bad_values_at_masked_tokens_pass_validation():
    old = torch.tensor([[-1.0, 5.0, math.nan]])
    loss, _ = ref.token_loss(-torch.ones(1, 3), old, torch.ones(1, 3), torch.tensor([[1, 0, 0]]))
    assert torch.isfinite(loss)


# --- against verl 0.9.1's own functions ----------------------------------------------------------------

@pytest.fixture(scope="module")
def verl():
    return pytest.importorskip("verl.trainer.ppo.core_algos")


def verl_config(**kw):
    """Stand-in for verl's ActorConfig: the attributes its loss functions read, and `get`."""
    fields = ("clip_cov_ratio", "clip_cov_lb", "clip_cov_ub", "kl_cov_ratio", "ppo_kl_coef")
    policy_loss = types.SimpleNamespace(**{k: kw.pop(k) for k in fields})
    config = types.SimpleNamespace(policy_loss=policy_loss, global_batch_info={}, **kw)
    config.get = lambda key, default=None: getattr(config, key, default)
    return config


# verl adds 1e-8 to the token counts it divides by (masked_mean, seq-mean-token-mean): relative 1e-8 / count.
VERL_RTOL = 1e-8
VERL_METHODS = {"ppo": "vanilla", "clip_cov": "clip_cov", "kl_cov": "kl_cov"}


def compare_with_verl(verl, method, mode, logp, old, adv, mask, weights=None, **kw):
    """Loss, gradient and verl's metrics of both implementations on the same float64 inputs."""
    kw = {"clip_ratio": 0.2, "clip_ratio_low": None, "clip_ratio_high": None, "clip_ratio_c": 3.0,
          "clip_cov_ratio": 2e-4, "clip_cov_lb": 1.0, "clip_cov_ub": 5.0, "kl_cov_ratio": 2e-4,
          "ppo_kl_coef": 1.0} | kw
    fn = verl.get_policy_loss_fn(VERL_METHODS[method])
    theirs, g_theirs = grad_of(lambda x: fn(old, x, adv, mask.to(F64), mode, verl_config(**kw),
                                            rollout_is_weights=weights)[0], logp)
    their_metrics = fn(old, logp, adv, mask.to(F64), mode, verl_config(**kw), rollout_is_weights=weights)[1]
    ours, g_ours = grad_of(lambda x: ref.token_loss(x, old, adv, mask, method=method, loss_agg_mode=mode,
                                                    rollout_is_weights=weights, **kw)[0], logp)
    our_metrics = ref.token_loss(logp, old, adv, mask, method=method, loss_agg_mode=mode, **kw)[1]
    torch.testing.assert_close(ours, theirs, rtol=VERL_RTOL, atol=1e-12)
    torch.testing.assert_close(g_ours, g_theirs, rtol=VERL_RTOL, atol=1e-12)
    for key, value in their_metrics.items():
        ours_value = our_metrics[key.removeprefix("actor/")].item()
        assert ours_value == pytest.approx(value, rel=VERL_RTOL, abs=1e-12), key
    return our_metrics


@pytest.mark.parametrize("mode", AGG_MODES)
def test_ppo_matches_verl(verl, mode):
    logp, old, adv, mask = random_batch(B=6, T=40, seed=8)
    old[0, :3] = torch.tensor([-30.0, -25.0, -0.01])  # log-ratios beyond the +-20 clamp
    logp[0, 2] = -28.0
    weights = torch.rand(6, 40, generator=torch.Generator().manual_seed(8), dtype=F64)
    compare_with_verl(verl, "ppo", mode, logp, old, adv, mask)
    compare_with_verl(verl, "ppo", mode, logp, old, adv, mask, weights, clip_ratio_high=0.28,
                      clip_ratio_c=2.0)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_kl_cov_matches_verl(verl, mode):
    logp, old, adv, mask = random_batch(B=6, T=40, seed=9)
    weights = torch.rand(6, 40, generator=torch.Generator().manual_seed(9), dtype=F64)
    metrics = compare_with_verl(verl, "kl_cov", mode, logp, old, adv, mask, kl_cov_ratio=0.05)
    assert metrics["n_selected"].item() == int(0.05 * int(mask.sum()))
    compare_with_verl(verl, "kl_cov", mode, logp, old, adv, mask, weights, kl_cov_ratio=2e-4, ppo_kl_coef=0.1)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_clip_cov_matches_verl_when_the_sample_is_forced(verl, mode):
    # ratio 1 selects every candidate and lb > max score selects none: verl's randperm cannot matter.
    logp, old, adv, mask = random_batch(B=6, T=40, seed=10, spread=0.3)
    metrics = compare_with_verl(verl, "clip_cov", mode, logp, old, adv, mask, clip_cov_ratio=1.0)
    assert metrics["n_selected"].item() > 10
    metrics = compare_with_verl(verl, "clip_cov", mode, logp, old, adv, mask, clip_cov_lb=100.0,
                                clip_cov_ub=200.0)
    assert metrics["n_selected"].item() == 0


@pytest.mark.parametrize("mode", AGG_MODES)
def test_agg_global_denominators_match_verl(verl, mode):
    _, _, loss_mat, mask = random_batch(B=5, T=8, seed=11)
    ours = ref.agg_loss(loss_mat, mask, mode, num_tokens=50, num_seqs=7, horizon=12)
    for dp_size in (1, 4):
        theirs = verl.agg_loss(loss_mat, mask.to(F64), mode, dp_size=dp_size, batch_num_tokens=50,
                               global_batch_size=7, loss_scale_factor=12)
        torch.testing.assert_close(dp_size * ours, theirs, rtol=VERL_RTOL, atol=0)
    theirs = verl.agg_loss(loss_mat, mask.to(F64), mode)
    torch.testing.assert_close(ref.agg_loss(loss_mat, mask, mode), theirs, rtol=VERL_RTOL, atol=0)
