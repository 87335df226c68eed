"""The LM-head cases: log-prob and entropy of softmax(hidden @ weight.T) straight from the hidden states.

A case is one op ("linear_fwd": logp and entropy; "linear_fwd_bwd": the same and the gradients of both with
respect to hidden and weight) at one shape N x D x V (tokens x hidden size x vocabulary), dtype and
padding. Inputs are laid out as in a trainer: hidden [B, T, D], weight [V, D], targets [B, T], with the
[B, T] layout and the padding of cases.py (a random tail of every sequence is ignore_index).

FLOPs are counted from the algorithm: the matrix products any implementation must do, over all N rows
(padded rows included, as torch does them), the same count for every provider of a case. An
implementation that skips padded rows shows as more than 100% of torch_matmul in a padded case. The
softmax work, O(N V), is not counted: at D = 4096 it is under 0.1% of the products' FLOPs.
"""
import dataclasses
import math

import torch

from . import cases as C
from .cases import IGNORE_INDEX

OPS = ("linear_fwd", "linear_fwd_bwd")
TARGET_SHAPE = (16384, 4096, 151936)  # N, D, V of the fused head's targets (a Qwen-sized vocabulary)
PAD = 1 / 3  # padded cases: a third of the targets are ignore_index
# The fused head's targets at TARGET_SHAPE in bf16: fraction of torch's matrix-product
# throughput (same run) per op, and peak extra memory as a fraction of the logits' size.
TARGET_FRAC_MATMUL = {"linear_fwd": 0.70, "linear_fwd_bwd": 0.60}
TARGET_PEAK_FRAC_LOGITS = 0.05


@dataclasses.dataclass(frozen=True)
class LinearCase:
    op: str  # "linear_fwd" or "linear_fwd_bwd"
    N: int  # rows (tokens), valid and padded
    D: int
    V: int
    dtype: str  # "bf16", "fp16" or "fp32"
    pad: float = 0.0  # fraction of the positions that are padding (target = ignore_index)

    @property
    def name(self):
        pad = f" pad{round(self.pad * 100)}" if self.pad else ""
        return f"{self.op} {self.N}x{self.D}x{self.V} {self.dtype}{pad}"

    @property
    def torch_dtype(self):
        return C._DTYPES[self.dtype]

    @property
    def shape(self):
        """[B, T] of the targets, as for a logits case of N rows."""
        return C.Case("fwd", self.N, self.V, self.dtype, self.pad).shape

    @property
    def set_bytes(self):
        """Memory of one input set: hidden, weight and targets."""
        return (self.N + self.V) * self.D * self.torch_dtype.itemsize + self.N * 8

    @property
    def logits_bytes(self):
        """Size of the [N, V] logits in the input dtype (N V 2 in bf16): what a fused head must not hold."""
        return self.N * self.V * self.torch_dtype.itemsize


def flops(case):
    """Matrix-product FLOPs of the op (2 per multiply-add), over all N rows."""
    N, D, V = case.N, case.D, case.V
    # linear_fwd: logits = hidden @ weight.T
    fwd = 2 * N * D * V
    if case.op == "linear_fwd":
        return fwd
    # linear_fwd_bwd: + d_hidden = d_logits @ weight and d_weight = d_logits.T @ hidden
    return 3 * fwd


def required_bytes(case, computes):
    """Memory of what any implementation must return: each per-row output in fp32 (logp, entropy) and, in
    the backward, d_hidden and d_weight in the input dtype. Peak extra memory is counted beyond this."""
    e = case.torch_dtype.itemsize
    outputs = 4 * case.N * sum(name in ("logp", "entropy") for name in computes)
    grads = (case.N + case.V) * case.D * e if case.op == "linear_fwd_bwd" else 0
    return outputs + grads


def cases(mode, ops=OPS):
    """The LM-head cases of a run, by the modes of cases.cases: "tiny" (the interpreter: seconds on a CPU),
    "quick" (the target shape, then its padded variant), "default" (two vocabularies and the padded
    case) or "full" (three token counts x three vocabularies, and the padded case)."""
    N, D, V = TARGET_SHAPE
    if mode == "tiny":
        # Not powers of two, V not a multiple of any block: masked edges everywhere.
        shapes = [(48, 40, 300, "bf16", PAD), (48, 40, 300, "fp32", 0.0)]
    elif mode == "quick":
        shapes = [(N, D, V, "bf16", 0.0), (N, D, V, "bf16", PAD)]
    elif mode == "default":
        shapes = [(N, D, V, "bf16", 0.0), (N, D, 32000, "bf16", 0.0), (N, D, V, "bf16", PAD)]
    elif mode == "full":
        shapes = [(n, D, v, "bf16", 0.0) for n in C.REALISTIC_N for v in C.REALISTIC_V]
        shapes.append((N, D, V, "bf16", PAD))
    else:
        raise ValueError(f"mode must be tiny, quick, default or full, got {mode!r}")
    # Shape by shape (forward, then forward + backward), so a run cut short has both ops of the first shape.
    return [LinearCase(op, *s) for s in shapes for op in OPS if op in ops]


def make_inputs(case, device, seed=0):
    """(hidden [B, T, D], weight [V, D], targets [B, T]): hidden ~ N(0, 1) and weight ~ N(0, 9 / D), so that
    the logits are ~ 3 N(0, 1) as in the logits cases; targets uniform over the vocabulary, ignore_index
    past each sequence's valid length. Generated on the device in the case's dtype."""
    B, T = case.shape
    g = torch.Generator(device=device).manual_seed(seed)
    dt = case.torch_dtype
    hidden = torch.randn(B, T, case.D, device=device, dtype=dt, generator=g)
    weight = torch.randn(case.V, case.D, device=device, dtype=dt, generator=g).mul_(3.0 / math.sqrt(case.D))
    targets = torch.randint(0, case.V, (B, T), device=device, generator=g)
    pos = torch.arange(T, device=device)
    targets[pos >= C.valid_lengths(case).to(device)[:, None]] = IGNORE_INDEX
    return hidden, weight, targets


def check_cols(case, targets, rows, device):
    """Rows of weight (vocabulary entries) where d_weight is compared with the float64 reference: all of a
    small vocabulary; of a big one the targets of the checked rows (their rows of d_weight carry the -1
    of the log-prob's gradient), the first and last entries (64-bit offsets) and a random sample."""
    if case.V <= 512:
        return torch.arange(case.V, device=device)
    t = targets.reshape(-1)[rows]
    g = torch.Generator().manual_seed(11)
    cols = torch.cat([t[t != IGNORE_INDEX].cpu(), torch.arange(8), torch.arange(case.V - 8, case.V),
                      torch.randint(0, case.V, (16,), generator=g)])
    return cols.unique().to(device)
