"""The entropy change under a logit update in plain PyTorch, a block of rows at a time, for CPU tensors
without the interpreter (and fp64). Same interface and outputs as entropy_change.entropy_change_fwd;
working memory is a few fp32 copies of half of layout.CHUNK_ELEMS logits (it reads two tensors), never of
the whole [N, V]."""
import torch

from ..common import layout
from .kernels import row_blocks_view


def _entropy(shifted, temperature):
    """(log p, p, H) of rows given relative to their max, x - max x; the temperature divides differences
    from the max, so it costs no accuracy."""
    z = shifted / temperature
    logp = z - torch.logsumexp(z, dim=-1, keepdim=True)
    p = logp.exp()
    # 0 log 0 = 0; clamp: H >= 0 (a NaN stays NaN).
    return logp, p, (-(p * torch.where(p > 0, logp, 0.0)).sum(-1)).clamp(min=0.0)


def _max(x):
    # +inf has no meaningful softmax: NaN, confined to its row (the kernel gives the same).
    m = x.amax(dim=-1, keepdim=True)
    return torch.where(m == float("inf"), float("nan"), m)


def entropy_change_fwd_torch(logits_before, logits_after, row_mask, temperature):
    """(predicted, actual), each [...] in fp32 (fp64 for fp64 logits); see kernels.entropy_change_fwd."""
    acc = torch.float64 if logits_before.dtype == torch.float64 else torch.float32
    lead = logits_before.shape[:-1]
    predicted = torch.empty(lead, dtype=acc, device=logits_before.device)
    actual = torch.empty(lead, dtype=acc, device=logits_before.device)
    if lead.numel() == 0:
        return predicted, actual
    xb, xa = row_blocks_view(logits_before), row_blocks_view(logits_after)
    outer, inner, V = xb.shape
    pred_rows, act_rows = predicted.view(outer, inner), actual.view(outer, inner)
    valid_rows = row_mask.reshape(outer, inner)
    step = max(1, layout.CHUNK_ELEMS // 2 // V)
    for o in range(outer):
        for i in range(0, inner, step):
            rows = slice(i, min(i + step, inner))
            zb, za = xb[o, rows].to(acc), xa[o, rows].to(acc)
            logp, p, h_b = _entropy(zb - _max(zb), temperature)
            _, _, h_a = _entropy(za - _max(za), temperature)
            # Where p = 0 the term does not count: log p = -inf, and dz may be inf (or NaN, -inf to -inf).
            term = torch.where(p == 0, 0.0, p * ((za - zb) / temperature) * (logp + h_b[:, None]))
            valid = valid_rows[o, rows]
            pred_rows[o, rows] = torch.where(valid, -term.sum(-1), 0.0)
            act_rows[o, rows] = torch.where(valid, h_a - h_b, 0.0)
    return predicted, actual
