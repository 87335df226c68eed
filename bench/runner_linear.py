"""One LM-head measurement: a (case, provider) pair checked, timed and sized, as one row of the results.

Rows carry the keys of runner.base_row (bytes, gbps and frac_copy stay None: the LM head is bound by its
matrix products, not by memory traffic) and: D, flops (cases_linear.flops), tflops (flops / median time),
frac_matmul (torch_matmul's median time over this provider's, both from this run: the fraction of torch's
matrix-product throughput), logits_bytes (N V e), required_bytes (cases_linear.required_bytes),
peak_extra_bytes (torch.cuda.max_memory_allocated during one call, minus what was allocated before it,
minus required_bytes) and peak_extra_frac_logits (peak_extra_bytes / logits_bytes).
"""
import statistics

import torch

from . import cases as C
from . import cases_linear as L
from . import check_linear, runner, timing


class LinearInputs:
    """The input sets of one case (hidden, weight, targets), built on the device, and the upstream grads."""

    def __init__(self, case, device, n_sets):
        self.case, self.n_sets = case, n_sets
        self.grads = C.upstream_grads(case, device)
        self.sets = [L.make_inputs(case, device, seed=s) for s in range(n_sets)]
        if case.op == "linear_fwd_bwd":
            for hidden, weight, _ in self.sets:
                hidden.requires_grad_()
                weight.requires_grad_()

    def call(self, provider, fn):
        """f(i): one call on input set i % n_sets, returning a dict of outputs: logp, entropy (or None) and,
        in the backward, d_hidden and d_weight of sum(g_logp logp + g_ent entropy); the baseline's own."""
        backward = self.case.op == "linear_fwd_bwd"
        if provider.kind == "baseline":
            def run(i):
                hidden, weight, _ = self.sets[i % self.n_sets]
                return fn(hidden, weight, backward)
            return run

        def run(i):
            hidden, weight, targets = self.sets[i % self.n_sets]
            logp, entropy = fn(hidden, weight, targets)
            out = {"logp": logp, "entropy": entropy}
            if backward:
                outs, grads = ((logp,), self.grads[:1]) if entropy is None else ((logp, entropy), self.grads)
                out["d_hidden"], out["d_weight"] = torch.autograd.grad(outs, (hidden, weight), grads)
            return out
        return run


def base_row(case, provider, copy_gbps):
    return {"case": case.name, "op": case.op, "N": case.N, "D": case.D, "V": case.V, "dtype": case.dtype,
            "pad": case.pad, "n_valid": C.n_valid(case), "provider": provider.name, "kind": provider.kind,
            "computes": "+".join(provider.computes), "note": provider.note, "status": "ok", "errors": {},
            "max_err": None, "median_ms": None, "min_ms": None, "reps": None, "times_ms": [],
            "bytes": None, "gbps": None, "frac_copy": None, "copy_gbps": copy_gbps,
            "flops": L.flops(case), "tflops": None, "frac_matmul": None, "logits_bytes": case.logits_bytes,
            "required_bytes": L.required_bytes(case, provider.computes), "peak_extra_bytes": None,
            "peak_extra_frac_logits": None, "input_sets": None}


def measure(case, provider, fn, inputs, ref_out, rows, cols, copy_gbps):
    """Checks fn on input set 0, then times it over all sets and takes its peak extra memory."""
    row = base_row(case, provider, copy_gbps)
    row.update(input_sets=inputs.n_sets, note=getattr(fn, "note", provider.note))
    run = inputs.call(provider, fn)
    try:
        errors, ok, worst = check_linear.compare(case, provider, run(0), ref_out, rows, cols)
        row.update(errors=errors, max_err=worst)
        if not ok:
            row["status"] = "wrong"
            return row
        times = row["times_ms"] = timing.time_calls(run)
        med = statistics.median(times)
        row.update(median_ms=med, min_ms=min(times), reps=len(times),
                   tflops=row["flops"] / (med * 1e-3) / 1e12 if med > 0 else None)
        runner._free()
        peak = timing.peak_extra_bytes(run)
        if peak is not None:
            row["peak_extra_bytes"] = peak - row["required_bytes"]
            row["peak_extra_frac_logits"] = row["peak_extra_bytes"] / case.logits_bytes
    except torch.cuda.OutOfMemoryError:
        row["status"] = "oom"
    except Exception as e:  # noqa: BLE001 -- one failing provider must not end the run: the row says why
        row["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    finally:
        runner._free()
    return row


def run_case(case, providers, device, copy_gbps, skips=None, on_row=None):
    """All providers of one case, torch_matmul first (its time is every row's frac_matmul baseline)."""
    skips = skips or {}
    applicable = sorted((p for p in providers if case.op in p.ops), key=lambda p: p.kind != "baseline")
    n_sets = C.n_input_sets(case, *runner._memory_facts(device))
    try:
        inputs = LinearInputs(case, device, n_sets)
        rows = C.check_rows(case, device)
        cols = L.check_cols(case, inputs.sets[0][2], rows, device)
        ref_out = check_linear.reference(case, *inputs.sets[0], inputs.grads, rows, cols)
    except torch.cuda.OutOfMemoryError:
        runner._free()
        return [dict(base_row(case, p, copy_gbps), status="oom") for p in applicable]
    runner._free()
    out, matmul_ms = [], None
    for provider in applicable:
        fn, reason = runner.load(provider, skips.get(provider.name))
        if fn is not None and provider.skip:  # a provider that cannot run here says so first
            reason = provider.skip(case, device)
            fn = None if reason else fn
        if fn is None:
            row = dict(base_row(case, provider, copy_gbps), status=f"skipped: {reason}")
        else:
            row = measure(case, provider, fn, inputs, ref_out, rows, cols, copy_gbps)
        if provider.kind == "baseline" and row["median_ms"]:
            matmul_ms = row["median_ms"]
        if matmul_ms and row["median_ms"]:
            row["frac_matmul"] = matmul_ms / row["median_ms"]
        out.append(row)
        if on_row:
            on_row(row)
    del inputs
    runner._free()
    return out
