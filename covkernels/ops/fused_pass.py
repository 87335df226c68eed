"""Triton kernels of the fused pass over logits (SPEC sections 2-3) and their host launchers.

Forward: one read of each valid row gives lse, logp, entropy and (with STATS) sum p^2 and sum p^2 log p.
Backward: one more read of each valid row writes dz once, optionally into the logits' own storage. Rows
whose target is `ignore_index` are never read. Few long rows would leave most SMs idle, so a row may be
split over several programs; the forward then writes per-split accumulators that a small kernel combines.

Rows are addressed through two leading strides, row r -> (r // inner) * stride_outer + (r % inner) *
stride_inner, so a slice such as logits[:, :-1] of a [B, T, V] tensor is read in place, without a copy.
"""
import torch
import triton
import triton.language as tl

from .layout import acc_dtype, new_outputs, num_splits, pick_block, row_layout

_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def _rescale(mx_old, mx_new, l, s1, q, q1):
    # Moving the reference point from mx_old to mx_new (d = mx_old - mx_new <= 0) turns
    # sum e^(z-m)(z-m) into e^d (s1 + d l), and the second moments take e^(2d). A reference of -inf
    # means nothing was accumulated yet (all sums 0): d is replaced by 0 there to avoid 0 * inf.
    empty = mx_old == float("-inf")
    d = tl.where(empty, 0.0, mx_old - mx_new)
    a = tl.where(empty, 0.0, tl.exp(d))
    return a * l, a * (s1 + d * l), a * a * q, a * a * (q1 + d * q)


@triton.jit
def _online_update(z, mx, l, s1, q, q1, STATS: tl.constexpr):
    """Adds one block z [BLOCK_V] (masked entries -inf) to the running accumulators of SPEC section 2."""
    mx_new = tl.maximum(mx, tl.max(z, axis=0))
    # While only -inf was seen the reference stays at 0: every e is 0 and every sum stays 0.
    ref = tl.where(mx_new == float("-inf"), 0.0, mx_new)
    l, s1, q, q1 = _rescale(mx, ref, l, s1, q, q1)
    zs = z - ref
    e = tl.exp(zs)
    # e == 0 covers -inf entries and underflow, where zs may be -inf and e * zs would be NaN.
    zs = tl.where(e > 0, zs, 0.0)
    l += tl.sum(e, axis=0)
    s1 += tl.sum(e * zs, axis=0)
    if STATS:
        e2 = e * e
        q += tl.sum(e2, axis=0)
        q1 += tl.sum(e2 * zs, axis=0)
    return mx_new, l, s1, q, q1


@triton.jit
def _accumulate(x_ptr, row_off, col_start, col_end, inv_temp,
                BLOCK_V: tl.constexpr, STATS: tl.constexpr, ACC: tl.constexpr):
    """Online accumulators (mx, l, s1, q, q1) of z = x * inv_temp over columns [col_start, col_end)."""
    offs_v = tl.arange(0, BLOCK_V)
    mx = tl.full([], float("-inf"), ACC)
    l = tl.full([], 0.0, ACC)
    s1 = tl.full([], 0.0, ACC)
    q = tl.full([], 0.0, ACC)
    q1 = tl.full([], 0.0, ACC)
    for start in range(col_start, col_end, BLOCK_V):
        cols = start + offs_v
        z = tl.load(x_ptr + row_off + cols, mask=cols < col_end, other=float("-inf")).to(ACC) * inv_temp
        mx, l, s1, q, q1 = _online_update(z, mx, l, s1, q, q1, STATS)
    return mx, l, s1, q, q1


