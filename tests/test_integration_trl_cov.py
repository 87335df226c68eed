"""CovGRPOTrainer: covkernels' controls composed with TRL's loss as trl_cov documents; training end to end.

The composed loss is checked against independent implementations: covkernels.token_loss (verl's KL-Cov and
Clip-Cov), TRL's own loss differentiated token by token (which tokens it already gives no gradient), TRL's
entropy bonus and AEnt's clamped entropy from covkernels.token_stats on the model's logits.
"""
import dataclasses
import math
import pathlib
import pickle
import re

import pytest
import torch

pytest.importorskip("trl")
from trl import GRPOTrainer  # noqa: E402

import covkernels  # noqa: E402
from covkernels import AEntController, schedules  # noqa: E402
from covkernels.integrations import trl_cov  # noqa: E402
from covkernels.integrations.trl import CovGRPOTrainer, CovLossConfig, FusedGRPOTrainer  # noqa: E402
from trl_batch import (B, K, check_margins, configure, load_example, loss_and_grads, make_batch,  # noqa: E402
                       make_trainer)

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return load_example().build_tiny_model(str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="module")
def fused(model_dir, tmp_path_factory):
    return make_trainer(FusedGRPOTrainer, model_dir, str(tmp_path_factory.mktemp("out")), impl="torch")


@pytest.fixture(scope="module")
def batch(fused):
    inputs, entropy, logp = make_batch(fused)
    return inputs, check_margins(inputs, entropy, logp)


def cov_trainer(model_dir, tmp_path, **cov):
    return make_trainer(CovGRPOTrainer, model_dir, str(tmp_path), impl="torch",
                        cov_config=CovLossConfig(**cov))


def model_inputs(inputs):
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    return ids, torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "luspo", "cispo", "sapo", "vespo"])
@pytest.mark.parametrize("level, delta", [("token", None), ("token", 1.1), ("token", 1.5), ("sequence", None),
                                          ("sequence", 1.1)])
def test_gradient_free_tokens_are_those_trls_loss_gives_no_gradient(model_dir, tmp_path, batch, monkeypatch,
                                                                   loss_type, level, delta):
    """Clip-Cov's candidates exclude the tokens TRL's loss already gives no gradient: checked against the
    gradient of TRL's own loss with respect to each token's log-prob."""
    trainer = cov_trainer(model_dir, tmp_path)
    inputs = batch[0]
    configure(monkeypatch, trainer, loss_type=loss_type, importance_sampling_level=level, delta=delta)
    with torch.no_grad():
        logp, entropy, _ = FusedGRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, *model_inputs(inputs), K, compute_entropy=True)
    leaf = logp.clone().requires_grad_(True)
    monkeypatch.setattr(trainer, "_get_per_token_logps_and_entropies", lambda *a, **k: (leaf, entropy, None))
    grad, = torch.autograd.grad(GRPOTrainer._compute_loss(trainer, trainer.model, inputs), leaf)
    mask = inputs["completion_mask"]
    adv = inputs["advantages"][:, None].expand_as(logp)
    live = mask.bool() & (adv != 0)
    free = trainer._gradient_free(logp, inputs["old_per_token_logps"], adv, mask)
    if loss_type in ("cispo", "sapo", "vespo"):
        assert free is None and torch.all(grad[live] != 0)
    else:
        assert torch.equal(free & live, (grad == 0) & live)
        assert 0 < (free & live).sum() < live.sum()


# TRL's normalisation of each PPO-type loss, as covkernels.agg_loss arguments (B sequences, none empty).
AGGREGATION = {"bnpo": dict(loss_agg_mode="token-mean"),
               "grpo": dict(loss_agg_mode="seq-mean-token-mean", num_seqs=B),
               "dr_grpo": dict(loss_agg_mode="token-mean", num_tokens=B * K),
               "dapo": dict(loss_agg_mode="token-mean"),  # num_tokens: the batch's num_items_in_batch
               "luspo": dict(loss_agg_mode="seq-mean-token-sum", num_seqs=B)}


def reference(fused, inputs, method, **kwargs):
    """covkernels.token_loss (verl's formulas) on FusedGRPOTrainer's log-probs: (loss, parameter
    gradients)."""
    fused.model.zero_grad()
    logp, entropy, _ = fused._get_per_token_logps_and_entropies(fused.model, *model_inputs(inputs), K,
                                                                compute_entropy=True)
    adv = inputs["advantages"][:, None].expand_as(logp)
    loss, _ = covkernels.token_loss(logp, inputs["old_per_token_logps"], adv, inputs["completion_mask"],
                                    entropy=entropy, method=method, clip_ratio=0.2, **kwargs)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in fused.model.parameters()]


