"""Reference for the fused pass (docs/fused_pass.md, docs/entropy_dynamics.md), written plainly in PyTorch.

Every function computes in the dtype of its input: pass float64 logits to get the ground truth, or bf16
logits to get what plain PyTorch does in bf16. The signatures match covkernels; arguments that only
steer the kernels (`inplace_backward`, `validate`, `impl`) are accepted and ignored.
"""
from typing import NamedTuple

import torch


class TokenStats(NamedTuple):
    """Per-token statistics of one softmax row, each of shape [...] (the targets' shape)."""

    logp: torch.Tensor
    entropy: torch.Tensor
    lse: torch.Tensor
    p_target: torch.Tensor
    sum_p2: torch.Tensor
    sum_p2_logp: torch.Tensor
    clamped_entropy: torch.Tensor | None = None


def clamped_entropy(z, clamp_fraction, logits):
    """AEnt's clamped entropy (docs/aent.md) of each row of z = logits / T [..., V]: the entropy of the
    softmax renormalised over K, the row without its floor(p V) smallest logits (a stable ascending sort of
    the raw logits, before the temperature: among equal logits the lower index goes first; two logits that
    differ can tie after the division). Differentiable; 0 gradient off K."""
    V = z.shape[-1]
    order = torch.sort(logits.detach(), dim=-1, stable=True).indices
    removed = torch.zeros(z.shape, dtype=torch.bool, device=z.device).scatter(-1, order[..., :int(clamp_fraction * V)],
                                                                              True)
    zk = z.masked_fill(removed, float("-inf"))
    logp_k = zk - torch.logsumexp(zk, dim=-1, keepdim=True)
    p_k = logp_k.exp()
    return -(p_k * torch.where(p_k > 0, logp_k, torch.zeros_like(logp_k))).sum(-1)


def token_stats(logits, targets, *, temperature=1.0, ignore_index=-100, clamp_fraction=None, validate=True,
                impl="auto"):
    """All per-row statistics of softmax(logits / temperature).

    logits [..., V] (any float dtype, computed in that dtype), targets [...] integer. With clamp_fraction=p
    in [0, 1), also AEnt's `clamped_entropy` (see `clamped_entropy`), differentiable.
    lse = logsumexp(z), logp = z_t - lse, entropy H = -sum p log p, sum_p2 = sum p^2,
    sum_p2_logp = sum p^2 log p, with 0 log 0 = 0. Rows whose target is `ignore_index` give 0 everywhere
    and no gradient. logp and entropy are differentiable; the rest are detached.
    """
    z = logits / temperature
    valid = targets != ignore_index
    safe_t = torch.where(valid, targets, torch.zeros_like(targets)).long()
    lse = torch.logsumexp(z, dim=-1)
    logp_all = z - lse.unsqueeze(-1)
    p = logp_all.exp()
    # 0 log 0 = 0; masking log p (not p log p) keeps the gradient finite where a logit is -inf.
    plogp = p * torch.where(p > 0, logp_all, torch.zeros_like(p))
    entropy = -plogp.sum(-1)
    logp = logp_all.gather(-1, safe_t.unsqueeze(-1)).squeeze(-1)
    sum_p2 = (p * p).sum(-1)
    sum_p2_logp = (p * plogp).sum(-1)

    def masked(x):
        return torch.where(valid, x, torch.zeros_like(x))

    logp, entropy = masked(logp), masked(entropy)
    lse, sum_p2, sum_p2_logp = (masked(x).detach() for x in (lse, sum_p2, sum_p2_logp))
    clamped = None if clamp_fraction is None else masked(clamped_entropy(z, clamp_fraction, logits))
    return TokenStats(logp, entropy, lse, logp.detach().exp() * valid, sum_p2, sum_p2_logp, clamped)


def logprobs_and_entropy(logits, targets, *, temperature=1.0, ignore_index=-100, inplace_backward=False,
                         validate=True, impl="auto"):
    """(logp, entropy) of each row, both [...] and differentiable; see `token_stats`."""
    stats = token_stats(logits, targets, temperature=temperature, ignore_index=ignore_index)
    return stats.logp, stats.entropy


def entropy_change(stats, advantages, *, kind="pg", lr=1.0):
    """First-order entropy change of each state after one step on its sampled token
    (docs/entropy_dynamics.md).

    kind="pg": logit step lr*A*(e_t - p), dH = -lr*A*[p_t (logp_t + H) - (sum_p2_logp + H sum_p2)].
    kind="npg": logit step lr*A*e_t/p_t, dH = -lr*A*(logp_t + H).
    stats: a TokenStats; advantages [...]. Returns [...] (detached, in the stats' dtype).
    """
    logp, h = stats.logp.detach(), stats.entropy.detach()
    if kind == "pg":
        cov = stats.p_target * (logp + h) - (stats.sum_p2_logp + h * stats.sum_p2)
    elif kind == "npg":
        cov = logp + h
    else:
        raise ValueError(f"kind must be 'pg' or 'npg', got {kind!r}")
    return -lr * advantages * cov
