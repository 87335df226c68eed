"""Compare results across devices: `python -m bench.compare bench/results/*.json [--out-md F] [--out-png F]`.

Per case, each provider's GB/s and its speed-up over eager python_ref on the same device (LM-head cases:
its TFLOP/s and its fraction of torch_matmul's throughput in the same run), side by side for every device
(file) given. Markdown goes to stdout (or --out-md); the chart, one panel per case with a
bar per provider and device and each device's copy bandwidth as a dashed line, to --out-png (default:
comparison.png beside the first file). A provider or case missing from a file shows as "-", a provider
that did not run as its status (oom, wrong, not installed).
"""
import argparse
import json
import math
import os
import sys

BASELINE = "python_ref"
LINEAR_OPS = ("linear_fwd", "linear_fwd_bwd")  # their rows: TFLOP/s and the fraction of torch_matmul
_ORDER = ["torch_matmul", "covkernels", "covkernels_linear", "covkernels_inplace", "unfused", "unfused_inplace",
          "python_ref", "compiled_ref", "trl", "trl_fused", "verl", "verl_flash", "verl_fused", "liger",
          "liger_entropy", "cce"]


def load(paths):
    """[(label, results)], labels made unique by the file name when two files name the same device."""
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append(json.load(f))
    names = [r.get("device", {}).get("name", "?") for r in runs]
    labels = [n if names.count(n) == 1 else f"{n} ({os.path.basename(p)})" for n, p in zip(names, paths)]
    return list(zip(labels, runs))


def _name(row):
    # A provider that computes less than log-prob and entropy says so wherever its speed-up is shown.
    return row["provider"] + (f" ({row['computes']} only)" if row.get("computes") == "logp" else "")


def _index(run):
    return {(r["case"], r["provider"]): r for r in run.get("rows", [])}


def _ordered(values, order):
    """Distinct values, known providers in `order` first, the rest as first seen."""
    seen = list(dict.fromkeys(values))

    def key(v):
        base = v.split(" ")[0]
        return order.index(base) if base in order else len(order), seen.index(v)
    return sorted(seen, key=key)


def cells(runs):
    """(cases, providers, {(case, provider, label): (value, ratio, status, unit)}): GB/s and the speed-up
    over python_ref, or for an LM-head row TFLOP/s and the fraction of torch_matmul."""
    all_rows = [r for _, run in runs for r in run.get("rows", [])]
    cases = list(dict.fromkeys(r["case"] for r in all_rows))
    provs = _ordered([_name(r) for r in all_rows], _ORDER)
    out = {}
    for label, run in runs:
        idx = _index(run)
        for (case, _), r in idx.items():
            base, prov = idx.get((case, BASELINE)), _name(r)
            if r.get("op") in LINEAR_OPS:
                out[case, prov, label] = (r.get("tflops"), r.get("frac_matmul"), r.get("status", "ok"), "TFLOP/s")
                continue
            speedup = None
            if r.get("median_ms") and base and base.get("median_ms"):
                speedup = base["median_ms"] / r["median_ms"]
            out[case, prov, label] = (r.get("gbps"), speedup, r.get("status", "ok"), "GB/s")
    return cases, provs, out


def _cell(value):
    if value is None:
        return "-"
    number, ratio, status, unit = value
    if status != "ok":
        return "not installed" if "not installed" in status else status.split(":")[0]
    text = "-" if number is None else f"{number:.0f}" if number >= 10 else f"{number:.2g}"
    if unit == "TFLOP/s":
        return f"{text} ({100 * ratio:.0f}% of mm)" if ratio else text
    return f"{text} ({ratio:.3g}x)" if ratio else text