@triton.jit
def _two_sum(a, b):
    """(s, e) with s = fl(a + b) and a + b = s + e exactly (Knuth's TwoSum)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


@triton.jit
def _entropy_grad(z, lse, lse_lo, ent):
    """p and p (log p + H) of a block of z for a softmax with log-normaliser lse + lse_lo and entropy H;
    0 where p = 0 (a -inf logit), where p * (log p + H) would be 0 * -inf. lse_lo is lse's rounding error:
    with logits in the hundreds, fp32 lse alone would shift every log p by up to 1e-5."""
    logp = (z - lse) - lse_lo
    p = tl.exp(logp)
    return p, p * (tl.where(p > 0, logp, 0.0) + ent)


@triton.jit
def _finish_row(row, t, valid, z_t, mx, l, s1, q, q1,
                logp_ptr, ent_ptr, lse_ptr, s2_ptr, s3_ptr, lo_ptr, STATS: tl.constexpr):
    """Writes the outputs of one row from its accumulators; ignored rows get 0 everywhere."""
    # An ignored row accumulated nothing (mx = -inf, l = 0): keep its arithmetic finite; it stores 0s.
    mx = tl.where(valid, mx, 0.0)
    l = tl.where(valid, l, 1.0)
    ln_l = tl.log(l)
    lse, lse_lo = _two_sum(mx, ln_l)
    # logp <= 0 and H >= 0 always: rounding can push either a hair past its bound. where() rather than
    # minimum/maximum, which drop a NaN (like fminf) and would hide a bad row.
    logp = (z_t - lse) - lse_lo
    logp = tl.where(logp > 0, 0.0, logp)
    ent = ln_l - s1 / l
    ent = tl.where(ent < 0, 0.0, ent)
    tl.store(logp_ptr + row, tl.where(valid, logp, 0.0))
    tl.store(ent_ptr + row, tl.where(valid, ent, 0.0))
    tl.store(lse_ptr + row, tl.where(valid, lse, 0.0))
    tl.store(lo_ptr + row, tl.where(valid, lse_lo, 0.0))
    if STATS:
        s2 = q / (l * l)
        s3 = q1 / (l * l) - ln_l * s2
        tl.store(s2_ptr + row, tl.where(valid, s2, 0.0))
        tl.store(s3_ptr + row, tl.where(valid, s3, 0.0))


@triton.jit
def _load_target_logit(x_ptr, row_off, t, valid, V, inv_temp, ACC: tl.constexpr):
    # A target outside [0, V) that is not ignore_index is never dereferenced: its row gives NaN.
    in_range = valid & (t >= 0) & (t < V)
    z_t = tl.load(x_ptr + row_off + t, mask=in_range, other=0.0).to(ACC) * inv_temp
    return tl.where(in_range, z_t, float("nan"))


@triton.jit
def _row_offset(row, inner, stride_outer, stride_inner):
    return (row // inner) * stride_outer + (row % inner) * stride_inner


@triton.jit
def _fwd_kernel(x_ptr, t_ptr, logp_ptr, ent_ptr, lse_ptr, s2_ptr, s3_ptr, lo_ptr, part_ptr,
                N, V, inner, stride_outer, stride_inner, chunk, inv_temp, ignore_index,
                BLOCK_V: tl.constexpr, STATS: tl.constexpr, SPLIT: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    n_split = tl.num_programs(1).to(tl.int64)
    row_off = _row_offset(row, inner, stride_outer, stride_inner)
    t = tl.load(t_ptr + row).to(tl.int64)
    valid = t != ignore_index
    col_start = split * chunk
    col_end = tl.where(valid, tl.minimum(col_start + chunk, V), col_start)
    mx, l, s1, q, q1 = _accumulate(x_ptr, row_off, col_start, col_end, inv_temp, BLOCK_V, STATS, ACC)
    if SPLIT:
        # [5, N, n_split] partial accumulators, combined by _combine_kernel.
        part = part_ptr + row * n_split + split
        plane = N * n_split
        tl.store(part, mx)
        tl.store(part + plane, l)
        tl.store(part + 2 * plane, s1)
        tl.store(part + 3 * plane, q)
        tl.store(part + 4 * plane, q1)
    else:
        z_t = _load_target_logit(x_ptr, row_off, t, valid, V, inv_temp, ACC)
        _finish_row(row, t, valid, z_t, mx, l, s1, q, q1, logp_ptr, ent_ptr, lse_ptr, s2_ptr, s3_ptr, lo_ptr,
                    STATS)


@triton.jit
def _combine_splits(part_ptr, row, N, n_split, BLOCK_S: tl.constexpr):
    """(ref, l, s1, q, q1) of one row from the first five planes of its [*, N, n_split] per-split
    accumulators: every split rescaled to the row max (ref; 0 while it is -inf), then summed."""
    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < n_split
    part = part_ptr + row * n_split + offs_s  # [BLOCK_S]
    plane = N * n_split
    mx_s = tl.load(part, mask=mask_s, other=float("-inf"))
    mx = tl.max(mx_s, axis=0)
    ref = tl.where(mx == float("-inf"), 0.0, mx)
    l, s1, q, q1 = _rescale(mx_s, ref,
                            tl.load(part + plane, mask=mask_s, other=0.0),
                            tl.load(part + 2 * plane, mask=mask_s, other=0.0),
                            tl.load(part + 3 * plane, mask=mask_s, other=0.0),
                            tl.load(part + 4 * plane, mask=mask_s, other=0.0))
    return ref, tl.sum(l, axis=0), tl.sum(s1, axis=0), tl.sum(q, axis=0), tl.sum(q1, axis=0)


@triton.jit
def _combine_kernel(x_ptr, t_ptr, logp_ptr, ent_ptr, lse_ptr, s2_ptr, s3_ptr, lo_ptr, part_ptr,
                    N, V, inner, stride_outer, stride_inner, n_split, inv_temp, ignore_index,
                    BLOCK_S: tl.constexpr, STATS: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ref, l, s1, q, q1 = _combine_splits(part_ptr, row, N, n_split, BLOCK_S)
    t = tl.load(t_ptr + row).to(tl.int64)
    valid = t != ignore_index
    row_off = _row_offset(row, inner, stride_outer, stride_inner)
    z_t = _load_target_logit(x_ptr, row_off, t, valid, V, inv_temp, ACC)
    _finish_row(row, t, valid, z_t, ref, l, s1, q, q1, logp_ptr, ent_ptr, lse_ptr, s2_ptr, s3_ptr, lo_ptr, STATS)


@triton.jit
def _bwd_kernel(x_ptr, t_ptr, lse_ptr, lo_ptr, ent_ptr, glogp_ptr, gent_ptr, dx_ptr,
                V, inner, stride_outer, stride_inner, dx_stride_outer, dx_stride_inner,
                chunk, inv_temp, ignore_index, BLOCK_V: tl.constexpr, ACC: tl.constexpr, CHECK_TARGET: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    row_off = _row_offset(row, inner, stride_outer, stride_inner)
    dx_row_off = _row_offset(row, inner, dx_stride_outer, dx_stride_inner)
    t = tl.load(t_ptr + row).to(tl.int64)
    valid = t != ignore_index
    # A target outside [0, V) (validate=False) has NaN outputs: its gradient is NaN too, never a wrong number.
    # Off for vocabulary shards, where a target held by another shard is legitimately outside this one.
    bad = valid & ((t < 0) | (t >= V))
    lse = tl.load(lse_ptr + row)
    lse_lo = tl.load(lo_ptr + row)
    ent = tl.load(ent_ptr + row)
    g_logp = tl.load(glogp_ptr + row).to(ACC)
    g_ent = tl.load(gent_ptr + row).to(ACC)
    offs_v = tl.arange(0, BLOCK_V)
    col_start = split * chunk
    col_end = tl.minimum(col_start + chunk, V)
    # Ignored rows are written (with 0) but never read: their read range is empty.
    read_end = tl.where(valid, col_end, col_start)
    for start in range(col_start, col_end, BLOCK_V):
        cols = start + offs_v
        mask_v = cols < col_end
        z = tl.load(x_ptr + row_off + cols, mask=cols < read_end, other=0.0).to(ACC) * inv_temp
        p, dent = _entropy_grad(z, lse, lse_lo, ent)
        dz = (g_logp * (tl.where(cols == t, 1.0, 0.0) - p) - g_ent * dent) * inv_temp
        if CHECK_TARGET:
            dz = tl.where(bad, float("nan"), dz)
        dz = tl.where(valid, dz, 0.0)
        tl.store(dx_ptr + dx_row_off + cols, dz.to(dx_ptr.dtype.element_ty), mask=mask_v)


def fused_fwd(logits, targets, inv_temp, ignore_index, stats, splits=None):
    """Forward launcher. logits [..., V] (last dim contiguous), targets [...] int.

    Returns (logp, entropy, lse, sum_p2, sum_p2_logp, lse_lo), each of targets' shape in
    acc_dtype(logits); lse_lo is the rounding error of lse (for the backward); sum_p2 and sum_p2_logp are
    empty when `stats` is False. `splits` overrides the programs per row.
    """
    x, N, V, inner, stride_outer, stride_inner = row_layout(logits)
    t = targets.reshape(-1).contiguous()  # the kernels index targets by row: stride 1
    acc = acc_dtype(logits.dtype)
    block_v, num_warps = pick_block(V, logits.element_size())
    n_split, chunk = num_splits(N, V, block_v, logits.device, splits)
    outs = new_outputs(targets, acc, stats)
    logp, ent, lse, s2, s3, lse_lo = (o.view(-1) for o in outs)
    if not stats:
        s2 = s3 = lse  # never written: STATS is off
    part = torch.empty((5, N, n_split) if n_split > 1 else (1,), dtype=acc, device=logits.device)
    if N > 0:
        kw = dict(STATS=stats, ACC=_TL_DTYPE[acc])
        _fwd_kernel[(N, n_split)](x, t, logp, ent, lse, s2, s3, lse_lo, part, N, V, inner, stride_outer, stride_inner,
                                  chunk, inv_temp, ignore_index, BLOCK_V=block_v, SPLIT=n_split > 1,
                                  num_warps=num_warps, **kw)
        if n_split > 1:
            _combine_kernel[(N,)](x, t, logp, ent, lse, s2, s3, lse_lo, part, N, V, inner, stride_outer, stride_inner,
                                  n_split, inv_temp, ignore_index, BLOCK_S=triton.next_power_of_2(n_split),
                                  num_warps=1, **kw)
    return outs


def fused_fwd_partials(logits, targets, inv_temp, ignore_index, stats):
    """[5, N] accumulators (mx, l, s1, q, q1) of each row, relative to its max, unfinished: for rows whose
    other columns live elsewhere (vocabulary-parallel shards). Ignored rows are never read (mx = -inf)."""
    x, N, V, inner, stride_outer, stride_inner = row_layout(logits)
    acc = acc_dtype(logits.dtype)
    block_v, num_warps = pick_block(V, logits.element_size())
    part = torch.empty((5, N), dtype=acc, device=logits.device)
    if N > 0:
        chunk = triton.cdiv(max(V, 1), block_v) * block_v  # one program covers the whole row
        # Split mode stores the accumulators and writes none of the row outputs: `part` stands in for them.
        _fwd_kernel[(N, 1)](x, targets.reshape(-1).contiguous(), part, part, part, part, part, part, part, N, V, inner,
                            stride_outer, stride_inner, chunk, inv_temp, ignore_index, BLOCK_V=block_v,
                            STATS=stats, SPLIT=True, ACC=_TL_DTYPE[acc], num_warps=num_warps)
    return part


def fused_bwd(logits, targets, lse, lse_lo, entropy, grad_logp, grad_entropy, inv_temp, ignore_index, out,
              splits=None, check_target=True):
    """Backward launcher: writes dz (SPEC section 3) into `out` ([..., V], logits' shape and dtype).

    `out` may be `logits` itself (in-place backward): each element is read before it is overwritten by
    the same program. grad_logp, grad_entropy: [...] upstream gradients. check_target=False treats a
    target outside [0, V) as held elsewhere (vocabulary shards) instead of as bad input (NaN gradient).
    If `out` has a layout two strides cannot describe, the gradient goes through a copy written back.
    """
    x, N, V, inner, stride_outer, stride_inner = row_layout(logits)
    dx, _, _, _, dx_stride_outer, dx_stride_inner = row_layout(out, inner)
    acc = acc_dtype(logits.dtype)
    block_v, num_warps = pick_block(V, logits.element_size())
    n_split, chunk = num_splits(N, V, block_v, logits.device, splits)
    g_logp = grad_logp.reshape(-1).to(acc).contiguous()
    g_ent = grad_entropy.reshape(-1).to(acc).contiguous()
    if N > 0:
        _bwd_kernel[(N, n_split)](x, targets.reshape(-1).contiguous(), lse.reshape(-1), lse_lo.reshape(-1), entropy.reshape(-1),
                                  g_logp, g_ent,
                                  dx, V, inner, stride_outer, stride_inner, dx_stride_outer, dx_stride_inner,
                                  chunk, inv_temp, ignore_index, BLOCK_V=block_v, num_warps=num_warps,
                                  ACC=_TL_DTYPE[acc], CHECK_TARGET=check_target)
    if dx is not out:
        out.copy_(dx)
    return out
