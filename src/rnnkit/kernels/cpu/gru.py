"""Fused GRU on the CPU: a compiled time loop forward and a hand-derived BPTT backward.

Forward, one numba call: all T steps run in compiled code (the input projection a chunk of steps
at a time, projection.py, then per step the recurrent matmul plus fused gate math), saving r, z, n
(and W_hn h + b_hn for reset_after=True) only when a gradient is needed; the backward reads
h_{t-1} back from the output and h0.

Backward, with h' = n + z (h - n), a_* the pre-activations and g = dL/dh' (from the output and
from the next step):
    dn = g (1 - z)            da_n = dn (1 - n^2)
    dz = g (h - n)            da_z = dz z (1 - z)
    reset_after=True:   dr = da_n (W_hn h + b_hn),   d(W_hn h + b_hn) = da_n r
                        dh = g z + [da_r, da_z, da_n r] W_hh
    reset_after=False:  d(rh) = da_n W_hn,           dr = d(rh) h
                        dh = g z + d(rh) r + [da_r, da_z] W_h{r,z}
    da_r = dr r (1 - r)
The backward, also one numba call, produces these per step (one recurrent matmul each), then the
weight gradients as a few large matmuls over all T*B rows (dx = dA W_ih, dW_ih = dA^T X,
dW_hh = dA_h^T H_prev, the biases column sums).

Every product goes through `blas` (torch's MKL, on torch's own threads); per-step products use
a packed weight from _PACK_MIN_STEPS steps on (rnnkit's AVX-512 panels for float32, see
`panels`; else MKL's packed form), the forward's packed into space kept per thread
(pack_space.py). With several torch threads and a large enough
per-step product, the batch runs as parts whose forward and backward calls run concurrently on
torch's OpenMP threads (`threads`); the parts' weight gradients are summed.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload
from torch import Tensor
from torch.autograd.function import once_differentiable

from rnnkit.kernels.cpu import blas, pack_space, threads
from rnnkit.kernels.cpu.activations import sigmoid_float32, tanh_float32
from rnnkit.kernels.cpu.projection import input_chunk_steps, input_plan_into, step_projection

# Packing a weight costs about as much as a few products with it; below this many steps plain
# products are faster.
_PACK_MIN_STEPS = 8

# error_model="numpy": no ZeroDivisionError checks, which would stop the gate loops vectorizing.
_jit = njit(cache=True, nogil=True, error_model="numpy")


# -- vectorizable exp / sigmoid / tanh ---------------------------------------------------------
# numba's math.exp and math.tanh are scalar libm calls (this llvmlite has no SVML), so the gate
# loops would not vectorize. float32 takes the rational tanh of activations.py; float64 uses
# range reduction (v = k ln2 + r) and a polynomial for exp(r) in plain arithmetic, and builds
# 2^k from its bits (to about 1 ulp).


@intrinsic
def _float64_from_bits(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


def _exp(v):
    """exp(v) of a float64 scalar (numba only)."""
    raise NotImplementedError


def _sigmoid(v):
    """1 / (1 + exp(-v)) in v's precision (numba only)."""
    raise NotImplementedError


def _tanh(v):
    """tanh(v) in v's precision (numba only)."""
    raise NotImplementedError


def _is_float32(v) -> bool:
    return isinstance(v, types.Float) and v.bitwidth == 32


@overload(_exp)
def _exp_overload(v):
    def exp64(v):
        v = float(v)
        if v < -708.0:
            v = -708.0
        if v > 709.0:
            v = 709.0
        k = math.floor(v * 1.4426950408889634 + 0.5)
        r = (v - k * 6.93147180369123816490e-01) - k * 1.90821492927058770002e-10
        # Taylor series on |r| <= ln(2)/2, degree 13: truncation < 1e-17 relative.
        p = 1.0 / 6227020800.0
        p = p * r + 1.0 / 479001600.0
        p = p * r + 1.0 / 39916800.0
        p = p * r + 1.0 / 3628800.0
        p = p * r + 1.0 / 362880.0
        p = p * r + 1.0 / 40320.0
        p = p * r + 1.0 / 5040.0
        p = p * r + 1.0 / 720.0
        p = p * r + 1.0 / 120.0
        p = p * r + 1.0 / 24.0
        p = p * r + 1.0 / 6.0
        p = p * r + 0.5
        p = p * r + 1.0
        p = p * r + 1.0
        return p * _float64_from_bits((np.int64(k) + 1023) << 52)

    return exp64


