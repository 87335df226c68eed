"""The fused pass in plain PyTorch, a block of rows at a time, for CPU tensors without the interpreter.

Same interface and outputs as the Triton launchers in fused_pass.py. Every row is read relative to its
max m, d = (x - m) / T (SPEC sections 2 and 10), so neither large logits nor the temperature cost
accuracy: the forward sums l = Σe^d, s1 = Σe^d·d, q = Σe^2d, q1 = Σe^2d·d and the closed forms follow.
lse comes with its rounding error lse_lo (lse + lse_lo = m/T + ln l to twice the precision), from which
the backward rebuilds log p = (x - c)/T - r around a per-row centre c ≈ lse·T, again without a product
of a large logit. Logits of at least compiled.MIN_ELEMS elements run through torch.compile (no [N, V]
temporaries); smaller ones eagerly, in blocks of at most _CHUNK_ELEMS elements (a few fp32 copies of one
block, never a full fp32 [N, V] copy).
"""
import torch

from .compiled import compiles, run
from .layout import acc_dtype, new_outputs, row_layout

_CHUNK_ELEMS = 1 << 21


def _row_blocks(logits, inner=None, chunk=None):
    """Yields (rows, x): x a [rows, V] view (writable) of consecutive rows of logits, in row order; blocks
    of `chunk` elements (default: _CHUNK_ELEMS, or whole runs of rows of one stride when they compile)."""
    x, N, V, inner, _, _ = row_layout(logits, inner)
    # One uniform row stride: a single run of N rows, cut into blocks.
    rows = x.view(-1, V).unsqueeze(0) if inner == 1 else x.view(-1, inner, V)
    inner = rows.shape[1]
    if chunk is None:
        chunk = x.numel() if compiles(x.numel()) else _CHUNK_ELEMS
    step = max(1, chunk // max(V, 1))
    for o in range(rows.shape[0]):
        for i in range(0, inner, step):
            j = min(i + step, inner)
            yield slice(o * inner + i, o * inner + j), rows[o, i:j]


def row_sums(x, inv_temp):
    """(m, l, s1, q, q1), each [R], of a block x [R, C] (any float dtype): m the raw row max (NaN where it
    is +inf: no softmax), and over e = exp(d), d = (x - m) * inv_temp: l = Σe, s1 = Σe·d, q = Σe², q1 = Σe²·d,
    in fp32 (fp64 for fp64 x). A row of -inf has m = -inf and sums 0."""
    xf = x.to(acc_dtype(x.dtype))
    m = xf.amax(-1, keepdim=True)
    m = torch.where(m == float("inf"), float("nan"), m)
    d = (xf - torch.where(m == float("-inf"), 0.0, m)) * inv_temp
    e = d.exp()
    d = torch.where(e > 0, d, 0.0)  # -inf entries: 0 * -inf would be NaN
    e2 = e * e
    return m.squeeze(-1), e.sum(-1), (e * d).sum(-1), e2.sum(-1), (e2 * d).sum(-1)


def finish_rows(m, l, s1, q, q1, x_t, inv_temp):
    """[logp, entropy, lse, sum_p2, sum_p2_logp, lse_lo] of rows from row_sums' accumulators and the raw
    target logit x_t (SPEC section 2); inv_temp a float. lse + lse_lo = m/T + ln l, summed in float64."""
    ln_l = l.log()
    # logp <= 0 and H >= 0: clamp rounding with where(), which keeps NaN (a bad row stays visible).
    logp = (x_t - m) * inv_temp - ln_l
    logp = torch.where(logp > 0, 0.0, logp)
    ent = ln_l - s1 / l
    ent = torch.where(ent < 0, 0.0, ent)
    s2 = q / (l * l)
    wide = m.double() * inv_temp + ln_l.double()
    lse = wide.to(l.dtype)
    return [logp, ent, lse, s2, q1 / (l * l) - ln_l * s2, (wide - lse.double()).to(l.dtype)]


def centre(lse, lse_lo, inv_temp):
    """(c, r) per row with x/T - lse - lse_lo = (x - c) * inv_temp - r: c ≈ (lse + lse_lo)·T in lse's
    dtype, r the small rest, so that log p of a logit near c never multiplies a large value by an
    inexact 1/T."""
    wide = lse.double() + lse_lo.double()
    c = (wide / inv_temp).to(lse.dtype)
    return c, (wide - c.double() * inv_temp).to(lse.dtype)


def row_masks(t, V, ignore_index, acc):
    """(keep, fill) per row: keep where the target is in [0, V); elsewhere every output and gradient is
    `fill`: 0 on ignored rows, NaN where a target lies outside [0, V) (possible with validate=False)."""
    valid = t != ignore_index
    keep = valid & (t >= 0) & (t < V)
    return keep, torch.where(valid, float("nan"), 0.0).to(acc)


def grad(x, t, c, r, ent, g_logp, g_ent, keep, fill, inv_temp):
    """dz [R, C] in fp32 (fp64 for fp64 x) of a block x [R, C] (SPEC section 3):
    (g_logp (δ_jt - p_j) - g_ent p_j (log p_j + H)) / T with log p_j = (x_j - c) * inv_temp - r; t the
    target's column in the block (none: no δ); `fill` on rows where keep is False. Per-row args [R]."""
    logp = (x.to(acc_dtype(x.dtype)) - c[:, None]) * inv_temp - r[:, None]
    p = logp.exp()
    dent = p * (torch.where(p > 0, logp, 0.0) + ent[:, None])
    delta = torch.arange(x.shape[-1], device=x.device) == t[:, None]
    dz = (g_logp[:, None] * (delta.to(p.dtype) - p) - g_ent[:, None] * dent) * inv_temp
    return torch.where(keep[:, None], dz, fill[:, None])


def grad_into(x, out, *args):
    """grad(x, *args) written into out (x's shape, any float dtype, not overlapping x)."""
    out.copy_(grad(x, *args))


def grad_in_place(x, *args):
    """grad(x, *args) written over x: a compiled graph with two aliased arguments is not reliable."""
    x.copy_(grad(x, *args))


def fused_fwd_torch(logits, targets, inv_temp, ignore_index, stats, splits=None):
    """Chunked PyTorch forward; see fused_pass.fused_fwd (`splits` is accepted and ignored)."""
    V = logits.shape[-1]
    acc = acc_dtype(logits.dtype)
    t = targets.reshape(-1)
    keep, fill = row_masks(t, V, ignore_index, acc)
    safe_t = torch.where(keep, t, 0).long()[:, None]
    sums = torch.empty((6, t.numel()), dtype=acc, device=logits.device)  # m, l, s1, q, q1, x_t
    for sl, x in _row_blocks(logits):
        sums[:5, sl] = torch.stack(run(row_sums, x, inv_temp))
        sums[5, sl] = x.gather(-1, safe_t[sl]).squeeze(-1).to(acc)
    outs = new_outputs(targets, acc, stats)
    for i, val in enumerate(finish_rows(*sums, inv_temp)):
        if stats or i not in (3, 4):
            outs[i].view(-1).copy_(torch.where(keep, val, fill))
    return outs


def fused_bwd_torch(logits, targets, lse, lse_lo, entropy, grad_logp, grad_entropy, inv_temp, ignore_index, out,
                    splits=None, extra_grad=None):
    """Chunked PyTorch backward; see fused_pass.fused_bwd. `out` may be `logits` itself.

    extra_grad(rows, x) -> [rows, V] in fp32 (fp64), if given, is added to each block's gradient; it must
    give 0 on ignored rows and NaN on rows with a target outside [0, V), like `grad` (x is read before the
    block is overwritten, so this works in place too).
    """
    V = logits.shape[-1]
    acc = acc_dtype(logits.dtype)
    t = targets.reshape(-1)
    keep, fill = row_masks(t, V, ignore_index, acc)
    c, r = centre(lse.reshape(-1), lse_lo.reshape(-1), inv_temp)
    per_row = (t, c, r, entropy.reshape(-1), grad_logp.reshape(-1).to(acc), grad_entropy.reshape(-1).to(acc),
               keep, fill)
    _, _, _, inner, _, _ = row_layout(logits)
    # An `out` no two strides describe is written through a copy, then copied back.
    dst_all = row_layout(out, inner)[0]
    # An extra gradient (AEnt's) takes a few copies of its block: bounded blocks for it.
    chunk = None if extra_grad is None else _CHUNK_ELEMS
    for (sl, x), (_, dst) in zip(_row_blocks(logits, chunk=chunk), _row_blocks(dst_all, inner, chunk)):
        args = [a[sl] for a in per_row] + [inv_temp]
        if extra_grad is None and dst.data_ptr() == x.data_ptr():  # `out` is `logits`: the same view
            run(grad_in_place, x, *args)
        elif extra_grad is None:
            run(grad_into, x, dst, *args)
        else:
            dst.copy_(run(grad, x, *args) + extra_grad(sl, x))
    if dst_all is not out:
        out.copy_(dst_all)
    return out
