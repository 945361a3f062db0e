"""Pieces every GPU cell kernel shares: Triton tile helpers and the Python-side plumbing.

The recurrent kernels run one program per tile of BLOCK_B batch rows; each program loops over
all time steps itself and owns every hidden unit of its rows, so a step needs no grid-wide
synchronisation, only a barrier inside the program between writing the new state and reading it
again. States that other threads of the program read back live in small global buffers (a few
KiB, L2-resident) and are read with the ".cg" cache modifier so that a stale L1 line can never
be seen. The recurrent weight tiles are re-read from L1/L2 every step (each program reads all of
W_hh once per step; it stays cache-resident across steps), which is the "on chip" part of this
design; it is not register- or shared-memory-resident as in Persistent RNN. Small batches use
one program (one SM) per 16 rows, so large hidden sizes at small batch are bound by one SM's
L2 bandwidth; splitting the hidden units over programs would need a grid-wide barrier per step,
which the interpreter (programs run one after another) cannot test.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_B = 16  # batch rows per program; tl.dot needs at least 16
# Widest hidden tiles: output columns per gate and reduction width per dot. With 8 warps these
# compile for sm_90 without register spills in the forward kernels (ptxas -v: LSTM 114 registers)
# and with a few bytes of spill in the LSTM backward; 64 x 64 tiles at 4 warps spilled.
MAX_BLOCK_N = 32
MAX_BLOCK_K = 64
NUM_WARPS = 8
# The kernels take do_not_specialize=["T", "B"]: Triton would otherwise compile a new variant
# (seconds each) whenever a step count or batch size changes between 1, multiples of 16 and
# other values. H stays specialised: its alignment lets the compiler vectorise the loads.


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def tanh(x):
    # tl has no tanh that runs in the interpreter and on every backend. This form has an
    # absolute error at rounding level (relative error grows for |x| << 1, which the gate
    # math never divides by) and saturates to +-1 for large |x| without overflow.
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def time_index(step, lengths, REVERSE: tl.constexpr):
    """(BLOCK_B,) time position each row works on at processing step `step`."""
    if REVERSE:
        return tl.where(step < lengths, lengths - 1 - step, step)
    else:
        return step + lengths * 0


@triton.jit
def add_rows_times_weight_t(
    acc,
    a_ptr,
    a_row_offsets,
    row_ok,
    K,
    w_ptr,
    w_row_start,
    w_row_stride,
    cols,
    col_ok,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """acc + A[rows, :K] @ W[w_row_start + cols, :K]^T (A written in-kernel, read past L1)."""
    for k_start in range(0, K, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(
            a_ptr + a_row_offsets[:, None] + ks[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
            cache_modifier=".cg",
        )
        w = tl.load(
            w_ptr + (w_row_start + cols[None, :]) * w_row_stride + ks[:, None],
            mask=col_ok[None, :] & k_ok[:, None],
            other=0.0,
        )
        acc = tl.dot(a.to(w.dtype), w, acc, input_precision=PRECISION)
    return acc


@triton.jit
def add_rows_times_weight(
    acc,
    a_ptr,
    a_row_offsets,
    row_ok,
    K,
    w_ptr,
    w_row_start,
    w_row_stride,
    cols,
    col_ok,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """acc + A[rows, :K] @ W[w_row_start : w_row_start + K, cols] (A read past L1)."""
    for k_start in range(0, K, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(
            a_ptr + a_row_offsets[:, None] + ks[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
            cache_modifier=".cg",
        )
        w = tl.load(
            w_ptr + (w_row_start + ks[:, None]) * w_row_stride + cols[None, :],
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(a.to(w.dtype), w, acc, input_precision=PRECISION)
    return acc


def block_size(size: int, limit: int) -> int:
    """Tile width for a hidden dimension: a power of two in [16, limit]."""
    return max(16, min(limit, triton.next_power_of_2(size)))


def launch_options(hidden: int) -> dict:
    """Tile sizes and warps for a recurrent kernel over `hidden` units."""
    return {
        "BLOCK_B": BLOCK_B,
        "BLOCK_N": block_size(hidden, MAX_BLOCK_N),
        "BLOCK_K": block_size(hidden, MAX_BLOCK_K),
        "num_warps": NUM_WARPS,
    }


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float32/bfloat16/float16 accumulate in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_precision(dtype: torch.dtype) -> str:
    """TF32 only where torch itself allows it for float32 matmuls; exact otherwise."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def grid(batch: int) -> tuple[int]:
    """One program per BLOCK_B batch rows."""
    return (triton.cdiv(batch, BLOCK_B),)


def device_lengths(lengths: Tensor | None, steps: int, batch: int, device) -> Tensor:
    """(B,) int32 lengths on the kernel's device; all `steps` when lengths is None."""
    if lengths is None:
        return torch.full((batch,), steps, dtype=torch.int32, device=device)
    return lengths.to(device=device, dtype=torch.int32)


def previous_states(sequence: Tensor, initial: Tensor, lengths: Tensor | None, reverse: bool):
    """(T, B, K) per-step states, (B, K) initial -> (T, B, K): the state each step started from.

    Only positions of valid steps are meaningful (the others get zero weight-gradient rows).
    """
    if not reverse:
        return torch.cat([initial.unsqueeze(0), sequence[:-1]])
    shifted = torch.cat([sequence[1:], initial.unsqueeze(0)])
    if lengths is None:
        return shifted
    steps = sequence.size(0)
    time = torch.arange(steps, device=sequence.device).unsqueeze(1)
    first = time == (lengths.to(sequence.device) - 1).unsqueeze(0)
    return torch.where(first.unsqueeze(-1), initial.unsqueeze(0), shifted)


def flat(tensor: Tensor) -> Tensor:
    """(T, B, K) -> (T * B, K)."""
    return tensor.reshape(-1, tensor.size(-1))


def empty_like_nothing(device, dtype) -> Tensor:
    """A one-element placeholder for buffers a kernel variant does not touch."""
    return torch.empty(1, device=device, dtype=dtype)
