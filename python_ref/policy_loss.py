"""Reference for the policy losses, their aggregation and metrics (docs/losses.md).

Written plainly in PyTorch, in the dtype of the inputs (float64 in gives the ground truth). The numbers
follow verl 0.9.1 (`verl/trainer/ppo/core_algos.py`: compute_policy_loss_vanilla / _clip_cov / _kl_cov,
agg_loss) wherever docs/losses.md calls them verl-compatible.
"""
import math

import torch
import torch.nn.functional as F

from .logprobs import token_stats
from .selection import clip_cov_select, cov_scores, kl_cov_select

METHODS = ("ppo", "clip_cov", "kl_cov")
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
             "seq-mean-token-sum-norm")
# verl's vanilla PPO clamps the log-ratio before exp "for stability"; its Clip-Cov and KL-Cov do not.
PPO_LOG_RATIO_CLAMP = 20.0


def _safe_div(num, den):
    # An empty batch has numerator 0: dividing by 1 instead of 0 gives loss 0 and a zero (not NaN) gradient.
    den = torch.as_tensor(den, dtype=num.dtype, device=num.device)
    return num / torch.where(den > 0, den, torch.ones_like(den))


def _masked_mean(x, valid):
    return _safe_div(torch.where(valid, x, torch.zeros_like(x)).sum(), valid.sum())


def agg_loss(loss_mat, loss_mask, loss_agg_mode="token-mean", *, num_tokens=None, num_seqs=None,
             horizon=None):
    """Aggregate a per-token loss [B, T] into a 0-dim tensor (docs/losses.md#aggregation), m = loss_mask != 0:

    token-mean               sum(L*m) / N, N = num_tokens or sum(m)
    token-sum                sum(L*m)
    seq-mean-token-sum       sum_b sum_t(L*m) / S, S = num_seqs or #{b : sum_t m > 0}
    seq-mean-token-mean      sum_b [sum_t(L*m) / sum_t m] / S (sequences without valid tokens add 0)
    seq-mean-token-sum-norm  sum(L*m) / S / horizon, horizon = loss_mask.shape[-1] unless given

    num_tokens / num_seqs (float or 0-dim tensor) are GLOBAL denominators: the valid tokens / the sequences
    with at least one valid token across all micro-batches and data-parallel ranks of the optimizer step.
    Summing the returned losses over micro-batches then equals the loss of the whole batch. They map to
    verl's agg_loss as num_tokens = batch_num_tokens, num_seqs = global_batch_size, horizon =
    loss_scale_factor. verl also multiplies by dp_size (DDP averages gradients over ranks); here there is no
    dp_size: multiply the loss by the world size yourself when the gradient is averaged across ranks.
    Masked entries never contribute, even when L is NaN or inf there; a zero denominator (all masked)
    gives 0, never NaN.
    """
    if loss_agg_mode not in AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {list(AGG_MODES)}, got {loss_agg_mode!r}")
    if loss_mat.shape != loss_mask.shape:
        raise ValueError(f"loss_mask must have the shape of loss_mat {tuple(loss_mat.shape)}, "
                         f"got {tuple(loss_mask.shape)}")
    for name, value in (("num_tokens", num_tokens), ("num_seqs", num_seqs)):
        if value is not None and not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if horizon is not None and not horizon > 0:
        raise ValueError(f"horizon must be > 0, got {horizon}")
    m = loss_mask != 0
    masked = torch.where(m, loss_mat, torch.zeros_like(loss_mat))
    if loss_agg_mode == "token-sum":
        return masked.sum()
    if loss_agg_mode == "token-mean":
        return _safe_div(masked.sum(), m.sum() if num_tokens is None else num_tokens)
    seq_tokens = m.sum(-1)
    seq_sums = masked.sum(-1)
    if loss_agg_mode == "seq-mean-token-mean":
        seq_sums = _safe_div(seq_sums, seq_tokens)
    loss = _safe_div(seq_sums.sum(), (seq_tokens > 0).sum() if num_seqs is None else num_seqs)
    if loss_agg_mode == "seq-mean-token-sum-norm":
        loss = loss / (loss_mask.shape[-1] if horizon is None else horizon)
    return loss


