"""The per-token policy losses and their metrics on checked inputs (docs/losses.md#per-token-losses):
PPO-clip, Clip-Cov, KL-Cov, the entropy bonus and AEnt's clamped-entropy bonus, as verl 0.9 computes them."""
from typing import Any, NamedTuple

import torch

from ..selection import loss_selection, masked_mean
from .aggregation import agg_loss

# verl's vanilla PPO clamps the log-ratio before exp; its Clip-Cov and KL-Cov do not.
PPO_LOG_RATIO_CLAMP = 20.0


class Batch(NamedTuple):
    """The arguments of one loss call besides its LossConfig and the log-probs it differentiates (token_loss
    and policy_loss document them): the per-token [B, T] tensors, then what places the call in its batch."""

    old_logp: torch.Tensor
    advantages: torch.Tensor
    response_mask: torch.Tensor
    rollout_is_weights: torch.Tensor | None = None
    generator: torch.Generator | None = None
    num_tokens: Any = None
    num_seqs: Any = None
    process_group: Any = None
    selection: Any = None


class RatioTerms(NamedTuple):
    """The importance-ratio terms of a loss call, in its compute dtype, 0 off the valid tokens."""

    adv: torch.Tensor  # A
    log_ratio: torch.Tensor  # logp - old_logp (PPO: clamped to +-20), differentiable
    pg2: torch.Tensor  # -A clip(rho, 1 - eps_low, 1 + eps_high), its gradient 0 wherever it is the loss
    clipped: torch.Tensor  # bool: the valid tokens where pg2 is PPO's loss


def on_valid(x, valid, dtype):
    """x in `dtype`, 0 off the valid tokens: padding may hold garbage (NaN, huge ratios), which must reach
    neither a value nor a gradient."""
    return torch.where(valid, x.to(dtype), torch.zeros((), dtype=dtype, device=x.device))


def ratio_terms(logp, old_logp, advantages, valid, config):
    """RatioTerms from [B, T] inputs; valid = the tokens that count. Only config's method and clip ratios
    are read."""
    eps_low = config.clip_ratio if config.clip_ratio_low is None else config.clip_ratio_low
    eps_high = config.clip_ratio if config.clip_ratio_high is None else config.clip_ratio_high
    # Trainers mix dtypes (fp32 log-probs, bf16 or fp64 advantages): compute in logp's (at least fp32).
    dtype = torch.promote_types(logp.dtype, torch.float32)
    adv = on_valid(advantages, valid, dtype)
    log_ratio = on_valid(logp, valid, dtype) - on_valid(old_logp, valid, dtype)
    if config.method == "ppo":
        log_ratio = log_ratio.clamp(-PPO_LOG_RATIO_CLAMP, PPO_LOG_RATIO_CLAMP)
    ratio = log_ratio.detach().exp()
    pg2 = -adv * ratio.clamp(1 - eps_low, 1 + eps_high)
    clipped = (pg2 > -adv * ratio) & valid
    return RatioTerms(adv, log_ratio, pg2, clipped)


def _selection(logp, advantages, entropy, valid, clipped, batch, config):
    """(scores, selected, num_tokens, num_seqs): the call's covariance scores and Clip-Cov / KL-Cov tokens
    (batch.selection's when given) and the aggregation denominators (None: those of the call)."""
    num_tokens, num_seqs = batch.num_tokens, batch.num_seqs
    sel = batch.selection
    if sel is not None:
        num_tokens = sel.num_tokens if num_tokens is None else num_tokens
        num_seqs = sel.num_seqs if num_seqs is None else num_seqs
        return sel.scores.to(logp.dtype), sel.selected & valid, num_tokens, num_seqs
    scores, selected, counts = loss_selection(logp, advantages, entropy, valid, clipped, config,
                                              generator=batch.generator, process_group=batch.process_group)
    if counts is not None:
        num_tokens = counts[2] if num_tokens is None else num_tokens
        num_seqs = counts[3] if num_seqs is None else num_seqs
    return scores, selected, num_tokens, num_seqs


