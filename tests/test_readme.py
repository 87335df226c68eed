"""Every python block of README.md runs as written, on the CPU, with and without the Triton interpreter.

How the blocks are run (what the README may rely on, and all the test changes):
- In document order, in one fresh Python process per mode (TRITON_INTERPRET=1, or unset: the chunked
  PyTorch path), the working directory a temporary one, the repository root on sys.path (a clone, as a
  reader has), and the environment of `torchrun --nproc_per_node=1` (RANK=0, WORLD_SIZE=1, MASTER_ADDR,
  MASTER_PORT), so a block may call dist.init_process_group() as it would under torchrun.
- Each block in a fresh namespace and without a default process group (as in a fresh process), except a
  block whose first line is a comment starting with "# continues" (which says which block it continues): it
  runs in the namespace, and with the process group, the block before it left.
- Sizes: on a line that only assigns integer literals to names (`B, T, V = 4, 256, 32000  # ...`), the
  values of the names in SIZES below are replaced by small ones, so the interpreter finishes in seconds.
  Nothing else of a block's text is changed.
Whatever blocks the README holds are run: the test knows none of them by content.
"""
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"B": 2, "T": 6, "V": 300, "D": 16, "N": 12, "STEPS": 2}
CONTINUES = "# continues"
_FENCE = re.compile(r"^```python\n(.*?)^```", re.M | re.S)
_SIZE_LINE = re.compile(r"^(\s*)([A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)*)\s*=\s*(\d+(?:\s*,\s*\d+)*)(\s*#.*)?$")

# Runs the blocks given as JSON on stdin; prints one line per block: MARK {"index", "ok", "error"}.
MARK = "README-BLOCK-RESULT "
RUNNER = """
import json, sys, traceback
blocks = json.load(sys.stdin)
namespace = None
for i, block in enumerate(blocks):
    if namespace is None or not block["continues"]:
        namespace = {"__name__": "__main__"}
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_initialized():  # as in a fresh process (a trainer may have made one)
            dist.destroy_process_group()
    try:
        exec(compile(block["code"], f"README.md block {i + 1} (line {block['line']})", "exec"), namespace)
        result = {"index": i, "ok": True, "error": None}
    except BaseException:
        result = {"index": i, "ok": False, "error": traceback.format_exc(limit=-3)}
    print(MARK + json.dumps(result), flush=True)
""".replace("MARK", repr(MARK))


def python_blocks(text):
    """[(line number of the block's first line, code)] of the ```python fences of a markdown text."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in _FENCE.finditer(text)]


def small_sizes(code):
    """The code with the values of SIZES substituted on its integer-literal assignment lines."""
    def fix(line):
        m = _SIZE_LINE.match(line)
        if not m:
            return line
        names = [n.strip() for n in m.group(2).split(",")]
        values = [v.strip() for v in m.group(3).split(",")]
        if len(names) != len(values) or not set(names) & set(SIZES):
            return line
        values = [str(SIZES.get(n, v)) for n, v in zip(names, values)]
        return f"{m.group(1)}{', '.join(names)} = {', '.join(values)}{m.group(4) or ''}"
    return "\n".join(fix(line) for line in code.split("\n"))


def test_size_substitution_touches_only_size_assignments():
    code = "B, T, V = 4, 256, 32000  # sizes\nx = 5\nV = 7\nlr, B = 3, 9\nB = V + 1\n    STEPS = 20"
    assert small_sizes(code) == ("B, T, V = 2, 6, 300  # sizes\nx = 5\nV = 300\nlr, B = 3, 2\nB = V + 1\n"
                                 "    STEPS = 2")


def test_blocks_are_found():
    blocks = python_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 5, "README.md should show its API in python blocks"
    assert not blocks[0][1].startswith(CONTINUES), "the first block has nothing to continue"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["interpreter", "torch"])
def test_every_block_runs(mode, tmp_path):
    blocks = [{"line": line, "code": small_sizes(code), "continues": code.startswith(CONTINUES)}
              for line, code in python_blocks((ROOT / "README.md").read_text())]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), HF_HUB_OFFLINE="1")
    if mode == "interpreter":
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(blocks), capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=900)
    results = [json.loads(line.removeprefix(MARK)) for line in out.stdout.splitlines() if line.startswith(MARK)]
    failed = [f"block {r['index'] + 1} (README.md line {blocks[r['index']]['line']}):\n{r['error']}"
              for r in results if not r["ok"]]
    assert len(results) == len(blocks), f"the runner stopped early:\n{out.stderr[-3000:]}"
    assert not failed, "\n".join(failed)
