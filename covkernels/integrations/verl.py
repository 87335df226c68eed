"""verl: covkernels' policy losses in verl's registry, and verl's log-probs and entropy from the fused pass.

Written against verl 0.9.1. Importing this module registers three losses with verl's own
`register_policy_loss` (verl/trainer/ppo/core_algos.py), with verl's PolicyLossFn signature:

    "ck_ppo"       as verl's "vanilla" (PPO-clip, dual clip with clip_ratio_c)
    "ck_clip_cov"  as verl's "clip_cov"
    "ck_kl_cov"    as verl's "kl_cov"

They read the same config fields as verl's (clip_ratio[_low|_high], clip_ratio_c, policy_loss.clip_cov_*,
policy_loss.kl_cov_ratio, policy_loss.ppo_kl_coef, global_batch_info) and select tokens without a host
sync (verl's clip_cov calls .item(); its kl_cov copies the scores to the CPU for topk). Use them with

    VERL_USE_EXTERNAL_MODULES=covkernels.integrations.verl python -m verl.trainer.main_ppo \\
        actor_rollout_ref.actor.policy_loss.loss_mode=ck_kl_cov ...

(verl imports the listed modules at `import verl`, in every worker). Differences from verl's losses:
an all-masked micro-batch gives loss 0 (verl: NaN); KL-Cov breaks equal scores at the cut by lower
row-major index (verl: torch.topk's order); Clip-Cov draws its uniform sample from a different random
stream (same distribution); metrics are 0-dim tensors; verl's seq-mean-token-mean adds 1e-8 to each
sequence's token count. Per-state centering needs the entropy, which verl's loss signature does not carry,
so these losses use batch centering (call `covkernels.token_loss` in a custom loss for centering="state").

`logprobs_from_logits`, `entropy_from_logits` and `logprobs_and_entropy_from_logits` have the semantics
of verl.utils.torch_functional's functions; to use them in verl's FSDP engine
(verl/workers/engine/fsdp/transformer_impl.py), in the worker process:

    import verl.workers.engine.fsdp.transformer_impl as fsdp_impl
    fsdp_impl.logprobs_from_logits = logprobs_from_logits      # the module global the engine calls
    engine.compute_entropy_from_logits = entropy_from_logits   # set per engine in its __init__
"""
import torch
from verl.trainer.ppo.core_algos import register_policy_loss

from .. import logprobs_and_entropy, token_loss

# verl's defaults where a config field is None (core_algos.compute_policy_loss_clip_cov / _kl_cov).
POLICY_LOSS_DEFAULTS = {"clip_cov_ratio": 2e-4, "clip_cov_lb": 1.0, "clip_cov_ub": 5.0, "kl_cov_ratio": 2e-4,
                        "ppo_kl_coef": 1.0}
# covkernels metric -> verl's name (verl's own where it has one).
METRIC_NAMES = {"pg_clipfrac": "actor/pg_clipfrac", "ppo_kl": "actor/ppo_kl",
                "pg_clipfrac_lower": "actor/pg_clipfrac_lower", "cov_mean": "actor/ck_cov_mean",
                "cov_max": "actor/ck_cov_max", "n_selected": "actor/ck_n_selected"}


def logprobs_and_entropy_from_logits(logits, labels, calculate_entropy=True, inplace_backward=False):
    """verl's logprobs_from_logits and entropy_from_logits in one read of the logits and one backward.

    logits [..., V] (already divided by the temperature, as verl does), labels [...] int -> (log_probs,
    entropy or None), [...] fp32, differentiable. inplace_backward writes the logits' gradient into their
    storage (the caller must not use the logits after the backward).
    """
    logp, entropy = logprobs_and_entropy(logits, labels, inplace_backward=inplace_backward, validate=False)
    return logp, entropy if calculate_entropy else None


def logprobs_from_logits(logits, labels, inplace_backward=True):
    """verl.utils.torch_functional.logprobs_from_logits by the fused pass: [..., V], [...] -> [...] fp32."""
    return logprobs_and_entropy_from_logits(logits, labels, False, inplace_backward)[0]


def entropy_from_logits(logits, chunk_size=None):
    """verl's entropy_from_logits (and entropy_from_logits_with_chunking; chunk_size is not needed: the
    pass holds no [N, V] temporaries) by the fused pass: [..., V] -> [...] fp32, differentiable."""
    targets = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    return logprobs_and_entropy(logits, targets, validate=False)[1]


def _policy_loss(method, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                 rollout_is_weights):
    """A verl PolicyLossFn body: covkernels.token_loss with verl's config, aggregation and metric names."""
    if config is None:
        raise ValueError(f"ck_{method} needs verl's actor config, got config=None")
    loss_cfg = config.policy_loss
    hyper = {name: default if getattr(loss_cfg, name, None) is None else getattr(loss_cfg, name)
             for name, default in POLICY_LOSS_DEFAULTS.items()}
    info = dict(getattr(config, "global_batch_info", None) or {})
    loss, metrics = token_loss(
        log_prob, old_log_prob, advantages, response_mask, method=method, clip_ratio=config.clip_ratio,
        clip_ratio_low=config.clip_ratio_low, clip_ratio_high=config.clip_ratio_high,
        clip_ratio_c=getattr(config, "clip_ratio_c", 3.0), loss_agg_mode=loss_agg_mode,
        rollout_is_weights=rollout_is_weights, num_tokens=info.get("batch_num_tokens"),
        num_seqs=info.get("global_batch_size"), validate=False, **hyper)
    # verl's agg_loss: an explicit horizon for seq-mean-token-sum-norm, then x dp_size so that the
    # data-parallel gradient average gives the gradient of the global batch.
    horizon = info.get("loss_scale_factor")
    if loss_agg_mode == "seq-mean-token-sum-norm" and horizon is not None:
        loss = loss * (response_mask.shape[-1] / horizon)
    loss = loss * (info.get("dp_size") or 1)
    return loss, {METRIC_NAMES[k]: v for k, v in metrics.items() if k in METRIC_NAMES}


@register_policy_loss("ck_ppo")
def compute_policy_loss_ck_ppo(old_log_prob, log_prob, advantages, response_mask,
                               loss_agg_mode="token-mean", config=None, rollout_is_weights=None):
    """verl's "vanilla" PPO-clip loss (log-ratio clamped to +-20, dual clip) by covkernels.
    Returns (loss, {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower", ...})."""
    return _policy_loss("ppo", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                        rollout_is_weights)


@register_policy_loss("ck_clip_cov")
def compute_policy_loss_ck_clip_cov(old_log_prob, log_prob, advantages, response_mask,
                                    loss_agg_mode="token-mean", config=None, rollout_is_weights=None):
    """verl's "clip_cov" loss by covkernels, with a sync-free uniform selection of the candidates.
    Returns (loss, {"actor/pg_clipfrac" (fraction selected), "actor/ppo_kl", "actor/ck_*"})."""
    return _policy_loss("clip_cov", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                        rollout_is_weights)


@register_policy_loss("ck_kl_cov")
def compute_policy_loss_ck_kl_cov(old_log_prob, log_prob, advantages, response_mask,
                                  loss_agg_mode="token-mean", config=None, rollout_is_weights=None):
    """verl's "kl_cov" loss by covkernels, with a sync-free top-n selection on the device.
    Returns (loss, {"actor/ppo_kl" (mean |logp - old_logp|), "actor/pg_clipfrac" (fraction selected),
    ...})."""
    return _policy_loss("kl_cov", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                        rollout_is_weights)
