"""covkernels' losses inside verl: registered names, verl's config and call; checked against verl's losses.

In a real verl run (verl 0.9.1), make every verl process import the integration, pick covkernels' actor
engine (the actor's log-probs and entropy from one fused pass, and the entropy handed to the loss) and a
loss by name:

    VERL_USE_EXTERNAL_MODULES=covkernels.integrations.verl VERL_ENGINE_VENDOR=covkernels \\
    python -m verl.trainer.main_ppo actor_rollout_ref.actor.policy_loss.loss_mode=ck_kl_cov_state \\
        actor_rollout_ref.actor.policy_loss.kl_cov_ratio=0.002 \\
        actor_rollout_ref.actor.policy_loss.ppo_kl_coef=1 actor_rollout_ref.actor.calculate_entropy=True \\
        actor_rollout_ref.model.use_fused_kernels=True \\
        actor_rollout_ref.model.fused_kernel_options.impl_backend=covkernels ...

This script runs on a CPU: it builds one actor micro-batch (logits of a random policy, GRPO advantages),
computes log-probs and entropy with the fused pass, calls each ck_* loss through verl's registry exactly as
verl's ppo_loss does, and prints it next to verl's own loss on the same inputs.

    python examples/verl_loss.py
"""
import torch
from verl.trainer.ppo.core_algos import agg_loss, get_policy_loss_fn
from verl.workers.config import ActorConfig, PolicyLossConfig

import covkernels
import covkernels.integrations.verl  # noqa: F401  (registers the ck_* losses)

B, T, V, GROUP, TEMPERATURE = 8, 12, 512, 4, 0.7


def micro_batch():
    """Actor logits [B, T, V] (requires grad), sampled responses, old log-probs, advantages, response mask."""
    g = torch.Generator().manual_seed(0)
    logits = (2 * torch.randn(B, T, V, generator=g)).requires_grad_(True)
    with torch.no_grad():
        probs = torch.softmax(logits.view(-1, V) / TEMPERATURE, dim=-1)
        responses = torch.multinomial(probs, 1, generator=g).view(B, T)
        logp, _ = covkernels.logprobs_and_entropy(logits, responses, temperature=TEMPERATURE)
        # The rollout policy's log-probs, a little off the actor's.
        old_log_prob = (logp + 0.2 * torch.randn(B, T, generator=g)).clamp(max=0)
    rewards = torch.rand(B, generator=g).view(-1, GROUP)
    advantages = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    response_mask = torch.arange(T)[None] < lengths[:, None]
    return logits, responses, old_log_prob, advantages.view(B, 1).expand(B, T), response_mask


def actor_loss(loss_mode, config, logits, responses, old_log_prob, advantages, response_mask):
    """What verl's ppo_loss does with the model output: the registered policy loss minus the entropy bonus."""
    log_prob, entropy = covkernels.logprobs_and_entropy(logits, responses, temperature=TEMPERATURE)
    pg_loss, metrics = get_policy_loss_fn(loss_mode)(
        old_log_prob=old_log_prob, log_prob=log_prob, advantages=advantages, response_mask=response_mask,
        loss_agg_mode=config.loss_agg_mode, config=config, rollout_is_weights=None)
    entropy_loss = agg_loss(entropy, response_mask, config.loss_agg_mode)
    return pg_loss - config.entropy_coeff * entropy_loss, {k: float(v) for k, v in metrics.items()}


def main():
    inputs, results = micro_batch(), []
    print(f"{'loss_mode':>12} {'loss':>10} {'verl':>10}  metrics")
    for ours, theirs, policy_loss in [
        ("ck_ppo", "vanilla", PolicyLossConfig()),
        ("ck_kl_cov", "kl_cov", PolicyLossConfig(kl_cov_ratio=0.02, ppo_kl_coef=1.0)),
        # Clip-Cov draws its tokens at random; with clip_cov_ratio=1 every candidate is taken, as in verl.
        ("ck_clip_cov", "clip_cov", PolicyLossConfig(clip_cov_ratio=1.0, clip_cov_lb=0.5, clip_cov_ub=5.0)),
    ]:
        config = ActorConfig(strategy="fsdp", ppo_mini_batch_size=B, ppo_micro_batch_size_per_gpu=B,
                             rollout_n=GROUP, entropy_coeff=1e-3, policy_loss=policy_loss)
        loss, metrics = actor_loss(ours, config, *inputs)
        reference, _ = actor_loss(theirs, config, *inputs)
        inputs[0].grad = None
        loss.backward()
        assert torch.isfinite(inputs[0].grad).all()
        shown = ", ".join(f"{k.removeprefix('actor/')}={v:.4g}" for k, v in sorted(metrics.items()))
        print(f"{ours:>12} {loss.item():>10.6f} {reference.item():>10.6f}  {shown}")
        results.append((ours, loss.item(), reference.item()))
    return results


if __name__ == "__main__":
    main()
