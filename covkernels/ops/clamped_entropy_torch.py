"""The clamped (AEnt) pass in plain PyTorch, a block of rows at a time; same interface as clamped_entropy.py.

The kept set K of a row is the row without its k = floor(p V) smallest raw logits (SPEC section 6): a
k-th smallest value per row (no sort), then the lowest-index ties. The removed entries are set to -inf
and the fused pass's row sums and gradient (fused_pass_torch) run on that block: the row max is always
kept, so everything stays relative to it, as in the plain pass.
"""
import torch

from .compiled import run
from .fused_pass_torch import (_CHUNK_ELEMS, _row_blocks, centre, fused_bwd_torch, fused_fwd_torch, grad, row_masks,
                               row_sums)
from .layout import acc_dtype


def removed(x, k):
    """bool [R, C]: the k smallest raw logits of each row of x; among equal values the lower index first."""
    if k == 0:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    thr = x.kthvalue(k, dim=-1, keepdim=True).values
    below = x < thr
    tie = x == thr
    return below | (tie & (tie.cumsum(-1, dtype=torch.int32) <= k - below.sum(-1, keepdim=True)))


def _kept(x, k):
    """x with its removed entries set to -inf (ranked on the raw logits: an ulp apart they can tie after
    the temperature, and the tie would then remove the wrong one)."""
    return x.masked_fill(removed(x, k), float("-inf"))


def clamped_fwd_torch(logits, targets, inv_temp, ignore_index, clamp_fraction):
    """Chunked forward; see clamped_entropy.clamped_fwd (thr and n_tie are 0: the backward selects again)."""
    V = logits.shape[-1]
    acc = acc_dtype(logits.dtype)
    k = int(clamp_fraction * V)
    outs = list(fused_fwd_torch(logits, targets, inv_temp, ignore_index, True))
    keep, fill = row_masks(targets.reshape(-1), V, ignore_index, acc)
    sums = torch.empty((3, targets.numel()), dtype=acc, device=logits.device)  # m, l, s1 over K
    for sl, x in _row_blocks(logits, chunk=_CHUNK_ELEMS):  # the kept set takes a few copies of a block
        sums[:, sl] = torch.stack(run(row_sums, _kept(x, k), inv_temp)[:3])
    m, l, s1 = sums
    ln_l = l.log()
    cent = ln_l - s1 / l
    wide = m.double() * inv_temp + ln_l.double()
    lse_k = wide.to(acc)
    vals = [torch.where(cent < 0, 0.0, cent), lse_k, (wide - lse_k.double()).to(acc)]
    cent, lse_k, lse_k_lo = (torch.where(keep, v, fill).view(targets.shape) for v in vals)
    thr, n_tie = (torch.zeros(targets.shape, dtype=torch.int64, device=logits.device) for _ in range(2))
    return (*outs, cent, lse_k, lse_k_lo, thr, n_tie)


def clamped_bwd_torch(logits, targets, thr, n_tie, lse, lse_lo, entropy, lse_kept, lse_kept_lo, clamped_entropy,
                      grad_logp, grad_entropy, grad_clamped, inv_temp, ignore_index, clamp_fraction, out):
    """Chunked backward; see clamped_entropy.clamped_bwd. `out` may be `logits` itself. The clamped term is
    the fused gradient of an entropy over K: -g p~ (log p~ + H~) / T there, 0 elsewhere (p~ = 0)."""
    V = logits.shape[-1]
    acc = acc_dtype(logits.dtype)
    k = int(clamp_fraction * V)
    t = targets.reshape(-1)
    keep, fill = row_masks(t, V, ignore_index, acc)
    c, r = centre(lse_kept.reshape(-1), lse_kept_lo.reshape(-1), inv_temp)
    g_cent = grad_clamped.reshape(-1).to(acc)
    # No log-prob term (its upstream gradient is 0), so the target adds no delta.
    per_row = (t, c, r, clamped_entropy.reshape(-1), torch.zeros_like(g_cent), g_cent, keep, fill)

    def clamped_grad(sl, x):
        return run(grad, _kept(x, k), *(a[sl] for a in per_row), inv_temp)

    return fused_bwd_torch(logits, targets, lse, lse_lo, entropy, grad_logp, grad_entropy, inv_temp, ignore_index, out,
                           extra_grad=clamped_grad)
