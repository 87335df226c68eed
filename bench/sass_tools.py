"""Compiling a launcher's kernels for sm_90 without a GPU, and reading their machine code.

`capture()` intercepts every Triton launch a host launcher makes (run on "meta" tensors, so nothing is
allocated or executed) and records the kernel with its arguments; `compile_sm90` specialises and compiles
each launch exactly as the JIT would on a Hopper GPU (integer and pointer arguments divisible by 16 are
marked so, which changes the vector width of the loads); `streaming_loops` finds the loops of the SASS
that load from global memory and counts their instructions on the hot path.
"""
import contextlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, create_function_from_signature

TARGET = GPUTarget("cuda", 90, 32)
_CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


@dataclass
class Launch:
    """One kernel launch: the @triton.jit function, its arguments, and its autotuner configs (or None)."""

    fn: JITFunction
    args: tuple
    kwargs: dict
    configs: list | None = None

    @property
    def name(self):
        return self.fn.__name__

    def variants(self):
        """(label, kwargs) for every configuration the launch may compile to (one per autotuner config)."""
        if self.configs is None:
            return [("", self.kwargs)]
        out = []
        for c in self.configs:
            label = "x".join(str(v) for k, v in c.kwargs.items() if k.startswith("BLOCK"))
            label += f"/w{c.num_warps}/s{c.num_stages}"
            out.append((label, {**self.kwargs, **c.all_kwargs()}))
        return out


@contextlib.contextmanager
def capture():
    """Records the launches made inside the block (list of Launch) instead of running them."""
    launches = []

    def jit_run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs))

    def autotune_run(self, *args, grid=None, warmup=False, **kwargs):
        launches.append(Launch(self.fn, args, kwargs, self.configs))

    saved = JITFunction.run, Autotuner.run
    JITFunction.run, Autotuner.run = jit_run, autotune_run
    try:
        yield launches
    finally:
        JITFunction.run, Autotuner.run = saved


def compile_sm90(fn, args, kwargs):
    """The kernel the JIT would build for this launch on an sm_90 GPU (same specialisation and options)."""
    kwargs = {k: v for k, v in kwargs.items() if k != "pre_hook"}
    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=options.__dict__)


