"""Entropy dynamics under the actual update: Cui et al.'s Lemma 1 checked on any pair of logits.

A trainer calls `entropy_change_from_logits` on a probe batch before and after an optimizer step (same
inputs, same temperature) and logs the predicted against the measured entropy change of every row.
The op is one read of each tensor (Triton on CUDA and under TRITON_INTERPRET=1, else chunked PyTorch),
wrapped as a custom op so that torch.compile sees one opaque call. It is a measurement: no gradient.
"""
from typing import NamedTuple

import torch
from torch import Tensor

from ._validation import LOGIT_DTYPES, check_choice, check_positive, check_same_device, check_temperature_range
from ._validation import check_tensor, use_triton_for
from .ops.entropy_change.op import entropy_change_op


class EntropyChange(NamedTuple):
    """predicted and actual entropy change of each row, each [...] fp32 (fp64 for fp64 logits), detached."""

    predicted: Tensor
    actual: Tensor


def _check(logits_before, logits_after, temperature, row_mask, impl):
    """Validates the arguments; returns (row mask as bool [...], whether the Triton kernel runs)."""
    check_tensor("logits_before", logits_before, LOGIT_DTYPES)
    check_tensor("logits_after", logits_after, LOGIT_DTYPES)
    if logits_before.dim() < 1 or logits_before.shape[-1] == 0:
        raise ValueError(f"logits_before must have a non-empty vocabulary (last dim), got shape "
                         f"{tuple(logits_before.shape)}")
    if logits_after.shape != logits_before.shape:
        raise ValueError(f"logits_after must have the shape of logits_before {tuple(logits_before.shape)}, got "
                         f"{tuple(logits_after.shape)}")
    if logits_after.dtype != logits_before.dtype:
        raise TypeError(f"logits_after must have the dtype of logits_before ({logits_before.dtype}), got "
                        f"{logits_after.dtype}")
    check_same_device("logits_after", logits_after, "logits_before", logits_before)
    check_positive("temperature", temperature)
    check_temperature_range(temperature)
    check_choice("impl", impl, ("auto", "triton", "torch"))
    rows = logits_before.shape[:-1]
    if row_mask is None:
        row_mask = torch.ones(rows, dtype=torch.bool, device=logits_before.device)
    else:
        check_tensor("row_mask", row_mask, (torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64))
        if row_mask.shape != rows:
            raise ValueError(f"row_mask must have shape logits_before.shape[:-1] = {tuple(rows)}, got "
                             f"{tuple(row_mask.shape)}")
        check_same_device("row_mask", row_mask, "logits_before", logits_before)
        row_mask = row_mask != 0
    return row_mask, use_triton_for("logits_before", logits_before, impl)


def entropy_change_from_logits(logits_before, logits_after, *, temperature=1.0, row_mask=None, impl="auto"):
    """Predicted (first order) and measured entropy change of every row under the update before -> after.

    With z = logits / temperature, p = softmax(z_before), H = H(p) and dz = z_after - z_before:
        predicted = -sum_a p_a dz_a (log p_a + H) = -Cov_{a ~ p}(log p_a, dz_a)   (Cui et al., Lemma 1)
        actual    = H(softmax(z_after)) - H(softmax(z_before))
    The prediction is exact to first order for ANY logit update, so on a real model it is the actual
    change of the logits of an optimizer step that goes in (unlike `entropy_change`, which assumes the
    tabular step of one sampled token); the gap actual - predicted is second order in the step.

    Args:
        logits_before, logits_after: [..., V] bf16, fp16, fp32 (or fp64, on the PyTorch path), one shape
            and dtype; rows may be strided, the last dim contiguous. Each is read once.
        temperature: float > 0, the same for both.
        row_mask: [...] bool (or 0/1 integers): rows outside it give 0 and are never read. None: all rows.
        impl: "auto" (Triton on CUDA and with TRITON_INTERPRET=1, else chunked PyTorch), "triton", "torch".

    Returns:
        EntropyChange(predicted, actual), each [...] fp32 (fp64 for fp64 logits), detached. Entries that
        are -inf in logits_before (p = 0) add nothing to `predicted`; an entry that drops from a finite
        value to -inf has no first-order change (`predicted` is then meaningless); a NaN or +inf in a row
        makes that row NaN. Extra memory: the outputs (O(N)); a copy only for a layout with a strided
        last dim or leading dims that do not merge.

    Example:
        >>> before = torch.randn(2, 5, 1000)
        >>> after = before + 0.01 * torch.randn(2, 5, 1000)
        >>> change = entropy_change_from_logits(before, after, temperature=0.7)
        >>> (change.actual - change.predicted).abs().max()     # second order: ~1e-4
    """
    row_mask, use_triton = _check(logits_before, logits_after, temperature, row_mask, impl)
    predicted, actual = entropy_change_op(logits_before.detach(), logits_after.detach(), row_mask,
                                          float(temperature), use_triton)
    return EntropyChange(predicted, actual)