def _check_args(method, centering, clip_ratio, clip_ratio_low, clip_ratio_high, clip_cov_ratio, clip_cov_lb,
                clip_cov_ub, clip_ratio_c, kl_cov_ratio):
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    if centering not in ("batch", "state"):
        raise ValueError(f"centering must be one of ['batch', 'state'], got {centering!r}")
    for name, value in (("clip_ratio", clip_ratio), ("clip_ratio_low", clip_ratio_low),
                        ("clip_ratio_high", clip_ratio_high), ("clip_cov_ratio", clip_cov_ratio),
                        ("kl_cov_ratio", kl_cov_ratio)):
        optional = name in ("clip_ratio_low", "clip_ratio_high")
        if (value is None and not optional) or (value is not None and not value >= 0):
            raise ValueError(f"{name} must be >= 0, got {value}")
    if not clip_cov_lb < clip_cov_ub:
        raise ValueError(f"clip_cov_lb must be < clip_cov_ub, got clip_cov_lb={clip_cov_lb}, "
                         f"clip_cov_ub={clip_cov_ub}")
    if clip_ratio_c is not None and not clip_ratio_c > 1:
        raise ValueError(f"clip_ratio_c must be > 1 (or None to turn the dual clip off), got {clip_ratio_c}")


def _check_tensors(logp, tensors, valid, validate):
    if logp.dim() != 2:
        raise ValueError(f"logp must have shape [B, T], got {tuple(logp.shape)}")
    for name, x in tensors.items():
        if x is not None and x.shape != logp.shape:
            raise ValueError(f"{name} must have the shape of logp {tuple(logp.shape)}, got {tuple(x.shape)}")
    if validate:
        # Only valid tokens are checked: padding may hold anything.
        for name in ("old_logp", "advantages"):
            if not bool(torch.isfinite(tensors[name][valid]).all()):
                raise ValueError(f"{name} must be finite at valid tokens")
        if bool((tensors["old_logp"][valid] > 0).any()):
            raise ValueError("old_logp must be <= 0 at valid tokens (it is a log-probability)")


