"""Smoke test of the benchmarks (CPU, Triton interpreter, well under a minute): the main job runs on tiny
shapes and agrees with python_ref, a missing peer is reported by name, and bench.compare renders
synthetic results from several devices into Markdown and a PNG."""
import json
import os
import subprocess
import sys

import pytest
import torch

# bench/ is not an installed package: import it from this checkout whichever way pytest was started.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import cases as C
from bench import compare, cpu_path, logprobs, policy_loss, providers, registry, report, runner
from bench.providers import Provider, Unavailable


def run_main_job(argv, out):
    """(stdout, results) of `python -m bench *argv --out out` from this checkout, the kernels interpreted."""
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "bench", *argv, "--out", str(out)], cwd=ROOT, env=env,
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    """`python -m bench` on the CPU, restricted to covkernels and the reference (the peers' imports take
    seconds and are exercised by `pytest bench/`) and to the padded cases (the interpreter takes ~0.3 s
    a call)."""
    argv = ["--providers", "covkernels,covkernels_inplace,python_ref", "--cases", "pad30"]
    return run_main_job(argv, tmp_path_factory.mktemp("bench") / "cpu.json")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the main job's CPU (interpreter) behaviour")
def test_main_job_on_cpu_checks_every_provider(main_job):
    stdout, results = main_job
    assert "NOT speed figures" in stdout and "INTERPRETER" in stdout
    assert results["device"]["interpreted"] and results["timer"] == "perf_counter"
    assert results["device"]["copy_gbps"] is None
    rows = results["rows"]
    assert {r["provider"] for r in rows} == {"covkernels", "covkernels_inplace", "python_ref"}
    assert {r["op"] for r in rows} == {"fwd", "fwd_bwd"}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["bytes"] > 0 and r["gbps"] > 0
        assert r["case"] in stdout and r["provider"] in stdout
        if r["provider"].startswith("covkernels"):
            # fp32 accumulation: forward outputs near exact whatever the dtype; gradients, stored in the
            # logits' dtype, no worse than plain PyTorch's in that dtype (+ an ulp: the interpreter
            # truncates where a GPU rounds).
            assert r["errors"]["logp"] < 1e-4 and r["errors"]["entropy"] < 1e-4, r
            if "grad" in r["errors"]:
                plain = next(x for x in rows if x["case"] == r["case"] and x["provider"] == "python_ref")
                ulp = 2**-6 if r["dtype"] == "bf16" else 1e-5
                assert r["errors"]["grad"] <= plain["errors"]["grad"] + ulp, r


def test_unavailable_provider_is_reported_not_dropped():
    def load():
        raise Unavailable("nopeer not installed (pip install nopeer)")

    fake = Provider("nopeer", "peer", load)
    case = C.Case("fwd", 8, 33, "fp32", 0.3)
    rows = runner.run_case(logprobs.FAMILY, case, [fake, logprobs.PYTHON_REF], torch.device("cpu"))
    assert [r["provider"] for r in rows] == ["nopeer", "python_ref"]
    assert rows[0]["status"] == "skipped: nopeer not installed (pip install nopeer)"
    assert rows[1]["status"] == "ok" and rows[1]["max_err"] < 1e-5
    assert "nopeer not installed" in report.table(rows)
    with pytest.raises(Unavailable, match="not installed"):
        providers.entry_point("surely_not_a_module_xyz", "f", pip="x")
    with pytest.raises(ValueError, match="unknown providers"):
        registry.select(["nope"])


def test_policy_bench_skips_without_covkernels_policy_loss(monkeypatch):
    import covkernels

    monkeypatch.delattr(covkernels, "policy_loss", raising=False)
    with pytest.raises(Unavailable, match="policy_loss is not importable"):
        policy_loss.FAMILY.by_name["covkernels"].load()


def test_bytes_follow_the_stated_convention():
    dense, padded = C.Case("fwd", 2048, 1000, "bf16"), C.Case("fwd_bwd", 2048, 1000, "bf16", 0.3)
    assert dense.bytes_moved == 2048 * 1000 * 2 + 2048 * 16
    nv = C.n_valid(padded)
    assert abs(nv - 0.7 * 2048) <= 4
    assert padded.bytes_moved == 2 * nv * 1000 * 2 + 2048 * 1000 * 2 + 2048 * 40


def _run(name, rows, copy=3000.0):
    return {"device": {"name": name, "copy_gbps": copy, "interpreted": False}, "versions": {"torch": "2.11"},
            "git_commit": "abc", "date": "2026-01-01", "mode": "quick", "rows": rows}


