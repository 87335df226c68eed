"""The benchmark's registry (CPU, seconds): one row schema for every family, the runner on the policy-loss and
entropy-change families (a wrong provider caught), the check on the tests' own rule, the main job running
the families that run only when named, and the pytest-benchmark suite generated from the registry."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import check, cpu_path, entropy_change, lm_head, logprobs, policy_loss, registry, runner
from bench import tolerances
from bench.cases import Case
from bench.providers import Provider
from test_bench_smoke import run_main_job

CPU = torch.device("cpu")
# The fields of the results rows before the families shared one runner: bench/compare.py and the results
# files read them, so every row keeps them.
LOGITS_FIELDS = {"case", "op", "N", "V", "dtype", "pad", "n_valid", "provider", "kind", "computes", "note",
                 "status", "errors", "max_err", "median_ms", "min_ms", "reps", "times_ms", "bytes", "gbps",
                 "frac_copy", "copy_gbps", "peak_extra_bytes", "input_sets"}
LM_HEAD_FIELDS = LOGITS_FIELDS | {"D", "flops", "tflops", "frac_matmul", "logits_bytes", "required_bytes",
                                  "peak_extra_frac_logits"}
CPU_FIELDS = LOGITS_FIELDS | {"first_call_ms", "peak_extra_frac_logits"}


def _python_ref_rows(family, case):
    (row,) = runner.run_case(family, case, [family.by_name["python_ref"]], CPU)
    assert row["status"] == "ok" and row["median_ms"] > 0, row
    return row


def test_every_family_writes_one_row_schema():
    rows = {family.name: _python_ref_rows(family, case) for family, case in [
        (logprobs.FAMILY, Case("fwd_bwd", 8, 33, "fp32", 0.3)),
        (lm_head.FAMILY, lm_head.LinearCase("linear_fwd_bwd", 8, 5, 33, "fp32", 0.3)),
        (cpu_path.FAMILY, cpu_path.CpuCase("cpu_fwd", 8, 33, "bf16")),
        (policy_loss.FAMILY, policy_loss.PolicyCase("policy_loss", 8, 33, "fp32", 0.3, "kl_cov")),
        (entropy_change.FAMILY, entropy_change.ChangeCase("entropy_change", 8, 33, "fp32", 0.3))]}
    common = set.intersection(*(set(r) for r in rows.values()))
    assert LOGITS_FIELDS | {"first_call_ms", "logits_bytes", "peak_extra_frac_logits"} <= common
    assert LM_HEAD_FIELDS <= set(rows["lm_head"]) and CPU_FIELDS <= set(rows["cpu"])
    assert set(rows["policy_loss"]) - common == {"method"} and rows["policy_loss"]["method"] == "kl_cov"
    assert set(rows["lm_head"]) - common == {"D", "flops", "tflops", "frac_matmul", "required_bytes"}
    assert rows["cpu"]["op"] == "cpu_fwd" and rows["lm_head"]["bytes"] is None
    for r in rows.values():
        assert r["first_call_ms"] > 0 and r["gbps" if r["bytes"] else "tflops"] > 0
    json.dumps(list(rows.values()))


def _flip(name):
    """A wrong provider: python_ref's entropy change with the sign of `name` flipped."""
    def load():
        fn = entropy_change.FAMILY.by_name["python_ref"].load()

        def wrong(before, after, mask):
            change = fn(before, after, mask)
            return tuple(-x if field == name else x for field, x in zip(change._fields, change))
        return wrong
    return Provider(f"flipped_{name}", "ours", load, computes=("predicted", "actual"))


def _unmasked():
    def load():
        fn = entropy_change.FAMILY.by_name["python_ref"].load()
        return lambda before, after, mask: fn(before, after, torch.ones_like(mask))
    return Provider("unmasked", "ours", load, computes=("predicted", "actual"))


def test_entropy_change_family_checks_and_times():
    family = entropy_change.FAMILY
    case = entropy_change.ChangeCase("entropy_change", 8, 300, "fp32", 0.3)
    providers = [family.by_name["covkernels"], family.by_name["python_ref"], _flip("predicted"),
                 _flip("actual"), _unmasked()]
    rows = {r["provider"]: r for r in runner.run_case(family, case, providers, CPU)}
    assert {k: r["status"] for k, r in rows.items()} == {
        "covkernels": "ok", "python_ref": "ok", "flipped_predicted": "wrong", "flipped_actual": "wrong",
        "unmasked": "wrong"}
    assert rows["covkernels"]["max_err"] < 1e-5
    assert set(rows["covkernels"]["errors"]) == {"predicted", "actual"}
    assert rows["covkernels"]["bytes"] == 2 * rows["covkernels"]["n_valid"] * 300 * 4 + 9 * 8
    assert [c.name for c in family.cases("tiny")] == ["entropy_change 64x4099 bf16 pad30",
                                                      "entropy_change 64x4099 fp32"]