def token_loss(logp, old_logp, advantages, response_mask, *, entropy=None, method="ppo", clip_ratio=0.2,
               clip_ratio_low=None, clip_ratio_high=None, clip_cov_ratio=2e-4, clip_cov_lb=1.0,
               clip_cov_ub=5.0, clip_ratio_c=3.0, kl_cov_ratio=2e-4, ppo_kl_coef=1.0, centering="batch",
               entropy_coef=0.0, loss_agg_mode="token-mean", rollout_is_weights=None, generator=None,
               num_tokens=None, num_seqs=None, validate=True):
    """Policy loss from precomputed per-token log-probs; returns (loss 0-dim, metrics dict).

    logp [B, T] (differentiable), old_logp, advantages A, response_mask m (bool or 0/1), entropy H and
    rollout_is_weights w: [B, T]. With rho = exp(logp - old_logp), pg1 = -A rho,
    pg2 = -A clip(rho, 1 - clip_ratio_low, 1 + clip_ratio_high) (both default to clip_ratio):
      "ppo":      loss_i = max(pg1, pg2), and where A < 0, min(that, -A clip_ratio_c) (dual clip; None turns
                  it off). The log-ratio is clamped to [-20, 20] before exp, as verl's vanilla loss does.
      "clip_cov": loss_i = max(pg1, pg2), set to 0 (with zero gradient) at `clip_cov_select` tokens, which
                  exclude the PPO-clipped ones (pg2 > pg1). No dual clip, no clamp.
      "kl_cov":   loss_i = pg1 + ppo_kl_coef |logp - old_logp| at `kl_cov_select` tokens. No clipping.
    Selections use `cov_scores(..., centering=centering, entropy=entropy)`; only "clip_cov" draws from
    `generator` (see `clip_cov_select` for the random rule). A ratio of 0 selects no token, so
    clip_cov_ratio=0 gives PPO-clip without the dual clip and kl_cov_ratio=0 the plain -A rho.
    loss = agg_loss(loss_i * w) - entropy_coef * agg_loss(H), the entropy term only if entropy_coef != 0;
    both aggregations use loss_agg_mode, num_tokens and num_seqs (see `agg_loss`).

    metrics (0-dim, detached; float in the loss dtype except n_selected, int64), means over valid tokens:
      entropy            agg_loss(H) as in the loss (only when entropy is given)
      ppo_kl             mean(old_logp - logp) (ppo: of the clamped log-ratio); kl_cov: mean |logp - old_logp|
      pg_clipfrac        ppo: fraction with pg2 > pg1; clip_cov and kl_cov: fraction selected
      pg_clipfrac_lower  ppo only: fraction with A < 0 and max(pg1, pg2) > -A clip_ratio_c (0 without it)
      cov_mean, cov_max  mean and max of the scores over valid tokens (every method; 0 if none valid)
      n_selected         number of selected tokens (0 for ppo)
    Invalid tokens never contribute to the loss, the gradient or a metric, whatever their values.
    validate=True also checks that old_logp and A are finite and old_logp <= 0 at valid tokens.
    """
    _check_args(method, centering, clip_ratio, clip_ratio_low, clip_ratio_high, clip_cov_ratio, clip_cov_lb,
                clip_cov_ub, clip_ratio_c, kl_cov_ratio)
    valid = response_mask != 0
    _check_tensors(logp, {"old_logp": old_logp, "advantages": advantages, "response_mask": response_mask,
                          "entropy": entropy, "rollout_is_weights": rollout_is_weights}, valid, validate)
    if entropy_coef != 0 and entropy is None:
        raise ValueError(f"entropy must be given when entropy_coef != 0, got entropy_coef={entropy_coef}")
    eps_low = clip_ratio if clip_ratio_low is None else clip_ratio_low
    eps_high = clip_ratio if clip_ratio_high is None else clip_ratio_high

    # Zeroing invalid tokens first keeps padding garbage (NaN, huge ratios) out of values and gradients.
    def on_valid(x):
        return torch.where(valid, x, torch.zeros_like(x))

    adv = on_valid(advantages)
    log_ratio = on_valid(logp) - on_valid(old_logp)
    if method == "ppo":
        log_ratio = log_ratio.clamp(-PPO_LOG_RATIO_CLAMP, PPO_LOG_RATIO_CLAMP)
    ratio = log_ratio.exp()
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1 - eps_low, 1 + eps_high)
    clipped = (pg2 > pg1) & valid
    scores = cov_scores(logp, advantages, response_mask, centering=centering, entropy=entropy)
    selected = torch.zeros_like(valid)
    fdtype = pg1.dtype

    if method == "ppo":
        loss_i = torch.maximum(pg1, pg2)
        lower = torch.zeros_like(valid)
        if clip_ratio_c is not None:
            pg3 = -adv * clip_ratio_c
            lower = (loss_i > pg3) & (adv < 0)
            loss_i = torch.where(adv < 0, torch.minimum(loss_i, pg3), loss_i)
        metrics = {"ppo_kl": _masked_mean(-log_ratio, valid),
                   "pg_clipfrac": _masked_mean(clipped.to(fdtype), valid),
                   "pg_clipfrac_lower": _masked_mean(lower.to(fdtype), valid)}
    elif method == "clip_cov":
        selected = clip_cov_select(scores, response_mask, ratio=clip_cov_ratio, lb=clip_cov_lb,
                                   ub=clip_cov_ub, clipped=clipped, generator=generator)
        loss_i = torch.where(selected, torch.zeros_like(pg1), torch.maximum(pg1, pg2))
        metrics = {"ppo_kl": _masked_mean(-log_ratio, valid),
                   "pg_clipfrac": _masked_mean(selected.to(fdtype), valid)}
    else:
        selected = kl_cov_select(scores, response_mask, ratio=kl_cov_ratio)
        abs_kl = log_ratio.abs()
        loss_i = pg1 + torch.where(selected, ppo_kl_coef * abs_kl, torch.zeros_like(abs_kl))
        metrics = {"ppo_kl": _masked_mean(abs_kl, valid),
                   "pg_clipfrac": _masked_mean(selected.to(fdtype), valid)}

    if rollout_is_weights is not None:
        loss_i = loss_i * on_valid(rollout_is_weights)
    agg = {"loss_agg_mode": loss_agg_mode, "num_tokens": num_tokens, "num_seqs": num_seqs}
    loss = agg_loss(loss_i, valid, **agg)
    if entropy is not None:
        entropy_agg = agg_loss(entropy, valid, **agg)
        metrics["entropy"] = entropy_agg
        if entropy_coef != 0:
            loss = loss - entropy_coef * entropy_agg
    metrics["cov_mean"] = _masked_mean(scores, valid)
    metrics["cov_max"] = scores[valid].max() if bool(valid.any()) else scores.new_zeros(())
    metrics["n_selected"] = selected.sum()
    return loss, {k: v.detach() for k, v in metrics.items()}


