"""Host-side choices shared by the launchers: how rows are addressed, block sizes, programs per row."""
import functools

import numpy as np
import torch
import triton

# Columns one program loads per step: 2 KiB, four 128-bit loads per thread of a single warp. One warp per
# program keeps the per-block max a warp reduction (no shared memory, no barrier) and the working set in
# registers; many such programs per SM keep enough bytes in flight.
_BLOCK_BYTES = 2048
_NUM_WARPS = 1
# Programs per SM the split heuristic aims for (one-warp programs, up to 32 resident per SM).
_PROGRAMS_PER_SM = 16
_LOG2E = 1.4426950408889634


def row_layout(x, inner=None):
    """Describes the rows of x [..., V] (last dim contiguous) as row r -> (r // inner) * stride_outer +
    (r % inner) * stride_inner, without copying when the leading dims allow it.

    Returns (x, N, V, inner, stride_outer, stride_inner); x is a contiguous copy when the last dim is not
    contiguous or the layout has more than two leading dims that cannot be merged, else x itself (the
    caller checks `is` to write a result back). `inner` forces the split of the leading dims (used to give
    an output the layout of its input).
    """
    V = x.shape[-1]
    if x.stride(-1) != 1 and V > 1:
        x = x.contiguous()
    N = x.numel() // V if V else x.shape[:-1].numel()
    if inner is None:
        try:
            rows = x.view(-1, V)
            return x, N, V, 1, rows.stride(0), 0
        except RuntimeError:
            inner = x.shape[-2]
    try:
        rows = x.view(-1, inner, V)
    except RuntimeError:
        x = x.contiguous()
        rows = x.view(-1, inner, V)
    return x, N, V, inner, rows.stride(0), rows.stride(1)


def acc_dtype(dtype):
    """Accumulation and output dtype: fp32 for bf16/fp16/fp32 logits, fp64 for fp64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def new_outputs(targets, acc, stats):
    """The forward's outputs (logp, entropy, lse, sum_p2, sum_p2_logp, lse2): the first five of targets'
    shape (sum_p2 and sum_p2_logp empty when `stats` is off), lse2 [2, ...] (what the backward of the
    implementation that ran needs), all in `acc`. Each is a separate allocation (custom ops may not return
    aliases)."""
    outs = [torch.empty(targets.shape if stats or i not in (3, 4) else (0,), dtype=acc, device=targets.device)
            for i in range(5)]
    return outs + [torch.empty((2, *targets.shape), dtype=acc, device=targets.device)]


def scale_args(inv_temp, dtype=torch.float32):
    """(scale, inv_temp) for 1 / T: scale = log2(e) / T, the base-2 factor of rowmath.py, both rounded to fp32 as
    a kernel's float argument is (so that the PyTorch path's products round as the kernels'), or kept in
    float64 for fp64 logits (the PyTorch path's)."""
    scale = _LOG2E * inv_temp
    if dtype == torch.float64:
        return scale, inv_temp
    return float(np.float32(scale)), float(np.float32(inv_temp))


def read_in_pairs(x, V, stride_outer, stride_inner):
    """True when the rows of x (from row_layout) can be read as 32-bit pairs of bf16 entries (rowmath.load_halves):
    bf16, V and the row strides even, the storage 4-byte aligned."""
    return (x.dtype == torch.bfloat16 and V % 2 == 0 and stride_outer % 2 == 0 and stride_inner % 2 == 0
            and x.data_ptr() % 4 == 0)


def pick_block(V, element_size):
    """(BLOCK_V, num_warps) for rows of V elements of the given size (BLOCK_V >= 2: blocks are split in
    even and odd halves)."""
    block = min(triton.next_power_of_2(max(V, 2)), _BLOCK_BYTES // element_size)
    return block, _NUM_WARPS


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device):
    """Streaming multiprocessors of a CUDA device; 0 elsewhere (nothing to fill: no rows are split)."""
    if device.type != "cuda":
        return 0
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def num_splits(N, V, block_v, device, splits=None):
    """(programs per row, columns per program). Rows are split only when there are too few of them to
    give every SM several programs; each program then covers a whole number of blocks."""
    n_blocks = triton.cdiv(max(V, 1), block_v)
    if splits is None:
        splits = max(1, (_PROGRAMS_PER_SM * sm_count(device)) // N) if N > 0 else 1
    splits = max(1, min(splits, n_blocks))
    chunk = triton.cdiv(n_blocks, splits) * block_v
    return triton.cdiv(max(V, 1), chunk), chunk
