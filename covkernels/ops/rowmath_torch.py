"""The row math of rowmath.py in PyTorch, on blocks of rows: the same base-2 sums, maxima and lse2, so that the
PyTorch paths and the Triton kernels exchange partial sums (vocabulary shards) and lse2 freely.

A row's reference is r = fl32(m * scale) (m its max raw logit, scale = log2(e) / T); an entry's
u = x * scale - r is formed as (x - m) * scale + (m * scale - r), the last term exact in float64, so that
x * scale is never rounded on its own (SPEC section 10), as the kernels' fused multiply-add does. A row whose
m * scale overflows is in safe mode: u = (x - m) * scale.
"""
import numpy as np
import torch

LN2 = 0.6931471805599453
U_FLOOR = -1000.0


def _as(scale, dtype):
    """The Python float `scale` rounded as a kernel (or torch, multiplying a tensor of `dtype`) rounds it."""
    return scale if dtype == torch.float64 else float(np.float32(scale))


def _offset(m, scale):
    """(r, m * scale - r) of row maxima m: the reference as the kernels round it and its rounding error, exact
    in float64 (0 where m is not finite or the row is in safe mode); r = 0 where m = -inf."""
    r = m * scale
    fast = m.isfinite() & r.isfinite()
    delta = torch.where(fast, m.double() * _as(scale, m.dtype) - r.double(), 0.0).to(m.dtype)
    return torch.where(m == float("-inf"), 0.0, r), delta


def scaled(x, m, scale, floor=True):
    """u = x * scale - r of a block x [R, C] (acc dtype) with row maxima m [R], floored at U_FLOOR unless told not
    to (a -inf entry's weight is 0 either way, and e * u stays finite); NaN stays NaN."""
    _, delta = _offset(m, scale)
    u = (x - torch.where(m.isfinite(), m, 0.0)[:, None]) * scale + delta[:, None]
    return torch.where(u < U_FLOOR, U_FLOOR, u) if floor else u


def block_sums(x, scale, stats):
    """[5, R] (m, l, s1, q, q1) of a block of rows x [R, C] (acc dtype): the max and the base-2 sums relative to
    its reference; m = -inf and zero sums on rows with nothing to add (empty or all -inf)."""
    m = x.amax(dim=-1) if x.shape[-1] else torch.full(x.shape[:1], float("-inf"), dtype=x.dtype, device=x.device)
    u = scaled(x, m, scale)
    e = u.exp2()
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
    a = d.exp2()
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
    big_l = l.log2()
    logp = (u_t - big_l) * LN2
    logp = torch.where(logp > 0, 0.0, logp)
    ent = (big_l - s1 / l) * LN2
    ent = torch.where(ent < 0, 0.0, ent)
    lse = torch.where(safe, m * inv_temp + big_l * LN2, (r + big_l) * LN2)
    s2 = q / (l * l)
    outs = [logp, ent, lse, s2, (q1 / (l * l) - big_l * s2) * LN2, m, big_l]
    outs = [torch.where(bad, float("nan"), torch.where(valid, o, 0.0)) for o in outs]
    return (*outs[:5], torch.stack(outs[5:]))


def grad(x, t, lse2, ent, g_logp, g_ent, scale, inv_temp, ignore_index):
    """dz of a block of rows x [R, C] (acc dtype, SPEC section 3) from lse2 = (m, L) [2, R], columns matched
    against targets t [R] (relative to the block: a target outside [0, C) adds no delta); 0 on ignored rows."""
    m, big_l = lse2
    w = torch.clamp(scaled(x, m, scale) - big_l[:, None], min=U_FLOOR)
    p = w.exp2()
    coef_a = -(g_logp + g_ent * ent) * inv_temp
    coef_b = -g_ent * LN2 * inv_temp
    dz = p * (coef_a[:, None] + coef_b[:, None] * w)
    cols = torch.arange(x.shape[-1], device=x.device)
    dz = dz + torch.where(cols[None, :] == t[:, None], (g_logp * inv_temp)[:, None], 0.0)
    return torch.where((t != ignore_index)[:, None], dz, 0.0)