def markdown(runs):
    cases, provs, table = cells(runs)
    lines = ["# covkernels benchmark comparison", ""]
    for label, run in runs:
        dev, ver = run.get("device", {}), run.get("versions", {})
        copy = dev.get("copy_gbps")
        copy_text = f"{copy:.0f} GB/s" if copy else "n/a"
        interp = " -- **Triton interpreter: times are NOT speed figures**" if dev.get("interpreted") else ""
        lines.append(f"- **{label}**: copy {copy_text}, torch {ver.get('torch')}, "
                     f"triton {ver.get('triton')}, CUDA {ver.get('cuda')}, "
                     f"commit {str(run.get('git_commit'))[:10]}, {run.get('date', '?')}, "
                     f"mode {run.get('mode', '?')}{interp}")
    lines += ["", (f"Cells: GB/s (bytes counted from the algorithm / median time) and, in brackets, the "
                   f"speed-up over eager {BASELINE} on the same device. LM-head cases (linear_*): TFLOP/s "
                   f"(2 N D V forward, 6 N D V forward + backward, over the median time) and, in brackets, "
                   f"the fraction of torch_matmul's throughput (the same matrix products in torch) in the "
                   f"same run."), ""]
    labels = [label for label, _ in runs]
    lines.append("| case | provider | " + " | ".join(labels) + " |")
    lines.append("|---|---|" + "---|" * len(labels))
    for case in cases:
        for prov in provs:
            row = [_cell(table.get((case, prov, label))) for label in labels]
            if all(c == "-" for c in row):
                continue
            lines.append(f"| {case} | {prov} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def chart(runs, path):
    """One panel per case: GB/s (LM head: TFLOP/s) bars per provider, one colour per device, speed-ups (LM
    head: fractions of torch_matmul) written on the bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases, provs, table = cells(runs)
    labels = [label for label, _ in runs]
    ncols = min(3, max(1, len(cases)))
    nrows = max(1, math.ceil(len(cases) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 3.6 * nrows), squeeze=False)
    width = 0.8 / max(1, len(labels))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, case in zip(axes.flat, cases):
        unit = "TFLOP/s" if case.split(" ")[0] in LINEAR_OPS else "GB/s"
        here = [p for p in provs if any((case, p, label) in table for label in labels)]
        for j, (label, run) in enumerate(runs):
            color = colors[j % len(colors)]
            for i, prov in enumerate(here):
                number, ratio, status, _ = table.get((case, prov, label), (None, None, "-", unit))
                if number is None or status != "ok":
                    continue
                x = i + (j - (len(labels) - 1) / 2) * width
                ax.bar(x, number, width, color=color, label=label if i == 0 else None)
                if ratio:
                    text = f"{100 * ratio:.0f}%" if unit == "TFLOP/s" else f"{ratio:.1f}x"
                    ax.text(x, number, text, ha="center", va="bottom", fontsize=7)
            copy = run.get("device", {}).get("copy_gbps")
            if copy and unit == "GB/s":
                ax.axhline(copy, color=color, linestyle="--", linewidth=1)
        ax.set_title(case, fontsize=10)
        ax.set_xticks(range(len(here)))
        ax.set_xticklabels(here, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(unit)
    for ax in list(axes.flat)[len(cases):]:
        ax.axis("off")
    handles, names = [], []
    for ax in axes.flat:
        for h, n in zip(*ax.get_legend_handles_labels()):
            if n not in names:
                handles.append(h)
                names.append(n)
    if handles:
        fig.legend(handles, names, loc="upper center", ncol=min(4, len(names)), fontsize=9)
    interp = any(run.get("device", {}).get("interpreted") for _, run in runs)
    fig.suptitle(f"GB/s per provider (dashed: copy bandwidth; text: speed-up over {BASELINE}); LM head: "
                 f"TFLOP/s (text: % of torch_matmul)"
                 + (" -- Triton INTERPRETER times, not speed figures" if interp else ""), y=0.0,
                 va="bottom", fontsize=9)
    fig.tight_layout(rect=(0, 0.03, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", help="results JSON files (bench/results/*.json)")
    p.add_argument("--out-md", default=None, help="write the Markdown table here (default: stdout)")
    p.add_argument("--out-png", default=None,
                   help="chart path (default: comparison.png beside the first file)")
    args = p.parse_args(argv)
    runs = load(args.files)
    text = markdown(runs)
    if args.out_md:
        with open(args.out_md, "w") as f:
            f.write(text)
        print(f"wrote {args.out_md}")
    else:
        sys.stdout.write(text)
    png = args.out_png or os.path.join(os.path.dirname(os.path.abspath(args.files[0])), "comparison.png")
    chart(runs, png)
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
