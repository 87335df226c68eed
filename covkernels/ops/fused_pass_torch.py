"""The fused pass in plain PyTorch, a block of rows at a time, for CPU tensors without the interpreter.

Same interface and outputs as the Triton launchers in fused_pass.py. Working memory is bounded by
_CHUNK_ELEMS fp32 elements (a few copies of one block of rows), never a full fp32 [N, V] copy.
"""
import torch

from .layout import acc_dtype, new_outputs, row_layout

_CHUNK_ELEMS = 1 << 21


def _row_blocks(logits, inner=None):
    """Yields (rows, x): x a [rows, V] view (writable) of consecutive rows of logits, in row order."""
    x, N, V, inner, _, _ = row_layout(logits, inner)
    # One uniform row stride: a single run of N rows, cut into blocks.
    rows = x.view(-1, V).unsqueeze(0) if inner == 1 else x.view(-1, inner, V)
    inner = rows.shape[1]
    step = max(1, _CHUNK_ELEMS // max(V, 1))
    for o in range(rows.shape[0]):
        for i in range(0, inner, step):
            j = min(i + step, inner)
            yield slice(o * inner + i, o * inner + j), rows[o, i:j]


def _block_stats(x, t, inv_temp, ignore_index, acc):
    """(valid, target in range, safe target, lse, logp of every column, p) of one block of rows, fp32."""
    V = x.shape[-1]
    valid = t != ignore_index
    in_range = valid & (t >= 0) & (t < V)
    z = x.to(acc) * inv_temp
    # Relative to the row max, as the kernel: with logits of 1e4, lse itself carries an fp32 rounding
    # of 1e-3, which z - lse would pass on to every log-prob.
    mx = z.amax(dim=-1, keepdim=True)
    # +inf in a row has no meaningful softmax: NaN, confined to that row, as the kernel gives.
    mx = torch.where(mx == float("inf"), float("nan"), mx)
    zs = z - mx
    lse_rel = torch.logsumexp(zs, dim=-1, keepdim=True)
    logp_all = zs - lse_rel
    p = logp_all.exp()
    lse = (mx + lse_rel).squeeze(-1)
    return valid, in_range, torch.where(in_range, t, 0).long(), lse, logp_all, p


def fused_fwd_torch(logits, targets, inv_temp, ignore_index, stats, splits=None):
    """Chunked PyTorch forward; see fused_pass.fused_fwd (`splits` is accepted and ignored). lse_lo is 0:
    the backward here recomputes each row relative to its max."""
    acc = acc_dtype(logits.dtype)
    outs = new_outputs(targets, acc, stats)
    outs[5].zero_()
    flat = [o.view(-1) for o in outs[:5 if stats else 3]]
    t_flat = targets.reshape(-1)
    for sl, x in _row_blocks(logits):
        valid, in_range, t, lse, logp_all, p = _block_stats(x, t_flat[sl], inv_temp, ignore_index, acc)
        logp_safe = torch.where(p > 0, logp_all, 0.0)
        logp = logp_all.gather(-1, t.unsqueeze(-1)).squeeze(-1).clamp(max=0.0)
        block = [logp, (-(p * logp_safe).sum(-1)).clamp(min=0.0), lse]
        if stats:
            p2 = p * p
            block += [p2.sum(-1), (p2 * logp_safe).sum(-1)]
        # A target outside [0, V) (validate=False) makes every output of its row NaN.
        off = torch.where(valid, float("nan"), 0.0)
        for out, val in zip(flat, block):
            out[sl] = torch.where(in_range, val, off)
    return outs


def fused_bwd_torch(logits, targets, lse, lse_lo, entropy, grad_logp, grad_entropy, inv_temp, ignore_index, out,
                    splits=None, extra_grad=None):
    """Chunked PyTorch backward; see fused_pass.fused_bwd. `out` may be `logits` itself.

    extra_grad(rows, x) -> [rows, V], if given, is added to each block's gradient with respect to
    z = logits / temperature (x is read before the block is overwritten, so this works in place too).
    """
    t_flat = targets.reshape(-1)
    acc = acc_dtype(logits.dtype)
    g_logp = grad_logp.reshape(-1).to(acc)
    g_ent = grad_entropy.reshape(-1).to(acc)
    ent = entropy.reshape(-1)
    _, _, _, inner, _, _ = row_layout(logits)
    # An `out` no two strides describe is written through a copy, then copied back.
    dst_all = row_layout(out, inner)[0]
    for (sl, x), (_, dst) in zip(_row_blocks(logits), _row_blocks(dst_all, inner)):
        valid, in_range, t, _, logp_all, p = _block_stats(x, t_flat[sl], inv_temp, ignore_index, acc)
        dent = p * (torch.where(p > 0, logp_all, 0.0) + ent[sl, None])
        dz = -g_logp[sl, None] * p - g_ent[sl, None] * dent
        dz.scatter_add_(-1, t.unsqueeze(-1), g_logp[sl, None])
        if extra_grad is not None:
            dz = dz + extra_grad(sl, x)
        # A target outside [0, V) (validate=False) has NaN outputs: its gradient is NaN too.
        dz = torch.where(in_range[:, None], dz * inv_temp, float("nan"))
        dst.copy_(torch.where(valid[:, None], dz, 0.0))
    if dst_all is not out:
        out.copy_(dst_all)
    return out
