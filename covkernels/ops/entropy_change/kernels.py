"""Triton kernel of the entropy change under a logit update (docs/entropy_dynamics.md#any-logit-update), and
its launcher.

One program per row reads logits_before and logits_after once each. In log2 units, with scale =
log2(e) / T and the running max m of each tensor's raw row (reference r = m * scale), every element
gives u = x * scale - r and e = 2^u = e^(z - max z), z = x / T; so the temperature scales differences
from the max and costs no accuracy. Per element ([BLOCK_V // 2] fp32 vectors of even and odd columns, as
rowmath.py; summed once at the end of the row):
  before:  l = sum e,  s = sum e u,  U = sum e d,  W = sum e u d,   d = x_after - x_before
  after:   l', s' (the same first two of logits_after)
Then H = ln 2 (log2 l - s / l) and -Cov_p(log p, dz) = -(ln 2)^2 scale (W / l - (s / l)(U / l)), since
log p = u ln 2 up to a constant per row (which a covariance ignores) and dz = d scale ln 2.
The row's block maxima, one reduction per block, decide the rare rescales; every other step is per element.
-inf entries cost nothing on the hot path: a row whose sums come out NaN or infinite is read again with the
logits clamped (rowmath.py's scheme).
"""
import torch
import triton
import triton.language as tl

from ..common.layout import pick_block, read_in_pairs
from ..common.rowmath import LN2, U_FLOOR, load_halves, overflows, row_offset

LOG2E = 1.4426950408889634
# Raw logits are clamped here on the second, careful read: 2^u = 0 and every product finite (see below).
_X_FLOOR = tl.constexpr(-1e20)


@triton.jit
def _entropy_log2(l, s):
    # H = ln l - sum e (z - m) / l, in nats; >= 0 (rounding clamped; where() keeps a NaN).
    h = LN2 * (tl.log2(l) - s / l)
    return tl.where(h < 0, 0.0, h)


@triton.jit
def _shift(m_old, m_new, scale, CAREFUL: tl.constexpr):
    """d = r_old - r_new <= 0 when a max rises (log2 units), U_FLOOR while nothing was accumulated."""
    if CAREFUL:
        d = (m_old - m_new) * scale
    else:
        d = m_old * scale - m_new * scale
    return tl.where(m_old == float("-inf"), U_FLOOR, tl.maximum(d, U_FLOOR))


@triton.jit
def _u(x, scale, m, r, CAREFUL: tl.constexpr):
    # Careful: from the max itself, (x - m) * scale (rowmath's safe mode), floored (it may overflow to -inf).
    if CAREFUL:
        return tl.maximum((x - tl.where(m == float("-inf"), 0.0, m)) * scale, U_FLOOR,
                          propagate_nan=tl.PropagateNan.ALL)
    return tl.fma(x, scale, -r)


@triton.jit
def _add_entries(xb, xa, scale, m_b, m_a, r_b, r_a, l_b, s_b, d_b, w_b, l_a, s_a, CLAMP: tl.constexpr,
                 CAREFUL: tl.constexpr):
    if CLAMP or CAREFUL:
        # -inf entries become -1e20 (NaN stays NaN): then 2^u = 0, and u 2^u, d 2^u and d u 2^u are 0 rather
        # than -inf * 0, also where before and after are both -inf (d would be -inf + inf) or where an entry of
        # p = 0 becomes finite (its d does not count). The maxima are of the raw logits, so a reference never
        # rests on such an entry.
        xb = tl.maximum(xb, _X_FLOOR, propagate_nan=tl.PropagateNan.ALL)
        xa = tl.maximum(xa, _X_FLOOR, propagate_nan=tl.PropagateNan.ALL)
    u_b = _u(xb, scale, m_b, r_b, CAREFUL)
    e_b = tl.exp2(u_b)
    # d in raw logit units: the scale multiplies the covariance once, at the end.
    ed = e_b * (xa - xb)
    l_b += e_b
    s_b = tl.fma(e_b, u_b, s_b)
    d_b += ed
    w_b = tl.fma(ed, u_b, w_b)
    u_a = _u(xa, scale, m_a, r_a, CAREFUL)
    e_a = tl.exp2(u_a)
    l_a += e_a
    s_a = tl.fma(e_a, u_a, s_a)
    return l_b, s_b, d_b, w_b, l_a, s_a


