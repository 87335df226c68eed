"""Reference for the entropy change under an arbitrary logit update
(docs/entropy_dynamics.md#any-logit-update).

Computed in the dtype of the input: float64 logits give the ground truth, bf16 logits what plain PyTorch
does in bf16. `impl` is accepted and ignored, as in the rest of python_ref.
"""
from typing import NamedTuple

import torch


class EntropyChange(NamedTuple):
    """Per-row first-order prediction and measured change of the entropy, each [...] (rows' shape)."""

    predicted: torch.Tensor
    actual: torch.Tensor


def _entropy(logp):
    p = logp.exp()
    # 0 log 0 = 0: a -inf logit adds nothing.
    return p, -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)


def entropy_change_from_logits(logits_before, logits_after, *, temperature=1.0, row_mask=None, impl="auto"):
    """Cui et al.'s Lemma 1 against the measured entropy change of each row, for any logit update.

    With z = logits / temperature, p = softmax(z_before), H = H(p) and dz = z_after - z_before:
      predicted = -sum_a p_a dz_a (log p_a + H)      (= -Cov_p(log p, dz))
      actual    = H(softmax(z_after)) - H
    Entries where p_a = 0 (-inf in logits_before) add nothing to `predicted`, whatever dz_a is.
    logits_before, logits_after: [..., V] of one dtype; row_mask: [...] bool or 0/1 (None: every row);
    rows outside it give 0. Returns EntropyChange of [...] tensors in the logits' dtype, detached.
    """
    zb = logits_before.detach() / temperature
    za = logits_after.detach() / temperature
    logp = torch.log_softmax(zb, dim=-1)
    p, h_before = _entropy(logp)
    _, h_after = _entropy(torch.log_softmax(za, dim=-1))
    # p == 0 rather than p > 0: a NaN row stays NaN.
    term = torch.where(p == 0, torch.zeros_like(p), p * (za - zb) * (logp + h_before[..., None]))
    predicted, actual = -term.sum(-1), h_after - h_before
    if row_mask is not None:
        valid = row_mask != 0
        predicted = torch.where(valid, predicted, torch.zeros_like(predicted))
        actual = torch.where(valid, actual, torch.zeros_like(actual))
    return EntropyChange(predicted, actual)
