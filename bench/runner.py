"""The one runner: every (case, provider) pair of any family loaded, checked against the float64 reference,
timed and sized, as one row of the results.

The row schema, the same for every family (bench/report.py and each family's conventions say what the
figures mean):
  case, op, provider, kind, computes, note      what was measured, by whom
  the case's fields (case.fields)               N, V, dtype, pad, n_valid, bytes, logits_bytes; the LM head
                                                adds D, flops, tflops, frac_matmul and required_bytes, the
                                                policy loss its method
  status                                        "ok", "wrong" (checked and found off: not timed),
                                                "skipped: <why>", "oom" or "failed: <error>"
  errors, max_err, first_call_ms                the check (first_call_ms: that call's time)
  median_ms, min_ms, reps, times_ms             the timed calls
  gbps, frac_copy, copy_gbps                    (case.rates; None where the case counts FLOPs instead)
  peak_extra_bytes, peak_extra_frac_logits      memory beyond the inputs (and case.required_bytes)
  input_sets                                    the input sets rotated
Rows are plain dicts, written as-is to the results JSON.
"""
import gc
import time

import torch

from . import cases as C
from . import check, env, timing
from .providers import load


def free():
    # Only a GPU run needs the memory back between providers; a collection costs ~0.2 s with the peers'
    # modules loaded, which would dominate a CPU run.
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def new_row(case, provider, copy_gbps, **values):
    """A row of the schema above, not yet measured, with `values` filled in."""
    row = {"case": case.name, "op": case.op, **case.fields(provider.computes), "provider": provider.name,
           "kind": provider.kind, "computes": "+".join(provider.computes), "note": provider.note,
           "status": "ok", "errors": {}, "max_err": None, "first_call_ms": None, "median_ms": None,
           "min_ms": None, "reps": None, "times_ms": [], "gbps": None, "frac_copy": None, "copy_gbps": copy_gbps,
           "peak_extra_bytes": None, "peak_extra_frac_logits": None, "input_sets": None}
    row.update(values)
    return row


def failure(e):
    return f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


class Inputs:
    """The input sets of one case, built on the device by its family and rebuilt after a provider that
    overwrites them, and the upstream gradients of a backward."""

    def __init__(self, family, case, device, n_sets):
        self.family, self.case, self.device, self.n_sets = family, case, device, n_sets
        self.grads = C.upstream_grads(case, device)
        self.sets = None
        self.build()

    def build(self):
        self.sets = None
        free()
        self.sets = [self.family.make_inputs(self.case, self.device, s) for s in range(self.n_sets)]

    def rebuild(self):
        """build(), or no sets at all (every later provider "oom") when they no longer fit."""
        try:
            self.build()
        except torch.cuda.OutOfMemoryError:
            self.sets = None
            free()

    def runner(self, provider, fn):
        """f(i): one call of the op on input set i % n_sets, returning its outputs by name."""
        return lambda i: self.family.call(self.case, provider, fn, self.sets[i % self.n_sets], self.grads)


def prepare(family, case, device):
    """(Inputs, the float64 reference, where it is checked) of a case; raises torch.cuda.OutOfMemoryError
    when they do not fit."""
    l2, memory = (env.l2_bytes(), torch.cuda.get_device_properties(device).total_memory) \
        if device.type == "cuda" else (0, 0)
    inputs = Inputs(family, case, device, C.n_input_sets(case, l2, memory))
    return (inputs, *family.reference(case, inputs.sets[0], inputs.grads, device))


