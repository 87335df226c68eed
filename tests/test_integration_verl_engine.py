"""verl 0.9.1's actor engine with covkernels as its fused-kernel backend, on the CPU: one micro-batch forward
and backward through verl's own code (FSDPEngineWithLMHead.forward_step: prepare_model_inputs, the model,
prepare_model_outputs, ppo_loss) equals verl's own logits path, with the passes over the logits counted.

verl 0.9.1 runs its engine only on an accelerator: the test gives verl a CPU platform (its PlatformRegistry
has none), a one-process gloo group (FSDPEngine.__init__ reads the rank), and builds the module without
FSDP wrapping (FSDPEngine._build_module, not initialize()). verl 0.9.1 also imports a TRL class that TRL 1.16
no longer has when TRL is installed; its availability check is switched off for the test.
"""
import functools
import tempfile

import pytest
import torch

pytest.importorskip("verl")
import torch.distributed as dist  # noqa: E402
import verl.models.transformers.monkey_patch as verl_monkey_patch  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from verl.plugin.platform import platform_manager  # noqa: E402
from verl.plugin.platform.platform_cuda import PlatformCUDA  # noqa: E402
from verl.trainer.config import CheckpointConfig  # noqa: E402
from verl.trainer.ppo.core_algos import get_policy_loss_fn  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import (ActorConfig, FSDPEngineConfig, FSDPOptimizerConfig,  # noqa: E402
                                 HFModelConfig, PolicyLossConfig)
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding  # noqa: E402

import covkernels  # noqa: E402
from covkernels.integrations import verl as ck_verl  # noqa: E402  (registers the ck_* losses)
from covkernels.integrations import verl_engine  # noqa: E402
from covkernels.integrations.verl_engine import CovkernelsFSDPEngine  # noqa: E402
from op_log import OpLog  # noqa: E402
from trl_batch import load_example  # noqa: E402

V, B, P, R, TEMPERATURE = 13, 4, 5, 7, 0.7  # vocabulary, sequences, prompt and response lengths


class CPUPlatform(PlatformCUDA):
    """verl's platform interface on a machine without an accelerator."""

    device_name = "cpu"

    def current_device(self):
        return "cpu"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return load_example().build_tiny_model(str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture
def verl_on_cpu(monkeypatch):
    monkeypatch.setattr(platform_manager, "_current_platform", CPUPlatform())
    monkeypatch.setattr(verl_monkey_patch, "is_trl_available", lambda: False)
    dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def engine(cls, model_dir, backend):
    """An actor engine of class `cls` holding the tiny model, fp32, backend "covkernels" or None (verl's
    logits path)."""
    model_config = HFModelConfig(path=model_dir, use_remove_padding=False,
                                 use_fused_kernels=backend is not None,
                                 fused_kernel_options={"impl_backend": backend},
                                 override_config={"attn_implementation": "sdpa"})
    engine_config = FSDPEngineConfig(strategy="fsdp", use_torch_compile=False, model_dtype="fp32")
    optimizer_config = FSDPOptimizerConfig(lr=1e-3, total_training_steps=1)
    eng = cls(model_config, engine_config, optimizer_config, CheckpointConfig())
    eng.module = eng._build_module()
    eng._autocast_dtype = torch.float32
    return eng


def micro_batch(fused, remove_padding, seed=0):
    """One actor micro-batch as verl's trainer hands it to the engine: left-padded prompts, right-padded
    responses, converted to verl's no-padding layout."""
    g = torch.Generator().manual_seed(seed)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, :2] = 0
    response_mask = (torch.arange(R)[None] < torch.tensor([7, 4, 6, 2])[:, None]).long()
    prompts, responses = torch.randint(3, V, (B, P), generator=g), torch.randint(3, V, (B, R), generator=g)
    attention_mask = torch.cat([prompt_mask, response_mask], 1)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    old_log_probs = -2.5 + 0.3 * torch.randn(B, R, generator=g)
    advantages = torch.randn(B, 1, generator=g).expand(B, R).contiguous()
    data = TensorDict(dict(input_ids=torch.cat([prompts, responses], 1), attention_mask=attention_mask,
                           position_ids=position_ids, prompts=prompts, responses=responses,
                           response_mask=response_mask, old_log_probs=old_log_probs, advantages=advantages),
                      batch_size=[B])
    data = left_right_2_no_padding(data)
    tu.assign_non_tensor(data, temperature=TEMPERATURE, use_remove_padding=remove_padding,
                         use_fused_kernels=fused, calculate_entropy=True, dp_size=1,
                         batch_num_tokens=int(response_mask.sum()), global_batch_size=B)
    return data


