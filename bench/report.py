"""The main job's table and its results file."""
import json
import os

CONVENTIONS = {
    "bytes": "from the algorithm, valid rows only, the same for every provider of a case: fwd reads the "
             "valid logits + targets and writes logp, entropy; fwd_bwd adds a second read of the valid "
             "logits + the per-row vectors and a write of the whole [N, V] gradient (in place: the same "
             "bytes)",
    "gbps": "bytes / median time; frac_copy = gbps / measured device-to-device copy bandwidth (read + write)",
    "time": "CUDA events per call after warm-up, median; inputs rotated over input_sets sets (> 2 x L2 where "
            "memory allows). On a CPU: time.perf_counter medians (interpreter times when TRITON_INTERPRET=1)",
    "peak_extra_bytes": "torch.cuda.max_memory_allocated during one call minus memory allocated before it "
                        "(the inputs); outputs and the gradient included",
    "errors": "max |provider - python_ref(float64)| per output over the checked rows (all rows of a small "
              "case, 64+ rows of a big one); a provider is timed only if within 4 x plain PyTorch's error "
              "in the input dtype + tolerance",
    "inputs": "logits [B, T, V] = 3 N(0, 1), T = min(N / 4, 1024); padded cases: the tail of each sequence "
              "past its length (spread evenly from T down to 0.4 T) has target ignore_index, 30% in all; "
              "temperature 1; covkernels with validate=False",
    "linear": "LM-head rows (op linear_fwd, linear_fwd_bwd; case N x D x V): hidden [B, T, D] = N(0, 1), weight "
              "[V, D] = N(0, 9 / D), no bias, temperature 1; padded cases: a third of the targets ignore_index. "
              "flops = 2 N D V (forward: h @ W.T) or 6 N D V (+ dz @ W, dz.T @ h), all N rows, the same for "
              "every provider; tflops = flops / median time; frac_matmul = torch_matmul's median time / this "
              "provider's, the same run; peak_extra_bytes = max_memory_allocated during one call - memory "
              "allocated before it - required_bytes (fp32 logp and entropy, and d_hidden + d_weight in the "
              "input dtype in the backward); peak_extra_frac_logits = that / (N V e), the logits' size; "
              "errors: logp, entropy and d_hidden at the checked rows, d_weight at the checked vocabulary "
              "entries, against float64 (torch_matmul: its logits)",
    "cpu": "CPU-path rows (op cpu_fwd, cpu_fwd_bwd; bench/cpu_path.py): CPU figures, on CPU tensors without "
           "the interpreter, inputs as above (no padding, temperature 1); first call ms = the checking call "
           "(torch.compile compiles there); median of 7 calls after 1 more, the providers taking turns; "
           "x compile = median / compiled_ref's median in the same case; peak extra = resident-set high-water "
           "mark during one call - resident set before it (malloc_trim first), outputs and gradient included; "
           "of logits = that / (N V e)",
}

_COLUMNS = ("case", "provider", "max err", "median ms", "MB moved", "GB/s", "of copy", "peak extra MB",
            "note")


def _fmt(row):
    def num(x, f):
        return "-" if x is None else format(x, f)

    status = row["status"]
    note = row["note"] if status == "ok" else status
    if status == "wrong":
        note = f"WRONG (not timed) {row['note']}"
    return (row["case"], row["provider"], num(row["max_err"], ".1e"), num(row["median_ms"], ".3f"),
            num(row["bytes"] / 1e6, ".1f"), num(row["gbps"], ".0f" if (row["gbps"] or 0) >= 10 else ".2g"),
            "-" if row["frac_copy"] is None else f"{100 * row['frac_copy']:.0f}%",
            num(None if row["peak_extra_bytes"] is None else row["peak_extra_bytes"] / 1e6, ".1f"), note)


