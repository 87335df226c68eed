"""The fused LM head in plain PyTorch, for CPU tensors without the interpreter (and fp64 on CUDA).

Same interface and outputs as the launchers in linear_pass.py. The logits exist one fp32 block of at
most _CHUNK_ELEMS elements at a time (rows x vocabulary columns): the forward folds each block's row sums
(fused_pass_torch.row_sums, relative to the block's max) into the row accumulators of SPEC section 2,
rescaled to the running max; the backward recomputes each block and takes the fused pass's gradient of it.
Big blocks run through torch.compile, as in fused_pass_torch.
"""
import math

import torch

from .compiled import run
from .fused_pass_torch import centre, finish_rows, grad, row_masks, row_sums
from .layout import acc_dtype, new_outputs

_CHUNK_ELEMS = 1 << 21


def _blocks(N, V):
    """(rows, columns) of one block: about square in elements, rows * columns <= _CHUNK_ELEMS."""
    cols = max(1, min(V, math.isqrt(_CHUNK_ELEMS)))
    return max(1, _CHUNK_ELEMS // cols), cols


def _logits(h_rows, weight, bias, c0, c1, acc):
    """fp32 (fp64) logits of rows h_rows (already in acc) and vocabulary columns [c0, c1)."""
    z = h_rows @ weight[c0:c1].to(acc).T
    return z if bias is None else z + bias[c0:c1].to(acc)


def _merge(a, b, inv_temp):
    """Two row_sums results of the same rows (different columns) as one, relative to the larger max
    (SPEC section 2: with d = (m_old - m_new)/T <= 0, l <- e^d l, s1 <- e^d (s1 + d l), q <- e^2d q,
    q1 <- e^2d (q1 + d q)); a side whose max is -inf holds nothing."""
    m = torch.maximum(a[0], b[0])
    parts = []
    for mx, l, s1, q, q1 in (a, b):
        empty = mx == float("-inf")
        d = torch.where(empty, 0.0, (mx - m) * inv_temp)
        f = torch.where(empty, 0.0, d.exp())
        parts.append((f * l, f * (s1 + d * l), f * f * q, f * f * (q1 + d * q)))
    return (m, *(x + y for x, y in zip(*parts)))


def linear_fwd_torch(hidden, weight, bias, targets, inv_temp, ignore_index, stats, splits=None):
    """Chunked PyTorch forward; see linear_pass.linear_fwd (`splits` is accepted and ignored)."""
    D, V = hidden.shape[-1], weight.shape[0]
    h = hidden.reshape(-1, D)
    N = h.shape[0]
    acc = acc_dtype(hidden.dtype)
    t = targets.reshape(-1)
    keep, fill = row_masks(t, V, ignore_index, acc)
    outs = new_outputs(targets, acc, stats)
    rows, cols = _blocks(N, V)
    for r0 in range(0, N, rows):
        r1 = min(r0 + rows, N)
        h_rows, t_rows = h[r0:r1].to(acc), t[r0:r1].long()
        sums, x_t = None, torch.zeros(r1 - r0, dtype=acc, device=h.device)
        for c0 in range(0, V, cols):
            c1 = min(c0 + cols, V)
            z = _logits(h_rows, weight, bias, c0, c1, acc)
            part = run(row_sums, z, inv_temp)
            sums = part if sums is None else _merge(sums, part, inv_temp)
            local_t = t_rows - c0
            owned = (local_t >= 0) & (local_t < c1 - c0)
            x_t += torch.where(owned, z.gather(-1, torch.where(owned, local_t, 0)[:, None]).squeeze(-1), 0.0)
        for i, val in enumerate(finish_rows(*sums, x_t, inv_temp)):
            if stats or i not in (3, 4):
                outs[i].view(-1)[r0:r1] = torch.where(keep[r0:r1], val, fill[r0:r1])
    return outs


def linear_bwd_torch(hidden, weight, bias, targets, lse, lse_lo, entropy, grad_logp, grad_entropy, inv_temp,
                     ignore_index, needs=(True, True, True), chunk=None):
    """Chunked PyTorch backward; see linear_pass.linear_bwd (`chunk` is accepted and ignored)."""
    D, V = hidden.shape[-1], weight.shape[0]
    h = hidden.reshape(-1, D)
    N = h.shape[0]
    acc = acc_dtype(hidden.dtype)
    t = targets.reshape(-1)
    keep, fill = row_masks(t, V, ignore_index, acc)
    c, r = centre(lse.reshape(-1), lse_lo.reshape(-1), inv_temp)
    per_row = (c, r, entropy.reshape(-1), grad_logp.reshape(-1).to(acc), grad_entropy.reshape(-1).to(acc), keep,
               fill)
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
            dz = run(grad, z, t[r0:r1] - c0, *(a[r0:r1] for a in per_row), inv_temp)
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
