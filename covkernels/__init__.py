"""covkernels: fused Triton kernels for the entropy-control hot path of LLM reinforcement learning."""
from .logprobs import TokenStats, entropy_change, logprobs_and_entropy, token_stats

__all__ = ["TokenStats", "entropy_change", "logprobs_and_entropy", "token_stats"]
__version__ = "0.1.0"
