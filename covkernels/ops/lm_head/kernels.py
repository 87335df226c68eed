"""Triton kernels of the fused LM head (docs/lm_head.md: docs/fused_pass.md on logits = hidden @ weight.T +
bias) and their host launchers. The [N, V] logits never exist in memory.

Forward: each program owns a tile of BLOCK_N rows and one vocabulary split; it walks the split in
[BLOCK_N, BLOCK_V] logit tiles, each a tl.dot over D kept in fp32 registers, folds every tile into the
row accumulators of docs/fused_pass.md (mx, l, s1, q, q1 and the target logit) and stores them per split;
a small kernel combines the splits. Backward, one vocabulary chunk at a time: a kernel recomputes the
logit tiles and writes the chunk's gradient dz [N, V_chunk] in hidden's dtype (as the unfused backward
holds dlogits), then d_weight[chunk] = dz.T @ hidden (one matrix product, one rounding) and
d_hidden += dz @ weight[chunk] (a Triton product accumulating in fp32 across chunks). No float atomics:
every result is deterministic.
"""
import torch
import triton
import triton.language as tl

from ..._validation import INTERPRETING
from ..common.layout import new_outputs, scale_args
from ..common.rowmath import (U_FLOOR, finish_row, grad_coeffs, merge_partials, overflows, rescale,
                              softmax_grad)
from .tiles import GROUP_N, configs, dot_loop, grid2, mm_acc, tile_coords

# Backward chunk: at most this many vocabulary columns, and N * chunk <= _BWD_CHUNK_ELEMS elements.
_MAX_CHUNK = 8192
_BWD_CHUNK_ELEMS = 1 << 25
# Vocabulary splits start on multiples of this (a multiple of every BLOCK_V in tiles.configs).
_SPLIT_ALIGN = 256


@triton.jit
def _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, D, stride_hn, stride_wv, BLOCK_N: tl.constexpr,
                BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr,
                INTERPRETED: tl.constexpr):
    """The logits hidden @ weight.T + bias (before the temperature) of one [BLOCK_N, BLOCK_V] tile, in fp32.

    rows [BLOCK_N] and cols [BLOCK_V] (int64) must be in range: callers wrap the tile's overhang back
    into the matrix and mask what it gives (see tiles.dot_loop)."""
    offs_d = tl.arange(0, BLOCK_D)
    h_ptrs = h_ptr + rows[:, None] * stride_hn + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
    w_ptrs = w_ptr + cols[None, :] * stride_wv + offs_d[:, None]  # [BLOCK_D, BLOCK_V]
    acc = dot_loop(h_ptrs, w_ptrs, D, 1, BLOCK_N, BLOCK_V, BLOCK_D, INTERPRETED)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols).to(tl.float32)[None, :]
    return acc


