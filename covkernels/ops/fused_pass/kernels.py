"""Triton kernels of the fused pass over logits (docs/fused_pass.md) and their host launchers.

Forward: one read of each valid row gives lse, logp, entropy and (with STATS) sum p^2 and sum p^2 log p, in
the base-2 form of rowmath.py. Backward: one more read of each valid row writes dz once, optionally into
the logits' own storage. Rows whose target is `ignore_index` are never read. Few long rows would leave
most SMs idle, so a row may be split over several programs; the forward then writes per-split sums that a
small kernel combines.

Rows are addressed through two leading strides, row r -> (r // inner) * stride_outer + (r % inner) *
stride_inner, so a slice such as logits[:, :-1] of a [B, T, V] tensor is read in place, without a copy.
Column offsets inside a row are int32 (V < 2^31); row offsets are int64.
"""
import torch
import triton
import triton.language as tl

from ..common.layout import new_outputs, num_splits, pick_block, read_in_pairs, row_layout, scale_args
from ..common.rowmath import (finish_row, grad_coeffs, load_halves, merge_partials, overflows, row_offset,
                              row_sums_safe, softmax_grad)


@triton.jit
def _fwd_kernel(x_ptr, t_ptr, logp_ptr, ent_ptr, lse_ptr, s2_ptr, s3_ptr, lse2_ptr, part_ptr,
                N, V, inner, stride_outer, stride_inner, chunk, scale, inv_temp, ignore_index,
                BLOCK_V: tl.constexpr, STATS: tl.constexpr, SPLIT: tl.constexpr, PAIRS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    x_row = x_ptr + row_offset(row, inner, stride_outer, stride_inner)
    t = tl.load(t_ptr + row).to(tl.int64)
    valid = t != ignore_index
    col_start = split * chunk
    col_end = tl.where(valid, tl.minimum(col_start + chunk, V), col_start)
    m, l, s1, q, q1 = row_sums_safe(x_row, col_start, col_end, scale, BLOCK_V, STATS, PAIRS)
    if SPLIT:
        # [5, N, n_split] per-split sums and maxima (-inf where the split saw nothing), for _combine_kernel.
        n_split = tl.num_programs(1)
        part = part_ptr + row * n_split + split
        plane = N * n_split
        tl.store(part, m)
        tl.store(part + plane, l)
        tl.store(part + 2 * plane, s1)
        tl.store(part + 3 * plane, q)
        tl.store(part + 4 * plane, q1)
    else:
        _finish(x_row, row, t, valid, V, scale, inv_temp, m, l, s1, q, q1, logp_ptr, ent_ptr, lse_ptr, s2_ptr, s3_ptr,
                lse2_ptr, N, STATS)


@triton.jit
def _finish(x_row, row, t, valid, V, scale, inv_temp, m, l, s1, q, q1, logp_ptr, ent_ptr, lse_ptr, s2_ptr, s3_ptr,
            lse2_ptr, N, STATS: tl.constexpr):
    # A target outside [0, V) that is not ignore_index is never dereferenced: its row gives NaN.
    bad = valid & ((t < 0) | (t >= V))
    x_t = tl.load(x_row + t, mask=valid & ~bad, other=0.0).to(tl.float32)
    finish_row(row, valid, bad, x_t, m, l, s1, q, q1, scale, inv_temp, logp_ptr, ent_ptr, lse_ptr, s2_ptr, s3_ptr,
               lse2_ptr, N, STATS)


@triton.jit
def _combine_kernel(x_ptr, t_ptr, logp_ptr, ent_ptr, lse_ptr, s2_ptr, s3_ptr, lse2_ptr, part_ptr,
                    N, V, inner, stride_outer, stride_inner, n_split, scale, inv_temp, ignore_index,
                    BLOCK_S: tl.constexpr, STATS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    m, l, s1, q, q1 = merge_partials(part_ptr, row, N, n_split, scale, BLOCK_S, STATS)
    t = tl.load(t_ptr + row).to(tl.int64)
    x_row = x_ptr + row_offset(row, inner, stride_outer, stride_inner)
    _finish(x_row, row, t, t != ignore_index, V, scale, inv_temp, m, l, s1, q, q1, logp_ptr, ent_ptr, lse_ptr, s2_ptr,
            s3_ptr, lse2_ptr, N, STATS)


@triton.jit
def _store_grad(dx_row, start, end, x_row, scale, m, r, big_l, coef_a, coef_b, BLOCK_V: tl.constexpr,
                MASKED: tl.constexpr, SAFE: tl.constexpr, PAIRS: tl.constexpr):
    even, odd = load_halves(x_row, start, end, BLOCK_V, MASKED, PAIRS)
    cols = start + tl.arange(0, BLOCK_V)
    dz = tl.join(softmax_grad(even, scale, m, r, big_l, coef_a, coef_b, SAFE),
                 softmax_grad(odd, scale, m, r, big_l, coef_a, coef_b, SAFE))
    dz = tl.reshape(dz, [BLOCK_V]).to(dx_row.dtype.element_ty)
    if MASKED:
        tl.store(dx_row + cols, dz, mask=cols < end)
    else:
        tl.store(dx_row + cols, dz)


@triton.jit
def _store_grads(dx_row, col_start, col_end, x_row, scale, m, r, big_l, coef_a, coef_b, BLOCK_V: tl.constexpr,
                 SAFE: tl.constexpr, PAIRS: tl.constexpr):
    start = col_start
    while start + BLOCK_V <= col_end:
        _store_grad(dx_row, start, col_end, x_row, scale, m, r, big_l, coef_a, coef_b, BLOCK_V, False, SAFE, PAIRS)
        start += BLOCK_V
    if start < col_end:
        _store_grad(dx_row, start, col_end, x_row, scale, m, r, big_l, coef_a, coef_b, BLOCK_V, True, SAFE, PAIRS)


@triton.jit(noinline=True)
def _store_grads_safe(dx_row, col_start, col_end, x_row, scale, m, r, big_l, coef_a, coef_b, BLOCK_V: tl.constexpr,
                      PAIRS: tl.constexpr):
    """_store_grads of a safe-mode row (rowmath.py), a function of its own: rare, and kept out of the kernel's
    machine code (bench/sass.py counts the common loop)."""
    _store_grads(dx_row, col_start, col_end, x_row, scale, m, r, big_l, coef_a, coef_b, BLOCK_V, True, PAIRS)


@triton.jit
def _bwd_kernel(x_ptr, t_ptr, lse2_ptr, ent_ptr, glogp_ptr, gent_ptr, dx_ptr, N, V, inner, stride_outer,
                stride_inner, dx_stride_outer, dx_stride_inner, chunk, scale, inv_temp, ignore_index,
                BLOCK_V: tl.constexpr, CHECK_TARGET: tl.constexpr, PAIRS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    col_start = tl.program_id(1) * chunk
    col_end = tl.minimum(col_start + chunk, V)
    x_row = x_ptr + row_offset(row, inner, stride_outer, stride_inner)
    dx_row = dx_ptr + row_offset(row, inner, dx_stride_outer, dx_stride_inner)
    t = tl.load(t_ptr + row).to(tl.int64)
    if t != ignore_index:
        m = tl.load(lse2_ptr + row)
        big_l = tl.load(lse2_ptr + N + row)
        r = m * scale
        g_logp = tl.load(glogp_ptr + row)
        coef_a, coef_b = grad_coeffs(g_logp, tl.load(gent_ptr + row), tl.load(ent_ptr + row), inv_temp)
        if CHECK_TARGET:
            # A target outside [0, V) (validate=False) has NaN outputs: its gradient is NaN too. Off for
            # vocabulary shards, where a target held by another shard is legitimately outside this one.
            coef_a = tl.where((t < 0) | (t >= V), float("nan"), coef_a)
        # The target's delta term is added after the loop; its logit is read first (dx may be x).
        owns = (t >= col_start) & (t < col_end)
        x_t = tl.load(x_row + t, mask=owns, other=0.0).to(tl.float32)
        safe = overflows(m, r)
        if safe:
            _store_grads_safe(dx_row, col_start, col_end, x_row, scale, m, r, big_l, coef_a, coef_b, BLOCK_V, PAIRS)
        else:
            _store_grads(dx_row, col_start, col_end, x_row, scale, m, r, big_l, coef_a, coef_b, BLOCK_V, False, PAIRS)
        if owns:
            # Every thread's store of the target's column above must land before this one replaces it.
            tl.debug_barrier()
            p_t = tl.where(safe, softmax_grad(x_t, scale, m, r, big_l, coef_a, coef_b, True),
                           softmax_grad(x_t, scale, m, r, big_l, coef_a, coef_b, False))
            tl.store(dx_row + t, (p_t + g_logp * inv_temp).to(dx_ptr.dtype.element_ty))
    else:
        # Ignored rows are written (with 0) but never read.
        offs = tl.arange(0, BLOCK_V)
        zeros = tl.zeros([BLOCK_V], dx_ptr.dtype.element_ty)
        start = col_start
        while start < col_end:
            tl.store(dx_row + start + offs, zeros, mask=start + offs < col_end)
            start += BLOCK_V


def _launch_shape(logits, splits):
    x, N, V, inner, stride_outer, stride_inner = row_layout(logits)
    block_v, num_warps = pick_block(V, logits.element_size())
    n_split, chunk = num_splits(N, V, block_v, logits.device, splits)
    kw = dict(BLOCK_V=block_v, PAIRS=read_in_pairs(x, V, stride_outer, stride_inner), num_warps=num_warps)
    return x, N, V, inner, stride_outer, stride_inner, n_split, chunk, kw


def fused_fwd(logits, targets, inv_temp, ignore_index, stats, splits=None):
    """Forward launcher. logits [..., V] (last dim contiguous), targets [...] int.

    Returns (logp, entropy, lse, sum_p2, sum_p2_logp, lse2): the first five of targets' shape in fp32
    (sum_p2, sum_p2_logp empty when `stats` is False); lse2 [2, ...] = (m, L), the row's
    max raw logit and the log2 of its base-2 sum (rowmath.py), for the backward. `splits` overrides the programs
    per row.
    """
    x, N, V, inner, stride_outer, stride_inner, n_split, chunk, kw = _launch_shape(logits, splits)
    t = targets.reshape(-1).contiguous()  # the kernels index targets by row: stride 1
    outs = new_outputs(targets, torch.float32, stats)
    logp, ent, lse, s2, s3 = (o.view(-1) for o in outs[:5])
    if not stats:
        s2 = s3 = lse  # never written: STATS is off
    part = torch.empty((5, N, n_split) if n_split > 1 else (1,), dtype=torch.float32, device=logits.device)
    scale, inv_temp = scale_args(inv_temp)
    if N > 0:
        args = (x, t, logp, ent, lse, s2, s3, outs[5], part, N, V, inner, stride_outer, stride_inner)
        _fwd_kernel[(N, n_split)](*args, chunk, scale, inv_temp, ignore_index, STATS=stats, SPLIT=n_split > 1, **kw)
        if n_split > 1:
            _combine_kernel[(N,)](*args, n_split, scale, inv_temp, ignore_index,
                                  BLOCK_S=triton.next_power_of_2(n_split), STATS=stats, num_warps=1)
    return outs


def fused_fwd_partials(logits, targets, inv_temp, ignore_index, stats):
    """[5, N] fp32 (m, l, s1, q, q1): each row's max and base-2 sums relative to its reference (rowmath.py),
    unfinished: for rows whose other columns live elsewhere (vocabulary-parallel shards). Ignored rows are
    never read (m = -inf, sums 0)."""
    x, N, V, inner, stride_outer, stride_inner, _, _, kw = _launch_shape(logits, 1)
    part = torch.empty((5, N, 1), dtype=torch.float32, device=logits.device)
    if N > 0:
        scale, inv_temp = scale_args(inv_temp)
        # Split mode stores the sums and writes none of the row outputs: `part` stands in for them.
        _fwd_kernel[(N, 1)](x, targets.reshape(-1).contiguous(), part, part, part, part, part, part, part, N, V,
                            inner, stride_outer, stride_inner, max(V, 1), scale, inv_temp, ignore_index, STATS=stats,
                            SPLIT=True, **kw)
    return part.view(5, N)


def fused_bwd(logits, targets, lse2, entropy, grad_logp, grad_entropy, inv_temp, ignore_index, out,
              splits=None, check_target=True):
    """Backward launcher: writes dz (docs/fused_pass.md#the-gradient) into `out` ([..., V], logits' shape and
    dtype).

    `out` may be `logits` itself (in-place backward): each element is read before it is overwritten by
    the same thread. lse2 [2, ...] from the forward; grad_logp, grad_entropy: [...] upstream gradients.
    check_target=False treats a target outside [0, V) as held elsewhere (vocabulary shards) instead of as
    bad input (NaN gradient). If `out` has a layout two strides cannot describe, the gradient goes through
    a copy written back.
    """
    x, N, V, inner, stride_outer, stride_inner, n_split, chunk, kw = _launch_shape(logits, splits)
    dx, _, _, _, dx_stride_outer, dx_stride_inner = row_layout(out, inner)
    g_logp = grad_logp.reshape(-1).to(torch.float32).contiguous()
    g_ent = grad_entropy.reshape(-1).to(torch.float32).contiguous()
    scale, inv_temp = scale_args(inv_temp)
    if N > 0:
        _bwd_kernel[(N, n_split)](x, targets.reshape(-1).contiguous(), lse2.reshape(2, -1), entropy.reshape(-1),
                                  g_logp, g_ent, dx, N, V, inner, stride_outer, stride_inner, dx_stride_outer,
                                  dx_stride_inner, chunk, scale, inv_temp, ignore_index, CHECK_TARGET=check_target,
                                  **kw)
    if dx is not out:
        out.copy_(dx)
    return out
