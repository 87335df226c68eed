"""Reference for the covariance scores and the two token-selection rules (docs/selection.md).

Plain PyTorch with host syncs, `nonzero` and sorts: the rules are written so that a kernel which never
syncs with the host can follow them bit for bit (same random keys, same tie-breaking).
All tensors are [B, T]; a token is valid where `response_mask != 0`.
"""
import torch

CENTERINGS = ("batch", "state")


def _check_ratio(name, ratio):
    if not ratio >= 0:
        raise ValueError(f"{name} must be >= 0, got {ratio}")


def _check_same_shape(name, x, ref_name, ref):
    if x.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}")


def _n_select(ratio, n_valid):
    # The float64 product and truncation of Python's int(), exactly as verl computes it; but ratio 0
    # selects nothing, so an annealed ratio turns the method off (verl asserts ratio > 0).
    return max(1, int(ratio * n_valid)) if ratio > 0 else 0


def _masked_mean(x, valid):
    return x[valid].sum() / max(int(valid.sum()), 1)


def cov_scores(logp, advantages, response_mask, *, centering="batch", entropy=None):
    """Per-token covariance score C [B, T], detached, 0 at invalid tokens, in the promoted input dtype.

    centering="batch" (verl-compatible): C_i = (l_i - mean(l)) * (A_i - mean(A)), the means taken over the
        valid tokens of this call (verl computes them per micro-batch).
    centering="state" (Baehr & Lei): C_i = (l_i + H_i) * A_i, both factors centered by their exact
        per-state means (E[log p] = -H, E[A] = 0); needs `entropy` H [B, T].

    logp, advantages, response_mask (bool or 0/1), entropy: [B, T].
    """
    _check_same_shape("advantages", advantages, "logp", logp)
    _check_same_shape("response_mask", response_mask, "logp", logp)
    valid = response_mask != 0
    logp, adv = logp.detach(), advantages.detach()
    if centering == "batch":
        cov = (logp - _masked_mean(logp, valid)) * (adv - _masked_mean(adv, valid))
    elif centering == "state":
        if entropy is None:
            raise ValueError("entropy must be given for centering='state', got None")
        _check_same_shape("entropy", entropy, "logp", logp)
        cov = (logp + entropy.detach()) * adv
    else:
        raise ValueError(f"centering must be one of {list(CENTERINGS)}, got {centering!r}")
    return torch.where(valid, cov, torch.zeros_like(cov))


def clip_cov_select(scores, response_mask, *, ratio=2e-4, lb=1.0, ub=5.0, clipped=None, generator=None):
    """Clip-Cov selection: bool [B, T], True for the tokens whose loss and gradient are dropped.

    candidates = valid & ~clipped & (lb < scores < ub), bounds strict; n = max(1, int(ratio * N_valid)),
    and n = 0 (nothing selected) when ratio == 0.

    Random rule (every implementation follows it bit for bit):
      keys = torch.rand(response_mask.shape, generator=generator, device=scores.device, dtype=torch.float32)
    is drawn on every call, exactly once, even when there are no candidates (so the generator always
    advances by the same amount). The selected tokens are the n candidates with the smallest keys, equal
    keys broken by the lower row-major flat index; all candidates if there are fewer than n.

    scores [B, T] float; response_mask [B, T] bool or 0/1; clipped: optional bool [B, T], the tokens PPO
    clips (pg2 > pg1), which are never candidates; generator: a torch.Generator on scores.device or None
    (the default generator).
    """
    _check_same_shape("response_mask", response_mask, "scores", scores)
    _check_ratio("clip_cov_ratio", ratio)
    if not lb < ub:
        raise ValueError(f"clip_cov_lb must be < clip_cov_ub, got clip_cov_lb={lb}, clip_cov_ub={ub}")
    keys = torch.rand(response_mask.shape, generator=generator, device=scores.device, dtype=torch.float32)
    valid = response_mask != 0
    candidates = valid & (scores > lb) & (scores < ub)
    if clipped is not None:
        _check_same_shape("clipped", clipped, "scores", scores)
        candidates &= ~clipped.bool()
    n = _n_select(ratio, int(valid.sum()))
    idx = candidates.flatten().nonzero().squeeze(1)  # ascending, so a stable sort breaks ties by index
    order = torch.sort(keys.flatten()[idx], stable=True).indices
    selected = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    selected[idx[order[:n]]] = True
    return selected.view(scores.shape)


def kl_cov_select(scores, response_mask, *, ratio=2e-4):
    """KL-Cov selection: bool [B, T], True for the tokens that get the |l - l_old| penalty.

    The n = max(1, int(ratio * N_valid)) valid tokens with the largest signed score (not |score|); equal
    scores at the cut are taken in row-major order (lower flat index first). Nothing if N_valid == 0 or
    ratio == 0.
    scores [B, T] float; response_mask [B, T] bool or 0/1.
    """
    _check_same_shape("response_mask", response_mask, "scores", scores)
    _check_ratio("kl_cov_ratio", ratio)
    valid = response_mask != 0
    selected = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    n_valid = int(valid.sum())
    if n_valid > 0:
        idx = valid.flatten().nonzero().squeeze(1)
        order = torch.sort(scores.flatten()[idx], descending=True, stable=True).indices
        selected[idx[order[:_n_select(ratio, n_valid)]]] = True
    return selected.view(scores.shape)
