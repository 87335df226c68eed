"""The main job: `python -m bench [--quick | --full] [--providers a,b] [--ops fwd,linear_fwd,...] [--out F]`.

Measures the copy bandwidth (CUDA), then for every case checks each provider against python_ref in
float64 and times it, printing one table for the logits path (fwd, fwd_bwd: GB/s against the copy
bandwidth), one for the fused LM head (linear_fwd, linear_fwd_bwd: TFLOP/s against torch's own matrix
products) and, on a CPU, one for the CPU path (cpu_fwd, cpu_fwd_bwd: bench/cpu_path.py, CPU figures at
realistic sizes: covkernels' PyTorch path against eager PyTorch, TRL and torch.compile). On a GPU the results go to bench/results/<device-slug>.json (or --out), rewritten after every
row so that a run cut short keeps what it measured; --merge keeps the file's rows of the cases this run
does not measure. Without a GPU it runs tiny shapes under the Triton interpreter, says loudly that the
times are not speed figures, and writes a file only when --out is given.
"""
from .env import use_interpreter_without_gpu

# Before anything imports covkernels or Liger: their kernels are defined at import time.
INTERPRETED = use_interpreter_without_gpu()

import argparse
import os
import sys
import time

import torch

from . import cases as C
from . import cases_linear as L
from . import cpu_path, env, providers, providers_linear, report, runner, runner_linear, timing

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
_OPS = ("fwd", "fwd_bwd") + L.OPS + cpu_path.OPS


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="one realistic shape: N=16384, V=151936 (GPU)")
    size.add_argument("--full", action="store_true", help="the grid padded and in fp32 as well (GPU)")
    size.add_argument("--tiny", action="store_true", help="the interpreter's tiny shapes (default on a CPU)")
    p.add_argument("--ops", default=None,
                   help="comma-separated subset of fwd,fwd_bwd (logits), linear_fwd,linear_fwd_bwd (LM head) and "
                        "cpu_fwd,cpu_fwd_bwd (the CPU path; by default only without a GPU)")
    p.add_argument("--cases", default=None, help="only the cases whose name contains this (e.g. pad30, fp32)")
    p.add_argument("--providers", default=None,
                   help=f"comma-separated subset of {','.join(providers.BY_NAME)} (logits) and "
                        f"{','.join(providers_linear.BY_NAME)} (LM head)")
    p.add_argument("--compile", action="store_true", help="run torch.compile(python_ref) on a CPU too")
    p.add_argument("--out", default=None, help="results JSON (default on a GPU: bench/results/<device>.json)")
    p.add_argument("--merge", action="store_true",
                   help="keep the results file's rows of the cases this run does not measure")
    p.add_argument("--max-minutes", type=float, default=None, help="start no new case after this long")
    args = p.parse_args(argv)
    unknown = set((args.ops or "").split(",")) - set(_OPS) - {""}
    if unknown:
        p.error(f"unknown ops {sorted(unknown)}; known: {','.join(_OPS)}")
    return args


def _select(names):
    """(logits providers, LM-head providers, CPU-path providers) by name, all when names is None; a name no
    path knows is an error, not a silent no-op ("python_ref" names a provider of each path)."""
    families = (providers.PROVIDERS, providers_linear.PROVIDERS, cpu_path.PROVIDERS)
    if names is None:
        return tuple(list(f) for f in families)
    unknown = [n for n in names if all(n not in {p.name for p in f} for f in families)]
    if unknown:
        raise ValueError(f"unknown providers {unknown}; known: {list(providers.BY_NAME)} (logits), "
                         f"{list(providers_linear.BY_NAME)} (LM head), {list(cpu_path.BY_NAME_CPU)} (CPU path)")
    return tuple([p for p in f if p.name in names] for f in families)


def _print_family(rows, family_table, conventions):
    if not rows:
        return
    print()
    print(family_table(rows))
    print()
    for key, text in conventions:
        print(f"{key}: {text}.")
    skipped = {r["provider"]: r["status"] for r in rows if r["status"].startswith("skipped")}
    for name, why in skipped.items():
        print(f"not run: {name}: {why.removeprefix('skipped: ')}")


