"""Triton kernels of the clamped (AEnt) entropy, fused with the plain pass (SPEC section 6), and launchers.

The kept set K of a row drops its k = floor(p V) smallest logits, equal logits by lowest index first.
1. `_threshold_kernel`: an exact radix select over an order-preserving integer key of each logit, 8 bits
   per pass (2 passes for bf16/fp16, 4 for fp32), each a histogram of one digit: the k-th smallest key
   tau, and how many entries equal to tau are dropped (`n_tie`), with no sort of the row.
2. `_fwd_clamped_kernel`: one more read accumulates the plain statistics of the row and the softmax over
   K together: H~ = lse_K - sum_K p~ z. A bf16 row is read three times in all.
3. `_bwd_clamped_kernel`: one read writes dz of logp, H and H~ (gradient -p~ (log p~ + H~) on K).
The tie rank needs the entries of a row in order, so a row is never split across programs here.
"""
import torch
import triton
import triton.language as tl

from .fused_pass import _TL_DTYPE, _entropy_grad, _finish_row, _load_target_logit, _online_update, _row_offset
from .fused_pass import _two_sum
from .layout import acc_dtype, pick_block, row_layout

_INT = {torch.bfloat16: tl.int16, torch.float16: tl.int16, torch.float32: tl.int32, torch.float64: tl.int64}


@triton.jit
def _keys(x_raw, INT: tl.constexpr, BITS: tl.constexpr):
    """Signed integer keys ordered as the float values x_raw (-0.0 and +0.0 equal)."""
    b = x_raw.to(INT, bitcast=True).to(tl.int64)
    b = tl.where(b == -(1 << (BITS - 1)), 0, b)  # -0.0 is +0.0
    # Negative floats order backwards by their bits: flip every bit but the sign.
    return tl.where(b < 0, b ^ ((1 << (BITS - 1)) - 1), b)


@triton.jit
def _unsigned(key, BITS: tl.constexpr):
    """The key as a BITS-bit unsigned number held in int64, whose bytes are the radix digits."""
    if BITS < 64:
        return key + (1 << (BITS - 1))
    return key ^ (-(1 << 63))  # two's complement: the same bits as the unsigned number


@triton.jit
def _signed(u, BITS: tl.constexpr):
    if BITS < 64:
        return u - (1 << (BITS - 1))
    return u ^ (-(1 << 63))


