"""Smoke test of the LM-head benchmark (CPU, Triton interpreter, seconds): `python -m bench --ops linear_*`
runs the tiny case end to end and writes its table and JSON rows; the float64 check passes the honest
providers and catches a wrong one; the peers that cannot run on a CPU say why; bench.compare renders the
rows as TFLOP/s and fractions of torch_matmul."""
import importlib.util
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import python_ref as ref
from bench import compare, report, runner
from bench import lm_head as L
from bench.cases import IGNORE_INDEX
from bench.providers import Provider
from test_bench_smoke import run_main_job

OURS = ("torch_matmul", "covkernels_linear", "unfused", "unfused_inplace", "python_ref")


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    """The main job on the bf16 tiny cases (padded), covkernels' providers, the baseline and the reference
    (the peers' imports take seconds; they are run in-process below)."""
    argv = ["--ops", "linear_fwd,linear_fwd_bwd", "--providers", ",".join(OURS), "--cases", "bf16"]
    return run_main_job(argv, tmp_path_factory.mktemp("bench") / "cpu.json")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the main job's CPU (interpreter) behaviour")
def test_main_job_runs_the_lm_head_rows(main_job):
    stdout, results = main_job
    assert "NOT speed figures" in stdout
    assert "TFLOP/s" in stdout and "of torch mm" in stdout and "of logits" in stdout
    rows = results["rows"]
    assert {r["op"] for r in rows} == set(L.OPS)
    assert {r["provider"] for r in rows} == set(OURS)
    assert "linear" in results["conventions"]
    by = {(r["op"], r["provider"]): r for r in rows}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["case"] in stdout and r["provider"] in stdout
        assert r["median_ms"] > 0 and r["tflops"] > 0 and r["frac_matmul"] > 0
        assert r["flops"] == (2 if r["op"] == "linear_fwd" else 6) * r["N"] * r["D"] * r["V"]
        assert r["gbps"] is None and r["peak_extra_bytes"] is None  # no CUDA allocator on a CPU
        if r["provider"] == "torch_matmul":
            assert r["frac_matmul"] == 1.0 and set(r["errors"]) == {"logits"}
        if r["provider"] == "covkernels_linear":
            # fp32 logits tiles: forward outputs near exact; gradients no worse than plain PyTorch's + an ulp.
            assert r["errors"]["logp"] < 1e-4 and r["errors"]["entropy"] < 1e-4, r
            if r["op"] == "linear_fwd_bwd":
                plain = by["linear_fwd_bwd", "python_ref"]["errors"]
                assert r["errors"]["d_hidden"] <= plain["d_hidden"] + 2**-6, r
                assert r["errors"]["d_weight"] <= plain["d_weight"] + 2**-6, r


def _fake(name, fn, computes=("logp", "entropy")):
    return Provider(name, "ours", lambda: fn, computes=computes)


def _zero_grad(x):
    return x.detach() + 0 * x


def _plus_entropy_grad(logp, entropy):
    return logp + entropy - entropy.detach()


def test_check_catches_wrong_outputs_and_gradients():
    """A float64 python_ref passes, as a logp-only provider; a shifted log-prob, an entropy without gradient
    and a logp-only provider with the entropy's gradient do not (fp32: no rounding to hide in)."""
    def exact(h, w, t):
        logp, ent = ref.linear_logprobs_and_entropy(h.double(), w.double(), t, ignore_index=IGNORE_INDEX)
        return logp.float(), ent.float()

    fakes = [_fake("exact", exact),
             _fake("shifted", lambda h, w, t: (exact(h, w, t)[0] + 1e-2, exact(h, w, t)[1])),
             _fake("entropy_no_grad", lambda h, w, t: (exact(h, w, t)[0], _zero_grad(exact(h, w, t)[1]))),
             _fake("logp_only", lambda h, w, t: (exact(h, w, t)[0], None), computes=("logp",)),
             # logp's value, but the gradient of logp + entropy: must fail against the logp-only gradient
             _fake("logp_only_wrong_grad", lambda h, w, t: (_plus_entropy_grad(*exact(h, w, t)), None),
                   computes=("logp",))]
    case = L.LinearCase("linear_fwd_bwd", 24, 17, 70, "fp32", L.PAD)
    rows = runner.run_case(L.FAMILY, case, fakes, torch.device("cpu"))
    status = {r["provider"]: r["status"] for r in rows}
    assert status == {"exact": "ok", "shifted": "wrong", "entropy_no_grad": "wrong", "logp_only": "ok",
                      "logp_only_wrong_grad": "wrong"}, rows
    exact_row = rows[0]
    assert set(exact_row["errors"]) == {"logp", "entropy", "d_hidden", "d_weight"}
    assert exact_row["max_err"] < 1e-5
    assert "WRONG" in L.FAMILY.table(rows)


