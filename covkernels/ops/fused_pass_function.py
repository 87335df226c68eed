"""The fused pass as torch custom ops, so autograd and torch.compile see one opaque op each way.

covkernels::fused_fwd       logits, targets -> (logp, entropy, lse, sum_p2, sum_p2_logp, lse2)
covkernels::fused_bwd       -> a new gradient in the logits' dtype
covkernels::fused_bwd_      -> the gradient written into the logits' storage (inplace_backward=True)
covkernels::clamped_fwd     the same plus AEnt's clamped entropy (and what its backward needs)
covkernels::clamped_bwd     -> the gradient of logp, entropy and clamped entropy

Each op runs the Triton launcher or the chunked PyTorch one (`use_triton`); both take the same
arguments. Double backward is not supported: differentiating the backward ops raises a clear error.
"""
import torch
from torch import Tensor

from .clamped_entropy import clamped_bwd, clamped_fwd
from .clamped_entropy_torch import clamped_bwd_torch, clamped_fwd_torch
from .fused_pass import fused_bwd, fused_fwd
from .fused_pass_torch import fused_bwd_torch, fused_fwd_torch
from .layout import acc_dtype, new_outputs


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


def _no_double_backward(ctx, *grads):
    raise RuntimeError("covkernels: double backward through the fused pass is not supported (the gradient of "
                       "logprobs_and_entropy / token_stats / policy_loss is first-order only)")


def _no_context(ctx, inputs, output):
    pass


# The in-place op mutates its input and so cannot take an autograd formula; it overwrites the logits,
# which leaves nothing to differentiate a second time.
fused_bwd_op.register_autograd(_no_double_backward, setup_context=_no_context)


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
clamped_bwd_op.register_autograd(_no_double_backward, setup_context=_no_context)
