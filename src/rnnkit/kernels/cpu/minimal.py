"""Fused CPU kernels for minGRU and minLSTM (Feng et al. 2024): the gates and the recurrence.

Both cells are the linear recurrence h_t = a_t * h_{t-1} + b_t, with a_t in (0, 1) and b_t > 0
element-wise functions of the step's input projection (see `rnnkit.variants.minimal`). Given the
projections of all steps (one matmul, outside), one numba call evaluates the gates and walks time,
vectorised over batch and hidden units; the backward is derived by hand and walks time backwards:

    dh_t = dL/dout_t + a_{t+1} dh_{t+1}
    da_t = dh_t * h_{t-1},  db_t = dh_t,  dL/dh_0 = a_1 dh_1

then through the gate functions to the projections. The layers' sequential mode is this walk;
their parallel mode cuts it into chunks of time that run on separate threads when the batch is
too small to split over them (see "Threads" below). On a CPU a walk does O(T B H) work against
the log-space scan's several exp/log per element (measured in benchmarks/bench_minimal.py), and
the real-space products avoid the log-space scan's rounding of |sum of log a_t|.

Arithmetic: both dtypes use `_exp_nonpositive`, a polynomial exp that LLVM vectorises (a libm
call stays scalar; float64 stays within 1e-10 of the float64 reference), and every gate is
written as branch-free selects over exponentials of non-positive arguments, so nothing overflows
and small gates keep their relative accuracy.

Lengths: steps t >= lengths[b] output zeros and keep the state, so `final` is the state at each
sequence's last valid step. Directions are the caller's (it reverses each sequence first).

Inference (`project_and_scan` with no gradient to record) takes the input and the weight instead
of the projections: each thread projects a few dozen steps of one sequence at a time into a
buffer that stays in cache and walks them at once, so the (T, B, G*H) projections are never
written to memory (float32: rnnkit's panel product, the weight packed once per call; float64:
BLAS). Its threads take rows of the batch, or parts of the hidden units when the batch is too
small to split: the recurrence is element-wise, so unlike chunks of time they need no joining.
"""

from __future__ import annotations

import math
from decimal import Context, Decimal

import numpy as np
import torch
import torch.nn.functional as F
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload
from torch import Tensor
from torch.autograd.function import once_differentiable

from rnnkit.kernels.cpu import blas, threads

CELLS = ("min_gru", "min_lstm")

# Helpers are compiled once per dtype and inlined by LLVM. numba's own inlining
# (inline="always") re-types the callee at each call site: it made the first compile 4x slower,
# so only _normalised_gates, too large for LLVM's inliner (kept a call, 20x slower), uses it.
_jit = njit(cache=True, nogil=True, error_model="numpy")

# ---------------------------------------------------------------------------------------------
# Element functions, generic over float32 and float64: constants go through _like, since in
# numba float32 op Python float is float64.
#
# exp is a polynomial (Cody-Waite reduction to |r| <= ln(2) / 2, Taylor series of e^r, 2^n put
# into the exponent bits) rather than libm's, which stays a scalar call: LLVM vectorises this.
# Every gate below is written as branch-free selects over exponentials of non-positive
# arguments, so nothing overflows and small gates keep their relative accuracy.

_LN2 = Decimal(2).ln(Context(prec=40))
# ln 2 = high + low, high short enough that n * high is exact for every exponent n used.
_LN2_HIGH_32 = 0.693359375
_LN2_HIGH_64 = round(math.log(2) * 2**32) / 2**32
_LN2_LOW_32 = float(_LN2 - Decimal(_LN2_HIGH_32))
_LN2_LOW_64 = float(_LN2 - Decimal(_LN2_HIGH_64))
# e^r's Taylor coefficients 1/k!, k = degree down to 2: the remainder is under 0.1 ulp for
# |r| <= 0.35 at degree 7 in float32 and 13 in float64.
_TAYLOR_32 = tuple(1 / math.factorial(k) for k in range(7, 1, -1))
_TAYLOR_64 = tuple(1 / math.factorial(k) for k in range(13, 1, -1))


def _like(x, value):
    return value


@overload(_like)
def _like_impl(x, value):
    """value as x's float type."""
    if x == types.float32:
        return lambda x, value: np.float32(value)
    return lambda x, value: np.float64(value)


