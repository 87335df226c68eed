"""Host-side choices shared by the launchers: how rows are addressed, block sizes, programs per row."""
import functools

import torch
import triton

# Largest block of columns one program loads per step: 8 KiB of bf16 or 16 KiB of fp32 keeps enough
# bytes in flight per SM without spilling the fp32 working set.
_MAX_BLOCK_BYTES = 8192
_MAX_BLOCK_FP32 = 4096


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
    """The forward's outputs (logp, entropy, lse, sum_p2, sum_p2_logp, lse_lo), of targets' shape;
    sum_p2 and sum_p2_logp are empty when `stats` is off. Each is a separate allocation (custom ops may
    not return aliases)."""
    return [torch.empty(targets.shape if stats or i not in (3, 4) else (0,), dtype=acc, device=targets.device)
            for i in range(6)]


def pick_block(V, element_size):
    """(BLOCK_V, num_warps) for rows of V elements of the given size."""
    cap = min(_MAX_BLOCK_BYTES // element_size, _MAX_BLOCK_FP32)
    block = min(triton.next_power_of_2(max(V, 1)), cap)
    return block, 8 if block >= 2048 else 4


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_splits(N, V, block_v, device, splits=None):
    """(programs per row, columns per program). Rows are split only when there are too few of them to
    give every SM a few programs; each program then covers a whole number of blocks."""
    n_blocks = triton.cdiv(max(V, 1), block_v)
    if splits is None:
        splits = 1
        if device.type == "cuda" and N > 0:
            splits = max(1, (4 * _sm_count(device.index if device.index is not None else 0)) // N)
    splits = max(1, min(splits, n_blocks))
    chunk = triton.cdiv(n_blocks, splits) * block_v
    return triton.cdiv(max(V, 1), chunk), chunk
