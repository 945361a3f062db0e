"""The input projection x W_ih^T + bias of a recurrent kernel, a chunk of steps at a time.

A kernel that walks a part of the batch (rows first..last-1 of shared (T, B, ...) arrays)
projects the input of a chunk of steps into a buffer that stays in cache until those steps add
their recurrent products, instead of one (T, B, G) product up front whose rows are cold by the
time the loop reads them. Step s of sequence b reads time position time_position(s, lengths[b],
reverse): lengths[b] - 1 - s when reversed and valid, else s (padding stays in place).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from rnnkit.kernels.cpu import blas

# About this many elements (256 KiB of float32) per chunk's projections: one product per chunk
# rather than one (T, B, 4H) product up front made the LSTM's inference about 20% faster, and a
# buffer of this size rather than a fixed 512 rows made the products 10-25% faster at 4H = 1024
# and 2048 (measured single-threaded at B=32, H=256 and 512).
CHUNK_ELEMENTS = 1 << 16


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def time_position(step, length, reverse):
    """The time position that processing step `step` of a sequence of `length` steps reads."""
    if reverse and step < length:
        return length - 1 - step
    return step


@njit(cache=True, nogil=True, error_model="numpy")
def input_chunk_steps(steps, batch, width):
    """Steps per chunk of an input projection of `width` columns over `batch` rows a step."""
    return max(1, min(steps, max(32, CHUNK_ELEMENTS // width) // max(batch, 1)))


@njit(cache=True, nogil=True, error_model="numpy")
def input_plan(x, w_ih, steps, batch, use_packing, work):
    """Steps per chunk, W_ih (G, I) prepared for chunk * batch rows, and the chunk's input rows
    and projections, for step_projection over `batch` rows of (T, B, I) x."""
    return input_plan_into(x, w_ih, steps, batch, use_packing, work, np.empty(0, w_ih.dtype))


@njit(cache=True, nogil=True, error_model="numpy")
def input_plan_into(x, w_ih, steps, batch, use_packing, work, space):
    """input_plan, W_ih packed into `space` where it fits (blas.prepare_weight_into)."""
    chunk = input_chunk_steps(steps, batch, w_ih.shape[0])
    ih, ih_transposed, packed = blas.prepare_weight_into(
        chunk * batch, w_ih, True, use_packing, work, space
    )
    inputs = np.zeros((chunk * batch, x.shape[2]), x.dtype)
    projected = np.empty((chunk * batch, w_ih.shape[0]), x.dtype)
    return chunk, (ih, ih_transposed, packed), inputs, projected


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def step_projection(x, plan, bias, lengths, reverse, step, first, work):
    """The (batch, G) projections x W_ih^T + bias of processing step `step` of sequences
    first.., each read at its time position; the step that starts a chunk projects the chunk."""
    chunk, (ih, ih_transposed, packed), inputs, projected = plan
    batch = projected.shape[0] // chunk
    offset = step % chunk
    if offset == 0:
        count = min(chunk, x.shape[0] - step)
        for later in range(count):
            for b in range(batch):
                sequence = first + b
                position = time_position(step + later, lengths[sequence], reverse)
                blas.copy_vector(x[position, sequence], inputs[later * batch + b])
        rows = projected[: count * batch]
        blas.gemm_weight(inputs[: count * batch], ih, ih_transposed, packed, rows, False, work)
        for row in range(count * batch):
            values = rows[row]
            for k in range(values.size):
                values[k] += bias[k]
    return projected[offset * batch : (offset + 1) * batch]