@overload(_sigmoid)
def _sigmoid_overload(v):
    if _is_float32(v):
        return lambda v: sigmoid_float32(v)
    return lambda v: 1.0 / (1.0 + _exp(-float(v)))


@overload(_tanh, inline="always")
def _tanh_overload(v):
    if _is_float32(v):
        return lambda v: tanh_float32(v)

    def tanh64(v):
        v = float(v)
        magnitude = abs(v)
        decay = _exp(-2.0 * magnitude)
        large = (1.0 - decay) / (1.0 + decay)
        square = v * v
        series = -1382.0 / 155925.0
        series = series * square + 62.0 / 2835.0
        series = series * square - 17.0 / 315.0
        series = series * square + 2.0 / 15.0
        series = series * square - 1.0 / 3.0
        small = v + v * square * series
        return small if magnitude < 0.0625 else math.copysign(large, v)

    return tanh64


# -- the compiled loops ------------------------------------------------------------------------
# Rows are (T*B) flattened time-major positions. Saved activations live at each step's input
# position (t forward, lengths[b]-1-s reverse); padding positions hold zeros so that the
# weight-gradient matmuls ignore them. Without saving, the save arrays are (1, B, .) scratch rows.


@_jit
def _column_sums(rows, out):
    """(R, N) -> out (N,) column sums, accumulated in float64 so that float32 bias gradients
    stay accurate over long sequences."""
    sums = np.zeros(rows.shape[1])
    for i in range(rows.shape[0]):
        row = rows[i]
        for j in range(rows.shape[1]):
            sums[j] += row[j]
    blas.copy_vector(sums, out)


@_jit
def _forward_reset_after(
    x_rows, w_ih, bias, w_hh, b_hn, h0, lengths, reverse, save, output, h_last, saved_gates,
    use_packing, spaces,
):  # fmt: skip
    """Torch's form. x_rows (T*B, I); w_ih (3H, I); bias (3H,) = b_ih + [b_hr, b_hz, 0];
    w_hh (3H, H); b_hn (H,). Writes output (T, B, H), h_last (B, H) and, when `save`,
    saved_gates [r, z, n, W_hn h + b_hn] (T, B, 4H). W_ih and W_hh are packed into the first
    two of `spaces` where they fit (pack_space.py).
    """
    steps, batch, hidden = output.shape
    work = blas.workspace(h0)
    x = x_rows.reshape((steps, batch, x_rows.shape[1]))
    ih_space, hh_space, _ = spaces
    plan = input_plan_into(x, w_ih, steps, batch, use_packing, work, ih_space)
    h = h0.copy()
    h_gates = np.empty((batch, 3 * hidden), dtype=h0.dtype)
    weight, transposed, packed = blas.prepare_weight_into(
        batch, w_hh, True, use_packing, work, hh_space
    )
    for s in range(steps):
        x_step = step_projection(x, plan, bias, lengths, reverse, s, 0, work)
        blas.gemm_weight(h, weight, transposed, packed, h_gates, False, work)
        for b in range(batch):
            length = lengths[b]
            if s >= length:
                output[s, b, :] = 0
                if save:
                    saved_gates[s, b, :] = 0
                continue
            pos = length - 1 - s if reverse else s
            slot = pos if save else 0
            x_row, h_row, hg_row = x_step[b], h[b], h_gates[b]
            out_row, gates_row = output[pos, b], saved_gates[slot, b]
            for j in range(hidden):
                r = _sigmoid(x_row[j] + hg_row[j])
                z = _sigmoid(x_row[hidden + j] + hg_row[hidden + j])
                h_n = hg_row[2 * hidden + j] + b_hn[j]
                n = _tanh(x_row[2 * hidden + j] + r * h_n)
                h_prev = h_row[j]
                h_new = n + z * (h_prev - n)
                gates_row[j] = r
                gates_row[hidden + j] = z
                gates_row[2 * hidden + j] = n
                gates_row[3 * hidden + j] = h_n
                h_row[j] = h_new
                out_row[j] = h_new
    blas.copy_matrix(h, h_last)