def test_reference_in_chunks_and_sampled_vocabulary_matches_autograd(monkeypatch):
    """The big-shape path of the check: d_weight summed over row chunks at sampled vocabulary entries
    (V > 512) equals float64 autograd through python_ref on the whole batch."""
    from bench import cases as C

    monkeypatch.setattr(L, "CHUNK_ELEMENTS", 600 * 5)  # 5 rows a chunk: 5 chunks of 24 rows
    case = L.LinearCase("linear_fwd_bwd", 24, 17, 600, "fp32", L.PAD)
    dev = torch.device("cpu")
    hidden, weight, targets = L.make_inputs(case, dev)
    grads = C.upstream_grads(case, dev)
    rows = C.check_rows(case, dev)
    cols = L.check_cols(case, targets, rows, dev)
    assert 16 < len(cols) < case.V and (case.V - 1) in cols.tolist()
    truth = L.reference(case, hidden, weight, targets, grads, rows, cols)["truth"]
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logp, ent = ref.linear_logprobs_and_entropy(h, w, targets, ignore_index=IGNORE_INDEX)
    d_h, d_w = torch.autograd.grad((logp * grads[0] + ent * grads[1]).sum(), (h, w), retain_graph=True)
    assert torch.allclose(truth["d_weight"], d_w[cols], atol=1e-12)
    assert torch.allclose(truth["d_hidden"], d_h.reshape(-1, case.D)[rows], atol=1e-12)
    (d_w_logp,) = torch.autograd.grad((logp * grads[0]).sum(), w)
    assert torch.allclose(truth["d_weight_logp_only"], d_w_logp[cols], atol=1e-12)


@pytest.mark.peers
def test_peers_on_cpu_agree_or_say_why():
    """Liger's two fused heads run on a CPU (its Triton kernels interpreted, its scaled CE's PyTorch
    fallback) and agree with python_ref, gradients included; CCE and verl's fused kernel are CUDA only."""
    chosen = [L.FAMILY.by_name[n] for n in ("torch_matmul", "liger", "liger_entropy", "cce", "verl_fused")]
    case = L.LinearCase("linear_fwd_bwd", 48, 40, 300, "bf16", L.PAD)
    rows = {r["provider"]: r for r in runner.run_case(L.FAMILY, case, chosen, torch.device("cpu"))}
    assert rows["cce"]["status"].startswith("skipped: CUDA only")
    assert rows["verl_fused"]["status"].startswith("skipped: ")  # CUDA only, or verl not installed
    if importlib.util.find_spec("liger_kernel") is None:
        assert rows["liger"]["status"] == "skipped: liger_kernel not installed (pip install liger-kernel)"
        return
    assert rows["liger"]["status"] == "ok" and set(rows["liger"]["errors"]) == {"logp", "d_hidden", "d_weight"}
    entropy = rows["liger_entropy"]
    assert entropy["status"] == "ok" or "no such entry point" in entropy["status"], entropy
    if entropy["status"] == "ok":
        assert "fallback" in entropy["note"] and "entropy" in entropy["errors"]


def test_verl_fused_skips_a_hidden_size_it_does_not_take():
    skip = L.FAMILY.by_name["verl_fused"].skip
    assert "multiple of 128" in skip(L.LinearCase("linear_fwd", 48, 40, 300, "bf16"), torch.device("cpu"))
    assert skip(L.LinearCase("linear_fwd", 48, 128, 300, "bf16"), torch.device("cpu")) is None


