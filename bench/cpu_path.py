"""The CPU family: the CPU path side by side, as CPU figures: covkernels' chunked PyTorch path (impl="torch",
what a CPU tensor gets without the interpreter) against plain PyTorch in eager mode (python_ref in the input
dtype), TRL's torch functions (selective_log_softmax + entropy_from_logits) and torch.compile of the plain
version.

Cases (ops cpu_fwd, cpu_fwd_bwd, the logits pass's fwd and fwd_bwd): N = 1024 x V = 32000 in fp32 and bf16,
forward and forward + backward (target: covkernels within TARGET_RATIO x torch.compile's time), and N = 512 x
V = 151936 bf16 forward for memory (target: peak extra memory at most TARGET_PEAK_FRAC_LOGITS x the
logits), whatever the mode. Each provider is checked against python_ref in float64 by its first call, which
is timed on its own (torch.compile compiles there); then TURNS rounds of one call per provider
(time.perf_counter, the median of the timed rounds is reported), the providers taking turns. Peak extra
memory: the resident-set high-water mark during one call above the resident set before it
(timing.peak_extra_rss_bytes), outputs and gradient included.
"""
import dataclasses

import torch

from . import cases as C
from . import env, report
from .logprobs import COMPILED_REF, PYTHON_REF, TRL, Logprobs
from .providers import Provider
from .report import megabytes, note, num, verdict

OPS = ("cpu_fwd", "cpu_fwd_bwd")
SPEED_SHAPE = (1024, 32000)
MEMORY_CASE = (512, 151936, "bf16")
TARGET_RATIO = 1.5
TARGET_PEAK_FRAC_LOGITS = 0.35
BASELINE = COMPILED_REF.name


@dataclasses.dataclass(frozen=True)
class CpuCase(C.Case):
    """A logits case measured on the CPU path (op "cpu_fwd" or "cpu_fwd_bwd"); named "cpu fwd NxV dtype"."""

    @property
    def name(self):
        return "cpu " + super().name.removeprefix("cpu_")


def _covkernels_torch():
    import covkernels as ck

    def fn(logits, targets):
        return ck.logprobs_and_entropy(logits, targets, ignore_index=C.IGNORE_INDEX, validate=False, impl="torch")
    return fn


def _ratios(rows):
    """{(case, provider): median time / the BASELINE's median time in the same case}."""
    base = {r["case"]: r["median_ms"] for r in rows if r["provider"] == BASELINE and r["median_ms"]}
    return {(r["case"], r["provider"]): r["median_ms"] / base[r["case"]]
            for r in rows if r["median_ms"] and r["case"] in base}


class CpuPath(Logprobs):
    name, title = "cpu", "CPU-path"
    ops = OPS
    cpu_figures = True
    TURNS = (1, 7)  # rounds of warm-up, then of timed calls
    providers = (Provider("covkernels_torch", "ours", _covkernels_torch,
                          note="impl='torch': the chunked PyTorch path"), PYTHON_REF, TRL, COMPILED_REF)
    printed = (("CPU path", "cpu"),)
    conventions = {
        "cpu": "CPU-path rows (op cpu_fwd, cpu_fwd_bwd; bench/cpu_path.py): CPU figures, on CPU tensors "
               "without the interpreter, inputs as above (no padding, temperature 1); first call ms = the "
               "checking call (torch.compile compiles there); median of 7 calls after 1 more, the providers "
               "taking turns; x compile = median / compiled_ref's median in the same case; peak extra = "
               "resident-set high-water mark during one call - resident set before it (malloc_trim first), "
               "outputs and gradient included; of logits = that / (N V e)"}

    def all_cases(self, mode):
        speed = [CpuCase(op, *SPEED_SHAPE, dtype) for dtype in ("fp32", "bf16") for op in OPS]
        return speed + [CpuCase("cpu_fwd", *MEMORY_CASE)]

    def heading(self):
        return report.banner(f"CPU FIGURES ({env.cpu_name()}, {torch.get_num_threads()} threads): "
                             "covkernels' chunked PyTorch path, not the Triton kernels")

    def table(self, rows):
        ratios = _ratios(rows)

        def fmt(r):
            frac = r["peak_extra_frac_logits"]
            return (r["case"], r["provider"], num(r["max_err"], ".1e"), num(r["first_call_ms"], ".0f"),
                    num(r["median_ms"], ".1f"), num(ratios.get((r["case"], r["provider"])), ".2f"),
                    megabytes(r["peak_extra_bytes"]), "-" if frac is None else f"{100 * frac:.1f}%", note(r))

        columns = ("case", "provider", "max err", "first call ms", "median ms", "x compile", "peak extra MB",
                   "of logits", "note")
        return report.table(rows, columns, fmt)

    def targets(self, rows, provider="covkernels_torch"):
        """One line per case for `provider`: time against torch.compile's, or (memory case) peak extra memory
        against the logits' size, each "met", "MISSED" or "n/a"."""
        ratios, lines = _ratios(rows), []
        for r in rows:
            if r["provider"] != provider:
                continue
            if (r["N"], r["V"], r["dtype"]) == MEMORY_CASE:
                frac = r["peak_extra_frac_logits"]
                value = "-" if frac is None else f"{100 * frac:.1f}%"
                lines.append(f"target {r['case']}: {provider} peak extra {value} of the logits (<= "
                             f"{100 * TARGET_PEAK_FRAC_LOGITS:.0f}%: "
                             f"{verdict(frac, frac is not None and frac <= TARGET_PEAK_FRAC_LOGITS)})")
            else:
                ratio = ratios.get((r["case"], provider))
                value = "-" if ratio is None else f"{ratio:.2f}"
                lines.append(f"target {r['case']}: {provider} at {value} x torch.compile's time (<= {TARGET_RATIO} "
                             f"x: {verdict(ratio, ratio is not None and ratio <= TARGET_RATIO)})")
        return lines


FAMILY = CpuPath()
