"""Policy losses on top of the fused pass (SPEC sections 6, 7, 9): PPO-clip, Clip-Cov, KL-Cov, entropy bonus.

Numbers follow verl 0.9 (compute_policy_loss_vanilla / _clip_cov / _kl_cov, agg_loss); selections are
from covkernels.selection. Nothing here synchronises with the host unless validate=True.

Data parallel (`process_group`): the centering means, N_valid, n, the selections and the aggregation
denominators are those of the whole batch of all ranks (rank r holding rows [r B, (r + 1) B), equal
[B, T] on every rank); a call makes one all-reduce of 6 float64 and, for Clip-Cov / KL-Cov, one
all-gather of 2 * n_max float64 per rank (selection.topn_bound). Each rank's loss is its share: the
sum over ranks is the whole-batch loss, and each rank's gradient is its rows' part of the whole-batch
gradient (DDP averages gradients over ranks: multiply the loss by the world size to get the sum).
Metrics stay this rank's. A precomputed `selection` (covkernels.distributed.CovSelection) replaces
all of that and makes the call collective-free.
"""
import math
import numbers

import torch

from ._validation import check_choice, check_nonnegative
from .linear import linear_logprobs_and_entropy
from .logprobs import clamped_pass, logprobs_and_entropy
from .selection import loss_selection, masked_mean, sum_over_ranks

METHODS = ("ppo", "clip_cov", "kl_cov")
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# verl's vanilla PPO clamps the log-ratio before exp; its Clip-Cov and KL-Cov do not.
PPO_LOG_RATIO_CLAMP = 20.0


def _div(num, den):
    """num / den with a zero denominator read as 1: an all-masked batch gives 0, never NaN."""
    den = torch.as_tensor(den, dtype=num.dtype, device=num.device)
    return num / torch.where(den > 0, den, torch.ones_like(den))


def agg_loss(loss_mat, loss_mask, loss_agg_mode="token-mean", *, num_tokens=None, num_seqs=None, horizon=None,
             process_group=None):
    """Aggregates a per-token loss [B, T] into a 0-dim tensor (SPEC section 7); m = loss_mask != 0.

    token-mean: sum(L m) / N; token-sum: sum(L m); seq-mean-token-sum: sum_b sum_t(L m) / S;
    seq-mean-token-mean: sum_b [sum_t(L m) / sum_t m] / S; seq-mean-token-sum-norm: sum(L m) / S / horizon.
    N = num_tokens or sum(m); S = num_seqs or the number of sequences with a valid token; horizon =
    loss_mask.shape[-1] unless given. num_tokens / num_seqs (number or 0-dim tensor) are global
    denominators over every micro-batch and rank of the step (verl's batch_num_tokens and
    global_batch_size): summing the micro-batch losses then gives the loss, and gradient, of the whole batch.
    process_group: N and S default to their sums over the ranks of the group (one all-reduce of 2 float64
    when the mode needs a denominator that is not given; none for token-sum); the result is this rank's
    share of the whole-batch loss.
    """
    check_choice("loss_agg_mode", loss_agg_mode, AGG_MODES)
    if loss_mat.shape != loss_mask.shape:
        raise ValueError(f"loss_mask must have the shape of loss_mat {tuple(loss_mat.shape)}, "
                         f"got {tuple(loss_mask.shape)}")
    for name, value in (("num_tokens", num_tokens), ("num_seqs", num_seqs)):
        if value is not None and not isinstance(value, torch.Tensor):
            check_nonnegative(name, value)
    if horizon is not None and not horizon > 0:
        raise ValueError(f"horizon must be > 0, got {horizon}")
    m = loss_mask != 0
    masked = torch.where(m, loss_mat, torch.zeros_like(loss_mat))
    needs = num_tokens if loss_agg_mode == "token-mean" else num_seqs
    if process_group is not None and loss_agg_mode != "token-sum" and needs is None:
        counts = sum_over_ranks([m.sum(), (m.sum(-1) > 0).sum()], process_group)
        num_tokens = counts[0] if num_tokens is None else num_tokens
        num_seqs = counts[1] if num_seqs is None else num_seqs
    if loss_agg_mode == "token-sum":
        return masked.sum()
    if loss_agg_mode == "token-mean":
        return _div(masked.sum(), m.sum() if num_tokens is None else num_tokens)
    seq_tokens, seq_sums = m.sum(-1), masked.sum(-1)
    if loss_agg_mode == "seq-mean-token-mean":
        seq_sums = _div(seq_sums, seq_tokens)
    loss = _div(seq_sums.sum(), (seq_tokens > 0).sum() if num_seqs is None else num_seqs)
    if loss_agg_mode == "seq-mean-token-sum-norm":
        loss = loss / (loss_mask.shape[-1] if horizon is None else horizon)
    return loss


