"""covkernels' losses through verl's own registry, against verl's losses; verl's log-prob/entropy semantics.

Compared where the semantics are the same: PPO always, KL-Cov without ties among the scores, Clip-Cov when
every candidate or none is selected (verl's and covkernels' random draws differ). The documented
differences (all-masked batch, tie order) are pinned by their own tests.
"""
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest
import torch

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
verl_F = pytest.importorskip("verl.utils.torch_functional")
from verl.workers.config import ActorConfig, PolicyLossConfig  # noqa: E402
from verl.workers.engine.base import EngineRegistry  # noqa: E402

import covkernels  # noqa: E402
from covkernels.integrations import verl as ck_verl  # noqa: E402
from covkernels.integrations.verl_engine import CovkernelsFSDPEngine  # noqa: E402

# verl's loss_agg_mode values (core_algos.agg_loss).
AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
             "seq-mean-token-sum-norm"]
PAIRS = {"ck_ppo": "vanilla", "ck_clip_cov": "clip_cov", "ck_kl_cov": "kl_cov"}


def actor_config(**policy_loss):
    """A real verl ActorConfig, as verl's ppo_loss passes it to the policy loss."""
    return ActorConfig(strategy="fsdp", ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2, rollout_n=1,
                       clip_ratio_low=0.2, clip_ratio_high=0.28, policy_loss=PolicyLossConfig(**policy_loss))


def batch(B=6, T=37, seed=0):
    """GRPO-like inputs: continuous log-probs (no tied scores), one advantage per sequence, ragged masks."""
    g = torch.Generator().manual_seed(seed)
    log_prob = -torch.rand(B, T, generator=g, dtype=torch.float64).mul(4).float()
    old_log_prob = (log_prob + 0.3 * torch.randn(B, T, generator=g)).clamp(max=0)
    advantages = torch.randn(B, 1, generator=g).expand(B, T).contiguous()
    lengths = torch.randint(T // 3, T + 1, (B,), generator=g)
    response_mask = torch.arange(T)[None] < lengths[:, None]
    weights = 0.5 + torch.rand(B, T, generator=g)
    return log_prob, old_log_prob, advantages, response_mask, weights


def run(name, config, log_prob, old_log_prob, advantages, response_mask, mode, weights=None):
    """The registered loss called by name as in verl's ppo_loss: (loss, d loss/d log_prob, metrics)."""
    log_prob = log_prob.clone().requires_grad_(True)
    fn = core_algos.get_policy_loss_fn(name)
    loss, metrics = fn(old_log_prob=old_log_prob, log_prob=log_prob, advantages=advantages,
                       response_mask=response_mask, loss_agg_mode=mode, config=config,
                       rollout_is_weights=weights)
    loss.backward()
    return loss.detach(), log_prob.grad, {k: float(v) for k, v in metrics.items()}


def assert_same(ck, ref, metric_names):
    torch.testing.assert_close(ck[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ck[1], ref[1], rtol=1e-5, atol=1e-7)
    for name in metric_names:
        assert ck[2][name] == pytest.approx(ref[2][name], rel=1e-5, abs=1e-7), name


def test_registered_in_verls_registries(monkeypatch):
    for name in [*PAIRS, "ck_clip_cov_state", "ck_kl_cov_state"]:
        assert name in core_algos.POLICY_LOSS_REGISTRY
    assert core_algos.get_policy_loss_fn("ck_kl_cov") is ck_verl.compute_policy_loss_ck_kl_cov
    monkeypatch.delenv("VERL_ENGINE_VENDOR", raising=False)
    assert EngineRegistry.get_engine_cls("language_model", "fsdp") is not CovkernelsFSDPEngine
    monkeypatch.setenv("VERL_ENGINE_VENDOR", "covkernels")
    for backend in ("fsdp", "fsdp2"):
        assert EngineRegistry.get_engine_cls("language_model", backend) is CovkernelsFSDPEngine


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "rollout_is_weights"])
def test_ck_ppo_matches_vanilla(mode, weighted):
    log_prob, old, adv, mask, weights = batch()
    config = actor_config(loss_mode="ck_ppo")
    w = weights if weighted else None
    assert_same(run("ck_ppo", config, log_prob, old, adv, mask, mode, w),
                run("vanilla", config, log_prob, old, adv, mask, mode, w),
                ["actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"])


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("ratio", [1e-3, 0.05, 0.5])
def test_ck_kl_cov_matches_verl(mode, ratio):
    log_prob, old, adv, mask, weights = batch(seed=1)
    config = actor_config(loss_mode="ck_kl_cov", kl_cov_ratio=ratio, ppo_kl_coef=1.0)
    ck = run("ck_kl_cov", config, log_prob, old, adv, mask, mode, weights)
    assert_same(ck, run("kl_cov", config, log_prob, old, adv, mask, mode, weights), ["actor/ppo_kl"])
    assert ck[2]["actor/ck_n_selected"] == max(1, int(ratio * int(mask.sum())))


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("window", [(-1e9, 1e9), (0.05, 2.0), (1e3, 1e4)], ids=["all", "some", "none"])
def test_ck_clip_cov_matches_verl_when_the_draw_does_not_matter(mode, window):
    """clip_cov_ratio = 1 takes every candidate (so the uniform draw is irrelevant); an empty window none."""
    log_prob, old, adv, mask, weights = batch(seed=2)
    lb, ub = window
    config = actor_config(loss_mode="ck_clip_cov", clip_cov_ratio=1.0, clip_cov_lb=lb, clip_cov_ub=ub)
    ck = run("ck_clip_cov", config, log_prob, old, adv, mask, mode, weights)
    assert_same(ck, run("clip_cov", config, log_prob, old, adv, mask, mode, weights),
                ["actor/pg_clipfrac", "actor/ppo_kl"])
    assert (ck[2]["actor/ck_n_selected"] == 0) == (window[0] >= 1e3)


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("mode", AGG_MODES)
def test_global_batch_info_as_verl(name, mode):
    """verl's global denominators and dp_size scaling (set by its ppo_loss before every call)."""
    log_prob, old, adv, mask, _ = batch(seed=3)
    config = actor_config(loss_mode=name, clip_cov_ratio=1.0, clip_cov_lb=-1e9, clip_cov_ub=1e9,
                          kl_cov_ratio=0.1)
    config.global_batch_info.update(dp_size=2, batch_num_tokens=3 * int(mask.sum()), global_batch_size=13,
                                    loss_scale_factor=64)
    assert_same(run(name, config, log_prob, old, adv, mask, mode),
                run(PAIRS[name], config, log_prob, old, adv, mask, mode), [])