def _row(case, provider, ms, status="ok", nbytes=3e9):
    ok = status == "ok"
    return {"case": case, "provider": provider, "status": status, "median_ms": ms if ok else None,
            "gbps": nbytes / (ms * 1e-3) / 1e9 if ok else None}


def test_compare_renders_devices_side_by_side(tmp_path):
    fwd, bwd = "fwd 16384x151936 bf16", "fwd_bwd 16384x151936 bf16"
    a = _run("NVIDIA H100", [_row(fwd, "python_ref", 10.0), _row(fwd, "covkernels", 1.0),
                             _row(fwd, "liger", None, status="skipped: liger_kernel not installed")])
    b = _run("NVIDIA H200", [_row(fwd, "python_ref", 8.0), _row(fwd, "covkernels", 0.8),
                             _row(bwd, "covkernels", 2.0), _row(bwd, "python_ref", None, status="oom")],
             copy=4300.0)
    paths = []
    for name, run in (("h100.json", a), ("h200.json", b)):
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(run))
    md, png = tmp_path / "cmp.md", tmp_path / "cmp.png"
    assert compare.main([str(p) for p in paths] + ["--out-md", str(md), "--out-png", str(png)]) == 0
    text = md.read_text()
    assert "| case | provider | NVIDIA H100 | NVIDIA H200 |" in text
    assert "| fwd 16384x151936 bf16 | covkernels | 3000 (10x) | 3750 (10x) |" in text
    assert "| fwd 16384x151936 bf16 | liger | not installed | - |" in text
    assert "| fwd_bwd 16384x151936 bf16 | python_ref | - | oom |" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_single_file_and_duplicate_devices(tmp_path, capsys):
    run = _run("NVIDIA H100", [_row("fwd 64x4099 bf16", "covkernels", 2.0)])  # no python_ref: no speed-up
    paths = [tmp_path / "one.json", tmp_path / "two.json"]
    for p in paths:
        p.write_text(json.dumps(run))
    compare.main([str(paths[0]), "--out-png", str(tmp_path / "one.png")])
    assert "| fwd 64x4099 bf16 | covkernels | 1500 |" in capsys.readouterr().out
    assert (tmp_path / "one.png").stat().st_size > 0
    text = compare.markdown(compare.load([str(p) for p in paths]))
    assert "NVIDIA H100 (one.json)" in text and "NVIDIA H100 (two.json)" in text


def test_cpu_path_family_checks_times_and_reports_against_the_targets():
    """bench/cpu_path.py on a tiny case: covkernels' PyTorch path and eager PyTorch checked and timed, the
    table and the target lines against torch.compile (a synthetic baseline row here: compiling takes long)."""
    case = cpu_path.CpuCase("cpu_fwd_bwd", 8, 300, "fp32")
    assert case.name == "cpu fwd_bwd 8x300 fp32"
    family = cpu_path.FAMILY
    chosen = [family.by_name[n] for n in ("covkernels_torch", "python_ref")]
    rows = runner.run_case(family, case, chosen, torch.device("cpu"))
    assert [r["provider"] for r in rows] == ["covkernels_torch", "python_ref"]
    for r in rows:
        assert r["status"] == "ok" and r["op"] == "cpu_fwd_bwd" and r["median_ms"] > 0 and r["first_call_ms"] > 0
        assert r["errors"]["grad"] < 1e-5
    baseline = dict(rows[1], provider="compiled_ref", median_ms=rows[0]["median_ms"] / 2)
    text = family.table(rows + [baseline])
    assert "x compile" in text and "2.00" in text
    assert family.targets(rows + [baseline]) == [
        "target cpu fwd_bwd 8x300 fp32: covkernels_torch at 2.00 x torch.compile's time (<= 1.5 x: MISSED)"]
    memory = dict(rows[0], case="cpu fwd 512x151936 bf16", N=512, V=151936, dtype="bf16", peak_extra_frac_logits=0.01)
    assert family.targets([memory]) == [
        "target cpu fwd 512x151936 bf16: covkernels_torch peak extra 1.0% of the logits (<= 35%: met)"]
    assert [c.name for c in family.cases("tiny")] == [
        "cpu fwd 1024x32000 fp32", "cpu fwd_bwd 1024x32000 fp32", "cpu fwd 1024x32000 bf16",
        "cpu fwd_bwd 1024x32000 bf16", "cpu fwd 512x151936 bf16"]