def _check_hyper(hyper):
    """Hyperparameters of a loss call (the `hyper` dict of token_loss / policy_loss)."""
    check_choice("method", hyper["method"], METHODS)
    check_choice("centering", hyper["centering"], ("batch", "state"))
    check_choice("loss_agg_mode", hyper["loss_agg_mode"], AGG_MODES)
    for name in ("clip_ratio", "clip_ratio_low", "clip_ratio_high", "clip_cov_ratio", "kl_cov_ratio"):
        if hyper[name] is not None:
            check_nonnegative(name, hyper[name])
    if not hyper["clip_cov_lb"] < hyper["clip_cov_ub"]:
        raise ValueError(f"clip_cov_lb must be < clip_cov_ub, got clip_cov_lb={hyper['clip_cov_lb']}, "
                         f"clip_cov_ub={hyper['clip_cov_ub']}")
    # Python numbers, not tensors: a tensor coefficient would sync with the host at `!= 0`.
    for name in ("entropy_coef", "ppo_kl_coef"):
        value = hyper[name]
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise TypeError(f"{name} must be a finite real number (a float, not a tensor), got {value!r}")
    check_nonnegative("ppo_kl_coef", hyper["ppo_kl_coef"])
    c = hyper["clip_ratio_c"]
    if c is not None and not c > 1:
        raise ValueError(f"clip_ratio_c must be > 1 (or None to turn the dual clip off), got {c}")


def _check_tokens(shape, device, tensors, validate):
    """Per-token tensors: all [B, T] = `shape` on `device`; with validate, finite and old_logp <= 0 at
    valid tokens. Returns the valid tokens (response_mask != 0)."""
    if len(shape) != 2:
        raise ValueError(f"logp (or logits.shape[:-1]) must have shape [B, T], got {tuple(shape)}")
    for name, x in tensors.items():
        if x is None:
            continue
        if not isinstance(x, torch.Tensor) or x.shape != shape:
            raise ValueError(f"{name} must be a tensor of shape {tuple(shape)}, got {tuple(getattr(x, 'shape', ()))}")
        if x.device != device:
            raise ValueError(f"{name} is on {x.device}, expected {device}")
    valid = tensors["response_mask"] != 0
    if validate and not torch.compiler.is_compiling():
        # One host sync, by choice; only valid tokens are checked (padding may hold anything).
        old, adv = tensors["old_logp"], tensors["advantages"]
        bad_old = valid & ~torch.isfinite(old)
        bad_adv = valid & ~torch.isfinite(adv)
        positive = valid & (old > 0)
        flags = torch.stack([bad_old.any(), bad_adv.any(), positive.any()]).tolist()
        if flags[0]:
            raise ValueError("old_logp must be finite at valid tokens")
        if flags[1]:
            raise ValueError("advantages must be finite at valid tokens")
        if flags[2]:
            raise ValueError("old_logp must be <= 0 at valid tokens (it is a log-probability)")
    return valid


