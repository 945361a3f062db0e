"""Fused LSTM in Triton: one recurrent kernel over all steps, backward through time by hand.

Forward per step, rows b of one program, gates in torch's order (i, f, g, o):
    pre = xp[t] + h @ W_hh^T        xp = x @ W_ih^T + b_ih + b_hh for all steps at once (torch)
    c' = sigmoid(f) * c + sigmoid(i) * tanh(g),  h' = sigmoid(o) * tanh(c')
Backward per step (dh includes the output's gradient, dc the carried cell gradient):
    dc~ = dc + dh * o * (1 - tanh(c')^2)
    dpre = (dc~ * g * i(1-i), dc~ * c * f(1-f), dc~ * i * (1-g^2), dh * tanh(c') * o(1-o))
    dh_prev = dpre @ W_hh,  dc_prev = dc~ * f
and the weight gradients as matmuls over all T * B rows: dW_ih = dpre^T x, dW_hh = dpre^T h_prev.
Two kernel pairs run these equations: the slice kernels where a program's slice of W_hh fits on
chip (hidden size up to 256; _common.slice_plan), else the split kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from rnnkit.kernels.gpu._common import (
    InLoop,
    accumulate_dtype,
    add_rows_times_gate_weights_t,
    add_rows_times_weight,
    device_lengths,
    dot_precision,
    empty_like_nothing,
    flat,
    in_loop_arguments,
    keep_weight,
    launch_if_it_fits,
    plan_launch,
    prefetch_slices,
    previous_states,
    regularizers_do_not_fit,
    sigmoid,
    slice_plan,
    slice_tiles,
    step_tile,
    sync_programs,
    tanh,
    time_index,
    weight_slice,
    zone_out,
)

GATES = 4


@triton.jit(do_not_specialize=["T", "B"])
def lstm_forward_kernel(
    xp_ptr,  # (T, B, 4H) input projection with both biases
    w_hh_ptr,  # (4H, H)
    lengths_ptr,  # (B,) int32
    h_buf_ptr,  # (2, B, H) accumulate dtype: ping-pong hidden state, [0] holds h0
    c_ptr,  # (B, H) accumulate dtype: c0 on entry, final c on exit
    out_ptr,  # (T, B, H)
    gates_ptr,  # (T, B, 4H) activated gates, written when SAVE
    cells_ptr,  # (T, B, H) c after each step, written when SAVE
    counter_ptr,  # (batch tiles,) int32 zeros: barrier arrivals when SPLIT
    T,
    B,
    H,
    REVERSE: tl.constexpr,
    SAVE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    SPLIT: tl.constexpr,
):
    acc_dtype = h_buf_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    lengths = tl.load(lengths_ptr + rows, mask=row_ok, other=0)
    counter = counter_ptr + tl.program_id(0)
    programs = tl.num_programs(1)
    first_col = tl.program_id(1) * BLOCK_N
    arrivals = programs * 0
    for step in range(T):
        time = time_index(step, lengths, REVERSE)
        valid = row_ok & (step < lengths)
        source = (step % 2) * B * H
        target = ((step + 1) % 2) * B * H
        h_rows = source + rows * H
        x_rows = (time * B + rows) * (4 * H)
        for n_start in range(first_col, H, programs * BLOCK_N):
            cols = n_start + tl.arange(0, BLOCK_N)
            col_ok = cols < H
            mask = row_ok[:, None] & col_ok[None, :]
            x_tile = xp_ptr + x_rows[:, None] + cols[None, :]
            pre_i = tl.load(x_tile, mask=mask, other=0.0).to(acc_dtype)
            pre_f = tl.load(x_tile + H, mask=mask, other=0.0).to(acc_dtype)
            pre_g = tl.load(x_tile + 2 * H, mask=mask, other=0.0).to(acc_dtype)
            pre_o = tl.load(x_tile + 3 * H, mask=mask, other=0.0).to(acc_dtype)
            pre_i, pre_f, pre_g, pre_o = add_rows_times_gate_weights_t(
                pre_i,
                pre_f,
                pre_g,
                pre_o,
                h_buf_ptr,
                h_rows,
                row_ok,
                H,
                w_hh_ptr,
                H,
                cols,
                col_ok,
                4,
                BLOCK_K,
                PRECISION,
            )
            gate_i = sigmoid(pre_i)
            gate_f = sigmoid(pre_f)
            gate_g = tanh(pre_g)
            gate_o = sigmoid(pre_o)
            state_offsets = rows[:, None] * H + cols[None, :]
            c_prev = tl.load(c_ptr + state_offsets, mask=mask, other=0.0)
            c_new = gate_f * c_prev + gate_i * gate_g
            h_new = gate_o * tanh(c_new)
            keep = valid[:, None] & col_ok[None, :]
            tl.store(c_ptr + state_offsets, c_new, mask=keep)
            h_prev = tl.load(
                h_buf_ptr + source + state_offsets, mask=mask, other=0.0, cache_modifier=".cg"
            )
            tl.store(h_buf_ptr + target + state_offsets, tl.where(keep, h_new, h_prev), mask=mask)
            out_offsets = (time * B + rows)[:, None] * H + cols[None, :]
            h_out = tl.where(keep, h_new, 0.0)
            tl.store(out_ptr + out_offsets, h_out.to(out_ptr.dtype.element_ty), mask=mask)
            if SAVE:
                gate_tile = gates_ptr + x_rows[:, None] + cols[None, :]
                tl.store(gate_tile, gate_i, mask=keep)
                tl.store(gate_tile + H, gate_f, mask=keep)
                tl.store(gate_tile + 2 * H, gate_g, mask=keep)
                tl.store(gate_tile + 3 * H, gate_o, mask=keep)
                tl.store(cells_ptr + out_offsets, c_new, mask=keep)
        arrivals = sync_programs(counter, arrivals, programs, SPLIT)


@triton.jit(do_not_specialize=["T", "B"])
def lstm_backward_kernel(
    dout_ptr,  # (T, B, H) accumulate dtype
    dh_buf_ptr,  # (2, B, H): ping-pong hidden gradient, [0] holds dh_n; dh0 on exit at [T % 2]
    dc_ptr,  # (B, H): dc_n on entry, dc0 on exit
    gates_ptr,  # (T, B, 4H) saved activated gates
    cells_ptr,  # (T, B, H) saved cells
    c0_ptr,  # (B, H) accumulate dtype
    w_hh_ptr,  # (4H, H)
    lengths_ptr,
    dpre_ptr,  # (T, B, 4H) out: gradient of the gate pre-activations (zero at padding)
    counter_ptr,  # (batch tiles,) int32 zeros: barrier arrivals when SPLIT
    T,
    B,
    H,
    REVERSE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    SPLIT: tl.constexpr,
):
    acc_dtype = dh_buf_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    lengths = tl.load(lengths_ptr + rows, mask=row_ok, other=0)
    counter = counter_ptr + tl.program_id(0)
    programs = tl.num_programs(1)
    first_col = tl.program_id(1) * BLOCK_N
    arrivals = programs * 0
    for back in range(T):
        step = T - 1 - back
        time = time_index(step, lengths, REVERSE)
        time_prev = time_index(step - 1, lengths, REVERSE)
        valid = row_ok & (step < lengths)
        source = (back % 2) * B * H
        target = ((back + 1) % 2) * B * H
        gate_rows = (time * B + rows) * (4 * H)
        for n_start in range(first_col, H, programs * BLOCK_N):
            cols = n_start + tl.arange(0, BLOCK_N)
            col_ok = cols < H
            mask = row_ok[:, None] & col_ok[None, :]
            keep = valid[:, None] & col_ok[None, :]
            state_offsets = rows[:, None] * H + cols[None, :]
            out_offsets = (time * B + rows)[:, None] * H + cols[None, :]
            dh = tl.load(
                dh_buf_ptr + source + state_offsets, mask=mask, other=0.0, cache_modifier=".cg"
            )
            dh += tl.load(dout_ptr + out_offsets, mask=keep, other=0.0)
            dc = tl.load(dc_ptr + state_offsets, mask=mask, other=0.0)
            gate_tile = gates_ptr + gate_rows[:, None] + cols[None, :]
            gate_i = tl.load(gate_tile, mask=keep, other=0.0)
            gate_f = tl.load(gate_tile + H, mask=keep, other=0.0)
            gate_g = tl.load(gate_tile + 2 * H, mask=keep, other=0.0)
            gate_o = tl.load(gate_tile + 3 * H, mask=keep, other=0.0)
            tanh_c = tanh(tl.load(cells_ptr + out_offsets, mask=keep, other=0.0))
            prev_offsets = (time_prev * B + rows)[:, None] * H + cols[None, :]
            has_prev = keep & (step + lengths * 0 > 0)[:, None]
            c_prev = tl.load(cells_ptr + prev_offsets, mask=has_prev, other=0.0)
            c_first = tl.load(c0_ptr + state_offsets, mask=keep & ~has_prev, other=0.0)
            c_prev = tl.where(has_prev, c_prev, c_first)
            dc_total = dc + dh * gate_o * (1.0 - tanh_c * tanh_c)
            d_i = dc_total * gate_g * gate_i * (1.0 - gate_i)
            d_f = dc_total * c_prev * gate_f * (1.0 - gate_f)
            d_g = dc_total * gate_i * (1.0 - gate_g * gate_g)
            d_o = dh * tanh_c * gate_o * (1.0 - gate_o)
            dpre_tile = dpre_ptr + gate_rows[:, None] + cols[None, :]
            zero = tl.zeros((BLOCK_B, BLOCK_N), dtype=acc_dtype)
            tl.store(dpre_tile, tl.where(keep, d_i, zero), mask=mask)
            tl.store(dpre_tile + H, tl.where(keep, d_f, zero), mask=mask)
            tl.store(dpre_tile + 2 * H, tl.where(keep, d_g, zero), mask=mask)
            tl.store(dpre_tile + 3 * H, tl.where(keep, d_o, zero), mask=mask)
            tl.store(dc_ptr + state_offsets, dc_total * gate_f, mask=keep)
        arrivals = sync_programs(counter, arrivals, programs, SPLIT)
        for m_start in range(first_col, H, programs * BLOCK_N):
            cols = m_start + tl.arange(0, BLOCK_N)
            col_ok = cols < H
            mask = row_ok[:, None] & col_ok[None, :]
            keep = valid[:, None] & col_ok[None, :]
            state_offsets = rows[:, None] * H + cols[None, :]
            dh_prev = tl.zeros((BLOCK_B, BLOCK_N), dtype=acc_dtype)
            dh_prev = add_rows_times_weight(
                dh_prev,
                dpre_ptr,
                gate_rows,
                row_ok,
                4 * H,
                w_hh_ptr,
                0,
                H,
                cols,
                col_ok,
                BLOCK_K,
                PRECISION,
            )
            dh_old = tl.load(
                dh_buf_ptr + source + state_offsets, mask=mask, other=0.0, cache_modifier=".cg"
            )
            tl.store(
                dh_buf_ptr + target + state_offsets, tl.where(keep, dh_prev, dh_old), mask=mask
            )
        arrivals = sync_programs(counter, arrivals, programs, SPLIT)


@triton.jit(do_not_specialize=["T", "B"])
def lstm_slice_forward_kernel(
    xp_ptr,  # (T, B, 4H) input projection with both biases
    w_hh_ptr,  # (4H, H)
    lengths_ptr,  # (B,) int32
    h_buf_ptr,  # (2, B, H) accumulate dtype: ping-pong hidden state, [0] holds h0
    c_ptr,  # (B, H) accumulate dtype: c0 on entry, final c on exit
    out_ptr,  # (T, B, H)
    gates_ptr,  # (T, B, 4H) activated gates, written when SAVE
    cells_ptr,  # (T, B, H) c after each step, written when SAVE
    counter_ptr,  # (batch tiles,) int32 zeros: barrier arrivals when SPLIT
    mask_ptr,  # (B, H) recurrent dropout mask, read when DROPOUT
    keep_h_ptr,  # zoneout of h: (T, B, H) 0/1 mask by processing step (ZONEOUT 1), (1,) p (2)
    keep_c_ptr,  # zoneout of c, likewise (ZONEOUT_C)
    cand_c_ptr,  # (T, B, H) c~ before zoneout, written when ZONEOUT_C and SAVE
    T,
    B,
    H,
    REVERSE: tl.constexpr,
    SAVE: tl.constexpr,
    DROPOUT: tl.constexpr,
    ZONEOUT: tl.constexpr,
    ZONEOUT_C: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PRECISION: tl.constexpr,
    SPLIT: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """lstm_forward_kernel with one unit tile a program and its W_hh slice held across steps;
    with the in-loop regularisers the products see h * m, and c' = c~ + k_c (c - c~),
    h' = h~ + k_h (h - h~) (kernels/cpu/regularized.py's equations). `cells` saves c'.
    PREFETCH loads each step's input projection tiles one step ahead (they do not depend on h)."""
    acc_dtype = h_buf_ptr.dtype.element_ty
    rows, row_ok, lengths, counter, programs, cols, col_ok, units, unit_ok = slice_tiles(
        lengths_ptr, counter_ptr, B, H, BLOCK_B, BLOCK_N, BLOCK_H
    )
    w_i = weight_slice(w_hh_ptr, 0, cols, col_ok, units, unit_ok, H, True)
    w_f = weight_slice(w_hh_ptr, 1, cols, col_ok, units, unit_ok, H, True)
    w_g = weight_slice(w_hh_ptr, 2, cols, col_ok, units, unit_ok, H, True)
    w_o = weight_slice(w_hh_ptr, 3, cols, col_ok, units, unit_ok, H, True)
    mask = row_ok[:, None] & col_ok[None, :]
    state_offsets = rows[:, None] * H + cols[None, :]
    c = tl.load(c_ptr + state_offsets, mask=mask, other=0.0)
    h_own = tl.load(h_buf_ptr + state_offsets, mask=mask, other=0.0)
    all_units = row_ok[:, None] & unit_ok[None, :]
    if DROPOUT:
        dropout = tl.load(mask_ptr + rows[:, None] * H + units[None, :], mask=all_units, other=0.0)
    if PREFETCH:
        next_i = step_tile(xp_ptr, 0, T, lengths, rows, cols, mask, B, 4 * H, REVERSE)
        next_f = step_tile(xp_ptr, 0, T, lengths, rows, cols + H, mask, B, 4 * H, REVERSE)
        next_g = step_tile(xp_ptr, 0, T, lengths, rows, cols + 2 * H, mask, B, 4 * H, REVERSE)
        next_o = step_tile(xp_ptr, 0, T, lengths, rows, cols + 3 * H, mask, B, 4 * H, REVERSE)
    arrivals = programs * 0
    for step in range(T):
        time = time_index(step, lengths, REVERSE)
        valid = row_ok & (step < lengths)
        keep = valid[:, None] & col_ok[None, :]
        source = (step % 2) * B * H
        target = ((step + 1) % 2) * B * H
        x_rows = (time * B + rows) * (4 * H)
        if PREFETCH:
            pre_i, pre_f, pre_g, pre_o = next_i, next_f, next_g, next_o
            upcoming = step + 1
            next_i = step_tile(xp_ptr, upcoming, T, lengths, rows, cols, mask, B, 4 * H, REVERSE)
            next_f = step_tile(
                xp_ptr, upcoming, T, lengths, rows, cols + H, mask, B, 4 * H, REVERSE
            )
            next_g = step_tile(
                xp_ptr, upcoming, T, lengths, rows, cols + 2 * H, mask, B, 4 * H, REVERSE
            )
            next_o = step_tile(
                xp_ptr, upcoming, T, lengths, rows, cols + 3 * H, mask, B, 4 * H, REVERSE
            )
        else:
            x_tile = xp_ptr + x_rows[:, None] + cols[None, :]
            pre_i = tl.load(x_tile, mask=mask, other=0.0)
            pre_f = tl.load(x_tile + H, mask=mask, other=0.0)
            pre_g = tl.load(x_tile + 2 * H, mask=mask, other=0.0)
            pre_o = tl.load(x_tile + 3 * H, mask=mask, other=0.0)
        h = tl.load(
            h_buf_ptr + source + rows[:, None] * H + units[None, :],
            mask=all_units,
            other=0.0,
            cache_modifier=".cg",
        )
        if DROPOUT:
            h = h * dropout
        h = h.to(w_i.dtype)
        pre_i = pre_i.to(acc_dtype)
        pre_f = pre_f.to(acc_dtype)
        pre_g = pre_g.to(acc_dtype)
        pre_o = pre_o.to(acc_dtype)
        pre_i = tl.dot(h, w_i, pre_i, input_precision=PRECISION, out_dtype=acc_dtype)
        pre_f = tl.dot(h, w_f, pre_f, input_precision=PRECISION, out_dtype=acc_dtype)
        pre_g = tl.dot(h, w_g, pre_g, input_precision=PRECISION, out_dtype=acc_dtype)
        pre_o = tl.dot(h, w_o, pre_o, input_precision=PRECISION, out_dtype=acc_dtype)
        gate_i = sigmoid(pre_i)
        gate_f = sigmoid(pre_f)
        gate_g = tanh(pre_g)
        gate_o = sigmoid(pre_o)
        c_cand = gate_f * c + gate_i * gate_g
        h_new = gate_o * tanh(c_cand)
        c_new = c_cand
        if ZONEOUT_C != 0:
            c_new = zone_out(c, c_cand, keep_c_ptr, step, rows, cols, mask, B, H, ZONEOUT_C)
        if ZONEOUT != 0:
            h_new = zone_out(h_own, h_new, keep_h_ptr, step, rows, cols, mask, B, H, ZONEOUT)
        c = tl.where(keep, c_new, c)
        h_own = tl.where(keep, h_new, h_own)
        tl.store(h_buf_ptr + target + state_offsets, h_own, mask=mask)
        out_offsets = (time * B + rows)[:, None] * H + cols[None, :]
        h_out = tl.where(keep, h_new, 0.0)
        tl.store(out_ptr + out_offsets, h_out.to(out_ptr.dtype.element_ty), mask=mask)
        if SAVE:
            gate_tile = gates_ptr + x_rows[:, None] + cols[None, :]
            tl.store(gate_tile, gate_i, mask=keep)
            tl.store(gate_tile + H, gate_f, mask=keep)
            tl.store(gate_tile + 2 * H, gate_g, mask=keep)
            tl.store(gate_tile + 3 * H, gate_o, mask=keep)
            tl.store(cells_ptr + out_offsets, c_new, mask=keep)
            if ZONEOUT_C != 0:
                tl.store(cand_c_ptr + out_offsets, c_cand, mask=keep)
        arrivals = sync_programs(counter, arrivals, programs, SPLIT)
    tl.store(c_ptr + state_offsets, c, mask=mask)


