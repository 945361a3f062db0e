"""Fused layer-normalised LSTM and GRU on the CPU: numba time loops, hand-derived BPTT.

The input side does not depend on the recurrence, so it runs over all T*B rows before the loop,
split over torch's threads: a_x = LN(X W_ih^T; gamma_ih, beta_ih), a chunk of rows at a time
(the product, then each row normalised while in cache), and in the backward the layer norm's
gradient, then dX = dP W_ih and dW_ih += dP^T X, likewise by chunks. The compiled loop does, per
step, the recurrent matmul h W_hh^T, its layer norm and the gate math (equations in
`rnnkit.cells.layer_norm`; products through `rnnkit.kernels.cpu.blas`), saving the normalised
recurrent pre-activations, their 1/std, the gate activations and (LSTM) the cell states with
their normalised values.

Backward of y = gamma * x^ + beta, x^ = (v - mean(v)) / std over n features, for one row:
    d gamma += dy x^,   d beta += dy,   dx^ = dy gamma
    dv = (dx^ - mean(dx^) - x^ mean(dx^ x^)) / std
LSTM, per step, with g_h = dL/dh (output + recurrent), y_c = LN(c), the gate activations i f g o:
    da_o = g_h tanh(y_c) o (1 - o),        dy_c = g_h o (1 - tanh(y_c)^2)
    dc = (recurrent dc) + LN backward of dy_c
    da_i = dc g i (1 - i),  da_f = dc c_prev f (1 - f),  da_g = dc i (1 - g^2),  recurrent dc = dc f
    da goes both to a_x (input side) and to LN(h W_hh^T): its LN backward gives dP_h, and
    recurrent dh = dP_h W_hh;  dW_hh = sum over steps of dP_h^T h_prev
GRU (reset-after), with a_h = LN(h W_hh^T):
    da_n = g_h (1 - z)(1 - n^2),  da_z = g_h (h_prev - n) z (1 - z),  da_r = da_n a_h,n r (1 - r)
    d a_x = [da_r, da_z, da_n],  d a_h = [da_r, da_z, da_n r],  recurrent dh = g_h z + dP_h W_hh

Recurrent dropout (training) and zoneout (rnnkit.variants.regularization; the derivation of
regularized.py): the masks are drawn once per direction by draw_masks, in the reference loop's
order, and zoneout's are indexed by processing step. The recurrent product takes hm = h * m, so
a_h = LN(hm W_hh^T) and dW_hh = sum of dP_h^T hm_prev (the GRU's carry z * h keeps the whole h);
h' = k h + (1 - k) h~ and c' = k_c c + (1 - k_c) c~, where the output's LN(c~) is saved, and c'
as the next step's c_prev. Backward, with g_h reaching h' and dc reaching c':
    dh~ = (1 - k) g_h,  dc~ = (1 - k_c) dc + the path through h~,  dc_prev = k_c dc + f dc~
    dh_prev = k g_h (+ z dh~ for the GRU) + (dP_h W_hh) * m
Masks that are off are empty arrays, and the loops skip their work (the unregularised path).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit
from torch import Tensor

from rnnkit.cells.layer_norm import LAYER_NORM_EPS
from rnnkit.kernels.cpu import blas, regularized, threads

# The GRU kernel's exp-based sigmoid and tanh vectorise where libm calls do not.
from rnnkit.kernels.cpu.gru import _sigmoid, _tanh

# The plain cells' regularised kernels' row helpers (recurrent dropout, zoneout's split).
from rnnkit.kernels.cpu.regularized import _drop_state, _keep_row, _split_by_zoneout
from rnnkit.spec import LayerSpec

_DTYPES = (torch.float32, torch.float64)
# A packed weight (panels.py, or MKL's) pays off from this many steps on (as in the GRU kernel).
_PACK_MIN_STEPS = 8

# error_model="numpy": no ZeroDivisionError checks, which would keep the loops from vectorising.
_jit = njit(cache=True, nogil=True, error_model="numpy")
# The normalisations' sums may be reassociated, so that they vectorise (LN-LSTM inference at
# B=32, T=100, H=128 measured 26.6 -> 18.4 ms).
_jit_sums = njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "contract"})


@_jit_sums
def _normalise(v, gain, shift, normalised, out):
    """out = gain * normalised + shift, normalised = (v - mean(v)) / std(v); returns 1 / std."""
    n = v.shape[0]
    mean = 0.0
    for j in range(n):
        mean += v[j]
    mean /= n
    variance = 0.0
    for j in range(n):
        centred = v[j] - mean
        variance += centred * centred
    inverse_std = 1.0 / math.sqrt(variance / n + LAYER_NORM_EPS)
    for j in range(n):
        value = (v[j] - mean) * inverse_std
        normalised[j] = value
        out[j] = gain[j] * value + shift[j]
    return inverse_std


@_jit_sums
def _normalise_backward(d_out, gain, normalised, inverse_std, d_v, d_gain, d_shift):
    """d_v = dL/dv of out = gain * normalised + shift; adds onto d_gain, d_shift (float64)."""
    n = d_out.shape[0]
    mean_d = 0.0
    mean_d_normalised = 0.0
    for j in range(n):
        d_normalised = d_out[j] * gain[j]
        d_gain[j] += d_out[j] * normalised[j]
        d_shift[j] += d_out[j]
        mean_d += d_normalised
        mean_d_normalised += d_normalised * normalised[j]
    mean_d /= n
    mean_d_normalised /= n
    for j in range(n):
        d_normalised = d_out[j] * gain[j]
        d_v[j] = inverse_std * (d_normalised - mean_d - normalised[j] * mean_d_normalised)


@_jit
def _keep_old(new, keep, old):
    """Zoneout of one row: new = k * old + (1 - k) * new, as new + k (old - new)."""
    for j in range(new.size):
        new[j] += keep[j] * (old[j] - new[j])


@_jit
def _carry_dropped(dh_row, through, m_row, add):
    """dh_row (H,) = (dh_row if `add` else 0) + through * m_row: the recurrent products'
    gradient reaches h_prev times the dropout mask."""
    if add:
        for j in range(dh_row.size):
            dh_row[j] += through[j] * m_row[j]
    else:
        for j in range(dh_row.size):
            dh_row[j] = through[j] * m_row[j]


# Rows of the input side are projected and normalised this many at a time, while they are in
# cache; the backward takes more rows at a time for its weight-gradient product.
_INPUT_CHUNK_ROWS = 64
_INPUT_BACKWARD_CHUNK_ROWS = 256
# The recurrent weight's gradient is accumulated over about this many rows at a time.
_BACKWARD_CHUNK_ROWS = 256


@_jit_sums
def _input_side_rows(x_rows, w_ih, gain, shift, a_x, pre, mean, inverse_std, save, first, last):
    """Rows first..last-1 of a_x (N, G) = LN(x_rows (N, I) @ w_ih^T; gain, shift), w_ih (G, I);
    with save also pre (N, G) = the product and each row's mean and 1/std (N,)."""
    width = w_ih.shape[0]
    work = blas.workspace(a_x)
    chunk = min(_INPUT_CHUNK_ROWS, last - first)
    weight, transposed, packed = blas.prepare_weight(chunk, w_ih, True, True, work)
    for start in range(first, last, chunk):
        stop = min(start + chunk, last)
        blas.gemm_weight(
            x_rows[start:stop], weight, transposed, packed, a_x[start:stop], False, work
        )
        for r in range(start, stop):
            row = a_x[r]
            if save:
                blas.copy_vector(row, pre[r])
            total = 0.0
            for j in range(width):
                total += row[j]
            row_mean = total / width
            variance = 0.0
            for j in range(width):
                centred = row[j] - row_mean
                variance += centred * centred
            row_inverse_std = 1.0 / math.sqrt(variance / width + LAYER_NORM_EPS)
            if save:
                mean[r] = row_mean
                inverse_std[r] = row_inverse_std
            for j in range(width):
                row[j] = gain[j] * ((row[j] - row_mean) * row_inverse_std) + shift[j]