def policy_loss(logits, targets, old_logp, advantages, response_mask, *, method="ppo", clip_ratio=0.2,
                clip_ratio_low=None, clip_ratio_high=None, clip_cov_ratio=2e-4, clip_cov_lb=1.0,
                clip_cov_ub=5.0, clip_ratio_c=3.0, kl_cov_ratio=2e-4, ppo_kl_coef=1.0, centering="batch",
                entropy_coef=0.0, loss_agg_mode="token-mean", rollout_is_weights=None, generator=None,
                aent_coef=0.0, clamp_fraction=None, temperature=1.0, ignore_index=-100, num_tokens=None,
                num_seqs=None, validate=True):
    """Policy loss from logits: `token_stats` of logits [B, T, V] / temperature, then `token_loss`, and with
    clamp_fraction AEnt's term -aent_coef * agg(clamped entropy) and metrics clamped_entropy (mean over
    valid tokens) and aent_coef.

    logits may also be an LM head: any object with attributes hidden [B, T, D], weight [V, D] and bias [V]
    or None (an `LMHead`); then logits = F.linear(hidden, weight, bias) and everything else is the same.
    targets [B, T] integer; old_logp, advantages, response_mask, rollout_is_weights [B, T]. A token is
    valid where response_mask != 0 and its target is not ignore_index. Returns (loss 0-dim, metrics);
    the gradient flows to logits (or hidden, weight, bias) through logp and (when entropy_coef != 0) the
    entropy.
    """
    if all(hasattr(logits, name) for name in ("hidden", "weight", "bias")):
        hidden = logits.hidden
        if hidden.dim() != 3 or targets.shape != hidden.shape[:-1]:
            raise ValueError(f"hidden must be [B, T, D] and targets [B, T], got hidden {tuple(hidden.shape)}, "
                             f"targets {tuple(targets.shape)}")
        logits = F.linear(hidden, logits.weight, logits.bias)
    if logits.dim() != 3 or targets.shape != logits.shape[:-1]:
        raise ValueError(f"logits must be [B, T, V] and targets [B, T], got logits {tuple(logits.shape)}, "
                         f"targets {tuple(targets.shape)}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if aent_coef != 0 and clamp_fraction is None:
        raise ValueError(f"clamp_fraction must be given when aent_coef != 0, got aent_coef={aent_coef}")
    stats = token_stats(logits, targets, temperature=temperature, ignore_index=ignore_index,
                        clamp_fraction=clamp_fraction)
    if response_mask.shape != targets.shape:
        raise ValueError(f"response_mask must have the shape of targets {tuple(targets.shape)}, "
                         f"got {tuple(response_mask.shape)}")
    mask = (response_mask != 0) & (targets != ignore_index)
    loss, metrics = token_loss(stats.logp, old_logp, advantages, mask, entropy=stats.entropy, method=method,
                      clip_ratio=clip_ratio, clip_ratio_low=clip_ratio_low, clip_ratio_high=clip_ratio_high,
                      clip_cov_ratio=clip_cov_ratio, clip_cov_lb=clip_cov_lb, clip_cov_ub=clip_cov_ub,
                      clip_ratio_c=clip_ratio_c, kl_cov_ratio=kl_cov_ratio, ppo_kl_coef=ppo_kl_coef,
                      centering=centering, entropy_coef=entropy_coef, loss_agg_mode=loss_agg_mode,
                      rollout_is_weights=rollout_is_weights, generator=generator, num_tokens=num_tokens,
                      num_seqs=num_seqs, validate=validate)
    if clamp_fraction is not None:
        clamped = torch.where(mask, stats.clamped_entropy, torch.zeros_like(stats.clamped_entropy))
        loss = loss - aent_coef * agg_loss(clamped, mask, loss_agg_mode, num_tokens=num_tokens, num_seqs=num_seqs)
        metrics["clamped_entropy"] = (clamped.sum() / max(int(mask.sum()), 1)).detach()
        metrics["aent_coef"] = torch.tensor(float(aent_coef), dtype=loss.dtype)
    return loss, metrics


def ppo_loss(logits, targets, old_logp, advantages, response_mask, **kwargs):
    """`policy_loss` with method="ppo"."""
    return policy_loss(logits, targets, old_logp, advantages, response_mask, method="ppo", **kwargs)


def clip_cov_loss(logits, targets, old_logp, advantages, response_mask, **kwargs):
    """`policy_loss` with method="clip_cov"."""
    return policy_loss(logits, targets, old_logp, advantages, response_mask, method="clip_cov", **kwargs)


def kl_cov_loss(logits, targets, old_logp, advantages, response_mask, **kwargs):
    """`policy_loss` with method="kl_cov"."""
    return policy_loss(logits, targets, old_logp, advantages, response_mask, method="kl_cov", **kwargs)
