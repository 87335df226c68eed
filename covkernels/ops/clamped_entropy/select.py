"""Radix select of AEnt's kept set, one program per row: tau, the (k+1)-th smallest logit, and `cut`, the
column of the first kept entry equal to tau (docs/aent.md#how-the-kernels-compute-it).

The keys are fp32 bits mapped to order-preserving uint32; each pass histograms one digit of the keys that
match the digits found so far (the others masked out). The digit's width follows what tl.histogram compiles
to (bench/sass.py counts it): from Triton 3.8 on, shared-memory atomics whose cost does not depend on the
bins, so 8-bit digits (fewest passes: a bf16 row takes two reads, fp16 three, fp32 four); before 3.8, a warp
ballot per bit of the bin and a popcount per bin each lane owns, ~80 instructions per logit at 256 bins and
~29 at 16, so 4-bit digits (bf16 four reads, fp16 five, fp32 eight).
"""
import torch
import triton
import triton.language as tl

from ..common.rowmath import load_halves

DIGIT_BITS = 8 if tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 8) else 4
# The key bits that can differ: bf16 values fill the fp32 key's top 16 bits, fp16 values its top 19.
_KEY_BITS = {torch.bfloat16: 16, torch.float16: 19, torch.float32: 32}


def passes(dtype, digit_bits):
    """The radix passes over a row of this dtype with digits of digit_bits (a divisor of 32: the last
    pass's shift must not go below bit 0)."""
    assert 32 % digit_bits == 0, digit_bits
    return -(-_KEY_BITS[dtype] // digit_bits)


@triton.jit
def key(x):
    """uint32 keys of fp32 entries x: a < b iff key(a) < key(b); -0.0 and +0.0 get the same key."""
    bits = (x + 0.0).to(tl.int32, bitcast=True)  # + 0.0: -0.0 becomes +0.0
    # Negative floats order backwards by their bits: flip all of them; positive ones: flip the sign bit.
    return (bits ^ ((bits >> 31) | -(1 << 31))).to(tl.uint32, bitcast=True)


@triton.jit
def float_of_key(key):
    bits = key.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ -(1 << 31), ~bits).to(tl.float32, bitcast=True)


@triton.jit
def _histogram_block(x_row, start, V, prefix, shift, m, MASKED: tl.constexpr, FIRST: tl.constexpr,
                     BLOCK_V: tl.constexpr, PAIRS: tl.constexpr, DIGIT: tl.constexpr):
    """The histogram [2^DIGIT] of the digit at `shift` of the keys of one block that match the digits above
    it found so far (`prefix`), and the running max (first pass only)."""
    even, odd = load_halves(x_row, start, V, BLOCK_V, MASKED, PAIRS)
    x = tl.reshape(tl.join(even, odd), [BLOCK_V])
    keys = key(x)
    bins = ((keys >> shift) & ((1 << DIGIT) - 1)).to(tl.int32)
    if FIRST:
        m = tl.maximum(m, tl.max(x, axis=0))
        if MASKED:
            hist = tl.histogram(bins, 1 << DIGIT, mask=start + tl.arange(0, BLOCK_V) < V)
        else:
            hist = tl.histogram(bins, 1 << DIGIT)
    else:
        keep = (keys ^ prefix) >> (shift + DIGIT) == 0
        if MASKED:
            keep = keep & (start + tl.arange(0, BLOCK_V) < V)
        hist = tl.histogram(bins, 1 << DIGIT, mask=keep)
    return hist, m


@triton.jit
def select_tau(x_row, V, k, BLOCK_V: tl.constexpr, PAIRS: tl.constexpr, PASSES: tl.constexpr,
               DIGIT: tl.constexpr):
    """(tau, n_tie, row max) of one row by radix select: the histogram of each digit of the keys that match
    the digits found so far gives the next digit of tau's key."""
    bins = tl.arange(0, 1 << DIGIT)
    k_rem = tl.full([], 0, tl.int64) + k
    prefix = tl.full([], 0, tl.uint32)  # tau's key digits found so far
    m = tl.full([], float("-inf"), tl.float32)
    for p in tl.static_range(PASSES):
        shift = 32 - DIGIT * (p + 1)
        hist = tl.zeros([1 << DIGIT], dtype=tl.int32)
        start = 0
        while start + BLOCK_V <= V:
            h, m = _histogram_block(x_row, start, V, prefix, shift, m, False, p == 0, BLOCK_V, PAIRS, DIGIT)
            hist += h
            start += BLOCK_V
        if start < V:
            h, m = _histogram_block(x_row, start, V, prefix, shift, m, True, p == 0, BLOCK_V, PAIRS, DIGIT)
            hist += h
        digit = tl.sum((tl.cumsum(hist, axis=0) <= k_rem).to(tl.int32), axis=0)
        k_rem -= tl.sum(tl.where(bins < digit, hist, 0).to(tl.int64), axis=0)
        prefix = prefix | (digit.to(tl.uint32) << shift)
    # Keys' bits below the passes are those of every entry (0 in the float's bits: 16-bit dtypes held in
    # fp32); a negative float's key has them flipped to 1.
    low: tl.constexpr = (1 << (32 - DIGIT * PASSES)) - 1
    prefix = tl.where(prefix >> 31 == 0, prefix | low, prefix)
    return float_of_key(prefix), k_rem, m


@triton.jit
def find_cut(x_row, V, tau, n_tie, BLOCK_V: tl.constexpr):
    """The column of the first entry equal to tau past the first n_tie of them (0 when n_tie = 0)."""
    offs = tl.arange(0, BLOCK_V)
    cut = tl.full([], 0, tl.int32)
    seen = tl.full([], 0, tl.int64)
    start = tl.where(n_tie > 0, 0, V)
    while start < V:
        cols = start + offs
        eq = (tl.load(x_row + cols, mask=cols < V, other=0.0).to(tl.float32) == tau) & (cols < V)
        count = tl.sum(eq.to(tl.int64), axis=0)
        if seen + count > n_tie:
            rank = seen + tl.cumsum(eq.to(tl.int64), axis=0) - 1
            cut = tl.min(tl.where(eq & (rank == n_tie), cols, V), axis=0)
            start = V
        else:
            start += BLOCK_V
        seen += count
    return cut
