"""The vocabulary-parallel pass's PyTorch pieces: a shard's partial sums and its gradient, chunked (never an
fp32 copy of more than layout.CHUNK_ELEMS elements), on the row math of rowmath_torch.py."""
import torch

from ..common import rowmath_torch as rm
from ..common import layout
from ..common.layout import acc_dtype, scale_args



def partials_torch(logits, targets, inv_temp, ignore_index, stats):
    """fused_pass.kernels.fused_fwd_partials in chunked PyTorch."""
    V = logits.shape[-1]
    acc = acc_dtype(logits.dtype)
    x = logits.reshape(-1, V)
    valid = targets.reshape(-1) != ignore_index
    part = torch.zeros((5, x.shape[0]), dtype=acc, device=logits.device)
    part[0] = float("-inf")
    scale, _ = scale_args(inv_temp, logits.dtype)
    step = max(1, layout.CHUNK_ELEMS // max(V, 1))
    for i in range(0, x.shape[0], step):
        sums = rm.block_sums(x[i:i + step], scale, stats)
        part[:, i:i + step] = torch.where(valid[i:i + step], sums, part[:, i:i + step])
    return part


def shard_targets(targets, vocab_start, V, ignore_index):
    """Targets relative to the shard; a target another shard holds becomes a column no program matches
    (and never ignore_index), so its row gets the full -p and entropy terms without the delta."""
    elsewhere = -1 if ignore_index != -1 else -2
    local_t = targets - vocab_start
    owned = (local_t >= 0) & (local_t < V)
    return torch.where(targets == ignore_index, targets, torch.where(owned, local_t, elsewhere))


def bwd_torch(logits, local_t, lse2, entropy, g_logp, g_ent, inv_temp, ignore_index):
    """dz of one shard (docs/fused_pass.md#the-gradient); local_t from shard_targets."""
    V = logits.shape[-1]
    acc = acc_dtype(logits.dtype)
    x = logits.reshape(-1, V)
    out = torch.empty(x.shape, dtype=logits.dtype, device=logits.device)
    t, lse2, ent = local_t.reshape(-1), lse2.reshape(2, -1), entropy.reshape(-1)
    g_logp, g_ent = g_logp.reshape(-1).to(acc), g_ent.reshape(-1).to(acc)
    scale, inv_temp = scale_args(inv_temp, logits.dtype)
    step = max(1, layout.CHUNK_ELEMS // max(V, 1))
    for i in range(0, x.shape[0], step):
        sl = slice(i, i + step)
        out[sl] = rm.grad(x[sl], t[sl], t[sl] != ignore_index, lse2[:, sl], ent[sl], g_logp[sl], g_ent[sl], scale,
                          inv_temp)
    return out.view(logits.shape)
