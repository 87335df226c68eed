"""The clamped (AEnt) pass in plain PyTorch, a block of rows at a time; same interface as clamped_entropy.py.

The kept set K of a row is the row without its k = floor(p V) smallest raw logits (docs/aent.md#the-kept-set):
a k-th smallest value per row (no sort), then the lowest-index ties. It is described as the Triton kernels
describe it, by tau (the smallest kept value) and cut (the column of the first kept entry equal to tau: the
entries equal to tau before it are removed), so the forward's `state` serves either backward. The sums over K
are the plain pass's with the removed entries at -inf: the row max is always kept, so both share its
reference.
"""
import torch

from ..common import rowmath_torch as rm
from ..common.compiled import run
from ..fused_pass.torch_path import fused_bwd_torch, fused_fwd_torch, row_blocks, target_masks
from ..common import layout
from ..common.layout import acc_dtype, scale_args


def removed(x, k):
    """bool [R, C]: the k smallest raw logits of each row of x; among equal values the lower index first."""
    if k == 0:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    thr = x.kthvalue(k, dim=-1, keepdim=True).values
    below = x < thr
    tie = x == thr
    return below | (tie & (tie.cumsum(-1, dtype=torch.int32) <= k - below.sum(-1, keepdim=True)))


def kept(x, tau, cut):
    """K's mask of a block x [R, C] from its rows' tau and cut [R] (the description `state` keeps)."""
    cols = torch.arange(x.shape[-1], device=x.device)
    return (x > tau[:, None]) | ((x == tau[:, None]) & (cols[None, :] >= cut[:, None]))


def _kept_sums(x, k, scale):
    """[4, R] (l_K, s1_K, tau, cut) of a block of raw logits x [R, C] (accumulation dtype), the sums relative to
    the reference of the row max."""
    out = removed(x, k)
    xk = x.masked_fill(out, float("-inf"))
    _, l, s1, _, _ = rm.block_sums(xk, scale, False)
    tau = x.masked_fill(out, float("inf")).amin(-1)
    first_tie = ((x == tau[:, None]) & ~out).to(torch.int8).argmax(-1)
    return torch.stack([l, s1, tau, first_tie.to(x.dtype)])


def clamped_fwd_torch(logits, targets, inv_temp, ignore_index, clamp_fraction, stats):
    """Chunked forward; see kernels.clamped_fwd."""
    V = logits.shape[-1]
    acc = acc_dtype(logits.dtype)
    k = int(clamp_fraction * V)
    scale, _ = scale_args(inv_temp, logits.dtype)
    outs = fused_fwd_torch(logits, targets, inv_temp, ignore_index, stats)
    valid, bad, _ = target_masks(targets, V, ignore_index)
    sums = torch.zeros((4, valid.numel()), dtype=acc, device=logits.device)
    for sl, x in row_blocks(logits, chunk=layout.CHUNK_ELEMS):  # the kept set takes a few copies of a block
        sums[:, sl] = run(_kept_sums, x.to(acc), k, scale)
    lk, s1k, tau, cut = sums
    lk = torch.where(valid, lk, 1.0)
    big_lk = rm.log2(lk)
    cent = (big_lk - s1k / lk) * rm.LN2
    cent = torch.where(cent < 0, 0.0, cent)
    keep = valid & ~bad

    def row(v):  # 0 on ignored rows, NaN on rows with a bad target
        return torch.where(bad, float("nan"), torch.where(keep, v, 0.0)).view(targets.shape)

    state = torch.stack([row(big_lk), tau.view(targets.shape), cut.view(targets.shape)])
    return (*outs, row(cent), state)


def clamped_bwd_torch(logits, targets, lse2, entropy, clamped_entropy, state, grad_logp, grad_entropy, grad_clamped,
                      inv_temp, ignore_index, out):
    """Chunked backward; see kernels.clamped_bwd. `out` may be `logits` itself. The clamped term is
    the fused gradient of an entropy over K: -g p~ (log p~ + H~) / T there, 0 elsewhere (p~ = 0)."""
    acc = acc_dtype(logits.dtype)
    scale, inv_t = scale_args(inv_temp, logits.dtype)
    valid, _, _ = target_masks(targets, logits.shape[-1], ignore_index)
    big_lk, tau, cut = state.reshape(3, -1)
    lse2_k = torch.stack([lse2.reshape(2, -1)[0], big_lk])
    g_cent = grad_clamped.reshape(-1).to(acc)
    no_target = torch.full_like(valid, -1, dtype=torch.long)  # the log-prob term is the plain pass's
    per_row = (no_target, valid, lse2_k, clamped_entropy.reshape(-1), torch.zeros_like(g_cent), g_cent, tau, cut)

    def clamped_grad(sl, x):
        t, v, l2, c, g0, g, tau_r, cut_r = (a[..., sl] for a in per_row)
        xk = x.to(acc).masked_fill(~kept(x.to(acc), tau_r, cut_r), float("-inf"))
        return run(rm.grad, xk, t, v, l2, c, g0, g, scale, inv_t)

    return fused_bwd_torch(logits, targets, lse2, entropy, grad_logp, grad_entropy, inv_temp, ignore_index, out,
                           extra_grad=clamped_grad)