@pytest.mark.parametrize("loss_type", list(AGGREGATION))
def test_kl_cov_on_unclipped_trl_loss_is_verls_kl_cov(model_dir, tmp_path, fused, batch, monkeypatch,
                                                      loss_type):
    """KL-Cov's penalty is normalised as each loss type normalises its loss: with TRL's clipping removed
    (the paper's KL-Cov has none) the loss and gradients are verl's KL-Cov with that aggregation."""
    trainer = cov_trainer(model_dir, tmp_path, method="kl_cov", kl_cov_ratio=0.3, ppo_kl_coef=0.5)
    inputs = batch[0]
    configure(monkeypatch, trainer, loss_type=loss_type, epsilon=1e9, epsilon_high=1e9)
    monkeypatch.setattr(trainer, "epsilon_low", 1e9)
    loss, grads, logged = loss_and_grads(trainer, inputs)
    agg = dict(AGGREGATION[loss_type])
    if loss_type == "dapo":
        agg["num_tokens"] = inputs["num_items_in_batch"]
    ref_loss, ref_grads = reference(fused, inputs, "kl_cov", kl_cov_ratio=0.3, ppo_kl_coef=0.5, **agg)
    assert logged["covkernels/n_selected"] == math.floor(0.3 * inputs["completion_mask"].sum())
    assert logged["covkernels/kl_cov_penalty"] > 0
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_clip_cov_gradient_is_verls_clip_cov(model_dir, tmp_path, fused, batch, monkeypatch):
    """Clip-Cov detaches the selected tokens: the gradient is verl's Clip-Cov (same keys, same candidates);
    the loss value still counts them, so it differs from verl's by their terms."""
    ratio, lb, ub = 0.25, -0.5, 0.5
    trainer = cov_trainer(model_dir, tmp_path, method="clip_cov", clip_cov_ratio=ratio, clip_cov_lb=lb,
                          clip_cov_ub=ub)
    configure(monkeypatch, trainer, loss_type="bnpo")
    configure(monkeypatch, fused, loss_type="bnpo")
    trainer._cov_generator.manual_seed(7)
    loss, grads, logged = loss_and_grads(trainer, batch[0])
    ref_loss, ref_grads = reference(fused, batch[0], "clip_cov", clip_cov_ratio=ratio, clip_cov_lb=lb,
                                    clip_cov_ub=ub, generator=torch.Generator().manual_seed(7))
    plain_loss, plain_grads, _ = loss_and_grads(fused, batch[0])
    assert logged["covkernels/n_selected"] >= 2
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss, plain_loss)
    assert not torch.allclose(grads[-1], plain_grads[-1]) and not torch.isclose(loss, ref_loss)


@pytest.mark.parametrize("centering", ["batch", "state"])
def test_selection_is_among_the_tokens_trl_trains_on(model_dir, tmp_path, batch, monkeypatch, centering):
    """With TRL's top-entropy mask and off-policy sequence mask on, the covariance scores, N_valid and the
    KL-Cov top-n are over the tokens TRL still trains on."""
    trainer = cov_trainer(model_dir, tmp_path, method="kl_cov", kl_cov_ratio=0.5, centering=centering)
    inputs, threshold = batch
    configure(monkeypatch, trainer, loss_type="grpo", top_entropy_quantile=0.5,
              off_policy_mask_threshold=threshold)
    seen, select = {}, trl_cov.kl_cov_select

    def spy(scores, mask, ratio):
        seen.update(scores=scores, mask=mask, selected=select(scores, mask, ratio=ratio))
        return seen["selected"]

    monkeypatch.setattr(trl_cov, "kl_cov_select", spy)
    loss_and_grads(trainer, inputs)
    with torch.no_grad():
        logp, entropy, _ = FusedGRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, *model_inputs(inputs), K, compute_entropy=True)
    mask = inputs["completion_mask"]
    adv = inputs["advantages"][:, None].expand_as(logp)
    trained = trainer.get_high_entropy_mask(entropy, mask, 0.5) & trainer.get_off_policy_mask(
        adv, logp, inputs["sampling_per_token_logps"], mask, threshold).bool()
    assert 0 < trained.sum() < mask.sum() and torch.equal(seen["mask"], trained)
    assert seen["selected"].sum() == math.floor(0.5 * trained.sum())
    assert not (seen["selected"] & ~trained).any()
    expected = (logp + entropy) * adv if centering == "state" else covkernels.cov_scores(logp, adv, trained)
    torch.testing.assert_close(seen["scores"], torch.where(trained, expected, 0.0), rtol=1e-5, atol=1e-6)


def test_entropy_schedule_is_trls_entropy_bonus(model_dir, tmp_path, fused, batch, monkeypatch):
    trainer = cov_trainer(model_dir, tmp_path, method=None, entropy_coef=schedules.linear(0.1, 0.0, steps=10))
    configure(monkeypatch, fused, entropy_coef=0.06)
    trainer.state.global_step = 4
    loss, grads, _ = loss_and_grads(trainer, batch[0])
    ref_loss, ref_grads, _ = loss_and_grads(fused, batch[0])
    assert trainer.entropy_coef == pytest.approx(0.06)
    torch.testing.assert_close(loss, ref_loss)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("grpo", [dict(use_adaptive_entropy=True), dict(entropy_coef=0.01)], ids=str)
