"""Tiled matrix products of the fused LM head: tile configurations, the program-to-tile order, the fp32
depth loop shared by every kernel, and c += a @ b accumulated across vocabulary chunks (d_hidden).
"""
import triton
import triton.language as tl

from ..._validation import INTERPRETING

GROUP_N = 8


def configs(names=("BLOCK_N", "BLOCK_V", "BLOCK_D"), **fixed):
    """Tile configurations (rows, columns, depth of the product): one small one under the interpreter
    (which cannot autotune), a few on a GPU."""
    if INTERPRETING:
        return [triton.Config(dict(zip(names, (16, 32, 16)), **fixed), num_warps=4)]
    # Checked by compiling for sm_90 (cuobjdump -res-usage): 128x64 tiles never spill registers; the
    # larger ones spill a little in some kernels' epilogues but do more work per byte. The autotuner decides.
    shapes = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 64, 64, 8, 4), (64, 128, 64, 4, 4),
              (128, 128, 64, 8, 4)]
    return [triton.Config(dict(zip(names, (n, v, d)), **fixed), num_warps=w, num_stages=s)
            for n, v, d, w, s in shapes]


@triton.jit
def tile_coords(pid, n_tiles, n_cols, GROUP_N: tl.constexpr):
    # Programs that run at the same time cover GROUP_N row tiles x every column group, so the hidden
    # and weight tiles they stream come from L2 rather than once per program from HBM.
    per_group = GROUP_N * n_cols
    first = (pid // per_group) * GROUP_N
    rows = tl.minimum(n_tiles - first, GROUP_N)
    local = pid % per_group
    return first + local % rows, local // rows


@triton.jit
def dot_loop(a_ptrs, b_ptrs, K, b_step, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
              INTERPRETED: tl.constexpr):
    """sum over k of a[:, k] b[k, :] in fp32: a_ptrs [BLOCK_M, BLOCK_K] and b_ptrs [BLOCK_K, BLOCK_C] point at
    the first depth block (a contiguous along k; b's k stride is b_step), and must address valid memory
    in the other dims: only the depth is masked here, as 2-D masks in this loop make the compiler spill
    registers, and the pointers are advanced rather than recomputed for the same reason."""
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    if INTERPRETED:
        # Triton 3.6's interpreter cannot take a runtime range() bound; compiled, the for loop below is the
        # one the software pipeliner stages (it does not stage while loops).
        k0 = 0
        while k0 < K:
            acc = _dot_step(a_ptrs, b_ptrs, K - k0, acc, BLOCK_K, True)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K * b_step
            k0 += BLOCK_K
    else:
        for k0 in range(0, K, BLOCK_K):
            acc = _dot_step(a_ptrs, b_ptrs, K - k0, acc, BLOCK_K, False)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K * b_step
    return acc


@triton.jit
def _dot_step(a_ptrs, b_ptrs, k_left, acc, BLOCK_K: tl.constexpr, INTERPRETED: tl.constexpr):
    """acc + a @ b over one depth block, the depth masked at k_left."""
    mask_k = tl.arange(0, BLOCK_K) < k_left
    a = tl.load(a_ptrs, mask=mask_k[None, :], other=0.0)
    b = tl.load(b_ptrs, mask=mask_k[:, None], other=0.0)
    if INTERPRETED:
        # The interpreter's bf16/fp16 dot is wrong; fp32 operands of bf16 values give the same sums.
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    # "ieee": fp32 operands stay fp32 (no TF32), as torch's default matmul.
    return tl.dot(a, b, acc, input_precision="ieee", out_dtype=tl.float32)


# The kernel adds into c: the autotuner's trial runs must not (restore_value puts c and lo back).
@triton.autotune(configs=configs(("BLOCK_M", "BLOCK_C", "BLOCK_K"), GROUP_N=GROUP_N), key=["C", "K"],
                 restore_value=["c_ptr", "lo_ptr"])
@triton.jit
def _mm_acc_kernel(a_ptr, b_ptr, c_ptr, lo_ptr, M, C, K, stride_am, stride_bk,
                   BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
                   SPLIT_LO: tl.constexpr, INTERPRETED: tl.constexpr):
    """c [M, C] (contiguous) += a [M, K] @ b [K, C], the sum carried across calls in fp32-like precision.

    With SPLIT_LO (bf16/fp16 c) the running sum is the pair c + lo, lo [M, C] in c's dtype holding the
    rounding error of c: about 16 (bf16) or 22 (fp16) significant bits in 2 * M * C bytes more, where an
    fp32 accumulator would take 4 * M * C, and a plain bf16 sum would round once per vocabulary chunk."""
    tile_m, tile_c = tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(C, BLOCK_C), GROUP_N)
    offs_m = tile_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tile_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, BLOCK_K)
    # The overhang wraps into the matrix (see dot_loop); c is read after the loop (held across it, it
    # would spill).
    a_ptrs = a_ptr + (offs_m % M)[:, None] * stride_am + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + (offs_c % C)[None, :]  # [BLOCK_K, BLOCK_C]
    acc = dot_loop(a_ptrs, b_ptrs, K, stride_bk, BLOCK_M, BLOCK_C, BLOCK_K, INTERPRETED)
    offs = offs_m[:, None] * C + offs_c[None, :]
    mask = (offs_m < M)[:, None] & (offs_c < C)[None, :]
    acc += tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if SPLIT_LO:
        acc += tl.load(lo_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    hi = acc.to(c_ptr.dtype.element_ty)
    tl.store(c_ptr + offs, hi, mask=mask)
    if SPLIT_LO:
        tl.store(lo_ptr + offs, (acc - hi.to(tl.float32)).to(lo_ptr.dtype.element_ty), mask=mask)


def grid2(rows, cols, row_block, col_block):
    """Launch grid of a kernel with one program per (row tile, column tile), tiles set by the autotuner."""
    return lambda meta: (triton.cdiv(rows, meta[row_block]) * triton.cdiv(cols, meta[col_block]),)

def mm_acc(a, b, c, lo, split_lo):
    """c [M, C] += a [M, K] @ b [K, C] (a and b with a contiguous last dim, c contiguous), with lo the
    running rounding error of c when split_lo (bf16/fp16 c), else c itself (unused)."""
    M, K = a.shape
    C = b.shape[1]
    _mm_acc_kernel[grid2(M, C, "BLOCK_M", "BLOCK_C")](a, b, c, lo, M, C, K, a.stride(0), b.stride(0),
                                                      SPLIT_LO=split_lo, INTERPRETED=INTERPRETING)
