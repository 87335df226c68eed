"""policy_loss and token_loss: the policy losses from logits (or an LM head) or from log-probs, their
arguments checked before any kernel launch."""
import torch

from ..linear import linear_logprobs_and_entropy
from ..logprobs import clamped_pass, logprobs_and_entropy
from .config import call_config
from .terms import Batch, loss_from_logp


def check_tokens(shape, device, tensors, validate):
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


def _check_batch(shape, device, batch, config, entropy=None):
    """Every check of a loss call's per-call inputs; returns the valid tokens (response_mask != 0)."""
    tensors = dict(old_logp=batch.old_logp, advantages=batch.advantages, rollout_is_weights=batch.rollout_is_weights,
                   response_mask=batch.response_mask, entropy=entropy)
    valid = check_tokens(shape, device, tensors, config.validate)
    _check_selection(batch.selection, batch.process_group, config.method, valid.shape)
    return valid


def token_loss(logp, old_logp, advantages, response_mask, config=None, *, entropy=None, rollout_is_weights=None,
               generator=None, num_tokens=None, num_seqs=None, process_group=None, selection=None, **overrides):
    """Policy loss from precomputed log-probs: (loss 0-dim, metrics dict of 0-dim tensors).

    logp [B, T] (differentiable), old_logp, advantages A, response_mask (bool or 0/1), entropy H
    (differentiable, needed for centering="state" and entropy_coef != 0) and rollout_is_weights: [B, T].
    config: a LossConfig of numbers (`config.at(step)` reads its schedules; None: the defaults);
    `overrides`, any LossConfig field by name (verl's keywords: method="kl_cov", clip_ratio=0.2, ...),
    replace the config's. AEnt (aent_coef != 0) needs the logits: policy_loss.
    rho = exp(logp - old_logp); pg1 = -A rho; pg2 = -A clip(rho, 1 - clip_ratio_low, 1 + clip_ratio_high).
      "ppo": max(pg1, pg2), with verl's dual clip min(., -A clip_ratio_c) where A < 0 (None: off) and the
             log-ratio clamped to [-20, 20] as verl's vanilla loss.
      "clip_cov": max(pg1, pg2), 0 (no gradient) at the clip_cov_select tokens; never the PPO-clipped ones.
      "kl_cov": pg1 + ppo_kl_coef |logp - old_logp| at the kl_cov_select tokens; no PPO clipping.
    loss = agg_loss(loss_i * w) - entropy_coef * agg_loss(H). Metrics: entropy (when given), ppo_kl,
    pg_clipfrac (ppo: clipped fraction; clip_cov/kl_cov: selected fraction), pg_clipfrac_lower (ppo),
    cov_mean, cov_max, n_selected. Ratios are fractions (2e-4 = 0.02 % of the valid tokens), not percent.
    generator: a torch.Generator for the Clip-Cov draw (reproducible from its seed).
    num_tokens, num_seqs: global aggregation denominators (agg_loss).
    process_group: select and aggregate over the whole batch of all data-parallel ranks (module docstring;
        collectives: one all-reduce of 6 float64, plus one all-gather of 2 * n_max float64 per rank for
        clip_cov / kl_cov). The Clip-Cov keys are those of the whole batch (selection.clip_cov_keys):
        with `generator` seeded alike on every rank the subset is the one a single process would draw.
    selection: a covkernels.distributed.CovSelection for these rows (built once per mini-batch, sliced
        per micro-batch): its selected tokens, scores and global denominators are used as they are (no
        collective, `generator` unused); num_tokens / num_seqs, when given, still take precedence.
    """
    config = call_config(config, overrides)
    if config.entropy_coef != 0 and entropy is None:
        raise ValueError(f"entropy must be given when entropy_coef != 0, got entropy_coef={config.entropy_coef}")
    if config.aent_coef != 0:
        raise ValueError(f"aent_coef needs AEnt's clamped entropy, which needs the logits: use policy_loss "
                         f"(got aent_coef={config.aent_coef})")
    batch = Batch(old_logp, advantages, response_mask, rollout_is_weights, generator, num_tokens, num_seqs,
                  process_group, selection)
    valid = _check_batch(logp.shape, logp.device, batch, config, entropy)
    return loss_from_logp(logp, entropy, None, valid, batch, config)