def token_loss(logp, old_logp, advantages, response_mask, *, entropy=None, method="ppo", clip_ratio=0.2,
               clip_ratio_low=None, clip_ratio_high=None, clip_cov_ratio=2e-4, clip_cov_lb=1.0, clip_cov_ub=5.0,
               clip_ratio_c=3.0, kl_cov_ratio=2e-4, ppo_kl_coef=1.0, centering="batch", entropy_coef=0.0,
               loss_agg_mode="token-mean", rollout_is_weights=None, generator=None, num_tokens=None,
               num_seqs=None, process_group=None, selection=None, validate=True):
    """Policy loss from precomputed log-probs: (loss 0-dim, metrics dict of 0-dim tensors).

    logp [B, T] (differentiable), old_logp, advantages A, response_mask (bool or 0/1), entropy H
    (differentiable, needed for centering="state" and entropy_coef != 0) and rollout_is_weights: [B, T].
    rho = exp(logp - old_logp); pg1 = -A rho; pg2 = -A clip(rho, 1 - clip_ratio_low, 1 + clip_ratio_high).
      "ppo": max(pg1, pg2), with verl's dual clip min(., -A clip_ratio_c) where A < 0 (None: off) and the
             log-ratio clamped to [-20, 20] as verl's vanilla loss.
      "clip_cov": max(pg1, pg2), 0 (no gradient) at the clip_cov_select tokens; never the PPO-clipped ones.
      "kl_cov": pg1 + ppo_kl_coef |logp - old_logp| at the kl_cov_select tokens; no PPO clipping.
    loss = agg_loss(loss_i * w) - entropy_coef * agg_loss(H). Metrics: entropy (when given), ppo_kl,
    pg_clipfrac (ppo: clipped fraction; clip_cov/kl_cov: selected fraction), pg_clipfrac_lower (ppo),
    cov_mean, cov_max, n_selected. Ratios are fractions (2e-4 = 0.02 % of the valid tokens), not percent.
    process_group: select and aggregate over the whole batch of all data-parallel ranks (module docstring;
        collectives: one all-reduce of 6 float64, plus one all-gather of 2 * n_max float64 per rank for
        clip_cov / kl_cov). The Clip-Cov keys are those of the whole batch (selection.clip_cov_keys):
        with `generator` seeded alike on every rank the subset is the one a single process would draw.
    selection: a covkernels.distributed.CovSelection for these rows (built once per mini-batch, sliced
        per micro-batch): its selected tokens, scores and global denominators are used as they are (no
        collective, `generator` unused); num_tokens / num_seqs, when given, still take precedence.
    """
    hyper = dict(method=method, clip_ratio=clip_ratio, clip_ratio_low=clip_ratio_low,
                 clip_ratio_high=clip_ratio_high, clip_cov_ratio=clip_cov_ratio, clip_cov_lb=clip_cov_lb,
                 clip_cov_ub=clip_cov_ub, clip_ratio_c=clip_ratio_c, kl_cov_ratio=kl_cov_ratio,
                 ppo_kl_coef=ppo_kl_coef, centering=centering, entropy_coef=entropy_coef,
                 loss_agg_mode=loss_agg_mode)
    tokens = dict(old_logp=old_logp, advantages=advantages, rollout_is_weights=rollout_is_weights)
    valid = _check_all(logp.shape, logp.device, hyper, {**tokens, "response_mask": response_mask,
                                                         "entropy": entropy}, validate, entropy is not None)
    _check_selection(selection, process_group, method, valid.shape)
    return _loss_from_logp(logp, entropy, valid, generator=generator, num_tokens=num_tokens, num_seqs=num_seqs,
                           process_group=process_group, selection=selection, validate=validate, **tokens, **hyper)


def _check_selection(selection, process_group, method, shape):
    if selection is None:
        return
    if process_group is not None:
        raise ValueError("pass process_group to CovSelection.build, not with selection: a selection already "
                         "holds the statistics of all ranks")
    if selection.method != method:
        raise ValueError(f"selection was built for method={selection.method!r}, got method={method!r}")
    if selection.selected.shape != shape:
        raise ValueError(f"selection has shape {tuple(selection.selected.shape)}, expected {tuple(shape)}: "
                         "slice it to the micro-batch's rows (selection[start:stop])")