@_jit_sums
def _input_side_backward_rows(
    d_a_x, pre, mean, inverse_std, gain, x_rows, w_ih, d_x, d_w_ih, d_gain, d_shift, first, last
):
    """Rows first..last-1 of the input side's backward. From d_a_x (N, G) = dL/da_x, a_x =
    LN(pre; gain, shift), with pre (N, G) and its rows' mean and 1/std (N,), x_rows (N, I) and
    w_ih (G, I): writes d_x (N, I) and adds onto d_w_ih (G, I), each skipped when empty, and
    onto the float64 d_gain, d_shift (G,)."""
    width = w_ih.shape[0]
    want_x = d_x.shape[0] > 0
    want_w = d_w_ih.shape[0] > 0
    work = blas.workspace(d_a_x)
    chunk = min(_INPUT_BACKWARD_CHUNK_ROWS, last - first)
    weight, transposed, packed = blas.prepare_weight(chunk, w_ih, False, True, work)
    d_pre = np.empty((chunk, width), d_a_x.dtype)
    for start in range(first, last, chunk):
        stop = min(start + chunk, last)
        for r in range(start, stop):
            d_out, row, out = d_a_x[r], pre[r], d_pre[r - start]
            row_mean, row_inverse_std = mean[r], inverse_std[r]
            mean_d = 0.0
            mean_d_normalised = 0.0
            for j in range(width):
                normalised = (row[j] - row_mean) * row_inverse_std
                d_normalised = d_out[j] * gain[j]
                d_gain[j] += d_out[j] * normalised
                d_shift[j] += d_out[j]
                mean_d += d_normalised
                mean_d_normalised += d_normalised * normalised
            mean_d /= width
            mean_d_normalised /= width
            for j in range(width):
                normalised = (row[j] - row_mean) * row_inverse_std
                d_normalised = d_out[j] * gain[j]
                out[j] = row_inverse_std * (d_normalised - mean_d - normalised * mean_d_normalised)
        rows = stop - start
        if want_x:
            blas.gemm_weight(d_pre[:rows], weight, transposed, packed, d_x[start:stop], False, work)
        if want_w:
            blas.gemm(d_pre[:rows], x_rows[start:stop], d_w_ih, True, False, True, work)


