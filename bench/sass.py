"""Static roofline of every streaming kernel, compiled for sm_90 (Hopper) without a GPU:
`python -m bench.sass [--json PATH] [--markdown PATH]`.

Each launcher runs on "meta" tensors at the headline shapes (N = 16384 rows, V = 151936, bf16; the LM head
at D = 4096), its launches are captured and compiled exactly as the JIT specialises them on an H100/H200
(bench/sass_tools.py), and the cubin is read with the cuobjdump shipped in Triton: registers, spills,
shared memory, the width of the loads and stores of the logits, and for each loop that streams the
logits its SASS instructions per element on the hot path.

The model: a GPU issues SMs x 4 schedulers x 32 lanes x clock thread-instructions per second, and its MUFU
units (ex2, lg2) 16 per SM per clock; a streaming loop that spends I instructions and M MUFU operations
per element and moves B bytes of logits per element can stream at most min(issue / I, mufu / M) * B bytes
per second, to compare with the memory rate: H100 SXM (132 SMs, 1.755 GHz, 3.35 TB/s datasheet) and H200
(132 SMs, 1.98 GHz, 4.3 TB/s: the device-to-device copy measured on this project's H200, read + write).
A rare block inside the loop (the rescale when the running max rises, a forward branch skips it) counts
with the weight H_n / n, the expected share of n blocks that set a new maximum (n = blocks per row).
Occupancy (sm_90: 64 warps, 32 programs, 65536 registers, 228 KiB shared memory per SM) gives the bytes of
logits each SM has in flight, one loop iteration's loads per resident program; by Little's law an SM
needs about rate x 0.7 us / SMs of them (H200: 23 KB) to keep the memory busy.
"""
import argparse
import json
import math
import os
import sys

GPUS = {"H100": dict(sms=132, clock=1.755e9, mem=3.35e12), "H200": dict(sms=132, clock=1.98e9, mem=4.3e12)}
HEAD = dict(N=16384, V=151936, D=4096)
# Instructions per element on the hot path of each streaming loop (sm_90, bf16, V = 151936; an element of
# entropy_change is a pair of logits, before and after), and the least (issue or MUFU) rate over the H200's
# memory rate every logits kernel must keep.
BUDGETS = {"fwd": 9.0, "fwd_stats": 12.0, "fwd_split": 9.0, "vocab_partials": 9.0, "bwd": 18.0, "bwd_inplace": 18.0,
           "aent_fwd": 12.0, "aent_fwd_stats": 12.0, "aent_bwd": 18.0, "entropy_change": 24.0}
