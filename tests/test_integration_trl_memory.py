"""examples/trl_memory.py: one GRPO step's peak CPU memory, FusedGRPOTrainer's fused LM head against TRL's own
chunked LM head, at a vocabulary of 32768 (slow: two training processes at that vocabulary)."""
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("trl")
ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_fused_head_step_needs_less_memory_than_trls():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "trl_memory.py"), "--vocab", "32768",
                          "--batch", "4", "--tokens", "128"], capture_output=True, text=True, env=env,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line.split() for line in out.stdout.splitlines() if "step peak" in line]
    steps = {words[0]: float(words[3]) for words in lines}
    logits_mib = 4 * 128 * 32768 * 4 / 2**20
    # The fused head saves more than the completion logits' own fp32 size.
    assert steps["GRPOTrainer"] - steps["FusedGRPOTrainer"] > logits_mib, out.stdout