def table(rows, columns=_COLUMNS, fmt=_fmt):
    """A fixed-width text table, one line per row, a blank line between cases."""
    cells = [columns] + [fmt(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns) - 1)]
    lines, last = [], None
    for i, c in enumerate(cells):
        if i > 1 and c[0] != last:
            lines.append("")
        last = c[0]
        lines.append("  ".join(x.ljust(w) for x, w in zip(c, widths)) + "  " + c[-1])
    return "\n".join(line.rstrip() for line in lines)


_LINEAR_COLUMNS = ("case", "provider", "max err", "median ms", "TFLOP/s", "of torch mm", "peak extra MB",
                   "of logits", "note")


def _fmt_linear(row):
    def num(x, f):
        return "-" if x is None else format(x, f)

    def pct(x):
        return "-" if x is None else f"{100 * x:.0f}%" if abs(x) >= 0.1 else f"{100 * x:.2g}%"

    status = row["status"]
    note = row["note"] if status == "ok" else f"WRONG (not timed) {row['note']}" if status == "wrong" else status
    return (row["case"], row["provider"], num(row["max_err"], ".1e"), num(row["median_ms"], ".3f"),
            num(row["tflops"], ".0f" if (row["tflops"] or 0) >= 10 else ".2g"), pct(row["frac_matmul"]),
            num(None if row["peak_extra_bytes"] is None else row["peak_extra_bytes"] / 1e6, ".1f"),
            pct(row["peak_extra_frac_logits"]), note)


def linear_table(rows):
    """The LM-head rows' table: TFLOP/s, fraction of torch_matmul, peak extra memory and its fraction of
    the logits' size instead of bytes moved."""
    return table(rows, _LINEAR_COLUMNS, _fmt_linear)


def linear_targets(rows, provider="covkernels_linear"):
    """One line per unpadded bf16 case at the LM head's target shape: the provider's fraction of torch_matmul
    and peak extra memory against the targets (cases_linear.TARGET_*), each "met", "MISSED" or "n/a"."""
    from .cases_linear import TARGET_FRAC_MATMUL, TARGET_PEAK_FRAC_LOGITS, TARGET_SHAPE

    def verdict(value, ok):
        return "n/a" if value is None else "met" if ok else "MISSED"

    lines = []
    for r in rows:
        if (r["provider"], r["dtype"], r["pad"]) != (provider, "bf16", 0.0) or \
                (r["N"], r["D"], r["V"]) != TARGET_SHAPE:
            continue
        frac, mem = r["frac_matmul"], r["peak_extra_frac_logits"]
        want = TARGET_FRAC_MATMUL[r["op"]]
        lines.append(f"target {r['case']}: {provider} at "
                     f"{'-' if frac is None else f'{100 * frac:.0f}%'} of torch mm (>= {100 * want:.0f}%: "
                     f"{verdict(frac, frac is not None and frac >= want)}), peak extra "
                     f"{'-' if mem is None else f'{100 * mem:.1f}%'} of the logits (< "
                     f"{100 * TARGET_PEAK_FRAC_LOGITS:.0f}%: "
                     f"{verdict(mem, mem is not None and mem < TARGET_PEAK_FRAC_LOGITS)}); {r['status']}")
    return lines


def banner(text):
    bar = "!" * 100
    return f"{bar}\n!! {text}\n{bar}"


def merged(path, case_names):
    """(rows of the results file at `path` for cases not among `case_names`, its metadata or None): what
    --merge keeps of an earlier run on this device, so that two steps of one session share one file."""
    if not os.path.exists(path):
        return [], None
    with open(path) as f:
        old = json.load(f)
    kept = [r for r in old.get("rows", []) if r["case"] not in set(case_names)]
    return kept, {k: old.get(k) for k in ("git_commit", "date", "mode", "argv")}


def write(path, meta, rows):
    """Writes the results file: metadata, conventions and one row per (case, provider)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({**meta, "conventions": CONVENTIONS, "rows": rows}, f, indent=1)
        f.write("\n")