@triton.jit
def _add_tile(z, scale, m, l, s1, q, q1, STATS: tl.constexpr):
    """Adds a [BLOCK_N, BLOCK_V] tile of raw logits (masked entries -inf) to the [BLOCK_N] running maxima m and
    sums of rowmath.py (base 2; rows whose m * scale overflows in safe mode, per row)."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    r_new = tl.where(m_new == float("-inf"), 0.0, m_new * scale)
    safe = overflows(m_new, r_new)
    # Rows that had seen nothing (m = -inf) have zero sums: their rescale factor is 0, not 2^(0 - r_new).
    d = tl.where(safe, (m - m_new) * scale, m * scale - r_new)
    d = tl.where(m == float("-inf"), U_FLOOR, tl.maximum(d, U_FLOOR))
    l, s1, q, q1 = rescale(d, l, s1, q, q1, STATS)
    # The products dominate here: every entry is clamped (a -inf bias or a masked column gives u = -inf).
    u = tl.where(safe[:, None], (z - m_new[:, None]) * scale, tl.fma(z, scale, -r_new[:, None]))
    u = tl.maximum(u, U_FLOOR, propagate_nan=tl.PropagateNan.ALL)
    e = tl.exp2(u)
    l += tl.sum(e, axis=1)
    s1 += tl.sum(e * u, axis=1)
    if STATS:
        e2 = e * e
        q += tl.sum(e2, axis=1)
        q1 += tl.sum(e2 * u, axis=1)
    return m_new, l, s1, q, q1


@triton.autotune(configs=configs(GROUP_N=GROUP_N), key=["D", "V"])
@triton.jit
def _linear_fwd_kernel(h_ptr, w_ptr, b_ptr, t_ptr, part_ptr, N, V, D, stride_hn, stride_wv, chunk, n_split,
                       scale, ignore_index, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                       BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr, HAS_BIAS: tl.constexpr,
                       STATS: tl.constexpr, INTERPRETED: tl.constexpr):
    tile_n, split = tile_coords(tl.program_id(0), tl.cdiv(N, BLOCK_N), n_split, GROUP_N)
    offs_n = tile_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    t = tl.load(t_ptr + offs_n, mask=mask_n, other=ignore_index).to(tl.int64)
    valid = mask_n & (t != ignore_index)
    col_start = split.to(tl.int64) * chunk
    # A tile of ignored rows (padding) skips its matrix products.
    col_end = tl.where(tl.max(valid.to(tl.int32), axis=0) > 0, tl.minimum(col_start + chunk, V), col_start)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_N], tl.float32)
    s1 = tl.zeros([BLOCK_N], tl.float32)
    q = tl.zeros([BLOCK_N], tl.float32)
    q1 = tl.zeros([BLOCK_N], tl.float32)
    z_t = tl.zeros([BLOCK_N], tl.float32)
    start = col_start
    while start < col_end:
        offs_v = start + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z = _logit_tile(h_ptr, w_ptr, b_ptr, offs_n % N, offs_v % V, D, stride_hn, stride_wv,
                        BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, INTERPRETED)
        z = tl.where(mask_v[None, :], z, float("-inf"))
        m, l, s1, q, q1 = _add_tile(z, scale, m, l, s1, q, q1, STATS)
        # Exactly one split holds a row's target: the others add 0, so the combine's sum is z_t itself.
        z_t += tl.sum(tl.where(offs_v[None, :] == t[:, None], z, 0.0), axis=1)
        start += BLOCK_V
    # [6, N, n_split] per-split maxima (-inf where the split saw nothing), sums and raw target logits.
    part = part_ptr + offs_n * n_split + split
    plane = N * n_split
    tl.store(part, m, mask=mask_n)
    tl.store(part + plane, l, mask=mask_n)
    tl.store(part + 2 * plane, s1, mask=mask_n)
    tl.store(part + 3 * plane, q, mask=mask_n)
    tl.store(part + 4 * plane, q1, mask=mask_n)
    tl.store(part + 5 * plane, z_t, mask=mask_n)


@triton.jit
def _linear_combine_kernel(t_ptr, part_ptr, logp_ptr, ent_ptr, lse_ptr, s2_ptr, s3_ptr, lse2_ptr, N, V, n_split,
                           scale, inv_temp, ignore_index, BLOCK_S: tl.constexpr, STATS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    m, l, s1, q, q1 = merge_partials(part_ptr, row, N, n_split, scale, BLOCK_S, STATS)
    # Plane 5: each split's target logit (0 where the split does not hold the target).
    offs_s = tl.arange(0, BLOCK_S)
    x_t = tl.sum(tl.load(part_ptr + (5 * N + row) * n_split + offs_s, mask=offs_s < n_split, other=0.0),
                 axis=0)
    t = tl.load(t_ptr + row).to(tl.int64)
    valid = t != ignore_index
    # A target outside [0, V) (validate=False) matched no column: its row gives NaN, never a number.
    bad = valid & ((t < 0) | (t >= V))
    finish_row(row, valid, bad, x_t, m, l, s1, q, q1, scale, inv_temp, logp_ptr, ent_ptr, lse_ptr, s2_ptr, s3_ptr,
               lse2_ptr, N, STATS)


@triton.autotune(configs=configs(GROUP_N=GROUP_N), key=["D", "n_cols"])
@triton.jit
def _linear_dz_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse2_ptr, ent_ptr, glogp_ptr, gent_ptr, dz_ptr,
                      N, V, D, col_start, n_cols, stride_hn, stride_wv, stride_dzn, scale, inv_temp, ignore_index,
                      BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
                      HAS_BIAS: tl.constexpr, INTERPRETED: tl.constexpr):
    """dz of docs/fused_pass.md#the-gradient on columns [col_start, col_start + n_cols) into dz [N, n_cols]
    (row stride stride_dzn), from recomputed logit tiles."""
    tile_n, tile_v = tile_coords(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(n_cols, BLOCK_V), GROUP_N)
    offs_n = tile_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    local_v = tile_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_v = col_start + local_v
    mask_n = offs_n < N
    mask_v = local_v < n_cols
    t = tl.load(t_ptr + offs_n, mask=mask_n, other=ignore_index).to(tl.int64)
    valid = mask_n & (t != ignore_index)
    dz = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    # A tile of ignored rows (padding) has dz = 0 and skips its matrix product.
    if tl.max(valid.to(tl.int32), axis=0) > 0:
        z = _logit_tile(h_ptr, w_ptr, b_ptr, offs_n % N, offs_v % V, D, stride_hn, stride_wv,
                        BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, INTERPRETED)
        m = tl.load(lse2_ptr + offs_n, mask=mask_n, other=0.0)
        big_l = tl.load(lse2_ptr + N + offs_n, mask=mask_n, other=0.0)
        g_logp = tl.load(glogp_ptr + offs_n, mask=mask_n, other=0.0)
        coef_a, coef_b = grad_coeffs(g_logp, tl.load(gent_ptr + offs_n, mask=mask_n, other=0.0),
                                     tl.load(ent_ptr + offs_n, mask=mask_n, other=0.0), inv_temp)
        # A target outside [0, V) (validate=False) has NaN outputs: its gradient is NaN too.
        coef_a = tl.where(valid & ((t < 0) | (t >= V)), float("nan"), coef_a)
        r = m * scale
        safe = overflows(m, r)[:, None]
        m, r, big_l, coef_a, coef_b = m[:, None], r[:, None], big_l[:, None], coef_a[:, None], coef_b[:, None]
        dz = tl.where(safe, softmax_grad(z, scale, m, r, big_l, coef_a, coef_b, True),
                      softmax_grad(z, scale, m, r, big_l, coef_a, coef_b, False))
        dz += tl.where(offs_v[None, :] == t[:, None], g_logp[:, None] * inv_temp, 0.0)
        dz = tl.where(valid[:, None], dz, 0.0)
    mask = mask_n[:, None] & mask_v[None, :]
    tl.store(dz_ptr + offs_n[:, None] * stride_dzn + local_v[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)


def _operands(hidden, weight, bias):
    """(hidden as [N, D], weight, bias): the matrices with a contiguous last dim and the bias contiguous
    (each copied only if it is not); bias None is replaced by weight (never read: HAS_BIAS is off)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    h = h if h.stride(-1) == 1 else h.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    return h, w, w if bias is None else bias.contiguous()