@_jit
def _lstm_forward(
    a_x, w_hh, g_hh, b_hh, g_c, b_c, h0, c0, lengths, reverse, mask, keep_h, keep_c, save,
    output, h_n, c_n, gates, h_normalised, h_inverse_std, cells, c_normalised, c_inverse_std,
    use_packing, first, last,
):  # fmt: skip
    """a_x (T, B, 4H) input side; w_hh (4H, H). Writes output (T, B, H), h_n, c_n (B, H) and,
    when `save`, per time position: gates (i, f, g, o activations), h_normalised (T, B, 4H),
    h_inverse_std (T, B), cells (the cell state after zoneout) and c_normalised (T, B, H),
    c_inverse_std (T, B). Without `save` those are (1, B, .) scratch. mask (B, H) is the
    recurrent dropout mask, keep_h, keep_c the zoneout weights ((T, B, H) indexed by step, or
    (1, 1, H)); each is empty ((0, ...)) when off. Only sequences first..last-1 are run."""
    steps, batch, width = a_x.shape
    hidden = width // 4
    dropping, zone_h, zone_c = mask.shape[0] > 0, keep_h.shape[0] > 0, keep_c.shape[0] > 0
    h = h0.copy()
    c = c0.copy()
    dropped = np.empty((batch if dropping else 0, hidden), dtype=h0.dtype)
    old_h, old_c = np.empty(hidden, dtype=h0.dtype), np.empty(hidden, dtype=h0.dtype)
    recurrent = np.empty((batch, width), dtype=h0.dtype)
    cell_out = np.empty(hidden, dtype=h0.dtype)
    work = blas.workspace(h0)
    rows = last - first
    weight, transposed, packed = blas.prepare_weight(rows, w_hh, True, use_packing, work)
    for s in range(steps):
        h_part, recurrent_part = h[first:last], recurrent[first:last]
        if dropping:
            h_part = dropped[first:last]
            _drop_state(h, mask, first, h_part)
        blas.gemm_weight(h_part, weight, transposed, packed, recurrent_part, False, work)
        for b in range(first, last):
            length = lengths[b]
            if s >= length:
                output[s, b, :] = 0
                if save:
                    gates[s, b, :] = 0
                    h_normalised[s, b, :] = 0
                    cells[s, b, :] = 0
                    c_normalised[s, b, :] = 0
                continue
            pos = length - 1 - s if reverse else s
            slot = pos if save else 0
            row = gates[slot, b]
            h_inverse_std[slot, b] = _normalise(
                recurrent[b], g_hh, b_hh, h_normalised[slot, b], row
            )
            x_row = a_x[pos, b]
            # Loops over slices from 0 vectorise; over range(2H, 3H) they measured slower.
            sigmoid_gates, sigmoid_x = row[: 2 * hidden], x_row[: 2 * hidden]
            for j in range(2 * hidden):
                sigmoid_gates[j] = _sigmoid(sigmoid_gates[j] + sigmoid_x[j])
            gate_i, gate_f = row[:hidden], row[hidden : 2 * hidden]
            gate_g, x_g = row[2 * hidden : 3 * hidden], x_row[2 * hidden : 3 * hidden]
            gate_o, x_o = row[3 * hidden :], x_row[3 * hidden :]
            for j in range(hidden):
                gate_g[j] = _tanh(gate_g[j] + x_g[j])
            for j in range(hidden):
                gate_o[j] = _sigmoid(gate_o[j] + x_o[j])
            cell = c[b]
            if zone_c:
                blas.copy_vector(cell, old_c)
            for j in range(hidden):
                cell[j] = gate_f[j] * cell[j] + gate_i[j] * gate_g[j]
            c_inverse_std[slot, b] = _normalise(cell, g_c, b_c, c_normalised[slot, b], cell_out)
            if zone_c:
                _keep_old(cell, _keep_row(keep_c, s, b), old_c)
            cells[slot, b, :] = cell
            h_row, out_row = h[b], output[pos, b]
            if zone_h:
                blas.copy_vector(h_row, old_h)
            for j in range(hidden):
                h_row[j] = gate_o[j] * _tanh(cell_out[j])
            if zone_h:
                _keep_old(h_row, _keep_row(keep_h, s, b), old_h)
            out_row[:] = h_row
    blas.copy_matrix(h[first:last], h_n[first:last])
    blas.copy_matrix(c[first:last], c_n[first:last])