@intrinsic
def _power_of_two(typingctx, shifted):
    """2^n from shifted = n + 1.5 * 2^p (p = 23 or 52 mantissa bits) as a float of its type.

    shifted's bits are those of 1.5 * 2^p plus n, so an integer subtraction gives the biased
    exponent; no float-to-int conversion (undefined for NaN) is involved.
    """
    if shifted == types.float32:
        width, shift_bits, bias, mantissa_bits = 32, 0x4B400000, 127, 23
    else:
        width, shift_bits, bias, mantissa_bits = 64, 0x4338000000000000, 1023, 52

    def codegen(context, builder, signature, args):
        integer = ir.IntType(width)
        biased = builder.add(
            builder.bitcast(args[0], integer), ir.Constant(integer, bias - shift_bits)
        )
        power = builder.shl(biased, ir.Constant(integer, mantissa_bits))
        return builder.bitcast(power, context.get_value_type(shifted))

    return shifted(shifted), codegen


def _exp_nonpositive(x):
    return math.exp(x)


@overload(_exp_nonpositive)
def _exp_nonpositive_impl(x):
    """exp(x) for x <= 0 (NaN stays NaN), within 2 ulp; 0 below the smallest normal number."""
    if x == types.float32:
        return lambda x: _exp_polynomial(
            x, -87.0, 1.5 * 2**23, _LN2_HIGH_32, _LN2_LOW_32, _TAYLOR_32
        )
    return lambda x: _exp_polynomial(x, -708.0, 1.5 * 2**52, _LN2_HIGH_64, _LN2_LOW_64, _TAYLOR_64)


@_jit
def _exp_polynomial(x, lowest, shift, ln2_high, ln2_low, taylor):
    clamped = _like(x, lowest) if x < lowest else x
    shift = _like(x, shift)
    shifted = clamped * _like(x, 1 / math.log(2)) + shift  # rounds to n + shift
    n = shifted - shift
    r = clamped - n * _like(x, ln2_high) - n * _like(x, ln2_low)
    p = _like(x, 0)
    for coefficient in taylor:
        p = p * r + _like(x, coefficient)
    p = p * r * r + r + _like(x, 1)
    result = p * _power_of_two(shifted)
    return _like(x, 0) if x < lowest else result


@_jit
def _sigmoid_pair(k):
    """(sigmoid(k), sigmoid(-k)) = (z, 1 - z), both to full relative accuracy."""
    one = _like(k, 1)
    e = _exp_nonpositive(-abs(k))
    d = one / (one + e)
    return (d if k >= 0 else e * d), (e * d if k >= 0 else d)


@_jit
def _g_and_slope(v):
    """g(v) = v + 0.5 for v >= 0, sigmoid(v) below (positive, continuous), and g'(v)."""
    one = _like(v, 1)
    e = _exp_nonpositive(-abs(v))  # = exp(v) where it is used
    d = one / (one + e)
    return (v + _like(v, 0.5) if v >= 0 else e * d), (one if v >= 0 else e * d * d)


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _normalised_gates(k_f, k_i):
    """minLSTM's (f', i', 1 - f, 1 - i) from the gate pre-activations.

    f' = f / (f + i) = (1 + e^-k_i) / (2 + e^-k_f + e^-k_i), numerator and denominator scaled by
    e^-m, m = max(-k_f, -k_i, 0): every exponent is <= 0 and one term is 1, so the denominator
    lies in [1, 4], and nothing overflows or divides 0 by 0 where f and i both underflow.
    """
    # Pre-activations are clipped to +-1e30 so that -inf - -inf cannot make a NaN.
    large = _like(k_f, 1e30)
    minus_f = -k_f
    minus_f = large if minus_f > large else minus_f
    minus_f = -large if minus_f < -large else minus_f
    minus_i = -k_i
    minus_i = large if minus_i > large else minus_i
    minus_i = -large if minus_i < -large else minus_i
    m = minus_f if minus_f > minus_i else minus_i
    m = m if m > 0 else _like(k_f, 0)
    scaled_one = _exp_nonpositive(-m)
    scaled_f = _exp_nonpositive(minus_f - m)
    scaled_i = _exp_nonpositive(minus_i - m)
    inverse = _like(k_f, 1) / (scaled_one + scaled_one + scaled_f + scaled_i)
    _, not_f = _sigmoid_pair(k_f)
    _, not_i = _sigmoid_pair(k_i)
    return (scaled_one + scaled_i) * inverse, (scaled_one + scaled_f) * inverse, not_f, not_i


# ---------------------------------------------------------------------------------------------
# Rows: one (t, b) of the walk; loops over the hidden index of 1-D slices from 0 vectorise.


