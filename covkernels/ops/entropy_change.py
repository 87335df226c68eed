"""Triton kernel of the entropy change under a logit update (SPEC section 4, last bullet), and its launcher.

One program per row reads logits_before and logits_after once each. In log2 units, with scale =
log2(e) / T and the running max m of each tensor's raw row (reference r = m * scale), every element
gives u = x * scale - r and e = 2^u = e^(z - max z), z = x / T; so the temperature scales differences
from the max and costs no accuracy. Per lane ([BLOCK_V] fp32 vectors, summed once at the end of the row):
  before:  l = sum e,  s = sum e u,  U = sum e d,  W = sum e u d,   d = x_after - x_before
  after:   l', s' (the same first two of logits_after)
Then H = ln 2 (log2 l - s / l) and -Cov_p(log p, dz) = -(ln 2)^2 scale (W / l - (s / l)(U / l)), since
log p = u ln 2 up to a constant per row (which a covariance ignores) and dz = d scale ln 2.
The row's block maxima, one reduction per block, decide the rare rescales; every other step is per lane.
"""
import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# 2048 columns of 4 warps: 16 elements per thread of each input (64 bytes of bf16 in flight per thread, as
# the fused pass's 32 of one input), spill-free for sm_90 with the six fp32 lane accumulators.
_MAX_BLOCK = 2048
NUM_WARPS = 4


@triton.jit
def _entropy_log2(l, s):
    # H = ln l - sum e (z - m) / l, in nats; >= 0 (rounding clamped; where() keeps a NaN).
    h = 0.6931471805599453 * (tl.log2(l) - s / l)
    return tl.where(h < 0, 0.0, h)


@triton.jit
def _entropy_change_kernel(b_ptr, a_ptr, mask_ptr, pred_ptr, act_ptr, V, inner, stride_b_outer, stride_b_inner,
                           stride_a_outer, stride_a_inner, scale, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b_row = b_ptr + (row // inner) * stride_b_outer + (row % inner) * stride_b_inner
    a_row = a_ptr + (row // inner) * stride_a_outer + (row % inner) * stride_a_inner
    valid = tl.load(mask_ptr + row) != 0
    # A row outside the mask has an empty column range: it is never read.
    col_end = tl.where(valid, V, 0)
    offs_v = tl.arange(0, BLOCK_V)
    m_b = tl.full([], float("-inf"), tl.float32)
    m_a = tl.full([], float("-inf"), tl.float32)
    # The references stay 0 while only -inf was seen: r = m * scale = -inf would make every u infinite.
    r_b = tl.full([], 0.0, tl.float32)
    r_a = tl.full([], 0.0, tl.float32)
    l_b = tl.zeros([BLOCK_V], tl.float32)
    s_b = tl.zeros([BLOCK_V], tl.float32)
    d_b = tl.zeros([BLOCK_V], tl.float32)
    w_b = tl.zeros([BLOCK_V], tl.float32)
    l_a = tl.zeros([BLOCK_V], tl.float32)
    s_a = tl.zeros([BLOCK_V], tl.float32)
    # A while loop: Triton 3.6's interpreter rejects range() bounds computed in the kernel.
    start = 0
    while start < col_end:
        cols = start + offs_v
        mask_v = cols < col_end
        xb = tl.load(b_row + cols, mask=mask_v, other=float("-inf")).to(tl.float32)
        xa = tl.load(a_row + cols, mask=mask_v, other=float("-inf")).to(tl.float32)
        blk_b = tl.max(xb, axis=0)
        blk_a = tl.max(xa, axis=0)
        if blk_b > m_b:
            # Moving the reference by c = r_old - r_new < 0 (log2 units): e -> 2^c e and u -> u + c, so
            # s -> 2^c (s + c l) and W -> 2^c (W + c U). Nothing accumulated yet (m = -inf): c = 0.
            r_new = blk_b * scale
            c = tl.where(m_b == float("-inf"), 0.0, r_b - r_new)
            f = tl.exp2(c)
            s_b = f * (s_b + c * l_b)
            w_b = f * (w_b + c * d_b)
            l_b = f * l_b
            d_b = f * d_b
            m_b = blk_b
            r_b = r_new
        if blk_a > m_a:
            r_new = blk_a * scale
            c = tl.where(m_a == float("-inf"), 0.0, r_a - r_new)
            f = tl.exp2(c)
            s_a = f * (s_a + c * l_a)
            l_a = f * l_a
            m_a = blk_a
            r_a = r_new
        # -inf entries become -1e20 (NaN stays NaN): then 2^u = 0, and u 2^u, d 2^u and d u 2^u are 0 rather
        # than -inf * 0, also where before and after are both -inf (d would be -inf + inf) or where an
        # entry of p = 0 becomes finite (its d does not count). The maxima above are of the raw logits, so
        # a reference never rests on such an entry.
        xb = tl.maximum(xb, -1e20, propagate_nan=tl.PropagateNan.ALL)
        xa = tl.maximum(xa, -1e20, propagate_nan=tl.PropagateNan.ALL)
        u_b = tl.fma(xb, scale, -r_b)
        e_b = tl.exp2(u_b)
        # d in raw logit units: the scale multiplies the covariance once, at the end.
        ed = e_b * (xa - xb)
        l_b += e_b
        s_b += e_b * u_b
        d_b += ed
        w_b += ed * u_b
        u_a = tl.fma(xa, scale, -r_a)
        e_a = tl.exp2(u_a)
        l_a += e_a
        s_a += e_a * u_a
        start += BLOCK_V
    # An unread row has l = 0: 1 keeps its arithmetic finite; it stores 0.
    l = tl.where(valid, tl.sum(l_b, axis=0), 1.0)
    sum_u = tl.sum(s_b, axis=0)
    cov = tl.sum(w_b, axis=0) / l - (sum_u / l) * (tl.sum(d_b, axis=0) / l)
    predicted = -0.4804530139182014 * scale * cov  # (ln 2)^2, and d back to log2 units
    h_b = _entropy_log2(l, sum_u)
    h_a = _entropy_log2(tl.where(valid, tl.sum(l_a, axis=0), 1.0), tl.sum(s_a, axis=0))
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
    block = min(triton.next_power_of_2(V), _MAX_BLOCK)
    _entropy_change_kernel[(N,)](xb, xa, row_mask.reshape(-1).contiguous(), predicted, actual, V, xb.shape[1],
                                 xb.stride(0), xb.stride(1), xa.stride(0), xa.stride(1), LOG2E / temperature,
                                 BLOCK_V=block, num_warps=NUM_WARPS)
    return predicted, actual
