"""covkernels: fused Triton kernels for the entropy-control hot path of LLM reinforcement learning."""
from . import schedules
from .aent import AEntController
from .logprobs import TokenStats, entropy_change, logprobs_and_entropy, token_stats
from .losses import agg_loss, clip_cov_loss, kl_cov_loss, policy_loss, ppo_loss, token_loss
from .modules import PolicyLoss
from .selection import clip_cov_select, cov_scores, kl_cov_select

__all__ = [
    "AEntController",
    "PolicyLoss",
    "TokenStats",
    "agg_loss",
    "clip_cov_loss",
    "clip_cov_select",
    "cov_scores",
    "entropy_change",
    "kl_cov_loss",
    "kl_cov_select",
    "logprobs_and_entropy",
    "policy_loss",
    "ppo_loss",
    "schedules",
    "token_loss",
    "token_stats",
]
__version__ = "0.1.0"