@_jit
def _gru_forward_row(row, state, out, decay, hidden):
    """out = state = a * state + b from the row's projections (z, h); decay *= a."""
    gate_z = row[:hidden]
    gate_h = row[hidden : 2 * hidden]
    for j in range(hidden):
        z, keep = _sigmoid_pair(gate_z[j])
        g, _ = _g_and_slope(gate_h[j])
        value = keep * state[j] + z * g
        out[j] = value
        state[j] = value
        decay[j] *= keep


@_jit
def _lstm_forward_row(row, state, out, decay, hidden):
    """out = state = a * state + b from the row's projections (f, i, h); decay *= a."""
    gate_f = row[:hidden]
    gate_i = row[hidden : 2 * hidden]
    gate_h = row[2 * hidden : 3 * hidden]
    for j in range(hidden):
        keep, write, _, _ = _normalised_gates(gate_f[j], gate_i[j])
        g, _ = _g_and_slope(gate_h[j])
        value = keep * state[j] + write * g
        out[j] = value
        state[j] = value
        decay[j] *= keep


@_jit
def _gru_backward_row(row, previous, incoming, grad_h, grad_row, hidden):
    gate_z = row[:hidden]
    gate_h = row[hidden : 2 * hidden]
    grad_z = grad_row[:hidden]
    grad_candidate = grad_row[hidden : 2 * hidden]
    for j in range(hidden):
        d = incoming[j] + grad_h[j]
        z, keep = _sigmoid_pair(gate_z[j])
        g, slope = _g_and_slope(gate_h[j])
        grad_z[j] = d * (g - previous[j]) * z * keep
        grad_candidate[j] = d * z * slope
        grad_h[j] = d * keep


@_jit
def _lstm_backward_row(row, previous, incoming, grad_h, grad_row, hidden):
    gate_f = row[:hidden]
    gate_i = row[hidden : 2 * hidden]
    gate_h = row[2 * hidden : 3 * hidden]
    grad_f = grad_row[:hidden]
    grad_i = grad_row[hidden : 2 * hidden]
    grad_candidate = grad_row[2 * hidden : 3 * hidden]
    for j in range(hidden):
        d = incoming[j] + grad_h[j]
        keep, write, not_f, not_i = _normalised_gates(gate_f[j], gate_i[j])
        g, slope = _g_and_slope(gate_h[j])
        # d/d(log f - log i) of keep = keep * write, of write = -keep * write;
        # d log f / dk_f = 1 - f.
        d_difference = d * (previous[j] - g) * keep * write
        grad_f[j] = d_difference * not_f
        grad_i[j] = -d_difference * not_i
        grad_candidate[j] = d * write * slope
        grad_h[j] = d * keep


@_jit
def _valid_steps(lengths, b, steps):
    return steps if lengths.size == 0 else min(steps, max(lengths[b], 0))


@_jit
def _forward_kernel(
    gates, state, lengths, lstm, first, stop, batch_start, batch_stop, output, decay, decays
):  # fmt: skip
    """Steps [first, stop) of batch rows [batch_start, batch_stop) of (T, B, G*H) projections.

    state (B, H): its rows enter as the state before step `first` and leave as the state after
    the last valid step; decay (B, H): its rows are multiplied by a_t of each valid step, and
    copied after each to decays (T, B, H) unless that is empty; output (T, B, H): those steps'
    states, zero at padded steps.
    """
    steps = gates.shape[0]
    hidden = state.shape[1]
    for t in range(first, stop):
        for b in range(batch_start, batch_stop):
            out = output[t, b]
            if t >= _valid_steps(lengths, b, steps):
                for j in range(hidden):
                    out[j] = 0
                continue
            if lstm:
                _lstm_forward_row(gates[t, b], state[b], out, decay[b], hidden)
            else:
                _gru_forward_row(gates[t, b], state[b], out, decay[b], hidden)
            if decays.shape[0] > 0:
                decays[t, b] = decay[b]


