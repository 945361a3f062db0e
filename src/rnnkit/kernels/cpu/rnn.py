"""Fused CPU kernel for the vanilla RNN, h' = act(W_ih x + b_ih + W_hh h + b_hh), act tanh or relu.

Forward, one numba call: the input projection of all steps as one BLAS matmul written straight
into the output buffer, then per step one hidden matmul and the activation, in place.
Backward (backpropagation through time, derived by hand), one numba call: the time loop walks
backwards producing the pre-activation gradients dP (T, B, H), then the weight and input
gradients are large matmuls over all T*B rows (dW_ih = dP^T X, dW_hh = dP^T H_prev, dX = dP W_ih).
Only the output (returned anyway) and h0 are kept for the backward: the activation's derivative
comes from h (tanh' = 1 - h^2; relu' = [h > 0], 0 at 0 as in torch) and h_{t-1} is the output of
the step before. Every product goes through `blas` (torch's MKL, on torch's own threads); the
per-step products use a packed weight (rnnkit's AVX-512 panels for float32, else MKL's) from
_PACK_MIN_STEPS steps on (small ones at any number: blas._packed_form), packed into space kept
per thread (pack_space.py). With several torch threads and a large enough per-step product, the
batch runs as parts whose time loops (forward and backward) run concurrently on torch's OpenMP
threads (`threads`), each on its rows of the shared arrays: a part's forward projects its
input a chunk of steps at a time (projection.py), and after the parts' backward loops the
gradients' products run over all rows, so the parts cost no copies and no memory.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, types
from numba.extending import overload
from torch import Tensor
from torch.autograd.function import once_differentiable

from rnnkit.kernels.cpu import blas, pack_space, threads
from rnnkit.kernels.cpu.activations import tanh_float32
from rnnkit.kernels.cpu.projection import (
    input_chunk_steps,
    input_plan_into,
    step_projection,
    time_position,
)

NONLINEARITIES = ("tanh", "relu")
# Packing a weight costs about as much as a few products with it; below this many steps plain
# products are faster.
_PACK_MIN_STEPS = 8

_LOG2_E = 1.4426950408889634
_LN_2 = 0.6931471805599453
# Horner coefficients of (e^r - 1) / r: 1/12!, ..., 1/1!.
_EXPM1_TAYLOR_64 = tuple(1 / math.factorial(n) for n in range(12, 0, -1))


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _tanh_64(x):
    """tanh in float64 arithmetic that LLVM vectorizes (libm's tanh is a scalar call, ~6x slower).

    tanh|x| = m / (m + 2) with m = e^(2|x|) - 1 = 2^k (e^r - 1) + 2^k - 1, r = 2|x| - k ln 2,
    |r| <= ln(2) / 2, e^r - 1 by its Taylor series to r^12 (truncation below 1e-15 relative).
    Measured: within 6 ulp of numpy.tanh.
    """
    doubled = 2.0 * abs(x)
    doubled = 40.0 if doubled > 40.0 else doubled  # tanh is 1 to float64 precision beyond 20
    k = np.int64(doubled * _LOG2_E + 0.5)
    r = doubled - k * _LN_2
    expm1_r = 0.0
    for coefficient in _EXPM1_TAYLOR_64:
        expm1_r = expm1_r * r + coefficient
    expm1_r *= r
    # 2^k from k's bits: selects and multiplies vectorize where ldexp or shifts do not.
    scale = 2.0 if k & 1 else 1.0
    scale *= 4.0 if k & 2 else 1.0
    scale *= 16.0 if k & 4 else 1.0
    scale *= 256.0 if k & 8 else 1.0
    scale *= 65536.0 if k & 16 else 1.0
    scale *= 4294967296.0 if k & 32 else 1.0
    expm1_doubled = expm1_r * scale + (scale - 1.0)
    magnitude = expm1_doubled / (expm1_doubled + 2.0)
    return magnitude if x >= 0 else -magnitude


def _tanh(x):
    """tanh of a float32 or float64 scalar, in that precision (numba-only, see the overload)."""
    raise NotImplementedError("_tanh is only callable from numba-compiled code")


@overload(_tanh, inline="always")
def _tanh_for_type(x):
    if x == types.float32:
        return lambda x: tanh_float32(x)
    return lambda x: _tanh_64(np.float64(x))


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _activate_rows(pre, recurrent, relu):
    """pre <- act(pre + recurrent), both (B, H)."""
    rows, cols = pre.shape
    if relu:
        for b in range(rows):
            for j in range(cols):
                value = pre[b, j] + recurrent[b, j]
                pre[b, j] = value if value > 0 else value * 0
    else:
        for b in range(rows):
            for j in range(cols):
                pre[b, j] = _tanh(pre[b, j] + recurrent[b, j])


@njit(cache=True, nogil=True, error_model="numpy")
def _forward_kernel(
    x, h0, w_ih, w_hh, bias, lengths, reverse, relu, output, final, use_packing, hh_space
):  # fmt: skip
    """(T, B, I) x, (B, H) h0 -> output (T, B, H) and final (B, H), written in place; W_hh packed
    into hh_space where it fits (pack_space.py).

    `lengths` is empty when every sequence has T steps; padding outputs are left at zero.
    """
    steps, batch, _ = x.shape
    hidden = h0.shape[1]
    work = blas.workspace(output)
    flat_output = output.reshape((steps * batch, hidden))
    x_rows = x.reshape((steps * batch, x.shape[2]))
    blas.gemm(x_rows, w_ih, flat_output, False, True, False, work)
    for row in range(steps * batch):
        for j in range(hidden):
            flat_output[row, j] += bias[j]
    weight, transposed, packed = blas.prepare_weight_into(
        batch, w_hh, True, use_packing, work, hh_space
    )
    recurrent = np.empty((batch, hidden), dtype=output.dtype)
    if lengths.size == 0:
        previous = h0
        for step in range(steps):
            t = steps - 1 - step if reverse else step
            blas.gemm_weight(previous, weight, transposed, packed, recurrent, False, work)
            _activate_rows(output[t], recurrent, relu)
            previous = output[t]
        blas.copy_matrix(previous, final)
        return
    state = h0.copy()
    for step in range(steps):
        blas.gemm_weight(state, weight, transposed, packed, recurrent, False, work)
        for b in range(batch):
            length = lengths[b]
            if step >= length:
                continue
            t = length - 1 - step if reverse else step
            for j in range(hidden):
                value = output[t, b, j] + recurrent[b, j]
                if relu:
                    value = value if value > 0 else value * 0
                else:
                    value = _tanh(value)
                output[t, b, j] = value
                state[b, j] = value
    for b in range(batch):
        output[lengths[b] :, b, :] = 0
    blas.copy_matrix(state, final)


@njit(cache=True, nogil=True, error_model="numpy")
def _forward_part(
    x, h0, w_ih, w_hh, bias, lengths, reverse, relu, output, final, use_packing, spaces, first,
    last,
):  # fmt: skip
    """Sequences first..last-1 of the batch: their rows of output (T, B, H) and final (B, H),
    the input projected a chunk of steps at a time (projection.py). `lengths` has every
    sequence's length (T for full ones); padding outputs are set to zero. W_ih and W_hh are
    packed into `spaces` where they fit (pack_space.py)."""
    steps = x.shape[0]
    hidden = h0.shape[1]
    batch = last - first
    work = blas.workspace(output)
    ih_space, hh_space = spaces
    plan = input_plan_into(x, w_ih, steps, batch, use_packing, work, ih_space)
    weight, transposed, packed = blas.prepare_weight_into(
        batch, w_hh, True, use_packing, work, hh_space
    )
    recurrent = np.empty((batch, hidden), dtype=output.dtype)
    state = h0[first:last].copy()
    for step in range(steps):
        projected = step_projection(x, plan, bias, lengths, reverse, step, first, work)
        blas.gemm_weight(state, weight, transposed, packed, recurrent, False, work)
        for b in range(batch):
            sequence = first + b
            length = lengths[sequence]
            if step >= length:
                continue
            row = output[time_position(step, length, reverse), sequence]
            pre, recurrent_row = projected[b], recurrent[b]
            if relu:
                for j in range(hidden):
                    value = pre[j] + recurrent_row[j]
                    row[j] = value if value > 0 else value * 0
            else:
                for j in range(hidden):
                    row[j] = _tanh(pre[j] + recurrent_row[j])
            blas.copy_vector(row, state[b])
    for sequence in range(first, last):
        output[lengths[sequence] :, sequence, :] = 0
    blas.copy_matrix(state, final[first:last])


@njit(cache=True, nogil=True, error_model="numpy")
def _pre_activation_grads(
    grad_output, grad_h, output, w_hh, lengths, reverse, relu, grad_pre, use_packing, hh_space,
    first, last,
):  # fmt: skip
    """The BPTT time loop of sequences first..last-1 -> their rows of dP, grad_pre (T, B, H);
    their rows of grad_h (B, H) enter as dL/dh_final and leave as dL/dh0. grad_pre may be
    grad_output itself (each element is read just before it is written); padding rows get 0.
    W_hh is packed into hh_space where it fits (pack_space.py)."""
    steps, _, hidden = output.shape
    batch = last - first
    full = lengths.size == 0
    step_pre = np.zeros((batch, hidden), dtype=output.dtype)
    through = np.empty((batch, hidden), dtype=output.dtype)
    work = blas.workspace(output)
    weight, transposed, packed = blas.prepare_weight_into(
        batch, w_hh, False, use_packing, work, hh_space
    )
    for step in range(steps - 1, -1, -1):
        for b in range(batch):
            sequence = first + b
            length = steps if full else lengths[sequence]
            if step >= length:
                for j in range(hidden):
                    step_pre[b, j] = 0
                continue
            t = length - 1 - step if reverse else step
            for j in range(hidden):
                total = grad_h[sequence, j] + grad_output[t, sequence, j]
                h = output[t, sequence, j]
                if relu:
                    value = total if h > 0 else total * 0
                else:
                    value = total * (1 - h * h)
                step_pre[b, j] = value
                grad_pre[t, sequence, j] = value
        blas.gemm_weight(step_pre, weight, transposed, packed, through, False, work)
        for b in range(batch):
            if full or step < lengths[first + b]:
                for j in range(hidden):
                    grad_h[first + b, j] = through[b, j]
    if not full:
        for sequence in range(first, last):
            grad_pre[lengths[sequence] :, sequence, :] = 0


@njit(cache=True, nogil=True, error_model="numpy")
def _weight_gradients(
    grad_pre, output, x, h0, w_ih, lengths, reverse, grad_x, grad_w_ih, grad_w_hh, grad_bias,
    need_x, need_w_ih, need_w_hh, need_bias,
):  # fmt: skip
    """The input, weight and bias gradients from dP (T, B, H), large products over all T * B
    rows, written in place."""
    steps, batch, hidden = output.shape
    rows = steps * batch
    flat_pre = grad_pre.reshape((rows, hidden))
    work = blas.workspace(output)
    if need_x:
        blas.gemm(flat_pre, w_ih, grad_x.reshape((rows, x.shape[2])), False, False, False, work)
    if need_w_ih:
        x_rows = x.reshape((rows, x.shape[2]))
        blas.gemm(flat_pre, x_rows, grad_w_ih, True, False, False, work)
    if need_bias:
        grad_bias[:] = 0
        for row in range(rows):
            for j in range(hidden):
                grad_bias[j] += flat_pre[row, j]
    if not need_w_hh:
        return
    # Padding has dP = 0 and zero output, so the time-shifted output is h_{t-1} everywhere
    # except at each sequence's first processed step, whose previous state is h0.
    flat_output = output.reshape((rows, hidden))
    if steps > 1:
        if reverse:
            blas.gemm(flat_pre[:-batch], flat_output[batch:], grad_w_hh, True, False, False, work)
        else:
            blas.gemm(flat_pre[batch:], flat_output[:-batch], grad_w_hh, True, False, False, work)
    else:
        grad_w_hh[:] = 0
    first_pre = np.empty((batch, hidden), dtype=output.dtype)
    for b in range(batch):
        if not reverse:
            first = 0
        elif lengths.size == 0:
            first = steps - 1
        else:
            first = lengths[b] - 1
        blas.copy_vector(grad_pre[first, b], first_pre[b])
    blas.gemm(first_pre, h0, grad_w_hh, True, False, True, work)


@njit(cache=True, nogil=True, error_model="numpy")
def _backward_kernel(
    grad_output, grad_h, output, x, h0, w_ih, w_hh, lengths, reverse, relu, in_place, grad_x,
    grad_w_ih, grad_w_hh, grad_bias, need_x, need_w_ih, need_w_hh, need_bias, use_packing,
    hh_space,
):  # fmt: skip
    """All gradients of one direction, the whole batch in one call, written in place; grad_h:
    dL/dh_final in, dL/dh0 out; in_place: dP is written over grad_output (a copy of ours)."""
    if in_place:
        grad_pre = grad_output
    elif lengths.size == 0:
        grad_pre = np.empty_like(output)
    else:
        grad_pre = np.zeros_like(output)
    _pre_activation_grads(
        grad_output, grad_h, output, w_hh, lengths, reverse, relu, grad_pre, use_packing,
        hh_space, 0, output.shape[1],
    )  # fmt: skip
    _weight_gradients(
        grad_pre, output, x, h0, w_ih, lengths, reverse, grad_x, grad_w_ih, grad_w_hh, grad_bias,
        need_x, need_w_ih, need_w_hh, need_bias,
    )  # fmt: skip


def _array(tensor: Tensor) -> np.ndarray:
    """A contiguous numpy view (or copy) of a tensor, detached from autograd."""
    return tensor.detach().contiguous().numpy()


# Sequences of a batch are independent: with several torch threads the batch runs as parts
# whose time loops run concurrently (threads.run_concurrently), each on its rows of the shared
# (T, B, H) arrays with single-threaded products; the input projection before the forward loops
# and the weight gradients after the backward ones are products over all T * B rows. A part's
# per-step product must be large enough to pay for the lower efficiency of fewer rows (see
# threads.batch_parts).
_MIN_PART = 4
_MIN_PART_STEP_WORK = 1 << 17


def _batch_parts(batch: int, step_work: int, steps: int, dtype: torch.dtype) -> list[slice]:
    """Parts of the batch whose time loops run concurrently."""
    # A batch of fewer than two parts' rows (the usual batch 1) is decided before the calls
    # below; OpenBLAS's own thread pool would compete with the parts.
    if batch < 2 * _MIN_PART or blas.LIBRARY.startswith("OpenBLAS"):
        return [slice(0, batch)]
    threaded = blas.threaded_packed_product(batch, step_work // max(batch, 1), dtype)
    return threads.batch_parts(
        batch, step_work, _MIN_PART, _MIN_PART_STEP_WORK, steps, threaded_product=threaded
    )


def _forward(
    x: Tensor,
    h0: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    lengths: Tensor | None,
    reverse: bool,
    relu: bool,
) -> tuple[Tensor, Tensor, tuple[np.ndarray, ...] | None]:
    """(T, B, I) detached input, (B, H) h0 (None: zeros) -> (T, B, H) output, (B, H) final
    state, and the numpy arrays of x, h0, W_ih, W_hh and the output the kernels read (None for
    an empty batch), which the backward reuses."""
    steps, batch, _ = x.shape
    hidden = w_hh.shape[1]
    bias = _input_bias(b_ih, b_hh, hidden, x)
    output = torch.empty(steps, batch, hidden, dtype=x.dtype)
    final = torch.empty(batch, hidden, dtype=x.dtype)
    if batch == 0:
        return output, final, None
    use_packing = blas.PACKED_GEMM and steps >= _PACK_MIN_STEPS
    x_array, w_ih_array, w_hh_array = _array(x), _array(w_ih), _array(w_hh)
    h0_array = np.zeros((batch, hidden), x_array.dtype) if h0 is None else _array(h0)
    lengths_array = _lengths_array(lengths)
    output_array, final_array = output.numpy(), final.numpy()
    arguments = [x_array, h0_array, w_ih_array, w_hh_array, bias, lengths_array, reverse, relu]
    arguments += [output_array, final_array, use_packing]
    arrays = (x_array, h0_array, w_ih_array, w_hh_array, output_array)
    parts = _batch_parts(batch, batch * hidden * hidden, steps, x.dtype)
    if len(parts) == 1:
        space = pack_space.spaces(((w_hh_array, batch),), 0, use_packing, x.dtype)[0]
        _forward_kernel(*arguments, space)
        return output, final, arrays
    if lengths is None:  # the parts' kernel reads every sequence's length
        arguments[5] = np.full(batch, steps, dtype=np.int64)
    argument_lists = []
    # The input's chunk rows size W_ih's space: asked of numba only where it is kept.
    keeps_ih = use_packing and pack_space.keeps(w_ih_array)
    for index, part in enumerate(parts):
        size = part.stop - part.start
        chunk = input_chunk_steps(steps, size, hidden) if keeps_ih else 0
        weights = ((w_ih_array, chunk * size), (w_hh_array, size))
        spaces = pack_space.spaces(weights, 2 * index, use_packing, x.dtype)
        argument_lists.append((*arguments, spaces, part.start, part.stop))
    threads.run_concurrently(_forward_part, argument_lists)
    return output, final, arrays


def _empty_like(tensor: Tensor) -> Tensor:
    """An uninitialised C-contiguous tensor of tensor's shape and dtype."""
    return torch.empty_like(tensor, memory_format=torch.contiguous_format)


def _numpy_dtype(x: Tensor) -> type:
    """The numpy dtype of a float32 or float64 tensor."""
    return np.float32 if x.dtype == torch.float32 else np.float64


def _input_bias(b_ih: Tensor | None, b_hh: Tensor | None, hidden: int, x: Tensor) -> np.ndarray:
    """(H,) b_ih + b_hh, the one bias the kernels add (zeros without biases), in x's dtype."""
    if b_ih is not None and b_hh is not None:
        return (b_ih.detach() + b_hh.detach()).numpy()
    bias = np.zeros(hidden, dtype=_numpy_dtype(x))
    for part in (b_ih, b_hh):
        if part is not None:
            bias += part.detach().numpy()
    return bias


# The kernels' lengths when every sequence is full (read only, so one array serves every call).
_FULL_LENGTHS = np.empty(0, dtype=np.int64)


def _lengths_array(lengths: Tensor | None) -> np.ndarray:
    """The kernels' encoding of lengths: empty when every sequence is full."""
    if lengths is None:
        return _FULL_LENGTHS
    return lengths.contiguous().numpy()


class FusedRNNFunction(torch.autograd.Function):
    """Autograd node for one direction of a vanilla RNN layer: numba forward, hand-derived BPTT."""

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, relu):
        x = x.detach().contiguous()  # the kernels' layout, kept for dW_ih
        output, final, arrays = _forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, relu)
        ctx.reverse = reverse
        ctx.relu = relu
        # Saved as tensors for autograd's checks of in-place changes; the backward reads them
        # through the forward's numpy arrays (views, or the copies the kernels read).
        ctx.save_for_backward(x, h0, w_ih, w_hh, lengths, output)
        ctx.arrays = arrays
        return output, final

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, grad_final):
        x, h0, w_ih, w_hh, lengths, output = ctx.saved_tensors
        needs = ctx.needs_input_grad
        steps, batch, hidden = output.shape
        grad_h = grad_final.detach().clone(memory_format=torch.contiguous_format)
        # empty_like, not torch.empty(tensor.shape, ...): a shape argument costs 2 us a call.
        grad_x = _empty_like(x) if needs[0] else torch.empty(0, 0, 0, dtype=x.dtype)
        if batch == 0:
            grad_w_ih = torch.zeros(w_ih.shape, dtype=w_ih.dtype)
            grad_w_hh = torch.zeros(w_hh.shape, dtype=w_hh.dtype)
            grad_bias = torch.zeros(hidden, dtype=output.dtype)
        else:
            grad_w_ih, grad_w_hh, grad_bias = _backward_parts(
                ctx, grad_output, grad_h, grad_x, w_ih, w_hh, lengths, output
            )
        return (
            grad_x if needs[0] else None,
            grad_h if needs[1] else None,
            grad_w_ih if needs[2] else None,
            grad_w_hh if needs[3] else None,
            grad_bias if needs[4] else None,
            # d/db_hh = d/db_ih; a separate tensor, so the two .grad never alias each other.
            (grad_bias.clone() if needs[4] else grad_bias) if needs[5] else None,
            None,
            None,
            None,
        )


