"""The CPU path side by side, as CPU figures: covkernels' chunked PyTorch path (impl="torch", what a CPU
tensor gets without the interpreter) against plain PyTorch in eager mode (python_ref in the input dtype),
TRL's torch functions (selective_log_softmax + entropy_from_logits) and torch.compile of the plain version.

Cases (ops cpu_fwd, cpu_fwd_bwd): N = 1024 x V = 32000 in fp32 and bf16, forward and forward + backward
(the target: covkernels within TARGET_RATIO x torch.compile's time), and N = 512 x V = 151936 bf16
forward for memory (target: peak extra memory at most TARGET_PEAK_FRAC_LOGITS x the logits). Each provider
is checked against python_ref in float64 (bench/check.py) by its first call, which is timed on its own
(torch.compile compiles there); then WARMUP and REPS rounds of one call per provider (time.perf_counter,
the median of REPS is reported), round-robin so that other load on a shared machine hits all alike. Peak
extra memory: the resident-set high-water mark during one call above the resident set before it
(timing.peak_extra_rss_bytes), outputs and gradient included.
"""
import dataclasses
import time

import torch

from . import cases as C
from . import check, report, runner, timing
from .providers import BY_NAME, Provider

OPS = ("cpu_fwd", "cpu_fwd_bwd")
SPEED_SHAPE = (1024, 32000)
MEMORY_CASE = (512, 151936, "bf16")
TARGET_RATIO = 1.5
TARGET_PEAK_FRAC_LOGITS = 0.35
WARMUP, REPS = 1, 7
BASELINE = "compiled_ref"


@dataclasses.dataclass(frozen=True)
class CpuCase(C.Case):
    """A logits case (op "fwd" or "fwd_bwd") measured on the CPU path; named "cpu <op> NxV dtype"."""

    @property
    def name(self):
        return f"cpu {super().name}"


def cases(ops=OPS):
    speed = [CpuCase(op.removeprefix("cpu_"), *SPEED_SHAPE, dtype) for dtype in ("fp32", "bf16") for op in ops]
    return speed + ([CpuCase("fwd", *MEMORY_CASE)] if "cpu_fwd" in ops else [])


def _covkernels_torch():
    import covkernels as ck

    def fn(logits, targets):
        return ck.logprobs_and_entropy(logits, targets, ignore_index=C.IGNORE_INDEX, validate=False, impl="torch")
    return fn


PROVIDERS = [Provider("covkernels_torch", "ours", _covkernels_torch, note="impl='torch': the chunked PyTorch path"),
             BY_NAME["python_ref"], BY_NAME["trl"], BY_NAME[BASELINE]]
BY_NAME_CPU = {p.name: p for p in PROVIDERS}


def _failed(row, e):
    row["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def _check(case, provider, fn, inputs, ref_out, rows):
    """(row, run): the provider's first call, timed on its own (torch.compile compiles there) and checked
    against the float64 reference; run is None unless it passed."""
    row = dict(runner.base_row(case, provider, None), op="cpu_" + case.op, first_call_ms=None,
               peak_extra_frac_logits=None, input_sets=1)
    run = inputs.call(fn)
    try:
        t0 = time.perf_counter()
        out = run(0)
        row["first_call_ms"] = (time.perf_counter() - t0) * 1e3
        errors, ok, worst = check.compare(case, provider, out, ref_out, rows)
    except Exception as e:  # noqa: BLE001 -- one failing provider must not end the run: the row says why
        _failed(row, e)
        return row, None
    row.update(errors=errors, max_err=worst, status="ok" if ok else "wrong")
    return row, run if ok else None


def run_case(case, providers, on_row=None):
    """All providers of one case on the CPU; returns the rows. The timed calls go round the providers REPS
    times, so that a load coming and going on a shared machine falls on all of them alike."""
    device = torch.device("cpu")
    inputs = runner.CaseInputs(case, device, 1)
    rows = C.check_rows(case, device)
    ref_out = check.reference(case, *inputs.sets[0], inputs.grads, rows)
    out, timed = [], []
    for provider in providers:
        fn, reason = runner.load(provider)
        if fn is None:
            out.append(dict(runner.base_row(case, provider, None), op="cpu_" + case.op, status=f"skipped: {reason}"))
            continue
        row, run = _check(case, provider, fn, inputs, ref_out, rows)
        out.append(row)
        if run is not None:
            timed.append((row, run))
    for rep in range(-WARMUP, REPS):
        for row, run in timed:
            if row["status"] != "ok":
                continue
            try:
                t0 = time.perf_counter()
                run(0)
                if rep >= 0:
                    row["times_ms"].append((time.perf_counter() - t0) * 1e3)
            except Exception as e:  # noqa: BLE001
                _failed(row, e)
    logits_bytes = case.N * case.V * case.torch_dtype.itemsize
    for row, run in timed:
        if row["status"] == "ok":
            row.update(timing.summarize(row["times_ms"], row["bytes"], None))
            peak = timing.peak_extra_rss_bytes(run)
            row.update(peak_extra_bytes=peak, peak_extra_frac_logits=None if peak is None else peak / logits_bytes)
    for row in out:
        if on_row:
            on_row(row)
    return out


def _ratios(rows):
    """{(case, provider): median time / the BASELINE's median time in the same case}."""
    base = {r["case"]: r["median_ms"] for r in rows if r["provider"] == BASELINE and r["median_ms"]}
    return {(r["case"], r["provider"]): r["median_ms"] / base[r["case"]]
            for r in rows if r["median_ms"] and r["case"] in base}


def table(rows):
    ratios = _ratios(rows)

    def fmt(r):
        def num(x, f):
            return "-" if x is None else format(x, f)

        note = r["note"] if r["status"] == "ok" else r["status"]
        frac = r.get("peak_extra_frac_logits")
        return (r["case"], r["provider"], num(r["max_err"], ".1e"), num(r.get("first_call_ms"), ".0f"),
                num(r["median_ms"], ".1f"), num(ratios.get((r["case"], r["provider"])), ".2f"),
                num(None if r["peak_extra_bytes"] is None else r["peak_extra_bytes"] / 1e6, ".1f"),
                "-" if frac is None else f"{100 * frac:.1f}%", note)

    columns = ("case", "provider", "max err", "first call ms", "median ms", "x compile", "peak extra MB",
               "of logits", "note")
    return report.table(rows, columns, fmt)


def targets(rows, provider="covkernels_torch"):
    """One line per case for `provider`: time against torch.compile's, or (memory case) peak extra memory
    against the logits' size, each "met", "MISSED" or "n/a"."""
    ratios, lines = _ratios(rows), []
    for r in rows:
        if r["provider"] != provider:
            continue
        if (r["N"], r["V"], r["dtype"]) == MEMORY_CASE:
            frac = r.get("peak_extra_frac_logits")
            verdict = "n/a" if frac is None else "met" if frac <= TARGET_PEAK_FRAC_LOGITS else "MISSED"
            value = "-" if frac is None else f"{100 * frac:.1f}%"
            lines.append(f"target {r['case']}: {provider} peak extra {value} of the logits "
                         f"(<= {100 * TARGET_PEAK_FRAC_LOGITS:.0f}%: {verdict})")
        else:
            ratio = ratios.get((r["case"], provider))
            verdict = "n/a" if ratio is None else "met" if ratio <= TARGET_RATIO else "MISSED"
            lines.append(f"target {r['case']}: {provider} at {'-' if ratio is None else f'{ratio:.2f}'} x "
                         f"torch.compile's time (<= {TARGET_RATIO} x: {verdict})")
    return lines
