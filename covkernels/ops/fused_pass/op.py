"""The fused pass as torch custom ops, so autograd and torch.compile see one opaque op each way.

covkernels::fused_fwd       logits, targets -> (logp, entropy, lse, sum_p2, sum_p2_logp, lse2)
covkernels::fused_bwd       -> a new gradient in the logits' dtype
covkernels::fused_bwd_      -> the gradient written into the logits' storage (inplace_backward=True)

Each op runs the Triton launcher or the chunked PyTorch one (`use_triton`); both take the same
arguments. Double backward is not supported: differentiating the backward ops raises a clear error.
"""
import torch
from torch import Tensor

from ..common.custom_ops import first_order_only
from ..common.layout import acc_dtype, new_outputs
from .kernels import fused_bwd, fused_fwd
from .torch_path import fused_bwd_torch, fused_fwd_torch


@torch.library.custom_op("covkernels::fused_fwd", mutates_args=())
def fused_fwd_op(logits: Tensor, targets: Tensor, inv_temp: float, ignore_index: int, stats: bool,
                 use_triton: bool, inplace_backward: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    launch = fused_fwd if use_triton else fused_fwd_torch
    return tuple(launch(logits, targets, inv_temp, ignore_index, stats))


@fused_fwd_op.register_fake
def _(logits, targets, inv_temp, ignore_index, stats, use_triton, inplace_backward):
    return tuple(new_outputs(targets, acc_dtype(logits.dtype), stats))


@torch.library.custom_op("covkernels::fused_bwd", mutates_args=())
def fused_bwd_op(logits: Tensor, targets: Tensor, lse2: Tensor, entropy: Tensor, grad_logp: Tensor,
                 grad_entropy: Tensor, inv_temp: float, ignore_index: int, use_triton: bool) -> Tensor:
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    launch = fused_bwd if use_triton else fused_bwd_torch
    return launch(logits, targets, lse2, entropy, grad_logp, grad_entropy, inv_temp, ignore_index, out)


@fused_bwd_op.register_fake
def _(logits, *args):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("covkernels::fused_bwd_", mutates_args=("logits",))
def fused_bwd_inplace_op(logits: Tensor, targets: Tensor, lse2: Tensor, entropy: Tensor, grad_logp: Tensor,
                         grad_entropy: Tensor, inv_temp: float, ignore_index: int, use_triton: bool) -> None:
    launch = fused_bwd if use_triton else fused_bwd_torch
    launch(logits, targets, lse2, entropy, grad_logp, grad_entropy, inv_temp, ignore_index, logits)


@fused_bwd_inplace_op.register_fake
def _(logits, *args):
    return None


def _setup_context(ctx, inputs, output):
    logits, targets, inv_temp, ignore_index, _, use_triton, inplace_backward = inputs
    _, entropy, _, _, _, lse2 = output
    ctx.save_for_backward(logits, targets, lse2, entropy)
    ctx.args = (inv_temp, ignore_index, use_triton)
    ctx.inplace_backward = inplace_backward


def _backward(ctx, grad_logp, grad_entropy, *_):
    logits, targets, lse2, entropy = ctx.saved_tensors
    # An output that took no part in the loss arrives as None: it contributes nothing.
    grad_logp = torch.zeros_like(entropy) if grad_logp is None else grad_logp
    grad_entropy = torch.zeros_like(entropy) if grad_entropy is None else grad_entropy
    args = (logits, targets, lse2, entropy, grad_logp, grad_entropy, *ctx.args)
    if ctx.inplace_backward:
        fused_bwd_inplace_op(*args)
        grad = logits
    else:
        grad = fused_bwd_op(*args)
    return grad, None, None, None, None, None, None


fused_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# The in-place op mutates its input and so cannot take an autograd formula; it overwrites the logits,
# which leaves nothing to differentiate a second time.
first_order_only(fused_bwd_op)