@_jit
def _forward_reset_before(
    x_rows, w_ih, bias, w_rz, w_n, h0, lengths, reverse, save, output, h_last, saved_gates,
    use_packing, spaces,
):  # fmt: skip
    """Cho et al.'s form. x_rows (T*B, I); w_ih (3H, I); bias (3H,) = b_ih + b_hh; w_rz (2H, H)
    and w_n (H, H). Writes output, h_last and, when `save`, saved_gates [r, z, n] (T, B, 3H).
    W_ih, W_rz and W_n are packed into `spaces` where they fit (pack_space.py)."""
    steps, batch, hidden = output.shape
    work = blas.workspace(h0)
    x = x_rows.reshape((steps, batch, x_rows.shape[1]))
    ih_space, rz_space, n_space = spaces
    plan = input_plan_into(x, w_ih, steps, batch, use_packing, work, ih_space)
    h = h0.copy()
    rz = np.empty((batch, 2 * hidden), dtype=h0.dtype)
    reset_h = np.zeros((batch, hidden), dtype=h0.dtype)
    h_n = np.empty((batch, hidden), dtype=h0.dtype)
    rz_weight, rz_transposed, rz_packed = blas.prepare_weight_into(
        batch, w_rz, True, use_packing, work, rz_space
    )
    n_weight, n_transposed, n_packed = blas.prepare_weight_into(
        batch, w_n, True, use_packing, work, n_space
    )
    for s in range(steps):
        x_step = step_projection(x, plan, bias, lengths, reverse, s, 0, work)
        blas.gemm_weight(h, rz_weight, rz_transposed, rz_packed, rz, False, work)
        for b in range(batch):
            if s >= lengths[b]:
                reset_h[b, :] = 0
                continue
            x_row, h_row, rz_row, reset_row = x_step[b], h[b], rz[b], reset_h[b]
            for j in range(2 * hidden):
                rz_row[j] = _sigmoid(x_row[j] + rz_row[j])
            for j in range(hidden):
                reset_row[j] = rz_row[j] * h_row[j]
        blas.gemm_weight(reset_h, n_weight, n_transposed, n_packed, h_n, False, work)
        for b in range(batch):
            length = lengths[b]
            if s >= length:
                output[s, b, :] = 0
                if save:
                    saved_gates[s, b, :] = 0
                continue
            pos = length - 1 - s if reverse else s
            slot = pos if save else 0
            x_row, h_row, rz_row, hn_row = x_step[b], h[b], rz[b], h_n[b]
            out_row, gates_row = output[pos, b], saved_gates[slot, b]
            for j in range(hidden):
                z = rz_row[hidden + j]
                n = _tanh(x_row[2 * hidden + j] + hn_row[j])
                h_prev = h_row[j]
                h_new = n + z * (h_prev - n)
                gates_row[j] = rz_row[j]
                gates_row[hidden + j] = z
                gates_row[2 * hidden + j] = n
                h_row[j] = h_new
                out_row[j] = h_new
    blas.copy_matrix(h, h_last)


@_jit
def _times_previous_state(d, output, h0, lengths, reverse, out):
    """out = sum over rows of d[t, b]^T h_{t-1}[b] for d (T, B, K): h_{t-1} is the output one
    step earlier in processing order, or h0 at each sequence's first step."""
    steps, batch, width = d.shape
    hidden = output.shape[2]
    rows = steps * batch
    d_rows = d.reshape((rows, width))
    output_rows = output.reshape((rows, hidden))
    work = blas.workspace(out)
    # Rows whose previous state is h0 meet a zero padding output (or none) in this product.
    if reverse:
        blas.gemm(d_rows[: rows - batch], output_rows[batch:], out, True, False, False, work)
    else:
        blas.gemm(d_rows[batch:], output_rows[: rows - batch], out, True, False, False, work)
    first = np.empty((batch, width), dtype=d.dtype)
    for b in range(batch):
        blas.copy_vector(d[lengths[b] - 1 if reverse else 0, b], first[b])
    blas.gemm(first, h0, out, True, False, True, work)


