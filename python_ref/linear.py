"""Reference for the fused LM head: the statistics of docs/fused_pass.md and docs/entropy_dynamics.md of the
logits z = hidden @ weight.T + bias, written plainly (the logits are built in full, then `token_stats`).

Computes in the dtype of the inputs: float64 gives the ground truth, bf16 what plain PyTorch does in bf16.
`validate` and `impl` only steer the kernels; they are accepted and ignored.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .logprobs import token_stats


class LMHead(NamedTuple):
    """The input of an LM head in place of its logits: logits = hidden @ weight.T + bias.

    hidden [..., D], weight [V, D], bias [V] or None (no bias), all of one dtype.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None


def linear_token_stats(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100, validate=True,
                       impl="auto"):
    """`token_stats` of the logits z = hidden @ weight.T + bias, i.e. of softmax(z / temperature).

    hidden [..., D], weight [V, D], bias [V] or None, one float dtype; targets [...] = hidden.shape[:-1],
    integer. Returns a TokenStats of [...] tensors in that dtype (clamped_entropy None); logp and entropy
    are differentiable with respect to hidden, weight and bias. `ignore_index` rows give 0 and no gradient.
    """
    return token_stats(F.linear(hidden, weight, bias), targets, temperature=temperature,
                       ignore_index=ignore_index)


def linear_logprobs_and_entropy(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                                validate=True, impl="auto"):
    """(logp, entropy) of softmax((hidden @ weight.T + bias) / temperature), both [...] and differentiable:
    logp = z_t / T - logsumexp(z / T), entropy = -sum_j p_j log p_j. See `linear_token_stats`."""
    stats = linear_token_stats(hidden, weight, targets, bias=bias, temperature=temperature,
                               ignore_index=ignore_index)
    return stats.logp, stats.entropy
