"""The fused LM head as torch custom ops, so autograd and torch.compile see one opaque op each way.

covkernels::linear_fwd      hidden, weight, bias, targets -> (logp, entropy, lse, sum_p2, sum_p2_logp, lse2)
covkernels::linear_bwd      -> (d_hidden, d_weight, d_bias); a gradient autograd does not need is empty

Each op runs the Triton launcher or the chunked PyTorch one (`use_triton`). Double backward is not
supported: differentiating the backward op raises a clear error.
"""
from typing import Optional

import torch
from torch import Tensor

from ..common.custom_ops import first_order_only
from ..common.layout import acc_dtype, new_outputs
from .kernels import linear_bwd, linear_fwd
from .torch_path import linear_bwd_torch, linear_fwd_torch


@torch.library.custom_op("covkernels::linear_fwd", mutates_args=())
def linear_fwd_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, inv_temp: float,
                  ignore_index: int, stats: bool, use_triton: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor,
                                                                             Tensor]:
    launch = linear_fwd if use_triton else linear_fwd_torch
    return tuple(launch(hidden, weight, bias, targets, inv_temp, ignore_index, stats))


@linear_fwd_op.register_fake
def _(hidden, weight, bias, targets, inv_temp, ignore_index, stats, use_triton):
    return tuple(new_outputs(targets, acc_dtype(hidden.dtype), stats))


def _empty(like):
    return torch.empty((0,), dtype=like.dtype, device=like.device)


@torch.library.custom_op("covkernels::linear_bwd", mutates_args=())
def linear_bwd_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, lse2: Tensor,
                  entropy: Tensor, grad_logp: Tensor, grad_entropy: Tensor, inv_temp: float, ignore_index: int,
                  use_triton: bool, needs: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    launch = linear_bwd if use_triton else linear_bwd_torch
    grads = launch(hidden, weight, bias, targets, lse2, entropy, grad_logp, grad_entropy, inv_temp, ignore_index,
                   needs=tuple(needs))
    return tuple(_empty(hidden) if g is None else g for g in grads)


@linear_bwd_op.register_fake
def _(hidden, weight, bias, targets, lse2, entropy, grad_logp, grad_entropy, inv_temp, ignore_index, use_triton,
      needs):
    shapes = (hidden, weight, weight if bias is None else bias)
    return tuple(torch.empty_like(x) if need and (i < 2 or bias is not None) else _empty(hidden)
                 for i, (x, need) in enumerate(zip(shapes, needs)))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, inv_temp, ignore_index, _, use_triton = inputs
    _, entropy, _, _, _, lse2 = output
    ctx.save_for_backward(hidden, weight, bias, targets, lse2, entropy)
    ctx.args = (inv_temp, ignore_index, use_triton)


def _backward(ctx, grad_logp, grad_entropy, *_):
    hidden, weight, bias, targets, lse2, entropy = ctx.saved_tensors
    # An output that took no part in the loss arrives as None: it contributes nothing.
    grad_logp = torch.zeros_like(entropy) if grad_logp is None else grad_logp
    grad_entropy = torch.zeros_like(entropy) if grad_entropy is None else grad_entropy
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    grads = linear_bwd_op(hidden, weight, bias, targets, lse2, entropy, grad_logp, grad_entropy, *ctx.args, needs)
    return (*(g if n else None for g, n in zip(grads, needs)), None, None, None, None, None)


linear_fwd_op.register_autograd(_backward, setup_context=_setup_context)
first_order_only(linear_bwd_op)
