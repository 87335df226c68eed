"""Compiles the LM-head kernels for an H100 (sm_90) without a GPU and prints one line per kernel:
name, wgmma used, registers spilled (bytes of stack per thread). Run without TRITON_INTERPRET (the
interpreter replaces @triton.jit functions); tests/test_compile_sm90.py does."""
import os
import re
import subprocess
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from covkernels.ops import linear_pass as lp

_SHARED = {"BLOCK_N": "constexpr", "BLOCK_V": "constexpr", "BLOCK_D": "constexpr", "GROUP_N": "constexpr",
           "HAS_BIAS": "constexpr", "DOT_UPCAST": "constexpr", "ACC": "constexpr"}
_ROWS = {"h_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "t_ptr": "*i64"}
KERNELS = {
    "linear_fwd": (lp._linear_fwd_kernel, {
        **_ROWS, "part_ptr": "*fp32", "N": "i32", "V": "i32", "D": "i32", "stride_hn": "i64", "stride_wv": "i64",
        "chunk": "i64", "n_split": "i32", "inv_temp": "fp32", "ignore_index": "i64", **_SHARED, "STATS": "constexpr"},
        {"STATS": True}),
    "linear_dz": (lp._linear_dz_kernel, {
        **_ROWS, "lse_ptr": "*fp32", "lo_ptr": "*fp32", "ent_ptr": "*fp32", "glogp_ptr": "*fp32", "gent_ptr": "*fp32",
        "dz_ptr": "*bf16", "N": "i32", "V": "i32", "D": "i32", "col_start": "i32", "n_cols": "i32",
        "stride_hn": "i64", "stride_wv": "i64", "stride_dzn": "i64", "inv_temp": "fp32", "ignore_index": "i64",
        **_SHARED}, {}),
    "mm_acc": (lp._mm_acc_kernel, {
        "a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "lo_ptr": "*bf16", "M": "i32", "C": "i32", "K": "i32",
        "stride_am": "i64", "stride_bk": "i64", "BLOCK_M": "constexpr", "BLOCK_C": "constexpr",
        "BLOCK_K": "constexpr", "GROUP_N": "constexpr", "SPLIT_LO": "constexpr", "DOT_UPCAST": "constexpr",
        "ACC": "constexpr"}, {"SPLIT_LO": True}),
}


def build(name):
    autotuned, signature, extra = KERNELS[name]
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    for config in autotuned.configs:
        constexprs = {**config.kwargs, "HAS_BIAS": True, "DOT_UPCAST": False, "ACC": tl.float32, **extra}
        constexprs = {k: v for k, v in constexprs.items() if k in signature}
        kernel = triton.compile(ASTSource(fn=autotuned.fn, signature=signature, constexprs=constexprs),
                                target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": config.num_warps, "num_stages": config.num_stages})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
        stack = int(re.findall(r"STACK:(\d+)", usage)[0])
        tiles = "x".join(str(v) for k, v in config.kwargs.items() if k.startswith("BLOCK"))
        print(name, tiles, config.num_warps, "wgmma" in kernel.asm["ptx"], stack)


if __name__ == "__main__":
    for kernel_name in KERNELS:
        build(kernel_name)
