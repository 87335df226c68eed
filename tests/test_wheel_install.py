"""Installation as a user does it: build the wheel, install it in a fresh virtual environment, run an example.

The wheel is built from a copy of the working tree (so the tree is left clean) with the installed setuptools
and no build isolation, so no network is needed; `python -m build` is used when it is installed. The
environment is created with --system-site-packages to reuse torch and triton.
"""
import importlib.util
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"covkernels", "python_ref"}

pytestmark = pytest.mark.skipif(importlib.util.find_spec("setuptools") is None,
                                reason="building the wheel without network needs setuptools installed")

# Imports and a tiny call in the installed package, then examples/grpo_plain.py (argv after the script path).
CHECK = """
import runpy, sys, covkernels, covkernels.integrations, python_ref, torch
from covkernels import logprobs_and_entropy
logp, h = logprobs_and_entropy(torch.randn(3, 50), torch.tensor([0, 7, 49]))
assert torch.all(logp <= 0) and torch.all(h >= 0)
outside = [m.__file__ for name, m in list(sys.modules.items())
           if name.split(".")[0] in ("covkernels", "python_ref") and getattr(m, "__file__", None)
           and not m.__file__.startswith(sys.prefix)]
assert not outside, outside
assert not {"trl", "verl"} & set(sys.modules), "import covkernels must not import a trainer"
print("ok", covkernels.__version__, covkernels.__file__)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run(cmd, **kwargs):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    src = tmp_path_factory.mktemp("src") / "covkernels"
    skip = shutil.ignore_patterns(".git", "__pycache__", "build", "dist", "*.egg-info", ".pytest_cache",
                                  ".hypothesis", ".benchmarks")
    shutil.copytree(ROOT, src, ignore=skip)
    out = tmp_path_factory.mktemp("wheelhouse")
    if importlib.util.find_spec("build") is not None:
        run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(src)])
    else:
        run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir",
             str(out), str(src)])
    (path,) = out.glob("covkernels-*.whl")
    return path


def test_wheel_holds_only_the_packages(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if ".dist-info/" not in name}
    assert top == PACKAGES, f"unexpected top-level entries in the wheel: {sorted(top - PACKAGES)}"
    assert all(name.endswith(".py") for name in names if ".dist-info/" not in name), names
    assert "covkernels/integrations/trl.py" in names and "covkernels/integrations/verl.py" in names
    assert "covkernels/ops/fused_pass.py" in names


def test_installs_into_a_fresh_venv_and_runs_the_example(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    try:
        venv.create(env_dir, system_site_packages=True, with_pip=True)
    except (subprocess.CalledProcessError, OSError) as exc:  # no ensurepip on this Python
        pytest.skip(f"cannot create a virtual environment with pip: {exc}")
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)])
    # Outside the repository, without the interpreter: what a user on a CPU machine runs.
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env["OMP_NUM_THREADS"] = "1"  # a tiny model: threads only contend on a busy CPU
    script = shutil.copy(ROOT / "examples" / "grpo_plain.py", tmp_path / "grpo_plain.py")
    args = ["--steps", "2", "--prompts", "2", "--method", "clip_cov", "--centering", "state"]
    out = run([str(python), "-c", CHECK, str(script), *args], cwd=tmp_path, env=env)
    assert "ok 0.1.0" in out
    assert len([line for line in out.splitlines() if line.startswith("step")]) == 2, out
