"""Plain-PyTorch reference of covkernels: the executable form of docs/, never edited to match a kernel."""
from .aent import aent_coef_trajectory
from .dynamics import EntropyChange, entropy_change_from_logits
from .linear import LMHead, linear_logprobs_and_entropy, linear_token_stats
from .logprobs import TokenStats, clamped_entropy, entropy_change, logprobs_and_entropy, token_stats
from .policy_loss import agg_loss, clip_cov_loss, kl_cov_loss, policy_loss, ppo_loss, token_loss
from .selection import clip_cov_select, cov_scores, kl_cov_select

__all__ = [
    "EntropyChange",
    "LMHead",
    "TokenStats",
    "aent_coef_trajectory",
    "agg_loss",
    "clamped_entropy",
    "clip_cov_loss",
    "clip_cov_select",
    "cov_scores",
    "entropy_change",
    "entropy_change_from_logits",
    "kl_cov_loss",
    "kl_cov_select",
    "linear_logprobs_and_entropy",
    "linear_token_stats",
    "logprobs_and_entropy",
    "policy_loss",
    "ppo_loss",
    "token_loss",
    "token_stats",
]
