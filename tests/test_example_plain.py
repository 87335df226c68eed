"""examples/grpo_plain.py runs as a user runs it (a script, CPU path) and prints a falling entropy curve."""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "grpo_plain.py"
LINE = re.compile(r"^step +(\d+) +reward ([\d.]+) +entropy ([\d.]+) +selected (\d+)")


def run_example(*args):
    # One thread: a model this small runs many times slower with threads fighting over a busy CPU.
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [LINE.match(line) for line in out.stdout.splitlines()]
    return [(int(m[1]), float(m[2]), float(m[3]), int(m[4])) for m in rows if m]


def test_kl_cov_entropy_curve():
    rows = run_example("--steps", "6")
    assert [r[0] for r in rows] == list(range(6))
    entropy = [r[2] for r in rows]
    assert all(math.isfinite(h) and 0 <= h <= math.log(16) for h in entropy)
    assert entropy[-1] < entropy[0]                  # the policy sharpens on the rewarded token
    assert rows[-1][1] > rows[0][1]                  # and the reward rises
    assert all(r[3] == 7 for r in rows)              # KL-Cov: floor(0.02 * 32 * 12) tokens each step