def _check_all(shape, device, hyper, tensors, validate, has_entropy):
    """Every check of token_loss / policy_loss, before any kernel launch; returns response_mask != 0."""
    _check_hyper(hyper)
    if hyper["entropy_coef"] != 0 and not has_entropy:
        raise ValueError(f"entropy must be given when entropy_coef != 0, got entropy_coef={hyper['entropy_coef']}")
    return _check_tokens(shape, device, tensors, validate)


def _ratio_terms(logp, old_logp, advantages, valid, method, clip_ratio, clip_ratio_low, clip_ratio_high):
    """(dtype, on_valid, adv, log_ratio, pg2, clipped) of a loss call, from checked inputs."""
    eps_low = clip_ratio if clip_ratio_low is None else clip_ratio_low
    eps_high = clip_ratio if clip_ratio_high is None else clip_ratio_high
    # Trainers mix dtypes (fp32 log-probs, bf16 or fp64 advantages): compute in logp's (at least fp32).
    dtype = torch.promote_types(logp.dtype, torch.float32)

    def on_valid(x):
        # Padding may hold garbage (NaN, huge ratios): zero it before it reaches a value or a gradient.
        return torch.where(valid, x.to(dtype), torch.zeros((), dtype=dtype, device=x.device))

    adv = on_valid(advantages)
    log_ratio = on_valid(logp) - on_valid(old_logp)
    if method == "ppo":
        log_ratio = log_ratio.clamp(-PPO_LOG_RATIO_CLAMP, PPO_LOG_RATIO_CLAMP)
    ratio = log_ratio.detach().exp()
    pg2 = -adv * ratio.clamp(1 - eps_low, 1 + eps_high)  # its gradient is 0 wherever it is the loss
    clipped = (pg2 > -adv * ratio) & valid
    return dtype, on_valid, adv, log_ratio, pg2, clipped


