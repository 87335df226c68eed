"""The fused pass over logits sharded along the vocabulary (tensor parallel), and its autograd Function.

Each rank holds logits[..., vocab_start : vocab_start + V_shard]. Forward: the shard's partial sums of
rowmath.py (the shard's max m and base-2 sums relative to its reference; the Triton forward kernel with one
program per row and SPLIT=True, or chunked PyTorch), then
  1. all-reduce MAX of m                                              [N]
  2. all-reduce SUM of the sums rescaled to the global reference      [4, N] (l, s1, x_t, owner), [6, N] with stats
the raw target logit x_t coming from the one rank whose shard holds the target (`owner` counts them), and
the same closed forms as the unsharded pass (rowmath_torch.finish). Backward: local to the shard (no
collective), from the global lse2 and entropy; the upstream gradients must be the same on every rank of the
group (the loss computed redundantly on each tensor-parallel rank, as Megatron does).
"""
import torch
import torch.distributed as dist

from . import rowmath_torch as rm
from .fused_pass import fused_bwd, fused_fwd_partials
from .layout import acc_dtype, scale_args

_CHUNK_ELEMS = 1 << 21


def _partials_torch(logits, targets, inv_temp, ignore_index, stats):
    """fused_pass.fused_fwd_partials in chunked PyTorch (never an fp32 copy of more than _CHUNK_ELEMS)."""
    V = logits.shape[-1]
    acc = acc_dtype(logits.dtype)
    x = logits.reshape(-1, V)
    valid = targets.reshape(-1) != ignore_index
    part = torch.zeros((5, x.shape[0]), dtype=acc, device=logits.device)
    part[0] = float("-inf")
    scale, _ = scale_args(inv_temp, logits.dtype)
    step = max(1, _CHUNK_ELEMS // max(V, 1))
    for i in range(0, x.shape[0], step):
        sums = rm.block_sums(x[i:i + step], scale, stats)
        part[:, i:i + step] = torch.where(valid[i:i + step], sums, part[:, i:i + step])
    return part


def vocab_parallel_fwd(logits, targets, vocab_start, group, inv_temp, ignore_index, stats, use_triton):
    """(logp, entropy, lse, sum_p2, sum_p2_logp, owner, lse2) of the full rows: the first five and owner of
    targets' shape in acc_dtype(logits) (sum_p2, sum_p2_logp empty without stats); owner: number of ranks
    holding each valid row's target (1 for a good target; a row with none is NaN in every output); lse2
    [2, ...] for the backward. Two all-reduces, as the module docstring says."""
    V = logits.shape[-1]
    launch = fused_fwd_partials if use_triton else _partials_torch
    m_shard, l, s1, q, q1 = launch(logits, targets, inv_temp, ignore_index, stats)
    acc = m_shard.dtype
    valid = targets != ignore_index
    local_t = targets.long() - vocab_start
    owned = valid & (local_t >= 0) & (local_t < V)
    x_t = torch.zeros(targets.shape, dtype=acc, device=logits.device)
    if V > 0:  # a shard may be empty
        x_t = logits.gather(-1, torch.where(owned, local_t, 0).unsqueeze(-1)).squeeze(-1).to(acc)
    x_t = torch.where(owned, x_t, 0.0).reshape(-1)

    scale, inv_temp = scale_args(inv_temp, logits.dtype)
    m = m_shard.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    l, s1, q, q1 = rm.rescale(rm.shift(m_shard, m, scale), l, s1, q, q1)
    packed = torch.stack([l, s1, x_t, owned.reshape(-1).to(acc)] + ([q, q1] if stats else []))
    dist.all_reduce(packed, group=group)
    l, s1, x_t, owner = packed[:4]
    q, q1 = packed[4:] if stats else (torch.zeros_like(l),) * 2

    flat_valid = valid.reshape(-1)
    logp, ent, lse, s2, s3, lse2 = rm.finish(torch.stack([m, l, s1, q, q1]), x_t, scale, inv_temp, flat_valid,
                                             flat_valid & (owner != 1))
    shape = targets.shape
    empty = torch.zeros(0, dtype=acc, device=logits.device)
    s2, s3 = (s2.view(shape), s3.view(shape)) if stats else (empty, empty)
    owner = torch.where(flat_valid, owner, 1.0).view(shape)
    return logp.view(shape), ent.view(shape), lse.view(shape), s2, s3, owner, lse2.view(2, *shape)


def _shard_targets(targets, vocab_start, V, ignore_index):
    """Targets relative to the shard; a target another shard holds becomes a column no program matches
    (and never ignore_index), so its row gets the full -p and entropy terms without the delta."""
    elsewhere = -1 if ignore_index != -1 else -2
    local_t = targets - vocab_start
    owned = (local_t >= 0) & (local_t < V)
    return torch.where(targets == ignore_index, targets, torch.where(owned, local_t, elsewhere))


def _bwd_torch(logits, local_t, lse2, entropy, g_logp, g_ent, inv_temp, ignore_index):
    """dz of one shard (SPEC section 3), chunked PyTorch; local_t from _shard_targets."""
    V = logits.shape[-1]
    acc = acc_dtype(logits.dtype)
    x = logits.reshape(-1, V)
    out = torch.empty(x.shape, dtype=logits.dtype, device=logits.device)
    t, lse2, ent = local_t.reshape(-1), lse2.reshape(2, -1), entropy.reshape(-1)
    g_logp, g_ent = g_logp.reshape(-1).to(acc), g_ent.reshape(-1).to(acc)
    scale, inv_temp = scale_args(inv_temp, logits.dtype)
    step = max(1, _CHUNK_ELEMS // max(V, 1))
    for i in range(0, x.shape[0], step):
        sl = slice(i, i + step)
        out[sl] = rm.grad(x[sl], t[sl], t[sl] != ignore_index, lse2[:, sl], ent[sl], g_logp[sl], g_ent[sl], scale,
                          inv_temp)
    return out.view(logits.shape)


class VocabParallelFunction(torch.autograd.Function):
    """logits shard [..., V_shard], targets [...] -> (logp, entropy, lse, sum_p2, sum_p2_logp, owner);
    logp and entropy are differentiable, the rest are not."""

    @staticmethod
    def forward(ctx, logits, targets, vocab_start, group, inv_temp, ignore_index, stats, use_triton):
        *outs, lse2 = vocab_parallel_fwd(logits, targets, vocab_start, group, inv_temp, ignore_index, stats,
                                         use_triton)
        ctx.save_for_backward(logits, targets, lse2, outs[1])
        ctx.args = (vocab_start, inv_temp, ignore_index, use_triton)
        ctx.mark_non_differentiable(*outs[2:])
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_entropy, *_):
        logits, targets, lse2, entropy = ctx.saved_tensors
        vocab_start, inv_temp, ignore_index, use_triton = ctx.args
        grad_logp = torch.zeros_like(entropy) if grad_logp is None else grad_logp
        grad_entropy = torch.zeros_like(entropy) if grad_entropy is None else grad_entropy
        local_t = _shard_targets(targets, vocab_start, logits.shape[-1], ignore_index)
        if use_triton:
            out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
            grad = fused_bwd(logits, local_t, lse2, entropy, grad_logp, grad_entropy, inv_temp, ignore_index, out,
                             check_target=False)
        else:
            grad = _bwd_torch(logits, local_t, lse2, entropy, grad_logp, grad_entropy, inv_temp, ignore_index)
        return grad, None, None, None, None, None, None, None