def check_provider(family, case, provider, fn, prepared, copy_gbps):
    """(row, run): the provider's checking call, timed on its own, and its outputs against the reference;
    run (f(i), one call on input set i) is None unless it passed."""
    inputs, ref_out, where = prepared
    # A provider that finds out what it runs when it loads says so in its function's note.
    row = new_row(case, provider, copy_gbps, input_sets=inputs.n_sets,
                  note=getattr(fn, "note", provider.note))
    run = inputs.runner(provider, fn)
    try:
        t0 = time.perf_counter()
        outputs = family.check_call(case, fn, run, where)
        timing.sync()
        row["first_call_ms"] = (time.perf_counter() - t0) * 1e3
        got = family.pick(case, provider, outputs, where)
        errors, ok, worst = check.score(got, ref_out, case.torch_dtype, "entropy" not in provider.computes)
        row.update(errors=errors, max_err=worst, status="ok" if ok else "wrong")
    except torch.cuda.OutOfMemoryError:
        row["status"] = "oom"
    except Exception as e:  # noqa: BLE001 -- one failing provider must not end the run: the row says why
        row["status"] = failure(e)
    return row, run if row["status"] == "ok" else None


def record(family, case, provider, row, times, run):
    """The figures of a row's timed calls, then its peak extra memory over one more call."""
    row.update(timing.summarize(times), times_ms=times)
    row.update(case.rates(row["median_ms"], row["copy_gbps"]))
    free()
    peak = family.peak_extra(run)
    if peak is not None:
        row["peak_extra_bytes"] = peak - case.required_bytes(provider.computes)
        row["peak_extra_frac_logits"] = row["peak_extra_bytes"] / case.logits_bytes


def measure(family, case, provider, row, run):
    """Times a checked provider and takes its peak extra memory; a failure there goes in its row."""
    try:
        record(family, case, provider, row, timing.time_calls(run), run)
    except torch.cuda.OutOfMemoryError:
        row["status"] = "oom"
    except Exception as e:  # noqa: BLE001
        row["status"] = failure(e)


def measure_in_turns(family, case, checked):
    """Times the checked (provider, row, run) in turns: warm-up rounds, then rounds of one timed call each,
    so that a load coming and going on a shared machine falls on all of them alike."""
    warmup, reps = family.TURNS
    times = {id(row): [] for _, row, _ in checked}
    for rep in range(-warmup, reps):
        for _, row, run in checked:
            if row["status"] != "ok":
                continue
            try:
                t0 = time.perf_counter()
                run(0)
                if rep >= 0:
                    times[id(row)].append((time.perf_counter() - t0) * 1e3)
            except Exception as e:  # noqa: BLE001
                row["status"] = failure(e)
    for provider, row, run in checked:
        if row["status"] == "ok":
            record(family, case, provider, row, times[id(row)], run)


def run_case(family, case, providers, device, copy_gbps=None, skips=None, on_row=None):
    """All providers of one case that run its op, a baseline first (the others are set against it); returns
    the rows, each also given to on_row as soon as it is complete. skips: {provider name: why not here}."""
    skips = skips or {}
    applicable = sorted((p for p in providers if p.ops is None or case.op in p.ops),
                        key=lambda p: p.kind != "baseline")
    try:
        prepared = prepare(family, case, device)
    except torch.cuda.OutOfMemoryError:
        free()
        return [new_row(case, p, copy_gbps, status="oom") for p in applicable]
    inputs, rows, checked = prepared[0], [], []
    for provider in applicable:
        fn, reason = load(provider, case, device, skips.get(provider.name))
        if inputs.sets is None:  # a rebuild below ran out of memory
            row = new_row(case, provider, copy_gbps, status="oom")
        elif fn is None:
            row = new_row(case, provider, copy_gbps, status=f"skipped: {reason}")
        else:
            row, run = check_provider(family, case, provider, fn, prepared, copy_gbps)
            if run and family.cpu_figures:
                checked.append((provider, row, run))
            elif run:
                measure(family, case, provider, row, run)
            free()
            if provider.mutates and case.backward:
                inputs.rebuild()  # the next provider must see the original inputs
        family.finish_row(row, rows)
        rows.append(row)
        if on_row and not family.cpu_figures:
            on_row(row)
    if family.cpu_figures:
        measure_in_turns(family, case, checked)
        for row in rows:
            if on_row:
                on_row(row)
    del inputs, prepared
    free()
    return rows