@_jit
def _lstm_backward(
    grad_output, grad_h_n, grad_c_n, gates, h_normalised, h_inverse_std, cells, c_normalised,
    c_inverse_std, c0, w_hh, g_hh, g_c, b_c, lengths, reverse, mask, keep_h, keep_c, d_a_x,
    output, h0, d_g_hh, d_b_hh, d_g_c, d_b_c, d_w_hh, d_h0, d_c0, use_packing, first, last,
):  # fmt: skip
    """BPTT of _lstm_forward, with its masks. Writes d_a_x = dL/da_x (T, B, 4H), zero at
    padding, and d_h0, d_c0 (B, H); adds onto the float64 d_g_hh, d_b_hh (4H,) and d_g_c, d_b_c
    (H,), and onto d_w_hh (4H, H) (skipped when empty) the recurrent weight's gradient, from the
    forward's (T, B, H) output and h0 (B, H) (times the mask), a chunk of steps at a time. Only
    sequences first..last-1 (a part of the batch)."""
    steps, batch, width = d_a_x.shape
    hidden = width // 4
    dropping, zone_h, zone_c = mask.shape[0] > 0, keep_h.shape[0] > 0, keep_c.shape[0] > 0
    dh = grad_h_n.copy()
    dc = grad_c_n.copy()
    d_step = np.empty((batch, width), dtype=dh.dtype)
    dh_recurrent = np.empty((batch, hidden), dtype=dh.dtype)
    d_cell_out = np.empty(hidden, dtype=dh.dtype)
    d_cell = np.empty(hidden, dtype=dh.dtype)
    # With zoneout: dL/dh~ and dL/dc~ of the row, and a zero row to add to them.
    d_new_h = np.empty(hidden, dtype=dh.dtype)
    d_new_c = np.empty(hidden, dtype=dh.dtype)
    no_grad = np.zeros(hidden, dtype=dh.dtype)
    work = blas.workspace(dh)
    rows = last - first
    weight, transposed, packed = blas.prepare_weight(rows, w_hh, False, use_packing, work)
    want_w = d_w_hh.shape[0] > 0
    chunk_steps = max(1, min(steps, (_BACKWARD_CHUNK_ROWS + rows - 1) // rows))
    chunk_grads = np.empty((chunk_steps * rows if want_w else 0, width), dh.dtype)
    chunk_before = np.empty((chunk_steps * rows if want_w else 0, hidden), dh.dtype)
    filled = 0
    for s in range(steps - 1, -1, -1):
        for b in range(first, last):
            length = lengths[b]
            if s >= length:
                d_step[b, :] = 0
                d_a_x[s, b, :] = 0
                continue
            pos = length - 1 - s if reverse else s
            row = gates[pos, b]
            c_prev = c0[b] if s == 0 else cells[pos + 1 if reverse else pos - 1, b]
            normalised = c_normalised[pos, b]
            d_row = d_a_x[pos, b]
            dh_row, grad_row = dh[b], grad_output[pos, b]
            if zone_h:
                # dh_row becomes k (dh + grad), carried to h_prev; h~ gets the rest.
                _split_by_zoneout(grad_row, dh_row, _keep_row(keep_h, s, b), d_new_h)
                dh_row, grad_row = d_new_h, no_grad
            for j in range(hidden):
                g_h = dh_row[j] + grad_row[j]
                squashed = _tanh(g_c[j] * normalised[j] + b_c[j])
                o = row[3 * hidden + j]
                d_row[3 * hidden + j] = g_h * squashed * o * (1 - o)
                d_cell_out[j] = g_h * o * (1 - squashed * squashed)
            _normalise_backward(
                d_cell_out, g_c, normalised, c_inverse_std[pos, b], d_cell, d_g_c, d_b_c
            )
            dc_row = dc_new = dc[b]
            if zone_c:
                # dc_row becomes k_c dc, carried to c_prev; c~ gets the rest, in dc_new.
                _split_by_zoneout(no_grad, dc_row, _keep_row(keep_c, s, b), d_new_c)
                dc_new = d_new_c
            for j in range(hidden):
                total = dc_new[j] + d_cell[j]
                i, f, g = row[j], row[hidden + j], row[2 * hidden + j]
                d_row[j] = total * g * i * (1 - i)
                d_row[hidden + j] = total * c_prev[j] * f * (1 - f)
                d_row[2 * hidden + j] = total * i * (1 - g * g)
                dc_new[j] = total * f
            if zone_c:
                for j in range(hidden):
                    dc_row[j] += dc_new[j]
            _normalise_backward(
                d_row, g_hh, h_normalised[pos, b], h_inverse_std[pos, b], d_step[b], d_g_hh, d_b_hh
            )
        step_part, through_part = d_step[first:last], dh_recurrent[first:last]
        blas.gemm_weight(step_part, weight, transposed, packed, through_part, False, work)
        for b in range(first, last):
            if s >= lengths[b]:
                continue
            if dropping:
                _carry_dropped(dh[b], dh_recurrent[b], mask[b], zone_h)
            elif zone_h:
                dh[b, :] += dh_recurrent[b]
            else:
                dh[b, :] = dh_recurrent[b]
        if not want_w:
            continue
        # dW_hh = sum of dL/d(hm W_hh^T)^T hm_prev over rows; padding rows are zero.
        for b in range(first, last):
            slot = filled * rows + b - first
            blas.copy_vector(d_step[b], chunk_grads[slot])
            length = lengths[b]
            before = chunk_before[slot]
            if s >= length:
                before[:] = 0
                continue
            if s == 0:
                blas.copy_vector(h0[b], before)
            else:
                blas.copy_vector(output[length - s if reverse else s - 1, b], before)
            if dropping:
                m_row = mask[b]
                for j in range(hidden):
                    before[j] *= m_row[j]
        filled += 1
        if filled == chunk_steps or s == 0:
            count = filled * rows
            blas.gemm(chunk_grads[:count], chunk_before[:count], d_w_hh, True, False, True, work)
            filled = 0
    blas.copy_matrix(dh[first:last], d_h0[first:last])
    blas.copy_matrix(dc[first:last], d_c0[first:last])


@_jit
def _gru_forward(
    a_x, w_hh, g_hh, b_hh, h0, lengths, reverse, mask, keep, save, output, h_n, gates,
    h_normalised, h_inverse_std, use_packing, first, last,
):  # fmt: skip
    """a_x (T, B, 3H) input side; w_hh (3H, H). Writes output (T, B, H), h_n (B, H) and,
    when `save`, per time position: gates (r, z, n) (T, B, 3H), h_normalised (T, B, 3H),
    h_inverse_std (T, B). Without `save` those are (1, B, .) scratch. mask (B, H): recurrent
    dropout on h in the product only (z * h carries the whole h); keep: zoneout weights, (T, B,
    H) or (1, 1, H); each empty when off. Only sequences first..last-1 are run."""
    steps, batch, width = a_x.shape
    hidden = width // 3
    dropping, zone = mask.shape[0] > 0, keep.shape[0] > 0
    h = h0.copy()
    dropped = np.empty((batch if dropping else 0, hidden), dtype=h0.dtype)
    old_h = np.empty(hidden, dtype=h0.dtype)
    recurrent = np.empty((batch, width), dtype=h0.dtype)
    a_h = np.empty(width, dtype=h0.dtype)
    work = blas.workspace(h0)
    rows = last - first
    weight, transposed, packed = blas.prepare_weight(rows, w_hh, True, use_packing, work)
    for s in range(steps):
        h_part, recurrent_part = h[first:last], recurrent[first:last]
        if dropping:
            h_part = dropped[first:last]
            _drop_state(h, mask, first, h_part)
        blas.gemm_weight(h_part, weight, transposed, packed, recurrent_part, False, work)
        for b in range(first, last):
            length = lengths[b]
            if s >= length:
                output[s, b, :] = 0
                if save:
                    gates[s, b, :] = 0
                    h_normalised[s, b, :] = 0
                continue
            pos = length - 1 - s if reverse else s
            slot = pos if save else 0
            h_inverse_std[slot, b] = _normalise(
                recurrent[b], g_hh, b_hh, h_normalised[slot, b], a_h
            )
            x_row, row, h_row, out_row = a_x[pos, b], gates[slot, b], h[b], output[pos, b]
            if zone:
                blas.copy_vector(h_row, old_h)
            for j in range(hidden):
                r = _sigmoid(x_row[j] + a_h[j])
                z = _sigmoid(x_row[hidden + j] + a_h[hidden + j])
                n = _tanh(x_row[2 * hidden + j] + r * a_h[2 * hidden + j])
                value = n + z * (h_row[j] - n)
                row[j] = r
                row[hidden + j] = z
                row[2 * hidden + j] = n
                h_row[j] = value
                out_row[j] = value
            if zone:
                _keep_old(h_row, _keep_row(keep, s, b), old_h)
                blas.copy_vector(h_row, out_row)
    blas.copy_matrix(h[first:last], h_n[first:last])


@_jit
def _gru_backward(
    grad_output, grad_h_n, gates, h_normalised, h_inverse_std, output, h0, w_hh, g_hh, b_hh,
    lengths, reverse, mask, keep, d_a_x, d_recurrent, d_g_hh, d_b_hh, d_h0, use_packing, first,
    last,
):  # fmt: skip
    """BPTT of _gru_forward, with its masks. Writes d_a_x = dL/da_x and d_recurrent =
    dL/d(hm W_hh^T), both (T, B, 3H) and zero at padding, and d_h0 (B, H); adds onto the float64
    d_g_hh, d_b_hh. Only sequences first..last-1 (a part of the batch)."""
    steps, batch, width = d_a_x.shape
    hidden = width // 3
    dropping, zone = mask.shape[0] > 0, keep.shape[0] > 0
    # With zoneout: a zero row in place of the output's gradient, and k dh, zoneout's carry.
    no_grad = np.zeros(hidden, dtype=grad_h_n.dtype)
    kept = np.empty(hidden, dtype=grad_h_n.dtype)
    dh = grad_h_n.copy()
    d_step = np.empty((batch, width), dtype=dh.dtype)
    dh_recurrent = np.empty((batch, hidden), dtype=dh.dtype)
    d_a_h = np.empty(width, dtype=dh.dtype)
    work = blas.workspace(dh)
    rows = last - first
    weight, transposed, packed = blas.prepare_weight(rows, w_hh, False, use_packing, work)
    for s in range(steps - 1, -1, -1):
        for b in range(first, last):
            length = lengths[b]
            if s >= length:
                d_step[b, :] = 0
                d_a_x[s, b, :] = 0
                d_recurrent[s, b, :] = 0
                continue
            pos = length - 1 - s if reverse else s
            row, normalised = gates[pos, b], h_normalised[pos, b]
            h_prev = h0[b] if s == 0 else output[pos + 1 if reverse else pos - 1, b]
            d_row, dh_row, grad_row = d_a_x[pos, b], dh[b], grad_output[pos, b]
            if zone:
                # dh_row becomes (1 - k)(dh + grad), what reaches h~; kept: k (dh + grad).
                keep_row = _keep_row(keep, s, b)
                for j in range(hidden):
                    total = dh_row[j] + grad_row[j]
                    kept[j] = keep_row[j] * total
                    dh_row[j] = total - kept[j]
                grad_row = no_grad
            for j in range(hidden):
                g_h = dh_row[j] + grad_row[j]
                r, z, n = row[j], row[hidden + j], row[2 * hidden + j]
                a_h_n = g_hh[2 * hidden + j] * normalised[2 * hidden + j] + b_hh[2 * hidden + j]
                da_n = g_h * (1 - z) * (1 - n * n)
                da_z = g_h * (h_prev[j] - n) * z * (1 - z)
                da_r = da_n * a_h_n * r * (1 - r)
                d_row[j] = da_r
                d_row[hidden + j] = da_z
                d_row[2 * hidden + j] = da_n
                d_a_h[j] = da_r
                d_a_h[hidden + j] = da_z
                d_a_h[2 * hidden + j] = da_n * r
                dh_row[j] = g_h * z
            if zone:
                for j in range(hidden):
                    dh_row[j] += kept[j]
            _normalise_backward(
                d_a_h, g_hh, normalised, h_inverse_std[pos, b], d_step[b], d_g_hh, d_b_hh
            )
            d_recurrent[pos, b, :] = d_step[b]
        step_part, through_part = d_step[first:last], dh_recurrent[first:last]
        blas.gemm_weight(step_part, weight, transposed, packed, through_part, False, work)
        for b in range(first, last):
            if s < lengths[b]:
                if dropping:
                    _carry_dropped(dh[b], dh_recurrent[b], mask[b], True)
                else:
                    dh[b, :] += dh_recurrent[b]
    blas.copy_matrix(dh[first:last], d_h0[first:last])


# -- torch glue ---------------------------------------------------------------------------------


def _numpy(tensor: Tensor) -> np.ndarray:
    return tensor.detach().contiguous().numpy()


def _lengths_array(lengths: Tensor | None, steps: int, batch: int) -> np.ndarray:
    if lengths is None:
        return np.full(batch, steps, dtype=np.int64)
    return lengths.to(torch.int64).contiguous().numpy()


def _use_packing(steps: int) -> bool:
    return blas.PACKED_GEMM and steps >= _PACK_MIN_STEPS


def _shift(shift: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if shift is None else shift.detach()


# Below this many rows the input side runs on one thread.
_INPUT_SPLIT_ROWS = 256


def _input_side(x: Tensor, w_ih: Tensor, g_ih: Tensor, b_ih: Tensor | None, save: bool):
    """(T, B, I) -> a_x (T, B, G) = LN(x W_ih^T), compiled (panel product and normalisation a
    chunk of rows at a time, rows split over torch's threads); with save also (pre-activations
    (T*B, G), mean and 1/std (T*B, 1)) for the backward, else None."""
    steps, batch, features = x.shape
    width = w_ih.shape[0]
    rows = steps * batch
    a_x = x.new_empty(rows, width)
    pre = x.new_empty(rows if save else 0, width)
    mean, inverse_std = x.new_empty(rows if save else 0), x.new_empty(rows if save else 0)
    shared = (
        _numpy(x.contiguous().view(rows, features)), _numpy(w_ih), _numpy(g_ih),
        _numpy(_shift(b_ih, g_ih)), a_x.numpy(), pre.numpy(), mean.numpy(),
        inverse_std.numpy(), save,
    )  # fmt: skip
    parts = threads.concurrency() if rows >= _INPUT_SPLIT_ROWS else 1
    bounds = [rows * index // parts for index in range(parts + 1)]
    threads.run_concurrently(
        _input_side_rows, [(*shared, bounds[i], bounds[i + 1]) for i in range(parts)]
    )
    saved = (pre, mean.view(rows, 1), inverse_std.view(rows, 1)) if save else None
    return a_x.view(steps, batch, width), saved


def _input_side_backward(ctx, d_a_x: Tensor, x: Tensor, w_ih: Tensor, g_ih: Tensor, b_ih, saved):
    """Gradients of x, W_ih, gamma_ih, beta_ih from dL/da_x (T, B, G): the layer norm's backward
    and the two products a chunk of rows at a time, compiled, rows split over torch's threads."""
    steps, batch, features = x.shape
    width = w_ih.shape[0]
    rows = steps * batch
    pre, mean, inverse_std = saved
    needs = ctx.needs_input_grad
    empty = x.new_empty(0, 0).numpy()
    d_x = x.new_empty(steps, batch, features) if needs[0] else None
    shared = (
        _numpy(d_a_x).reshape(rows, width), _numpy(pre), _numpy(mean).reshape(rows),
        _numpy(inverse_std).reshape(rows), _numpy(g_ih), _numpy(x).reshape(rows, features),
        _numpy(w_ih), d_x.view(rows, features).numpy() if needs[0] else empty,
    )  # fmt: skip
    parts = threads.concurrency() if rows >= _INPUT_SPLIT_ROWS else 1
    bounds = [rows * index // parts for index in range(parts + 1)]
    sums = [
        (
            x.new_zeros(width, features) if needs[3] else None,
            np.zeros(width, np.float64),
            np.zeros(width, np.float64),
        )
        for _ in range(parts)
    ]
    calls = [
        (*shared, d_w.numpy() if d_w is not None else empty, d_gain, d_shift, start, stop)
        for (d_w, d_gain, d_shift), start, stop in zip(sums, bounds[:-1], bounds[1:])
    ]
    threads.run_concurrently(_input_side_backward_rows, calls)
    d_w_ih = sum(part[0] for part in sums) if needs[3] else None
    d_gain = torch.from_numpy(sum(part[1] for part in sums)).to(x.dtype)
    d_shift = torch.from_numpy(sum(part[2] for part in sums)).to(x.dtype)
    return d_x, d_w_ih, d_gain, d_shift


def _recurrent_weight_grad(
    d_recurrent: Tensor, output: Tensor, h0: Tensor, lengths: Tensor | None, reverse: bool
) -> Tensor:
    """dW_hh = sum over (t, b) of dP_h[t, b]^T h_prev[t, b], h_prev being the output one step
    earlier in processing order (h0 at each first step); padding rows of dP_h and padded outputs
    are zero, so the shifted product needs no mask."""
    steps, batch, width = d_recurrent.shape
    hidden = output.shape[2]
    if reverse:
        inner, before = d_recurrent[:-1], output[1:]
        first = (
            d_recurrent[steps - 1]
            if lengths is None
            else d_recurrent[lengths - 1, torch.arange(batch)]
        )
    else:
        inner, before = d_recurrent[1:], output[:-1]
        first = d_recurrent[0]
    grad = first.t() @ h0
    if steps > 1:
        grad.addmm_(inner.reshape(-1, width).t(), before.reshape(-1, hidden))
    return grad


# Sequences of a batch are independent: parts of it run concurrently on torch's threads
# (threads.py) once a part's per-step product is large enough to pay for fewer rows.
_MIN_PART = 4
_MIN_PART_STEP_WORK = 1 << 18


def _batch_parts(batch: int, w_hh: Tensor, steps: int) -> list[slice]:
    if blas.LIBRARY.startswith("OpenBLAS"):  # its own thread pool would compete with the parts
        return [slice(0, batch)]
    step_work = batch * w_hh.shape[0] * w_hh.shape[1]
    return threads.batch_parts(batch, step_work, _MIN_PART, _MIN_PART_STEP_WORK, steps)


def _run_parts(kernel, arguments: tuple, parts: list[slice], per_part=lambda: ()) -> list:
    """kernel(*arguments, *extra, first, last) for each part, concurrently; extra = per_part()
    gives each part its own accumulators, which are returned, one tuple per part."""
    extras = [per_part() for _ in parts]
    calls = [(*arguments, *extra, part.start, part.stop) for part, extra in zip(parts, extras)]
    threads.run_concurrently(kernel, calls)
    return extras


def _scratch(save: bool, steps: int, batch: int, width: int, like: Tensor) -> Tensor:
    return like.new_empty(steps if save else 1, batch, width)


def _lstm_run(
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, g_ih, g_hh, g_c, b_c, lengths, reverse, masks, save
):
    """output, h_n, c_n and the saved tensors (input side, then the loop's) as plain tensors;
    masks: (mask, keep_h, keep_c) as _mask_arrays gives them."""
    steps, batch, _ = x.shape
    hidden = w_hh.shape[1]
    a_x, input_saved = _input_side(x, w_ih, g_ih, b_ih, save)
    output = x.new_empty(steps, batch, hidden)
    h_n, c_n = x.new_empty(batch, hidden), x.new_empty(batch, hidden)
    loop_saved = (
        _scratch(save, steps, batch, 4 * hidden, x),
        _scratch(save, steps, batch, 4 * hidden, x),
        _scratch(save, steps, batch, 1, x).view(-1, batch),
        _scratch(save, steps, batch, hidden, x),
        _scratch(save, steps, batch, hidden, x),
        _scratch(save, steps, batch, 1, x).view(-1, batch),
    )
    arguments = (
        a_x.numpy(), _numpy(w_hh), _numpy(g_hh), _numpy(_shift(b_hh, g_hh)), _numpy(g_c),
        _numpy(_shift(b_c, g_c)), _numpy(h0), _numpy(c0), _lengths_array(lengths, steps, batch),
        reverse, *masks, save, output.numpy(), h_n.numpy(), c_n.numpy(),
        *(tensor.numpy() for tensor in loop_saved), _use_packing(steps),
    )  # fmt: skip
    _run_parts(_lstm_forward, arguments, _batch_parts(batch, w_hh, steps))
    return output, h_n, c_n, input_saved, loop_saved


class LayerNormLSTMDirection(torch.autograd.Function):
    """One direction of a layer-normalised LSTM layer: fused forward, hand-derived backward."""

    @staticmethod
    def forward(
        ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, g_ih, g_hh, g_c, b_c, lengths, reverse,
        mask=None, keep_h=None, keep_c=None,
    ):  # fmt: skip
        # mask (B, H), keep_h, keep_c ((T, B, H) or (1, 1, H)): see _kernel_masks; None: off.
        x, h0, c0, w_ih, w_hh, g_ih, g_hh, g_c = (
            t.detach() for t in (x, h0, c0, w_ih, w_hh, g_ih, g_hh, g_c)
        )
        b_ih, b_hh, b_c = (None if t is None else t.detach() for t in (b_ih, b_hh, b_c))
        masks = _mask_arrays((mask, keep_h, keep_c), x.dtype)
        output, h_n, c_n, input_saved, loop_saved = _lstm_run(
            x, h0, c0, w_ih, w_hh, b_ih, b_hh, g_ih, g_hh, g_c, b_c, lengths, reverse, masks,
            save=True,
        )  # fmt: skip
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, g_ih, g_hh, g_c, b_c, output)
        ctx.input_saved, ctx.loop_saved, ctx.masks = input_saved, loop_saved, masks
        ctx.lengths, ctx.reverse = lengths, reverse
        return output, h_n, c_n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output, grad_h_n, grad_c_n):
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, g_ih, g_hh, g_c, b_c, output = ctx.saved_tensors
        steps, batch, _ = x.shape
        hidden = w_hh.shape[1]
        needs = ctx.needs_input_grad
        d_a_x = x.new_empty(steps, batch, 4 * hidden)
        d_h0, d_c0 = x.new_empty(batch, hidden), x.new_empty(batch, hidden)
        arguments = (
            _numpy(grad_output), _numpy(grad_h_n), _numpy(grad_c_n),
            *(tensor.numpy() for tensor in ctx.loop_saved), _numpy(c0), _numpy(w_hh),
            _numpy(g_hh), _numpy(g_c), _numpy(_shift(b_c, g_c)),
            _lengths_array(ctx.lengths, steps, batch), ctx.reverse,
            *ctx.masks, d_a_x.numpy(), _numpy(output), _numpy(h0),
        )  # fmt: skip

        def accumulators():
            sums = (np.zeros(size, np.float64) for size in (4 * hidden, 4 * hidden, hidden, hidden))
            d_w_hh = x.new_zeros(4 * hidden, hidden) if needs[4] else x.new_empty(0, 0)
            return (*sums, d_w_hh.numpy())

        def tail(*sums):
            return (*sums, d_h0.numpy(), d_c0.numpy(), _use_packing(steps))

        parts = _batch_parts(batch, w_hh, steps)
        sums = _run_parts(_lstm_backward, arguments, parts, lambda: tail(*accumulators()))
        d_g_hh, d_b_hh, d_g_c, d_b_c = (
            torch.from_numpy(sum(extra[index] for extra in sums)) for index in range(4)
        )
        d_x, d_w_ih, d_g_ih, d_b_ih = _input_side_backward(
            ctx, d_a_x, x, w_ih, g_ih, b_ih, ctx.input_saved
        )
        d_w_hh = torch.from_numpy(sum(extra[4] for extra in sums)) if needs[4] else None
        dtype = x.dtype
        return (
            d_x,
            d_h0 if needs[1] else None,
            d_c0 if needs[2] else None,
            d_w_ih,
            d_w_hh,
            d_b_ih if b_ih is not None and needs[5] else None,
            d_b_hh.to(dtype) if b_hh is not None and needs[6] else None,
            d_g_ih if needs[7] else None,
            d_g_hh.to(dtype) if needs[8] else None,
            d_g_c.to(dtype) if needs[9] else None,
            d_b_c.to(dtype) if b_c is not None and needs[10] else None,
            *(None,) * 5,
        )


def _gru_run(x, h0, w_ih, w_hh, b_ih, b_hh, g_ih, g_hh, lengths, reverse, masks, save):
    """output, h_n and the saved tensors (input side, then the loop's) as plain tensors;
    masks: (mask, keep_h) as _mask_arrays gives them."""
    steps, batch, _ = x.shape
    hidden = w_hh.shape[1]
    a_x, input_saved = _input_side(x, w_ih, g_ih, b_ih, save)
    output = x.new_empty(steps, batch, hidden)
    h_n = x.new_empty(batch, hidden)
    loop_saved = (
        _scratch(save, steps, batch, 3 * hidden, x),
        _scratch(save, steps, batch, 3 * hidden, x),
        _scratch(save, steps, batch, 1, x).view(-1, batch),
    )
    arguments = (
        a_x.numpy(), _numpy(w_hh), _numpy(g_hh), _numpy(_shift(b_hh, g_hh)), _numpy(h0),
        _lengths_array(lengths, steps, batch), reverse, *masks, save, output.numpy(), h_n.numpy(),
        *(tensor.numpy() for tensor in loop_saved), _use_packing(steps),
    )  # fmt: skip
    _run_parts(_gru_forward, arguments, _batch_parts(batch, w_hh, steps))
    return output, h_n, input_saved, loop_saved


class LayerNormGRUDirection(torch.autograd.Function):
    """One direction of a layer-normalised GRU layer: fused forward, hand-derived backward."""

    @staticmethod
    def forward(
        ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, g_ih, g_hh, lengths, reverse, mask=None,
        keep_h=None,
    ):  # fmt: skip
        # c0 is unused (None): the argument order matches the LSTM's so that needs_input_grad
        # indices agree with _input_side_backward's. mask, keep_h: as the LSTM's; None: off.
        x, h0, w_ih, w_hh, g_ih, g_hh = (t.detach() for t in (x, h0, w_ih, w_hh, g_ih, g_hh))
        b_ih, b_hh = (None if t is None else t.detach() for t in (b_ih, b_hh))
        masks = _mask_arrays((mask, keep_h), x.dtype)
        output, h_n, input_saved, loop_saved = _gru_run(
            x, h0, w_ih, w_hh, b_ih, b_hh, g_ih, g_hh, lengths, reverse, masks, save=True
        )
        ctx.save_for_backward(x, h0, w_ih, w_hh, b_ih, b_hh, g_ih, g_hh, output)
        ctx.input_saved, ctx.loop_saved, ctx.masks = input_saved, loop_saved, masks
        ctx.lengths, ctx.reverse = lengths, reverse
        return output, h_n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output, grad_h_n):
        x, h0, w_ih, w_hh, b_ih, b_hh, g_ih, g_hh, output = ctx.saved_tensors
        steps, batch, _ = x.shape
        hidden = w_hh.shape[1]
        d_a_x = x.new_empty(steps, batch, 3 * hidden)
        d_recurrent = x.new_empty(steps, batch, 3 * hidden)
        d_h0 = x.new_empty(batch, hidden)
        arguments = (
            _numpy(grad_output), _numpy(grad_h_n), *(tensor.numpy() for tensor in ctx.loop_saved),
            _numpy(output), _numpy(h0), _numpy(w_hh), _numpy(g_hh), _numpy(_shift(b_hh, g_hh)),
            _lengths_array(ctx.lengths, steps, batch), ctx.reverse,
            *ctx.masks, d_a_x.numpy(), d_recurrent.numpy(),
        )  # fmt: skip

        def per_part():
            sums = (np.zeros(3 * hidden, np.float64), np.zeros(3 * hidden, np.float64))
            return (*sums, d_h0.numpy(), _use_packing(steps))

        sums = _run_parts(_gru_backward, arguments, _batch_parts(batch, w_hh, steps), per_part)
        d_g_hh, d_b_hh = (
            torch.from_numpy(sum(extra[index] for extra in sums)) for index in range(2)
        )
        needs = ctx.needs_input_grad
        d_x, d_w_ih, d_g_ih, d_b_ih = _input_side_backward(
            ctx, d_a_x, x, w_ih, g_ih, b_ih, ctx.input_saved
        )
        d_w_hh = None
        if needs[4]:
            mask = ctx.masks[0]
            if mask.size:  # the product saw hm = h * m
                mask = torch.from_numpy(mask)
                output, h0 = output * mask, h0 * mask
            d_w_hh = _recurrent_weight_grad(d_recurrent, output, h0, ctx.lengths, ctx.reverse)
        dtype = x.dtype
        return (
            d_x,
            d_h0 if needs[1] else None,
            None,
            d_w_ih,
            d_w_hh,
            d_b_ih if b_ih is not None and needs[5] else None,
            d_b_hh.to(dtype) if b_hh is not None and needs[6] else None,
            d_g_ih if needs[7] else None,
            d_g_hh.to(dtype) if needs[8] else None,
            *(None,) * 4,
        )


# Masks that are off reach the kernels as these empty arrays, made once: making them per call
# measured 4-6% of an unregularised call at B = 1, T = 100, H = 64.
_OFF = {
    dtype: (np.empty((0, 0), numpy_dtype), np.empty((0, 0, 0), numpy_dtype))
    for dtype, numpy_dtype in ((torch.float32, np.float32), (torch.float64, np.float64))
}


def _mask_arrays(masks: tuple, dtype: torch.dtype) -> tuple[np.ndarray, ...]:
    """(mask (B, H), keep_h[, keep_c]) as the kernels take them: arrays, None an empty one."""
    off_mask, off_keep = _OFF[dtype]
    return tuple(
        (off_mask if index == 0 else off_keep) if mask is None else _numpy(mask)
        for index, mask in enumerate(masks)
    )


def _kernel_masks(
    spec: LayerSpec, state: tuple[Tensor, ...], steps: int
) -> tuple[Tensor | None, ...]:
    """One direction's (mask, keep_h[, keep_c]) for the kernels: the (B, H) recurrent dropout
    mask and the zoneout weights, (T, B, H) in training or (1, 1, H) of the probability in eval,
    drawn by draw_masks in the reference loop's order; None for each one that is off."""
    if not regularized.active(spec):
        return (None,) * (1 + len(state))
    # Imported here: rnnkit.variants imports the layers, which import the kernels.
    from rnnkit.variants.regularization import draw_masks

    recurrent, zoneout = draw_masks(spec, state, steps)
    keeps = [
        torch.full((1, 1, part.size(1)), keep, dtype=part.dtype)
        if isinstance(keep, float)
        else keep
        for part, keep in zip(state, zoneout)
    ]
    return (recurrent, *keeps)


def _needs_grad(tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def run_direction(
    spec: LayerSpec,
    x: Tensor,
    state: tuple[Tensor, ...],
    weights: tuple[Tensor | None, ...],
    lengths: Tensor | None,
    reverse: bool,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """(T, B, I) input, ((B, H),) or ((B, H), (B, H)) state -> (T, B, H) output, final state,
    with the spec's recurrent dropout (training) and zoneout, masks drawn as the reference
    loop draws them."""
    lstm = spec.mode == "LN_LSTM"
    if x.size(1) == 0:
        from rnnkit.scan import scan_direction, step_function
        from rnnkit.variants.regularization import regularized_step

        step = regularized_step(step_function(spec), spec, state, x.size(0))
        return scan_direction(step, x, state, weights, lengths, reverse)
    reverse = bool(reverse)
    masks = _kernel_masks(spec, state, x.size(0))
    if lstm:
        h0, c0 = state
        if _needs_grad((x, *state, *weights)):
            output, h_n, c_n = LayerNormLSTMDirection.apply(
                x, h0, c0, *weights, lengths, reverse, *masks
            )
        else:
            detached = (None if t is None else t.detach() for t in (x, h0, c0, *weights))
            arrays = _mask_arrays(masks, x.dtype)
            output, h_n, c_n, *_ = _lstm_run(*detached, lengths, reverse, arrays, save=False)
        return output, (h_n, c_n)
    (h0,) = state
    if _needs_grad((x, h0, *weights)):
        output, h_n = LayerNormGRUDirection.apply(x, h0, None, *weights, lengths, reverse, *masks)
    else:
        detached = (None if t is None else t.detach() for t in (x, h0, *weights))
        arrays = _mask_arrays(masks, x.dtype)
        output, h_n, *_ = _gru_run(*detached, lengths, reverse, arrays, save=False)
    return output, (h_n,)


def warmup() -> None:
    """Compile (or load from numba's disk cache) both cells' kernels for float32 and float64."""
    for dtype in _DTYPES:
        for mode, gates in (("LN_LSTM", 4), ("LN_GRU", 3)):
            spec = LayerSpec(mode=mode, hidden_size=3)
            x = torch.randn(2, 2, 2, dtype=dtype, requires_grad=True)
            state = tuple(torch.zeros(2, 3, dtype=dtype) for _ in range(2 if gates == 4 else 1))
            weights = [
                torch.randn(gates * 3, 2, dtype=dtype),
                torch.randn(gates * 3, 3, dtype=dtype),
            ]
            weights += [torch.zeros(gates * 3, dtype=dtype)] * 2 + [
                torch.ones(gates * 3, dtype=dtype)
            ] * 2
            if gates == 4:
                weights += [torch.ones(3, dtype=dtype), torch.zeros(3, dtype=dtype)]
            output, final = run_direction(
                spec, x, state, tuple(weights), torch.tensor([2, 1]), True
            )
            (output.sum() + sum(part.sum() for part in final)).backward()
