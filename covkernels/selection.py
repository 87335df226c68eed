"""Covariance scores and the Clip-Cov / KL-Cov token selections (SPEC section 5), free of host syncs.

All work is on [B, T] vectors in torch: the counts and n stay tensors, and a selection is "rank < n",
where ranks come from stable sorts, so no `.item()`, `nonzero` or boolean indexing is ever needed and
the same code runs eagerly, under torch.compile and under CUDA graphs. The rules match python_ref bit
for bit: same random keys, same tie-breaking (lower row-major index first).
"""
import torch

from ._validation import check_choice, check_nonnegative

CENTERINGS = ("batch", "state")


def _check_shape(name, x, ref_name, ref):
    if x.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}")


def masked_mean(x, valid):
    """Mean of x over valid entries as a 0-dim tensor; 0 when nothing is valid."""
    total = torch.where(valid, x, torch.zeros_like(x)).sum()
    return total / valid.sum().clamp(min=1).to(total.dtype)


def n_select(ratio, valid):
    """n = max(1, floor(ratio * N_valid)) as a 0-dim int64 tensor, in float64 like Python's int(r * n)."""
    return torch.floor(ratio * valid.sum().to(torch.float64)).clamp(min=1).to(torch.int64)


def _ranks(keys, eligible, descending):
    """Rank of each entry (0 = first) when eligible entries come first, ordered by key, ties by index."""
    flat = keys.reshape(-1)
    order = torch.sort(flat, descending=descending, stable=True).indices
    # A second stable sort moves ineligible entries behind every eligible one and keeps the key order.
    order = order[torch.sort((~eligible.reshape(-1))[order].to(torch.uint8), stable=True).indices]
    # The inverse permutation of `order`: ranks[order[i]] = i.
    ranks = torch.zeros_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return ranks.view(keys.shape)


def cov_scores(logp, advantages, response_mask, *, centering="batch", entropy=None):
    """Per-token covariance score C [B, T] (detached; 0 at invalid tokens).

    centering="batch" (verl-compatible): C_i = (l_i - mean l)(A_i - mean A), masked means over the valid
        tokens of this call. centering="state" (Baehr & Lei): C_i = (l_i + H_i) A_i, which needs `entropy`.
    logp, advantages, entropy: [B, T] float; response_mask: [B, T] bool or 0/1.
    """
    check_choice("centering", centering, CENTERINGS)
    _check_shape("advantages", advantages, "logp", logp)
    _check_shape("response_mask", response_mask, "logp", logp)
    valid = response_mask != 0
    logp, adv = logp.detach(), advantages.detach()
    if centering == "batch":
        cov = (logp - masked_mean(logp, valid)) * (adv - masked_mean(adv, valid))
    else:
        if entropy is None:
            raise ValueError("entropy must be given for centering='state', got None")
        _check_shape("entropy", entropy, "logp", logp)
        cov = (logp + entropy.detach()) * adv
    return torch.where(valid, cov, torch.zeros_like(cov))


def clip_cov_select(scores, response_mask, *, ratio=2e-4, lb=1.0, ub=5.0, clipped=None, generator=None):
    """Clip-Cov: bool [B, T], the tokens whose loss and gradient are dropped.

    Candidates: valid, not PPO-clipped (`clipped`, bool [B, T]) and lb < C < ub (strict). Of them, the
    n = max(1, floor(ratio * N_valid)) with the smallest keys
    `torch.rand(response_mask.shape, generator=generator, device=scores.device, dtype=torch.float32)`
    (drawn once per call, always), equal keys by lower flat index; all candidates if fewer than n.
    """
    _check_shape("response_mask", response_mask, "scores", scores)
    check_nonnegative("clip_cov_ratio", ratio)
    if not lb < ub:
        raise ValueError(f"clip_cov_lb must be < clip_cov_ub, got clip_cov_lb={lb}, clip_cov_ub={ub}")
    keys = torch.rand(response_mask.shape, generator=generator, device=scores.device, dtype=torch.float32)
    valid = response_mask != 0
    candidates = valid & (scores > lb) & (scores < ub)
    if clipped is not None:
        _check_shape("clipped", clipped, "scores", scores)
        candidates = candidates & ~clipped.bool()
    return candidates & (_ranks(keys, candidates, descending=False) < n_select(ratio, valid))


def kl_cov_select(scores, response_mask, *, ratio=2e-4):
    """KL-Cov: bool [B, T], the n = max(1, floor(ratio * N_valid)) valid tokens with the largest signed
    score, equal scores at the cut by lower flat index; nothing when no token is valid."""
    _check_shape("response_mask", response_mask, "scores", scores)
    check_nonnegative("kl_cov_ratio", ratio)
    valid = response_mask != 0
    return valid & (_ranks(scores, valid, descending=True) < n_select(ratio, valid))
