"""covkernels: fused Triton kernels for the entropy-control hot path of LLM reinforcement learning."""
from . import distributed, schedules, theory
from .aent import AEntController
from .dynamics import EntropyChange, entropy_change_from_logits
from .linear import LMHead, linear_logprobs_and_entropy, linear_token_stats
from .logprobs import TokenStats, entropy_change, logprobs_and_entropy, token_stats
from .losses import LossConfig, agg_loss, clip_cov_loss, kl_cov_loss, policy_loss, ppo_loss, token_loss
from .modules import PolicyLoss
from .selection import clip_cov_select, cov_scores, kl_cov_select
from .theory import EntropyLaw, entropy_regularized_policy, fit_entropy_law

__all__ = [
    "EntropyChange",
    "AEntController",
    "EntropyLaw",
    "LMHead",
    "LossConfig",
    "PolicyLoss",
    "TokenStats",
    "agg_loss",
    "clip_cov_loss",
    "clip_cov_select",
    "cov_scores",
    "distributed",
    "entropy_change",
    "entropy_change_from_logits",
    "entropy_regularized_policy",
    "fit_entropy_law",
    "kl_cov_loss",
    "kl_cov_select",
    "linear_logprobs_and_entropy",
    "linear_token_stats",
    "logprobs_and_entropy",
    "policy_loss",
    "ppo_loss",
    "schedules",
    "theory",
    "token_loss",
    "token_stats",
]
__version__ = "0.1.0"