@_jit
def _projected_forward_kernel(
    inputs, time_stride, batch_stride, weight, transposed, packed, bias, chunk, state, lengths,
    lstm, batch_start, batch_stop, unit_start, unit_stop, output, decay,
):  # fmt: skip
    """The walk of batch rows [batch_start, batch_stop) and hidden units [unit_start, unit_stop)
    (W wide), the projections computed here `chunk` steps of a row at a time.

    inputs (T*B, I): step t of sequence b is row t * time_stride + b * batch_stride; (weight,
    transposed, packed): those units' (G*W, I) rows of the weight, from _prepare_projection;
    bias (G*W,) or empty; state (B, H): as in _forward_kernel; output (T, B, H): the states,
    zero at padded steps, which are not projected; decay (B, H): scratch.
    """
    steps = output.shape[0]
    hidden = unit_stop - unit_start
    gate_width = weight.shape[0] if transposed else weight.shape[1]
    projections = np.empty((chunk, gate_width), output.dtype)
    work = blas.workspace(projections)
    for b in range(batch_start, batch_stop):
        valid = _valid_steps(lengths, b, steps)
        for t in range(valid, steps):
            out = output[t, b, unit_start:unit_stop]
            for j in range(hidden):
                out[j] = 0
        row_state = state[b, unit_start:unit_stop]
        row_decay = decay[b, unit_start:unit_stop]
        for start in range(0, valid, chunk):
            count = min(chunk, valid - start)
            row = start * time_stride + b * batch_stride
            rows = inputs[row : row + (count - 1) * time_stride + 1 : time_stride]
            gates = projections[:count]
            blas.gemm_weight(rows, weight, transposed, packed, gates, False, work)
            if bias.size > 0:
                for offset in range(count):
                    gate_row = gates[offset]
                    for j in range(gate_width):
                        gate_row[j] += bias[j]
            for offset in range(count):
                out = output[start + offset, b, unit_start:unit_stop]
                if lstm:
                    _lstm_forward_row(gates[offset], row_state, out, row_decay, hidden)
                else:
                    _gru_forward_row(gates[offset], row_state, out, row_decay, hidden)


@_jit
def _prepare_projection(rows, weight, use_packing):
    """(G*H, I) W -> (W', transposed, packed) for products (rows, I) @ W^T by blas.gemm_weight:
    float32 W packed into rnnkit's panels where the CPU has AVX-512 (see blas.prepare_weight)."""
    return blas.prepare_weight(rows, weight, True, use_packing, blas.workspace(weight))


@_jit
def _add_carry_kernel(lengths, first, stop, carry, column_start, column_stop, decays, output):
    """output[t, :, j] += carry[:, j] * decays[t, :, j] over the valid steps t in [first, stop),
    for units j in [column_start, column_stop): what the state entering a chunk adds to the
    states of a chunk walked from zero (decays: the products of a_t since the chunk began)."""
    steps, batch, _ = output.shape
    for t in range(first, stop):
        for b in range(batch):
            if t >= _valid_steps(lengths, b, steps):
                continue
            out = output[t, b, column_start:column_stop]
            products = decays[t, b, column_start:column_stop]
            entering = carry[b, column_start:column_stop]
            for j in range(column_stop - column_start):
                out[j] += entering[j] * products[j]


@_jit
def _backward_kernel(
    grad_output,
    grad_h,
    gates,
    h0,
    output,
    lengths,
    lstm,
    first,
    stop,
    batch_start,
    batch_stop,
    grad_gates,
):
    """dL/dgates of steps [first, stop) and rows [batch_start, batch_stop), every element written;
    grad_h rows: dL/dh reaching step stop - 1 from above in (dL/dh_final at the end), dL/dh of
    the state before step `first` out (dL/dh0 when first = 0)."""
    steps, _, gate_width = gates.shape
    hidden = h0.shape[1]
    for t in range(stop - 1, first - 1, -1):
        for b in range(batch_start, batch_stop):
            grad_row = grad_gates[t, b]
            if t >= _valid_steps(lengths, b, steps):
                for j in range(gate_width):
                    grad_row[j] = 0
                continue
            previous = output[t - 1, b] if t > 0 else h0[b]
            if lstm:
                _lstm_backward_row(
                    gates[t, b], previous, grad_output[t, b], grad_h[b], grad_row, hidden
                )
            else:
                _gru_backward_row(
                    gates[t, b], previous, grad_output[t, b], grad_h[b], grad_row, hidden
                )


@_jit
def _carry_back_kernel(grad_output, grad_h, gates, lengths, lstm, first, stop):
    """grad_h (B, H): dL/dh reaching step stop - 1 from above in, dL/dh of the state before step
    `first` out: the backward's recurrence dh <- (dL/dout_t + dh) a_t alone, the same arithmetic
    as _backward_kernel's, without the gate gradients."""
    steps, batch, _ = gates.shape
    hidden = grad_h.shape[1]
    for t in range(stop - 1, first - 1, -1):
        for b in range(batch):
            if t >= _valid_steps(lengths, b, steps):
                continue
            row = gates[t, b]
            incoming = grad_output[t, b]
            dh = grad_h[b]
            if lstm:
                for j in range(hidden):
                    keep, _, _, _ = _normalised_gates(row[j], row[hidden + j])
                    dh[j] = (incoming[j] + dh[j]) * keep
            else:
                for j in range(hidden):
                    _, keep = _sigmoid_pair(row[j])
                    dh[j] = (incoming[j] + dh[j]) * keep


