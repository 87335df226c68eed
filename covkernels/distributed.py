"""Beyond one process: selection fixed over a whole mini-batch, and logits sharded over the vocabulary.

Data parallel. `policy_loss`, `token_loss`, `cov_scores`, `clip_cov_select`, `kl_cov_select` and
`agg_loss` take `process_group=`: the centering means, N_valid, n, the KL-Cov top-n, the Clip-Cov subset
and the aggregation denominators are then those of the batch all ranks hold together, rank r holding rows
[r B, (r + 1) B) (every rank passes the same [B, T]). The Clip-Cov keys of that whole batch are
`torch.rand((world, B, T), generator=generator)`, drawn on every rank, and rank r uses slice [r]: the
numbers `torch.rand((world * B, T))` gives one process holding the whole batch, so with generators
seeded alike the selections equal that process's (seeded apart, the subset is still uniform and agreed
by all ranks, since each rank's keys travel in the gather). Collectives per call: one all-reduce of a few float64
sums and counts, and for a selection one all-gather of each rank's n_max best candidates (key and an
"ineligible" flag, float64; n_max = selection.topn_bound), never all scores. Without process_group
everything is per call, as verl does per micro-batch.

Micro-batches. `CovSelection.build` fixes the selection once per mini-batch (and across ranks with
process_group); each micro-batch's `policy_loss(..., selection=sel[rows])` then uses it, with the
mini-batch's global denominators, so the accumulated gradient does not depend on how the mini-batch is
split. No collective runs inside the micro-batch loop.

Tensor (vocab) parallel. `vocab_parallel_token_stats` / `vocab_parallel_logprobs_and_entropy` take each
rank's logits shard [..., V / tp] and its first vocabulary index; two all-reduces in the forward (MAX of
[N], SUM of [4, N] or [6, N] with the statistics), none in the backward.
"""
import numbers
from dataclasses import dataclass

import torch

from ._validation import check_logits_targets
from .logprobs import TokenStats
from .losses.config import call_config
from .losses.policy import check_tokens
from .losses.terms import ratio_terms
from .ops.vocab_parallel.op import VocabParallelFunction
from .selection import loss_selection

__all__ = ["CovSelection", "vocab_parallel_logprobs_and_entropy", "vocab_parallel_token_stats"]


@dataclass(frozen=True, eq=False)
class CovSelection:
    """The Clip-Cov / KL-Cov selection of a whole mini-batch, fixed before its micro-batches run.

    method: the loss it was built for; selected: bool [B, T] (Clip-Cov: tokens dropped; KL-Cov: tokens
    penalised); scores: the covariance scores [B, T] (for metrics); num_tokens, num_seqs: 0-dim, the valid
    tokens and sequences of the whole mini-batch (of all ranks with process_group), used as the
    aggregation denominators of every micro-batch. `sel[start:stop]` (or `sel.split(micro_batch_size)`)
    gives the part for a micro-batch's rows; pass it as `policy_loss(..., selection=part)`.
    """

    method: str
    selected: torch.Tensor
    scores: torch.Tensor
    num_tokens: torch.Tensor
    num_seqs: torch.Tensor

    def __getitem__(self, rows):
        """The selection of rows `rows` (a slice or index of the batch dimension); same denominators."""
        return CovSelection(self.method, self.selected[rows], self.scores[rows], self.num_tokens, self.num_seqs)

    def split(self, micro_batch_size):
        """Consecutive parts of `micro_batch_size` rows, as torch.split."""
        return [self[i:i + micro_batch_size] for i in range(0, self.selected.shape[0], micro_batch_size)]

    @classmethod
    def build(cls, logp, old_logp, advantages, response_mask, config=None, *, entropy=None, generator=None,
              process_group=None, **overrides):
        """Selects over the whole mini-batch [B, T] (and every rank of process_group) at once.

        logp: the log-probs the selection is made from, detached: those of a `torch.no_grad()` forward of
            the current policy at the start of the mini-batch (what each of verl's micro-batch forwards
            computes, as the weights do not change within a mini-batch), or `old_logp` (no extra forward;
            equal to it on exactly on-policy data). entropy: from the same forward, for
            centering="state". old_logp, advantages, response_mask: as policy_loss. Use the mask the loss
            uses (response_mask with ignored targets removed).
        config, overrides: the loss's LossConfig (of numbers: `config.at(step)`) and fields by name, as
            policy_loss takes them; method, centering, the clip ratios, the Clip-Cov and KL-Cov fields
            and validate are read.
        Clip-Cov candidates exclude the tokens PPO clips at these log-probs (clip_ratio*); a ratio of 0
        selects nothing (the collectives still run, so every rank makes the same calls). The rules,
        keys and tie-breaking are policy_loss's: with one micro-batch, policy_loss(..., selection=sel)
        equals policy_loss(...) when logp equals the log-probs policy_loss computes.
        Collectives with process_group: one all-reduce of 6 float64, plus for clip_cov / kl_cov one
        all-gather of 2 * n_max float64 per rank.
        """
        config = call_config(config, overrides)
        if config.centering == "state" and entropy is None:
            raise ValueError("entropy must be given for centering='state', got None")
        tensors = dict(old_logp=old_logp, advantages=advantages, response_mask=response_mask, entropy=entropy)
        if not isinstance(logp, torch.Tensor):
            raise TypeError(f"logp must be a [B, T] tensor, got {type(logp).__name__}")
        valid = check_tokens(logp.shape, logp.device, tensors, config.validate)
        logp = logp.detach()
        terms = ratio_terms(logp, old_logp, advantages, valid, config)
        dtype = terms.pg2.dtype
        scores, selected, counts = loss_selection(
            logp.to(dtype), advantages.to(dtype), None if entropy is None else entropy.detach().to(dtype), valid,
            terms.clipped, config, generator=generator, process_group=process_group)
        if counts is None:
            num_tokens, num_seqs = valid.sum(), valid.any(-1).sum()
        else:
            num_tokens, num_seqs = counts[2], counts[3]
        return cls(config.method, selected, scores, num_tokens, num_seqs)