@triton.jit
def _add_block(b_row, a_row, start, end, scale, m_b, m_a, l_b, s_b, d_b, w_b, l_a, s_a, BLOCK_V: tl.constexpr,
               MASKED: tl.constexpr, CAREFUL: tl.constexpr, PAIRS: tl.constexpr):
    even_b, odd_b = load_halves(b_row, start, end, BLOCK_V, MASKED, PAIRS)
    even_a, odd_a = load_halves(a_row, start, end, BLOCK_V, MASKED, PAIRS)
    blk_b = tl.max(tl.maximum(even_b, odd_b), axis=0)
    blk_a = tl.max(tl.maximum(even_a, odd_a), axis=0)
    if blk_b > m_b:
        # Moving the reference by c = r_old - r_new < 0: e -> 2^c e and u -> u + c, so s -> 2^c (s + c l)
        # and W -> 2^c (W + c U) (rowmath.rescale, with U and W beside l and s).
        c = _shift(m_b, blk_b, scale, CAREFUL)
        f = tl.exp2(c)
        s_b = f * tl.fma(c, l_b, s_b)
        w_b = f * tl.fma(c, d_b, w_b)
        l_b = f * l_b
        d_b = f * d_b
        m_b = blk_b
    if blk_a > m_a:
        c = _shift(m_a, blk_a, scale, CAREFUL)
        f = tl.exp2(c)
        s_a = f * tl.fma(c, l_a, s_a)
        l_a = f * l_a
        m_a = blk_a
    # The references stay 0 while only -inf was seen: r = m * scale = -inf would make every u infinite.
    r_b = tl.where(m_b == float("-inf"), 0.0, m_b * scale)
    r_a = tl.where(m_a == float("-inf"), 0.0, m_a * scale)
    l_b, s_b, d_b, w_b, l_a, s_a = _add_entries(even_b, even_a, scale, m_b, m_a, r_b, r_a, l_b, s_b, d_b, w_b, l_a,
                                                s_a, MASKED, CAREFUL)
    l_b, s_b, d_b, w_b, l_a, s_a = _add_entries(odd_b, odd_a, scale, m_b, m_a, r_b, r_a, l_b, s_b, d_b, w_b, l_a,
                                                s_a, MASKED, CAREFUL)
    return m_b, m_a, l_b, s_b, d_b, w_b, l_a, s_a


