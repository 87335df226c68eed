"""The LM-head kernels compile for an H100 (sm_90) on a machine without a GPU, through tensor-core
instructions (wgmma): the interpreter, which runs every other test, never compiles a kernel."""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def built():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, os.path.join(HERE, "sm90_build.py")], capture_output=True, text=True,
                         env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return [line.split() for line in run.stdout.splitlines()]


@pytest.mark.parametrize("kernel", ["linear_fwd", "linear_dz", "mm_acc"])
def test_every_autotuned_config_compiles_to_wgmma(built, kernel):
    rows = [r for r in built if r[0] == kernel]
    assert len(rows) >= 4
    assert all(r[3] == "True" for r in rows), rows


def test_a_spill_free_config_exists_for_the_backward(built):
    for kernel in ("linear_dz", "mm_acc"):
        assert min(int(r[4]) for r in built if r[0] == kernel) == 0
