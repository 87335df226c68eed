"""The fused pass over logits sharded along the vocabulary (tensor parallel), and its autograd Function.

Each rank holds logits[..., vocab_start : vocab_start + V_shard]. Forward: the shard's partial
accumulators of SPEC section 2 (mx, l, s1, q, q1, relative to the shard's max; the Triton forward kernel
with one program per row and SPLIT=True, or chunked PyTorch), then
  1. all-reduce MAX of mx                                    [N]
  2. all-reduce SUM of the sums rescaled to the global max   [4, N] (l, s1, z_t, owner), [6, N] with stats
the target logit z_t coming from the one rank whose shard holds the target (`owner` counts them), and
the same closed forms as the unsharded pass. Backward: local to the shard (no collective), from the
global lse and entropy; the upstream gradients must be the same on every rank of the group (the loss
computed redundantly on each tensor-parallel rank, as Megatron does).
"""
import torch
import torch.distributed as dist

from .fused_pass import fused_bwd, fused_fwd_partials
from .layout import acc_dtype

_CHUNK_ELEMS = 1 << 21


def _partials_torch(logits, targets, inv_temp, ignore_index, stats):
    """Same as fused_pass.fused_fwd_partials in chunked PyTorch (never an fp32 copy of more than _CHUNK_ELEMS)."""
    V = logits.shape[-1]
    acc = acc_dtype(logits.dtype)
    x = logits.reshape(-1, V)
    valid = targets.reshape(-1) != ignore_index
    part = torch.zeros((5, x.shape[0]), dtype=acc, device=logits.device)
    part[0] = float("-inf")
    if V == 0:
        return part
    step = max(1, _CHUNK_ELEMS // V)
    for i in range(0, x.shape[0], step):
        z = x[i:i + step].to(acc) * inv_temp
        mx = z.amax(-1)
        # Relative to the shard's max, 0 while it is -inf (nothing to add), as the kernel.
        zs = z - torch.where(mx == float("-inf"), 0.0, mx)[:, None]
        e = zs.exp()
        zs = torch.where(e > 0, zs, 0.0)  # -inf entries: 0 * -inf would be NaN
        sums = [mx, e.sum(-1), (e * zs).sum(-1)]
        if stats:
            e2 = e * e
            sums += [e2.sum(-1), (e2 * zs).sum(-1)]
        v = valid[i:i + step]
        for k, s in enumerate(sums):
            part[k, i:i + step] = torch.where(v, s, part[k, i:i + step])
    return part


def _rescale(mx_old, mx_new, l, s1, q, q1):
    """The accumulators relative to mx_new instead of mx_old (SPEC section 2; d = mx_old - mx_new <= 0)."""
    empty = mx_old == float("-inf")
    d = torch.where(empty, 0.0, mx_old - mx_new)
    a = torch.where(empty, 0.0, d.exp())
    return a * l, a * (s1 + d * l), a * a * q, a * a * (q1 + d * q)


def _two_sum(a, b):
    """(s, e) with s = fl(a + b) and a + b = s + e exactly (Knuth's TwoSum)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _finish_rows(ref, l, s1, z_t, ok, valid, q=None, q1=None):
    """[logp, entropy, lse, lse_lo] (+ [sum_p2, sum_p2_logp] given q, q1) of flat rows from accumulators
    relative to ref (the row max, 0 where it is -inf) and the target logit z_t; NaN logp where `ok` is
    False (a target no column matched); 0 everywhere on rows that are not `valid`."""
    l = torch.where(valid, l, 1.0)  # an ignored row accumulated nothing; keep log() finite
    ln_l = l.log()
    lse, lse_lo = _two_sum(ref, ln_l)
    # logp <= 0 and H >= 0: clamp rounding with where(), which keeps NaN (a bad row stays visible).
    logp = (z_t - lse) - lse_lo
    logp = torch.where(logp > 0, 0.0, logp)
    logp = torch.where(ok, logp, float("nan"))
    ent = ln_l - s1 / l
    ent = torch.where(ent < 0, 0.0, ent)
    outs = [logp, ent, lse, lse_lo]
    if q is not None:
        s2 = q / (l * l)
        outs += [s2, q1 / (l * l) - ln_l * s2]
    return [torch.where(valid, o, 0.0) for o in outs]


def vocab_parallel_fwd(logits, targets, vocab_start, group, inv_temp, ignore_index, stats, use_triton):
    """(logp, entropy, lse, sum_p2, sum_p2_logp, owner, lse_lo) of the full rows, each [...] of targets'
    shape in acc_dtype(logits) (sum_p2, sum_p2_logp empty without stats); owner: number of ranks holding
    each valid row's target (1 for a good target); lse_lo: the rounding error of lse, as the unsharded
    kernels keep it. Two all-reduces, as the module docstring says."""
    V = logits.shape[-1]
    launch = fused_fwd_partials if use_triton else _partials_torch
    mx, l, s1, q, q1 = launch(logits, targets, inv_temp, ignore_index, stats)
    acc = mx.dtype
    valid = targets != ignore_index
    local_t = targets.long() - vocab_start
    owned = valid & (local_t >= 0) & (local_t < V)
    z_t = torch.zeros(targets.shape, dtype=acc, device=logits.device)
    if V > 0:  # a shard may be empty
        z_t = logits.gather(-1, torch.where(owned, local_t, 0).unsqueeze(-1)).squeeze(-1).to(acc) * inv_temp
    z_t = torch.where(owned, z_t, 0.0).reshape(-1)

    g_mx = mx.clone()
    dist.all_reduce(g_mx, op=dist.ReduceOp.MAX, group=group)
    ref = torch.where(g_mx == float("-inf"), 0.0, g_mx)
    l, s1, q, q1 = _rescale(mx, ref, l, s1, q, q1)
    packed = torch.stack([l, s1, z_t, owned.reshape(-1).to(acc)] + ([q, q1] if stats else []))
    dist.all_reduce(packed, group=group)
    l, s1, z_t, owner = packed[:4]

    flat_valid = valid.reshape(-1)
    outs = _finish_rows(ref, l, s1, z_t, owner == 1, flat_valid, *(packed[4:] if stats else ()))
    shape = targets.shape
    outs = [o.view(shape) for o in outs]
    empty = torch.zeros(0, dtype=acc, device=logits.device)
    outs += [empty, empty] if not stats else []
    logp, ent, lse, lse_lo, s2, s3 = outs
    return logp, ent, lse, s2, s3, torch.where(flat_valid, owner, 1.0).view(shape), lse_lo


def _shard_targets(targets, vocab_start, V, ignore_index):
    """Targets relative to the shard; a target another shard holds becomes a column no program matches
    (and never ignore_index), so its row gets the full -p and entropy terms without the delta."""
    elsewhere = -1 if ignore_index != -1 else -2
    local_t = targets - vocab_start
    owned = (local_t >= 0) & (local_t < V)
    return torch.where(targets == ignore_index, targets, torch.where(owned, local_t, elsewhere))


def _bwd_torch(logits, local_t, lse, lse_lo, entropy, g_logp, g_ent, inv_temp, ignore_index):
    """dz of one shard (SPEC section 3), chunked PyTorch; local_t from _shard_targets."""
    V = logits.shape[-1]
    acc = acc_dtype(logits.dtype)
    x = logits.reshape(-1, V)
    out = torch.empty(x.shape, dtype=logits.dtype, device=logits.device)
    t, lse, lse_lo, ent = local_t.reshape(-1), lse.reshape(-1), lse_lo.reshape(-1), entropy.reshape(-1)
    g_logp, g_ent = g_logp.reshape(-1).to(acc), g_ent.reshape(-1).to(acc)
    cols = torch.arange(V, device=logits.device)
    step = max(1, _CHUNK_ELEMS // max(V, 1))
    for i in range(0, x.shape[0], step):
        sl = slice(i, i + step)
        logp = (x[sl].to(acc) * inv_temp - lse[sl, None]) - lse_lo[sl, None]
        p = logp.exp()
        dent = p * (torch.where(p > 0, logp, 0.0) + ent[sl, None])
        delta = (cols[None, :] == t[sl, None]).to(acc)
        dz = (g_logp[sl, None] * (delta - p) - g_ent[sl, None] * dent) * inv_temp
        out[sl] = torch.where((t[sl] != ignore_index)[:, None], dz, 0.0)
    return out.view(logits.shape)


class VocabParallelFunction(torch.autograd.Function):
    """logits shard [..., V_shard], targets [...] -> (logp, entropy, lse, sum_p2, sum_p2_logp, owner);
    logp and entropy are differentiable, the rest are not."""

    @staticmethod
    def forward(ctx, logits, targets, vocab_start, group, inv_temp, ignore_index, stats, use_triton):
        *outs, lse_lo = vocab_parallel_fwd(logits, targets, vocab_start, group, inv_temp, ignore_index, stats,
                                           use_triton)
        _, entropy, lse, *_ = outs
        ctx.save_for_backward(logits, targets, lse, lse_lo, entropy)
        ctx.args = (vocab_start, inv_temp, ignore_index, use_triton)
        ctx.mark_non_differentiable(*outs[2:])
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_entropy, *_):
        logits, targets, lse, lse_lo, entropy = ctx.saved_tensors
        vocab_start, inv_temp, ignore_index, use_triton = ctx.args
        grad_logp = torch.zeros_like(lse) if grad_logp is None else grad_logp
        grad_entropy = torch.zeros_like(lse) if grad_entropy is None else grad_entropy
        local_t = _shard_targets(targets, vocab_start, logits.shape[-1], ignore_index)
        if use_triton:
            out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
            grad = fused_bwd(logits=logits, targets=local_t, lse=lse, lse_lo=lse_lo, entropy=entropy,
                             grad_logp=grad_logp, grad_entropy=grad_entropy, inv_temp=inv_temp,
                             ignore_index=ignore_index, out=out, check_target=False)
        else:
            grad = _bwd_torch(logits, local_t, lse, lse_lo, entropy, grad_logp, grad_entropy, inv_temp,
                              ignore_index)
        return grad, None, None, None, None, None, None, None