def _vocab_parallel(logits, targets, vocab_start, vocab_group, temperature, ignore_index, stats, validate, impl):
    use_triton = check_logits_targets(logits, targets, temperature, ignore_index, impl, validate=False)
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, numbers.Integral):
        raise TypeError(f"vocab_start must be an int, got {type(vocab_start).__name__}")
    if vocab_start < 0:
        raise ValueError(f"vocab_start must be >= 0, got {vocab_start}")
    outs = VocabParallelFunction.apply(logits, targets, int(vocab_start), vocab_group, 1.0 / float(temperature),
                                       int(ignore_index), stats, use_triton)
    if validate and not torch.compiler.is_compiling():
        # One host sync: every valid target must be held by exactly one shard (shards tile [0, V)).
        bad = (targets != ignore_index) & (outs[-1] != 1)
        if bool(bad.any()):
            first = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(f"targets{list(first)} = {int(targets[first])} is held by {int(outs[-1][first])} "
                             "vocabulary shards, expected exactly 1 (targets in [0, V), shards that tile [0, V))")
    return outs


def vocab_parallel_token_stats(logits_shard, targets, *, vocab_start, vocab_group=None, temperature=1.0,
                               ignore_index=-100, validate=True, impl="auto"):
    """`covkernels.token_stats` of logits sharded over the vocabulary across `vocab_group`.

    logits_shard: [..., V_r], this rank's columns [vocab_start, vocab_start + V_r) of the full [..., V]
        logits (bf16, fp16, fp32); the shards of the group tile [0, V) (sizes may differ).
    targets: [...] the full-vocabulary token ids, the same on every rank; ignore_index rows give 0.
    vocab_group: the tensor-parallel process group (None: the default group).
    validate: check that every valid target lies in exactly one shard (one host sync, no collective).
    Returns a TokenStats equal to that of the unsharded logits (to fp32 rounding), on every rank: logp
    and entropy differentiable (the backward writes this shard's gradient, with no collective; the
    upstream gradients must be equal on all ranks of the group), lse, p_target, sum_p2, sum_p2_logp
    detached. Collectives: all_reduce(MAX) of N values and all_reduce(SUM) of 6 N values, in fp32
    (fp64 for fp64 logits), N = targets.numel().

    Example:
        >>> # rank r of tp holds logits[..., r * V // tp : (r + 1) * V // tp]
        >>> stats = vocab_parallel_token_stats(shard, targets, vocab_start=r * V // tp, vocab_group=tp_group)
    """
    logp, entropy, lse, sum_p2, sum_p2_logp, _ = _vocab_parallel(
        logits_shard, targets, vocab_start, vocab_group, temperature, ignore_index, True, validate, impl)
    p_target = torch.where(targets != ignore_index, logp.detach().exp(), 0.0)
    return TokenStats(logp, entropy, lse, p_target, sum_p2, sum_p2_logp)


def vocab_parallel_logprobs_and_entropy(logits_shard, targets, *, vocab_start, vocab_group=None, temperature=1.0,
                                        ignore_index=-100, validate=True, impl="auto"):
    """`covkernels.logprobs_and_entropy` of vocabulary-sharded logits: (logp, entropy) [...] fp32,
    differentiable. Arguments as `vocab_parallel_token_stats`. Collectives: all_reduce(MAX) of N values
    and all_reduce(SUM) of 4 N values in the forward, none in the backward.

    Example:
        >>> logp, entropy = vocab_parallel_logprobs_and_entropy(shard, targets, vocab_start=start,
        ...                                                     vocab_group=tp_group, temperature=0.7)
        >>> loss, metrics = token_loss(logp, old_logp, adv, mask, entropy=entropy, method="kl_cov")
    """
    logp, entropy, *_ = _vocab_parallel(logits_shard, targets, vocab_start, vocab_group, temperature,
                                        ignore_index, False, validate, impl)
    return logp, entropy
