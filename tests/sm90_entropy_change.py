"""Compiles the entropy-change kernel for an H100/H200 (sm_90) without a GPU and prints one line per input
dtype: dtype, registers, bytes of stack per thread (spills). Run without TRITON_INTERPRET (the interpreter
replaces @triton.jit functions); tests/test_entropy_change.py does."""
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from covkernels.ops import entropy_change as ec

SIGNATURE = {"b_ptr": "*{}", "a_ptr": "*{}", "mask_ptr": "*i1", "pred_ptr": "*fp32", "act_ptr": "*fp32", "V": "i32",
             "inner": "i32", "stride_b_outer": "i64", "stride_b_inner": "i64", "stride_a_outer": "i64",
             "stride_a_inner": "i64", "scale": "fp32", "BLOCK_V": "constexpr"}
# What a launch with 16-byte aligned tensors and row strides a multiple of 16 gets from the JIT's binder
# (it decides the width of the loads): pointers, V and the strides divisible by 16.
DIVISIBLE = ("b_ptr", "a_ptr", "mask_ptr", "pred_ptr", "act_ptr", "V", "stride_b_outer", "stride_b_inner",
             "stride_a_outer", "stride_a_inner")

if __name__ == "__main__":
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    names = list(SIGNATURE)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in DIVISIBLE}
    for dtype in ("bf16", "fp32"):
        signature = {k: v.format(dtype) for k, v in SIGNATURE.items()}
        kernel = triton.compile(ASTSource(fn=ec._entropy_change_kernel, signature=signature,
                                          constexprs={"BLOCK_V": ec._MAX_BLOCK}, attrs=attrs),
                                target=GPUTarget("cuda", 90, 32), options={"num_warps": ec.NUM_WARPS})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
        regs, stack = re.findall(r"REG:(\d+) STACK:(\d+)", usage)[0]
        print(dtype, regs, stack)