# ---------------------------------------------------------------------------------------------
# Threads. Rows of a batch are independent: with several torch threads the batch runs as parts
# (a range of rows each) whose walks run concurrently. A batch too small to split (batch 1) runs
# the parallel mode as a scan over chunks of time instead, h_t = a_t h_{t-1} + b_t being the
# composition of the affine maps h -> a_t h + b_t, which is associative:
#   forward: every chunk is walked at once, the first from h0 and the others from zero, each
#     keeping the running product of its a_t (at every step, for the chunks after the first);
#     the state entering chunk c + 1 is then (product over chunk c) * (state entering c) +
#     (chunk c's end from zero), a few (B, H) operations in turn; and each later chunk adds
#     (state entering it) * a_first * ... * a_t to its states, its units split over the threads.
#   backward: dh <- (dL/dout_t + dh) a_t alone needs only a_t, so the thread of chunk k first
#     carries dL/dh_final back over the chunks after k that way, then runs the full backward of
#     its chunk; the chunks are sized so that every thread does the same work.
# The backward's arithmetic is the sequential walk's, step for step; the forward's sums differ
# from it in rounding only.
_MIN_ELEMENTS_PER_THREAD = 1 << 15  # T * B * H: below this a thread costs more than it saves
# The forward's chunks pay later: its fix-up is a second pass over the later chunks (measured,
# B = 1, H = 128, float32: minGRU's forward at T = 4096 even, minLSTM's 1.3x faster; at
# T = 1024 chunks made the forward 1.3x slower while the backward's already paid).
_MIN_FORWARD_ELEMENTS_PER_THREAD = 1 << 18
_MIN_CHUNK_STEPS = 16
# A step of _carry_back_kernel against one of _backward_kernel (measured 0.25 for minGRU, 0.29
# for minLSTM, float32, B = 1, H = 128): it sizes the backward's chunks.
_CARRY_BACK_COST = 0.3


def _edges(total: int, weights: list[float]) -> list[int]:
    """Cut [0, total) into len(weights) consecutive ranges sized in proportion to weights."""
    scale = total / sum(weights)
    edges, running = [0], 0.0
    for weight in weights[:-1]:
        running += weight
        edges.append(round(running * scale))
    return [*edges, total]


def backward_chunk_weights(count: int, carry_cost: float = _CARRY_BACK_COST) -> list[float]:
    """Relative sizes of the backward's chunks of time, first to last: thread k carries the
    gradient back over the chunks after k (carry_cost a step) and then walks chunk k in full
    (1 a step), the same work for every thread."""
    sizes = [1.0]
    for _ in range(count - 1):
        sizes.insert(0, 1.0 - carry_cost * sum(sizes))
    return sizes


def chunk_count(steps: int, batch: int, hidden: int, forward: bool = False) -> int:
    """Chunks of time for the parallel mode's scan (backward, or `forward`) when the batch runs
    as one part (1: none)."""
    per_thread = _MIN_FORWARD_ELEMENTS_PER_THREAD if forward else _MIN_ELEMENTS_PER_THREAD
    count = min(
        threads.concurrency(),
        steps // _MIN_CHUNK_STEPS,
        steps * batch * hidden // per_thread,
    )
    # Past a point the backward's carrying work would leave the first chunks no steps.
    while count > 1 and backward_chunk_weights(count)[0] < 0.1:
        count -= 1
    return max(1, count)


def _batch_parts(steps: int, batch: int, hidden: int) -> list[slice]:
    return threads.batch_parts(batch, steps * batch * hidden, 1, _MIN_ELEMENTS_PER_THREAD)


def _lengths_array(lengths: Tensor | None) -> np.ndarray:
    """The kernels' encoding of lengths: an empty array when every sequence is full."""
    if lengths is None:
        return np.empty(0, dtype=np.int64)
    return lengths.to("cpu", torch.int64).contiguous().numpy()


