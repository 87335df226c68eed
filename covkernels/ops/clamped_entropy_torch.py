"""The clamped (AEnt) pass in plain PyTorch, a block of rows at a time; same interface as clamped_entropy.py.

The kept set comes from a stable sort of each block of rows (the Triton path selects without sorting).
"""
import torch

from .fused_pass_torch import _row_blocks, fused_bwd_torch, fused_fwd_torch
from .layout import acc_dtype


def _kept_block(x, inv_temp, clamp_fraction, acc):
    """(log p~ over K, -inf elsewhere; lse over K; p~) of one [rows, V] block."""
    V = x.shape[-1]
    # Ranked on the raw logits (SPEC section 6): two logits an ulp apart can round to one value after
    # the temperature, and the tie would then remove the wrong one.
    removed = torch.sort(x, dim=-1, stable=True).indices[:, :int(clamp_fraction * V)]
    z = x.to(acc) * inv_temp
    zk = z.scatter(-1, removed, float("-inf"))
    lse_k = torch.logsumexp(zk, dim=-1, keepdim=True)
    logp_k = zk - lse_k
    return logp_k, lse_k.squeeze(-1), logp_k.exp()


def clamped_fwd_torch(logits, targets, inv_temp, ignore_index, clamp_fraction):
    """Chunked forward; see clamped_entropy.clamped_fwd (lse_kept_lo, thr and n_tie are 0: the backward sorts
    and normalises again)."""
    acc = acc_dtype(logits.dtype)
    outs = list(fused_fwd_torch(logits, targets, inv_temp, ignore_index, True))
    cent, lse_k, lse_k_lo = (torch.zeros(targets.shape, dtype=acc, device=logits.device) for _ in range(3))
    t = targets.reshape(-1)
    valid = t != ignore_index
    # A target outside [0, V) (validate=False) makes every output of its row NaN.
    off = torch.where(valid, float("nan"), 0.0)
    in_range = valid & (t >= 0) & (t < logits.shape[-1])
    for sl, x in _row_blocks(logits):
        logp_k, lk, pk = _kept_block(x, inv_temp, clamp_fraction, acc)
        h = -(pk * torch.where(pk > 0, logp_k, 0.0)).sum(-1)
        cent.view(-1)[sl] = torch.where(in_range[sl], h.clamp(min=0.0), off[sl])
        lse_k.view(-1)[sl] = torch.where(in_range[sl], lk, off[sl])
    thr, n_tie = (torch.zeros(targets.shape, dtype=torch.int64, device=logits.device) for _ in range(2))
    return (*outs, cent, lse_k, lse_k_lo, thr, n_tie)


def clamped_bwd_torch(logits, targets, thr, n_tie, lse, lse_lo, entropy, lse_kept, lse_kept_lo, clamped_entropy,
                      grad_logp, grad_entropy, grad_clamped, inv_temp, ignore_index, clamp_fraction, out):
    """Chunked backward; see clamped_entropy.clamped_bwd. `out` may be `logits` itself."""
    acc = acc_dtype(logits.dtype)
    g_cent = grad_clamped.reshape(-1).to(acc)
    cent = clamped_entropy.reshape(-1)

    def clamped_grad(sl, x):
        logp_k, _, pk = _kept_block(x, inv_temp, clamp_fraction, acc)
        return -g_cent[sl, None] * pk * (torch.where(pk > 0, logp_k, 0.0) + cent[sl, None])

    return fused_bwd_torch(logits, targets, lse, lse_lo, entropy, grad_logp, grad_entropy, inv_temp, ignore_index, out,
                           extra_grad=clamped_grad)