def _num_splits(N, V, device, splits):
    """(vocabulary splits, columns per split): enough programs to fill the GPU twice over, and at
    least 16 splits so that programs running together share weight tiles (see tiles.tile_coords)."""
    n_align = triton.cdiv(V, _SPLIT_ALIGN)
    if splits is None:
        splits = min(4, n_align)
        if device.type == "cuda":
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            splits = min(64, max(16, triton.cdiv(2 * sms, triton.cdiv(N, 64))))
    splits = max(1, min(splits, n_align))
    chunk = triton.cdiv(n_align, splits) * _SPLIT_ALIGN
    return triton.cdiv(V, chunk), chunk


def linear_fwd(hidden, weight, bias, targets, inv_temp, ignore_index, stats, splits=None):
    """Forward launcher. hidden [..., D] (last dim contiguous), weight [V, D], bias [V] or None, targets
    [...]. Returns (logp, entropy, lse, sum_p2, sum_p2_logp, lse2) as fused_pass.fused_fwd does.
    Extra memory: 24 * N * splits bytes of per-split accumulators. `splits` overrides the split count."""
    D, V = hidden.shape[-1], weight.shape[0]
    h, weight, b = _operands(hidden, weight, bias)
    N = h.shape[0]
    t = targets.reshape(-1).contiguous()
    kw = dict(INTERPRETED=INTERPRETING)
    outs = new_outputs(targets, torch.float32, stats)
    logp, ent, lse, s2, s3 = (o.view(-1) for o in outs[:5])
    if not stats:
        s2 = s3 = lse  # never written: STATS is off
    n_split, chunk = _num_splits(N, V, hidden.device, splits)
    part = torch.empty((6, N, n_split), dtype=torch.float32, device=hidden.device)
    scale, inv_temp = scale_args(inv_temp)
    if N > 0:
        def grid(meta):
            return (triton.cdiv(N, meta["BLOCK_N"]) * n_split,)
        _linear_fwd_kernel[grid](h, weight, b, t, part, N, V, D, h.stride(0), weight.stride(0), chunk, n_split,
                                 scale, ignore_index, HAS_BIAS=bias is not None, STATS=stats, **kw)
        _linear_combine_kernel[(N,)](t, part, logp, ent, lse, s2, s3, outs[5], N, V, n_split, scale, inv_temp,
                                     ignore_index, BLOCK_S=triton.next_power_of_2(n_split), STATS=stats, num_warps=1)
    return outs


