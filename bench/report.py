"""The main job's tables and its results file.

The conventions here are those every family shares; each family adds its own (bench/registry.py gathers
them into the results file's "conventions").
"""
import json
import os

CONVENTIONS = {
    "gbps": "bytes / median time; frac_copy = gbps / measured device-to-device copy bandwidth (read + write)",
    "time": "CUDA events per call after warm-up, median; inputs rotated over input_sets sets (> 2 x L2 where "
            "memory allows). On a CPU: time.perf_counter medians (interpreter times when TRITON_INTERPRET=1)",
    "peak_extra_bytes": "torch.cuda.max_memory_allocated during one call minus memory allocated before it "
                        "(the inputs); outputs and the gradient included",
    "errors": "max |provider - python_ref(float64)| per output over the checked rows (all rows of a small "
              "case, 64+ rows of a big one); a provider is timed only if within 4 x plain PyTorch's error "
              "in the input dtype + tolerance (bench/tolerances.py, kind 'bench'); first_call_ms: that "
              "checking call's time (compilation and autotuning happen there)",
    "inputs": "logits [B, T, V] = 3 N(0, 1), T = min(N / 4, 1024); padded cases: the tail of each sequence "
              "past its length (spread evenly from T down to 0.4 T) has target ignore_index, 30% in all; "
              "temperature 1; covkernels with validate=False",
}


def num(x, f):
    return "-" if x is None else format(x, f)


def pct(x):
    return "-" if x is None else f"{100 * x:.0f}%" if abs(x) >= 0.1 else f"{100 * x:.2g}%"


def megabytes(x):
    return num(None if x is None else x / 1e6, ".1f")


def rate_format(x):
    """Three significant digits or so: whole numbers from 10 up, else two significant digits."""
    return ".0f" if (x or 0) >= 10 else ".2g"


def note(row):
    """The row's note, or what went wrong (a wrong provider is not timed)."""
    status = row["status"]
    if status == "wrong":
        return f"WRONG (not timed) {row['note']}"
    return row["note"] if status == "ok" else status


def verdict(value, ok):
    return "n/a" if value is None else "met" if ok else "MISSED"


def _fmt(row):
    return (row["case"], row["provider"], num(row["max_err"], ".1e"), num(row["median_ms"], ".3f"),
            num(row["bytes"] / 1e6, ".1f"), num(row["gbps"], rate_format(row["gbps"])),
            "-" if row["frac_copy"] is None else f"{100 * row['frac_copy']:.0f}%",
            megabytes(row["peak_extra_bytes"]), note(row))


_COLUMNS = ("case", "provider", "max err", "median ms", "MB moved", "GB/s", "of copy", "peak extra MB",
            "note")


def table(rows, columns=_COLUMNS, fmt=_fmt):
    """A fixed-width text table, one line per row, a blank line between cases; by default the columns of a
    memory-bound family (GB/s against the copy bandwidth)."""
    cells = [columns] + [fmt(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns) - 1)]
    lines, last = [], None
    for i, c in enumerate(cells):
        if i > 1 and c[0] != last:
            lines.append("")
        last = c[0]
        lines.append("  ".join(x.ljust(w) for x, w in zip(c, widths)) + "  " + c[-1])
    return "\n".join(line.rstrip() for line in lines)


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
    """Writes the results file: metadata (with the conventions) and one row per (case, provider)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1)
        f.write("\n")
