"""AEnt's fused pass as torch custom ops (see fused_pass/op.py for the plain pass's):

covkernels::clamped_fwd     logits, targets -> the fused pass's outputs, the clamped entropy and the kept set's
                            description (what the backward needs)
covkernels::clamped_bwd     -> the gradient of logp, entropy and the clamped entropy

Each runs the Triton launcher or the chunked PyTorch one (`use_triton`); both take the same arguments.
"""
import torch
from torch import Tensor

from ..common.custom_ops import first_order_only
from ..common.layout import acc_dtype, new_outputs
from .kernels import clamped_bwd, clamped_fwd
from .torch_path import clamped_bwd_torch, clamped_fwd_torch


@torch.library.custom_op("covkernels::clamped_fwd", mutates_args=())
def clamped_fwd_op(logits: Tensor, targets: Tensor, inv_temp: float, ignore_index: int, clamp_fraction: float,
                   stats: bool, use_triton: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                           Tensor]:
    launch = clamped_fwd if use_triton else clamped_fwd_torch
    return tuple(launch(logits, targets, inv_temp, ignore_index, clamp_fraction, stats))


@clamped_fwd_op.register_fake
def _(logits, targets, inv_temp, ignore_index, clamp_fraction, stats, use_triton):
    acc = acc_dtype(logits.dtype)
    outs = new_outputs(targets, acc, stats)
    return (*outs, torch.empty(targets.shape, dtype=acc, device=targets.device),
            torch.empty((3, *targets.shape), dtype=acc, device=targets.device))


@torch.library.custom_op("covkernels::clamped_bwd", mutates_args=())
def clamped_bwd_op(logits: Tensor, targets: Tensor, lse2: Tensor, entropy: Tensor, clamped_entropy: Tensor,
                   state: Tensor, grad_logp: Tensor, grad_entropy: Tensor, grad_clamped: Tensor, inv_temp: float,
                   ignore_index: int, use_triton: bool) -> Tensor:
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    args = (logits, targets, lse2, entropy, clamped_entropy, state, grad_logp, grad_entropy, grad_clamped, inv_temp,
            ignore_index)
    launch = clamped_bwd if use_triton else clamped_bwd_torch
    return launch(*args, out)


@clamped_bwd_op.register_fake
def _(logits, *args):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _clamped_setup_context(ctx, inputs, output):
    logits, targets, inv_temp, ignore_index, _, _, use_triton = inputs
    _, entropy, _, _, _, lse2, clamped_entropy, state = output
    ctx.save_for_backward(logits, targets, lse2, entropy, clamped_entropy, state)
    ctx.args = (inv_temp, ignore_index, use_triton)


def _clamped_backward(ctx, grad_logp, grad_entropy, _lse, _s2, _s3, _lse2, grad_clamped, _state):
    saved = ctx.saved_tensors
    entropy = saved[3]
    grads = [torch.zeros_like(entropy) if g is None else g for g in (grad_logp, grad_entropy, grad_clamped)]
    return clamped_bwd_op(*saved, *grads, *ctx.args), None, None, None, None, None, None


clamped_fwd_op.register_autograd(_clamped_backward, setup_context=_clamped_setup_context)
first_order_only(clamped_bwd_op)
