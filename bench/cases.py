"""The layout every family's cases share: a case, its [B, T] layout and padding, its inputs, and the bytes
the logits pass must move.

A case is one op at one shape, dtype and padding. Inputs are laid out as in a trainer, logits [B, T, V] and
targets [B, T]; a padded case marks a random tail of every sequence with ignore_index (30% of the positions
in all).

Bytes moved are counted from the algorithm, not from any one implementation, and only for the VALID rows
of the logits: a padded row need not be read, so an implementation that reads it anyway gets no credit
for it. The same count is used for every provider of a case, so GB/s ranks providers exactly as time does.
"""
import dataclasses
import math

import torch

IGNORE_INDEX = -100
T_MAX = 1024  # sequence length of the [B, T] layout; a smaller case has 4 sequences
REALISTIC_N = (4096, 16384, 65536)
REALISTIC_V = (32000, 128256, 151936)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Measured:
    """What every family's case has, from its fields op (a name ending in "_bwd" when the op takes the
    gradient), N (rows, valid and padded), V, dtype and pad: its name and layout, and the fields and figures
    of its results rows; here those of the logits pass, the base that most families share."""

    @property
    def name(self):
        pad = f" pad{round(self.pad * 100)}" if self.pad else ""
        return f"{self.op} {self.size} {self.dtype}{pad}"

    @property
    def size(self):
        return f"{self.N}x{self.V}"

    @property
    def backward(self):
        return self.op.endswith("_bwd")

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]

    @property
    def shape(self):
        T = min(T_MAX, max(1, self.N // 4))
        if self.N % T:
            raise ValueError(f"N = {self.N} is not a whole number of sequences of {T}")
        return self.N // T, T

    @property
    def set_bytes(self):
        """Memory of one input set (logits dominate)."""
        return self.N * self.V * self.torch_dtype.itemsize + self.N * 8

    @property
    def logits_bytes(self):
        """Size of the [N, V] logits in the input dtype: what peak extra memory is set against."""
        return self.N * self.V * self.torch_dtype.itemsize

    @property
    def bytes_moved(self):
        """Bytes the logits pass must move, by the convention in the module docstring (Nv valid rows of N, e
        bytes per logit, int64 targets, fp32 per-row vectors)."""
        N, V, e, Nv = self.N, self.V, self.torch_dtype.itemsize, n_valid(self)
        # forward: read the valid logits + read targets + write logp, entropy
        fwd = Nv * V * e + N * 8 + 2 * N * 4
        if not self.backward:
            return fwd
        # backward: read the valid logits again + read targets, lse, entropy and both upstream gradients +
        # write the whole [N, V] gradient (zero on padded rows). An in-place backward writes the same bytes
        # into the logits, so it is counted the same (its saving is memory, not traffic).
        return fwd + Nv * V * e + N * (8 + 4 * 4) + N * V * e

    def required_bytes(self, computes):
        """Memory of what any implementation must return, beyond which peak memory counts as extra: nothing
        here (the outputs and the gradient count as extra, as in a trainer that holds them anyway)."""
        return 0

    def fields(self, computes):
        """The case's fields of a results row (bench/runner.py) for a provider that computes `computes`: its
        size and the work it must do."""
        return {"N": self.N, "V": self.V, "dtype": self.dtype, "pad": self.pad, "n_valid": n_valid(self),
                "bytes": self.bytes_moved, "logits_bytes": self.logits_bytes}

    def rates(self, median_ms, copy_gbps):
        """The figures of one median time: bandwidth and the fraction of the copy bandwidth."""
        gbps = self.bytes_moved / (median_ms * 1e-3) / 1e9 if median_ms > 0 else None
        return {"gbps": gbps, "frac_copy": gbps / copy_gbps if gbps and copy_gbps else None}


@dataclasses.dataclass(frozen=True)
class Case(Measured):
    """A case of the logits pass: "fwd" (log-prob and entropy) or "fwd_bwd" (and the gradient of both)."""

    op: str
    N: int  # rows (tokens), valid and padded
    V: int
    dtype: str  # "bf16", "fp16" or "fp32"
    pad: float = 0.0  # fraction of the positions that are padding (target = ignore_index)


def shapes(mode, heavy=False):
    """(N, V, dtype, pad) of a run's cases. mode: "tiny" (the interpreter: seconds on a CPU), "quick" (one
    realistic shape, for a GPU session with little time), "default" (the realistic grid in bf16, plus the
    padded layout at one shape) or "full" (the grid, each padded and in fp32 as well). A heavy op (a
    backward: it interprets twice as long) gets the padded bf16 and the fp32 tiny shapes only."""
    if mode == "tiny":
        # V = 4099: two blocks of columns, the second almost empty.
        tiny = [(64, 4099, "bf16", 0.0), (64, 4099, "bf16", 0.3), (64, 4099, "fp32", 0.0)]
        return tiny[1:] if heavy else tiny
    if mode == "quick":
        return [(16384, 151936, "bf16", 0.0), (16384, 151936, "bf16", 0.3)]
    if mode not in ("default", "full"):
        raise ValueError(f"mode must be tiny, quick, default or full, got {mode!r}")
    grid = [(n, v, "bf16", 0.0) for n in REALISTIC_N for v in REALISTIC_V]
    if mode == "default":
        return grid + [(16384, 151936, "bf16", 0.3)]
    return (grid + [(n, v, "bf16", 0.3) for n in REALISTIC_N for v in REALISTIC_V]
            + [(n, v, "fp32", 0.0) for n in REALISTIC_N for v in REALISTIC_V])


def valid_lengths(case):
    """Valid positions of each sequence: lengths spread evenly from T (the longest response sets T) down to
    (1 - 2 pad) T, so that `pad` of the positions are padding, in a fixed shuffled order."""
    B, T = case.shape
    if not case.pad:
        return torch.full((B,), T)
    spread = torch.linspace(0, 2, B) if B > 1 else torch.ones(1)
    frac = 1 - case.pad * spread[torch.randperm(B, generator=torch.Generator().manual_seed(1234))]
    return (frac * T).round().clamp(1, T).long()


def n_valid(case):
    return int(valid_lengths(case).sum())


def n_input_sets(case, l2, device_memory):
    """Input sets to rotate so that no set is still in L2 when it comes round again: more than 2 x L2 of
    inputs in all, as long as they take at most 15% of the device memory (a big case: one set, which is
    then already many times the L2)."""
    if not l2:
        return 1
    want = max(2, math.ceil(2 * l2 / case.set_bytes) + 1)
    fits = int(0.15 * device_memory // case.set_bytes) if device_memory else want
    return max(1, min(want, fits, 64))


def padding_mask(case, device):
    """[B, T] bool: True at the valid positions, False past each sequence's valid length."""
    return torch.arange(case.shape[1], device=device) < valid_lengths(case).to(device)[:, None]


def make_inputs(case, device, seed=0):
    """(logits [B, T, V], targets [B, T]): logits ~ 3 N(0, 1) (a few tokens dominate, as in an LLM), targets
    uniform over the vocabulary, ignore_index past each sequence's valid length. Generated on the device
    in the case's dtype, so a 20 GB case needs no fp32 copy."""
    B, T = case.shape
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(B, T, case.V, device=device, dtype=case.torch_dtype, generator=g).mul_(3.0)
    targets = torch.randint(0, case.V, (B, T), device=device, generator=g)
    targets[~padding_mask(case, device)] = IGNORE_INDEX
    return logits, targets


def upstream_grads(case, device):
    """Fixed upstream gradients (g_logp, g_entropy) [B, T] for the backward, fp32."""
    g = torch.Generator(device=device).manual_seed(99)
    shape = case.shape
    return (torch.randn(shape, device=device, generator=g), torch.randn(shape, device=device, generator=g))


def check_rows(case, device):
    """Flat row indices where outputs are compared with the float64 reference: every row of a small case;
    of a big one the first and last rows of the batch (64-bit offsets) and a random sample, padded rows
    included (they must come out 0)."""
    if case.N <= 512:
        return torch.arange(case.N, device=device)
    g = torch.Generator().manual_seed(7)
    rows = torch.cat([torch.arange(16), torch.arange(case.N - 16, case.N),
                      torch.randint(0, case.N, (32,), generator=g)])
    return rows.unique().to(device)
