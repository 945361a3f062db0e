"""Fused LSTM on the CPU: numba forward and hand-derived backpropagation through time.

Forward: one compiled loop over time that projects the input a chunk of steps at a time (one
BLAS matmul per chunk) and does, per step, the hidden matmul (BLAS, or plain loops for tiny
sizes) and the fused gate math. Training saves the gate activations and the cell states;
inference (no input requires grad, no_grad, inference_mode) saves nothing.

Backward, per step (activations i, f, g, o; cell c, previous cell c_p):
    dh  = grad_out + (recurrent dh)         dhc = dh @ W_hr          (dhc = dh without projection)
    dc  = (recurrent dc) + dhc * o * (1 - tanh(c)^2)
    d(pre_i) = dc * g * i (1 - i)      d(pre_f) = dc * c_p * f (1 - f)
    d(pre_g) = dc * i * (1 - g^2)      d(pre_o) = dhc * tanh(c) * o (1 - o)
    recurrent dh = d(pre) @ W_hh       recurrent dc = dc * f
The saved activations are left intact (a retained graph can run backward again). The gate
gradients of a chunk of steps (about _BACKWARD_CHUNK_ROWS rows, still in cache) then go into
dW_ih += dpre^T x, dW_hh += dpre^T h_prev, d(bias) += column sums and dx = dpre W_ih, inside the
same loop; dW_hr = dh^T (o tanh(c)) is one matmul after it.

Products: `blas` (torch's MKL by default), weights read through gemm's transpose flag, never
copied per call, and packed once per sequence from _PACK_MIN_STEPS steps on (rnnkit's AVX-512
panels for float32, see `panels`; else MKL's packed form) into space kept per thread
(pack_space.py). With several torch threads and a
large enough per-step product, the batch runs as parts whose time loops run concurrently on
torch's OpenMP threads (`threads`), each on its range of the shared input, output and state;
each part's weight gradients are summed at the end.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from numba import njit, types
from numba.extending import overload
from torch import Tensor

from rnnkit.kernels.cpu import blas, pack_space, threads
from rnnkit.kernels.cpu.activations import sigmoid_float32, tanh_float32
from rnnkit.kernels.cpu.projection import input_chunk_steps, time_position

BLAS_LIBRARY = blas.LIBRARY
PACKED_GEMM = blas.PACKED_GEMM
# Packing costs about as much as a few products with the weight; below this many steps (a
# streaming call, say) plain products are faster.
_PACK_MIN_STEPS = 8


# ---------------------------------------------------------------------------------------------
# Activations. float64 uses libm (bit-for-bit the equations); float32 the vectorisable rational
# tanh and its sigmoid (activations.py).


def _tanh(x):
    return math.tanh(x)


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


@overload(_tanh)
def _tanh_impl(x):
    if x == types.float32:
        return lambda x: tanh_float32(x)
    return lambda x: math.tanh(x)


@overload(_sigmoid)
def _sigmoid_impl(x):
    if x == types.float32:
        return lambda x: sigmoid_float32(x)
    return lambda x: 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------------------------------------
# The compiled loops. Step s of sequence b reads and writes time position
# time_position(s, lengths[b], reverse) (projection.py).


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _gate_activations(row, hidden):
    """(4H,) pre-activations -> (i, f, g, o) activations, in place."""
    # Loops over slices from 0 vectorise; loops over range(2H, 3H) measured 3x slower.
    sigmoid_gates = row[: 2 * hidden]
    for j in range(2 * hidden):
        sigmoid_gates[j] = _sigmoid(sigmoid_gates[j])
    gate_g = row[2 * hidden : 3 * hidden]
    for j in range(hidden):
        gate_g[j] = _tanh(gate_g[j])
    gate_o = row[3 * hidden :]
    for j in range(hidden):
        gate_o[j] = _sigmoid(gate_o[j])


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _cell_update(row, cell, cell_output, hidden):
    """c = f c + i g in place; cell_output = o tanh(c). Each loop writes one array so that
    LLVM's alias checks stay few enough to vectorise it."""
    gate_i = row[:hidden]
    gate_f = row[hidden : 2 * hidden]
    gate_g = row[2 * hidden : 3 * hidden]
    gate_o = row[3 * hidden :]
    for j in range(hidden):
        cell[j] = gate_f[j] * cell[j] + gate_i[j] * gate_g[j]
    for j in range(hidden):
        cell_output[j] = gate_o[j] * _tanh(cell[j])


