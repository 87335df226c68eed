"""The fused LM head in plain PyTorch, for CPU tensors without the interpreter (and fp64 on CUDA).

Same interface and outputs as the launchers in linear_pass.py. The logits exist one fp32 block of at
most _CHUNK_ELEMS elements at a time (rows x vocabulary columns), folded into the row accumulators of
SPEC section 2 as the vocabulary-parallel path folds shards; the backward recomputes each block.
"""
import math

import torch

from .layout import acc_dtype, new_outputs
from .vocab_parallel import _bwd_torch, _finish_rows, _partials_torch, _rescale, _shard_targets

_CHUNK_ELEMS = 1 << 21


def _blocks(N, V):
    """(rows, columns) of one block: about square in elements, rows * columns <= _CHUNK_ELEMS."""
    cols = max(1, min(V, math.isqrt(_CHUNK_ELEMS)))
    return max(1, _CHUNK_ELEMS // cols), cols


def _logits(h_rows, weight, bias, c0, c1, acc):
    """fp32 (fp64) logits of rows h_rows (already in acc) and vocabulary columns [c0, c1)."""
    z = h_rows @ weight[c0:c1].to(acc).T
    return z if bias is None else z + bias[c0:c1].to(acc)


def linear_fwd_torch(hidden, weight, bias, targets, inv_temp, ignore_index, stats, splits=None):
    """Chunked PyTorch forward; see linear_pass.linear_fwd (`splits` is accepted and ignored)."""
    D, V = hidden.shape[-1], weight.shape[0]
    h = hidden.reshape(-1, D)
    N = h.shape[0]
    acc = acc_dtype(hidden.dtype)
    outs = new_outputs(targets, acc, stats)
    flat = [o.view(-1) for o in outs]
    t = targets.reshape(-1)
    rows, cols = _blocks(N, V)
    for r0 in range(0, N, rows):
        r1 = min(r0 + rows, N)
        h_rows, t_rows = h[r0:r1].to(acc), t[r0:r1]
        mx = torch.full((r1 - r0,), float("-inf"), dtype=acc, device=h.device)
        sums = torch.zeros((5, r1 - r0), dtype=acc, device=h.device)  # l, s1, q, q1, z_t
        for c0 in range(0, V, cols):
            c1 = min(c0 + cols, V)
            z = _logits(h_rows, weight, bias, c0, c1, acc) * inv_temp
            part = _partials_torch(z, t_rows, 1.0, ignore_index, stats)
            new = torch.maximum(mx, part[0])
            ref = torch.where(new == float("-inf"), 0.0, new)
            old = _rescale(mx, ref, *sums[:4])
            add = _rescale(part[0], ref, *part[1:])
            local_t = t_rows.long() - c0
            owned = (local_t >= 0) & (local_t < c1 - c0)
            z_t = z.gather(-1, torch.where(owned, local_t, 0)[:, None]).squeeze(-1)
            sums = torch.stack([a + b for a, b in zip(old, add)] + [sums[4] + torch.where(owned, z_t, 0.0)])
            mx = new
        valid = t_rows != ignore_index
        ok = (t_rows >= 0) & (t_rows < V)
        ref = torch.where(mx == float("-inf"), 0.0, mx)
        logp, ent, lse, lse_lo, *s = _finish_rows(ref, sums[0], sums[1], sums[4], ok, valid,
                                                  *(sums[2:4] if stats else ()))
        # A target outside [0, V) (validate=False) makes every output of its row NaN.
        bad = valid & ~ok
        for out, val in zip(flat, [logp, ent, lse, *s]):
            out[r0:r1] = torch.where(bad, float("nan"), val)
        flat[5][r0:r1] = lse_lo
    return outs


def linear_bwd_torch(hidden, weight, bias, targets, lse, lse_lo, entropy, grad_logp, grad_entropy, inv_temp,
                     ignore_index, needs=(True, True, True), chunk=None):
    """Chunked PyTorch backward; see linear_pass.linear_bwd (`chunk` is accepted and ignored)."""
    D, V = hidden.shape[-1], weight.shape[0]
    h = hidden.reshape(-1, D)
    N = h.shape[0]
    acc = acc_dtype(hidden.dtype)
    t = targets.reshape(-1)
    bad = (t != ignore_index) & ((t < 0) | (t >= V))
    flat = [x.reshape(-1) for x in (lse, lse_lo, entropy, grad_logp, grad_entropy)]
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
            local_t = _shard_targets(t[r0:r1], c0, c1 - c0, ignore_index)
            dz = _bwd_torch(z, local_t, *(x[r0:r1] for x in flat), inv_temp, ignore_index)
            # A target outside [0, V) (validate=False) has NaN outputs: its gradient is NaN too.
            dz = torch.where(bad[r0:r1, None], float("nan"), dz)
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