def _bwd_chunk(N, V, chunk):
    if chunk is None:
        chunk = min(_MAX_CHUNK, max(_SPLIT_ALIGN, _BWD_CHUNK_ELEMS // max(N, 1) // _SPLIT_ALIGN * _SPLIT_ALIGN))
    return max(1, min(chunk, V))


def linear_bwd(hidden, weight, bias, targets, lse2, entropy, grad_logp, grad_entropy, inv_temp, ignore_index,
               needs=(True, True, True), chunk=None):
    """Backward launcher: (d_hidden [..., D] in hidden's dtype, d_weight [V, D], d_bias [V] or None), each
    None where `needs` says so. chunk: vocabulary columns per chunk (default: <= 8192 and N * chunk <=
    2^25). Extra memory: N * chunk * itemsize (the chunk's dz) + N * D * itemsize (d_hidden's running
    rounding error, bf16/fp16 only) + a copy of hidden when hidden.reshape(-1, D) is not a view."""
    D, V = hidden.shape[-1], weight.shape[0]
    h, weight, b = _operands(hidden, weight, bias)
    N = h.shape[0]
    t = targets.reshape(-1).contiguous()
    kw = dict(INTERPRETED=INTERPRETING)
    g_logp = grad_logp.reshape(-1).to(torch.float32).contiguous()
    g_ent = grad_entropy.reshape(-1).to(torch.float32).contiguous()
    chunk = _bwd_chunk(N, V, chunk)
    scale, inv_temp = scale_args(inv_temp)
    d_h = torch.zeros((N, D), dtype=hidden.dtype, device=h.device) if needs[0] else None
    split_lo = hidden.dtype != torch.float32
    d_h_lo = torch.zeros_like(d_h) if needs[0] and split_lo else d_h
    d_w = torch.empty_like(weight) if needs[1] else None
    d_b = torch.empty_like(bias) if bias is not None and needs[2] else None
    dz_buf = torch.empty((N, chunk), dtype=hidden.dtype, device=h.device)
    for c0 in range(0, V, chunk):
        nc = min(chunk, V - c0)
        dz = dz_buf[:, :nc]
        if N > 0:
            _linear_dz_kernel[grid2(N, nc, "BLOCK_N", "BLOCK_V")](
                h, weight, b, t, lse2.reshape(2, -1), entropy.reshape(-1), g_logp, g_ent, dz,
                N, V, D, c0, nc, h.stride(0), weight.stride(0), dz.stride(0), scale, inv_temp, ignore_index,
                HAS_BIAS=bias is not None, **kw)
        w_c = weight[c0:c0 + nc]
        if d_w is not None:
            torch.mm(dz.t(), h, out=d_w[c0:c0 + nc])
        if d_b is not None:
            d_b[c0:c0 + nc] = dz.sum(0, dtype=torch.float32)
        if d_h is not None and N > 0:
            mm_acc(dz, w_c, d_h, d_h_lo, split_lo)
    return None if d_h is None else d_h.view(hidden.shape), d_w, d_b