def step(eng, data, loss_mode="vanilla"):
    """forward_step + backward: (loss, parameter gradients, padded log-probs, padded entropy, op log)."""
    config = ActorConfig(strategy="fsdp", ppo_mini_batch_size=B, ppo_micro_batch_size_per_gpu=B, rollout_n=1,
                         clip_ratio_low=0.2, clip_ratio_high=0.28, entropy_coeff=0.01,
                         policy_loss=PolicyLossConfig(loss_mode=loss_mode, kl_cov_ratio=0.2, ppo_kl_coef=1.0))
    eng.module.zero_grad()
    with OpLog() as log:
        loss, output = eng.forward_step(data, functools.partial(ppo_loss, config=config), forward_only=False)
        loss.backward()
    out = output["model_output"]
    return (loss.detach(), [p.grad.clone() for p in eng.module.parameters()],
            no_padding_2_padding(out["log_probs"], data), no_padding_2_padding(out["entropy"], data), log)


@pytest.mark.parametrize("remove_padding", [False, True], ids=["padded", "remove_padding"])
@pytest.mark.parametrize("head", [True, False], ids=["fused_head", "logits"])
def test_micro_batch_equals_verls_with_one_pass_each_way(verl_on_cpu, model_dir, monkeypatch, remove_padding,
                                                        head):
    """covkernels' backend against verl's logits path on the same weights and micro-batch: log-probs,
    entropy, loss (PPO + entropy bonus) and every parameter gradient. covkernels reads the LM head (or the
    model's logits) in one fused forward and one fused backward; with the fused head no tensor with a
    vocabulary dimension exists, where verl's path makes several."""
    if not head:
        monkeypatch.setattr(verl_engine, "takes_head", lambda model: False)
    ours = engine(CovkernelsFSDPEngine, model_dir, "covkernels")
    theirs = engine(FSDPEngineWithLMHead, model_dir, None)
    loss, grads, logp, entropy, log = step(ours, micro_batch(True, remove_padding))
    ref_loss, ref_grads, ref_logp, ref_entropy, ref_log = step(theirs, micro_batch(False, remove_padding))
    torch.testing.assert_close(logp, ref_logp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(entropy, ref_entropy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with_vocab = [s for s in log.shapes if s and s[-1] == V]
    if head:
        assert log.covkernels == ["linear_fwd", "linear_bwd"] and with_vocab == []
    else:
        assert log.covkernels == ["fused_fwd", "fused_bwd"]
    assert ref_log.covkernels == [] and len([s for s in ref_log.shapes if s and s[-1] == V]) > 4


def test_state_centering_sees_the_micro_batch_entropy(verl_on_cpu, model_dir):
    """ck_kl_cov_state through the engine: the loss verl's ppo_loss computes is covkernels' KL-Cov with
    C = (logp + H) A on the micro-batch's own entropy (+ verl's entropy bonus); verl's own engine, which
    does not hand the entropy over, makes the loss refuse."""
    ours = engine(CovkernelsFSDPEngine, model_dir, "covkernels")
    data = micro_batch(True, False)
    loss, _, logp, entropy, _ = step(ours, data, loss_mode="ck_kl_cov_state")
    padded = data.select("response_mask", "old_log_probs", "advantages").to_padded_tensor()
    mask = padded["response_mask"].bool()
    expected, metrics = covkernels.token_loss(logp, padded["old_log_probs"], padded["advantages"], mask,
                                              entropy=entropy, method="kl_cov", kl_cov_ratio=0.2,
                                              centering="state", num_tokens=int(mask.sum()), num_seqs=B)
    bonus = covkernels.agg_loss(entropy, mask, num_tokens=int(mask.sum()))
    torch.testing.assert_close(loss, expected - 0.01 * bonus, rtol=1e-5, atol=1e-7)
    assert metrics["n_selected"] == int(0.2 * mask.sum())
    batch_centered, _ = covkernels.token_loss(logp, padded["old_log_probs"], padded["advantages"], mask,
                                              method="kl_cov", kl_cov_ratio=0.2, num_tokens=int(mask.sum()))
    assert not torch.isclose(loss, batch_centered - 0.01 * bonus)  # the centering is what selects
    assert get_policy_loss_fn("ck_kl_cov_state") is ck_verl.compute_policy_loss_ck_kl_cov_state
    theirs = engine(FSDPEngineWithLMHead, model_dir, None)
    with pytest.raises(ValueError, match="micro-batch entropy"):
        step(theirs, micro_batch(False, False), loss_mode="ck_kl_cov_state")
