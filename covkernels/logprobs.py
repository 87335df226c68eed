"""Public API of the fused pass: log-probs, entropy and per-state statistics from one read of the logits."""
from typing import NamedTuple

import torch

from ._validation import check_choice, check_fraction, check_logits_targets, check_positive
from .ops.clamped_entropy.op import clamped_fwd_op
from .ops.fused_pass.op import fused_fwd_op


class TokenStats(NamedTuple):
    """Per-token statistics of softmax(logits / temperature), each [...] (targets' shape), fp32.

    logp and entropy are differentiable with respect to the logits; the rest are detached.
    """

    logp: torch.Tensor
    entropy: torch.Tensor
    lse: torch.Tensor
    p_target: torch.Tensor
    sum_p2: torch.Tensor
    sum_p2_logp: torch.Tensor
    clamped_entropy: torch.Tensor | None = None


def _fused(logits, targets, temperature, ignore_index, stats, inplace_backward, validate, impl):
    use_triton = check_logits_targets(logits, targets, temperature, ignore_index, impl, validate)
    return fused_fwd_op(logits, targets, 1.0 / float(temperature), int(ignore_index), stats, use_triton,
                        bool(inplace_backward))


def logprobs_and_entropy(logits, targets, *, temperature=1.0, ignore_index=-100, inplace_backward=False,
                         validate=True, impl="auto"):
    """Log-prob of the target and entropy of every row of softmax(logits / temperature), in one pass.

    Args:
        logits: [..., V] bf16, fp16, fp32 (or fp64); rows may be strided, the last dim contiguous.
        targets: [...] int32/int64, the sampled token of each row; `ignore_index` rows give 0 and get
            no gradient, and their logits are never read.
        temperature: float > 0; the gradient is scaled by 1 / temperature.
        inplace_backward: write the gradient into the logits' storage (the caller promises not to use
            the logits after the backward); the backward then allocates nothing of size [..., V].
        validate: check that every target is in [0, V) or ignore_index (one host sync). Without it a
            bad target gives NaN in its own row and never reads out of bounds.
        impl: "auto" (Triton on CUDA, and on the CPU when TRITON_INTERPRET=1; else chunked PyTorch),
            "triton" or "torch".

    Returns:
        (logp, entropy): [...] fp32 (fp64 for fp64 logits), differentiable; logp <= 0, entropy >= 0.

    Example:
        >>> logits = torch.randn(2, 5, 32000, dtype=torch.bfloat16, requires_grad=True)
        >>> targets = torch.randint(0, 32000, (2, 5))
        >>> logp, entropy = logprobs_and_entropy(logits, targets, temperature=0.7)
        >>> (logp.sum() + 0.01 * entropy.sum()).backward()
    """
    logp, entropy, *_ = _fused(logits, targets, temperature, ignore_index, False, inplace_backward, validate,
                               impl)
    return logp, entropy


def token_stats(logits, targets, *, temperature=1.0, ignore_index=-100, clamp_fraction=None, validate=True,
                impl="auto"):
    """Every per-row statistic of the fused pass from the same single read
    (docs/fused_pass.md#per-row-statistics).

    Arguments as `logprobs_and_entropy`. Returns a TokenStats of [...] fp32 tensors: logp and entropy
    (differentiable), and detached lse, p_target = exp(logp), sum_p2 = sum p^2 and
    sum_p2_logp = sum p^2 log p. Ignored rows are 0 in every field.

    clamp_fraction=p in [0, 1) adds AEnt's `clamped_entropy` (differentiable): the entropy of the softmax
    renormalised over the row without its floor(p V) smallest logits (equal logits: lowest index first).
    Its threshold is an exact radix select (no sort); a bf16 row is then read three times in all
    (five under Triton < 3.8).
    """
    if clamp_fraction is None:
        logp, entropy, lse, sum_p2, sum_p2_logp, _ = _fused(logits, targets, temperature, ignore_index, True, False,
                                                            validate, impl)
        clamped = None
    else:
        logp, entropy, lse, sum_p2, sum_p2_logp, _, clamped, _ = clamped_pass(
            logits, targets, temperature, ignore_index, clamp_fraction, True, validate, impl)
    p_target = torch.where(targets != ignore_index, logp.detach().exp(), 0.0)
    return TokenStats(logp, entropy, lse.detach(), p_target, sum_p2.detach(), sum_p2_logp.detach(), clamped)


def clamped_pass(logits, targets, temperature, ignore_index, clamp_fraction, stats, validate, impl):
    """The fused pass with AEnt's clamped entropy: (logp, entropy, lse, sum_p2, sum_p2_logp, lse2,
    clamped_entropy, kept-set state), the statistics sum_p2, sum_p2_logp empty unless `stats` (the loss needs
    only logp, entropy and the clamped entropy, and skips their three instructions per logit)."""
    check_fraction("clamp_fraction", clamp_fraction)
    use_triton = check_logits_targets(logits, targets, temperature, ignore_index, impl, validate)
    return clamped_fwd_op(logits, targets, 1.0 / float(temperature), int(ignore_index), float(clamp_fraction), stats,
                          use_triton)


def entropy_change(stats, advantages, *, kind="pg", lr=1.0):
    """Predicted first-order entropy change of each state after one step on its sampled token.

    kind="pg": the logit step lr * A * (e_t - p) of a softmax policy gradient,
        dH = -lr * A * [p_t (logp_t + H) - (sum_p2_logp + H * sum_p2)].
    kind="npg": the natural-gradient step lr * A * e_t / p_t, dH = -lr * A * (logp_t + H).
    stats: TokenStats from `token_stats`; advantages: [...] (broadcastable). Returns [...] detached;
    0 on ignored rows (their statistics are 0).
    """
    check_choice("kind", kind, ("pg", "npg"))
    check_positive("lr", lr)
    logp, h = stats.logp.detach(), stats.entropy.detach()
    if kind == "pg":
        cov = stats.p_target * (logp + h) - (stats.sum_p2_logp + h * stats.sum_p2)
    else:
        cov = logp + h
    return -lr * advantages * cov
