"""The LM-head family: log-prob and entropy of softmax(hidden @ weight.T) straight from the hidden states.

A case is one op ("linear_fwd": logp and entropy; "linear_fwd_bwd": the same and the gradients of both with
respect to hidden and weight) at one shape N x D x V (tokens x hidden size x vocabulary), dtype and
padding. Inputs are laid out as in a trainer: hidden [B, T, D], weight [V, D], targets [B, T], with the
[B, T] layout and the padding of bench/cases.py (a random tail of every sequence is ignore_index).

FLOPs are counted from the algorithm: the matrix products any implementation must do, over all N rows
(padded rows included, as torch does them), the same count for every provider of a case. An
implementation that skips padded rows shows as more than 100% of torch_matmul in a padded case. The
softmax work, O(N V), is not counted: at D = 4096 it is under 0.1% of the products' FLOPs.

The check (as for the logits): the reference runs upcast from the very inputs the provider saw, on the
checked rows (logp, entropy, d_hidden) and, for d_weight, which sums over every token, on the checked
vocabulary entries with the logits built chunk by chunk over all N rows (a float64 [N, V] would not fit).
Plain PyTorch in the input dtype: bf16 logits from F.linear, then python_ref in bf16.
"""
import dataclasses
import math

import torch
import torch.nn.functional as F

from . import cases as C
from . import check, report
from .report import megabytes, note, num, pct, verdict
from .cases import IGNORE_INDEX
from .family import Family
from .lm_head_providers import PROVIDERS

OPS = ("linear_fwd", "linear_fwd_bwd")
TARGET_SHAPE = (16384, 4096, 151936)  # N, D, V of the fused head's targets (a Qwen-sized vocabulary)
PAD = 1 / 3  # padded cases: a third of the targets are ignore_index
# The fused head's targets at TARGET_SHAPE in bf16: fraction of torch's matrix-product throughput (same run)
# per op, and peak extra memory as a fraction of the logits' size.
TARGET_FRAC_MATMUL = {"linear_fwd": 0.70, "linear_fwd_bwd": 0.60}
TARGET_PEAK_FRAC_LOGITS = 0.05
CHUNK_ELEMENTS = 2**25  # float64 logits per chunk of the d_weight reference: 256 MB


@dataclasses.dataclass(frozen=True)
class LinearCase(C.Measured):
    op: str  # "linear_fwd" or "linear_fwd_bwd"
    N: int  # rows (tokens), valid and padded
    D: int
    V: int
    dtype: str  # "bf16", "fp16" or "fp32"
    pad: float = 0.0  # fraction of the positions that are padding (target = ignore_index)

    @property
    def size(self):
        return f"{self.N}x{self.D}x{self.V}"

    @property
    def set_bytes(self):
        """Memory of one input set: hidden, weight and targets."""
        return (self.N + self.V) * self.D * self.torch_dtype.itemsize + self.N * 8

    @property
    def bytes_moved(self):
        """Not counted: the LM head is bound by its matrix products, not by memory traffic (its rows' bytes,
        gbps and frac_copy stay None)."""
        return None

    @property
    def flops(self):
        """Matrix-product FLOPs of the op (2 per multiply-add), over all N rows: logits = hidden @ weight.T,
        and in the backward d_hidden = d_logits @ weight and d_weight = d_logits.T @ hidden."""
        return 2 * self.N * self.D * self.V * (3 if self.backward else 1)

    def required_bytes(self, computes):
        """Memory of what any implementation must return: each per-row output in fp32 (logp, entropy) and, in
        the backward, d_hidden and d_weight in the input dtype. Peak extra memory is counted beyond this."""
        outputs = 4 * self.N * sum(name in ("logp", "entropy") for name in computes)
        grads = (self.N + self.V) * self.D * self.torch_dtype.itemsize if self.backward else 0
        return outputs + grads

    def fields(self, computes):
        return dict(super().fields(computes), D=self.D, flops=self.flops, tflops=None, frac_matmul=None,
                    required_bytes=self.required_bytes(computes))

    def rates(self, median_ms, copy_gbps):
        return {"tflops": self.flops / (median_ms * 1e-3) / 1e12 if median_ms > 0 else None}


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
    targets[~C.padding_mask(case, device)] = IGNORE_INDEX
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


