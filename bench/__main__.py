"""The main job: `python -m bench [--quick | --full] [--providers a,b] [--ops fwd,linear_fwd,...] [--out F]`.

Measures the copy bandwidth (CUDA), then for every case of the families (bench/registry.py) checks each
provider against python_ref in float64 and times it, printing one table per family: the logits path (fwd,
fwd_bwd: GB/s against the copy bandwidth), the fused LM head (linear_fwd, linear_fwd_bwd: TFLOP/s against
torch's own matrix products) and, on a CPU, the CPU path (cpu_fwd, cpu_fwd_bwd: CPU figures at realistic
sizes: covkernels' PyTorch path against eager PyTorch, TRL and torch.compile); the policy loss
(policy_loss) and the entropy change (entropy_change) when --ops names them. On a GPU the results go to
bench/results/<device-slug>.json (or --out), rewritten after every row so that a run cut short keeps what
it measured; --merge keeps the file's rows of the cases this run does not measure. Without a GPU it runs
tiny shapes under the Triton interpreter, says loudly that the times are not speed figures, and writes a
file only when --out is given.
"""
from .env import use_interpreter_without_gpu

# Before anything imports covkernels or Liger: their kernels are defined at import time.
INTERPRETED = use_interpreter_without_gpu()

import argparse
import os
import sys
import time

import torch

from . import env, registry, report, runner, timing

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="one realistic shape: N=16384, V=151936 (GPU)")
    size.add_argument("--full", action="store_true", help="the grid padded and in fp32 as well (GPU)")
    size.add_argument("--tiny", action="store_true", help="the interpreter's tiny shapes (default on a CPU)")
    families = "; ".join(f"{','.join(f.ops)} ({f.title}" + ("" if f.in_main_job else ", only when named")
                         + (", by default only without a GPU" if f.cpu_figures else "") + ")"
                         for f in registry.FAMILIES)
    p.add_argument("--ops", default=None, help=f"comma-separated subset of {families}")
    p.add_argument("--cases", default=None, help="only the cases whose name contains this (e.g. pad30, fp32)")
    p.add_argument("--providers", default=None,
                   help="comma-separated subset of " + "; ".join(f"{','.join(f.by_name)} ({f.title})"
                                                                  for f in registry.FAMILIES))
    p.add_argument("--compile", action="store_true", help="run torch.compile(python_ref) on a CPU too")
    p.add_argument("--out", default=None, help="results JSON (default on a GPU: bench/results/<device>.json)")
    p.add_argument("--merge", action="store_true",
                   help="keep the results file's rows of the cases this run does not measure")
    p.add_argument("--max-minutes", type=float, default=None, help="start no new case after this long")
    args = p.parse_args(argv)
    unknown = set((args.ops or "").split(",")) - set(registry.OPS) - {""}
    if unknown:
        p.error(f"unknown ops {sorted(unknown)}; known: {','.join(registry.OPS)}")
    return args


def _print_family(family, rows):
    if not rows:
        return
    if family.heading():
        print()
        print(family.heading())
    print()
    print(family.table(rows))
    print()
    for label, key in family.printed:
        print(f"{label}: {registry.CONVENTIONS[key]}.")
    skipped = {r["provider"]: r["status"] for r in rows if r["status"].startswith("skipped")}
    for name, why in skipped.items():
        print(f"not run: {name}: {why.removeprefix('skipped: ')}")
    for line in family.targets(rows):
        print(line)


