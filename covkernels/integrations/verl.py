"""verl: covkernels' policy losses in verl's registry, and covkernels as verl's fused-kernel backend.

Written against verl 0.9.1. Importing this module (in every verl process: VERL_USE_EXTERNAL_MODULES, which
`import verl` reads) registers, through verl's own registries:
- with `register_policy_loss`, verl's PolicyLossFn signature:

    "ck_ppo"                                as verl's "vanilla" (PPO-clip, dual clip with clip_ratio_c)
    "ck_clip_cov", "ck_kl_cov"              as verl's "clip_cov", "kl_cov" (batch centering)
    "ck_clip_cov_state", "ck_kl_cov_state"  the same with per-state centering, C = (logp + H) A

  They read the same config fields as verl's (clip_ratio[_low|_high], clip_ratio_c, policy_loss.clip_cov_*,
  policy_loss.kl_cov_ratio, policy_loss.ppo_kl_coef: into one LossConfig, `loss_config`; global_batch_info)
  and select tokens without a host sync (verl's clip_cov calls .item(); its kl_cov copies the scores to the
  CPU for topk). The "_state" losses need the micro-batch entropy H, which verl's loss signature does not
  carry: the engine below hands it over (`verl_engine.micro_batch_entropy`);
- with `EngineRegistry`, `verl_engine.CovkernelsFSDPEngine` (vendor "covkernels"): the actor's log-probs and
  entropy from one covkernels pass in verl's fused-kernel path, and the entropy for the losses.

    VERL_USE_EXTERNAL_MODULES=covkernels.integrations.verl VERL_ENGINE_VENDOR=covkernels \\
    python -m verl.trainer.main_ppo actor_rollout_ref.actor.policy_loss.loss_mode=ck_kl_cov_state \\
        actor_rollout_ref.actor.calculate_entropy=True actor_rollout_ref.model.use_fused_kernels=True \\
        actor_rollout_ref.model.fused_kernel_options.impl_backend=covkernels ...

Differences from verl's losses: an all-masked micro-batch gives loss 0 (verl: NaN); KL-Cov breaks equal
scores at the cut by lower row-major index (verl: torch.topk's order); Clip-Cov draws its uniform sample
from a different random stream (same distribution); metrics are 0-dim tensors; verl's seq-mean-token-mean
adds 1e-8 to each sequence's token count.
"""
from verl.trainer.ppo.core_algos import register_policy_loss

from .. import LossConfig, token_loss
from .verl_engine import micro_batch_entropy

# verl's `policy_loss.*` fields that are LossConfig fields of the same name. Where verl leaves one None, the
# LossConfig default applies, which is verl's own (core_algos.compute_policy_loss_clip_cov / _kl_cov).
POLICY_LOSS_FIELDS = ("clip_cov_ratio", "clip_cov_lb", "clip_cov_ub", "kl_cov_ratio", "ppo_kl_coef")
# covkernels metric -> verl's name (verl's own where it has one).
METRIC_NAMES = {"pg_clipfrac": "actor/pg_clipfrac", "ppo_kl": "actor/ppo_kl",
                "pg_clipfrac_lower": "actor/pg_clipfrac_lower", "cov_mean": "actor/ck_cov_mean",
                "cov_max": "actor/ck_cov_max", "n_selected": "actor/ck_n_selected"}


def loss_config(config, method, centering="batch", loss_agg_mode="token-mean"):
    """The LossConfig of a ck_* loss from verl's actor config (clip_ratio, clip_ratio_low, clip_ratio_high,
    clip_ratio_c where present, policy_loss.* where set), without the checks that sync (validate=False)."""
    fields = {name: getattr(config.policy_loss, name, None) for name in POLICY_LOSS_FIELDS}
    fields = {name: value for name, value in fields.items() if value is not None}
    if hasattr(config, "clip_ratio_c"):
        fields["clip_ratio_c"] = config.clip_ratio_c  # None turns the dual clip off
    return LossConfig(method, clip_ratio=config.clip_ratio, clip_ratio_low=config.clip_ratio_low,
                      clip_ratio_high=config.clip_ratio_high, centering=centering, loss_agg_mode=loss_agg_mode,
                      validate=False, **fields)


def _policy_loss(method, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                 rollout_is_weights, centering="batch"):
    """A verl PolicyLossFn body: covkernels.token_loss with verl's config, aggregation and metric names."""
    loss_name = f"ck_{method}" + ("_state" if centering == "state" else "")
    if config is None:
        raise ValueError(f"{loss_name} needs verl's actor config, got config=None")
    entropy = None
    if centering == "state":
        entropy = micro_batch_entropy()
        if entropy is None:
            raise ValueError(f"{loss_name} needs the micro-batch entropy: run verl with VERL_ENGINE_VENDOR="
                             "covkernels (covkernels' engine hands it to the loss) and "
                             "actor.calculate_entropy=True")
        if entropy.shape != log_prob.shape:
            raise ValueError(f"{loss_name}: the micro-batch entropy has shape {tuple(entropy.shape)}, "
                             f"log_prob {tuple(log_prob.shape)}")
        entropy = entropy.detach()
    info = dict(getattr(config, "global_batch_info", None) or {})
    loss, metrics = token_loss(
        log_prob, old_log_prob, advantages, response_mask, loss_config(config, method, centering, loss_agg_mode),
        entropy=entropy, rollout_is_weights=rollout_is_weights, num_tokens=info.get("batch_num_tokens"),
        num_seqs=info.get("global_batch_size"))
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


@register_policy_loss("ck_clip_cov_state")
def compute_policy_loss_ck_clip_cov_state(old_log_prob, log_prob, advantages, response_mask,
                                          loss_agg_mode="token-mean", config=None, rollout_is_weights=None):
    """"ck_clip_cov" with per-state centering, C = (logp + H) A; needs CovkernelsFSDPEngine's entropy."""
    return _policy_loss("clip_cov", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                        rollout_is_weights, centering="state")


@register_policy_loss("ck_kl_cov_state")
def compute_policy_loss_ck_kl_cov_state(old_log_prob, log_prob, advantages, response_mask,
                                        loss_agg_mode="token-mean", config=None, rollout_is_weights=None):
    """"ck_kl_cov" with per-state centering, C = (logp + H) A; needs CovkernelsFSDPEngine's entropy."""
    return _policy_loss("kl_cov", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                        rollout_is_weights, centering="state")