def _backward_parts(ctx, grad_output, grad_h, grad_x, w_ih, w_hh, lengths, output):
    """Runs the backward time loop (on each batch part, concurrently, when several) and the
    gradients' products; grad_h (dL/dh_final in, dL/dh0 out) and grad_x are filled in; returns
    the weight gradients (dW_ih, dW_hh, d bias)."""
    needs = ctx.needs_input_grad
    steps, batch, hidden = output.shape
    grad_output = grad_output.detach()
    # A gradient that is not contiguous (the usual case: expanded from a sum) is copied; the copy
    # is ours, so the kernels write dP over it instead of allocating another T*B*H.
    in_place = not grad_output.is_contiguous()
    grad_output_array = grad_output.contiguous().numpy()
    weight_grads = (
        _empty_like(w_ih),
        _empty_like(w_hh),
        torch.empty(hidden, dtype=output.dtype),
    )
    x_array, h0_array, w_ih_array, w_hh_array, output_array = ctx.arrays
    lengths_array = _lengths_array(lengths)
    use_packing = blas.PACKED_GEMM and steps >= _PACK_MIN_STEPS
    outputs = (grad_x.numpy(), *(grad.numpy() for grad in weight_grads))
    need = (needs[0], needs[2], needs[3], needs[4] or needs[5])
    parts = _batch_parts(batch, batch * hidden * hidden, steps, output.dtype)
    # W_hh is read untransposed here; the forward's slots are free again (its call has ended).
    spaces = [
        pack_space.spaces(((w_hh_array, part.stop - part.start),), 2 * index + 1, use_packing,
                          output.dtype, False)[0]
        for index, part in enumerate(parts)
    ]  # fmt: skip
    if len(parts) == 1:
        _backward_kernel(
            grad_output_array, grad_h.numpy(), output_array, x_array, h0_array, w_ih_array,
            w_hh_array, lengths_array, ctx.reverse, ctx.relu, in_place, *outputs, *need,
            use_packing, spaces[0],
        )  # fmt: skip
        return weight_grads
    if in_place:
        grad_pre = grad_output_array
    elif lengths is None:
        grad_pre = np.empty_like(output_array)
    else:
        grad_pre = np.zeros_like(output_array)
    shared = (
        grad_output_array, grad_h.numpy(), output_array, w_hh_array, lengths_array, ctx.reverse,
        ctx.relu, grad_pre, use_packing,
    )  # fmt: skip
    threads.run_concurrently(
        _pre_activation_grads,
        [(*shared, space, part.start, part.stop) for space, part in zip(spaces, parts)],
    )
    _weight_gradients(
        grad_pre, output_array, x_array, h0_array, w_ih_array, lengths_array, ctx.reverse,
        *outputs, *need,
    )  # fmt: skip
    return weight_grads