def test_policy_loss_family_checks_on_a_small_instance():
    family = policy_loss.FAMILY

    def load():
        fn = family.by_name["python_ref"].load()
        return lambda x, method, **kw: (lambda loss, metrics: (loss * 1.01, metrics))(*fn(x, method, **kw))

    case = policy_loss.PolicyCase("policy_loss", 8, 70, "fp32", 0.3, "clip_cov")
    providers = [family.by_name["covkernels"], family.by_name["python_ref"],
                 Provider("scaled", "ours", load, computes=("loss",))]
    rows = {r["provider"]: r for r in runner.run_case(family, case, providers, CPU)}
    assert {k: r["status"] for k, r in rows.items()} == {"covkernels": "ok", "python_ref": "ok",
                                                         "scaled": "wrong"}
    assert rows["covkernels"]["case"] == "policy_loss clip_cov 8x70 fp32 pad30"
    assert set(rows["covkernels"]["errors"]) == {"loss", "grad"} and rows["covkernels"]["max_err"] < 1e-5
    assert rows["covkernels"]["bytes"] == Case("fwd_bwd", 8, 70, "fp32", 0.3).bytes_moved
    assert len(family.cases("tiny")) == len(policy_loss.METHODS)


def test_check_holds_providers_to_the_shared_rule(monkeypatch):
    """The benchmark's check and the tests' assertion are one rule: SLACK x plain PyTorch's error + the
    table's tolerance x (1 + max |reference|), read from bench.tolerances."""
    truth = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    ref_out = {"truth": {"logp": truth}, "plain": {"logp": truth + 1e-3}}
    bound = 4 * 1e-3 + 1e-4 * 3.0  # fp32: SLACK["bench"] = 4, TOLERANCES[fp32]["bench"] = 1e-4, scale 1 + 2
    within, beyond = truth + 0.99 * bound, truth + 1.01 * bound
    assert check.score({"logp": within}, ref_out, torch.float32)[1]
    assert not check.score({"logp": beyond}, ref_out, torch.float32)[1]
    nan = truth.clone()
    nan[1] = float("nan")
    twice = {k: dict(v, logp_twice=v["logp"]) for k, v in ref_out.items()}
    _, ok, worst = check.score({"logp": within, "logp_twice": nan}, twice, torch.float32)
    assert not ok and worst != worst  # NaN where the reference is a number: the largest error
    with pytest.raises(AssertionError, match="plain-torch error"):  # the tests' kind: no slack over plain
        tolerances.assert_close_to_ref(within, truth, truth + 1e-3, torch.float32, "bwd")
    monkeypatch.setitem(tolerances.SLACK, "bench", 5)
    assert check.score({"logp": beyond}, ref_out, torch.float32)[1]


def test_compile_is_left_out_on_a_cpu_but_where_the_cpu_figures_are_set_against_it():
    assert registry.skips(logprobs.FAMILY, on_gpu=False) == {"compiled_ref": registry.NOT_COMPILED}
    assert registry.skips(policy_loss.FAMILY, on_gpu=False, compile_on_cpu=True) == {}
    assert registry.skips(cpu_path.FAMILY, on_gpu=False) == registry.skips(lm_head.FAMILY, on_gpu=True) == {}
    assert [f.name for f in registry.FAMILIES if registry.runs_unasked(f, on_gpu=True)] == ["logits", "lm_head"]
    assert [f.name for f in registry.FAMILIES if registry.runs_unasked(f, on_gpu=True, main_job=False)] == [
        "logits", "lm_head", "policy_loss", "entropy_change"]


def test_main_job_runs_the_families_named_by_ops(tmp_path):
    argv = ["--ops", "policy_loss,entropy_change", "--providers", "python_ref"]
    stdout, results = run_main_job(argv, tmp_path / "named.json")
    assert "3 policy-loss cases x 1 providers, 2 entropy-change cases x 1 providers" in stdout
    assert "policy loss: policy-loss rows" in stdout
    assert "entropy change: entropy-change rows" in stdout
    assert [(r["op"], r["status"]) for r in results["rows"]] == [("policy_loss", "ok")] * 3 + [
        ("entropy_change", "ok")] * 2
    assert all(r["case"] in stdout for r in results["rows"])
    assert set(registry.CONVENTIONS) == set(results["conventions"])


def _suite_ids():
    """What conftest.py generates on a CPU: every provider of every case of every family, tiny shapes."""
    return sorted(f"{c.name}-{p.name}".replace(" ", "-") for family in registry.FAMILIES
                  for c in family.cases("tiny") for p in family.providers if p.ops is None or c.op in p.ops)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's suite: tiny shapes, the CPU family included")
def test_pytest_benchmark_suite_is_generated_from_the_registry():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = [sys.executable, "-m", "pytest", "bench", "-q", "-p", "no:cacheprovider"]
    listed = subprocess.run([*run, "--collect-only"], cwd=ROOT, env=env, check=False, capture_output=True,
                            text=True, timeout=300)
    ids = sorted(line.split("[", 1)[1][:-1] for line in listed.stdout.splitlines()
                 if "::test_family[" in line)
    assert ids == _suite_ids() and any(i.startswith("cpu-") for i in ids), listed.stdout[-3000:]
    picked = "entropy_change-64x4099-fp32 and (python_ref or covkernels)"
    timed = subprocess.run([*run, "-k", picked, "--benchmark-json", os.devnull], cwd=ROOT, env=env,
                           check=False, capture_output=True, text=True, timeout=300)
    assert timed.returncode == 0 and "2 passed" in timed.stdout, timed.stdout[-3000:] + timed.stderr[-3000:]