def main(argv=None):
    args = parse_args(argv)
    device = env.device()
    on_gpu = device.type == "cuda"
    mode = "quick" if args.quick else "full" if args.full else "default"
    mode = "tiny" if args.tiny or not on_gpu else mode
    ops = tuple(args.ops.split(",")) if args.ops else _OPS if not on_gpu else _OPS[:-len(cpu_path.OPS)]
    todo = [c for c in C.cases(mode, ops=tuple(o for o in ops if o in ("fwd", "fwd_bwd")))
            + L.cases(mode, ops=tuple(o for o in ops if o in L.OPS))
            + cpu_path.cases(ops=tuple(o for o in ops if o in cpu_path.OPS))
            if not args.cases or args.cases in c.name]
    chosen, chosen_linear, chosen_cpu = _select(args.providers.split(",") if args.providers else None)
    skips = {}
    if not on_gpu and not args.compile:
        skips["compiled_ref"] = "torch.compile not run on the CPU (slow to compile; --compile to include)"
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
    meta.update(mode=mode, timer="cuda_events" if on_gpu else "perf_counter", argv=sys.argv[1:])
    print(f"device: {meta['device']['name']}  torch {meta['versions']['torch']}  triton "
          f"{meta['versions']['triton']}  cuda {meta['versions']['cuda']}  commit {meta['git_commit']}")
    print("copy bandwidth (device to device, read + write): "
          + (f"{copy_gbps:.0f} GB/s" if copy_gbps else "n/a (CUDA only)"))
    n_linear = sum(isinstance(c, L.LinearCase) for c in todo)
    n_cpu = sum(isinstance(c, cpu_path.CpuCase) for c in todo)
    print(f"mode {mode}: {len(todo) - n_linear - n_cpu} logits cases x {len(chosen)} providers, {n_linear} LM-head "
          f"cases x {len(chosen_linear)} providers, {n_cpu} CPU-path cases x {len(chosen_cpu)} providers; "
          f"timer {meta['timer']}", flush=True)

    kept = []
    if args.merge and out:
        kept, meta["merged_from"] = report.merged(out, [c.name for c in todo])
    if out:  # at once: a later --merge run must never pick up rows of an earlier session
        report.write(out, meta, kept)
    rows, t0 = [], time.monotonic()

    def on_row(r):
        rows.append(r)
        print(f"  {time.monotonic() - t0:6.1f}s  {r['case']:<28} {r['provider']:<20} {r['status']}",
              file=sys.stderr, flush=True)
        if out:
            report.write(out, meta, kept + rows)

    for case in todo:
        if args.max_minutes and time.monotonic() - t0 > 60 * args.max_minutes:
            print(f"time budget of {args.max_minutes} min spent: stopping before {case.name}", flush=True)
            break
        if isinstance(case, cpu_path.CpuCase):
            got = cpu_path.run_case(case, chosen_cpu, on_row=on_row)
        else:
            run_case, chosen_here = ((runner_linear.run_case, chosen_linear) if isinstance(case, L.LinearCase)
                                     else (runner.run_case, chosen))
            got = run_case(case, chosen_here, device, copy_gbps, skips, on_row=on_row)
        seen = {id(r) for r in rows}
        rows += [r for r in got if id(r) not in seen]  # "oom" rows of a case whose inputs did not fit
        if out:
            report.write(out, meta, kept + rows)
    linear = [r for r in rows if r["op"] in L.OPS]
    cpu = [r for r in rows if r["op"] in cpu_path.OPS]
    kernels = [r for r in rows if r["op"] not in L.OPS + cpu_path.OPS]
    _print_family(kernels, report.table,
                  [("bytes", report.CONVENTIONS["bytes"]), ("time", report.CONVENTIONS["time"])])
    _print_family(linear, report.linear_table, [("LM head", report.CONVENTIONS["linear"])])
    for line in report.linear_targets(linear):
        print(line)
    if not on_gpu and INTERPRETED and kernels + linear:
        print(report.banner("Interpreter times above: NOT speed figures. Run on a GPU for numbers."))
    if cpu:
        print()
        print(report.banner(f"CPU FIGURES ({env.cpu_name()}, {torch.get_num_threads()} threads): covkernels' "
                            "chunked PyTorch path, not the Triton kernels"))
    _print_family(cpu, cpu_path.table, [("CPU path", report.CONVENTIONS["cpu"])])
    for line in cpu_path.targets(cpu):
        print(line)
    if out:
        print(f"results written to {out}")
    # A peer that is off or fails is a finding; covkernels or the reference doing so fails the run.
    bad = [r for r in rows if r["kind"] != "peer" and r["status"].split(":")[0] in ("wrong", "failed")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
