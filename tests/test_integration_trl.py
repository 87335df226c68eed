"""TRL's GRPOTrainer with covkernels: trains a tiny random model on the CPU and matches TRL's own numbers.

The model, tokenizer, data and reward are those of examples/train_trl_grpo.py (built locally, no downloads).
"""
import dataclasses
import importlib.util
import math
import pathlib

import pytest
import torch

pytest.importorskip("trl")
from trl import GRPOTrainer  # noqa: E402
from trl.trainer.utils import entropy_from_logits  # noqa: E402

from covkernels import schedules  # noqa: E402
from covkernels.integrations.trl import LOSS_TYPES, CovLossConfig  # noqa: E402

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_trl_grpo.py"
METRICS = ["covkernels/entropy", "covkernels/policy_loss", "covkernels/ppo_kl", "covkernels/pg_clipfrac",
           "covkernels/cov_mean", "covkernels/cov_max", "covkernels/n_selected"]


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("train_trl_grpo", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_dir(example, tmp_path_factory):
    return example.build_tiny_model(str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="module")
def trained(example, model_dir, tmp_path_factory):
    """A trainer after one optimizer step, and the batch it trained on: its old log-probs are from before
    the step, so the ratio is not 1."""
    out = str(tmp_path_factory.mktemp("out"))
    trainer = example.make_trainer(model_dir, out, CovLossConfig(method="ppo"), steps=1, temperature=0.7)
    trainer.train()
    trainer.model.train()
    return trainer, trainer._buffered_inputs[-1]


def model_inputs(inputs):
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    return ids, mask, inputs["completion_ids"].size(1)


@pytest.mark.parametrize("cov_config, loss_type", [
    (CovLossConfig(method="clip_cov", clip_cov_ratio=0.05, clip_cov_lb=0.0), "dapo"),
    (CovLossConfig(method="kl_cov", kl_cov_ratio=0.05), "grpo"),
    (CovLossConfig(method="kl_cov", centering="state", kl_cov_ratio=0.05,
                   entropy_coef=schedules.linear(1e-3, 0.0, steps=3)), "dr_grpo"),
], ids=["clip_cov-dapo", "kl_cov-grpo", "kl_cov-state-dr_grpo"])
def test_trains_and_logs_covkernels_metrics(example, model_dir, tmp_path, cov_config, loss_type):
    trainer = example.make_trainer(model_dir, str(tmp_path), cov_config, steps=3, loss_type=loss_type)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for h in logs:
        assert math.isfinite(h["loss"])
        assert all(math.isfinite(h[name]) for name in METRICS), h
        assert h["entropy"] == h["covkernels/entropy"] and 0 < h["entropy"] <= math.log(13)
    assert sum(h["covkernels/n_selected"] for h in logs) >= 3
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_entropy_and_logprobs_equal_trls_on_the_same_batch(trained):
    trainer, inputs = trained
    model, (ids, mask, k) = trainer.model, model_inputs(inputs)
    valid = inputs["completion_mask"].bool()
    with torch.no_grad():
        logp, entropy, _ = trainer._get_per_token_logps_and_entropies(model, ids, mask, k,
                                                                      compute_entropy=True)
        trl_logp, trl_entropy, _ = GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, model, ids, mask, k, compute_entropy=True)
        # TRL's entropy_from_logits on the logits that predict the completion tokens, at TRL's temperature.
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -k - 1:-1] / trainer.temperature
        ref_entropy = entropy_from_logits(logits)
    torch.testing.assert_close(entropy[valid], ref_entropy[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy[valid], trl_entropy[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logp[valid], trl_logp[valid], rtol=1e-5, atol=1e-5)
    assert torch.all(logp[~valid] == 0) and torch.all(entropy[~valid] == 0)

    # The entropy covkernels logs for this batch is TRL's "entropy" metric for it.
    metrics = trainer._metrics["train"]
    with torch.no_grad():
        trainer._compute_loss(model, inputs)
        ours = metrics["covkernels/entropy"][-1]
        GRPOTrainer._compute_loss(trainer, model, inputs)
        theirs = metrics["entropy"][-1]
    assert ours == pytest.approx(theirs, rel=1e-5)
    assert ours == pytest.approx(ref_entropy[valid].mean().item(), rel=1e-5)


def loss_and_grads(compute, model, inputs):
    model.zero_grad()
    loss = compute(model, inputs)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("loss_type, option", [
    *((loss_type, "plain") for loss_type in LOSS_TYPES),
    ("dapo", "beta"), ("dr_grpo", "vllm_is_weights"), ("grpo", "trl_logprobs"),
], ids=lambda x: x)
def test_ppo_loss_and_gradient_equal_trls(trained, monkeypatch, loss_type, option):
    """method="ppo" without dual clip is TRL's loss: same value and parameter gradients for every
    supported loss_type, with the reference KL, with vLLM importance weights and on TRL's log-prob path."""
    trainer, inputs = trained
    inputs = dict(inputs)
    monkeypatch.setattr(trainer, "loss_type", loss_type)
    g = torch.Generator().manual_seed(0)
    if option == "beta":
        monkeypatch.setattr(trainer, "beta", 0.04)
        old = inputs["old_per_token_logps"]
        inputs["ref_per_token_logps"] = old - 0.3 * torch.rand(old.shape, generator=g)
    elif option == "vllm_is_weights":
        monkeypatch.setattr(trainer, "use_vllm", True)
        monkeypatch.setattr(trainer, "vllm_importance_sampling_correction", True)
        inputs["importance_sampling_ratio"] = 0.5 + torch.rand(inputs["completion_ids"].shape, generator=g)
    elif option == "trl_logprobs":
        monkeypatch.setattr(trainer, "cov_config", dataclasses.replace(trainer.cov_config, fused_pass=False))
    loss, grads = loss_and_grads(trainer._compute_loss, trainer.model, inputs)
    logged = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    assert logged["covkernels/ppo_kl"] != 0 and logged["covkernels/pg_clipfrac"] > 0  # off-policy, clipped
    trl_loss = lambda m, i: GRPOTrainer._compute_loss(trainer, m, i)  # noqa: E731
    ref_loss, ref_grads = loss_and_grads(trl_loss, trainer.model, inputs)
    assert loss != 0
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_unsupported_settings_are_refused(example, model_dir, tmp_path):
    with pytest.raises(ValueError, match="loss_type='cispo'"):
        example.make_trainer(model_dir, str(tmp_path), CovLossConfig(), loss_type="cispo")
    with pytest.raises(ValueError, match="method"):
        CovLossConfig(method="clip-cov")


def test_example_script_runs(example, capsys):
    example.main(["--steps", "2", "--method", "clip_cov", "--centering", "state"])
    out = capsys.readouterr().out
    assert "entropy" in out and len([line for line in out.splitlines() if line.strip()[:1].isdigit()]) == 2