def disassemble(kernel):
    """(SASS text, resource usage text) of a compiled kernel, from the cuobjdump shipped with Triton."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([_CUOBJDUMP, "-sass", f.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([_CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return sass, usage


def resources(usage):
    """(registers, stack bytes per thread, static shared memory bytes) from `cuobjdump -res-usage`."""
    reg, stack, shared = (int(re.search(rf"{k}:(\d+)", usage).group(1)) for k in ("REG", "STACK", "SHARED"))
    return reg, stack, shared


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


@dataclass
class Instr:
    addr: int
    pred: str
    op: str
    args: str

    def branch_target(self):
        return _target(self.args) if self.op.startswith("BRA") else None


def _target(args):
    m = re.search(r"0x([0-9a-f]+)", args)
    return int(m.group(1), 16) if m else None


def parse(sass):
    return [Instr(int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3), m.group(4).strip())
            for m in _LINE.finditer(sass)]


@dataclass
class Loop:
    """A natural loop of the SASS: its instructions (in address order) and the hot path through them, from the
    head to the back edge with every forward branch inside the loop taken, so that a block such a branch
    skips (the rescale when the running max rises) is left out and reported as cold."""

    body: list
    hot: list
    cold_blocks: list = field(default_factory=list)

    def ops(self, prefix, hot_only=True):
        return [i.op for i in (self.hot if hot_only else self.body) if i.op.startswith(prefix)]


def _blocks(instrs):
    """Basic blocks as (first, last) instruction indices, and the successors of each block."""
    index = {ins.addr: k for k, ins in enumerate(instrs)}
    leaders = {0}
    for k, ins in enumerate(instrs):
        if ins.op.startswith(("BRA", "EXIT", "RET")):
            leaders.add(k + 1)
            target = ins.branch_target()
            if target in index:
                leaders.add(index[target])
    starts = sorted(x for x in leaders if x < len(instrs))
    blocks = [(a, b - 1) for a, b in zip(starts, starts[1:] + [len(instrs)])]
    of = {first: n for n, (first, _) in enumerate(blocks)}
    succ = []
    for first, last in blocks:
        ins = instrs[last]
        out = []
        target = ins.branch_target()
        if target in index:
            out.append(of[index[target]])
        unconditional = ins.op.startswith(("BRA", "EXIT", "RET")) and not ins.pred
        if not unconditional and last + 1 < len(instrs):
            out.append(of[last + 1])
        succ.append(out)
    return blocks, succ


def _loops(blocks, succ):
    """{head block: set of blocks} of every back edge tail -> head (a branch to a block at or before it): the
    blocks on a cycle through both, those reachable from the head that reach the tail (ptxas often enters a
    loop in its middle, so the head need not dominate the tail)."""
    pred = [[] for _ in blocks]
    for n, outs in enumerate(succ):
        for m in outs:
            pred[m].append(n)

    def reach(start, edges):
        seen, todo = {start}, [start]
        while todo:
            for m in edges[todo.pop()]:
                if m not in seen:
                    seen.add(m)
                    todo.append(m)
        return seen

    loops = {}
    for n, outs in enumerate(succ):
        for head in outs:
            if head <= n:
                loops.setdefault(head, set()).update(reach(head, succ) & reach(n, pred))
    return loops


def streaming_loops(instrs):
    """The innermost loops of the kernel's own code that load from global memory, in address order. Not counted:
    the code of functions it calls (the kernels keep their rare paths there, Triton's noinline functions, laid
    out after the kernel's body), and the loops ptxas makes to run a warp collective (a shuffle) in code it
    cannot prove uniform (ENDCOLLECTIVE)."""
    calls = [t for i in instrs if i.op.startswith("CALL") for t in [_target(i.args)] if t is not None]
    if calls:
        instrs = [i for i in instrs if i.addr < min(calls)]
    blocks, succ = _blocks(instrs)
    loops = _loops(blocks, succ)
    out = []
    for head, body in sorted(loops.items()):
        if any(h != head and h in body and loops[h] < body for h in loops):
            continue  # not innermost
        members = [instrs[k] for b in sorted(body) for k in range(blocks[b][0], blocks[b][1] + 1)]
        ops = {i.op.split(".")[0] for i in members}
        if "LDG" not in ops or "ENDCOLLECTIVE" in ops:
            continue
        index = {ins.addr: k for k, ins in enumerate(instrs)}
        in_loop = {i.addr for i in members}
        hot, k, seen = [], blocks[head][0], set()
        while k not in seen:
            seen.add(k)
            ins = instrs[k]
            hot.append(ins)
            target = ins.branch_target()
            if target is not None and target in in_loop:
                if target == instrs[blocks[head][0]].addr:
                    break  # the back edge
                if target > ins.addr:
                    k = index[target]
                    continue
            if ins.op.startswith("BRA") and not ins.pred and target not in in_loop:
                break
            k += 1
            if instrs[k].addr not in in_loop:
                break
        hot_addrs = {i.addr for i in hot}
        cold = [i for i in members if i.addr not in hot_addrs]
        groups = []
        for i in cold:
            if groups and index[i.addr] == index[groups[-1][-1].addr] + 1:
                groups[-1].append(i)
            else:
                groups.append([i])
        out.append(Loop(members, hot, groups))
    return out


def widths(loop, prefix):
    """Bit widths of the global loads (prefix "LDG") or stores ("STG") of a loop."""
    out = set()
    for op in loop.ops(prefix, hot_only=False):
        m = re.search(r"\.(128|64|U16|S16|U8|16|8)\b", op)
        out.add({"128": 128, "64": 64, "U16": 16, "S16": 16, "16": 16, "U8": 8, "8": 8}[m.group(1)] if m else 32)
    return sorted(out)