def _forward(gates: Tensor, h0: Tensor, lengths: Tensor | None, lstm: bool, parallel: bool):
    """(T, B, G*H) detached projections, (B, H) h0 -> (T, B, H) output, (B, H) final."""
    steps, batch, _ = gates.shape
    hidden = h0.shape[1]
    output = torch.empty(steps, batch, hidden, dtype=gates.dtype)
    arrays = (gates.numpy(), _lengths_array(lengths), lstm, output.numpy())
    parts = _batch_parts(steps, batch, hidden)
    chunks = chunk_count(steps, batch, hidden, forward=True) if parallel and len(parts) == 1 else 1
    if chunks > 1:
        return output, _forward_chunks(arrays, h0, chunks)
    gates_array, lengths_array, _, output_array = arrays
    state = h0.detach().clone(memory_format=torch.contiguous_format)
    state_array, decay_array = state.numpy(), np.ones(state.shape, dtype=gates_array.dtype)
    no_decays = np.empty((0, 0, 0), dtype=gates_array.dtype)

    def walk(rows: slice) -> None:
        _forward_kernel(
            gates_array, state_array, lengths_array, lstm, 0, steps, rows.start, rows.stop,
            output_array, decay_array, no_decays,
        )  # fmt: skip

    threads.run_concurrently(walk, [(part,) for part in parts])
    return output, state


def _forward_chunks(arrays: tuple, h0: Tensor, count: int) -> Tensor:
    """The parallel mode's forward over `count` chunks of time (see above); fills the output
    and returns the final state."""
    gates, lengths, lstm, output = arrays
    steps, batch, _ = gates.shape
    hidden = h0.shape[1]
    edges = _edges(steps, [1.0] * count)
    starts = h0.new_zeros(count, batch, hidden)
    starts[0] = h0.detach()
    decays = torch.ones_like(starts)
    ends, products = starts.numpy(), decays.numpy()  # the walks turn starts into ends
    # Every chunk after the first keeps a_first * ... * a_t of each of its steps.
    steps_decays = np.empty_like(output)
    no_decays = np.empty((0, 0, 0), dtype=output.dtype)

    def walk(c: int) -> None:
        _forward_kernel(
            gates, ends[c], lengths, lstm, edges[c], edges[c + 1], 0, batch, output, products[c],
            steps_decays if c > 0 else no_decays,
        )  # fmt: skip

    threads.run_concurrently(walk, [(c,) for c in range(count)])
    carries = [starts[0], starts[0]]  # entering chunk 1: chunk 0's end, walked from h0
    for c in range(1, count):
        carries.append(decays[c] * carries[c] + starts[c])
    carry_arrays = [carry.numpy() for carry in carries]

    def add_carries(first: int, stop: int) -> None:  # units [first, stop) of every later chunk
        for c in range(1, count):
            _add_carry_kernel(
                lengths, edges[c], edges[c + 1], carry_arrays[c], first, stop, steps_decays, output
            )

    columns = _edges(hidden, [1.0] * count)
    shares = [(first, stop) for first, stop in zip(columns, columns[1:]) if stop > first]
    threads.run_concurrently(add_carries, shares)
    return carries[count]


# Without gradients the input projection runs inside the walk, a chunk of steps of one sequence
# at a time into a buffer of about this many elements (64 KiB of float32, in L1/L2) that the
# same thread's walk reads at once: the (T, B, G*H) projections are never written to memory.
_PROJECTION_ELEMENTS = 1 << 14
_MIN_PROJECTION_STEPS = 8
# A batch too small to split runs as parts of the hidden units instead (the recurrence is
# element-wise, so they need no joining, unlike chunks of time), cut at multiples of this many
# units: for float32, a part's G * 16 rows of the weight fill whole 32-column panels (G = 2).
_UNIT_ALIGNMENT = 16