@triton.jit
def _threshold_kernel(x_ptr, t_ptr, thr_ptr, ntie_ptr, V, inner, stride_outer, stride_inner, k, ignore_index,
                      BLOCK_V: tl.constexpr, INT: tl.constexpr, BITS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_off = _row_offset(row, inner, stride_outer, stride_inner)
    valid = tl.load(t_ptr + row).to(tl.int64) != ignore_index
    end = tl.where(valid, V, 0)
    offs_v = tl.arange(0, BLOCK_V)
    bins = tl.arange(0, 512)
    # Not k.to(): Triton specialises an int argument equal to 1 into a constexpr, which has no .to().
    k_rem = tl.full([], 0, tl.int64) + k
    target = tl.full([], 0, tl.int64)  # the digits of tau found so far, as an unsigned key
    for p in tl.static_range(BITS // 8):
        shift = BITS - 8 * (p + 1)
        hist = tl.zeros([512], dtype=tl.int32)
        for start in range(0, end, BLOCK_V):
            cols = start + offs_v
            in_row = cols < end
            u = _unsigned(_keys(tl.load(x_ptr + row_off + cols, mask=in_row, other=0), INT, BITS), BITS)
            match = in_row
            if p > 0:
                match = match & ((u >> (shift + 8)) == (target >> (shift + 8)))
            # Entries outside the current prefix go to bins >= 256 (no histogram mask before Triton 3.3).
            hist += tl.histogram(tl.where(match, (u >> shift) & 255, 256 + (offs_v & 255)).to(tl.int32), 512)
        hist = tl.where(bins < 256, hist, 0)
        cum = tl.cumsum(hist, axis=0)
        digit = tl.sum((cum <= k_rem).to(tl.int64), axis=0)
        k_rem -= tl.sum(tl.where(bins < digit, hist, 0).to(tl.int64), axis=0)
        target = target | (digit << shift)
    tl.store(thr_ptr + row, _signed(target, BITS))
    tl.store(ntie_ptr + row, k_rem)


@triton.jit
def _kept(x_raw, in_row, thr, n_tie, ties_before, INT: tl.constexpr, BITS: tl.constexpr):
    """(kept mask, ties seen after this block): above tau, or tied with tau past the first n_tie ties."""
    key = _keys(x_raw, INT, BITS)
    eq = (key == thr) & in_row
    rank = ties_before + tl.cumsum(eq.to(tl.int64), axis=0) - 1
    kept = in_row & ((key > thr) | (eq & (rank >= n_tie)))
    return kept, ties_before + tl.sum(eq.to(tl.int64), axis=0)


@triton.jit
def _fwd_clamped_kernel(x_ptr, t_ptr, thr_ptr, ntie_ptr, logp_ptr, ent_ptr, lse_ptr, s2_ptr, s3_ptr, lo_ptr,
                        cent_ptr, lsek_ptr, lsek_lo_ptr, V, inner, stride_outer, stride_inner, inv_temp, ignore_index,
                        BLOCK_V: tl.constexpr, ACC: tl.constexpr, INT: tl.constexpr, BITS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_off = _row_offset(row, inner, stride_outer, stride_inner)
    t = tl.load(t_ptr + row).to(tl.int64)
    valid = t != ignore_index
    end = tl.where(valid, V, 0)
    thr = tl.load(thr_ptr + row)
    n_tie = tl.load(ntie_ptr + row)
    offs_v = tl.arange(0, BLOCK_V)
    zero = tl.full([], 0.0, ACC)
    mx, l, s1, q, q1 = zero + float("-inf"), zero, zero, zero, zero
    mk, lk, s1k = zero + float("-inf"), zero, zero
    ties = tl.full([], 0, tl.int64)
    for start in range(0, end, BLOCK_V):
        cols = start + offs_v
        in_row = cols < end
        x_raw = tl.load(x_ptr + row_off + cols, mask=in_row, other=float("-inf"))
        z = x_raw.to(ACC) * inv_temp  # [BLOCK_V]
        kept, ties = _kept(x_raw, in_row, thr, n_tie, ties, INT, BITS)
        mx, l, s1, q, q1 = _online_update(z, mx, l, s1, q, q1, True)
        mk, lk, s1k, _, _ = _online_update(tl.where(kept, z, float("-inf")), mk, lk, s1k, zero, zero, False)
    z_t = _load_target_logit(x_ptr, row_off, t, valid, V, inv_temp, ACC)
    _finish_row(row, t, valid, z_t, mx, l, s1, q, q1, logp_ptr, ent_ptr, lse_ptr, s2_ptr, s3_ptr, lo_ptr, True)
    mk = tl.where(valid, mk, 0.0)
    lk = tl.where(valid, lk, 1.0)
    cent = tl.log(lk) - s1k / lk
    lse_k, lse_k_lo = _two_sum(mk, tl.log(lk))
    tl.store(cent_ptr + row, tl.where(valid, tl.where(cent < 0, 0.0, cent), 0.0))
    tl.store(lsek_ptr + row, tl.where(valid, lse_k, 0.0))
    tl.store(lsek_lo_ptr + row, tl.where(valid, lse_k_lo, 0.0))


@triton.jit
def _bwd_clamped_kernel(x_ptr, t_ptr, thr_ptr, ntie_ptr, lse_ptr, lo_ptr, ent_ptr, lsek_ptr, lsek_lo_ptr, cent_ptr,
                        glogp_ptr, gent_ptr,
                        gcent_ptr, dx_ptr, V, inner, stride_outer, stride_inner, dx_stride_outer, dx_stride_inner,
                        inv_temp, ignore_index, BLOCK_V: tl.constexpr, ACC: tl.constexpr, INT: tl.constexpr,
                        BITS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_off = _row_offset(row, inner, stride_outer, stride_inner)
    dx_row_off = _row_offset(row, inner, dx_stride_outer, dx_stride_inner)
    t = tl.load(t_ptr + row).to(tl.int64)
    valid = t != ignore_index
    read_end = tl.where(valid, V, 0)
    bad = valid & ((t < 0) | (t >= V))  # an out-of-range target (validate=False): NaN gradient, as its outputs
    thr = tl.load(thr_ptr + row)
    n_tie = tl.load(ntie_ptr + row)
    lse, lse_lo, ent = tl.load(lse_ptr + row), tl.load(lo_ptr + row), tl.load(ent_ptr + row)
    lse_k, lse_k_lo, cent = tl.load(lsek_ptr + row), tl.load(lsek_lo_ptr + row), tl.load(cent_ptr + row)
    g_logp = tl.load(glogp_ptr + row).to(ACC)
    g_ent = tl.load(gent_ptr + row).to(ACC)
    g_cent = tl.load(gcent_ptr + row).to(ACC)
    offs_v = tl.arange(0, BLOCK_V)
    ties = tl.full([], 0, tl.int64)
    for start in range(0, V, BLOCK_V):
        cols = start + offs_v
        in_row = cols < read_end
        x_raw = tl.load(x_ptr + row_off + cols, mask=in_row, other=0.0)
        z = x_raw.to(ACC) * inv_temp
        kept, ties = _kept(x_raw, in_row, thr, n_tie, ties, INT, BITS)
        p, dent = _entropy_grad(z, lse, lse_lo, ent)
        _, dcent = _entropy_grad(tl.where(kept, z, float("-inf")), lse_k, lse_k_lo, cent)
        dz = (g_logp * (tl.where(cols == t, 1.0, 0.0) - p) - g_ent * dent - g_cent * dcent) * inv_temp
        dz = tl.where(valid, tl.where(bad, float("nan"), dz), 0.0)
        tl.store(dx_ptr + dx_row_off + cols, dz.to(dx_ptr.dtype.element_ty), mask=cols < V)


def n_removed(V, clamp_fraction):
    """k = floor(p V), the entries each row drops (float64, as Python's int(p * V))."""
    return int(clamp_fraction * V)


def clamped_fwd(logits, targets, inv_temp, ignore_index, clamp_fraction):
    """Forward launcher. Returns (logp, entropy, lse, sum_p2, sum_p2_logp, lse_lo, clamped_entropy, lse_kept,
    lse_kept_lo, thr, n_tie): the first nine of targets' shape in acc_dtype(logits) (the *_lo are rounding
    errors of the lse's, for the backward); thr, n_tie int64 (the kept set, for the backward)."""
    x, N, V, inner, stride_outer, stride_inner = row_layout(logits)
    t = targets.reshape(-1).contiguous()  # the kernels index targets by row: stride 1
    acc = acc_dtype(logits.dtype)
    block_v, num_warps = pick_block(V, logits.element_size())
    outs = [torch.empty(targets.shape, dtype=acc, device=logits.device) for _ in range(9)]
    thr, n_tie = (torch.empty(targets.shape, dtype=torch.int64, device=logits.device) for _ in range(2))
    bits = 8 * logits.element_size()
    if N > 0:
        _threshold_kernel[(N,)](x, t, thr, n_tie, V, inner, stride_outer, stride_inner,
                                n_removed(V, clamp_fraction), ignore_index, BLOCK_V=block_v,
                                INT=_INT[logits.dtype], BITS=bits, num_warps=num_warps)
        _fwd_clamped_kernel[(N,)](x, t, thr, n_tie, *outs, V, inner, stride_outer, stride_inner, inv_temp,
                                  ignore_index, BLOCK_V=block_v, ACC=_TL_DTYPE[acc], INT=_INT[logits.dtype],
                                  BITS=bits, num_warps=num_warps)
    return (*outs, thr, n_tie)


def clamped_bwd(logits, targets, thr, n_tie, lse, lse_lo, entropy, lse_kept, lse_kept_lo, clamped_entropy, grad_logp,
                grad_entropy, grad_clamped, inv_temp, ignore_index, clamp_fraction, out):
    """Backward launcher: writes dz of (logp, entropy, clamped_entropy) into `out` (may be `logits`).
    clamp_fraction is part of the shared launcher interface; here thr and n_tie already encode K."""
    x, N, V, inner, stride_outer, stride_inner = row_layout(logits)
    dx, _, _, _, dx_stride_outer, dx_stride_inner = row_layout(out, inner)
    acc = acc_dtype(logits.dtype)
    block_v, num_warps = pick_block(V, logits.element_size())
    grads = [g.reshape(-1).to(acc).contiguous() for g in (grad_logp, grad_entropy, grad_clamped)]
    if N > 0:
        _bwd_clamped_kernel[(N,)](x, targets.reshape(-1).contiguous(), thr, n_tie, lse, lse_lo, entropy, lse_kept, lse_kept_lo,
                                  clamped_entropy,
                                  *grads, dx, V, inner, stride_outer, stride_inner, dx_stride_outer,
                                  dx_stride_inner, inv_temp, ignore_index, BLOCK_V=block_v, ACC=_TL_DTYPE[acc],
                                  INT=_INT[logits.dtype], BITS=8 * logits.element_size(), num_warps=num_warps)
    return out
