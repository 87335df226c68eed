"""One measurement: a (case, provider) pair checked, timed and sized, as one row of the results.

A row's `status` is "ok", "wrong" (checked and found off: not timed), "skipped: <why>" (not installed,
not run on this device), "oom" or "failed: <error>". Rows are plain dicts, written as-is to the JSON.
"""
import gc

import torch

from . import cases as C
from . import check, timing
from .providers import Unavailable, fwd_bwd


class CaseInputs:
    """The input sets of one case, built on the device and rebuilt after a provider that overwrites them."""

    def __init__(self, case, device, n_sets):
        self.case, self.device, self.n_sets = case, device, n_sets
        self.grads = C.upstream_grads(case, device)
        self.sets = None
        self.build()

    def build(self):
        self.sets = None
        _free()
        self.sets = [C.make_inputs(self.case, self.device, seed=s) for s in range(self.n_sets)]
        if self.case.op == "fwd_bwd":
            for logits, _ in self.sets:
                logits.requires_grad_()

    def call(self, fn):
        """f(i): one call of the op on input set i % n_sets, returning (logp, entropy, grad or None)."""
        if self.case.op == "fwd":
            def run(i):
                logits, targets = self.sets[i % self.n_sets]
                return (*fn(logits, targets), None)
        else:
            def run(i):
                logits, targets = self.sets[i % self.n_sets]
                return fwd_bwd(fn, logits, targets, *self.grads)
        return run


def _free():
    # Only a GPU run needs the memory back between providers; a collection costs ~0.2 s with the peers'
    # modules loaded, which would dominate a CPU run.
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def base_row(case, provider, copy_gbps):
    return {"case": case.name, "op": case.op, "N": case.N, "V": case.V, "dtype": case.dtype, "pad": case.pad,
            "n_valid": C.n_valid(case), "provider": provider.name, "kind": provider.kind,
            "computes": "+".join(provider.computes), "note": provider.note, "status": "ok", "errors": {},
            "max_err": None, "median_ms": None, "min_ms": None, "reps": None, "times_ms": [],
            "bytes": C.bytes_moved(case), "gbps": None, "frac_copy": None, "copy_gbps": copy_gbps,
            "peak_extra_bytes": None, "input_sets": None}


_LOADED = {}


def load(provider, skip=None):
    """(fn, None), or (None, the reason it does not run): a skip reason given by the caller, or
    Unavailable from its import. Loaded once per process (imports of the peers take seconds)."""
    if skip:
        return None, skip
    # Keyed by the loader, not the name: the logits and LM-head benchmarks each have a "python_ref".
    if provider.load not in _LOADED:
        try:
            _LOADED[provider.load] = (provider.load(), None)
        except Unavailable as e:
            _LOADED[provider.load] = (None, str(e))
    return _LOADED[provider.load]


def measure(case, provider, fn, inputs, ref_out, rows, copy_gbps):
    """Checks fn on input set 0, then times it over all sets and takes its peak extra memory."""
    row = base_row(case, provider, copy_gbps)
    row["input_sets"] = inputs.n_sets
    run = inputs.call(fn)
    try:
        errors, ok, worst = check.compare(case, provider, run(0), ref_out, rows)
        row.update(errors=errors, max_err=worst)
        if not ok:
            row["status"] = "wrong"
            return row
        row["times_ms"] = timing.time_calls(run)
        row.update(timing.summarize(row["times_ms"], row["bytes"], copy_gbps))
        _free()
        row["peak_extra_bytes"] = timing.peak_extra_bytes(run)
    except torch.cuda.OutOfMemoryError:
        row["status"] = "oom"
    except Exception as e:  # noqa: BLE001 -- one failing provider must not end the run: the row says why
        row["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    finally:
        _free()
    return row


def run_case(case, providers, device, copy_gbps, skips=None, on_row=None):
    """All providers of one case; returns the rows (one per provider that applies to case.op)."""
    skips = skips or {}
    applicable = [p for p in providers if case.op in p.ops]
    n_sets = C.n_input_sets(case, *_memory_facts(device))
    rows_out = []
    try:
        inputs = CaseInputs(case, device, n_sets)
    except torch.cuda.OutOfMemoryError:
        rows_out = [dict(base_row(case, p, copy_gbps), status="oom") for p in applicable]
        _free()
        return rows_out
    rows = C.check_rows(case, device)
    ref_out = check.reference(case, *inputs.sets[0], inputs.grads, rows)
    for provider in applicable:
        fn, reason = load(provider, skips.get(provider.name))
        if inputs.sets is None:  # a rebuild below ran out of memory
            row = dict(base_row(case, provider, copy_gbps), status="oom")
        elif fn is None:
            row = dict(base_row(case, provider, copy_gbps), status=f"skipped: {reason}")
        else:
            row = measure(case, provider, fn, inputs, ref_out, rows, copy_gbps)
            if provider.mutates and case.op == "fwd_bwd":
                try:
                    inputs.build()  # the next provider must see the original logits
                except torch.cuda.OutOfMemoryError:
                    inputs.sets = None
                    _free()
        rows_out.append(row)
        if on_row:
            on_row(row)
    del inputs
    _free()
    return rows_out


def _memory_facts(device):
    if device.type != "cuda":
        return 0, 0
    from .env import l2_bytes

    return l2_bytes(), torch.cuda.get_device_properties(device).total_memory