@_jit
def _weight_gradients(
    d_rz, d_n, reset_h, saved_gates, x_rows, output, h0, lengths, reverse, w_ih_rz, w_ih_n,
    need_dx, dx_rows, dw_ih, dw_hh, db_ih, db_hh,
):  # fmt: skip
    """Gradients of x, W_ih, W_hh and the biases from the per-step gate gradients, by matmuls
    over all T*B rows. d_rz (T, B, 2H) = dL/d[a_r, a_z]; d_n (T, B, H) = dL/da_n. W_hn's input is
    reset_h = r h_{t-1} (T, B, H) in Cho et al.'s form; in torch's form (reset_h empty) it is
    h_{t-1} and its output's gradient is da_n r, made in place in d_n once d_n is used up.
    dw_ih, dw_hh and db_ih with db_hh passed empty are not computed (frozen weights)."""
    steps, batch, two_hidden = d_rz.shape
    hidden = d_n.shape[2]
    rows = steps * batch
    d_rz_rows = d_rz.reshape((rows, two_hidden))
    d_n_rows = d_n.reshape((rows, hidden))
    need_w_ih, need_w_hh, need_bias = dw_ih.shape[0] > 0, dw_hh.shape[0] > 0, db_ih.shape[0] > 0
    work = blas.workspace(d_n)
    if need_dx:
        blas.gemm(d_rz_rows, w_ih_rz, dx_rows, False, False, False, work)
        blas.gemm(d_n_rows, w_ih_n, dx_rows, False, False, True, work)
    if need_w_ih:
        blas.gemm(d_rz_rows, x_rows, dw_ih[:two_hidden], True, False, False, work)
        blas.gemm(d_n_rows, x_rows, dw_ih[two_hidden:], True, False, False, work)
    if need_bias:
        _column_sums(d_rz_rows, db_ih[:two_hidden])
        _column_sums(d_n_rows, db_ih[two_hidden:])
        blas.copy_vector(db_ih[:two_hidden], db_hh[:two_hidden])
    if need_w_hh:
        _times_previous_state(d_rz, output, h0, lengths, reverse, dw_hh[:two_hidden])
    if reset_h.size == 0:
        if need_w_hh or need_bias:
            for t in range(steps):
                for b in range(batch):
                    d_row, r_row = d_n[t, b], saved_gates[t, b]
                    for j in range(hidden):
                        d_row[j] *= r_row[j]
        if need_w_hh:
            _times_previous_state(d_n, output, h0, lengths, reverse, dw_hh[two_hidden:])
        if need_bias:
            _column_sums(d_n_rows, db_hh[two_hidden:])
    else:
        if need_w_hh:
            reset_rows = reset_h.reshape((rows, hidden))
            blas.gemm(d_n_rows, reset_rows, dw_hh[two_hidden:], True, False, False, work)
        if need_bias:
            blas.copy_vector(db_ih[two_hidden:], db_hh[two_hidden:])


@_jit
def _backward_reset_after(
    d_output, dh_last, saved_gates, output, h0, x_rows, w_ih_rz, w_ih_n, w_hh, lengths, reverse,
    need_dx, dx_rows, dw_ih, dw_hh, db_ih, db_hh, dh0, use_packing,
):  # fmt: skip
    """BPTT for torch's form, then the weight gradients over all T*B rows.

    Per row it keeps dL/d[a_r, a_z] (2H) and dL/da_n (H).
    Writes dx_rows (T*B, I) when `need_dx`, dw_ih (3H, I), dw_hh (3H, H), db_ih and db_hh (3H,),
    dh0 (B, H); w_ih_rz and w_ih_n are W_ih's (2H, I) and (H, I) blocks.
    """
    steps, batch, hidden = d_output.shape
    one = blas.one_like(dh0)
    dh = dh_last.copy()
    d_rz = np.empty((steps, batch, 2 * hidden), dtype=dh0.dtype)
    d_n = np.empty((steps, batch, hidden), dtype=dh0.dtype)
    d_step = np.empty((batch, 3 * hidden), dtype=dh0.dtype)
    dh_through_w = np.empty((batch, hidden), dtype=dh0.dtype)
    work = blas.workspace(dh0)
    weight, transposed, packed = blas.prepare_weight(batch, w_hh, False, use_packing, work)
    for s in range(steps - 1, -1, -1):
        for b in range(batch):
            length = lengths[b]
            if s >= length:
                d_step[b, :] = 0
                d_rz[s, b, :] = 0
                d_n[s, b, :] = 0
                continue
            pos = length - 1 - s if reverse else s
            dh_row, dout_row = dh[b], d_output[pos, b]
            gates_row = saved_gates[pos, b]
            prev_row = h0[b] if s == 0 else output[pos + 1 if reverse else pos - 1, b]
            drz_row, dn_row = d_rz[pos, b], d_n[pos, b]
            step_row = d_step[b]
            for j in range(hidden):
                g = dh_row[j] + dout_row[j]
                r = gates_row[j]
                z = gates_row[hidden + j]
                n = gates_row[2 * hidden + j]
                da_n = g * (one - z) * (one - n * n)
                da_z = g * (prev_row[j] - n) * z * (one - z)
                da_r = da_n * gates_row[3 * hidden + j] * r * (one - r)
                drz_row[j] = da_r
                drz_row[hidden + j] = da_z
                dn_row[j] = da_n
                step_row[j] = da_r
                step_row[hidden + j] = da_z
                step_row[2 * hidden + j] = da_n * r
                dh_row[j] = g * z
        blas.gemm_weight(d_step, weight, transposed, packed, dh_through_w, False, work)
        for b in range(batch):
            if s < lengths[b]:
                dh_row, through_row = dh[b], dh_through_w[b]
                for j in range(hidden):
                    dh_row[j] += through_row[j]
    blas.copy_matrix(dh, dh0)
    _weight_gradients(
        d_rz, d_n, np.empty((0, 0, 0), dtype=dh0.dtype), saved_gates, x_rows, output, h0,
        lengths, reverse, w_ih_rz, w_ih_n, need_dx, dx_rows, dw_ih, dw_hh, db_ih, db_hh,
    )  # fmt: skip