@triton.jit(do_not_specialize=["T", "B"])
def lstm_slice_backward_kernel(
    dout_ptr,  # (T, B, H) accumulate dtype
    dh_buf_ptr,  # (2, B, H): [0] holds dh_n on entry; dh0 on exit at [T % 2]
    dc_ptr,  # (B, H): dc_n on entry, dc0 on exit
    gates_ptr,  # (T, B, 4H) saved activated gates
    cells_ptr,  # (T, B, H) saved cells
    c0_ptr,  # (B, H) accumulate dtype
    w_hh_ptr,  # (4H, H)
    lengths_ptr,
    dpre_ptr,  # (T, B, 4H) out: gradient of the gate pre-activations (zero at padding)
    counter_ptr,  # (batch tiles,) int32 zeros: barrier arrivals when SPLIT
    mask_ptr,  # (B, H) recurrent dropout mask, read when DROPOUT
    keep_h_ptr,  # zoneout of h: (T, B, H) 0/1 mask by processing step (ZONEOUT 1), (1,) p (2)
    keep_c_ptr,  # zoneout of c, likewise (ZONEOUT_C)
    cand_c_ptr,  # (T, B, H) c~ before zoneout, read when ZONEOUT_C
    T,
    B,
    H,
    REVERSE: tl.constexpr,
    DROPOUT: tl.constexpr,
    ZONEOUT: tl.constexpr,
    ZONEOUT_C: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PRECISION: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """lstm_backward_kernel with one unit tile a program, its W_hh slice, dh and dc held across
    steps: the programs share only the gate gradients, each step in its own slot of dpre, so one
    barrier a step suffices. With zoneout the gradient reaching h' (c') splits into (1 - k) of it
    for h~ (c~) and k straight to h (c); the products' part is masked by m."""
    acc_dtype = dh_buf_ptr.dtype.element_ty
    rows, row_ok, lengths, counter, programs, cols, col_ok, units, unit_ok = slice_tiles(
        lengths_ptr, counter_ptr, B, H, BLOCK_B, BLOCK_N, BLOCK_H
    )
    w_i = weight_slice(w_hh_ptr, 0, cols, col_ok, units, unit_ok, H, False)
    w_f = weight_slice(w_hh_ptr, 1, cols, col_ok, units, unit_ok, H, False)
    w_g = weight_slice(w_hh_ptr, 2, cols, col_ok, units, unit_ok, H, False)
    w_o = weight_slice(w_hh_ptr, 3, cols, col_ok, units, unit_ok, H, False)
    mask = row_ok[:, None] & col_ok[None, :]
    state_offsets = rows[:, None] * H + cols[None, :]
    dh = tl.load(dh_buf_ptr + state_offsets, mask=mask, other=0.0)
    dc = tl.load(dc_ptr + state_offsets, mask=mask, other=0.0)
    c0 = tl.load(c0_ptr + state_offsets, mask=mask, other=0.0)
    if DROPOUT:
        dropout = tl.load(mask_ptr + state_offsets, mask=mask, other=0.0)
    arrivals = programs * 0
    for back in range(T):
        step = T - 1 - back
        time = time_index(step, lengths, REVERSE)
        time_prev = time_index(step - 1, lengths, REVERSE)
        valid = row_ok & (step < lengths)
        keep = valid[:, None] & col_ok[None, :]
        gate_rows = (time * B + rows) * (4 * H)
        out_offsets = (time * B + rows)[:, None] * H + cols[None, :]
        dh_total = dh + tl.load(dout_ptr + out_offsets, mask=keep, other=0.0)
        d_h_new = dh_total
        if ZONEOUT != 0:
            kept_h = keep_weight(keep_h_ptr, step, rows, cols, mask, B, H, ZONEOUT)
            d_h_new = (1.0 - kept_h) * dh_total
        gate_tile = gates_ptr + gate_rows[:, None] + cols[None, :]
        gate_i = tl.load(gate_tile, mask=keep, other=0.0)
        gate_f = tl.load(gate_tile + H, mask=keep, other=0.0)
        gate_g = tl.load(gate_tile + 2 * H, mask=keep, other=0.0)
        gate_o = tl.load(gate_tile + 3 * H, mask=keep, other=0.0)
        if ZONEOUT_C != 0:
            tanh_c = tanh(tl.load(cand_c_ptr + out_offsets, mask=keep, other=0.0))
        else:
            tanh_c = tanh(tl.load(cells_ptr + out_offsets, mask=keep, other=0.0))
        prev_offsets = (time_prev * B + rows)[:, None] * H + cols[None, :]
        has_prev = keep & (step + lengths * 0 > 0)[:, None]
        c_prev = tl.where(has_prev, tl.load(cells_ptr + prev_offsets, mask=has_prev, other=0.0), c0)
        dc_carried = dc
        if ZONEOUT_C != 0:
            kept_c = keep_weight(keep_c_ptr, step, rows, cols, mask, B, H, ZONEOUT_C)
            dc_carried = (1.0 - kept_c) * dc
        dc_total = dc_carried + d_h_new * gate_o * (1.0 - tanh_c * tanh_c)
        d_i = tl.where(keep, dc_total * gate_g * gate_i * (1.0 - gate_i), 0.0)
        d_f = tl.where(keep, dc_total * c_prev * gate_f * (1.0 - gate_f), 0.0)
        d_g = tl.where(keep, dc_total * gate_i * (1.0 - gate_g * gate_g), 0.0)
        d_o = tl.where(keep, d_h_new * tanh_c * gate_o * (1.0 - gate_o), 0.0)
        dpre_tile = dpre_ptr + gate_rows[:, None] + cols[None, :]
        tl.store(dpre_tile, d_i, mask=mask)
        tl.store(dpre_tile + H, d_f, mask=mask)
        tl.store(dpre_tile + 2 * H, d_g, mask=mask)
        tl.store(dpre_tile + 3 * H, d_o, mask=mask)
        if ZONEOUT_C != 0:
            dc = tl.where(keep, kept_c * dc + dc_total * gate_f, dc)
        else:
            dc = tl.where(keep, dc_total * gate_f, dc)
        arrivals = sync_programs(counter, arrivals, programs, SPLIT)
        dpre_rows = dpre_ptr + gate_rows[:, None] + units[None, :]
        dpre_mask = row_ok[:, None] & unit_ok[None, :]
        dh_prev = tl.zeros((BLOCK_B, BLOCK_N), dtype=acc_dtype)
        part = tl.load(dpre_rows, mask=dpre_mask, other=0.0, cache_modifier=".cg")
        dh_prev = tl.dot(
            part.to(w_i.dtype), w_i, dh_prev, input_precision=PRECISION, out_dtype=acc_dtype
        )
        part = tl.load(dpre_rows + H, mask=dpre_mask, other=0.0, cache_modifier=".cg")
        dh_prev = tl.dot(
            part.to(w_f.dtype), w_f, dh_prev, input_precision=PRECISION, out_dtype=acc_dtype
        )
        part = tl.load(dpre_rows + 2 * H, mask=dpre_mask, other=0.0, cache_modifier=".cg")
        dh_prev = tl.dot(
            part.to(w_g.dtype), w_g, dh_prev, input_precision=PRECISION, out_dtype=acc_dtype
        )
        part = tl.load(dpre_rows + 3 * H, mask=dpre_mask, other=0.0, cache_modifier=".cg")
        dh_prev = tl.dot(
            part.to(w_o.dtype), w_o, dh_prev, input_precision=PRECISION, out_dtype=acc_dtype
        )
        if DROPOUT:
            dh_prev = dh_prev * dropout
        if ZONEOUT != 0:
            dh_prev += kept_h * dh_total
        dh = tl.where(keep, dh_prev, dh)
    tl.store(dh_buf_ptr + (T % 2) * B * H + state_offsets, dh, mask=mask)
    tl.store(dc_ptr + state_offsets, dc, mask=mask)


class LSTMFunction(torch.autograd.Function):
    """(T, B, I) x, (B, H) h0, c0 and the weights -> (T, B, H) output, h_n, c_n."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, save, in_loop):
        steps, batch, _ = x.shape
        hidden = w_hh.size(1)
        acc = accumulate_dtype(x.dtype)
        bias = None if b_ih is None else b_ih + b_hh
        xp = F.linear(x, w_ih, bias).contiguous()
        w_hh = w_hh.contiguous()
        h_buf = torch.empty(2, batch, hidden, device=x.device, dtype=acc)
        h_buf[0] = h0
        c = c0.to(acc).contiguous().clone()
        out = torch.empty(steps, batch, hidden, device=x.device, dtype=x.dtype)
        if save:
            gates = torch.empty(steps, batch, GATES * hidden, device=x.device, dtype=acc)
            cells = torch.empty(steps, batch, hidden, device=x.device, dtype=acc)
        else:
            gates = cells = empty_like_nothing(x.device, acc)
        lengths_on_device = device_lengths(lengths, steps, batch, x.device)
        arguments = (xp, w_hh, lengths_on_device, h_buf, c, out, gates, cells)
        constants = {"REVERSE": reverse, "SAVE": save, "PRECISION": dot_precision(x)}
        regularizers, in_loop_constants = in_loop_arguments(in_loop, c)
        cand_c = regularizers[2]
        if save and in_loop is not None and in_loop.keep_c is not None:
            cand_c = torch.empty(steps, batch, hidden, device=x.device, dtype=acc)
        plan = slice_plan(lstm_slice_forward_kernel, batch, hidden, GATES, x)
        if plan is None or not launch_if_it_fits(
            lstm_slice_forward_kernel,
            *plan[:2],
            x,
            *arguments,
            plan[2],
            *regularizers,
            cand_c,
            steps,
            batch,
            hidden,
            **constants,
            **in_loop_constants,
            PREFETCH=prefetch_slices(plan[1]),
        ):
            if in_loop is not None:
                raise RuntimeError(regularizers_do_not_fit(hidden, x))
            launch_grid, options, counter = plan_launch(batch, hidden, x.device)
            lstm_forward_kernel[launch_grid](
                *arguments, counter, steps, batch, hidden, **constants, **options
            )
        h_n = h_buf[steps % 2].to(x.dtype)
        c_n = c.to(x.dtype)
        if save:
            ctx.save_for_backward(x, h0, c0, w_ih, w_hh, out, gates, cells, lengths_on_device)
            ctx.lengths = lengths
            ctx.reverse = reverse
            ctx.has_bias = b_ih is not None
            ctx.in_loop, ctx.cand_c = in_loop, cand_c
        return out, h_n, c_n

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_h_n, d_c_n):
        x, h0, c0, w_ih, w_hh, out, gates, cells, lengths_on_device = ctx.saved_tensors
        steps, batch, _ = x.shape
        hidden = w_hh.size(1)
        acc = gates.dtype
        dh_buf = torch.zeros(2, batch, hidden, device=x.device, dtype=acc)
        if d_h_n is not None:
            dh_buf[0] = d_h_n
        dc = torch.zeros(batch, hidden, device=x.device, dtype=acc)
        if d_c_n is not None:
            dc.copy_(d_c_n)
        if d_out is None:
            d_out = torch.zeros(steps, batch, hidden, device=x.device, dtype=acc)
        d_out = d_out.to(acc).contiguous()
        dpre = torch.empty(steps, batch, GATES * hidden, device=x.device, dtype=acc)
        arguments = (d_out, dh_buf, dc, gates, cells, c0.to(acc).contiguous(), w_hh)
        arguments += (lengths_on_device, dpre)
        constants = {"REVERSE": ctx.reverse, "PRECISION": dot_precision(x)}
        regularizers, in_loop_constants = in_loop_arguments(ctx.in_loop, dc)
        plan = slice_plan(lstm_slice_backward_kernel, batch, hidden, GATES, x)
        if plan is None or not launch_if_it_fits(
            lstm_slice_backward_kernel,
            *plan[:2],
            x,
            *arguments,
            plan[2],
            *regularizers,
            ctx.cand_c,
            steps,
            batch,
            hidden,
            **constants,
            **in_loop_constants,
        ):
            if ctx.in_loop is not None:
                raise RuntimeError(regularizers_do_not_fit(hidden, x))
            launch_grid, options, counter = plan_launch(batch, hidden, x.device)
            lstm_backward_kernel[launch_grid](
                *arguments, counter, steps, batch, hidden, **constants, **options
            )
        return weight_gradients(ctx, dpre, x, h0, c0, dh_buf[steps % 2], dc, w_ih, out)


def weight_gradients(ctx, dpre: Tensor, x, h0, c0, dh0, dc0, w_ih, out):
    """The gradients of LSTMFunction.forward's inputs from the gate gradients, as matmuls."""
    need = ctx.needs_input_grad
    acc = dpre.dtype
    dx = dpre.to(x.dtype) @ w_ih if need[0] else None
    dh0 = dh0.to(h0.dtype) if need[1] else None
    dc0 = dc0.to(c0.dtype) if need[2] else None
    dw_ih = (flat(dpre).T @ flat(x).to(acc)).to(w_ih.dtype) if need[3] else None
    dw_hh = None
    if need[4]:
        h_prev = previous_states(out.to(acc), h0.to(acc), ctx.lengths, ctx.reverse)
        if ctx.in_loop is not None and ctx.in_loop.mask is not None:
            h_prev = h_prev * ctx.in_loop.mask.to(acc)  # what the products saw
        dw_hh = (flat(dpre).T @ flat(h_prev)).to(w_ih.dtype)  # w_hh has w_ih's dtype
    db = dpre.sum((0, 1)).to(w_ih.dtype) if ctx.has_bias and (need[5] or need[6]) else None
    return dx, dh0, dc0, dw_ih, dw_hh, db, db, None, None, None, None


def run_direction(
    x: Tensor,
    state: tuple[Tensor, Tensor],
    weights: tuple[Tensor | None, ...],
    lengths: Tensor | None,
    reverse: bool,
    in_loop: InLoop | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """(T, B, I) input, ((B, H), (B, H)) state -> (T, B, H) output, (h_n, c_n); in_loop: the
    direction's recurrent dropout and zoneout (only where the slice kernels take the layer)."""
    w_ih, w_hh, b_ih, b_hh = weights[:4]
    h0, c0 = state
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh)
    )
    output, h_n, c_n = LSTMFunction.apply(
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, save, in_loop
    )
    return output, (h_n, c_n)