def _loss_from_logp(logp, entropy, valid, *, old_logp, advantages, rollout_is_weights, method, clip_ratio,
                    clip_ratio_low, clip_ratio_high, clip_cov_ratio, clip_cov_lb, clip_cov_ub, clip_ratio_c,
                    kl_cov_ratio, ppo_kl_coef, centering, entropy_coef, loss_agg_mode, generator, num_tokens,
                    num_seqs, process_group=None, selection=None, validate=False, clamped_entropy=None,
                    aent_coef=0.0):
    """The body of token_loss, on checked inputs; valid = response_mask != 0. clamped_entropy (AEnt's H~,
    from policy_loss) adds the metrics clamped_entropy (its valid-token mean, what AEntController reads)
    and aent_coef, and the term -aent_coef * agg(H~)."""
    dtype, on_valid, adv, log_ratio, pg2, clipped = _ratio_terms(
        logp, old_logp, advantages, valid, method, clip_ratio, clip_ratio_low, clip_ratio_high)
    logp, advantages = logp.to(dtype), advantages.to(dtype)
    entropy_d = None if entropy is None else entropy.to(dtype)
    if selection is None:
        scores, selected, counts = loss_selection(
            logp, advantages, entropy_d, valid, clipped, method=method, centering=centering,
            clip_cov_ratio=clip_cov_ratio, clip_cov_lb=clip_cov_lb, clip_cov_ub=clip_cov_ub,
            kl_cov_ratio=kl_cov_ratio, generator=generator, process_group=process_group, validate=validate)
        if counts is not None:
            num_tokens = counts[2] if num_tokens is None else num_tokens
            num_seqs = counts[3] if num_seqs is None else num_seqs
    else:
        scores, selected = selection.scores.to(dtype), selection.selected & valid
        num_tokens = selection.num_tokens if num_tokens is None else num_tokens
        num_seqs = selection.num_seqs if num_seqs is None else num_seqs
    fdtype = pg2.dtype
    if method == "kl_cov":
        abs_kl = log_ratio.abs()
        # A zero advantage contributes exactly 0 (and no gradient) even where e^(l - l_old) overflows.
        pg1 = -adv * torch.where(adv == 0, 0.0, log_ratio).exp()
        loss_i = pg1 + torch.where(selected, ppo_kl_coef * abs_kl, torch.zeros_like(abs_kl))
        metrics = {"ppo_kl": masked_mean(abs_kl, valid), "pg_clipfrac": masked_mean(selected.to(fdtype), valid)}
    else:
        # max(pg1, pg2) = pg1 off the clipped tokens. Clipped, selected and zero-advantage tokens pass no
        # gradient, so their ratio is not differentiated: an overflowing e^(l - l_old) would give 0 * inf.
        frozen = clipped | selected | (adv == 0)
        pg1 = -adv * torch.where(frozen, 0.0, log_ratio).exp()
        loss_i = torch.where(clipped, pg2, pg1)
        metrics = {"ppo_kl": masked_mean(-log_ratio, valid), "pg_clipfrac": masked_mean(selected.to(fdtype), valid)}
        if method == "ppo":
            lower = torch.zeros_like(valid)
            if clip_ratio_c is not None:
                pg3 = -adv * clip_ratio_c
                lower = (loss_i > pg3) & (adv < 0)
                loss_i = torch.where(adv < 0, torch.minimum(loss_i, pg3), loss_i)
            metrics["pg_clipfrac"] = masked_mean(clipped.to(fdtype), valid)
            metrics["pg_clipfrac_lower"] = masked_mean(lower.to(fdtype), valid)
        loss_i = torch.where(selected, 0.0, loss_i)
    if rollout_is_weights is not None:
        loss_i = loss_i * on_valid(rollout_is_weights)
    agg = {"loss_agg_mode": loss_agg_mode, "num_tokens": num_tokens, "num_seqs": num_seqs}
    loss = agg_loss(loss_i, valid, **agg)
    if entropy is not None:
        metrics["entropy"] = agg_loss(entropy_d, valid, **agg)
        if entropy_coef != 0:
            loss = loss - entropy_coef * metrics["entropy"]
    if clamped_entropy is not None:
        clamped_d = clamped_entropy.to(dtype)
        metrics["clamped_entropy"] = masked_mean(clamped_d, valid)
        metrics["aent_coef"] = torch.full((), float(aent_coef), dtype=dtype, device=loss.device)
        if aent_coef != 0:
            loss = loss - aent_coef * agg_loss(clamped_d, valid, **agg)
    metrics["cov_mean"] = masked_mean(scores, valid)
    metrics["cov_max"] = torch.where(valid.any(), torch.where(valid, scores, float("-inf")).amax(), 0.0)
    metrics["n_selected"] = selected.sum()
    return loss, {k: v.detach() for k, v in metrics.items()}


