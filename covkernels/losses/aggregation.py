"""agg_loss: a per-token loss [B, T] to one number, as verl's agg_loss (docs/losses.md#aggregation)."""
import torch

from .._validation import check_choice, check_nonnegative
from ..selection import sum_over_ranks
from .config import AGG_MODES


def _div(num, den):
    """num / den with a zero denominator read as 1: an all-masked batch gives 0, never NaN."""
    den = torch.as_tensor(den, dtype=num.dtype, device=num.device)
    return num / torch.where(den > 0, den, torch.ones_like(den))


def agg_loss(loss_mat, loss_mask, loss_agg_mode="token-mean", *, num_tokens=None, num_seqs=None, horizon=None,
             process_group=None):
    """Aggregates a per-token loss [B, T] into a 0-dim tensor (docs/losses.md#aggregation);
    m = loss_mask != 0.

    token-mean: sum(L m) / N; token-sum: sum(L m); seq-mean-token-sum: sum_b sum_t(L m) / S;
    seq-mean-token-mean: sum_b [sum_t(L m) / sum_t m] / S; seq-mean-token-sum-norm: sum(L m) / S / horizon.
    N = num_tokens or sum(m); S = num_seqs or the number of sequences with a valid token; horizon =
    loss_mask.shape[-1] unless given. num_tokens / num_seqs (number or 0-dim tensor) are global
    denominators over every micro-batch and rank of the step (verl's batch_num_tokens and
    global_batch_size): summing the micro-batch losses then gives the loss, and gradient, of the whole batch.
    process_group: N and S default to their sums over the ranks of the group (one all-reduce of 2 float64
    when the mode needs a denominator that is not given; none for token-sum); the result is this rank's
    share of the whole-batch loss.
    """
    check_choice("loss_agg_mode", loss_agg_mode, AGG_MODES)
    if loss_mat.shape != loss_mask.shape:
        raise ValueError(f"loss_mask must have the shape of loss_mat {tuple(loss_mat.shape)}, "
                         f"got {tuple(loss_mask.shape)}")
    for name, value in (("num_tokens", num_tokens), ("num_seqs", num_seqs)):
        if value is not None and not isinstance(value, torch.Tensor):
            check_nonnegative(name, value)
    if horizon is not None and not horizon > 0:
        raise ValueError(f"horizon must be > 0, got {horizon}")
    m = loss_mask != 0
    masked = torch.where(m, loss_mat, torch.zeros_like(loss_mat))
    needs = num_tokens if loss_agg_mode == "token-mean" else num_seqs
    if process_group is not None and loss_agg_mode != "token-sum" and needs is None:
        counts = sum_over_ranks([m.sum(), (m.sum(-1) > 0).sum()], process_group)
        num_tokens = counts[0] if num_tokens is None else num_tokens
        num_seqs = counts[1] if num_seqs is None else num_seqs
    if loss_agg_mode == "token-sum":
        return masked.sum()
    if loss_agg_mode == "token-mean":
        return _div(masked.sum(), m.sum() if num_tokens is None else num_tokens)
    seq_tokens, seq_sums = m.sum(-1), masked.sum(-1)
    if loss_agg_mode == "seq-mean-token-mean":
        seq_sums = _div(seq_sums, seq_tokens)
    loss = _div(seq_sums.sum(), (seq_tokens > 0).sum() if num_seqs is None else num_seqs)
    if loss_agg_mode == "seq-mean-token-sum-norm":
        loss = loss / (loss_mask.shape[-1] if horizon is None else horizon)
    return loss
