"""Fused CPU kernels for RNN, LSTM and GRU with recurrent dropout and zoneout inside the loop.

The regularisers of rnnkit.variants.regularization that change each step, per direction:
    hm = h * m                  variational (recurrent) dropout: one (B, H) mask m per sequence,
                                on h where it enters the recurrent products (training only)
    h' = k * h + (1 - k) * h~   zoneout: k a fresh 0/1 mask per step in training (its
    c' = k_c * c + (1 - k_c) * c~          probability p in eval), h~ and c~ the cell's new state
The GRU carries the whole h in z * h (only its products see hm). The cell equations are those of
lstm.py, gru.py and rnn.py. Backward per step, given dh (and dc) reaching h' (and c'):
    dh~ = (1 - k) dh,  dc~ = (1 - k_c) dc (+ the LSTM's path through h~)
    the cell's own gate gradients dpre from dh~ (and dc~), as in its plain kernel
    dh_prev = k dh (+ z dh~ for the GRU) + (dpre_rec @ W_hh) * m,  dc_prev = k_c dc + f dc~
and dW_hh = sum over steps of dpre_rec^T hm (r * hm for the GRU's candidate when the reset comes
before its product), one matmul over all T * B rows after the loop. The kernels walk in
processing order (a backward direction's sequences reversed within their lengths), so the masks
are drawn in the reference loop's order (rnnkit.scan) and give the same numbers for the same
seed. As in lstm.py, each kernel projects the input a chunk of steps at a time into a buffer
that stays in cache until the steps add their recurrent products, reading each sequence's step
at its time position; the projection's gradients are one matmul each in RegularizedFunction's
backward, which puts a backward direction's gradients back in time order.

As in the plain kernels, the per-step products take a weight packed once per call (`blas`:
rnnkit's AVX-512 panels for float32, else MKL), and with several torch threads and a large
enough per-step product the batch runs as parts whose time loops run concurrently on torch's
OpenMP threads (`threads`), each on its rows of the shared arrays.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit
from torch import Tensor
from torch.autograd.function import once_differentiable

from rnnkit.kernels.cpu import blas, threads
from rnnkit.kernels.cpu.indrnn import _array
from rnnkit.kernels.cpu.lstm import _gate_activations, _sigmoid, _tanh
from rnnkit.kernels.cpu.projection import input_plan, step_projection
from rnnkit.scan import reverse_padded
from rnnkit.spec import LayerSpec

_jit = njit(cache=True, nogil=True, error_model="numpy")
_inline = njit(cache=True, nogil=True, error_model="numpy", inline="always")
CELLS = ("RNN_TANH", "RNN_RELU", "LSTM", "GRU")
# Packing a weight costs about as much as a few products with it (as in the plain kernels).
_PACK_MIN_STEPS = 8
# A part's per-step product must be large enough to pay for the lower efficiency of fewer rows
# (threads.batch_parts; the plain GRU and RNN kernels' thresholds).
_MIN_PART = 4
_MIN_PART_STEP_WORK = 1 << 17


# ---------------------------------------------------------------------------------------------
# The compiled loops. Each runs the sequences first..last-1 of the batch (one part) on its rows
# of the shared (T, B, ...) arrays; h, c, dh, dc are (B, H) and updated in place.


@_inline
def _keep_row(keep, step, sequence):
    """The (H,) zoneout weights of a step and sequence: keep is (T, B, H), or (1, 1, H) when
    they are the same everywhere (eval, or no zoneout)."""
    if keep.shape[0] == 1 and keep.shape[1] == 1:
        return keep[0, 0]
    return keep[step, sequence]


@_inline
def _drop_state(h, mask, first, hm):
    """hm (B', H) = h * m on rows first.. of (B, H) h and m."""
    for b in range(hm.shape[0]):
        h_row, m_row, hm_row = h[first + b], mask[first + b], hm[b]
        for j in range(hm_row.size):
            hm_row[j] = h_row[j] * m_row[j]


@_inline
def _split_by_zoneout(d_out, dh, keep, d_new):
    """One row, backward: d_new = (1 - k) (d_out + dh) reaches the cell's new state, and dh
    becomes k (d_out + dh), what zoneout carries straight to the previous state."""
    for j in range(dh.size):
        total = d_out[j] + dh[j]
        kept = keep[j] * total
        d_new[j] = total - kept
        dh[j] = kept


@_inline
def _zoneout_rows(d_out, dh, keep, lengths, step, first, d_new, step_d):
    """A step of a part's rows, backward through zoneout: d_new[b] = (1 - k) (dL/dout + dh)
    reaches the cell's new state and dh keeps k (dL/dout + dh); a row padded at this step gets
    d_new[b] = 0 and step_d[b] = 0, its pre-activations' gradient."""
    for b in range(d_new.shape[0]):
        sequence = first + b
        if step >= lengths[sequence]:
            d_new[b, :] = 0
            step_d[b, :] = 0
            continue
        _split_by_zoneout(
            d_out[step, sequence], dh[sequence], _keep_row(keep, step, sequence), d_new[b]
        )


@_inline
def _add_dropped(dh, recurrent, mask, lengths, step, first):
    """dh[first + b] += recurrent[b] * m[first + b] on the rows valid at this step: the gradient
    through the recurrent products, which saw the dropped state h * m."""
    for b in range(recurrent.shape[0]):
        sequence = first + b
        if step < lengths[sequence]:
            dh_row, r_row, m_row = dh[sequence], recurrent[b], mask[sequence]
            for j in range(dh_row.size):
                dh_row[j] += r_row[j] * m_row[j]


@_inline
def _zone_out(state, keep, new):
    """state = k * state + (1 - k) * new, as new + k (state - new)."""
    for j in range(state.size):
        state[j] = new[j] + keep[j] * (state[j] - new[j])


@_jit
def _rnn_forward(
    x, w_ih, bias, reverse, h, w_hh, lengths, mask, keep, relu, use_packing, first, last, out,
    cand, hm_all,
):  # fmt: skip
    """x (T, B, I), W_ih (H, I), bias (H,); h (B, H): h0 in, h_n out; saves the activations h~
    in cand and hm per step."""
    steps, _, hidden = out.shape
    batch = last - first
    work = blas.workspace(x)
    plan = input_plan(x, w_ih, steps, batch, use_packing, work)
    hh, hh_transposed, packed = blas.prepare_weight(batch, w_hh, True, use_packing, work)
    for s in range(steps):
        step_xp = step_projection(x, plan, bias, lengths, reverse, s, first, work)
        hm = hm_all[s, first:last]
        _drop_state(h, mask, first, hm)
        step_cand = cand[s, first:last]
        blas.gemm_weight(hm, hh, hh_transposed, packed, step_cand, False, work)
        for b in range(batch):
            sequence = first + b
            if s >= lengths[sequence]:
                out[s, sequence, :] = 0
                continue
            new, pre = step_cand[b], step_xp[b]
            if relu:
                for j in range(hidden):
                    value = new[j] + pre[j]
                    new[j] = value if value > 0 else value * 0  # NaN stays NaN
            else:
                for j in range(hidden):
                    new[j] = _tanh(new[j] + pre[j])
            _zone_out(h[sequence], _keep_row(keep, s, sequence), new)
            blas.copy_vector(h[sequence], out[s, sequence])


@_jit
def _rnn_backward(
    d_out, dh, w_hh, lengths, mask, keep, relu, cand, use_packing, first, last, d_pre
):
    """dh: dL/dh_n in, dL/dh0 out; d_pre (T, B, H): dL/d(pre-activation), zero at padding."""
    steps, _, hidden = d_out.shape
    batch = last - first
    work = blas.workspace(d_out)
    hh, hh_transposed, packed = blas.prepare_weight(batch, w_hh, False, use_packing, work)
    one = blas.one_like(d_out)
    d_new = np.empty((batch, hidden), d_out.dtype)
    recurrent = np.empty((batch, hidden), d_out.dtype)
    for s in range(steps - 1, -1, -1):
        step_d = d_pre[s, first:last]
        _zoneout_rows(d_out, dh, keep, lengths, s, first, d_new, step_d)
        for b in range(batch):
            sequence = first + b
            if s >= lengths[sequence]:
                continue
            new, d_row, d_new_row = cand[s, sequence], step_d[b], d_new[b]
            if relu:
                for j in range(hidden):
                    d_row[j] = d_new_row[j] if new[j] > 0 else d_new_row[j] * 0
            else:
                for j in range(hidden):
                    d_row[j] = d_new_row[j] * (one - new[j] * new[j])
        blas.gemm_weight(step_d, hh, hh_transposed, packed, recurrent, False, work)
        _add_dropped(dh, recurrent, mask, lengths, s, first)


@_jit
def _lstm_forward(
    x, w_ih, bias, reverse, h, c, w_hh, w_hr, lengths, mask, keep_h, keep_c, use_packing, first,
    last, out, gates, tanh_cand, c_prev, hm_all, projected_all,
):  # fmt: skip
    """x (T, B, I), W_ih (4H, I) and bias (4H,) in torch's gate order (i, f, g, o); h (B, P),
    c (B, H): initial in, final out; w_hr (P, H), or (0, 0) without a projection (P = H). Saves
    the gate activations, tanh(c~), the cell each step started from, hm, and (with a projection)
    o * tanh(c~), the projection's input, in projected_all (T, B, H)."""
    steps, _, hidden = c_prev.shape
    batch = last - first
    project = w_hr.shape[0] > 0
    work = blas.workspace(x)
    plan = input_plan(x, w_ih, steps, batch, use_packing, work)
    hh, hh_transposed, packed = blas.prepare_weight(batch, w_hh, True, use_packing, work)
    hr, hr_transposed, hr_packed = blas.prepare_weight(batch, w_hr, True, use_packing, work)
    new_c = np.empty(hidden, x.dtype)
    # The new h before zoneout: o * tanh(c~), then (with a projection) its product with W_hr.
    unprojected = np.empty((batch, hidden), x.dtype)
    new_h = np.empty((batch, h.shape[1]), x.dtype) if project else unprojected
    for s in range(steps):
        step_xp = step_projection(x, plan, bias, lengths, reverse, s, first, work)
        hm = hm_all[s, first:last]
        _drop_state(h, mask, first, hm)
        step_gates = gates[s, first:last]
        blas.gemm_weight(hm, hh, hh_transposed, packed, step_gates, False, work)
        step_unprojected = projected_all[s, first:last] if project else unprojected
        for b in range(batch):
            sequence = first + b
            if s >= lengths[sequence]:
                out[s, sequence, :] = 0
                step_unprojected[b, :] = 0  # a product input: no stale values
                continue
            # Loops over whole rows from 0, each writing one array, so that LLVM vectorises them.
            row, pre = step_gates[b], step_xp[b]
            for k in range(row.size):
                row[k] += pre[k]
            _gate_activations(row, hidden)
            gate_i, gate_f = row[:hidden], row[hidden : 2 * hidden]
            gate_g, gate_o = row[2 * hidden : 3 * hidden], row[3 * hidden :]
            c_row, tanh_row, u_row = c[sequence], tanh_cand[s, sequence], step_unprojected[b]
            blas.copy_vector(c_row, c_prev[s, sequence])
            for j in range(hidden):
                new_c[j] = gate_f[j] * c_row[j] + gate_i[j] * gate_g[j]
            for j in range(hidden):
                tanh_row[j] = _tanh(new_c[j])
            for j in range(hidden):
                u_row[j] = gate_o[j] * tanh_row[j]
            _zone_out(c_row, _keep_row(keep_c, s, sequence), new_c)
        if project:
            blas.gemm_weight(step_unprojected, hr, hr_transposed, hr_packed, new_h, False, work)
        for b in range(batch):
            sequence = first + b
            if s < lengths[sequence]:
                _zone_out(h[sequence], _keep_row(keep_h, s, sequence), new_h[b])
                blas.copy_vector(h[sequence], out[s, sequence])


@_jit
def _lstm_backward(
    d_out, dh, dc, w_hh, w_hr, lengths, mask, keep_h, keep_c, gates, tanh_cand, c_prev,
    use_packing, first, last, d_pre, d_projected_all,
):  # fmt: skip
    """dh (B, P), dc (B, H): dL/d(h_n, c_n) in, dL/d(h0, c0) out; d_pre (T, B, 4H), zero at
    padding; with a projection (w_hr (P, H)), d_projected_all (T, B, P) gets dL/d(W_hr u) of
    every step (zero at padding), for dW_hr."""
    steps, _, hidden = c_prev.shape
    batch = last - first
    project = w_hr.shape[0] > 0
    work = blas.workspace(d_out)
    hh, hh_transposed, packed = blas.prepare_weight(batch, w_hh, False, use_packing, work)
    hr, hr_transposed, hr_packed = blas.prepare_weight(batch, w_hr, False, use_packing, work)
    one = blas.one_like(d_out)
    d_new_c = np.empty(hidden, d_out.dtype)
    # dL/d(the new h before zoneout), then (with a projection) through W_hr to o * tanh(c~).
    d_unprojected = np.empty((batch, hidden), d_out.dtype)
    recurrent = np.empty((batch, dh.shape[1]), d_out.dtype)
    for s in range(steps - 1, -1, -1):
        step_d = d_pre[s, first:last]
        step_d_new_h = d_projected_all[s, first:last] if project else d_unprojected
        _zoneout_rows(d_out, dh, keep_h, lengths, s, first, step_d_new_h, step_d)
        if project:
            blas.gemm_weight(step_d_new_h, hr, hr_transposed, hr_packed, d_unprojected, False, work)
        for b in range(batch):
            sequence = first + b
            if s >= lengths[sequence]:
                continue
            row, tanh_row, c_before = (
                gates[s, sequence],
                tanh_cand[s, sequence],
                c_prev[s, sequence],
            )
            d_u = d_unprojected[b]
            gate_i, gate_f = row[:hidden], row[hidden : 2 * hidden]
            gate_g, gate_o = row[2 * hidden : 3 * hidden], row[3 * hidden :]
            keep, dc_row, d_row = _keep_row(keep_c, s, sequence), dc[sequence], step_d[b]
            for j in range(hidden):
                t = tanh_row[j]
                d_new_c[j] = (one - keep[j]) * dc_row[j] + d_u[j] * gate_o[j] * (one - t * t)
            for j in range(hidden):
                dc_row[j] = keep[j] * dc_row[j] + d_new_c[j] * gate_f[j]
            d_i, d_f = d_row[:hidden], d_row[hidden : 2 * hidden]
            d_g, d_o = d_row[2 * hidden : 3 * hidden], d_row[3 * hidden :]
            for j in range(hidden):
                d_i[j] = d_new_c[j] * gate_g[j] * gate_i[j] * (one - gate_i[j])
            for j in range(hidden):
                d_f[j] = d_new_c[j] * c_before[j] * gate_f[j] * (one - gate_f[j])
            for j in range(hidden):
                d_g[j] = d_new_c[j] * gate_i[j] * (one - gate_g[j] * gate_g[j])
            for j in range(hidden):
                d_o[j] = d_u[j] * tanh_row[j] * gate_o[j] * (one - gate_o[j])
        blas.gemm_weight(step_d, hh, hh_transposed, packed, recurrent, False, work)
        _add_dropped(dh, recurrent, mask, lengths, s, first)


@_jit
def _gru_forward(
    x, w_ih, bias, reverse, h, w_hh, w_rz, w_n, b_hn, lengths, mask, keep, reset_after,
    use_packing, first, last, out, gates, hm_all, rhm_all,
):  # fmt: skip
    """x (T, B, I), W_ih (3H, I), bias (3H,) in torch's gate order (r, z, n); w_rz, w_n: W_hh's
    two row blocks.

    Saves r, z, n and (reset_after) hn = hm W_hn^T + b_hn in gates (T, B, 4H), hm, and (reset
    before the product) r * hm.
    """
    steps, _, hidden = out.shape
    batch = last - first
    work = blas.workspace(x)
    plan = input_plan(x, w_ih, steps, batch, use_packing, work)
    # reset_after: one product with the whole W_hh; else one with W_rz, then one with W_n.
    hh, hh_transposed, packed = blas.prepare_weight(
        batch, w_hh if reset_after else w_rz, True, use_packing, work
    )
    hn_weight, hn_transposed, hn_packed = blas.prepare_weight(
        batch, w_n[:0] if reset_after else w_n, True, use_packing, work
    )
    one = blas.one_like(x)
    recurrent = np.empty((batch, 3 * hidden), x.dtype)
    for s in range(steps):
        step_xp = step_projection(x, plan, bias, lengths, reverse, s, first, work)
        hm = hm_all[s, first:last]
        _drop_state(h, mask, first, hm)
        columns = 3 * hidden if reset_after else 2 * hidden
        blas.gemm_weight(hm, hh, hh_transposed, packed, recurrent[:, :columns], False, work)
        for b in range(batch):
            sequence = first + b
            row, pre, rec = gates[s, sequence], step_xp[b], recurrent[b]
            rz = row[: 2 * hidden]
            for k in range(2 * hidden):
                rz[k] = _sigmoid(pre[k] + rec[k])
        if not reset_after:
            rhm = rhm_all[s, first:last]
            for b in range(batch):
                sequence = first + b
                gate_r, hm_row, rhm_row = gates[s, sequence, :hidden], hm[b], rhm[b]
                if s >= lengths[sequence]:
                    rhm_row[:] = 0  # its products are never read, but dW_n sums 0 * rhm
                    continue
                for j in range(hidden):
                    rhm_row[j] = gate_r[j] * hm_row[j]
            n_part = recurrent[:, 2 * hidden :]
            blas.gemm_weight(rhm, hn_weight, hn_transposed, hn_packed, n_part, False, work)
        for b in range(batch):
            sequence = first + b
            if s >= lengths[sequence]:
                out[s, sequence, :] = 0
                continue
            row, pre = gates[s, sequence], step_xp[b, 2 * hidden :]
            rec_n = recurrent[b, 2 * hidden :]
            gate_r, gate_z = row[:hidden], row[hidden : 2 * hidden]
            gate_n, hn = row[2 * hidden : 3 * hidden], row[3 * hidden :]
            if reset_after:
                for j in range(hidden):
                    hn[j] = rec_n[j] + b_hn[j]
                for j in range(hidden):
                    gate_n[j] = _tanh(pre[j] + gate_r[j] * hn[j])
            else:
                for j in range(hidden):
                    gate_n[j] = _tanh(pre[j] + rec_n[j])
            h_row, k = h[sequence], _keep_row(keep, s, sequence)
            for j in range(hidden):
                new = (one - gate_z[j]) * gate_n[j] + gate_z[j] * h_row[j]
                h_row[j] = new + k[j] * (h_row[j] - new)
            blas.copy_vector(h_row, out[s, sequence])


@_jit
def _gru_backward(
    d_out, dh, w_rz, w_n, lengths, mask, keep, reset_after, gates, out, h0, hm_all, use_packing,
    first, last, d_pre,
):  # fmt: skip
    """dh: dL/dh_n in, dL/dh0 out; out (T, B, H) the forward output and h0 (B, H), whence the
    state each step started from; d_pre (T, B, 4H): d(r, z, n pre-activations) and, with
    reset_after, d(hn); zero at padding."""
    steps, _, hidden = d_out.shape
    batch = last - first
    work = blas.workspace(d_out)
    rz, rz_transposed, rz_packed = blas.prepare_weight(batch, w_rz, False, use_packing, work)
    wn, wn_transposed, wn_packed = blas.prepare_weight(batch, w_n, False, use_packing, work)
    one = blas.one_like(d_out)
    d_new_rows = np.empty((batch, hidden), d_out.dtype)
    recurrent = np.empty((batch, hidden), d_out.dtype)
    d_rhm = np.empty((batch, hidden), d_out.dtype)
    for s in range(steps - 1, -1, -1):
        step_d = d_pre[s, first:last]
        _zoneout_rows(d_out, dh, keep, lengths, s, first, d_new_rows, step_d)
        for b in range(batch):
            sequence = first + b
            if s >= lengths[sequence]:
                continue
            d_new = d_new_rows[b]
            row, d_row, dh_row = gates[s, sequence], step_d[b], dh[sequence]
            h_prev = out[s - 1, sequence] if s > 0 else h0[sequence]
            gate_r, gate_z = row[:hidden], row[hidden : 2 * hidden]
            gate_n, hn = row[2 * hidden : 3 * hidden], row[3 * hidden :]
            d_r, d_z = d_row[:hidden], d_row[hidden : 2 * hidden]
            d_n, d_hn = d_row[2 * hidden : 3 * hidden], d_row[3 * hidden :]
            for j in range(hidden):
                d_n[j] = d_new[j] * (one - gate_z[j]) * (one - gate_n[j] * gate_n[j])
            for j in range(hidden):
                d_z[j] = d_new[j] * (h_prev[j] - gate_n[j]) * gate_z[j] * (one - gate_z[j])
            for j in range(hidden):
                dh_row[j] += d_new[j] * gate_z[j]
            if reset_after:
                for j in range(hidden):
                    d_r[j] = d_n[j] * hn[j] * gate_r[j] * (one - gate_r[j])
                for j in range(hidden):
                    d_hn[j] = d_n[j] * gate_r[j]
        if reset_after:
            blas.gemm_weight(
                step_d[:, : 2 * hidden], rz, rz_transposed, rz_packed, recurrent, False, work
            )
            d_hn_part = step_d[:, 3 * hidden :]
            blas.gemm_weight(d_hn_part, wn, wn_transposed, wn_packed, recurrent, True, work)
        else:
            d_n_part = step_d[:, 2 * hidden : 3 * hidden]
            blas.gemm_weight(d_n_part, wn, wn_transposed, wn_packed, d_rhm, False, work)
            for b in range(batch):
                sequence = first + b
                if s < lengths[sequence]:
                    gate_r, d_r = gates[s, sequence, :hidden], step_d[b, :hidden]
                    hm_row, d_rhm_row = hm_all[s, sequence], d_rhm[b]
                    for j in range(hidden):
                        d_r[j] = d_rhm_row[j] * hm_row[j] * gate_r[j] * (one - gate_r[j])
            blas.gemm_weight(
                step_d[:, : 2 * hidden], rz, rz_transposed, rz_packed, recurrent, False, work
            )
            for b in range(batch):
                gate_r, rec, d_rhm_row = gates[s, first + b, :hidden], recurrent[b], d_rhm[b]
                for j in range(hidden):
                    rec[j] += d_rhm_row[j] * gate_r[j]
        _add_dropped(dh, recurrent, mask, lengths, s, first)


# ---------------------------------------------------------------------------------------------
# torch glue.


# The kernels' stand-in for an absent array (no projection), per dtype; saved for the backward,
# so never an inference tensor, even when this module is first imported under inference_mode.
with torch.inference_mode(False):
    _EMPTY = {dtype: torch.empty(0, 0, 0, dtype=dtype) for dtype in (torch.float32, torch.float64)}


def _projection(w_hr: Tensor | None, dtype: torch.dtype) -> np.ndarray:
    """W_hr (P, H) as the LSTM kernels take it: (0, 0) without a projection."""
    return np.empty((0, 0), _EMPTY[dtype].numpy().dtype) if w_hr is None else _array(w_hr)


def _rows(tensor: Tensor) -> Tensor:
    """(T, B, K) -> (T * B, K)."""
    return tensor.reshape(-1, tensor.size(-1))


def _batch_parts(batch: int, step_work: int, steps: int) -> list[slice]:
    """Slices of the batch whose time loops run concurrently (see threads.batch_parts)."""
    if blas.LIBRARY.startswith("OpenBLAS"):  # its own thread pool would compete with the parts
        return [slice(0, batch)]
    return threads.batch_parts(batch, step_work, _MIN_PART, _MIN_PART_STEP_WORK, steps)


def _run(kernel, arguments: tuple, parts: list[slice], out: tuple) -> None:
    """kernel(*arguments, use_packing, first, last, *out) for each part, concurrently."""
    threads.run_concurrently(kernel, [(*arguments, part.start, part.stop, *out) for part in parts])


def active(spec: LayerSpec) -> bool:
    """Whether the spec's recurrent dropout (training) or zoneout acts inside the loop."""
    return (spec.training and spec.recurrent_dropout > 0) or any(spec.zoneout)


class RegularizedFunction(torch.autograd.Function):
    """One direction's recurrence with its masks: (T, B, G*H) projections -> (T, B, H) output."""

    @staticmethod
    def forward(
        ctx, x, w_ih, b_ih, b_hh, h0, c0, w_hh, w_hr, lengths, reverse, mask, keep_h, keep_c,
        mode, reset_after,
    ):  # fmt: skip
        steps, batch, _ = x.shape
        hidden = w_hh.size(1)  # the state's size: the LSTM's projection size when it has one
        dtype = x.dtype
        bias, b_hn = _input_bias(w_ih, b_ih, b_hh, mode == "GRU" and reset_after)
        projection = (_array(x), _array(w_ih), _array(bias), reverse)
        h = h0.detach().clone(memory_format=torch.contiguous_format)
        out = torch.empty(steps, batch, hidden, dtype=dtype)
        hm = torch.empty(steps, batch, hidden, dtype=dtype)
        w = _array(w_hh)
        parts = _batch_parts(batch, batch * w.shape[0] * hidden, steps)
        use_packing = blas.PACKED_GEMM and steps >= _PACK_MIN_STEPS
        lengths_array = lengths.numpy()
        masks = (_array(mask), _array(keep_h))
        if mode == "LSTM":
            cell = w_hh.size(0) // 4
            c = c0.detach().clone(memory_format=torch.contiguous_format)
            gates = torch.empty(steps, batch, 4 * cell, dtype=dtype)
            tanh_cand = torch.empty(steps, batch, cell, dtype=dtype)
            c_prev = torch.empty_like(tanh_cand)
            # With a projection, its input o * tanh(c~) of every step, for dW_hr.
            projected = torch.empty_like(tanh_cand) if w_hr is not None else _EMPTY[dtype]
            arguments = (
                *projection, h.numpy(), c.numpy(), w, _projection(w_hr, dtype), lengths_array,
                *masks, _array(keep_c),
            )  # fmt: skip
            results = (out, gates, tanh_cand, c_prev, hm, projected)
            saved = (gates, tanh_cand, c_prev, projected, w_hr)
            kernel = _lstm_forward
        elif mode == "GRU":
            c = None
            gates = torch.empty(steps, batch, 4 * hidden, dtype=dtype)
            rhm = torch.empty(steps if not reset_after else 0, batch, hidden, dtype=dtype)
            arguments = (
                *projection, h.numpy(), w, w[: 2 * hidden], w[2 * hidden :],
                _array(b_hn) if b_hn is not None else np.zeros(hidden, w.dtype),
                lengths_array, *masks, reset_after,
            )  # fmt: skip
            results = (out, gates, hm, rhm)
            saved = (gates, h0.detach(), out, rhm)
            kernel = _gru_forward
        else:
            c = None
            cand = torch.empty_like(out)
            arguments = (
                *projection, h.numpy(), w, lengths_array, *masks, mode == "RNN_RELU",
            )  # fmt: skip
            results = (out, cand, hm)
            saved = (cand,)
            kernel = _rnn_forward
        _run(kernel, (*arguments, use_packing), parts, tuple(t.numpy() for t in results))
        ctx.mode, ctx.reset_after, ctx.parts, ctx.use_packing = (
            mode,
            reset_after,
            parts,
            use_packing,
        )
        ctx.reverse, ctx.has_bias = reverse, b_ih is not None
        ctx.save_for_backward(x, w_ih, w_hh, lengths, mask, keep_h, keep_c, hm, *saved)
        return (reverse_padded(out, lengths) if reverse else out), h, c

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_h_n, d_c_n):
        x, w_ih, w_hh, lengths, mask, keep_h, keep_c, hm, *saved = ctx.saved_tensors
        steps, batch, hidden = hm.shape
        dtype = hm.dtype
        if d_out is None:
            d_out = torch.zeros_like(hm)
        elif ctx.reverse:
            d_out = reverse_padded(d_out.to(dtype), lengths)
        else:
            d_out = d_out.to(dtype).contiguous()
        dh = torch.zeros(batch, hidden, dtype=dtype)
        if d_h_n is not None:
            dh.copy_(d_h_n)
        w = _array(w_hh)
        lengths_array = lengths.numpy()
        masks = (_array(mask), _array(keep_h))
        d_pre = torch.empty(
            steps, batch, w_hh.size(0) if ctx.mode != "GRU" else 4 * hidden, dtype=dtype
        )
        dc = None
        d_b_hn = None
        d_w_hr = None
        results = (d_pre,)
        if ctx.mode == "LSTM":
            gates, tanh_cand, c_prev, projected, w_hr = saved
            dc = torch.zeros(batch, tanh_cand.size(2), dtype=dtype)
            if d_c_n is not None:
                dc.copy_(d_c_n)
            arguments = (
                d_out.numpy(), dh.numpy(), dc.numpy(), w, _projection(w_hr, dtype), lengths_array,
                *masks, _array(keep_c), gates.numpy(), tanh_cand.numpy(), c_prev.numpy(),
            )  # fmt: skip
            d_projected = torch.empty_like(hm) if w_hr is not None else _EMPTY[dtype]
            results = (d_pre, d_projected)
            kernel = _lstm_backward
        elif ctx.mode == "GRU":
            gates, h0, out, rhm = saved
            arguments = (
                d_out.numpy(), dh.numpy(), w[: 2 * hidden], w[2 * hidden :], lengths_array,
                *masks, ctx.reset_after, gates.numpy(), out.numpy(), _array(h0), hm.numpy(),
            )  # fmt: skip
            kernel = _gru_backward
        else:
            (cand,) = saved
            arguments = (
                d_out.numpy(), dh.numpy(), w, lengths_array, *masks, ctx.mode == "RNN_RELU",
                cand.numpy(),
            )  # fmt: skip
            kernel = _rnn_backward
        _run(kernel, (*arguments, ctx.use_packing), ctx.parts, tuple(t.numpy() for t in results))
        # Only the gradients asked for: a frozen parameter's product is skipped.
        need = ctx.needs_input_grad
        hm_rows = _rows(hm)
        d_w_hh = None
        need_bias = ctx.has_bias and (need[2] or need[3])
        if ctx.mode == "GRU":
            d_xp = d_pre[..., : 3 * hidden]
            if ctx.reset_after:
                d_n, n_input = d_pre[..., 3 * hidden :], hm_rows
                d_b_hn = d_n.sum((0, 1)) if need_bias else None
            else:
                d_n, n_input = d_pre[..., 2 * hidden : 3 * hidden], _rows(saved[3])
            if need[6]:
                d_w_hh = torch.empty_like(w_hh)
                torch.mm(_rows(d_pre[..., : 2 * hidden]).T, hm_rows, out=d_w_hh[: 2 * hidden])
                torch.mm(_rows(d_n).T, n_input, out=d_w_hh[2 * hidden :])
        else:
            d_xp = d_pre
            if need[6]:
                d_w_hh = _rows(d_pre).T @ hm_rows
            if ctx.mode == "LSTM" and saved[4] is not None and need[7]:
                d_w_hr = _rows(d_projected).T @ _rows(saved[3])
        if ctx.reverse:
            d_xp = reverse_padded(d_xp, lengths)
        d_x = d_xp @ w_ih if need[0] else None
        d_w_ih = _rows(d_xp).T @ _rows(x) if need[1] else None
        d_b_ih = d_b_hh = None
        if need_bias:
            d_b_ih = d_xp.sum((0, 1))
            if ctx.mode == "GRU" and ctx.reset_after:
                d_b_hh = torch.cat([d_b_ih[: 2 * hidden], d_b_hn])
            else:
                d_b_hh = d_b_ih.clone()
        return (
            d_x, d_w_ih, d_b_ih, d_b_hh, dh, dc, d_w_hh, d_w_hr,
            None, None, None, None, None, None, None,
        )  # fmt: skip