def projection_chunk(steps: int, gate_width: int) -> int:
    """Steps projected at a time by the fused projection (at least 1)."""
    return max(1, min(steps, max(_MIN_PROJECTION_STEPS, _PROJECTION_ELEMENTS // gate_width)))


def unit_parts(steps: int, batch: int, hidden: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of hidden units, one per thread, for a batch that runs as one part."""
    count = min(
        threads.concurrency(),
        hidden // _UNIT_ALIGNMENT,
        steps * batch * hidden // _MIN_ELEMENTS_PER_THREAD,
    )
    if count < 2:
        return [(0, hidden)]
    edges = [round(hidden * k / count / _UNIT_ALIGNMENT) * _UNIT_ALIGNMENT for k in range(count)]
    edges.append(hidden)
    return [(first, stop) for first, stop in zip(edges, edges[1:]) if stop > first]


def _fused_parts(steps: int, batch: int, hidden: int) -> tuple[list[slice], list[tuple[int, int]]]:
    """The fused forward's threads: each walks one range of rows for one range of units."""
    rows = _batch_parts(steps, batch, hidden)
    return rows, unit_parts(steps, batch, hidden) if len(rows) == 1 else [(0, hidden)]


def _input_rows(x: Tensor) -> tuple[np.ndarray, int, int]:
    """(T, B, I) x as (T*B, I) rows, with the row strides of a step and of a sequence: a view
    where x is time-major or a batch-first tensor transposed, else a time-major copy."""
    steps, batch, features = x.shape
    x = x.detach()
    if not x.is_contiguous() and x.transpose(0, 1).is_contiguous():
        return x.transpose(0, 1).reshape(batch * steps, features).numpy(), 1, steps
    return x.contiguous().view(steps * batch, features).numpy(), batch, 1


def _projected_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    h0: Tensor,
    lengths: Tensor | None,
    lstm: bool,
    parts: tuple[list[slice], list[tuple[int, int]]] | None = None,
) -> tuple[Tensor, Tensor]:
    """(T, B, I) x, (G*H, I) W, (G*H,) b or None, (B, H) h0 -> (T, B, H) output, (B, H) final
    of the projections x W^T + b, never materialised; nothing is recorded for autograd.
    parts: _fused_parts of these sizes where the caller has them."""
    steps, batch, features = x.shape
    hidden = h0.shape[1]
    output = torch.empty(steps, batch, hidden, dtype=x.dtype)
    state = h0.detach().clone(memory_format=torch.contiguous_format)
    inputs, time_stride, batch_stride = _input_rows(x)
    chunk = projection_chunk(steps, weight.shape[0])
    lengths_array, output_array = _lengths_array(lengths), output.numpy()
    state_array = state.numpy()
    decay = np.ones_like(state_array)
    rows, units = _fused_parts(steps, batch, hidden) if parts is None else parts
    weights = weight.detach().numpy().reshape(-1, hidden, features)
    biases = None if bias is None else bias.detach().numpy().reshape(-1, hidden)
    arguments = []
    for first, stop in units:
        # Each part's rows of the weight (all of it when one part has every unit), packed once.
        part_weight = np.ascontiguousarray(weights[:, first:stop].reshape(-1, features))
        prepared = _prepare_projection(chunk, part_weight, blas.PACKED_GEMM)
        if biases is None:
            part_bias = np.empty(0, dtype=part_weight.dtype)
        else:
            part_bias = np.ascontiguousarray(biases[:, first:stop].reshape(-1))
        for part in rows:
            arguments.append(
                (inputs, time_stride, batch_stride, *prepared, part_bias, chunk, state_array,
                 lengths_array, lstm, part.start, part.stop, first, stop, output_array, decay)
            )  # fmt: skip
    threads.run_concurrently(_projected_forward_kernel, arguments)
    return output, state


def _backward(
    grad_output: Tensor,
    grad_final: Tensor,
    gates: Tensor,
    h0: Tensor,
    output: Tensor,
    lengths: Tensor | None,
    lstm: bool,
    parallel: bool,
) -> tuple[Tensor, Tensor]:
    """dL/dgates (T, B, G*H) and dL/dh0 (B, H) from dL/doutput and dL/dfinal."""
    steps, batch, _ = gates.shape
    hidden = h0.shape[1]
    grad_h = grad_final.detach().clone(memory_format=torch.contiguous_format)
    grad_gates = torch.empty_like(gates)
    incoming = grad_output.detach().contiguous().numpy()
    saved = (gates.numpy(), h0.detach().contiguous().numpy(), output.numpy())
    lengths_array, grad_gates_array = _lengths_array(lengths), grad_gates.numpy()
    parts = _batch_parts(steps, batch, hidden)
    chunks = chunk_count(steps, batch, hidden) if parallel and len(parts) == 1 else 1
    # With chunks, thread 0 ends with dL/dh0 in grad_h itself; the others carry copies of
    # dL/dh_final back to their chunks.
    carried = [grad_h.numpy()] + [grad_h.numpy().copy() for _ in range(chunks - 1)]
    edges = _edges(steps, backward_chunk_weights(chunks))

    def walk(rows: slice) -> None:
        _backward_kernel(
            incoming, carried[0], *saved, lengths_array, lstm, 0, steps, rows.start, rows.stop,
            grad_gates_array,
        )  # fmt: skip

    def walk_chunk(k: int) -> None:
        if k < chunks - 1:
            _carry_back_kernel(
                incoming, carried[k], saved[0], lengths_array, lstm, edges[k + 1], steps
            )
        _backward_kernel(
            incoming, carried[k], *saved, lengths_array, lstm, edges[k], edges[k + 1], 0, batch,
            grad_gates_array,
        )  # fmt: skip

    if chunks > 1:
        threads.run_concurrently(walk_chunk, [(k,) for k in range(chunks)])
    else:
        threads.run_concurrently(walk, [(part,) for part in parts])
    return grad_gates, grad_h


class MinimalScanFunction(torch.autograd.Function):
    """Autograd node for the gates + recurrence of minGRU/minLSTM: numba forward and backward."""

    @staticmethod
    def forward(ctx, gates, h0, lengths, lstm, parallel=False):
        gates = gates.detach().contiguous()
        output, final = _forward(gates, h0, lengths, lstm, parallel)
        ctx.lstm = lstm
        ctx.parallel = parallel
        ctx.save_for_backward(gates, h0, output, lengths)
        return output, final

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, grad_final):
        gates, h0, output, lengths = ctx.saved_tensors
        grad_gates, grad_h = _backward(
            grad_output, grad_final, gates, h0, output, lengths, ctx.lstm, ctx.parallel
        )
        return grad_gates, grad_h, None, None, None


def scan_direction(
    cell: str, gates: Tensor, h0: Tensor, lengths: Tensor | None, parallel: bool = False
) -> tuple[Tensor, Tensor]:
    """(T, B, G*H) projections, (B, H) h0 -> (T, B, H) output (zero past lengths), (B, H) final.

    parallel: a batch too small to split over the threads is scanned in chunks of time.
    """
    if cell not in CELLS:
        raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")
    lstm = cell == "min_lstm"
    if lengths is not None:
        lengths = lengths.to("cpu", torch.int64).contiguous()
    if torch.is_grad_enabled() and (gates.requires_grad or h0.requires_grad):
        return MinimalScanFunction.apply(gates, h0, lengths, lstm, parallel)
    return _forward(gates.detach().contiguous(), h0, lengths, lstm, parallel)


def project_and_scan(
    cell: str,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    h0: Tensor,
    lengths: Tensor | None,
    parallel: bool = False,
) -> tuple[Tensor, Tensor]:
    """(T, B, I) input, (G*H, I) weight, (G*H,) bias or None, (B, H) h0 -> (T, B, H) output
    (zero past lengths), (B, H) final: scan_direction of F.linear(x, weight, bias).

    Without gradients to record the projection runs inside the walk (see _PROJECTION_ELEMENTS),
    whose threads take rows of the batch or, for a batch too small to split, hidden units, in
    either mode (a walk too small for either takes F.linear's projections while torch has more
    than one thread); with them F.linear's projections go to scan_direction (parallel: its
    chunks of time) and its autograd node.
    """
    if cell not in CELLS:
        raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")
    tensors = [x, weight, h0] + ([] if bias is None else [bias])
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return scan_direction(cell, F.linear(x, weight, bias), h0, lengths, parallel)
    rows, units = _fused_parts(x.shape[0], x.shape[1], h0.shape[1])
    if len(rows) == len(units) == 1 and threads.concurrency() > 1:
        # A walk too small to split would leave the other threads idle, where F.linear shares
        # its product with them (measured at B = 1, T = 128 and 256, I = 64, H = 128, 2
        # threads: 10-15% faster than the fused walk).
        return scan_direction(cell, F.linear(x, weight, bias), h0, lengths, parallel)
    if lengths is not None:
        lengths = lengths.to("cpu", torch.int64).contiguous()
    return _projected_forward(x, weight, bias, h0, lengths, cell == "min_lstm", (rows, units))


def warmup() -> None:
    """Compile (or load from numba's disk cache) both cells' kernels for float32 and float64."""
    for dtype in (torch.float32, torch.float64):
        for cell, gate_count in (("min_gru", 2), ("min_lstm", 3)):
            gates = torch.randn(3, 2, gate_count * 2, dtype=dtype, requires_grad=True)
            h0 = torch.randn(2, 2, dtype=dtype, requires_grad=True)
            x = torch.randn(3, 2, 2, dtype=dtype)
            weight = torch.randn(gate_count * 2, 2, dtype=dtype)
            for lengths in (None, torch.tensor([3, 1])):
                output, final = scan_direction(cell, gates, h0, lengths)
                (output.sum() + final.sum()).backward()
                # Directly: tiny sizes on several threads take F.linear instead.
                _projected_forward(x, weight, weight[:, 0], h0, lengths, cell == "min_lstm")
            # The parallel mode's chunked scan (tiny sizes never split, so call it directly).
            lstm = cell == "min_lstm"
            projections = gates.detach().numpy()
            output = np.empty((3, 2, 2), dtype=projections.dtype)
            _forward_chunks((projections, _lengths_array(None), lstm, output), h0.detach(), 2)
            grad_h = np.zeros((2, 2), dtype=projections.dtype)
            _carry_back_kernel(output, grad_h, projections, _lengths_array(None), lstm, 1, 3)