def test_all_masked_batch_is_zero_where_verl_gives_nan():
    log_prob, old, adv, mask, _ = batch()
    mask = torch.zeros_like(mask)
    for name in PAIRS:
        config = actor_config(loss_mode=name)
        loss, grad, _ = run(name, config, log_prob, old, adv, mask, "token-mean")
        assert loss == 0 and torch.all(grad == 0), name
        assert torch.isnan(run(PAIRS[name], config, log_prob, old, adv, mask, "token-mean")[0]), PAIRS[name]


def test_kl_cov_ties_go_to_the_lower_row_major_index():
    """Equal scores at the cut: covkernels takes the lower flat index (verl takes torch.topk's order)."""
    log_prob = torch.tensor([[-1.0, -3.0, -1.0], [-3.0, -1.0, -3.0]])  # four scores tie at the top
    adv = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    config = actor_config(loss_mode="ck_kl_cov", kl_cov_ratio=0.34)  # n = 2 of them
    scores = covkernels.cov_scores(log_prob, adv, mask)
    assert torch.equal(covkernels.kl_cov_select(scores, mask, ratio=0.34),
                       torch.tensor([[True, False, True], [False, False, False]]))
    _, _, metrics = run("ck_kl_cov", config, log_prob, log_prob - 0.1, adv, mask, "token-mean")
    assert metrics["actor/ck_n_selected"] == 2


def test_state_centering_needs_the_engines_entropy():
    """Outside CovkernelsFSDPEngine (tests/test_integration_verl_engine.py) no entropy reaches the loss:
    the per-state losses say so instead of centering by something else."""
    log_prob, old, adv, mask, _ = batch()
    for name in ("ck_clip_cov_state", "ck_kl_cov_state"):
        with pytest.raises(ValueError, match="micro-batch entropy"):
            run(name, actor_config(loss_mode=name), log_prob, old, adv, mask, "token-mean")


def test_verl_imports_the_module_from_its_environment_variable():
    """VERL_USE_EXTERNAL_MODULES: how every verl process (Ray workers included) gets the ck_* losses and,
    with VERL_ENGINE_VENDOR, covkernels' engine."""
    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "VERL_USE_EXTERNAL_MODULES": "covkernels.integrations.verl",
           "VERL_ENGINE_VENDOR": "covkernels", "PYTHONPATH": str(root)}
    code = ("import verl\nfrom verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY as r\n"
            "from verl.workers.engine.base import EngineRegistry as e\n"
            "print(sorted(k for k in r if k.startswith('ck_')),\n"
            "      e.get_engine_cls('language_model', 'fsdp').__name__)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == ("['ck_clip_cov', 'ck_clip_cov_state', 'ck_kl_cov', "
                                                   "'ck_kl_cov_state', 'ck_ppo'] CovkernelsFSDPEngine")


def test_example_script_runs(capsys):
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "verl_loss.py"
    spec = importlib.util.spec_from_file_location("verl_loss", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main()
    assert sorted(name for name, *_ in results) == sorted(PAIRS)
    for name, ours, theirs in results:
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-7), name
    assert "ck_kl_cov" in capsys.readouterr().out


def test_loss_config_from_verls_actor_config():
    """The ck_* losses read verl's fields into one LossConfig; where verl leaves a field None, the default."""
    config = actor_config(kl_cov_ratio=0.01, ppo_kl_coef=0.1, clip_cov_lb=None)
    got = ck_verl.loss_config(config, "kl_cov", "state", "seq-mean-token-sum")
    assert got == covkernels.LossConfig("kl_cov", clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28,
                                        clip_ratio_c=3.0, kl_cov_ratio=0.01, ppo_kl_coef=0.1, centering="state",
                                        loss_agg_mode="seq-mean-token-sum", validate=False)
    data = batch()
    loss, _, _ = run("ck_kl_cov", config, *data[:4], "token-mean")
    want, _ = covkernels.token_loss(data[0], *data[1:4], ck_verl.loss_config(config, "kl_cov"))
    assert torch.equal(loss, want.detach())
