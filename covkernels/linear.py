"""Public API of the fused LM head: log-probs, entropy and per-state statistics straight from the last
hidden states and the LM-head weight, without ever holding the [N, V] logits."""
from typing import NamedTuple

import torch

from ._validation import check_lm_head
from .logprobs import TokenStats
from .ops.lm_head.op import linear_fwd_op


class LMHead(NamedTuple):
    """The input of an LM head in place of its logits: logits = hidden @ weight.T (+ bias).

    hidden [..., D], weight [V, D], bias [V] or None, all of one dtype (bf16, fp16, fp32 or fp64).
    `policy_loss(LMHead(hidden, weight), targets, ...)` takes it where it takes logits.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None


def _linear(hidden, weight, targets, bias, temperature, ignore_index, stats, validate, impl):
    use_triton = check_lm_head(hidden, weight, bias, targets, temperature, ignore_index, impl, validate)
    return linear_fwd_op(hidden, weight, bias, targets, 1.0 / float(temperature), int(ignore_index), stats,
                         use_triton)


def linear_logprobs_and_entropy(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                                validate=True, impl="auto"):
    """Log-prob of the target and entropy of softmax((hidden @ weight.T + bias) / temperature), fused.

    Args:
        hidden: [..., D] bf16, fp16, fp32 (or fp64); the last dim contiguous (other layouts are copied).
        weight: [V, D], hidden's dtype and device. bias: [V] or None, the same dtype.
        targets: [...] = hidden.shape[:-1], int32/int64; `ignore_index` rows give 0 and no gradient.
            Their hidden states still enter the tiled matrix products (times 0 in d_weight): keep them
            finite, as for the unfused PyTorch (NaN there makes d_weight NaN).
        temperature, validate, impl: as `logprobs_and_entropy` ("auto": Triton on CUDA and under
            TRITON_INTERPRET=1, else chunked PyTorch; fp64 on CUDA takes the PyTorch path).

    Returns:
        (logp, entropy): [...] fp32 (fp64 for fp64 inputs), differentiable with respect to hidden, weight
        and bias; logp <= 0, entropy >= 0.

    Memory: the logits exist only as fp32 tiles in registers (forward) and as one [N, V_chunk] block of
    their gradient in the backward. Extra memory beyond inputs, outputs and gradients, Triton path:
        forward   24 * N * S bytes of per-split accumulators (S <= 64 vocabulary splits);
        backward  N * V_chunk * itemsize (the gradient of one vocabulary chunk of the logits, V_chunk <=
                  8192 and N * V_chunk <= 2^25) + N * D * itemsize (d_hidden's running rounding error,
                  bf16/fp16 only), + a copy of hidden when hidden.reshape(-1, D) is not a view.
    At N = 16384, D = 4096, V = 151936 in bf16 that is 192 MiB, 4% of the 4.6 GiB of logits. The chunked
    PyTorch path holds a few fp32 blocks of <= 2^21 elements, fp32 copies of one block of hidden and of
    one weight chunk, and an fp32 d_hidden.

    Example:
        >>> hidden = torch.randn(2, 5, 64, dtype=torch.bfloat16, requires_grad=True)
        >>> weight = torch.randn(32000, 64, dtype=torch.bfloat16, requires_grad=True)
        >>> targets = torch.randint(0, 32000, (2, 5))
        >>> logp, entropy = linear_logprobs_and_entropy(hidden, weight, targets, temperature=0.7)
        >>> (logp.sum() + 0.01 * entropy.sum()).backward()
    """
    logp, entropy, *_ = _linear(hidden, weight, targets, bias, temperature, ignore_index, False, validate, impl)
    return logp, entropy


def linear_token_stats(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100, validate=True,
                       impl="auto"):
    """`token_stats` of the logits hidden @ weight.T + bias, fused like `linear_logprobs_and_entropy`.

    Returns a TokenStats of [...] fp32 tensors (clamped_entropy is None: AEnt's threshold needs the
    whole row of logits at once, so it is only offered on the logits path).
    """
    logp, entropy, lse, sum_p2, sum_p2_logp, _ = _linear(hidden, weight, targets, bias, temperature, ignore_index,
                                                         True, validate, impl)
    p_target = torch.where(targets != ignore_index, logp.detach().exp(), 0.0)
    return TokenStats(logp, entropy, lse.detach(), p_target, sum_p2.detach(), sum_p2_logp.detach())