def run_direction(
    x: Tensor,
    state: tuple[Tensor] | None,
    weights: tuple[Tensor | None, ...],
    lengths: Tensor | None,
    reverse: bool,
    nonlinearity: str = "tanh",
) -> tuple[Tensor, tuple[Tensor]]:
    """(T, B, I) input, ((B, H),) state (None: zeros) -> (T, B, H) output, ((B, H),) final
    state."""
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"nonlinearity must be one of {NONLINEARITIES}, got {nonlinearity!r}")
    h0 = None if state is None else state[0]
    w_ih, w_hh, b_ih, b_hh = weights[:4]
    relu = nonlinearity == "relu"
    if lengths is not None:
        lengths = lengths.to("cpu", torch.int64).contiguous()
    inputs = (x, h0, w_ih, w_hh, b_ih, b_hh)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        output, final = FusedRNNFunction.apply(*inputs, lengths, bool(reverse), relu)
    else:
        output, final, _ = _forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, bool(reverse), relu)
    return output, (final,)


def warmup() -> None:
    """Compile (or load from numba's disk cache) every kernel for float32 and float64."""
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(3, 2, 2, dtype=dtype)
        h0 = torch.randn(2, 3, dtype=dtype, requires_grad=True)
        weights = tuple(
            torch.randn(shape, dtype=dtype, requires_grad=True)
            for shape in ((3, 2), (3, 3), (3,), (3,))
        )
        for lengths in (None, torch.tensor([3, 1])):
            output, (final,) = run_direction(x, (h0,), weights, lengths, False)
            (output.sum() + final.sum()).backward()
        # What only a batch split into parts calls from Python: the parts' forward kernel and
        # the backward's two halves (the whole-batch backward kernel compiles them from numba).
        arrays = [_array(t) for t in (x, h0, *weights[:2])]
        bias, lengths_array = _array(weights[2]), np.array([3, 1])
        output_array, final_array = np.zeros((3, 2, 3), arrays[0].dtype), np.zeros_like(arrays[1])
        no_space = pack_space.empty(dtype)
        _forward_part(
            *arrays, bias, lengths_array, False, False, output_array, final_array, False,
            (no_space, no_space), 1, 2,
        )  # fmt: skip
        grads = [np.zeros_like(a) for a in (arrays[0], arrays[2], arrays[3], bias)]
        grad_h, grad_pre = np.zeros_like(arrays[1]), np.zeros_like(output_array)
        _pre_activation_grads(
            output_array, grad_h, output_array, arrays[3], lengths_array, False, False, grad_pre,
            False, no_space, 1, 2,
        )  # fmt: skip
        _weight_gradients(
            grad_pre, output_array, arrays[0], arrays[1], arrays[2], lengths_array, False,
            *grads, True, True, True, True,
        )  # fmt: skip
