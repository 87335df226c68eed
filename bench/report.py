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


def table(rows):
    """A fixed-width text table, one line per row, a blank line between cases."""
    cells = [_COLUMNS] + [_fmt(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(_COLUMNS) - 1)]
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


def write(path, meta, rows):
    """Writes the results file: metadata, conventions and one row per (case, provider)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({**meta, "conventions": CONVENTIONS, "rows": rows}, f, indent=1)
        f.write("\n")