@_jit
def _backward_reset_before(
    d_output, dh_last, saved_gates, output, h0, x_rows, w_ih_rz, w_ih_n, w_rz, w_n, lengths,
    reverse, need_dx, dx_rows, dw_ih, dw_hh, db_ih, db_hh, dh0, use_packing,
):  # fmt: skip
    """BPTT for Cho et al.'s form, then the weight gradients over all T*B rows.

    Per row it keeps dL/d[a_r, a_z] (2H), dL/da_n (H) and r h (H), the input of W_hn. Writes
    dx_rows (T*B, I) when `need_dx`, dw_ih (3H, I), dw_hh (3H, H), db_ih and db_hh (3H,),
    dh0 (B, H).
    """
    steps, batch, hidden = d_output.shape
    one = blas.one_like(dh0)
    dh = dh_last.copy()
    d_rz = np.empty((steps, batch, 2 * hidden), dtype=dh0.dtype)
    d_n = np.empty((steps, batch, hidden), dtype=dh0.dtype)
    reset_h = np.empty((steps, batch, hidden), dtype=dh0.dtype)
    d_rz_step = np.empty((batch, 2 * hidden), dtype=dh0.dtype)
    d_n_step = np.empty((batch, hidden), dtype=dh0.dtype)
    d_reset_h = np.empty((batch, hidden), dtype=dh0.dtype)
    dh_through_w = np.empty((batch, hidden), dtype=dh0.dtype)
    work = blas.workspace(dh0)
    rz_weight, rz_transposed, rz_packed = blas.prepare_weight(batch, w_rz, False, use_packing, work)
    n_weight, n_transposed, n_packed = blas.prepare_weight(batch, w_n, False, use_packing, work)
    for s in range(steps - 1, -1, -1):
        for b in range(batch):
            length = lengths[b]
            if s >= length:
                d_n_step[b, :] = 0
                d_rz_step[b, :] = 0
                d_rz[s, b, :] = 0
                d_n[s, b, :] = 0
                reset_h[s, b, :] = 0
                continue
            pos = length - 1 - s if reverse else s
            dh_row, dout_row = dh[b], d_output[pos, b]
            gates_row = saved_gates[pos, b]
            prev_row = h0[b] if s == 0 else output[pos + 1 if reverse else pos - 1, b]
            drz_row, dn_row = d_rz[pos, b], d_n[pos, b]
            drz_step, dn_step = d_rz_step[b], d_n_step[b]
            for j in range(hidden):
                g = dh_row[j] + dout_row[j]
                z = gates_row[hidden + j]
                n = gates_row[2 * hidden + j]
                da_n = g * (one - z) * (one - n * n)
                da_z = g * (prev_row[j] - n) * z * (one - z)
                drz_row[hidden + j] = da_z
                dn_row[j] = da_n
                drz_step[hidden + j] = da_z
                dn_step[j] = da_n
                dh_row[j] = g * z
        blas.gemm_weight(d_n_step, n_weight, n_transposed, n_packed, d_reset_h, False, work)
        for b in range(batch):
            length = lengths[b]
            if s >= length:
                continue
            pos = length - 1 - s if reverse else s
            dh_row, gates_row = dh[b], saved_gates[pos, b]
            prev_row = h0[b] if s == 0 else output[pos + 1 if reverse else pos - 1, b]
            drz_row, drz_step, drh_row = d_rz[pos, b], d_rz_step[b], d_reset_h[b]
            reset_row = reset_h[pos, b]
            for j in range(hidden):
                r = gates_row[j]
                da_r = drh_row[j] * prev_row[j] * r * (one - r)
                drz_row[j] = da_r
                drz_step[j] = da_r
                reset_row[j] = r * prev_row[j]
                dh_row[j] += drh_row[j] * r
        blas.gemm_weight(d_rz_step, rz_weight, rz_transposed, rz_packed, dh_through_w, False, work)
        for b in range(batch):
            if s < lengths[b]:
                dh_row, through_row = dh[b], dh_through_w[b]
                for j in range(hidden):
                    dh_row[j] += through_row[j]
    blas.copy_matrix(dh, dh0)
    _weight_gradients(
        d_rz, d_n, reset_h, saved_gates, x_rows, output, h0, lengths, reverse, w_ih_rz, w_ih_n,
        need_dx, dx_rows, dw_ih, dw_hh, db_ih, db_hh,
    )  # fmt: skip