def test_entropy_schedule_with_trls_own_entropy_controls_is_refused(model_dir, tmp_path, grpo):
    with pytest.raises(ValueError, match="one coefficient|cannot also follow"):
        make_trainer(CovGRPOTrainer, model_dir, str(tmp_path), cov_config=CovLossConfig(entropy_coef=1e-3),
                     **grpo)


def test_aent_subtracts_the_clamped_entropy_bonus(model_dir, tmp_path, fused, batch):
    """AEnt: loss = TRL's loss - lambda * mean clamped entropy (covkernels.token_stats on the model's logits);
    its controller steps once per optimizer step from that mean."""
    controller = AEntController(coef=1e-3, coef_max=1.0, warmup=0)
    trainer = cov_trainer(model_dir, tmp_path, method=None, aent_coef=controller, clamp_fraction=0.4)
    inputs = batch[0]
    loss, grads, logged = loss_and_grads(trainer, inputs)
    fused.model.zero_grad()
    ids, mask = model_inputs(inputs)
    logits = fused.model(input_ids=ids, attention_mask=mask).logits[:, -K - 1:-1]
    targets = inputs["completion_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    stats = covkernels.token_stats(logits, targets, temperature=0.7, clamp_fraction=0.4, impl="torch")
    clamped = stats.clamped_entropy
    valid = inputs["completion_mask"].bool()
    ref = fused._compute_loss(fused.model, inputs) - 1e-3 * clamped[valid].mean()
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-7)
    for a, b in zip(grads, [p.grad for p in fused.model.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert logged["covkernels/clamped_entropy"] == pytest.approx(clamped[valid].mean().item(), rel=1e-5)
    assert controller.steps == 1 and controller.coef < 1e-3  # clamped entropy above the band: lambda shrinks


def test_config_is_checked():
    with pytest.raises(ValueError, match="method"):
        CovLossConfig(method="clip-cov")
    with pytest.raises(ValueError, match="clamp_fraction"):
        CovLossConfig(aent_coef=1e-3, clamp_fraction=1.5)
    assert CovLossConfig(aent_coef=AEntController(clamp_fraction=0.2)).clamp_fraction == 0.2


def test_config_is_a_loss_config():
    """A CovLossConfig holds a LossConfig (its fields, defaults and checks) and the seed; TRL's own fields stay."""
    beta = schedules.linear(1.0, 0.0, 10)
    config = covkernels.LossConfig("kl_cov", kl_cov_ratio=0.05, centering="state", ppo_kl_coef=beta)
    cov = CovLossConfig(config, seed=3)
    assert cov.loss == config and cov.method == "kl_cov" and cov.kl_cov_ratio == 0.05 and cov.seed == 3
    by_name = CovLossConfig(method="kl_cov", kl_cov_ratio=0.05, centering="state", ppo_kl_coef=beta)
    assert by_name.loss == dataclasses.replace(config, clamp_fraction=0.3) and by_name.seed is None
    assert CovLossConfig(covkernels.LossConfig("ppo")).method is None and CovLossConfig(method=None).loss.method == "ppo"
    with pytest.raises(ValueError, match="clip_ratio"):
        CovLossConfig(config, clip_ratio=0.3)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        CovLossConfig(covkernels.LossConfig(loss_agg_mode="token-sum"))
    with pytest.raises(ValueError, match="kl_cov_ratio"):
        CovLossConfig(kl_cov_ratio=-1.0)
    with pytest.raises(TypeError, match="seed"):
        CovLossConfig(seed=1.5)
    assert pickle.loads(pickle.dumps(cov)) == cov


def test_trainer_takes_a_loss_config(model_dir, tmp_path):
    config = covkernels.LossConfig("kl_cov", kl_cov_ratio=0.3)
    trainer = make_trainer(CovGRPOTrainer, model_dir, str(tmp_path), impl="torch", cov_config=config)
    assert trainer.cov_config == CovLossConfig(config) and trainer.cov_config.method == "kl_cov"


def test_fused_trainer_trains_one_step(model_dir, tmp_path):
    """Generation, scoring and one optimizer step on the Triton kernels, TRL's default loss (dapo)."""
    trainer = load_example().make_trainer(model_dir, str(tmp_path), steps=1)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    log = trainer.state.log_history[0]
    assert math.isfinite(log["loss"]) and 0 < log["entropy"] <= math.log(13)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_example_trains_with_kl_cov(capsys):
    """examples/train_trl_grpo.py: CovGRPOTrainer with KL-Cov, two steps on one generation (the second is
    off-policy, so the penalty acts), GSPO's sequence-level ratio."""
    trainer = load_example().main(["--steps", "2", "--method", "kl_cov", "--ratio", "0.2",
                                   "--loss-type", "grpo", "--sequence-level"])
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert all(h["covkernels/n_selected"] >= 1 for h in logs) and logs[1]["covkernels/kl_cov_penalty"] > 0
    assert "n_selected" in capsys.readouterr().out


def test_readme_trl_example_runs():
    """The README's TRL example, as written (tiny model built in place, CPU, no network)."""
    section = README.read_text().split("### TRL", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert math.isfinite(namespace["trainer"].state.log_history[-1]["train_loss"])
