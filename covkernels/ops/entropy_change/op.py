"""The entropy change under a logit update as a torch custom op (one opaque call for torch.compile; a
measurement, with no gradient):

covkernels::entropy_change   logits_before, logits_after, row_mask -> (predicted, actual)

It runs the Triton launcher or the chunked PyTorch one (`use_triton`); both take the same arguments.
"""
import torch
from torch import Tensor

from ..common.layout import acc_dtype
from .kernels import entropy_change_fwd
from .torch_path import entropy_change_fwd_torch


@torch.library.custom_op("covkernels::entropy_change", mutates_args=())
def entropy_change_op(logits_before: Tensor, logits_after: Tensor, row_mask: Tensor, temperature: float,
                      use_triton: bool) -> tuple[Tensor, Tensor]:
    launch = entropy_change_fwd if use_triton else entropy_change_fwd_torch
    return launch(logits_before, logits_after, row_mask, temperature)


@entropy_change_op.register_fake
def _(logits_before, logits_after, row_mask, temperature, use_triton):
    acc = acc_dtype(logits_before.dtype)
    shape = logits_before.shape[:-1]
    return (torch.empty(shape, dtype=acc, device=logits_before.device),
            torch.empty(shape, dtype=acc, device=logits_before.device))
