"""Triton row math shared by every kernel that streams logits (docs/fused_pass.md), in base 2.

With scale = log2(e) / T and m the running max of the RAW logits x, a row's reference is r = m * scale and
each entry contributes u = x * scale - r, computed as ONE fused multiply-add: x * scale is never rounded on
its own, so the temperature costs no accuracy (docs/numerics.md#temperature: the rounding of x / T would be up
to 2^-24 |x / T|, the fma's is 2^-24 |u|, small where it matters), and e = 2^u is one MUFU.EX2. The sums

    l = sum e,  s1 = sum e u,  q = sum e^2,  q1 = sum e^2 u

are the accumulators of docs/fused_pass.md#one-pass-the-accumulators in base 2 (z - mx = u ln 2). A row's
outputs and its backward need only (m, L = log2 l), the pair `lse2` that the forward keeps: log p_j =
(fma(x_j, scale, -r) - L) ln 2 with r = fl(m * scale) recomputed, and no rounding of lse on the way (an fp32
lse of logits in the hundreds would shift every log p by ~1e-5). A row whose m * scale overflows fp32
(|logits| near 3e38 at T < 1.44) is "safe mode" instead: u = (x - m) * scale, two instructions an entry,
chosen per row (MODE_SAFE).

Speed: the accumulators are per-element vectors, reduced once per row; the max is one scalar per block and
the accumulators are rescaled only in the rare blocks where it rises (a uniform branch). Entries equal to
-inf need u clamped (e = 0 with u = -inf would put 0 * -inf = NaN into s1); rather than clamp every
element, the streaming loop runs unclamped (MODE_FAST) and a row whose sums come out NaN while l does not
(a -inf met a zero weight, not a NaN logit) is accumulated again with the clamp (MODE_CLAMP): one more read
of such rows only, as for the rare safe-mode rows.
A block is loaded as [BLOCK_V] and split into even and odd entries, so each thread keeps half as many
accumulator registers for the same number of elements in flight.
"""
import triton
import triton.language as tl

LN2 = tl.constexpr(0.6931471805599453)
# u below this adds exactly 0 to every sum (2^-1000 flushes to 0) and keeps e * u finite.
U_FLOOR = tl.constexpr(-1000.0)
# How an entry's u is formed (see the module docstring).
MODE_FAST = tl.constexpr(0)
MODE_CLAMP = tl.constexpr(1)
MODE_SAFE = tl.constexpr(2)


