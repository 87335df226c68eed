"""The row math of rowmath.py in PyTorch, on blocks of rows: the same base-2 sums, maxima and lse2, so that the
PyTorch paths and the Triton kernels exchange partial sums (vocabulary shards) and lse2 freely.

A row's reference is r = fl32(m * scale) (m its max raw logit, scale = log2(e) / T rounded to fp32 by
layout.scale_args, as a kernel's argument is, so that these products round as the kernels'); an entry's
u = x * scale - r is formed as (x - m) * scale + (m * scale - r), the last term exact in float64, so that
x * scale is never rounded on its own (docs/numerics.md#temperature), as the kernels' fused multiply-add does.
A row whose m * scale overflows is in safe mode: u = (x - m) * scale.
"""
import torch

from .layout import acc_dtype

LN2 = 0.6931471805599453
LOG2E = 1.4426950408889634
U_FLOOR = -1000.0


# torch.exp2 and log2 on the CPU round differently in a loop's vectorised body and its scalar tail, so a row's
# bits would depend on where the row sits in the tensor (data parallelism must give one process's bits); exp
# and log do not.
def exp2(u):
    return torch.exp(u * LN2)


def log2(x):
    return torch.log(x) * LOG2E


def _offset(m, scale):
    """(r, m * scale - r) of row maxima m: the reference as the kernels round it and its rounding error, exact
    in float64 (0 where m is not finite or the row is in safe mode); r = 0 where m = -inf."""
    r = m * scale
    fast = m.isfinite() & r.isfinite()
    delta = torch.where(fast, m.double() * scale - r.double(), 0.0).to(m.dtype)
    return torch.where(m == float("-inf"), 0.0, r), delta


def scaled(x, m, scale, floor=True):
    """u = x * scale - r of a block x [R, C] (acc dtype) with row maxima m [R], floored at U_FLOOR unless told not
    to (a -inf entry's weight is 0 either way, and e * u stays finite); NaN stays NaN."""
    _, delta = _offset(m, scale)
    # m = -inf: nothing to refer to (every entry -inf); m = NaN (a +inf logit) keeps the row NaN.
    u = (x - torch.where(m == float("-inf"), 0.0, m)[:, None]) * scale + delta[:, None]
    return torch.where(u < U_FLOOR, U_FLOOR, u) if floor else u


def block_sums(x, scale, stats):
    """[5, R] (m, l, s1, q, q1) of a block of rows x [R, C] (any float dtype, taken in its accumulation dtype):
    the max and the base-2 sums relative to its reference; m = -inf and zero sums on rows with nothing to add
    (empty or all -inf). Without stats, q and q1 are 0."""
    x = x.to(acc_dtype(x.dtype))
    m = x.amax(dim=-1) if x.shape[-1] else torch.full(x.shape[:1], float("-inf"), dtype=x.dtype, device=x.device)
    m = torch.where(m == float("inf"), float("nan"), m)  # +inf in a row has no softmax: NaN there, as the kernels
    u = scaled(x, m, scale)
    e = exp2(u)
    sums = [m, e.sum(-1), (e * u).sum(-1)]
    if stats:
        e2 = e * e
        sums += [e2.sum(-1), (e2 * u).sum(-1)]
    else:
        sums += [torch.zeros_like(m)] * 2
    return torch.stack(sums)


def rescale(d, l, s1, q, q1):
    """The sums relative to a reference moved by d = r_old - r_new <= 0 (rowmath.rescale)."""
    d = torch.clamp(d, min=U_FLOOR)
    a = exp2(d)
    return a * l, a * (s1 + d * l), a * a * q, a * a * (q1 + d * q)


def shift(m_part, m, scale):
    """d = reference(m_part) - reference(m) of parts with maxima m_part under the row max m (rowmath.merge_sums);
    U_FLOOR for parts that saw nothing."""
    r = m * scale
    safe = m.isfinite() & ~r.isfinite()
    d = torch.where(safe, (m_part - m) * scale, m_part * scale - r)
    return torch.where(m_part == float("-inf"), U_FLOOR, d)


def merge(parts, dim, scale):
    """Sums [5, ...] of several parts (along `dim` of each of the five) combined relative to their largest max:
    [5, ...], m = -inf where no part saw anything."""
    m_part, l, s1, q, q1 = parts
    m = m_part.amax(dim)
    d = shift(m_part, m.unsqueeze(dim), scale)
    return torch.stack([m, *(x.sum(dim) for x in rescale(d, l, s1, q, q1))])


def finish(sums, x_t, scale, inv_temp, valid, bad):
    """(logp, entropy, lse, sum_p2, sum_p2_logp, lse2) of rows [R] from merged sums [5, R] and the raw target
    logits x_t [R]: as rowmath.finish_row (0 on rows not `valid`, NaN everywhere on `bad` rows)."""
    m, l, s1, q, q1 = sums
    r = m * scale
    safe = m.isfinite() & ~r.isfinite()
    u_t = scaled(x_t[:, None], m, scale, floor=False)[:, 0]
    l = torch.where(valid, l, 1.0)
    big_l = log2(l)
    logp = (u_t - big_l) * LN2
    logp = torch.where(logp > 0, 0.0, logp)
    ent = (big_l - s1 / l) * LN2
    ent = torch.where(ent < 0, 0.0, ent)
    lse = torch.where(safe, m * inv_temp + big_l * LN2, (r + big_l) * LN2)
    s2 = q / (l * l)
    outs = [logp, ent, lse, s2, (q1 / (l * l) - big_l * s2) * LN2, m, big_l]
    outs = [torch.where(bad, float("nan"), torch.where(valid, o, 0.0)) for o in outs]
    return (*outs[:5], torch.stack(outs[5:]))


def grad(x, col_t, valid, lse2, ent, g_logp, g_ent, scale, inv_temp):
    """dz [R, C] (x's accumulation dtype, docs/fused_pass.md#the-gradient) of a block of rows x [R, C] from
    lse2 = (m, L) [2, R]: p (A + B log2 p) + [j = col_t] g_logp / T, col_t the target's column in the block
    (outside [0, C): no delta, as for a target another block or shard holds); 0 on rows not `valid`. Per-row
    arguments [R]."""
    x = x.to(acc_dtype(x.dtype))
    m, big_l = lse2
    w = torch.clamp(scaled(x, m, scale) - big_l[:, None], min=U_FLOOR)
    dz = exp2(w) * ((-(g_logp + g_ent * ent) * inv_temp)[:, None] + (-g_ent * LN2 * inv_temp)[:, None] * w)
    cols = torch.arange(x.shape[-1], device=x.device)
    dz = dz + torch.where(cols[None, :] == col_t[:, None], (g_logp * inv_temp)[:, None], 0.0)
    return torch.where(valid[:, None], dz, 0.0)
