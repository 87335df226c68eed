"""Installation as a user does it: build the wheel, install it in a fresh virtual environment, run an example.

The wheel and the sdist are built from a copy of the working tree (so the tree is left clean) with the
installed setuptools and no build isolation, so no network is needed; `python -m build` is used when it is
installed. The fresh environment reuses torch and triton from the environment running the tests: a .pth
file lists the running interpreter's site-packages. (--system-site-packages would not do: from inside a
virtualenv it exposes the base interpreter's site-packages, not the virtualenv's, where torch may be.)
"""
import importlib.metadata
import importlib.util
import os
import shutil
import site
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"covkernels"}  # python_ref/ stays in the repository and the sdist



def _setuptools_major():
    try:
        return int(importlib.metadata.version("setuptools").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        return None


# pyproject.toml's build-system asks for setuptools>=68 (the `test` extra installs it); a virtualenv starts
# with the older one its Python bundles, which cannot build this project.
pytestmark = pytest.mark.skipif((_setuptools_major() or 0) < 68,
                                reason="building offline needs setuptools>=68 installed (pip install -e '.[test]')")

# Imports and a tiny call in the installed package, then examples/grpo_plain.py (argv after the script path).
CHECK = """
import runpy, sys, covkernels, covkernels.integrations, torch
from covkernels import logprobs_and_entropy
logp, h = logprobs_and_entropy(torch.randn(3, 50), torch.tensor([0, 7, 49]))
assert torch.all(logp <= 0) and torch.all(h >= 0)
outside = [m.__file__ for name, m in list(sys.modules.items())
           if name.split(".")[0] == "covkernels" and getattr(m, "__file__", None)
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
def source(tmp_path_factory):
    """A copy of the working tree, without build products and caches."""
    src = tmp_path_factory.mktemp("src") / "covkernels"
    skip = shutil.ignore_patterns(".git", "__pycache__", "build", "dist", "*.egg-info", ".pytest_cache",
                                  ".hypothesis", ".benchmarks")
    shutil.copytree(ROOT, src, ignore=skip)
    return src


def build(source, out, kind):
    """Builds the wheel or the sdist (kind) of `source` into `out`; returns its path."""
    if importlib.util.find_spec("build") is not None:
        run([sys.executable, "-m", "build", f"--{kind}", "--no-isolation", "--outdir", str(out), str(source)])
    else:  # the PEP 517 hook of the installed setuptools, as pip would call it
        hook = f"build_{kind}"
        run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.{hook}({str(out)!r})"],
            cwd=source)
    (path,) = out.glob("covkernels-*.whl" if kind == "wheel" else "covkernels-*.tar.gz")
    return path


@pytest.fixture(scope="module")
def wheel(source, tmp_path_factory):
    return build(source, tmp_path_factory.mktemp("wheelhouse"), "wheel")


def test_wheel_holds_only_the_packages(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if ".dist-info/" not in name}
    assert top == PACKAGES, f"unexpected top-level entries in the wheel: {sorted(top - PACKAGES)}"
    assert all(name.endswith(".py") for name in names if ".dist-info/" not in name), names
    assert "covkernels/integrations/trl.py" in names and "covkernels/integrations/verl.py" in names
    assert "covkernels/ops/fused_pass.py" in names


def test_sdist_keeps_the_reference_and_the_tests(source, tmp_path):
    sdist = tarfile.open(build(source, tmp_path, "sdist"))
    names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert {"python_ref/__init__.py", "python_ref/logprobs.py", "tests/conftest.py", "MANIFEST.in"} <= names
    assert "covkernels/ops/fused_pass.py" in names and "pyproject.toml" in names


def running_site_packages():
    """The site-packages directories this interpreter imports from: its virtualenv's (and the base's when
    that was made with --system-site-packages), else the base interpreter's; the user's if enabled."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for d in dirs if os.path.isdir(d)]


def test_installs_into_a_fresh_venv_and_runs_the_example(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    try:
        venv.create(env_dir, with_pip=True)
    except (subprocess.CalledProcessError, OSError) as exc:  # no ensurepip on this Python
        pytest.skip(f"cannot create a virtual environment with pip: {exc}")
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()
    # Appended to the fresh environment's sys.path, after its own site-packages (where the wheel goes). The
    # .pth files in them are not run, so an editable covkernels installed there stays out of the way.
    (Path(purelib) / "running_env.pth").write_text("\n".join(running_site_packages()) + "\n")
    run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)])
    # Outside the repository, without the interpreter: what a user on a CPU machine runs.
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env["OMP_NUM_THREADS"] = "1"  # a tiny model: threads only contend on a busy CPU
    script = shutil.copy(ROOT / "examples" / "grpo_plain.py", tmp_path / "grpo_plain.py")
    args = ["--steps", "2", "--prompts", "2", "--method", "clip_cov", "--centering", "state"]
    out = run([str(python), "-c", CHECK, str(script), *args], cwd=tmp_path, env=env)
    assert "ok 0.1.0" in out
    assert len([line for line in out.splitlines() if line.startswith("step")]) == 2, out