@triton.jit
def row_offset(row, inner, stride_outer, stride_inner):
    """Element offset of row `row` (int64) of a tensor whose rows are (row // inner, row % inner)."""
    return (row // inner) * stride_outer + (row % inner) * stride_inner


@triton.jit
def load_halves(ptr, start, end, BLOCK_V: tl.constexpr, MASKED: tl.constexpr, PAIRS: tl.constexpr):
    """The entries ptr[start : start + BLOCK_V] as two fp32 [BLOCK_V // 2] tensors (even, odd columns); with
    MASKED, columns >= end are -inf (and are not read).

    PAIRS (bf16 rows at 4-byte aligned addresses, start and end even): each pair of entries is read as one
    32-bit word, whose halves become fp32 by one shift or one mask (the generic conversion takes two
    instructions for the upper half)."""
    HALF: tl.constexpr = BLOCK_V // 2
    if PAIRS:
        idx = start // 2 + tl.arange(0, HALF)
        words = ptr.to(tl.pointer_type(tl.uint32)) + idx
        if MASKED:
            w = tl.load(words, mask=2 * idx < end, other=0xFF80FF80)  # two bf16 -inf
        else:
            w = tl.load(words)
        return (w << 16).to(tl.float32, bitcast=True), (w & 0xFFFF0000).to(tl.float32, bitcast=True)
    cols = start + tl.arange(0, BLOCK_V)
    if MASKED:
        x = tl.load(ptr + cols, mask=cols < end, other=float("-inf"))
    else:
        x = tl.load(ptr + cols)
    even, odd = tl.split(tl.reshape(x, [HALF, 2]))
    return even.to(tl.float32), odd.to(tl.float32)


@triton.jit
def rescale(d, l, s1, q, q1, STATS: tl.constexpr):
    """The sums relative to a reference moved by d = r_old - r_new <= 0: l e^d, e^d (s1 + d l), ..."""
    a = tl.exp2(d)
    s1 = a * tl.fma(d, l, s1)
    l = a * l
    if STATS:
        a2 = a * a
        q1 = a2 * tl.fma(d, q, q1)
        q = a2 * q
    return l, s1, q, q1


@triton.jit
def overflows(m, r):
    """True for a row in safe mode: its max m is finite but r = m * scale is not."""
    return (tl.abs(r) == float("inf")) & (tl.abs(m) < float("inf"))


@triton.jit
def scaled(x, scale, m, r, MODE: tl.constexpr, MASKED: tl.constexpr):
    """u = x * scale - reference of entries x, the reference r = fl(m * scale) (exactly m * scale in MODE_SAFE);
    floored at U_FLOOR (NaN kept) except in MODE_FAST, and always in a MASKED block (its padding is -inf)."""
    if MODE == MODE_SAFE:
        u = (x - m) * scale
    else:
        u = tl.fma(x, scale, -r)
    if (MODE != MODE_FAST) or MASKED:
        u = tl.maximum(u, U_FLOOR, propagate_nan=tl.PropagateNan.ALL)
    return u


@triton.jit
def shift(m_old, m_new, scale, MODE: tl.constexpr):
    """d = reference(m_old) - reference(m_new) <= 0 when the max rises, U_FLOOR (sums vanish) from m_old = -inf."""
    if MODE == MODE_SAFE:
        d = (m_old - m_new) * scale
    else:
        d = m_old * scale - m_new * scale
    return tl.where(m_old == float("-inf"), U_FLOOR, tl.maximum(d, U_FLOOR))


@triton.jit
def add_entries(x, scale, m, r, l, s1, q, q1, MODE: tl.constexpr, MASKED: tl.constexpr, STATS: tl.constexpr):
    u = scaled(x, scale, m, r, MODE, MASKED)
    e = tl.exp2(u)
    l += e
    s1 = tl.fma(e, u, s1)
    if STATS:
        e2 = e * e
        q += e2
        q1 = tl.fma(e2, u, q1)
    return l, s1, q, q1


@triton.jit
def add_block(ptr, start, end, scale, m, l, s1, q, q1, MASKED: tl.constexpr, MODE: tl.constexpr,
              STATS: tl.constexpr, PAIRS: tl.constexpr):
    """Adds the entries ptr[start : start + BLOCK_V] to the running max m and per-element sums [BLOCK_V // 2]."""
    even, odd = load_halves(ptr, start, end, 2 * l.shape[0], MASKED, PAIRS)
    # max drops NaN (a NaN logit still reaches l through its own e).
    m_blk = tl.max(tl.maximum(even, odd), axis=0)
    if m_blk > m:
        l, s1, q, q1 = rescale(shift(m, m_blk, scale, MODE), l, s1, q, q1, STATS)
        m = m_blk
    # While only -inf was seen the reference stays 0: every e is 0 and every sum stays 0.
    r = tl.where(m == float("-inf"), 0.0, m * scale)
    l, s1, q, q1 = add_entries(even, scale, m, r, l, s1, q, q1, MODE, MASKED, STATS)
    l, s1, q, q1 = add_entries(odd, scale, m, r, l, s1, q, q1, MODE, MASKED, STATS)
    return m, l, s1, q, q1


@triton.jit
def row_sums(ptr, col_start, col_end, scale, BLOCK_V: tl.constexpr, MODE: tl.constexpr, STATS: tl.constexpr,
             PAIRS: tl.constexpr):
    """(m, l, s1, q, q1) of the entries ptr[col_start:col_end] (fp32 scalars; sums relative to the reference of
    m, the max). An empty range gives m = -inf and zero sums."""
    m = tl.full([], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_V // 2], tl.float32)
    s1 = tl.zeros([BLOCK_V // 2], tl.float32)
    q = tl.zeros([BLOCK_V // 2], tl.float32)
    q1 = tl.zeros([BLOCK_V // 2], tl.float32)
    # `while`, not `for ... in range(...)`: Triton 3.6's interpreter cannot take loop bounds computed in the
    # kernel.
    start = col_start
    while start + BLOCK_V <= col_end:
        m, l, s1, q, q1 = add_block(ptr, start, col_end, scale, m, l, s1, q, q1, False, MODE, STATS, PAIRS)
        start += BLOCK_V
    if start < col_end:
        m, l, s1, q, q1 = add_block(ptr, start, col_end, scale, m, l, s1, q, q1, True, MODE, STATS, PAIRS)
    return m, tl.sum(l, axis=0), tl.sum(s1, axis=0), tl.sum(q, axis=0), tl.sum(q1, axis=0)


@triton.jit(noinline=True)
def row_sums_again(ptr, col_start, col_end, scale, BLOCK_V: tl.constexpr, MODE: tl.constexpr, STATS: tl.constexpr,
                   PAIRS: tl.constexpr):
    """row_sums for the rare second read, as a function of its own: the kernel's machine code keeps only the
    common loop (and bench/sass.py counts that one)."""
    return row_sums(ptr, col_start, col_end, scale, BLOCK_V, MODE, STATS, PAIRS)


@triton.jit
def row_sums_safe(ptr, col_start, col_end, scale, BLOCK_V: tl.constexpr, STATS: tl.constexpr, PAIRS: tl.constexpr):
    """row_sums, read again in safe mode where m * scale overflows, or clamped where a -inf entry made the
    unclamped sums NaN."""
    m, l, s1, q, q1 = row_sums(ptr, col_start, col_end, scale, BLOCK_V, MODE_FAST, STATS, PAIRS)
    poisoned = s1 + q1
    if overflows(m, m * scale):
        m, l, s1, q, q1 = row_sums_again(ptr, col_start, col_end, scale, BLOCK_V, MODE_SAFE, STATS, PAIRS)
    elif (poisoned != poisoned) & (l == l):
        m, l, s1, q, q1 = row_sums_again(ptr, col_start, col_end, scale, BLOCK_V, MODE_CLAMP, STATS, PAIRS)
    return m, l, s1, q, q1


@triton.jit
def merge_sums(m, l, s1, q, q1, scale, STATS: tl.constexpr):
    """Sums of several parts (vectors, each relative to the reference of its own max m, -inf where a part saw
    nothing) combined relative to the largest: (m, l, s1, q, q1) scalars. A safe-mode row's parts are moved by
    (m_part - m) * scale (a fast-mode part's own rounding of m * scale is then below the row's precision)."""
    m_max = tl.max(m, axis=0)
    safe = overflows(m_max, m_max * scale)
    d = tl.where(safe, (m - m_max) * scale, m * scale - m_max * scale)
    d = tl.where(m == float("-inf"), U_FLOOR, tl.maximum(d, U_FLOOR))
    l, s1, q, q1 = rescale(d, l, s1, q, q1, STATS)
    return m_max, tl.sum(l, axis=0), tl.sum(s1, axis=0), tl.sum(q, axis=0), tl.sum(q1, axis=0)


@triton.jit
def merge_partials(part_ptr, row, n_rows, n_split, scale, BLOCK_S: tl.constexpr, STATS: tl.constexpr):
    """merge_sums of the n_split partial sums of one row that a split forward stored at part_ptr, planes
    (m, l, s1, q, q1) [5, n_rows, n_split] (planes past the fifth are the caller's)."""
    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < n_split
    part = part_ptr + row * n_split + offs_s  # [BLOCK_S]
    plane = n_rows * n_split
    return merge_sums(tl.load(part, mask=mask_s, other=float("-inf")),
                      tl.load(part + plane, mask=mask_s, other=0.0),
                      tl.load(part + 2 * plane, mask=mask_s, other=0.0),
                      tl.load(part + 3 * plane, mask=mask_s, other=0.0),
                      tl.load(part + 4 * plane, mask=mask_s, other=0.0), scale, STATS)


@triton.jit
def finish_row(row, valid, bad, x_t, m, l, s1, q, q1, scale, inv_temp, logp_ptr, ent_ptr, lse_ptr, s2_ptr, s3_ptr,
               lse2_ptr, n_rows, STATS: tl.constexpr):
    """Stores one row's outputs (nats) from its base-2 sums relative to the reference of its max m: logp, entropy,
    lse, sum p^2, sum p^2 log p, and lse2 = (m, L) at lse2_ptr[row] and lse2_ptr[n_rows + row]. x_t: the target's
    raw logit. Ignored rows (not `valid`) store 0; a row with a `bad` target (outside [0, V), validate=False)
    stores NaN in every output, never a number."""
    r = m * scale
    safe = overflows(m, r)
    u_t = tl.where(safe, (x_t - m) * scale, tl.fma(x_t, scale, -r))
    l = tl.where(valid, l, 1.0)  # an ignored row accumulated nothing: keep log2 finite
    big_l = tl.log2(l)
    inv_l = 1.0 / l
    # logp <= 0 and H >= 0 always; where() rather than minimum/maximum, which would drop a NaN.
    logp = (u_t - big_l) * LN2
    logp = tl.where(logp > 0, 0.0, logp)
    ent = (big_l - s1 * inv_l) * LN2
    ent = tl.where(ent < 0, 0.0, ent)
    lse = tl.where(safe, m * inv_temp + big_l * LN2, (r + big_l) * LN2)
    poison = tl.where(bad, float("nan"), 0.0)
    keep = valid & ~bad
    tl.store(logp_ptr + row, tl.where(keep, logp, 0.0) + poison)
    tl.store(ent_ptr + row, tl.where(keep, ent, 0.0) + poison)
    tl.store(lse_ptr + row, tl.where(keep, lse, 0.0) + poison)
    tl.store(lse2_ptr + row, tl.where(keep, m, 0.0) + poison)
    tl.store(lse2_ptr + n_rows + row, tl.where(keep, big_l, 0.0) + poison)
    if STATS:
        s2 = q * inv_l * inv_l
        s3 = (q1 * inv_l * inv_l - big_l * s2) * LN2
        tl.store(s2_ptr + row, tl.where(keep, s2, 0.0) + poison)
        tl.store(s3_ptr + row, tl.where(keep, s3, 0.0) + poison)


@triton.jit
def grad_coeffs(g_logp, g_ent, ent, inv_temp):
    """(A, B) with dz_j = p_j (A + B w_j) + [j = t] g_logp / T, w_j = log2 p_j
    (docs/fused_pass.md#the-gradient-in-coefficient-form:
    dz_j = (g_logp (delta_jt - p_j) - g_ent p_j (w_j ln 2 + H)) / T)."""
    return -(g_logp + g_ent * ent) * inv_temp, -g_ent * LN2 * inv_temp


@triton.jit
def softmax_grad(x, scale, m, r, big_l, coef_a, coef_b, SAFE: tl.constexpr):
    """p (A + B log2 p) of entries x, p = 2^(u - L) (u of MODE_SAFE or MODE_CLAMP); 0 where p = 0 (-inf)."""
    if SAFE:
        u = scaled(x, scale, m, r, MODE_SAFE, False)
    else:
        u = scaled(x, scale, m, r, MODE_FAST, False)
    w = tl.maximum(u - big_l, U_FLOOR, propagate_nan=tl.PropagateNan.ALL)
    return tl.exp2(w) * tl.fma(coef_b, w, coef_a)