def _policy_term(terms, selected, valid, config):
    """(per-token loss [B, T], metrics) of config.method, before weights and aggregation."""
    adv, log_ratio, pg2, clipped = terms
    fdtype = pg2.dtype
    if config.method == "kl_cov":
        abs_kl = log_ratio.abs()
        # A zero advantage contributes exactly 0 (and no gradient) even where e^(l - l_old) overflows.
        pg1 = -adv * torch.where(adv == 0, 0.0, log_ratio).exp()
        loss_i = pg1 + torch.where(selected, config.ppo_kl_coef * abs_kl, torch.zeros_like(abs_kl))
        metrics = {"ppo_kl": masked_mean(abs_kl, valid), "pg_clipfrac": masked_mean(selected.to(fdtype), valid)}
        return loss_i, metrics
    # max(pg1, pg2) = pg1 off the clipped tokens. Clipped, selected and zero-advantage tokens pass no
    # gradient, so their ratio is not differentiated: an overflowing e^(l - l_old) would give 0 * inf.
    frozen = clipped | selected | (adv == 0)
    pg1 = -adv * torch.where(frozen, 0.0, log_ratio).exp()
    loss_i = torch.where(clipped, pg2, pg1)
    metrics = {"ppo_kl": masked_mean(-log_ratio, valid), "pg_clipfrac": masked_mean(selected.to(fdtype), valid)}
    if config.method == "ppo":
        lower = torch.zeros_like(valid)
        if config.clip_ratio_c is not None:
            pg3 = -adv * config.clip_ratio_c
            lower = (loss_i > pg3) & (adv < 0)
            loss_i = torch.where(adv < 0, torch.minimum(loss_i, pg3), loss_i)
        metrics["pg_clipfrac"] = masked_mean(clipped.to(fdtype), valid)
        metrics["pg_clipfrac_lower"] = masked_mean(lower.to(fdtype), valid)
    return torch.where(selected, 0.0, loss_i), metrics


def loss_from_logp(logp, entropy, clamped, valid, batch, config):
    """(loss, metrics) of token_loss / policy_loss on checked inputs: logp, entropy (or None) and AEnt's
    clamped entropy H~ (or None) [B, T], differentiable; valid: the tokens that count; batch: a Batch;
    config: a LossConfig of numbers. With H~ the metrics gain clamped_entropy (its valid-token mean, what
    AEntController reads) and aent_coef, and the loss the term -aent_coef * agg(H~)."""
    terms = ratio_terms(logp, batch.old_logp, batch.advantages, valid, config)
    dtype = terms.pg2.dtype
    logp, entropy = logp.to(dtype), None if entropy is None else entropy.to(dtype)
    scores, selected, num_tokens, num_seqs = _selection(logp, batch.advantages.to(dtype), entropy, valid,
                                                        terms.clipped, batch, config)
    loss_i, metrics = _policy_term(terms, selected, valid, config)
    if batch.rollout_is_weights is not None:
        loss_i = loss_i * on_valid(batch.rollout_is_weights, valid, dtype)
    agg = {"loss_agg_mode": config.loss_agg_mode, "num_tokens": num_tokens, "num_seqs": num_seqs}
    loss = agg_loss(loss_i, valid, **agg)
    if entropy is not None:
        metrics["entropy"] = agg_loss(entropy, valid, **agg)
        if config.entropy_coef != 0:
            loss = loss - config.entropy_coef * metrics["entropy"]
    if clamped is not None:
        clamped = clamped.to(dtype)
        metrics["clamped_entropy"] = masked_mean(clamped, valid)
        metrics["aent_coef"] = torch.full((), float(config.aent_coef), dtype=dtype, device=loss.device)
        if config.aent_coef != 0:
            loss = loss - config.aent_coef * agg_loss(clamped, valid, **agg)
    metrics["cov_mean"] = masked_mean(scores, valid)
    metrics["cov_max"] = torch.where(valid.any(), torch.where(valid, scores, float("-inf")).amax(), 0.0)
    metrics["n_selected"] = selected.sum()
    return loss, {k: v.detach() for k, v in metrics.items()}