def _masks(spec: LayerSpec, state: tuple[Tensor, ...], steps: int):
    """(B, H) recurrent mask and zoneout keep weights for h and c, as the kernels take them:
    (T, B, H) drawn as the reference loop draws them, or (1, 1, H) where the same everywhere."""
    from rnnkit.variants.regularization import draw_masks

    recurrent, zoneout = draw_masks(spec, state, steps)
    mask = torch.ones_like(state[0]) if recurrent is None else recurrent
    keeps = []
    for part, keep in zip(state, zoneout):
        if keep is None or isinstance(keep, float):
            keep = torch.full((1, 1, part.size(1)), keep or 0.0, dtype=part.dtype)
        keeps.append(keep)
    return mask, keeps[0], keeps[-1]


def run_direction(
    spec: LayerSpec,
    x: Tensor,
    state: tuple[Tensor, ...],
    weights: tuple[Tensor | None, ...],
    lengths: Tensor | None,
    reverse: bool,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """(T, B, I) input, (h0,) or (h0, c0) -> (T, B, H) output, final state, with the spec's
    recurrent dropout and zoneout."""
    mode = "RNN" if spec.mode.startswith("RNN") else spec.mode
    if spec.mode not in CELLS:
        raise ValueError(f"no regularised kernel for {spec.mode}")
    w_ih, w_hh, b_ih, b_hh = weights[:4]
    w_hr = weights[4] if mode == "LSTM" and spec.proj_size > 0 else None
    reset_after = mode == "GRU" and spec.reset_after
    h0, c0 = state[0], (state[1] if mode == "LSTM" else None)
    mask, keep_h, keep_c = _masks(spec, tuple(state), x.size(0))
    if lengths is None:
        kernel_lengths = torch.full((x.size(1),), x.size(0), dtype=torch.int64)
    else:
        kernel_lengths = lengths.to("cpu", torch.int64).contiguous()
    output, h_n, c_n = RegularizedFunction.apply(
        x, w_ih, b_ih, b_hh, h0, c0, w_hh, w_hr, kernel_lengths, reverse, mask, keep_h, keep_c,
        spec.mode, reset_after,
    )  # fmt: skip
    return output, ((h_n, c_n) if mode == "LSTM" else (h_n,))


def _input_bias(
    w_ih: Tensor, b_ih: Tensor | None, b_hh: Tensor | None, reset_after: bool
) -> tuple[Tensor, Tensor | None]:
    """The (G*H,) bias added to the input projection: the biases that are purely additive; and
    the GRU's b_hn (inside r * (...)) when the reset comes after its product, else None."""
    if b_ih is None:
        return w_ih.new_zeros(w_ih.size(0)), None
    bias = (b_ih + b_hh).detach()
    if not reset_after:
        return bias, None
    hidden = w_ih.size(0) // 3
    bias[2 * hidden :] = b_ih[2 * hidden :]
    return bias, b_hh[2 * hidden :]


def warmup() -> None:
    """Compile (or load from numba's disk cache) every kernel here for float32 and float64."""
    from rnnkit.layers import GRU, LSTM, RNN

    cells = [(LSTM, {}), (GRU, {}), (GRU, {"reset_after": False}), (RNN, {})]
    for dtype in (torch.float32, torch.float64):
        for layer_class, options in cells:
            layer = layer_class(
                2, 3, backend="cpu", dtype=dtype, recurrent_dropout=0.2, zoneout=0.1, **options
            )
            output, _ = layer(torch.randn(2, 1, 2, dtype=dtype))
            output.sum().backward()