# -- the autograd function -----------------------------------------------------------------------


def _array(tensor: Tensor) -> np.ndarray:
    """A C-contiguous numpy view (or copy) of a detached tensor."""
    return tensor.contiguous().numpy()


def _row_blocks(weight: Tensor, split: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows [:split] and [split:] of a weight as C-contiguous arrays."""
    rows = _array(weight)
    return rows[:split], rows[split:]


def _use_packing(steps: int) -> bool:
    return blas.PACKED_GEMM and steps >= _PACK_MIN_STEPS


def _input_bias(b_ih: Tensor | None, b_hh: Tensor | None, hidden: int, reset_after: bool, dtype):
    """(3H,) bias added to W_ih x: b_ih + b_hh, without b_hn in torch's form (r scales it)."""
    if b_ih is None:
        return np.zeros(3 * hidden, dtype=np.float32 if dtype == torch.float32 else np.float64)
    b_ih = b_ih.numpy()
    bias = b_ih + b_hh.numpy()
    if reset_after:
        bias[2 * hidden :] = b_ih[2 * hidden :]
    return bias


def _batch_part(tensor: Tensor, part: slice, dim: int = 0) -> np.ndarray:
    """A C-contiguous numpy view (or copy) of the batch part `part` of a tensor whose batch
    dimension is `dim` (0 or 1); the whole batch is not sliced."""
    if part.stop - part.start != tensor.shape[dim]:
        tensor = tensor[:, part] if dim == 1 else tensor[part]
    return tensor.contiguous().numpy()


def _initial_state(h0: Tensor | None, part: slice, hidden: int, dtype: np.dtype) -> np.ndarray:
    """The (b, H) initial state of a batch part as the kernels read it; zeros for h0 None."""
    if h0 is None:
        return np.zeros((part.stop - part.start, hidden), dtype)
    return _batch_part(h0, part)


def _lengths_array(lengths: Tensor | None, steps: int, batch: int) -> np.ndarray:
    if lengths is None:
        return np.full(batch, steps, dtype=np.int64)
    return lengths.to(torch.int64).contiguous().numpy()


def _batch_part_array(array: np.ndarray, part: slice) -> np.ndarray:
    """A C-contiguous view (or copy) of a (B,) array's batch part; the whole batch as it is."""
    return array if part.stop - part.start == len(array) else np.ascontiguousarray(array[part])


# Sequences of a batch are independent: with several torch threads the batch runs as parts
# whose time loops run concurrently (threads.run_concurrently), each with single-threaded
# products. A part's per-step product must be large enough to pay for the lower efficiency of
# fewer rows (see threads.batch_parts).
_MIN_PART = 4
_MIN_PART_STEP_WORK = 1 << 17


def _batch_parts(batch: int, step_work: int, steps: int, dtype: torch.dtype) -> list[slice]:
    # A batch of fewer than two parts' rows (the usual batch 1) is decided before the calls
    # below; OpenBLAS's own thread pool would compete with the parts.
    if batch < 2 * _MIN_PART or blas.LIBRARY.startswith("OpenBLAS"):
        return [slice(0, batch)]
    threaded = blas.threaded_packed_product(batch, step_work // max(batch, 1), dtype)
    return threads.batch_parts(
        batch, step_work, _MIN_PART, _MIN_PART_STEP_WORK, steps, threaded_product=threaded
    )


def _part_rows(x: Tensor, part: slice) -> np.ndarray:
    """The (T*b, I) C-contiguous rows of a (T, B, I) tensor's batch slice."""
    steps, _, inputs = x.shape
    return _batch_part(x, part, 1).reshape(steps * (part.stop - part.start), inputs)


def _run_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, reset_after, save):
    """(output (T, B, H), h_last (B, H), the batch parts, each part's saved_gates (a numpy
    array: only the backward reads them)); plain tensors in and out. x is (T, B, I), any
    layout. Without `save` saved_gates are scratch."""
    steps, batch, _ = x.shape
    hidden = w_hh.size(1)
    dtype = x.dtype
    gate_width = (4 if reset_after else 3) * hidden
    saved_steps = steps if save else 1
    bias = _input_bias(b_ih, b_hh, hidden, reset_after, dtype)
    if reset_after:
        b_hn = np.zeros(hidden, dtype=bias.dtype) if b_hh is None else _array(b_hh)[2 * hidden :]
        kernel, recurrent = _forward_reset_after, (_array(w_hh), b_hn)
    else:
        kernel = _forward_reset_before
        recurrent = _row_blocks(w_hh, 2 * hidden)
    w_ih_array = _array(w_ih)
    length_array = _lengths_array(lengths, steps, batch)
    parts = _batch_parts(batch, batch * 3 * hidden * hidden, steps, dtype)
    use_packing = _use_packing(steps)
    outputs, finals, saved, argument_lists = [], [], [], []
    # The input's chunk rows size W_ih's space: asked of numba only where it is kept.
    keeps_ih = use_packing and pack_space.keeps(w_ih_array)
    for index, part in enumerate(parts):
        size = part.stop - part.start
        chunk = input_chunk_steps(steps, size, 3 * hidden) if keeps_ih else 0
        recurrent_weights = recurrent[:1] if reset_after else recurrent  # (W_hh,) or (W_rz, W_n)
        weights = [(w_ih_array, chunk * size), *((weight, size) for weight in recurrent_weights)]
        spaces = pack_space.spaces(weights, 3 * index, use_packing, dtype)
        if reset_after:  # both kernels take three spaces
            spaces += (pack_space.empty(dtype),)
        output = torch.empty(steps, size, hidden, dtype=dtype)
        h_last = torch.empty(size, hidden, dtype=dtype)
        saved_gates = np.empty((saved_steps, size, gate_width), bias.dtype)
        argument_lists.append(
            (
                _part_rows(x, part),
                w_ih_array,
                bias,
                *recurrent,
                _initial_state(h0, part, hidden, bias.dtype),
                _batch_part_array(length_array, part),
                reverse,
                save,
                output.numpy(),
                h_last.numpy(),
                saved_gates,
                use_packing,
                spaces,
            )
        )
        outputs.append(output)
        finals.append(h_last)
        saved.append(saved_gates)
    threads.run_concurrently(kernel, argument_lists)
    if len(parts) == 1:
        return outputs[0], finals[0], parts, saved
    return torch.cat(outputs, dim=1), torch.cat(finals), parts, saved


class GRUFunction(torch.autograd.Function):
    """One direction of a GRU layer with a hand-derived backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, reset_after):
        x, w_ih, w_hh = x.detach(), w_ih.detach(), w_hh.detach()
        h0 = None if h0 is None else h0.detach()
        b_ih = None if b_ih is None else b_ih.detach()
        b_hh = None if b_hh is None else b_hh.detach()
        output, h_last, parts, saved_gates = _run_forward(
            x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, reset_after, save=True
        )
        if len(parts) == 1:
            x = x.contiguous()  # the kernel's layout: the backward reads it without a copy
        # h_{t-1} is read back from the output and h0, so only the gates are extra memory.
        ctx.save_for_backward(x, h0, w_ih, w_hh, output)
        ctx.parts = parts
        ctx.saved_gates = saved_gates
        ctx.lengths = lengths
        ctx.reverse = reverse
        ctx.reset_after = reset_after
        return output, h_last

    @staticmethod
    @once_differentiable
    def backward(ctx, d_output, dh_last):
        x, h0, w_ih, w_hh, output = ctx.saved_tensors
        steps, batch, hidden = output.shape
        inputs = x.size(2)
        dtype = x.dtype
        if d_output is None:
            d_output = torch.zeros(steps, batch, hidden, dtype=dtype)
        if dh_last is None:
            dh_last = torch.zeros(batch, hidden, dtype=dtype)
        needs = ctx.needs_input_grad
        parts = ctx.parts
        if ctx.reset_after:
            kernel, recurrent = _backward_reset_after, (_array(w_hh),)
        else:
            kernel = _backward_reset_before
            recurrent = _row_blocks(w_hh, 2 * hidden)
        w_ih_blocks = _row_blocks(w_ih, 2 * hidden)
        length_array = _lengths_array(ctx.lengths, steps, batch)
        no_dx = None if needs[0] else torch.empty(1, 1, inputs, dtype=dtype)
        argument_lists, results = [], []
        for part, saved_gates in zip(parts, ctx.saved_gates, strict=True):
            size = part.stop - part.start
            # Each part writes its own weight gradients; they are summed after the run.
            part_dx = torch.empty(steps, size, inputs, dtype=dtype) if needs[0] else no_dx
            # A gradient nobody asks for (a frozen weight) is passed empty: not computed.
            bias_rows = 3 * hidden if needs[4] or needs[5] else 0
            result = (
                part_dx,
                torch.empty(*(w_ih.shape if needs[2] else (0, inputs)), dtype=dtype),
                torch.empty(*(w_hh.shape if needs[3] else (0, hidden)), dtype=dtype),
                torch.empty(bias_rows, dtype=dtype),
                torch.empty(bias_rows, dtype=dtype),
                torch.empty(size, hidden, dtype=dtype),
            )
            argument_lists.append(
                (
                    _batch_part(d_output, part, 1),
                    _batch_part(dh_last, part),
                    saved_gates,
                    _batch_part(output.detach(), part, 1),
                    _initial_state(h0, part, hidden, w_ih_blocks[0].dtype),
                    _part_rows(x, part),
                    *w_ih_blocks,
                    *recurrent,
                    _batch_part_array(length_array, part),
                    ctx.reverse,
                    needs[0],
                    result[0].numpy().reshape(-1, inputs),
                    *(tensor.numpy() for tensor in result[1:]),
                    _use_packing(steps),
                )
            )
            results.append(result)
        threads.run_concurrently(kernel, argument_lists)
        if len(parts) == 1:
            dx, dw_ih, dw_hh, db_ih, db_hh, dh0 = results[0]
        else:
            dx = torch.cat([result[0] for result in results], dim=1) if needs[0] else None
            dw_ih, dw_hh, db_ih, db_hh = (
                torch.stack([result[index] for result in results]).sum(0) for index in range(1, 5)
            )
            dh0 = torch.cat([result[5] for result in results])
        return (
            dx if needs[0] else None,
            dh0 if needs[1] else None,
            dw_ih if needs[2] else None,
            dw_hh if needs[3] else None,
            db_ih if needs[4] else None,
            db_hh if needs[5] else None,
            None,
            None,
            None,
        )


def run_direction(
    x: Tensor,
    state: tuple[Tensor] | None,
    weights: tuple[Tensor, Tensor, Tensor | None, Tensor | None],
    lengths: Tensor | None,
    reverse: bool,
    reset_after: bool = True,
) -> tuple[Tensor, tuple[Tensor]]:
    """(T, B, I) input, ((B, H),) state (None: zeros) -> (T, B, H) output, ((B, H),) final
    state."""
    h0 = None if state is None else state[0]
    w_ih, w_hh, b_ih, b_hh = weights
    steps, batch, inputs = x.shape
    hidden = w_hh.size(1)
    tensors = (x, h0, w_ih, w_hh, b_ih, b_hh)
    if batch == 0:
        # Nothing to run; zero-weighted sums keep every input in the graph (zero gradients).
        connection = sum(0 * t.sum() for t in tensors if t is not None)
        final = x.new_zeros(0, hidden) if h0 is None else h0
        return x.new_zeros(steps, 0, hidden) + connection, (final + connection,)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    reverse, reset_after = bool(reverse), bool(reset_after)
    if needs_grad:
        output, h_last = GRUFunction.apply(*tensors, lengths, reverse, reset_after)
        return output, (h_last,)
    detached = (None if t is None else t.detach() for t in (x, h0, w_ih, w_hh, b_ih, b_hh))
    output, h_last, *_ = _run_forward(*detached, lengths, reverse, reset_after, save=False)
    return output, (h_last,)


def warmup() -> None:
    """Compile (or load from numba's disk cache) every kernel for float32 and float64."""
    for dtype in (torch.float32, torch.float64):
        for reset_after in (True, False):
            x = torch.randn(2, 1, 3, dtype=dtype, requires_grad=True)
            h0 = torch.zeros(1, 4, dtype=dtype, requires_grad=True)
            w_ih = torch.randn(12, 3, dtype=dtype, requires_grad=True)
            w_hh = torch.randn(12, 4, dtype=dtype, requires_grad=True)
            output, (h_last,) = run_direction(
                x, (h0,), (w_ih, w_hh, None, None), None, False, reset_after
            )
            (output.sum() + h_last.sum()).backward()
            with torch.no_grad():
                run_direction(x, (h0,), (w_ih, w_hh, None, None), None, False, reset_after)