@triton.jit
def _row_sums(b_row, a_row, col_end, scale, BLOCK_V: tl.constexpr, CAREFUL: tl.constexpr, PAIRS: tl.constexpr):
    """The maxima (m, m') and the sums of one row, reduced: (l, s, U, W) of logits_before and (l', s') of
    logits_after. CAREFUL clamps -inf entries and scales differences from the max (the rare second read)."""
    m_b = tl.full([], float("-inf"), tl.float32)
    m_a = tl.full([], float("-inf"), tl.float32)
    zero = tl.zeros([BLOCK_V // 2], tl.float32)
    l_b, s_b, d_b, w_b, l_a, s_a = zero, zero, zero, zero, zero, zero
    # A while loop: Triton 3.6's interpreter rejects range() bounds computed in the kernel.
    start = 0
    while start + BLOCK_V <= col_end:
        m_b, m_a, l_b, s_b, d_b, w_b, l_a, s_a = _add_block(b_row, a_row, start, col_end, scale, m_b, m_a, l_b, s_b,
                                                            d_b, w_b, l_a, s_a, BLOCK_V, False, CAREFUL, PAIRS)
        start += BLOCK_V
    if start < col_end:
        m_b, m_a, l_b, s_b, d_b, w_b, l_a, s_a = _add_block(b_row, a_row, start, col_end, scale, m_b, m_a, l_b, s_b,
                                                            d_b, w_b, l_a, s_a, BLOCK_V, True, CAREFUL, PAIRS)
    return (m_b, m_a, tl.sum(l_b, axis=0), tl.sum(s_b, axis=0), tl.sum(d_b, axis=0), tl.sum(w_b, axis=0),
            tl.sum(l_a, axis=0), tl.sum(s_a, axis=0))


@triton.jit(noinline=True)
def _row_sums_careful(b_row, a_row, col_end, scale, BLOCK_V: tl.constexpr, PAIRS: tl.constexpr):
    """The rare careful read, a function of its own (see rowmath.row_sums_again)."""
    return _row_sums(b_row, a_row, col_end, scale, BLOCK_V, True, PAIRS)


@triton.jit
def _entropy_change_kernel(b_ptr, a_ptr, mask_ptr, pred_ptr, act_ptr, V, inner, stride_b_outer, stride_b_inner,
                           stride_a_outer, stride_a_inner, scale, BLOCK_V: tl.constexpr, PAIRS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b_row = b_ptr + row_offset(row, inner, stride_b_outer, stride_b_inner)
    a_row = a_ptr + row_offset(row, inner, stride_a_outer, stride_a_inner)
    valid = tl.load(mask_ptr + row) != 0
    # A row outside the mask has an empty column range: it is never read.
    col_end = tl.where(valid, V, 0)
    m_b, m_a, l_b, s_b, d_b, w_b, l_a, s_a = _row_sums(b_row, a_row, col_end, scale, BLOCK_V, False, PAIRS)
    # A -inf entry (0 * -inf, or -inf - -inf) leaves the sums NaN or infinite where l and l' are numbers (a NaN
    # logit would make them NaN too); a max whose m * scale overflows leaves them NaN: read the row again,
    # carefully.
    sums = s_b + d_b + w_b + s_a
    poisoned = ((sums - sums) != 0) & ((l_b + l_a) - (l_b + l_a) == 0)
    if poisoned | overflows(m_b, m_b * scale) | overflows(m_a, m_a * scale):
        _, _, l_b, s_b, d_b, w_b, l_a, s_a = _row_sums_careful(b_row, a_row, col_end, scale, BLOCK_V, PAIRS)
    # An unread row has l = 0: 1 keeps its arithmetic finite; it stores 0.
    l = tl.where(valid, l_b, 1.0)
    cov = w_b / l - (s_b / l) * (d_b / l)
    predicted = -LN2 * LN2 * scale * cov  # d back to log2 units
    h_b = _entropy_log2(l, s_b)
    h_a = _entropy_log2(tl.where(valid, l_a, 1.0), s_a)
    tl.store(pred_ptr + row, tl.where(valid, predicted, 0.0))
    tl.store(act_ptr + row, tl.where(valid, h_a - h_b, 0.0))


def row_blocks_view(x):
    """x [..., V] as an [outer, inner, V] view (inner = the last leading dim), so that a slice such as
    logits[:, :-1] is read in place; a contiguous copy only when no such view exists (last dim strided,
    leading dims that do not merge)."""
    V = x.shape[-1]
    inner = x.shape[-2] if x.dim() > 1 else 1
    if x.stride(-1) != 1 and V > 1:
        x = x.contiguous()
    try:
        return x.view(-1, inner, V)
    except RuntimeError:
        return x.contiguous().view(-1, inner, V)


def entropy_change_fwd(logits_before, logits_after, row_mask, temperature):
    """Launcher: (predicted, actual), each [...] fp32 (rows' shape), from [..., V] logits of one shape and a
    bool row mask [...]. Extra memory: the two outputs."""
    V = logits_before.shape[-1]
    lead = logits_before.shape[:-1]
    N = lead.numel()
    predicted = torch.empty(lead, dtype=torch.float32, device=logits_before.device)
    actual = torch.empty(lead, dtype=torch.float32, device=logits_before.device)
    if N == 0:
        return predicted, actual
    xb, xa = row_blocks_view(logits_before), row_blocks_view(logits_after)
    block, num_warps = pick_block(V, logits_before.element_size())
    pairs = (read_in_pairs(xb, V, xb.stride(0), xb.stride(1)) and read_in_pairs(xa, V, xa.stride(0), xa.stride(1)))
    _entropy_change_kernel[(N,)](xb, xa, row_mask.reshape(-1).contiguous(), predicted, actual, V, xb.shape[1],
                                 xb.stride(0), xb.stride(1), xa.stride(0), xa.stride(1), LOG2E / temperature,
                                 BLOCK_V=block, PAIRS=pairs, num_warps=num_warps)
    return predicted, actual
