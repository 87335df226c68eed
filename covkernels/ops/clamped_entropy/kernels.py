"""Triton kernels of the clamped (AEnt) entropy, fused with the plain pass
(docs/aent.md#how-the-kernels-compute-it), and launchers.

The kept set K of a row drops its k = floor(p V) smallest logits, equal logits by lowest index first. One
program per row makes three kinds of passes over it, close together in time so that the later ones find
the row in L2:
1. Radix select of tau, the (k+1)-th smallest logit, over order-preserving integer keys (select.py: 8 bits
   a pass, bf16 2 passes, fp16 3, fp32 4; 4 bits under Triton < 3.8), each a histogram of one digit; the
   first pass also finds the row max. n_tie entries equal to tau are dropped (the first n_tie in column
   order).
2. Only when n_tie > 0: a scan for `cut`, the column of the first KEPT entry equal to tau. Then an entry
   is kept iff x > tau, or x == tau at a column >= cut: in a block wholly before `cut` that is x >= tau+
   (the next float above tau), wholly after it x >= tau, one compare per entry.
3. One read accumulates the plain sums and those over K together, both relative to the row max's
   reference r (the max is always kept, k < V), so H~ = (L_K - s1_K / l_K) ln 2 comes from the same e.
The backward reads each row once: p~ = p 2^(L - L_K) on K, so the clamped term costs no second exp.
"""
import torch
import triton
import triton.language as tl

from ..common.layout import new_outputs, read_in_pairs, row_layout, scale_args
from ..common.rowmath import (LN2, MODE_CLAMP, MODE_FAST, MODE_SAFE, finish_row, grad_coeffs, load_halves,
                              overflows, row_offset, scaled, softmax_grad)
from .select import DIGIT_BITS, find_cut, passes, select_tau

# Programs of several warps (few rows in flight at once, so a row is still in L2 at its later passes).
_NUM_WARPS = 8
_BLOCK_BYTES = 16384


