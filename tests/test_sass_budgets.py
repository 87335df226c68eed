"""The kernels at the bandwidth limit by construction: every streaming kernel compiled for sm_90 without a GPU
(bench/sass.py, in a subprocess without the interpreter) meets its instruction, spill, load-width and
issue-rate budgets, and the LM-head kernels keep tensor cores in every autotuned config."""
import json
import os
import subprocess
import sys

import pytest
import triton

from bench import sass
from bench.sass_tools import Instr, streaming_loops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("sass") / "sass.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-m", "bench.sass", "--json", str(out)], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=900)
    assert out.exists(), run.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_budget_is_met(report):
    """Under every Triton CI runs; AEnt's radix passes have their own count where tl.histogram lowers to warp
    ballots (bench.sass.RADIX_BUDGET_BALLOTS)."""
    assert report["failures"] == [], "\n".join(report["failures"])


def test_every_streaming_kernel_is_reported(report):
    loops = {(r["case"], lp["loop"]) for r in report["rows"] for lp in r["loops"]}
    for case in ("fwd", "fwd_stats", "fwd_split", "vocab_partials"):
        assert (case, "sums") in loops
    for case in ("bwd", "bwd_inplace"):
        assert (case, "gradient") in loops
    for name in ("radix pass 1", "radix pass 2", "tie scan", "sums before cut", "sums after cut"):
        assert ("aent_fwd_stats", name) in loops
    assert ("entropy_change", "sums") in loops
    kernels = {r["kernel"] for r in report["rows"]}
    assert {"_combine_kernel", "_linear_fwd_kernel", "_linear_combine_kernel", "_linear_dz_kernel",
            "_mm_acc_kernel"} <= kernels


def test_logits_are_read_128_bits_at_a_time(report):
    for r in report["rows"]:
        for lp in r["loops"]:
            assert lp["load_bits"] == [128], (r["case"], lp["loop"], lp["load_bits"])


def _sass(lines):
    return [Instr(16 * k, pred, op, args) for k, (pred, op, args) in enumerate(lines)]


def test_loop_analysis_keeps_rare_blocks_off_the_hot_path():
    """A loop entered in its middle (as ptxas lays them out) with a forward branch over a rare block: the hot
    path takes the branch, the skipped block is cold."""
    code = _sass([("", "BRA", "0x40"),            # 0x00: enter at the loop's test
                  ("", "LDG.E.128", "R0"),        # 0x10: loop head
                  ("@P0", "BRA", "0x40"),         # 0x20: skip the rare block
                  ("", "FMUL", "R1"),             # 0x30: rare block (cold)
                  ("", "FADD", "R2"),             # 0x40
                  ("@P1", "BRA", "0x10"),         # 0x50: back edge
                  ("", "EXIT", "")])
    (loop,) = streaming_loops(code)
    assert [i.op for i in loop.hot] == ["LDG.E.128", "BRA", "FADD", "BRA"]
    assert [[i.op for i in b] for b in loop.cold_blocks] == [["FMUL"]]


def test_readme_table_is_generated(report):
    """README's performance table is bench.sass's output (for the Triton it names), not typed."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    begin, end = "<!-- sass:begin", "<!-- sass:end -->"
    block = readme[readme.index(begin):readme.index(end)]
    version = block.split("triton ")[1].split()[0]
    if version != triton.__version__:
        pytest.skip(f"README's table is for triton {version}")
    before = json.load(open(os.path.join(ROOT, "bench", "results", "sass_before.json")))["rows"]
    assert sass.markdown(report["rows"], before) in block