def reference(case, hidden, weight, targets, grads, rows, cols):
    """{"truth": float64 outputs, "plain": PyTorch in the input dtype}: logits, logp and entropy at `rows`,
    with the backward d_hidden at `rows` and d_weight at `cols`, each also for logp alone."""
    h, W, t = hidden.detach().reshape(-1, case.D), weight.detach(), targets.reshape(-1)
    g = tuple(x.reshape(-1) for x in grads)
    out = {}
    for key, dtype in (("truth", torch.float64), ("plain", case.torch_dtype)):
        W_as = W.to(dtype)
        x = F.linear(h[rows].to(dtype), W_as)
        side = out[key] = check.token_stats(x, t[rows], *(v[rows].to(dtype) for v in g), case.backward)
        side["logits"] = x
        if case.backward:
            side["d_hidden"] = side.pop("grad") @ W_as
            side["d_hidden_logp_only"] = side.pop("grad_logp_only") @ W_as
            # Plain PyTorch: d_logits in the input dtype, one matrix product accumulating in fp32, rounded to
            # the input dtype at the end.
            acc = torch.float64 if key == "truth" else torch.float32
            side.update({k: v.to(dtype) for k, v in _d_weight(h, W, t, g, cols, dtype, acc).items()})
    return out


def _d_weight(h, W, t, grads, cols, dtype, acc):
    """d_weight[cols] = sum over all rows of d_logits[:, cols].T @ hidden, the logits built in `dtype` chunk
    by chunk, the sum accumulated in `acc`; for both upstream sets."""
    N, D = h.shape
    out = {"d_weight": torch.zeros(len(cols), D, dtype=acc, device=h.device)}
    out["d_weight_logp_only"] = torch.zeros_like(out["d_weight"])
    step = max(1, CHUNK_ELEMENTS // W.shape[0])
    for i in range(0, N, step):
        hc = h[i:i + step].to(dtype)
        s = check.token_stats(F.linear(hc, W.to(dtype)), t[i:i + step],
                              *(x[i:i + step].to(dtype) for x in grads), True)
        out["d_weight"] += s["grad"][:, cols].to(acc).T @ hc.to(acc)
        out["d_weight_logp_only"] += s["grad_logp_only"][:, cols].to(acc).T @ hc.to(acc)
    return out


class LmHead(Family):
    name, title = "lm_head", "LM-head"
    ops = OPS
    providers = PROVIDERS
    printed = (("LM head", "linear"),)
    conventions = {
        "linear": "LM-head rows (op linear_fwd, linear_fwd_bwd; case N x D x V): hidden [B, T, D] = N(0, 1), "
                  "weight [V, D] = N(0, 9 / D), no bias, temperature 1; padded cases: a third of the targets "
                  "ignore_index. flops = 2 N D V (forward: h @ W.T) or 6 N D V (+ dz @ W, dz.T @ h), all N "
                  "rows, the same for every provider; tflops = flops / median time; frac_matmul = "
                  "torch_matmul's median time / this provider's, the same run; peak_extra_bytes = "
                  "max_memory_allocated during one call - memory allocated before it - required_bytes (fp32 "
                  "logp and entropy, and d_hidden + d_weight in the input dtype in the backward); "
                  "peak_extra_frac_logits = that / (N V e), the logits' size; errors: logp, entropy and "
                  "d_hidden at the checked rows, d_weight at the checked vocabulary entries, against float64 "
                  "(torch_matmul: its logits)"}

    def all_cases(self, mode):
        """"tiny" (not powers of two, V not a multiple of any block), "quick" (the target shape, then its
        padded variant), "default" (two vocabularies and the padded case) or "full" (three token counts x
        three vocabularies, and the padded case); shape by shape, forward then forward + backward, so that
        a run cut short has both ops of the first shape."""
        N, D, V = TARGET_SHAPE
        if mode == "tiny":
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
        return [LinearCase(op, *s) for s in shapes for op in OPS]

    def make_inputs(self, case, device, seed):
        hidden, weight, targets = make_inputs(case, device, seed)
        return hidden.requires_grad_(case.backward), weight.requires_grad_(case.backward), targets

    def call(self, case, provider, fn, inputs, grads):
        """logp, entropy (or None) and, in the backward, d_hidden and d_weight of sum(g_logp logp + g_ent
        entropy); the baseline returns its own (the matrix products alone)."""
        hidden, weight, targets = inputs
        if provider.kind == "baseline":
            return fn(hidden, weight, case.backward)
        logp, entropy = fn(hidden, weight, targets)
        out = {"logp": logp, "entropy": entropy}
        if case.backward:
            outs, upstream = ((logp,), grads[:1]) if entropy is None else ((logp, entropy), grads)
            out["d_hidden"], out["d_weight"] = torch.autograd.grad(outs, (hidden, weight), upstream)
        return out

    def reference(self, case, inputs, grads, device):
        rows = C.check_rows(case, device)
        cols = check_cols(case, inputs[2], rows, device)
        return reference(case, *inputs, grads, rows, cols), (rows, cols)

    def pick(self, case, provider, outputs, where):
        """What the provider computes at the checked rows and, with the log-prob, its gradients (d_weight at
        the checked vocabulary entries); the baseline's products are timed, not checked."""
        rows, cols = where
        got = super().pick(case, provider, {name: outputs[name] for name in provider.computes}, rows)
        if case.backward and "logp" in provider.computes:
            got["d_hidden"] = outputs["d_hidden"].reshape(-1, case.D)[rows]
            got["d_weight"] = outputs["d_weight"][cols]
        return got

    def finish_row(self, row, rows):
        """frac_matmul: the baseline's median time over this row's (the baseline runs first)."""
        times = [r["median_ms"] for r in [*rows, row] if r["kind"] == "baseline" and r["median_ms"]]
        base = times[0] if times else None
        if base and row["median_ms"]:
            row["frac_matmul"] = base / row["median_ms"]

    def table(self, rows):
        """TFLOP/s, fraction of torch_matmul, peak extra memory and its fraction of the logits' size instead
        of bytes moved."""
        def fmt(row):
            return (row["case"], row["provider"], num(row["max_err"], ".1e"), num(row["median_ms"], ".3f"),
                    num(row["tflops"], report.rate_format(row["tflops"])), pct(row["frac_matmul"]),
                    megabytes(row["peak_extra_bytes"]), pct(row["peak_extra_frac_logits"]), note(row))

        columns = ("case", "provider", "max err", "median ms", "TFLOP/s", "of torch mm", "peak extra MB",
                   "of logits", "note")
        return report.table(rows, columns, fmt)

    def targets(self, rows, provider="covkernels_linear"):
        """One line per unpadded bf16 case at TARGET_SHAPE: the provider's fraction of torch_matmul and peak
        extra memory against the targets, each "met", "MISSED" or "n/a"."""
        lines = []
        for r in rows:
            if (r["provider"], r["dtype"], r["pad"]) != (provider, "bf16", 0.0) or \
                    (r["N"], r["D"], r["V"]) != TARGET_SHAPE:
                continue
            frac, mem = r["frac_matmul"], r["peak_extra_frac_logits"]
            want = TARGET_FRAC_MATMUL[r["op"]]
            frac_text = "-" if frac is None else f"{100 * frac:.0f}%"
            mem_text = "-" if mem is None else f"{100 * mem:.1f}%"
            lines.append(f"target {r['case']}: {provider} at {frac_text} of torch mm (>= {100 * want:.0f}%: "
                         f"{verdict(frac, frac is not None and frac >= want)}), peak extra {mem_text} of the "
                         f"logits (< {100 * TARGET_PEAK_FRAC_LOGITS:.0f}%: "
                         f"{verdict(mem, mem is not None and mem < TARGET_PEAK_FRAC_LOGITS)}); {r['status']}")
        return lines


FAMILY = LmHead()
