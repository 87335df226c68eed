"""The fused LM head in plain PyTorch, for CPU tensors without the interpreter (and fp64).

Same interface and outputs as the launchers in kernels.py. The logits exist one block of at most
layout.CHUNK_ELEMS elements at a time (rows x vocabulary columns): the forward folds each block's base-2 row sums
(rowmath_torch.py) into the rows' running sums, as the vocabulary-parallel path folds shards; the backward
recomputes each block and takes the fused pass's gradient of it. Big blocks run through torch.compile.
"""
import math

import torch

from ..common import rowmath_torch as rm
from ..common.compiled import run
from ..fused_pass.torch_path import target_masks
from ..common import layout
from ..common.layout import acc_dtype, new_outputs, scale_args



def _blocks(N, V):
    """(rows, columns) of one block: about square in elements, rows * columns <= layout.CHUNK_ELEMS."""
    cols = max(1, min(V, math.isqrt(layout.CHUNK_ELEMS)))
    return max(1, layout.CHUNK_ELEMS // cols), cols


def _logits(h_rows, weight, bias, c0, c1, acc):
    """Logits (acc dtype) of rows h_rows (already in acc) and vocabulary columns [c0, c1)."""
    z = h_rows @ weight[c0:c1].to(acc).T
    return z if bias is None else z + bias[c0:c1].to(acc)


def linear_fwd_torch(hidden, weight, bias, targets, inv_temp, ignore_index, stats):
    """Chunked PyTorch forward; see kernels.linear_fwd."""
    D, V = hidden.shape[-1], weight.shape[0]
    h = hidden.reshape(-1, D)
    N = h.shape[0]
    acc = acc_dtype(hidden.dtype)
    scale, inv_temp = scale_args(inv_temp, hidden.dtype)
    valid, bad, _ = target_masks(targets, V, ignore_index)
    t = targets.reshape(-1).long()
    outs = new_outputs(targets, acc, stats)
    flat = [o.view(-1) for o in outs[:5 if stats else 3]]
    lse2 = outs[5].view(2, -1)
    rows, cols = _blocks(N, V)
    for r0 in range(0, N, rows):
        r1 = min(r0 + rows, N)
        h_rows = h[r0:r1].to(acc)
        sums, x_t = None, torch.zeros(r1 - r0, dtype=acc, device=h.device)
        for c0 in range(0, V, cols):
            c1 = min(c0 + cols, V)
            z = _logits(h_rows, weight, bias, c0, c1, acc)
            part = run(rm.block_sums, z, scale, stats)
            sums = part if sums is None else rm.merge(torch.stack([sums, part], dim=-1), -1, scale)
            local_t = t[r0:r1] - c0
            owned = (local_t >= 0) & (local_t < c1 - c0)
            x_t += torch.where(owned, z.gather(-1, torch.where(owned, local_t, 0)[:, None]).squeeze(-1), 0.0)
        *vals, row_lse2 = rm.finish(sums, x_t, scale, inv_temp, valid[r0:r1], bad[r0:r1])
        for out, val in zip(flat, vals):
            out[r0:r1] = val
        lse2[:, r0:r1] = row_lse2
    return outs


def linear_bwd_torch(hidden, weight, bias, targets, lse2, entropy, grad_logp, grad_entropy, inv_temp,
                     ignore_index, needs=(True, True, True)):
    """Chunked PyTorch backward; see kernels.linear_bwd."""
    D, V = hidden.shape[-1], weight.shape[0]
    h = hidden.reshape(-1, D)
    N = h.shape[0]
    acc = acc_dtype(hidden.dtype)
    scale, inv_temp = scale_args(inv_temp, hidden.dtype)
    valid, _, _ = target_masks(targets, V, ignore_index)
    t = targets.reshape(-1).long()
    per_row = (valid, lse2.reshape(2, -1), entropy.reshape(-1), grad_logp.reshape(-1).to(acc),
               grad_entropy.reshape(-1).to(acc))
    d_h = torch.zeros((N, D), dtype=acc, device=h.device) if needs[0] else None
    d_w = torch.empty_like(weight) if needs[1] else None
    d_b = torch.empty_like(bias) if bias is not None and needs[2] else None
    rows, cols = _blocks(N, V)
    for c0 in range(0, V, cols):
        c1 = min(c0 + cols, V)
        w_c = weight[c0:c1].to(acc)
        d_w_c = torch.zeros((c1 - c0, D), dtype=acc, device=h.device)
        d_b_c = torch.zeros((c1 - c0,), dtype=acc, device=h.device)
        for r0 in range(0, N, rows):
            r1 = min(r0 + rows, N)
            h_rows = h[r0:r1].to(acc)
            z = _logits(h_rows, weight, bias, c0, c1, acc)
            # The target's column in this block; one outside it matches no column (no delta term).
            dz = run(rm.grad, z, t[r0:r1] - c0, *(a[..., r0:r1] for a in per_row), scale, inv_temp)
            d_w_c += dz.T @ h_rows
            d_b_c += dz.sum(0)
            if d_h is not None:
                d_h[r0:r1] += dz @ w_c
        if d_w is not None:
            d_w[c0:c1] = d_w_c
        if d_b is not None:
            d_b[c0:c1] = d_b_c
    if d_h is not None:
        d_h = d_h.to(hidden.dtype).view(hidden.shape)
    return d_h, d_w, d_b