def policy_loss(logits, targets, old_logp, advantages, response_mask, *, method="ppo", clip_ratio=0.2,
                clip_ratio_low=None, clip_ratio_high=None, clip_cov_ratio=2e-4, clip_cov_lb=1.0, clip_cov_ub=5.0,
                clip_ratio_c=3.0, kl_cov_ratio=2e-4, ppo_kl_coef=1.0, centering="batch", entropy_coef=0.0,
                loss_agg_mode="token-mean", rollout_is_weights=None, generator=None, aent_coef=0.0,
                clamp_fraction=None, temperature=1.0, ignore_index=-100, num_tokens=None, num_seqs=None,
                process_group=None, selection=None, validate=True):
    """The policy loss from logits [B, T, V] with one fused forward and one fused backward.

    `logits` may be a covkernels.LMHead(hidden [B, T, D], weight [V, D], bias [V] or None) instead: the
    fused LM head (`linear_token_stats`) then gives the same loss without the [B, T, V] logits ever
    existing, with gradients for hidden, weight and bias (not with clamp_fraction: AEnt needs the logits).

    targets [B, T] int (the sampled tokens); old_logp, advantages, response_mask, rollout_is_weights:
    [B, T]. A token is valid where response_mask != 0 and its target is not ignore_index. Other
    arguments as `token_loss`. Returns (loss, metrics); the gradient reaches the logits through logp and
    the entropy in a single backward pass.

    AEnt: with clamp_fraction=p the fused pass also gives the clamped entropy H~ (`token_stats`), and the
    loss subtracts aent_coef * agg(H~) (its gradient in the same fused backward); metrics gain
    `clamped_entropy` (the mean over valid tokens, for AEntController.update) and `aent_coef`.

    Example:
        >>> loss, metrics = policy_loss(logits, responses, old_logp, adv, mask, method="kl_cov")
        >>> loss.backward()
    """
    # An LM head (covkernels.LMHead or anything with hidden, weight and bias) in place of the logits.
    head = logits if all(hasattr(logits, a) for a in ("hidden", "weight", "bias")) else None
    x = logits if head is None else head.hidden
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        what = "logits must be a [B, T, V] tensor" if head is None else "LMHead.hidden must be a [B, T, D] tensor"
        raise ValueError(f"{what}, got {getattr(x, 'shape', type(x))}")
    hyper = dict(method=method, clip_ratio=clip_ratio, clip_ratio_low=clip_ratio_low,
                 clip_ratio_high=clip_ratio_high, clip_cov_ratio=clip_cov_ratio, clip_cov_lb=clip_cov_lb,
                 clip_cov_ub=clip_cov_ub, clip_ratio_c=clip_ratio_c, kl_cov_ratio=kl_cov_ratio,
                 ppo_kl_coef=ppo_kl_coef, centering=centering, entropy_coef=entropy_coef,
                 loss_agg_mode=loss_agg_mode)
    tokens = dict(old_logp=old_logp, advantages=advantages, rollout_is_weights=rollout_is_weights)
    valid = _check_all(x.shape[:-1], x.device, hyper, {**tokens, "response_mask": response_mask}, validate, True)
    _check_selection(selection, process_group, method, valid.shape)
    check_nonnegative("aent_coef", aent_coef)
    if aent_coef != 0 and clamp_fraction is None:
        raise ValueError(f"clamp_fraction must be given when aent_coef != 0, got aent_coef={aent_coef}")
    if isinstance(targets, torch.Tensor) and targets.shape == valid.shape:
        # Padding takes no part in the loss: marking it ignored means its logits are never read.
        targets = torch.where(valid, targets, ignore_index)
    # The loss needs logp, entropy (and H~): the passes without sum p^2 and sum p^2 log p.
    clamped = None
    if head is None and clamp_fraction is None:
        logp, entropy = logprobs_and_entropy(logits, targets, temperature=temperature, ignore_index=ignore_index,
                                             validate=validate)
    elif head is None:
        logp, entropy, *_, clamped, _ = clamped_pass(logits, targets, temperature, ignore_index, clamp_fraction,
                                                     False, validate, "auto")
    elif clamp_fraction is not None:
        raise ValueError("clamp_fraction needs whole rows of logits (AEnt's threshold): pass the logits, not an LMHead")
    else:
        logp, entropy = linear_logprobs_and_entropy(head.hidden, head.weight, targets, bias=head.bias,
                                                    temperature=temperature, ignore_index=ignore_index,
                                                    validate=validate)
    return _loss_from_logp(logp, entropy, targets != ignore_index, generator=generator, num_tokens=num_tokens,
                           num_seqs=num_seqs, process_group=process_group, selection=selection, validate=validate,
                           clamped_entropy=clamped, aent_coef=aent_coef, **tokens, **hyper)


def ppo_loss(logits, targets, old_logp, advantages, response_mask, **kwargs):
    """`policy_loss` with method="ppo"."""
    return policy_loss(logits, targets, old_logp, advantages, response_mask, method="ppo", **kwargs)


def clip_cov_loss(logits, targets, old_logp, advantages, response_mask, **kwargs):
    """`policy_loss` with method="clip_cov"."""
    return policy_loss(logits, targets, old_logp, advantages, response_mask, method="clip_cov", **kwargs)


def kl_cov_loss(logits, targets, old_logp, advantages, response_mask, **kwargs):
    """`policy_loss` with method="kl_cov"."""
    return policy_loss(logits, targets, old_logp, advantages, response_mask, method="kl_cov", **kwargs)