@triton.jit
def _next_up(x):
    """The smallest fp32 above x (x not NaN or +inf)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits + 1, bits - 1).to(x.dtype, bitcast=True)


@triton.jit
def _kept(x, cols, thr, tau, cut, PER_COLUMN: tl.constexpr):
    """K's mask of entries x at columns `cols`: x >= thr in a block wholly before or after `cut` (thr = tau+
    or tau), the rule itself in the block that holds it."""
    if PER_COLUMN:
        return (x > tau) | ((x == tau) & (cols >= cut))
    return x >= thr


@triton.jit
def _add_kept(x, kept, scale, m, r, l, s1, q, q1, lk, s1k, MODE: tl.constexpr, MASKED: tl.constexpr,
              STATS: tl.constexpr):
    u = scaled(x, scale, m, r, MODE, MASKED)
    e = tl.exp2(u)
    l += e
    s1 = tl.fma(e, u, s1)
    # Written as selects of the updated sums so that they compile to predicated adds.
    lk = tl.where(kept, lk + e, lk)
    s1k = tl.where(kept, tl.fma(e, u, s1k), s1k)
    if STATS:
        e2 = e * e
        q += e2
        q1 = tl.fma(e2, u, q1)
    return l, s1, q, q1, lk, s1k


@triton.jit
def _add_kept_block(x_row, start, V, scale, m, r, thr, tau, cut, l, s1, q, q1, lk, s1k, PER_COLUMN: tl.constexpr,
                    MODE: tl.constexpr, STATS: tl.constexpr, PAIRS: tl.constexpr):
    """One block's entries added to the sums; PER_COLUMN blocks (the one holding `cut`, the ragged end) are
    masked and test K column by column."""
    HALF: tl.constexpr = l.shape[0]
    even, odd = load_halves(x_row, start, V, 2 * HALF, PER_COLUMN, PAIRS)
    cols = start + 2 * tl.arange(0, HALF)
    k_even = _kept(even, cols, thr, tau, cut, PER_COLUMN)
    k_odd = _kept(odd, cols + 1, thr, tau, cut, PER_COLUMN)
    l, s1, q, q1, lk, s1k = _add_kept(even, k_even, scale, m, r, l, s1, q, q1, lk, s1k, MODE, PER_COLUMN, STATS)
    return _add_kept(odd, k_odd, scale, m, r, l, s1, q, q1, lk, s1k, MODE, PER_COLUMN, STATS)


@triton.jit
def _kept_sums(x_row, V, scale, m, tau, cut, BLOCK_V: tl.constexpr, MODE: tl.constexpr, STATS: tl.constexpr,
               PAIRS: tl.constexpr):
    """(l, s1, q, q1, l_K, s1_K) of one row relative to the fixed reference of its max m (base 2, rowmath.py)."""
    HALF: tl.constexpr = BLOCK_V // 2
    r = m * scale
    zero = tl.zeros([HALF], tl.float32)
    l, s1, q, q1, lk, s1k = zero, zero, zero, zero, zero, zero
    tau_up = _next_up(tau)
    # Whole blocks before the one holding `cut` keep x > tau, whole blocks after it x >= tau.
    start = 0
    while start + BLOCK_V <= tl.minimum(cut, V):
        l, s1, q, q1, lk, s1k = _add_kept_block(x_row, start, V, scale, m, r, tau_up, tau, cut, l, s1, q, q1, lk, s1k,
                                                False, MODE, STATS, PAIRS)
        start += BLOCK_V
    if (start < cut) & (start + BLOCK_V <= V):
        l, s1, q, q1, lk, s1k = _add_kept_block(x_row, start, V, scale, m, r, tau, tau, cut, l, s1, q, q1, lk, s1k,
                                                True, MODE, STATS, PAIRS)
        start += BLOCK_V
    while start + BLOCK_V <= V:
        l, s1, q, q1, lk, s1k = _add_kept_block(x_row, start, V, scale, m, r, tau, tau, cut, l, s1, q, q1, lk, s1k,
                                                False, MODE, STATS, PAIRS)
        start += BLOCK_V
    if start < V:
        l, s1, q, q1, lk, s1k = _add_kept_block(x_row, start, V, scale, m, r, tau, tau, cut, l, s1, q, q1, lk, s1k,
                                                True, MODE, STATS, PAIRS)
    return (tl.sum(l, axis=0), tl.sum(s1, axis=0), tl.sum(q, axis=0), tl.sum(q1, axis=0), tl.sum(lk, axis=0),
            tl.sum(s1k, axis=0))


@triton.jit
def _fwd_clamped_kernel(x_ptr, t_ptr, logp_ptr, ent_ptr, lse_ptr, s2_ptr, s3_ptr, lse2_ptr, cent_ptr, state_ptr,
                        N, V, inner, stride_outer, stride_inner, k, scale, inv_temp, ignore_index,
                        BLOCK_V: tl.constexpr, STATS: tl.constexpr, PAIRS: tl.constexpr, PASSES: tl.constexpr,
                        DIGIT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row_offset(row, inner, stride_outer, stride_inner)
    t = tl.load(t_ptr + row).to(tl.int64)
    valid = t != ignore_index
    n = tl.where(valid, V, 0)  # ignored rows: nothing is read
    tau, n_tie, m = select_tau(x_row, n, k, BLOCK_V, PAIRS, PASSES, DIGIT)
    cut = find_cut(x_row, n, tau, n_tie, BLOCK_V)
    l, s1, q, q1, lk, s1k = _kept_sums(x_row, n, scale, m, tau, cut, BLOCK_V, MODE_FAST, STATS, PAIRS)
    poisoned = s1 + q1 + s1k
    # Read again in safe mode where m * scale overflows, clamped where a -inf entry met a zero weight.
    if overflows(m, m * scale):
        l, s1, q, q1, lk, s1k = _kept_sums_again(x_row, n, scale, m, tau, cut, BLOCK_V, MODE_SAFE, STATS, PAIRS)
    elif (poisoned != poisoned) & (l == l):
        l, s1, q, q1, lk, s1k = _kept_sums_again(x_row, n, scale, m, tau, cut, BLOCK_V, MODE_CLAMP, STATS, PAIRS)
    bad = valid & ((t < 0) | (t >= V))
    x_t = tl.load(x_row + t, mask=valid & ~bad, other=0.0).to(tl.float32)
    finish_row(row, valid, bad, x_t, m, l, s1, q, q1, scale, inv_temp, logp_ptr, ent_ptr, lse_ptr, s2_ptr, s3_ptr,
               lse2_ptr, N, STATS)
    keep = valid & ~bad
    lk = tl.where(valid, lk, 1.0)
    big_lk = tl.log2(lk)
    cent = (big_lk - s1k / lk) * LN2
    poison = tl.where(bad, float("nan"), 0.0)
    tl.store(cent_ptr + row, tl.where(keep, tl.where(cent < 0, 0.0, cent), 0.0) + poison)
    # [3, N] what the backward needs of K: L_K, tau and cut (an int < 2^24, exact in fp32).
    tl.store(state_ptr + row, tl.where(keep, big_lk, 0.0) + poison)
    tl.store(state_ptr + N + row, tau)
    tl.store(state_ptr + 2 * N + row, cut.to(tl.float32))


@triton.jit
def _store_clamped_grad(dx_row, start, V, x_row, scale, m, r, big_l, thr, tau, cut, coef_a, coef_b, kept_a, kept_b,
                        BLOCK_V: tl.constexpr, PER_COLUMN: tl.constexpr, SAFE: tl.constexpr, PAIRS: tl.constexpr):
    HALF: tl.constexpr = BLOCK_V // 2
    cols = start + tl.arange(0, BLOCK_V)
    even, odd = load_halves(x_row, start, V, BLOCK_V, PER_COLUMN, PAIRS)
    half_cols = start + 2 * tl.arange(0, HALF)
    k_even = _kept(even, half_cols, thr, tau, cut, PER_COLUMN)
    k_odd = _kept(odd, half_cols + 1, thr, tau, cut, PER_COLUMN)
    # On K the coefficients (kept_a, kept_b) add the clamped entropy's term (see _bwd_clamped_kernel).
    dz = tl.join(softmax_grad(even, scale, m, r, big_l, tl.where(k_even, kept_a, coef_a),
                              tl.where(k_even, kept_b, coef_b), SAFE),
                 softmax_grad(odd, scale, m, r, big_l, tl.where(k_odd, kept_a, coef_a),
                              tl.where(k_odd, kept_b, coef_b), SAFE))
    dz = tl.reshape(dz, [BLOCK_V]).to(dx_row.dtype.element_ty)
    if PER_COLUMN:
        tl.store(dx_row + cols, dz, mask=cols < V)
    else:
        tl.store(dx_row + cols, dz)


@triton.jit
def _store_clamped_grads(dx_row, V, x_row, scale, m, big_l, tau, cut, coef_a, coef_b, kept_a, kept_b,
                         BLOCK_V: tl.constexpr, SAFE: tl.constexpr, PAIRS: tl.constexpr):
    """A row's gradient, block by block as in _kept_sums: x > tau before the block holding `cut`, x >= tau
    after it, the rule column by column in that block and the ragged end."""
    r = m * scale
    tau_up = _next_up(tau)
    start = 0
    while start + BLOCK_V <= tl.minimum(cut, V):
        _store_clamped_grad(dx_row, start, V, x_row, scale, m, r, big_l, tau_up, tau, cut, coef_a, coef_b, kept_a,
                            kept_b, BLOCK_V, False, SAFE, PAIRS)
        start += BLOCK_V
    if (start < cut) & (start + BLOCK_V <= V):
        _store_clamped_grad(dx_row, start, V, x_row, scale, m, r, big_l, tau, tau, cut, coef_a, coef_b, kept_a,
                            kept_b, BLOCK_V, True, SAFE, PAIRS)
        start += BLOCK_V
    while start + BLOCK_V <= V:
        _store_clamped_grad(dx_row, start, V, x_row, scale, m, r, big_l, tau, tau, cut, coef_a, coef_b, kept_a,
                            kept_b, BLOCK_V, False, SAFE, PAIRS)
        start += BLOCK_V
    if start < V:
        _store_clamped_grad(dx_row, start, V, x_row, scale, m, r, big_l, tau, tau, cut, coef_a, coef_b, kept_a,
                            kept_b, BLOCK_V, True, SAFE, PAIRS)


@triton.jit(noinline=True)
def _store_clamped_grads_safe(dx_row, V, x_row, scale, m, big_l, tau, cut, coef_a, coef_b, kept_a, kept_b,
                              BLOCK_V: tl.constexpr, PAIRS: tl.constexpr):
    """_store_clamped_grads of a safe-mode row, a function of its own (rare; see rowmath.row_sums_again)."""
    _store_clamped_grads(dx_row, V, x_row, scale, m, big_l, tau, cut, coef_a, coef_b, kept_a, kept_b, BLOCK_V, True,
                         PAIRS)


@triton.jit(noinline=True)
def _kept_sums_again(x_row, V, scale, m, tau, cut, BLOCK_V: tl.constexpr, MODE: tl.constexpr, STATS: tl.constexpr,
                     PAIRS: tl.constexpr):
    """_kept_sums for the rare second read (see rowmath.row_sums_again)."""
    return _kept_sums(x_row, V, scale, m, tau, cut, BLOCK_V, MODE, STATS, PAIRS)


@triton.jit
def _bwd_clamped_kernel(x_ptr, t_ptr, lse2_ptr, ent_ptr, cent_ptr, state_ptr, glogp_ptr, gent_ptr, gcent_ptr, dx_ptr,
                        N, V, inner, stride_outer, stride_inner, dx_stride_outer, dx_stride_inner, scale, inv_temp,
                        ignore_index, BLOCK_V: tl.constexpr, PAIRS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row_offset(row, inner, stride_outer, stride_inner)
    dx_row = dx_ptr + row_offset(row, inner, dx_stride_outer, dx_stride_inner)
    t = tl.load(t_ptr + row).to(tl.int64)
    if t != ignore_index:
        m = tl.load(lse2_ptr + row)
        big_l = tl.load(lse2_ptr + N + row)
        big_lk = tl.load(state_ptr + row)
        tau = tl.load(state_ptr + N + row)
        cut = tl.load(state_ptr + 2 * N + row).to(tl.int32)
        g_logp = tl.load(glogp_ptr + row)
        coef_a, coef_b = grad_coeffs(g_logp, tl.load(gent_ptr + row), tl.load(ent_ptr + row), inv_temp)
        # On K, p~ = p 2^(L - L_K) and log2 p~ = log2 p + (L - L_K): the clamped term in the same (a, b) form.
        k_a, k_b = grad_coeffs(0.0, tl.load(gcent_ptr + row), tl.load(cent_ptr + row), inv_temp)
        shift = big_l - big_lk
        ratio = tl.exp2(shift)
        kept_a = coef_a + ratio * tl.fma(k_b, shift, k_a)
        kept_b = coef_b + ratio * k_b
        # A target outside [0, V) (validate=False) has NaN outputs: its gradient is NaN too.
        bad = (t < 0) | (t >= V)
        coef_a = tl.where(bad, float("nan"), coef_a)
        kept_a = tl.where(bad, float("nan"), kept_a)
        x_t = tl.load(x_row + t, mask=~bad, other=0.0).to(tl.float32)
        safe = overflows(m, m * scale)
        if safe:
            _store_clamped_grads_safe(dx_row, V, x_row, scale, m, big_l, tau, cut, coef_a, coef_b, kept_a, kept_b,
                                      BLOCK_V, PAIRS)
        else:
            _store_clamped_grads(dx_row, V, x_row, scale, m, big_l, tau, cut, coef_a, coef_b, kept_a, kept_b,
                                 BLOCK_V, False, PAIRS)
        if not bad:
            tl.debug_barrier()  # the loop's store of the target's column lands first
            kept_t = (x_t > tau) | ((x_t == tau) & (t >= cut))
            a_t = tl.where(kept_t, kept_a, coef_a)
            b_t = tl.where(kept_t, kept_b, coef_b)
            r = m * scale
            p_t = tl.where(safe, softmax_grad(x_t, scale, m, r, big_l, a_t, b_t, True),
                           softmax_grad(x_t, scale, m, r, big_l, a_t, b_t, False))
            tl.store(dx_row + t, (p_t + g_logp * inv_temp).to(dx_ptr.dtype.element_ty))
    else:
        offs = tl.arange(0, BLOCK_V)
        zeros = tl.zeros([BLOCK_V], dx_ptr.dtype.element_ty)
        start = 0
        while start < V:
            tl.store(dx_row + start + offs, zeros, mask=start + offs < V)
            start += BLOCK_V


def n_removed(V, clamp_fraction):
    """k = floor(p V), the entries each row drops (float64, as Python's int(p * V))."""
    return int(clamp_fraction * V)


def _kernel_args(logits, x, V, stride_outer, stride_inner):
    """(the keyword arguments both kernels take, those only the forward takes)."""
    block = min(triton.next_power_of_2(max(V, 2)), _BLOCK_BYTES // logits.element_size())
    shared = dict(BLOCK_V=block, PAIRS=read_in_pairs(x, V, stride_outer, stride_inner),
                  num_warps=_NUM_WARPS)
    return shared, dict(PASSES=passes(logits.dtype, DIGIT_BITS), DIGIT=DIGIT_BITS)


def clamped_fwd(logits, targets, inv_temp, ignore_index, clamp_fraction, stats):
    """Forward launcher. Returns (logp, entropy, lse, sum_p2, sum_p2_logp, lse2, clamped_entropy, state): the
    fused pass's outputs as fused_pass.fused_fwd, clamped_entropy [...] and state [3, ...] (L_K, tau, cut: the
    kept set, for the backward), fp32."""
    x, N, V, inner, stride_outer, stride_inner = row_layout(logits)
    kw, fwd_kw = _kernel_args(logits, x, V, stride_outer, stride_inner)
    outs = new_outputs(targets, torch.float32, stats)
    logp, ent, lse, s2, s3 = (o.view(-1) for o in outs[:5])
    if not stats:
        s2 = s3 = lse  # never written: STATS is off
    cent = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
    state = torch.empty((3, *targets.shape), dtype=torch.float32, device=logits.device)
    if N > 0:
        scale, inv_temp = scale_args(inv_temp)
        _fwd_clamped_kernel[(N,)](x, targets.reshape(-1).contiguous(), logp, ent, lse, s2, s3, outs[5], cent, state,
                                  N, V, inner, stride_outer, stride_inner, n_removed(V, clamp_fraction), scale,
                                  inv_temp, ignore_index, STATS=stats, **kw, **fwd_kw)
    return (*outs, cent, state)


def clamped_bwd(logits, targets, lse2, entropy, clamped_entropy, state, grad_logp, grad_entropy, grad_clamped,
                inv_temp, ignore_index, out):
    """Backward launcher: writes dz of (logp, entropy, clamped_entropy) into `out` (may be `logits`)."""
    x, N, V, inner, stride_outer, stride_inner = row_layout(logits)
    dx, _, _, _, dx_stride_outer, dx_stride_inner = row_layout(out, inner)
    kw, _ = _kernel_args(logits, x, V, stride_outer, stride_inner)
    grads = [g.reshape(-1).to(torch.float32).contiguous() for g in (grad_logp, grad_entropy, grad_clamped)]
    if N > 0:
        scale, inv_temp = scale_args(inv_temp)
        _bwd_clamped_kernel[(N,)](x, targets.reshape(-1).contiguous(), lse2, entropy, clamped_entropy, state, *grads,
                                  dx, N, V, inner, stride_outer, stride_inner, dx_stride_outer, dx_stride_inner,
                                  scale, inv_temp, ignore_index, **kw)
    if dx is not out:
        out.copy_(dx)
    return out