MIN_RATIO_H200 = 1.3
# AEnt's radix passes where tl.histogram lowers to warp ballots (Triton < 3.8, 4-bit digits: see
# covkernels/ops/clamped_entropy/select.py): issue-bound by construction, held to this count instead.
RADIX_BUDGET_BALLOTS = 32.0
MIN_LOAD_BITS = 128
LATENCY_S = 0.7e-6
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def occupancy(registers, shared, num_warps):
    """Programs resident per SM on sm_90 (registers allocated per warp in units of 256)."""
    per_warp = -(-registers * 32 // 256) * 256
    return min(32, 64 // num_warps, 65536 // (per_warp * num_warps), (228 * 1024) // (shared + 1024))


def _cases():
    """(case name, [loop names] or None, bytes of logits moved (read and written) per element per loop, thunk
    running the launcher on meta tensors). Loop names are those of the first streaming loops in the kernel's SASS, in address order;
    loops past them (the second, clamped read of rows with -inf entries) are reported, not budgeted."""
    import torch

    from covkernels.ops.clamped_entropy import kernels as ce
    from covkernels.ops.entropy_change import kernels as ec
    from covkernels.ops.fused_pass import kernels as fp
    from covkernels.ops.lm_head import kernels as lp

    N, V, D = HEAD["N"], HEAD["V"], HEAD["D"]
    meta = dict(device="meta")
    x = torch.empty(N, V, dtype=torch.bfloat16, **meta)
    t = torch.empty(N, dtype=torch.int64, **meta)
    rows = torch.empty(N, **meta)
    lse2 = torch.empty(2, N, **meta)
    inv_t = 1 / 0.7
    few = 64  # rows few enough that the launcher splits them (132 SMs)
    shard = V // 8  # one of 8 vocabulary shards
    h = torch.empty(N, D, dtype=torch.bfloat16, **meta)
    w = torch.empty(V, D, dtype=torch.bfloat16, **meta)
    sums = ["sums"]
    from covkernels.ops.clamped_entropy.select import DIGIT_BITS, passes

    radix = [f"radix pass {p + 1}" for p in range(passes(x.dtype, DIGIT_BITS))]
    aent = [*radix, "tie scan", "sums before cut", "sums after cut"]
    aent_grad = ["gradient before cut", "gradient after cut"]
    return [
        ("fwd", sums, 2, lambda: fp.fused_fwd(x, t, inv_t, -100, False)),
        ("fwd_stats", sums, 2, lambda: fp.fused_fwd(x, t, inv_t, -100, True)),
        ("fwd_split", sums, 2, lambda: fp.fused_fwd(x[:few], t[:few], inv_t, -100, False)),
        ("vocab_partials", sums, 2, lambda: fp.fused_fwd_partials(x[:, :shard], t, inv_t, -100, False)),
        ("bwd", ["gradient"], 4, lambda: fp.fused_bwd(x, t, lse2, rows, rows, rows, inv_t, -100, torch.empty_like(x))),
        ("bwd_inplace", ["gradient"], 4, lambda: fp.fused_bwd(x, t, lse2, rows, rows, rows, inv_t, -100, x)),
        ("aent_fwd", aent, 2, lambda: ce.clamped_fwd(x, t, inv_t, -100, 0.3, False)),
        ("aent_fwd_stats", aent, 2, lambda: ce.clamped_fwd(x, t, inv_t, -100, 0.3, True)),
        ("aent_bwd", aent_grad, 4, lambda: ce.clamped_bwd(x, t, lse2, rows, rows, torch.empty(3, N, **meta), rows,
                                                          rows, rows, inv_t, -100, torch.empty_like(x))),
        # Two logits tensors read per element (before and after an update).
        ("entropy_change", ["sums"], 4, lambda: ec.entropy_change_fwd(x, torch.empty_like(x), torch.empty(
            N, dtype=torch.bool, **meta), 0.7)),
        ("lm_head_fwd", None, 0, lambda: lp.linear_fwd(h, w, None, t, inv_t, -100, False)),
        ("lm_head_bwd", None, 0, lambda: lp.linear_bwd(h, w, None, t, lse2, rows, rows, rows, inv_t, -100)),
    ]


def _harmonic(n):
    return sum(1.0 / k for k in range(1, n + 1))


def _loop_row(loop, name, ept, blocks_per_row, bytes_per_elt):
    from bench.sass_tools import widths

    weight = _harmonic(blocks_per_row) / blocks_per_row
    cold = sum(len(b) for b in loop.cold_blocks)
    per_elt = (len(loop.hot) + weight * cold) / ept
    mufu = (len(loop.ops("MUFU")) + weight * sum(1 for b in loop.cold_blocks for i in b
                                                 if i.op.startswith("MUFU"))) / ept
    rates = {}
    for gpu, g in GPUS.items():
        issue = g["sms"] * 4 * 32 * g["clock"] / per_elt * bytes_per_elt
        special = g["sms"] * 16 * g["clock"] / mufu * bytes_per_elt if mufu else math.inf
        rates[gpu] = dict(issue_bytes_s=issue, mufu_bytes_s=special, ratio=min(issue, special) / g["mem"])
    return dict(loop=name, elements_per_thread=ept, hot=len(loop.hot), total=len(loop.body), cold=cold,
                per_element=round(per_elt, 2), mufu_per_element=round(mufu, 3),
                load_bits=widths(loop, "LDG"), store_bits=widths(loop, "STG"), rates=rates)


def analyse():
    """One dict per compiled kernel (and autotuned config)."""
    from bench import sass_tools as st
    from covkernels.ops.common import layout

    out = []
    saved = layout.sm_count
    layout.sm_count = lambda device: GPUS["H200"]["sms"]  # the launchers split rows as on an H200
    try:
        for case, loop_names, bytes_per_elt, thunk in _cases():
            with st.capture() as launches:
                thunk()
            seen = set()
            for launch in launches:
                for label, kwargs in launch.variants():
                    if (launch.name, label) in seen:
                        continue  # the same kernel launched again (the LM head's vocabulary chunks)
                    seen.add((launch.name, label))
                    kernel = st.compile_sm90(launch.fn, launch.args, kwargs)
                    sass, usage = st.disassemble(kernel)
                    regs, stack, shared = st.resources(usage)
                    row = dict(case=case, kernel=launch.name, config=label, registers=regs, stack=stack,
                               shared=shared, num_warps=kwargs.get("num_warps", 4), wgmma="wgmma" in kernel.asm["ptx"],
                               loops=[])
                    block = kwargs.get("BLOCK_V")
                    row["programs_per_sm"] = occupancy(regs, shared, row["num_warps"])
                    if block is not None and bytes_per_elt:
                        # One block of each bf16 input read per program (entropy_change reads two tensors).
                        reads = 4 if case == "entropy_change" else 2
                        row["bytes_in_flight_per_sm"] = row["programs_per_sm"] * block * reads
                    loops = st.streaming_loops(st.parse(sass))
                    if loop_names is not None and block is not None and loops:
                        if len(loops) < len(loop_names):
                            raise RuntimeError(f"{case}/{launch.name}: {len(loops)} streaming loops, expected "
                                               f"{loop_names}")
                        ept = block // (32 * row["num_warps"])
                        n = math.ceil(HEAD["V"] / block)
                        names = loop_names + [f"other loop {k + 1}" for k in range(len(loops) - len(loop_names))]
                        row["loops"] = [_loop_row(lp, name, ept, n, bytes_per_elt) for lp, name in zip(loops, names)]
                    out.append(row)
    finally:
        layout.sm_count = saved
    return out


def check(rows):
    """The budgets' verdicts: list of failure messages (empty when every budget is met)."""
    from covkernels.ops.clamped_entropy.select import DIGIT_BITS

    bad = []
    for r in rows:
        where = f"{r['case']}/{r['kernel']} {r['config']}".strip()
        if r["case"].startswith("lm_head"):
            continue
        if r["stack"]:
            bad.append(f"{where}: {r['stack']} bytes of register spills")
        for lp in r["loops"]:
            if lp["loop"].startswith("other loop"):
                continue  # the second, clamped read of rows with -inf entries
            ballots = lp["loop"].startswith("radix pass") and DIGIT_BITS < 8
            budget = RADIX_BUDGET_BALLOTS if ballots else BUDGETS[r["case"]]
            if lp["per_element"] > budget:
                bad.append(f"{where} [{lp['loop']}]: {lp['per_element']} instructions per element > {budget}")
            if lp["rates"]["H200"]["ratio"] < MIN_RATIO_H200 and not ballots:
                bad.append(f"{where} [{lp['loop']}]: H200 compute/memory {lp['rates']['H200']['ratio']:.2f} "
                           f"< {MIN_RATIO_H200}")
            if min(lp["load_bits"], default=0) < MIN_LOAD_BITS and lp["loop"] != "tie scan":
                bad.append(f"{where} [{lp['loop']}]: loads of {lp['load_bits']} bits")
    for kernel in {r["kernel"] for r in rows if r["case"].startswith("lm_head") and r["config"]}:
        configs = [r for r in rows if r["kernel"] == kernel]
        if not all(r["wgmma"] for r in configs):
            bad.append(f"{kernel}: a config without wgmma")
        if min(r["stack"] for r in configs):
            bad.append(f"{kernel}: every autotuned config spills")
    return bad


def markdown(rows, before=None):
    """The README's table: one line per streaming loop (and per LM-head kernel config)."""
    prior = {(r["case"], lp["loop"]): lp["per_element"] for r in (before or []) for lp in r["loops"]}
    head = ("| kernel | loop | instr / element | before | MUFU / elt | regs | spills | loads | KB in flight / SM | "
            "H100 ratio | H200 ratio |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        if r["case"].startswith("lm_head"):
            continue
        for lp in r["loops"]:
            if lp["loop"].startswith("other loop"):
                continue  # the rare second reads (safe mode, -inf rows): in the JSON
            was = prior.get((r["case"], lp["loop"]))
            lines.append(f"| {r['case']} | {lp['loop']} | {lp['per_element']} (≤ {BUDGETS[r['case']]}) | "
                         f"{was if was is not None else '–'} | {lp['mufu_per_element']} | {r['registers']} | "
                         f"{r['stack']} | {'/'.join(map(str, lp['load_bits']))}-bit | "
                         f"{r.get('bytes_in_flight_per_sm', 0) / 1024:.0f} | "
                         f"{lp['rates']['H100']['ratio']:.2f} | {lp['rates']['H200']['ratio']:.2f} |")
    lines += ["", "| LM-head kernel | tiles / warps | regs | spills (bytes) | wgmma |", "|---|---|---|---|---|"]
    for r in rows:
        if r["case"].startswith("lm_head"):
            lines.append(f"| {r['kernel']} | {r['config'] or '-'} | {r['registers']} | {r['stack']} | "
                         f"{'yes' if r['wgmma'] else 'no'} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.sass", description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--markdown", help="write the table here")
    p.add_argument("--before", default=os.path.join(RESULTS, "sass_before.json"),
                   help="a JSON of an earlier run, shown as the 'before' column (default: the kernels of 5194b37)")
    p.add_argument("--readme", action="store_true", help="rewrite README.md's table with this run's")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("bench.sass compiles the kernels: run it without TRITON_INTERPRET=1")
    import triton

    rows = analyse()
    before = json.load(open(args.before))["rows"] if args.before and os.path.exists(args.before) else None
    table = markdown(rows, before)
    print(table)
    failures = check(rows)
    print("\nbudgets: " + ("all met" if not failures else "\n  " + "\n  ".join(failures)))
    from covkernels.ops.clamped_entropy.select import DIGIT_BITS

    meta = dict(triton=triton.__version__, target="sm_90", shapes=HEAD, gpus=GPUS, budgets=BUDGETS,
                radix_digit_bits=DIGIT_BITS, radix_budget_ballots=RADIX_BUDGET_BALLOTS, latency_s=LATENCY_S)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows, failures=failures), f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    if args.readme:
        _rewrite_readme(table, triton.__version__)
    return 1 if failures else 0


def _rewrite_readme(table, version):
    path = os.path.join(os.path.dirname(RESULTS), os.pardir, "README.md")
    text = open(path).read()
    begin, end = text.index("<!-- sass:begin"), text.index("<!-- sass:end -->")
    block = f"<!-- sass:begin: generated by `python -m bench.sass --readme`, triton {version} -->\n{table}\n"
    with open(path, "w") as f:
        f.write(text[:begin] + block + text[end:])


if __name__ == "__main__":
    sys.exit(main())
