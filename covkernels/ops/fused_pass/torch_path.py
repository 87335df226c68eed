"""The fused pass in plain PyTorch, a block of rows at a time, for CPU tensors without the interpreter (and fp64).

Same interface and outputs as the Triton launchers in kernels.py, and the same row math (rowmath_torch.py:
base-2 sums relative to each row's max, lse2 = (m, L)), so the temperature and large logits cost no
accuracy and either path's lse2 serves the other's backward. Logits of at least compiled.MIN_ELEMS elements
run through torch.compile (one fused loop per row, no [N, V] temporaries); smaller ones eagerly, in blocks of
at most layout.CHUNK_ELEMS elements (a few fp32 copies of one block, never a full fp32 [N, V] copy).
"""
import torch

from ..common import rowmath_torch as rm
from ..common.compiled import compiles, run
from ..common import layout
from ..common.layout import acc_dtype, new_outputs, row_layout, scale_args



def row_blocks(logits, inner=None, chunk=None):
    """Yields (rows, x): x a [rows, V] view (writable) of consecutive rows of logits, in row order; blocks
    of `chunk` elements (default: layout.CHUNK_ELEMS, or whole runs of rows of one stride when they compile)."""
    x, N, V, inner, _, _ = row_layout(logits, inner)
    # One uniform row stride: a single run of N rows, cut into blocks.
    rows = x.view(-1, V).unsqueeze(0) if inner == 1 else x.view(-1, inner, V)
    inner = rows.shape[1]
    if chunk is None:
        chunk = x.numel() if compiles(x.numel()) else layout.CHUNK_ELEMS
    step = max(1, chunk // max(V, 1))
    for o in range(rows.shape[0]):
        for i in range(0, inner, step):
            j = min(i + step, inner)
            yield slice(o * inner + i, o * inner + j), rows[o, i:j]


def target_masks(targets, V, ignore_index):
    """(valid, bad, the targets clamped into [0, V)) of flat targets: bad = a valid target outside [0, V)
    (possible with validate=False), whose row is NaN in every output and in its gradient."""
    t = targets.reshape(-1)
    valid = t != ignore_index
    in_range = (t >= 0) & (t < V)
    return valid, valid & ~in_range, torch.where(in_range, t, 0).long()


def fused_fwd_torch(logits, targets, inv_temp, ignore_index, stats):
    """Chunked PyTorch forward; see kernels.fused_fwd."""
    V = logits.shape[-1]
    acc = acc_dtype(logits.dtype)
    scale, inv_temp = scale_args(inv_temp, logits.dtype)
    valid, bad, safe_t = target_masks(targets, V, ignore_index)
    sums = torch.empty((5, safe_t.numel()), dtype=acc, device=logits.device)
    x_t = torch.empty(safe_t.numel(), dtype=acc, device=logits.device)
    for sl, x in row_blocks(logits):
        sums[:, sl] = run(rm.block_sums, x, scale, stats)
        x_t[sl] = x.gather(-1, safe_t[sl, None]).squeeze(-1).to(acc)
    outs = new_outputs(targets, acc, stats)
    *vals, lse2 = rm.finish(sums, x_t, scale, inv_temp, valid, bad)
    for out, val in zip(outs[:5 if stats else 3], vals):
        out.view(-1).copy_(val)
    outs[5].view(2, -1).copy_(lse2)
    return outs


def _grad_into(x, out, *args):
    out.copy_(rm.grad(x, *args))


def _grad_in_place(x, *args):
    # One mutated argument: a compiled graph with two aliased ones is not reliable.
    x.copy_(rm.grad(x, *args))


def fused_bwd_torch(logits, targets, lse2, entropy, grad_logp, grad_entropy, inv_temp, ignore_index, out,
                    extra_grad=None):
    """Chunked PyTorch backward; see kernels.fused_bwd. `out` may be `logits` itself.

    extra_grad(rows, x) -> [rows, V] in the accumulation dtype, if given, is added to each block's gradient
    (x is read before the block is overwritten, so this works in place too)."""
    V = logits.shape[-1]
    acc = acc_dtype(logits.dtype)
    scale, inv_temp = scale_args(inv_temp, logits.dtype)
    valid, _, safe_t = target_masks(targets, V, ignore_index)
    per_row = (safe_t, valid, lse2.reshape(2, -1), entropy.reshape(-1), grad_logp.reshape(-1).to(acc),
               grad_entropy.reshape(-1).to(acc))
    _, _, _, inner, _, _ = row_layout(logits)
    # An `out` no two strides describe is written through a copy, then copied back.
    dst_all = row_layout(out, inner)[0]
    # An extra gradient (AEnt's) takes a few copies of its block: bounded blocks for it.
    chunk = None if extra_grad is None else layout.CHUNK_ELEMS
    for (sl, x), (_, dst) in zip(row_blocks(logits, chunk=chunk), row_blocks(dst_all, inner, chunk)):
        args = [a[..., sl] for a in per_row] + [scale, inv_temp]
        if extra_grad is None and dst.data_ptr() == x.data_ptr():  # `out` is `logits`: the same view
            run(_grad_in_place, x, *args)
        elif extra_grad is None:
            run(_grad_into, x, dst, *args)
        else:
            dst.copy_(run(rm.grad, x, *args) + extra_grad(sl, x))
    if dst_all is not out:
        out.copy_(dst_all)
    return out