@njit(cache=True, nogil=True, error_model="numpy")
def lstm_forward_loop(
    x,
    w_ih,
    bias,
    w_hh,
    w_hr,
    h,
    c,
    lengths,
    reverse,
    output,
    activations,
    cells,
    save,
    use_packing,
    spaces,
    first,
    last,
):
    """Sequences first..last-1 of (T, B, I) x, with (4H, I) W_ih, (4H,) b_ih + b_hh, (4H, P)
    W_hh, (P, H) W_hr or (0, 0): their rows of (B, P) h and (B, H) c updated in place to the
    final state, of the (T, B, P) output written and, if save, the (T, last - first, 4H) gate
    activations and (T, last - first, H) cell states written, at each time position. The
    weights are packed into `spaces` (for W_ih, W_hh, W_hr; see pack_space.py) where they fit."""
    steps, _, features = x.shape
    batch = last - first
    gate_width = w_hh.shape[0]
    hidden = gate_width // 4
    projected = w_hr.shape[0] > 0
    chunk = input_chunk_steps(steps, batch, gate_width)
    work = blas.workspace(x)
    ih_space, hh_space, hr_space = spaces
    ih, ih_transposed, packed_ih = blas.prepare_weight_into(
        chunk * batch, w_ih, True, use_packing, work, ih_space
    )
    hh, hh_transposed, packed_hh = blas.prepare_weight_into(
        batch, w_hh, True, use_packing, work, hh_space
    )
    hr, hr_transposed, packed_hr = blas.prepare_weight_into(
        batch, w_hr, True, use_packing, work, hr_space
    )
    h_part = h[first:last]
    inputs = np.zeros((chunk * batch, features), x.dtype)
    # Processing order is time order when not reversed: the saved activations then serve as the
    # gate buffer (rows of padding hold values the backward never reads).
    in_place = save and not reverse
    saved_rows = activations.reshape((activations.size // gate_width, gate_width))
    buffer = np.empty((0 if in_place else chunk * batch, gate_width), x.dtype)
    cell_output = np.empty((batch, hidden), x.dtype)
    projection = np.empty((batch, h.shape[1]), x.dtype)
    for start in range(0, steps, chunk):
        count = min(chunk, steps - start)
        for offset in range(count):
            for b in range(batch):
                sequence = first + b
                source = x[time_position(start + offset, lengths[sequence], reverse), sequence]
                blas.copy_vector(source, inputs[offset * batch + b])
        if in_place:
            gates = saved_rows[start * batch : (start + count) * batch]
        else:
            gates = buffer[: count * batch]
        blas.gemm_weight(inputs[: count * batch], ih, ih_transposed, packed_ih, gates, False, work)
        for row in range(count * batch):
            gate_row = gates[row]
            for j in range(gate_width):
                gate_row[j] += bias[j]
        for offset in range(count):
            step = start + offset
            # The recurrent product is added to the step's rows of the input projection.
            step_gates = gates[offset * batch : (offset + 1) * batch]
            blas.gemm_weight(h_part, hh, hh_transposed, packed_hh, step_gates, True, work)
            for b in range(batch):
                sequence = first + b
                length = lengths[sequence]
                if step >= length:
                    output[step, sequence, :] = 0
                    continue
                time = time_position(step, length, reverse)
                row = gates[offset * batch + b]
                _gate_activations(row, hidden)
                _cell_update(row, c[sequence], cell_output[b], hidden)
                if save:
                    if not in_place:
                        blas.copy_vector(row, activations[time, b])
                    blas.copy_vector(c[sequence], cells[time, b])
                if not projected:
                    blas.copy_vector(cell_output[b], h[sequence])
                    blas.copy_vector(cell_output[b], output[time, sequence])
            if projected:
                blas.gemm_weight(cell_output, hr, hr_transposed, packed_hr, projection, False, work)
                for b in range(batch):
                    sequence = first + b
                    if step < lengths[sequence]:
                        blas.copy_vector(projection[b], h[sequence])
                        time = time_position(step, lengths[sequence], reverse)
                        blas.copy_vector(projection[b], output[time, sequence])


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _gate_gradients(row, out, cell_now, cell_before, grad_cell_output, grad_c, scratch, hidden):
    """(4H,) activations (i, f, g, o) -> (4H,) gradients of the pre-activations in out; grad_c
    goes from the gradient of c_t (carried) to that of c_{t-1}; scratch is (2, H)."""
    one = blas.one_like(row)
    gate_i = row[:hidden]
    gate_f = row[hidden : 2 * hidden]
    gate_g = row[2 * hidden : 3 * hidden]
    gate_o = row[3 * hidden :]
    tanh_cell = scratch[0]
    d_cell = scratch[1]
    for j in range(hidden):
        tanh_cell[j] = _tanh(cell_now[j])
    for j in range(hidden):
        t = tanh_cell[j]
        d_cell[j] = grad_c[j] + grad_cell_output[j] * gate_o[j] * (one - t * t)
    for j in range(hidden):
        grad_c[j] = d_cell[j] * gate_f[j]
    d_o = out[3 * hidden :]
    for j in range(hidden):
        d_o[j] = grad_cell_output[j] * tanh_cell[j] * gate_o[j] * (one - gate_o[j])
    d_f = out[hidden : 2 * hidden]
    for j in range(hidden):
        d_f[j] = d_cell[j] * cell_before[j] * gate_f[j] * (one - gate_f[j])
    d_i = out[:hidden]
    for j in range(hidden):
        d_i[j] = d_cell[j] * gate_g[j] * gate_i[j] * (one - gate_i[j])
    d_g = out[2 * hidden : 3 * hidden]
    for j in range(hidden):
        d_g[j] = d_cell[j] * gate_i[j] * (one - gate_g[j] * gate_g[j])


# The backward collects the gate gradients of about this many rows (a chunk of steps) before
# the products that turn them into weight and input gradients: enough rows for efficient
# products, few enough that the chunk's rows are still in cache.
_BACKWARD_CHUNK_ROWS = 256


@njit(cache=True, nogil=True, error_model="numpy")
def backward_chunk_steps(steps, batch):
    """Steps per chunk of the backward of a part of `batch` sequences."""
    return max(1, min(steps, (_BACKWARD_CHUNK_ROWS + batch - 1) // batch))


@njit(cache=True, nogil=True, error_model="numpy")
def lstm_backward_loop(
    activations,
    cells,
    c0,
    w_hh,
    w_hr,
    grad_output,
    grad_h,
    grad_c,
    lengths,
    reverse,
    grad_hidden,
    cell_outputs,
    use_packing,
    spaces,
    x,
    w_ih,
    output,
    h0,
    first,
    grad_x,
    grad_w_ih,
    grad_w_hh,
    grad_bias,
):
    """Backward of one part of the batch (B' sequences, first..first+B'-1 of the layer's batch).

    (T, B', 4H) activations and (T, B', H) cells from the forward; (B', P) grad_h and (B', H)
    grad_c go from the final state's gradients to the initial state's. x (T, B', I) is the
    part's input, output (T, B, P) the forward output of the whole batch, h0 (B', P). Writes the
    (T, B', I) grad_x and adds to (4H, I) grad_w_ih, (4H, P) grad_w_hh and float64 (4H,)
    grad_bias, each skipped when passed empty. With projection also writes the (T, B', P) total
    gradient of h and the (T, B', H) recomputed o * tanh(c) for dW_hr. The weights are packed
    into `spaces` (for W_ih, W_hh, W_hr; see pack_space.py) where they fit."""
    steps, batch, gate_width = activations.shape
    hidden = gate_width // 4
    out_width = grad_h.shape[1]
    features = x.shape[2]
    projected = w_hr.shape[0] > 0
    dtype = activations.dtype
    want_x = grad_x.shape[0] > 0
    want_w_ih = grad_w_ih.shape[0] > 0
    want_w_hh = grad_w_hh.shape[0] > 0
    want_bias = grad_bias.shape[0] > 0
    chunk_steps = backward_chunk_steps(steps, batch)
    chunk_rows = chunk_steps * batch
    work = blas.workspace(activations)
    ih_space, hh_space, hr_space = spaces
    hh, hh_transposed, packed_hh = blas.prepare_weight_into(
        batch, w_hh, False, use_packing, work, hh_space
    )
    hr, hr_transposed, packed_hr = blas.prepare_weight_into(
        batch, w_hr, False, use_packing, work, hr_space
    )
    ih, ih_transposed, packed_ih = blas.prepare_weight_into(
        chunk_rows, w_ih, False, use_packing, work, ih_space
    )
    # Rows of a chunk in processing order: slot k holds step (the chunk's first step) - k.
    chunk_grads = np.empty((chunk_rows, gate_width), dtype)
    chunk_inputs = np.zeros((chunk_rows if want_w_ih else 0, features), dtype)
    chunk_before = np.zeros((chunk_rows if want_w_hh else 0, out_width), dtype)
    chunk_grad_x = np.empty((chunk_rows if want_x else 0, features), dtype)
    total_h = np.zeros((batch, out_width), dtype)
    grad_cell_output = np.zeros((batch, hidden), dtype)
    recurrent = np.empty((batch, out_width), dtype)
    scratch = np.empty((2, hidden), dtype)
    filled = 0
    for step in range(steps - 1, -1, -1):
        step_grads = chunk_grads[filled * batch : (filled + 1) * batch]
        for b in range(batch):
            length = lengths[b]
            if step >= length:
                step_grads[b, :] = 0
                if projected:
                    grad_hidden[step, b, :] = 0
                    cell_outputs[step, b, :] = 0
                total_h[b, :] = 0
                continue
            time = time_position(step, length, reverse)
            total = total_h[b]
            incoming = grad_output[time, b]
            carried = grad_h[b]
            for j in range(out_width):
                total[j] = incoming[j] + carried[j]
            if projected:
                blas.copy_vector(total, grad_hidden[time, b])
        if projected:
            blas.gemm_weight(total_h, hr, hr_transposed, packed_hr, grad_cell_output, False, work)
        else:
            blas.copy_matrix(total_h, grad_cell_output)
        for b in range(batch):
            length = lengths[b]
            if step >= length:
                continue
            time = time_position(step, length, reverse)
            if step == 0:
                cell_before = c0[b]
            else:
                cell_before = cells[time_position(step - 1, length, reverse), b]
            row = activations[time, b]
            if projected:
                gate_o = row[3 * hidden :]
                cell_output = cell_outputs[time, b]
                cell_now = cells[time, b]
                for j in range(hidden):
                    cell_output[j] = gate_o[j] * _tanh(cell_now[j])
            _gate_gradients(
                row,
                step_grads[b],
                cells[time, b],
                cell_before,
                grad_cell_output[b],
                grad_c[b],
                scratch,
                hidden,
            )
            slot = filled * batch + b
            if want_w_ih:
                blas.copy_vector(x[time, b], chunk_inputs[slot])
            if want_w_hh:
                if step == 0:
                    blas.copy_vector(h0[b], chunk_before[slot])
                else:
                    before = output[time_position(step - 1, length, reverse), first + b]
                    blas.copy_vector(before, chunk_before[slot])
        blas.gemm_weight(step_grads, hh, hh_transposed, packed_hh, recurrent, False, work)
        for b in range(batch):
            if step < lengths[b]:
                blas.copy_vector(recurrent[b], grad_h[b])
        filled += 1
        if filled < chunk_steps and step > 0:
            continue
        # Padding rows hold zero gradients (and zero inputs), so they add nothing below.
        rows = filled * batch
        grads = chunk_grads[:rows]
        if want_w_ih:
            blas.gemm(grads, chunk_inputs[:rows], grad_w_ih, True, False, True, work)
        if want_w_hh:
            blas.gemm(grads, chunk_before[:rows], grad_w_hh, True, False, True, work)
        if want_bias:
            for r in range(rows):
                grad_row = grads[r]
                for j in range(gate_width):
                    grad_bias[j] += grad_row[j]
        if want_x:
            blas.gemm_weight(grads, ih, ih_transposed, packed_ih, chunk_grad_x[:rows], False, work)
            for k in range(filled):
                chunk_step = step + filled - 1 - k
                for b in range(batch):
                    time = time_position(chunk_step, lengths[b], reverse)
                    blas.copy_vector(chunk_grad_x[k * batch + b], grad_x[time, b])
        filled = 0


# ---------------------------------------------------------------------------------------------
# torch glue.


def _numpy(tensor: Tensor) -> np.ndarray:
    return tensor.detach().numpy()


@functools.cache
def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype


def _lengths_array(lengths: Tensor | None, steps: int, batch: int) -> np.ndarray:
    if lengths is None:
        return np.full(batch, steps, np.int64)
    return np.ascontiguousarray(lengths.numpy(), dtype=np.int64)


def _empty_matrix(like: Tensor) -> np.ndarray:
    return np.empty((0, 0), _numpy_dtype(like.dtype))


def _input_bias(b_ih: Tensor | None, b_hh: Tensor | None, rows: int, like: Tensor) -> Tensor:
    """(4H,) b_ih + b_hh (zeros without biases), detached."""
    if b_ih is not None and b_hh is not None:
        return b_ih.detach() + b_hh.detach()
    bias = torch.zeros(rows, dtype=like.dtype)
    for part in (b_ih, b_hh):
        if part is not None:
            bias += part.detach()
    return bias


# A part's per-step product must be large enough to pay for the lower efficiency of fewer rows
# (see threads.batch_parts).
_MIN_PART = 4
_MIN_PART_STEP_WORK = 1 << 18
# Fewer steps run as one part (threads.MIN_STEPS): the LSTM's parts paid from 3 steps on
# (B = 32-64, H = 256-512: 1.0-1.4x faster inference than one part, training about even; AMD
# machine, where the panels run every product on one thread; see threads.batch_parts for Intel).
_MIN_PART_STEPS = 3


def _batch_parts(batch: int, step_work: int, steps: int, dtype: torch.dtype) -> list[slice]:
    # A batch of fewer than two parts' rows (the usual batch 1) is decided before the calls
    # below; OpenBLAS's own thread pool would compete with the parts.
    if batch < 2 * _MIN_PART or BLAS_LIBRARY.startswith("OpenBLAS"):
        return [slice(0, batch)]
    threaded = blas.threaded_packed_product(batch, step_work // max(batch, 1), dtype)
    return threads.batch_parts(
        batch, step_work, _MIN_PART, _MIN_PART_STEP_WORK, steps, _MIN_PART_STEPS, threaded
    )


def _state_copy(state: Tensor | None, x: Tensor, batch: int, width: int) -> Tensor:
    """A contiguous copy of a (B, width) initial state for the kernels to update in place;
    zeros for None."""
    if state is None:
        return x.new_zeros(batch, width)
    return state.detach().clone(memory_format=torch.contiguous_format)


def _initial_state_part(
    state: Tensor | None, part: slice, whole: bool, like: Tensor, width: int
) -> np.ndarray:
    """The numpy rows of a batch part of an initial state (zeros for None)."""
    if state is None:
        return np.zeros((part.stop - part.start, width), _numpy_dtype(like.dtype))
    return _numpy((state if whole else state[part]).contiguous())


def _run_parts(function, argument_lists: list[tuple]) -> None:
    threads.run_concurrently(function, argument_lists)


def _forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, save):
    """output, h_n, c_n, the batch parts, and each part's activations and cells (numpy arrays;
    empty without save)."""
    steps, batch, _ = x.shape
    bias = _input_bias(b_ih, b_hh, w_hh.shape[0], x)
    unsaved = np.empty((0, 0, 0), _numpy_dtype(x.dtype))
    hidden = w_hh.shape[0] // 4
    out_width = hidden if w_hr is None else w_hr.shape[0]
    output = x.new_empty(steps, batch, out_width)
    h = _state_copy(h0, x, batch, out_width)
    c = _state_copy(c0, x, batch, hidden)
    shared = (
        _numpy(x.contiguous()),
        _numpy(w_ih.contiguous()),
        _numpy(bias),
        _numpy(w_hh.contiguous()),
        _numpy(w_hr.contiguous()) if w_hr is not None else _empty_matrix(x),
        _numpy(h),
        _numpy(c),
        _lengths_array(lengths, steps, batch),
        reverse,
        _numpy(output),
    )
    parts = _batch_parts(batch, batch * w_hh.shape[0] * w_hh.shape[1], steps, x.dtype)
    use_packing = PACKED_GEMM and steps >= _PACK_MIN_STEPS
    activations, cells, argument_lists = [], [], []
    for index, part in enumerate(parts):
        size = part.stop - part.start
        # numpy arrays: only the backward reads them.
        saved_gates = np.empty((steps, size, w_hh.shape[0]), unsaved.dtype) if save else unsaved
        saved_cells = np.empty((steps, size, hidden), unsaved.dtype) if save else unsaved
        # The chunk's rows size W_ih's space: asked of numba only where that space is kept.
        keeps_ih = use_packing and pack_space.keeps(shared[1])
        chunk = input_chunk_steps(steps, size, w_hh.shape[0]) if keeps_ih else 0
        weights = ((shared[1], chunk * size), (shared[3], size), (shared[4], size))
        argument_lists.append(
            (
                *shared,
                saved_gates,
                saved_cells,
                save,
                use_packing,
                pack_space.spaces(weights, 3 * index, use_packing, x.dtype),
                part.start,
                part.stop,
            )
        )
        activations.append(saved_gates)
        cells.append(saved_cells)
    _run_parts(lstm_forward_loop, argument_lists)
    return output, h, c, parts, activations, cells


class LSTMDirection(torch.autograd.Function):
    """One direction of an LSTM layer: fused forward, hand-derived backward."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse):
        output, h_n, c_n, parts, activations, cells = _forward(
            x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, save=True
        )
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, w_hr, output)
        ctx.parts = parts
        ctx.activations = activations
        ctx.cells = cells
        ctx.lengths = lengths
        ctx.reverse = reverse
        ctx.has_bias = (b_ih is not None, b_hh is not None)
        return output, h_n, c_n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output, grad_h_n, grad_c_n):
        x, h0, c0, w_ih, w_hh, w_hr, output = ctx.saved_tensors
        steps, batch, features = x.shape
        hidden = w_hh.shape[0] // 4
        out_width = w_hh.shape[1]
        projected = w_hr is not None
        needs = ctx.needs_input_grad
        lengths, reverse = ctx.lengths, ctx.reverse
        length_array = _lengths_array(lengths, steps, batch)
        empty = _empty_matrix(x)
        shared_weights = (
            _numpy(w_hh.contiguous()),
            _numpy(w_hr.contiguous()) if projected else empty,
        )
        w_ih_numpy = _numpy(w_ih.contiguous())
        output_numpy = _numpy(output)
        grad_h = grad_h_n.clone(memory_format=torch.contiguous_format)
        grad_c = grad_c_n.clone(memory_format=torch.contiguous_format)
        want_bias = needs[5] or needs[6]
        use_packing = PACKED_GEMM and steps >= _PACK_MIN_STEPS
        keeps_ih = use_packing and pack_space.keeps(w_ih_numpy)
        w_hh_numpy, w_hr_numpy = shared_weights
        argument_lists, per_part = [], []
        for index, (part, activations, cells) in enumerate(
            zip(ctx.parts, ctx.activations, ctx.cells)
        ):
            size = part.stop - part.start
            chunk = backward_chunk_steps(steps, size) if keeps_ih else 0
            weights = ((w_ih_numpy, chunk * size), (w_hh_numpy, size), (w_hr_numpy, size))
            whole = size == batch
            grad_hidden = x.new_empty(steps, size, out_width) if projected else None
            cell_outputs = x.new_empty(steps, size, hidden) if projected else None
            # grad_h[part] of the whole batch is grad_h itself: the kernel writes it in place.
            part_grad_h = grad_h if whole else grad_h[part].contiguous()
            part_grad_c = grad_c if whole else grad_c[part].contiguous()
            part_grad_x = x.new_empty(steps, size, features) if needs[0] else None
            part_grad_w_ih = x.new_zeros(4 * hidden, features) if needs[3] else None
            part_grad_w_hh = x.new_zeros(4 * hidden, out_width) if needs[4] else None
            part_grad_bias = np.zeros(4 * hidden if want_bias else 0, np.float64)
            argument_lists.append(
                (
                    activations,
                    cells,
                    _initial_state_part(c0, part, whole, x, hidden),
                    *shared_weights,
                    _numpy((grad_output if whole else grad_output[:, part]).contiguous()),
                    _numpy(part_grad_h),
                    _numpy(part_grad_c),
                    length_array if whole else np.ascontiguousarray(length_array[part]),
                    reverse,
                    _numpy(grad_hidden) if projected else empty.reshape(0, 0, 0),
                    _numpy(cell_outputs) if projected else empty.reshape(0, 0, 0),
                    use_packing,
                    pack_space.spaces(weights, 3 * index, use_packing, x.dtype, False),
                    _numpy((x if whole else x[:, part]).contiguous()),
                    w_ih_numpy,
                    output_numpy,
                    _initial_state_part(h0, part, whole, x, out_width),
                    part.start,
                    _numpy(part_grad_x) if needs[0] else empty.reshape(0, 0, 0),
                    _numpy(part_grad_w_ih) if needs[3] else empty,
                    _numpy(part_grad_w_hh) if needs[4] else empty,
                    part_grad_bias,
                )
            )
            per_part.append(
                (
                    part, grad_hidden, cell_outputs, part_grad_h, part_grad_c, part_grad_x,
                    part_grad_w_ih, part_grad_w_hh, part_grad_bias,
                )
            )  # fmt: skip
        _run_parts(lstm_backward_loop, argument_lists)
        grad_x = grad_w_ih = grad_w_hh = grad_bias = grad_w_hr = None
        grad_x_parts = []
        for (
            part, grad_hidden, cell_outputs, part_grad_h, part_grad_c, part_grad_x,
            part_grad_w_ih, part_grad_w_hh, part_grad_bias,
        ) in per_part:  # fmt: skip
            if part_grad_h is not grad_h:
                grad_h[part] = part_grad_h
                grad_c[part] = part_grad_c
            grad_x_parts.append(part_grad_x)
            grad_w_ih = _accumulate(grad_w_ih, part_grad_w_ih)
            grad_w_hh = _accumulate(grad_w_hh, part_grad_w_hh)
            if want_bias:
                grad_bias = _accumulate(grad_bias, torch.from_numpy(part_grad_bias))
            if needs[7]:
                term = grad_hidden.view(-1, out_width).t() @ cell_outputs.view(-1, hidden)
                grad_w_hr = _accumulate(grad_w_hr, term)
        if needs[0]:
            grad_x = grad_x_parts[0] if len(grad_x_parts) == 1 else torch.cat(grad_x_parts, 1)
        if grad_bias is not None:
            grad_bias = grad_bias.to(x.dtype)
        has_b_ih, has_b_hh = ctx.has_bias
        grad_b_ih = grad_bias if has_b_ih and needs[5] else None
        grad_b_hh = grad_bias if has_b_hh and needs[6] else None
        if grad_b_ih is not None and grad_b_hh is not None:
            grad_b_hh = grad_bias.clone()  # two parameters must not share one .grad tensor
        return (
            grad_x,
            grad_h if needs[1] else None,
            grad_c if needs[2] else None,
            grad_w_ih,
            grad_w_hh,
            grad_b_ih,
            grad_b_hh,
            grad_w_hr,
            None,
            None,
        )


def _accumulate(total: Tensor | None, term: Tensor | None) -> Tensor | None:
    if term is None or total is None:
        return term if total is None else total
    return total.add_(term)


def _needs_grad(tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def run_direction(
    x: Tensor,
    state: tuple[Tensor, Tensor] | None,
    weights: tuple[Tensor | None, ...],
    lengths: Tensor | None,
    reverse: bool,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """(T, B, I) input, ((B, P), (B, H)) state (None: zeros) -> (T, B, P) output,
    ((B, P), (B, H)) final state."""
    h0, c0 = (None, None) if state is None else state
    w_ih, w_hh, b_ih, b_hh, w_hr = weights
    if x.size(1) == 0:
        from rnnkit.cells import lstm_step
        from rnnkit.scan import scan_direction

        if state is None:
            hidden = w_hh.shape[0] // 4
            state = (
                x.new_zeros(0, hidden if w_hr is None else w_hr.shape[0]),
                x.new_zeros(0, hidden),
            )
        return scan_direction(lstm_step, x, state, weights, lengths, reverse)
    if _needs_grad((x, h0, c0, *weights)):
        output, h_n, c_n = LSTMDirection.apply(
            x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse
        )
        return output, (h_n, c_n)
    output, h_n, c_n, *_ = _forward(
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, save=False
    )
    return output, (h_n, c_n)


def warmup() -> None:
    """Compile (or load from the disk cache) every kernel for float32 and float64, through the
    plain-loop and the BLAS sizes, training and inference."""
    for dtype in (torch.float32, torch.float64):
        for hidden, proj in ((3, 0), (3, 2), (40, 0), (40, 30)):
            out_width = proj or hidden
            x = torch.randn(3, 2, 4, dtype=dtype)
            h0 = torch.zeros(2, out_width, dtype=dtype, requires_grad=True)
            c0 = torch.zeros(2, hidden, dtype=dtype)
            weights = (
                torch.randn(4 * hidden, 4, dtype=dtype, requires_grad=True),
                torch.randn(4 * hidden, out_width, dtype=dtype),
                torch.randn(4 * hidden, dtype=dtype),
                torch.randn(4 * hidden, dtype=dtype),
                torch.randn(proj, hidden, dtype=dtype) if proj else None,
            )
            lengths = torch.tensor([3, 2])
            output, (h_n, c_n) = run_direction(x, (h0, c0), weights, lengths, True)
            (output.sum() + h_n.sum() + c_n.sum()).backward()
            with torch.no_grad():
                run_direction(x, (h0, c0), weights, lengths, True)