def test_cases_flops_and_memory_conventions():
    N, D, V = L.TARGET_SHAPE
    quick = L.FAMILY.cases("quick")
    assert [c.name for c in quick] == [f"linear_fwd {N}x{D}x{V} bf16", f"linear_fwd_bwd {N}x{D}x{V} bf16",
                                       f"linear_fwd {N}x{D}x{V} bf16 pad33", f"linear_fwd_bwd {N}x{D}x{V} bf16 pad33"]
    fwd, bwd = quick[:2]
    assert fwd.flops == 2 * N * D * V and bwd.flops == 3 * fwd.flops
    assert fwd.logits_bytes == N * V * 2
    assert fwd.required_bytes(("logp", "entropy")) == 8 * N
    assert bwd.required_bytes(("logp",)) == 4 * N + (N + V) * D * 2
    assert bwd.required_bytes(("logits",)) == (N + V) * D * 2
    assert [c.op for c in L.FAMILY.cases("tiny", ops=("linear_fwd",))] == ["linear_fwd", "linear_fwd"]
    padded = L.LinearCase("linear_fwd", 48, 40, 300, "bf16", L.PAD)
    hidden, weight, targets = L.make_inputs(padded, torch.device("cpu"))
    assert hidden.shape == (*padded.shape, 40) and weight.shape == (300, 40)
    assert abs((targets == IGNORE_INDEX).float().mean().item() - 1 / 3) < 0.05
    assert 2.5 < (hidden.float() @ weight.float().T).std().item() < 3.5  # logits ~ 3 N(0, 1)
    with pytest.raises(ValueError, match="mode must be"):
        L.FAMILY.cases("huge")


def test_compare_renders_lm_head_rows_and_merge_keeps_other_cases(tmp_path):
    case = "linear_fwd 16384x4096x151936 bf16"

    def row(provider, tflops, frac, status="ok"):
        return {"case": case, "op": "linear_fwd", "provider": provider, "status": status, "tflops": tflops,
                "frac_matmul": frac, "median_ms": 1.0, "gbps": None}

    run = {"device": {"name": "NVIDIA H100", "copy_gbps": 3000.0, "interpreted": False}, "mode": "quick",
           "rows": [row("torch_matmul", 780.0, 1.0), row("covkernels_linear", 600.0, 0.77),
                    row("cce", None, None, status="skipped: cut_cross_entropy not installed")]}
    path = tmp_path / "h100.json"
    path.write_text(json.dumps(run))
    text = compare.markdown(compare.load([str(path)]))
    assert f"| {case} | torch_matmul | 780 (100% of mm) |" in text
    assert f"| {case} | covkernels_linear | 600 (77% of mm) |" in text
    assert f"| {case} | cce | not installed |" in text
    compare.chart(compare.load([str(path)]), tmp_path / "h100.png")
    assert (tmp_path / "h100.png").read_bytes()[:4] == b"\x89PNG"

    kept, merged_from = report.merged(str(path), ["fwd 16384x151936 bf16"])
    assert [r["provider"] for r in kept] == ["torch_matmul", "covkernels_linear", "cce"]
    assert merged_from["mode"] == "quick"
    assert report.merged(str(path), [case])[0] == []
    assert report.merged(str(tmp_path / "absent.json"), [case]) == ([], None)


def test_targets_line_reads_the_issue_targets():
    N, D, V = L.TARGET_SHAPE
    base = {"provider": "covkernels_linear", "dtype": "bf16", "pad": 0.0, "N": N, "D": D, "V": V, "status": "ok"}
    rows = [dict(base, op="linear_fwd", case="fwd", frac_matmul=0.75, peak_extra_frac_logits=0.012),
            dict(base, op="linear_fwd_bwd", case="bwd", frac_matmul=0.55, peak_extra_frac_logits=0.08),
            dict(base, op="linear_fwd", case="padded", pad=L.PAD, frac_matmul=0.9, peak_extra_frac_logits=0.0),
            dict(base, op="linear_fwd", case="unfused", provider="unfused", frac_matmul=0.5,
                 peak_extra_frac_logits=1.0)]
    fwd, bwd = L.FAMILY.targets(rows)
    assert "75% of torch mm (>= 70%: met)" in fwd and "1.2% of the logits (< 5%: met)" in fwd
    assert "55% of torch mm (>= 60%: MISSED)" in bwd and "8.0% of the logits (< 5%: MISSED)" in bwd