def policy_loss(logits_or_head, targets, old_logp, advantages, response_mask, config=None, *,
                rollout_is_weights=None, generator=None, num_tokens=None, num_seqs=None, process_group=None,
                selection=None, **overrides):
    """The policy loss from logits [B, T, V] with one fused forward and one fused backward.

    `logits_or_head` may be a covkernels.LMHead(hidden [B, T, D], weight [V, D], bias [V] or None) instead
    of the logits: the fused LM head (`linear_token_stats`) then gives the same loss without the [B, T, V]
    logits ever existing, with gradients for hidden, weight and bias (not with clamp_fraction: AEnt needs
    the logits).

    targets [B, T] int (the sampled tokens); old_logp, advantages, response_mask, rollout_is_weights:
    [B, T]. A token is valid where response_mask != 0 and its target is not config.ignore_index.
    config (a LossConfig of numbers, or None: the defaults), `overrides` (LossConfig fields by name: today's
    and verl's keywords) and the other arguments as `token_loss`; config.temperature, ignore_index and
    validate go to the fused pass. Returns (loss, metrics); the gradient reaches the logits through logp
    and the entropy in a single backward pass.

    AEnt: with clamp_fraction=p the fused pass also gives the clamped entropy H~ (`token_stats`), and the
    loss subtracts aent_coef * agg(H~) (its gradient in the same fused backward); metrics gain
    `clamped_entropy` (the mean over valid tokens, for AEntController.update) and `aent_coef`.

    Example:
        >>> loss, metrics = policy_loss(logits, responses, old_logp, adv, mask, method="kl_cov")
        >>> loss, metrics = policy_loss(logits, responses, old_logp, adv, mask, LossConfig("kl_cov").at(step))
        >>> loss.backward()
    """
    config = call_config(config, overrides)
    # An LM head (covkernels.LMHead or anything with hidden, weight and bias) in place of the logits.
    head = logits_or_head if all(hasattr(logits_or_head, a) for a in ("hidden", "weight", "bias")) else None
    x = logits_or_head if head is None else head.hidden
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        what = "logits must be a [B, T, V] tensor" if head is None else "LMHead.hidden must be a [B, T, D] tensor"
        raise ValueError(f"{what}, got {getattr(x, 'shape', type(x))}")
    batch = Batch(old_logp, advantages, response_mask, rollout_is_weights, generator, num_tokens, num_seqs,
                  process_group, selection)
    valid = _check_batch(x.shape[:-1], x.device, batch, config)
    if head is not None and config.clamp_fraction is not None:
        raise ValueError("clamp_fraction needs whole rows of logits (AEnt's threshold): pass the logits, not an LMHead")
    if isinstance(targets, torch.Tensor) and targets.shape == valid.shape:
        # Padding takes no part in the loss: marking it ignored means its logits are never read.
        targets = torch.where(valid, targets, config.ignore_index)
    logp, entropy, clamped = _fused_pass(logits_or_head, head, targets, config)
    return loss_from_logp(logp, entropy, clamped, targets != config.ignore_index, batch, config)


def _fused_pass(logits, head, targets, config):
    """(logp, entropy, AEnt's clamped entropy or None) [B, T] from the logits, or from the LM head `head`:
    the passes without sum p^2 and sum p^2 log p, which the loss does not need."""
    options = dict(temperature=config.temperature, ignore_index=config.ignore_index, validate=config.validate)
    if head is not None:
        logp, entropy = linear_logprobs_and_entropy(head.hidden, head.weight, targets, bias=head.bias, **options)
        return logp, entropy, None
    if config.clamp_fraction is None:
        return (*logprobs_and_entropy(logits, targets, **options), None)
    logp, entropy, *_, clamped, _ = clamped_pass(logits, targets, config.temperature, config.ignore_index,
                                                 config.clamp_fraction, False, config.validate, "auto")
    return logp, entropy, clamped


def ppo_loss(logits_or_head, targets, old_logp, advantages, response_mask, config=None, **kwargs):
    """`policy_loss` with method="ppo"."""
    return policy_loss(logits_or_head, targets, old_logp, advantages, response_mask, config, method="ppo", **kwargs)


def clip_cov_loss(logits_or_head, targets, old_logp, advantages, response_mask, config=None, **kwargs):
    """`policy_loss` with method="clip_cov"."""
    return policy_loss(logits_or_head, targets, old_logp, advantages, response_mask, config, method="clip_cov",
                       **kwargs)


def kl_cov_loss(logits_or_head, targets, old_logp, advantages, response_mask, config=None, **kwargs):
    """`policy_loss` with method="kl_cov"."""
    return policy_loss(logits_or_head, targets, old_logp, advantages, response_mask, config, method="kl_cov",
                       **kwargs)
