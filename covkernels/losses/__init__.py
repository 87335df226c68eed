"""Policy losses on top of the fused pass (docs/losses.md): PPO-clip, Clip-Cov, KL-Cov, entropy bonus.

    config.py       LossConfig: every setting of a loss, checked once; schedules read at a step
    policy.py       policy_loss (from logits or an LM head), token_loss (from log-probs), the method aliases
    terms.py        the per-token losses and metrics on checked inputs
    aggregation.py  agg_loss

Numbers follow verl 0.9 (compute_policy_loss_vanilla / _clip_cov / _kl_cov, agg_loss); selections are
from covkernels.selection. Nothing here synchronises with the host unless validate=True.

Data parallel (`process_group`): the centering means, N_valid, n, the selections and the aggregation
denominators are those of the whole batch of all ranks (rank r holding rows [r B, (r + 1) B), equal
[B, T] on every rank); a call makes one all-reduce of 6 float64 and, for Clip-Cov / KL-Cov, one
all-gather of 2 * n_max float64 per rank (selection.topn_bound). Each rank's loss is its share: the
sum over ranks is the whole-batch loss, and each rank's gradient is its rows' part of the whole-batch
gradient (DDP averages gradients over ranks: multiply the loss by the world size to get the sum).
Metrics stay this rank's. A precomputed `selection` (covkernels.distributed.CovSelection) replaces
all of that and makes the call collective-free.
"""
from .aggregation import agg_loss
from .config import SCHEDULED, LossConfig
from .policy import clip_cov_loss, kl_cov_loss, policy_loss, ppo_loss, token_loss

__all__ = ["SCHEDULED", "LossConfig", "agg_loss", "clip_cov_loss", "kl_cov_loss", "policy_loss", "ppo_loss",
           "token_loss"]