def main(argv=None):
    args = parse_args(argv)
    device = env.device()
    on_gpu = device.type == "cuda"
    mode = "quick" if args.quick else "full" if args.full else "default"
    mode = "tiny" if args.tiny or not on_gpu else mode
    ops = args.ops.split(",") if args.ops else [op for f in registry.FAMILIES if registry.runs_unasked(f, on_gpu)
                                                for op in f.ops]
    todo = [(f, c) for f in registry.FAMILIES for c in f.cases(mode, ops)
            if not args.cases or args.cases in c.name]
    chosen = registry.select(args.providers.split(",") if args.providers else None)
    # Tiny shapes on a GPU get their own file, so they never overwrite a device's real numbers.
    stem = env.slug(env.device_name()) + ("-tiny" if mode == "tiny" else "")
    out = args.out or (os.path.join(RESULTS_DIR, stem + ".json") if on_gpu else None)

    if not on_gpu:
        print(report.banner("NO GPU: tiny shapes, Triton kernels under the INTERPRETER (TRITON_INTERPRET=1). "
                            "Times below are interpreter times,\n!! NOT speed figures. They check that the "
                            "benchmark runs and that every provider agrees with python_ref.")
              if INTERPRETED else report.banner("NO GPU, no interpreter: covkernels runs its PyTorch path."))
    copy_gbps = timing.copy_bandwidth_gbps()
    meta = env.describe(copy_gbps)
    meta.update(mode=mode, timer="cuda_events" if on_gpu else "perf_counter", argv=sys.argv[1:],
                conventions=registry.CONVENTIONS)
    print(f"device: {meta['device']['name']}  torch {meta['versions']['torch']}  triton "
          f"{meta['versions']['triton']}  cuda {meta['versions']['cuda']}  commit {meta['git_commit']}")
    print("copy bandwidth (device to device, read + write): "
          + (f"{copy_gbps:.0f} GB/s" if copy_gbps else "n/a (CUDA only)"))
    # Every family this run measures, even with no case left by --cases.
    listed = [f for f in registry.FAMILIES if set(f.ops) & set(ops)]
    print(f"mode {mode}: " + ", ".join(f"{sum(family is f for family, _ in todo)} {f.title} cases x "
                                       f"{len(chosen[f])} providers" for f in listed)
          + f"; timer {meta['timer']}", flush=True)

    kept = []
    if args.merge and out:
        kept, meta["merged_from"] = report.merged(out, [c.name for _, c in todo])
    if out:  # at once: a later --merge run must never pick up rows of an earlier session
        report.write(out, meta, kept)
    rows, t0 = [], time.monotonic()

    def on_row(r):
        rows.append(r)
        print(f"  {time.monotonic() - t0:6.1f}s  {r['case']:<28} {r['provider']:<20} {r['status']}",
              file=sys.stderr, flush=True)
        if out:
            report.write(out, meta, kept + rows)

    for family, case in todo:
        if args.max_minutes and time.monotonic() - t0 > 60 * args.max_minutes:
            print(f"time budget of {args.max_minutes} min spent: stopping before {case.name}", flush=True)
            break
        here = torch.device("cpu") if family.cpu_figures else device
        got = runner.run_case(family, case, chosen[family], here, None if family.cpu_figures else copy_gbps,
                              registry.skips(family, on_gpu, args.compile), on_row=on_row)
        seen = {id(r) for r in rows}
        rows += [r for r in got if id(r) not in seen]  # "oom" rows of a case whose inputs did not fit
        if out:
            report.write(out, meta, kept + rows)
    by_family = {f: [r for r in rows if r["op"] in f.ops] for f in registry.FAMILIES}
    for family in registry.FAMILIES:
        if not family.cpu_figures:
            _print_family(family, by_family[family])
    if not on_gpu and INTERPRETED and any(by_family[f] for f in registry.FAMILIES if not f.cpu_figures):
        print(report.banner("Interpreter times above: NOT speed figures. Run on a GPU for numbers."))
    for family in registry.FAMILIES:
        if family.cpu_figures:
            _print_family(family, by_family[family])
    if out:
        print(f"results written to {out}")
    # A peer that is off or fails is a finding; covkernels or the reference doing so fails the run.
    bad = [r for r in rows if r["kind"] != "peer" and r["status"].split(":")[0] in ("wrong", "failed")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
