"""Fused GRU in Triton, both published forms; backward through time derived by hand.

Gates in torch's order (r, z, n); xp = x @ W_ih^T + b_ih for all steps at once (torch), with the
recurrent biases that are purely additive folded in.

reset_after=True (torch, cuDNN), with hn = h @ W_hn^T + b_hn kept for the backward:
    r = sigmoid(xp_r + h W_hr^T), z = sigmoid(xp_z + h W_hz^T), n = tanh(xp_n + r * hn)
    h' = (1 - z) * n + z * h
    backward: dn = dh (1 - z)(1 - n^2), dz = dh (h - n) z(1 - z), dr = dn hn r(1 - r)
              d(hidden pre-activations) = (dr, dz, dn * r); dh_prev = that @ W_hh + dh * z
reset_after=False (Cho et al.): n = tanh(xp_n + (r * h) W_hn^T), so a step has two phases (r
before the n matmul); backward: d(rh) = dn @ W_hn, dr = d(rh) h r(1 - r),
    dh_prev = (dr, dz) @ (W_hr; W_hz) + d(rh) * r + dh * z
Weight gradients are matmuls over all T * B rows (dW_hn uses r * h_prev in the second form).
The first form has slice kernels too, which run where a program's slice of W_hh fits on chip
(hidden size up to 256; _common.slice_plan); the second form and larger sizes run split.
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
    add_rows_times_weight_t,
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


@triton.jit
def load_previous_hidden(out_ptr, h0_ptr, time_prev, step, rows, cols, lengths, keep, B, H):
    """(BLOCK_B, BLOCK_N) state each valid row's step started from: the previous output or h0."""
    has_prev = keep & (step + lengths * 0 > 0)[:, None]
    prev_offsets = (time_prev * B + rows)[:, None] * H + cols[None, :]
    h_prev = tl.load(out_ptr + prev_offsets, mask=has_prev, other=0.0).to(h0_ptr.dtype.element_ty)
    h_first = tl.load(h0_ptr + rows[:, None] * H + cols[None, :], mask=keep & ~has_prev, other=0.0)
    return tl.where(has_prev, h_prev, h_first)


@triton.jit(do_not_specialize=["T", "B"])
def gru_forward_kernel(
    xp_ptr,  # (T, B, 3H) input projection, with b_hr and b_hz (and b_hn unless RESET_AFTER)
    w_hh_ptr,  # (3H, H)
    b_hn_ptr,  # (H,) accumulate dtype: the bias inside r * (...) when RESET_AFTER
    lengths_ptr,  # (B,) int32
    h_buf_ptr,  # (2, B, H) accumulate dtype: ping-pong hidden state, [0] holds h0
    scratch_ptr,  # (B, 2H) accumulate dtype: z and r * h between the phases (not RESET_AFTER)
    out_ptr,  # (T, B, H)
    gates_ptr,  # (T, B, 4H) when SAVE: r, z, n, hn (hn only when RESET_AFTER)
    counter_ptr,  # (batch tiles,) int32 zeros: barrier arrivals when SPLIT
    T,
    B,
    H,
    REVERSE: tl.constexpr,
    RESET_AFTER: tl.constexpr,
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
        x_rows = (time * B + rows) * (3 * H)
        gate_rows = (time * B + rows) * (4 * H)
        for n_start in range(first_col, H, programs * BLOCK_N):
            cols = n_start + tl.arange(0, BLOCK_N)
            col_ok = cols < H
            mask = row_ok[:, None] & col_ok[None, :]
            keep = valid[:, None] & col_ok[None, :]
            x_tile = xp_ptr + x_rows[:, None] + cols[None, :]
            pre_r = tl.load(x_tile, mask=mask, other=0.0).to(acc_dtype)
            pre_z = tl.load(x_tile + H, mask=mask, other=0.0).to(acc_dtype)
            if RESET_AFTER:
                hn = tl.load(b_hn_ptr + cols, mask=col_ok, other=0.0)[None, :] + tl.zeros(
                    (BLOCK_B, BLOCK_N), dtype=acc_dtype
                )
                pre_r, pre_z, hn, _ = add_rows_times_gate_weights_t(
                    pre_r,
                    pre_z,
                    hn,
                    hn,
                    h_buf_ptr,
                    h_rows,
                    row_ok,
                    H,
                    w_hh_ptr,
                    H,
                    cols,
                    col_ok,
                    3,
                    BLOCK_K,
                    PRECISION,
                )
            else:
                pre_r, pre_z, _, _ = add_rows_times_gate_weights_t(
                    pre_r,
                    pre_z,
                    pre_r,
                    pre_z,
                    h_buf_ptr,
                    h_rows,
                    row_ok,
                    H,
                    w_hh_ptr,
                    H,
                    cols,
                    col_ok,
                    2,
                    BLOCK_K,
                    PRECISION,
                )
            gate_r = sigmoid(pre_r)
            gate_z = sigmoid(pre_z)
            state_offsets = rows[:, None] * H + cols[None, :]
            h_prev = tl.load(
                h_buf_ptr + source + state_offsets, mask=mask, other=0.0, cache_modifier=".cg"
            )
            gate_tile = gates_ptr + gate_rows[:, None] + cols[None, :]
            if RESET_AFTER:
                pre_n = tl.load(x_tile + 2 * H, mask=mask, other=0.0).to(acc_dtype)
                gate_n = tanh(pre_n + gate_r * hn)
                h_new = (1.0 - gate_z) * gate_n + gate_z * h_prev
                tl.store(
                    h_buf_ptr + target + state_offsets, tl.where(keep, h_new, h_prev), mask=mask
                )
                out_offsets = (time * B + rows)[:, None] * H + cols[None, :]
                h_out = tl.where(keep, h_new, 0.0)
                tl.store(out_ptr + out_offsets, h_out.to(out_ptr.dtype.element_ty), mask=mask)
                if SAVE:
                    tl.store(gate_tile + 2 * H, gate_n, mask=mask)
                    tl.store(gate_tile + 3 * H, hn, mask=mask)
            else:
                scratch = scratch_ptr + rows[:, None] * (2 * H) + cols[None, :]
                tl.store(scratch, gate_z, mask=mask)
                tl.store(scratch + H, gate_r * h_prev, mask=mask)
            if SAVE:
                tl.store(gate_tile, gate_r, mask=mask)
                tl.store(gate_tile + H, gate_z, mask=mask)
        if not RESET_AFTER:
            arrivals = sync_programs(counter, arrivals, programs, SPLIT)
            for n_start in range(first_col, H, programs * BLOCK_N):
                cols = n_start + tl.arange(0, BLOCK_N)
                col_ok = cols < H
                mask = row_ok[:, None] & col_ok[None, :]
                keep = valid[:, None] & col_ok[None, :]
                pre_n = tl.load(
                    xp_ptr + x_rows[:, None] + 2 * H + cols[None, :], mask=mask, other=0.0
                ).to(acc_dtype)
                pre_n = add_rows_times_weight_t(
                    pre_n,
                    scratch_ptr + H,
                    rows * (2 * H),
                    row_ok,
                    H,
                    w_hh_ptr,
                    2 * H,
                    H,
                    cols,
                    col_ok,
                    BLOCK_K,
                    PRECISION,
                )
                gate_n = tanh(pre_n)
                state_offsets = rows[:, None] * H + cols[None, :]
                gate_z = tl.load(
                    scratch_ptr + rows[:, None] * (2 * H) + cols[None, :],
                    mask=mask,
                    other=0.0,
                    cache_modifier=".cg",
                )
                h_prev = tl.load(
                    h_buf_ptr + source + state_offsets, mask=mask, other=0.0, cache_modifier=".cg"
                )
                h_new = (1.0 - gate_z) * gate_n + gate_z * h_prev
                tl.store(
                    h_buf_ptr + target + state_offsets, tl.where(keep, h_new, h_prev), mask=mask
                )
                out_offsets = (time * B + rows)[:, None] * H + cols[None, :]
                h_out = tl.where(keep, h_new, 0.0)
                tl.store(out_ptr + out_offsets, h_out.to(out_ptr.dtype.element_ty), mask=mask)
                if SAVE:
                    tl.store(
                        gates_ptr + gate_rows[:, None] + 2 * H + cols[None, :], gate_n, mask=mask
                    )
        arrivals = sync_programs(counter, arrivals, programs, SPLIT)


@triton.jit(do_not_specialize=["T", "B"])
def gru_backward_kernel(
    dout_ptr,  # (T, B, H) accumulate dtype
    dh_buf_ptr,  # (2, B, H): ping-pong hidden gradient, [0] holds dh_n; dh0 on exit at [T % 2]
    gates_ptr,  # (T, B, 4H) saved r, z, n, hn
    out_ptr,  # (T, B, H) the forward's output
    h0_ptr,  # (B, H) accumulate dtype
    w_hh_ptr,  # (3H, H)
    lengths_ptr,
    dpre_ptr,  # (T, B, 4H) out: d(r, z, n pre-activations), and d(hn) when RESET_AFTER
    counter_ptr,  # (batch tiles,) int32 zeros: barrier arrivals when SPLIT
    T,
    B,
    H,
    REVERSE: tl.constexpr,
    RESET_AFTER: tl.constexpr,
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
        # phase 1: the z and n pre-activation gradients (and r, hn when RESET_AFTER)
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
            gate_tile = gates_ptr + gate_rows[:, None] + cols[None, :]
            gate_r = tl.load(gate_tile, mask=keep, other=0.0)
            gate_z = tl.load(gate_tile + H, mask=keep, other=0.0)
            gate_n = tl.load(gate_tile + 2 * H, mask=keep, other=0.0)
            h_prev = load_previous_hidden(
                out_ptr, h0_ptr, time_prev, step, rows, cols, lengths, keep, B, H
            )
            d_n = dh * (1.0 - gate_z) * (1.0 - gate_n * gate_n)
            d_z = dh * (h_prev - gate_n) * gate_z * (1.0 - gate_z)
            dpre_tile = dpre_ptr + gate_rows[:, None] + cols[None, :]
            zero = tl.zeros((BLOCK_B, BLOCK_N), dtype=acc_dtype)
            tl.store(dpre_tile + H, tl.where(keep, d_z, zero), mask=mask)
            tl.store(dpre_tile + 2 * H, tl.where(keep, d_n, zero), mask=mask)
            if RESET_AFTER:
                hn = tl.load(gate_tile + 3 * H, mask=keep, other=0.0)
                d_r = d_n * hn * gate_r * (1.0 - gate_r)
                tl.store(dpre_tile, tl.where(keep, d_r, zero), mask=mask)
                tl.store(dpre_tile + 3 * H, tl.where(keep, d_n * gate_r, zero), mask=mask)
        arrivals = sync_programs(counter, arrivals, programs, SPLIT)
        if not RESET_AFTER:
            # phase 2: d(r * h) = dn @ W_hn gives dr and part of dh_prev
            for m_start in range(first_col, H, programs * BLOCK_N):
                cols = m_start + tl.arange(0, BLOCK_N)
                col_ok = cols < H
                mask = row_ok[:, None] & col_ok[None, :]
                keep = valid[:, None] & col_ok[None, :]
                state_offsets = rows[:, None] * H + cols[None, :]
                d_rh = tl.zeros((BLOCK_B, BLOCK_N), dtype=acc_dtype)
                d_rh = add_rows_times_weight(
                    d_rh,
                    dpre_ptr + 2 * H,
                    gate_rows,
                    row_ok,
                    H,
                    w_hh_ptr,
                    2 * H,
                    H,
                    cols,
                    col_ok,
                    BLOCK_K,
                    PRECISION,
                )
                gate_tile = gates_ptr + gate_rows[:, None] + cols[None, :]
                gate_r = tl.load(gate_tile, mask=keep, other=0.0)
                h_prev = load_previous_hidden(
                    out_ptr, h0_ptr, time_prev, step, rows, cols, lengths, keep, B, H
                )
                d_r = d_rh * h_prev * gate_r * (1.0 - gate_r)
                tl.store(
                    dpre_ptr + gate_rows[:, None] + cols[None, :],
                    tl.where(keep, d_r, 0.0),
                    mask=mask,
                )
                dh_old = tl.load(
                    dh_buf_ptr + source + state_offsets, mask=mask, other=0.0, cache_modifier=".cg"
                )
                tl.store(
                    dh_buf_ptr + target + state_offsets,
                    tl.where(keep, d_rh * gate_r, dh_old),
                    mask=mask,
                )
            arrivals = sync_programs(counter, arrivals, programs, SPLIT)
        # last phase: dh_prev = d(hidden pre-activations) @ W_hh + dh * z
        for m_start in range(first_col, H, programs * BLOCK_N):
            cols = m_start + tl.arange(0, BLOCK_N)
            col_ok = cols < H
            mask = row_ok[:, None] & col_ok[None, :]
            keep = valid[:, None] & col_ok[None, :]
            state_offsets = rows[:, None] * H + cols[None, :]
            out_offsets = (time * B + rows)[:, None] * H + cols[None, :]
            dh_old = tl.load(
                dh_buf_ptr + source + state_offsets, mask=mask, other=0.0, cache_modifier=".cg"
            )
            dh = dh_old + tl.load(dout_ptr + out_offsets, mask=keep, other=0.0)
            gate_z = tl.load(
                gates_ptr + gate_rows[:, None] + H + cols[None, :], mask=keep, other=0.0
            )
            dh_prev = dh * gate_z
            if RESET_AFTER:
                dh_prev = add_rows_times_weight(
                    dh_prev,
                    dpre_ptr + 3 * H,
                    gate_rows,
                    row_ok,
                    H,
                    w_hh_ptr,
                    2 * H,
                    H,
                    cols,
                    col_ok,
                    BLOCK_K,
                    PRECISION,
                )
            else:
                dh_prev += tl.load(
                    dh_buf_ptr + target + state_offsets, mask=keep, other=0.0, cache_modifier=".cg"
                )
            dh_prev = add_rows_times_weight(
                dh_prev,
                dpre_ptr,
                gate_rows,
                row_ok,
                2 * H,
                w_hh_ptr,
                0,
                H,
                cols,
                col_ok,
                BLOCK_K,
                PRECISION,
            )
            tl.store(
                dh_buf_ptr + target + state_offsets, tl.where(keep, dh_prev, dh_old), mask=mask
            )
        arrivals = sync_programs(counter, arrivals, programs, SPLIT)


@triton.jit(do_not_specialize=["T", "B"])
def gru_slice_forward_kernel(
    xp_ptr,  # (T, B, 3H) input projection, with b_hr and b_hz
    w_hh_ptr,  # (3H, H)
    b_hn_ptr,  # (H,) accumulate dtype: the bias inside r * (...)
    lengths_ptr,  # (B,) int32
    h_buf_ptr,  # (2, B, H) accumulate dtype: ping-pong hidden state, [0] holds h0
    out_ptr,  # (T, B, H)
    gates_ptr,  # (T, B, 4H) when SAVE: r, z, n, hn
    counter_ptr,  # (batch tiles,) int32 zeros: barrier arrivals when SPLIT
    mask_ptr,  # (B, H) recurrent dropout mask, read when DROPOUT
    keep_ptr,  # zoneout: (T, B, H) 0/1 mask by processing step (ZONEOUT 1), or (1,) p (2)
    T,
    B,
    H,
    REVERSE: tl.constexpr,
    SAVE: tl.constexpr,
    DROPOUT: tl.constexpr,
    ZONEOUT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PRECISION: tl.constexpr,
    SPLIT: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """gru_forward_kernel (reset_after) with one unit tile a program, its W_hh slice and its own
    part of h held across steps; with the in-loop regularisers the products see h * m (z * h
    keeps the whole h) and h' = h~ + k (h - h~) (kernels/cpu/regularized.py's equations)."""
    acc_dtype = h_buf_ptr.dtype.element_ty
    rows, row_ok, lengths, counter, programs, cols, col_ok, units, unit_ok = slice_tiles(
        lengths_ptr, counter_ptr, B, H, BLOCK_B, BLOCK_N, BLOCK_H
    )
    w_r = weight_slice(w_hh_ptr, 0, cols, col_ok, units, unit_ok, H, True)
    w_z = weight_slice(w_hh_ptr, 1, cols, col_ok, units, unit_ok, H, True)
    w_n = weight_slice(w_hh_ptr, 2, cols, col_ok, units, unit_ok, H, True)
    b_hn = tl.load(b_hn_ptr + cols, mask=col_ok, other=0.0)[None, :] + tl.zeros(
        (BLOCK_B, BLOCK_N), dtype=acc_dtype
    )
    mask = row_ok[:, None] & col_ok[None, :]
    state_offsets = rows[:, None] * H + cols[None, :]
    h_own = tl.load(h_buf_ptr + state_offsets, mask=mask, other=0.0)
    all_units = row_ok[:, None] & unit_ok[None, :]
    if DROPOUT:
        dropout = tl.load(mask_ptr + rows[:, None] * H + units[None, :], mask=all_units, other=0.0)
    if PREFETCH:
        next_r = step_tile(xp_ptr, 0, T, lengths, rows, cols, mask, B, 3 * H, REVERSE)
        next_z = step_tile(xp_ptr, 0, T, lengths, rows, cols + H, mask, B, 3 * H, REVERSE)
        next_n = step_tile(xp_ptr, 0, T, lengths, rows, cols + 2 * H, mask, B, 3 * H, REVERSE)
    arrivals = programs * 0
    for step in range(T):
        time = time_index(step, lengths, REVERSE)
        valid = row_ok & (step < lengths)
        keep = valid[:, None] & col_ok[None, :]
        source = (step % 2) * B * H
        target = ((step + 1) % 2) * B * H
        if PREFETCH:
            pre_r, pre_z, pre_n = next_r, next_z, next_n
            upcoming = step + 1
            next_r = step_tile(xp_ptr, upcoming, T, lengths, rows, cols, mask, B, 3 * H, REVERSE)
            next_z = step_tile(
                xp_ptr, upcoming, T, lengths, rows, cols + H, mask, B, 3 * H, REVERSE
            )
            next_n = step_tile(
                xp_ptr, upcoming, T, lengths, rows, cols + 2 * H, mask, B, 3 * H, REVERSE
            )
        else:
            x_tile = xp_ptr + ((time * B + rows) * (3 * H))[:, None] + cols[None, :]
            pre_r = tl.load(x_tile, mask=mask, other=0.0)
            pre_z = tl.load(x_tile + H, mask=mask, other=0.0)
            pre_n = tl.load(x_tile + 2 * H, mask=mask, other=0.0)
        h = tl.load(
            h_buf_ptr + source + rows[:, None] * H + units[None, :],
            mask=all_units,
            other=0.0,
            cache_modifier=".cg",
        )
        if DROPOUT:
            h = h * dropout
        h = h.to(w_r.dtype)
        pre_r = tl.dot(h, w_r, pre_r.to(acc_dtype), input_precision=PRECISION, out_dtype=acc_dtype)
        pre_z = tl.dot(h, w_z, pre_z.to(acc_dtype), input_precision=PRECISION, out_dtype=acc_dtype)
        hn = tl.dot(h, w_n, b_hn, input_precision=PRECISION, out_dtype=acc_dtype)
        gate_r = sigmoid(pre_r)
        gate_z = sigmoid(pre_z)
        pre_n = pre_n.to(acc_dtype)
        gate_n = tanh(pre_n + gate_r * hn)
        h_new = (1.0 - gate_z) * gate_n + gate_z * h_own
        if ZONEOUT != 0:
            h_new = zone_out(h_own, h_new, keep_ptr, step, rows, cols, mask, B, H, ZONEOUT)
        h_own = tl.where(keep, h_new, h_own)
        tl.store(h_buf_ptr + target + state_offsets, h_own, mask=mask)
        out_offsets = (time * B + rows)[:, None] * H + cols[None, :]
        h_out = tl.where(keep, h_new, 0.0)
        tl.store(out_ptr + out_offsets, h_out.to(out_ptr.dtype.element_ty), mask=mask)
        if SAVE:
            gate_tile = gates_ptr + ((time * B + rows) * (4 * H))[:, None] + cols[None, :]
            tl.store(gate_tile, gate_r, mask=mask)
            tl.store(gate_tile + H, gate_z, mask=mask)
            tl.store(gate_tile + 2 * H, gate_n, mask=mask)
            tl.store(gate_tile + 3 * H, hn, mask=mask)
        arrivals = sync_programs(counter, arrivals, programs, SPLIT)


@triton.jit(do_not_specialize=["T", "B"])
def gru_slice_backward_kernel(
    dout_ptr,  # (T, B, H) accumulate dtype
    dh_buf_ptr,  # (2, B, H): [0] holds dh_n on entry; dh0 on exit at [T % 2]
    gates_ptr,  # (T, B, 4H) saved r, z, n, hn
    out_ptr,  # (T, B, H) the forward's output
    h0_ptr,  # (B, H) accumulate dtype
    w_hh_ptr,  # (3H, H)
    lengths_ptr,
    dpre_ptr,  # (T, B, 4H) out: d(r, z, n pre-activations) and d(hn) (zero at padding)
    counter_ptr,  # (batch tiles,) int32 zeros: barrier arrivals when SPLIT
    mask_ptr,  # (B, H) recurrent dropout mask, read when DROPOUT
    keep_ptr,  # zoneout: (T, B, H) 0/1 mask by processing step (ZONEOUT 1), or (1,) p (2)
    T,
    B,
    H,
    REVERSE: tl.constexpr,
    DROPOUT: tl.constexpr,
    ZONEOUT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PRECISION: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """gru_backward_kernel (reset_after) with one unit tile a program, its W_hh slice and dh
    held across steps: one barrier a step, as in lstm_slice_backward_kernel. With zoneout the
    gradient reaching h' splits into (1 - k) of it for h~ and k straight to h; the products'
    part is masked by m."""
    acc_dtype = dh_buf_ptr.dtype.element_ty
    rows, row_ok, lengths, counter, programs, cols, col_ok, units, unit_ok = slice_tiles(
        lengths_ptr, counter_ptr, B, H, BLOCK_B, BLOCK_N, BLOCK_H
    )
    w_r = weight_slice(w_hh_ptr, 0, cols, col_ok, units, unit_ok, H, False)
    w_z = weight_slice(w_hh_ptr, 1, cols, col_ok, units, unit_ok, H, False)
    w_n = weight_slice(w_hh_ptr, 2, cols, col_ok, units, unit_ok, H, False)
    mask = row_ok[:, None] & col_ok[None, :]
    state_offsets = rows[:, None] * H + cols[None, :]
    dh = tl.load(dh_buf_ptr + state_offsets, mask=mask, other=0.0)
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
            kept = keep_weight(keep_ptr, step, rows, cols, mask, B, H, ZONEOUT)
            d_h_new = (1.0 - kept) * dh_total
        gate_tile = gates_ptr + gate_rows[:, None] + cols[None, :]
        gate_r = tl.load(gate_tile, mask=keep, other=0.0)
        gate_z = tl.load(gate_tile + H, mask=keep, other=0.0)
        gate_n = tl.load(gate_tile + 2 * H, mask=keep, other=0.0)
        hn = tl.load(gate_tile + 3 * H, mask=keep, other=0.0)
        h_prev = load_previous_hidden(
            out_ptr, h0_ptr, time_prev, step, rows, cols, lengths, keep, B, H
        )
        d_n = tl.where(keep, d_h_new * (1.0 - gate_z) * (1.0 - gate_n * gate_n), 0.0)
        d_z = tl.where(keep, d_h_new * (h_prev - gate_n) * gate_z * (1.0 - gate_z), 0.0)
        dpre_tile = dpre_ptr + gate_rows[:, None] + cols[None, :]
        tl.store(dpre_tile, d_n * hn * gate_r * (1.0 - gate_r), mask=mask)
        tl.store(dpre_tile + H, d_z, mask=mask)
        tl.store(dpre_tile + 2 * H, d_n, mask=mask)
        tl.store(dpre_tile + 3 * H, d_n * gate_r, mask=mask)
        arrivals = sync_programs(counter, arrivals, programs, SPLIT)
        dpre_rows = dpre_ptr + gate_rows[:, None] + units[None, :]
        dpre_mask = row_ok[:, None] & unit_ok[None, :]
        products = tl.zeros((BLOCK_B, BLOCK_N), dtype=acc_dtype)
        part = tl.load(dpre_rows, mask=dpre_mask, other=0.0, cache_modifier=".cg")
        products = tl.dot(
            part.to(w_r.dtype), w_r, products, input_precision=PRECISION, out_dtype=acc_dtype
        )
        part = tl.load(dpre_rows + H, mask=dpre_mask, other=0.0, cache_modifier=".cg")
        products = tl.dot(
            part.to(w_z.dtype), w_z, products, input_precision=PRECISION, out_dtype=acc_dtype
        )
        part = tl.load(dpre_rows + 3 * H, mask=dpre_mask, other=0.0, cache_modifier=".cg")
        products = tl.dot(
            part.to(w_n.dtype), w_n, products, input_precision=PRECISION, out_dtype=acc_dtype
        )
        if DROPOUT:
            products = products * dropout
        dh_prev = d_h_new * gate_z + products
        if ZONEOUT != 0:
            dh_prev += kept * dh_total
        dh = tl.where(keep, dh_prev, dh)
    tl.store(dh_buf_ptr + (T % 2) * B * H + state_offsets, dh, mask=mask)


class GRUFunction(torch.autograd.Function):
    """(T, B, I) x, (B, H) h0 and the weights -> (T, B, H) output, h_n."""

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, reset_after, save, in_loop):
        steps, batch, _ = x.shape
        hidden = w_hh.size(1)
        acc = accumulate_dtype(x.dtype)
        device = x.device
        bias = None
        b_hn = torch.zeros(hidden, device=device, dtype=acc)
        if b_ih is not None:
            if reset_after:
                bias = b_ih + torch.cat([b_hh[: 2 * hidden], torch.zeros_like(b_hh[2 * hidden :])])
                b_hn = b_hh[2 * hidden :].to(acc).contiguous()
            else:
                bias = b_ih + b_hh
        xp = F.linear(x, w_ih, bias).contiguous()
        w_hh = w_hh.contiguous()
        h_buf = torch.empty(2, batch, hidden, device=device, dtype=acc)
        h_buf[0] = h0
        scratch = (
            empty_like_nothing(device, acc)
            if reset_after
            else torch.empty(batch, 2 * hidden, device=device, dtype=acc)
        )
        out = torch.empty(steps, batch, hidden, device=device, dtype=x.dtype)
        if save:
            gates = torch.empty(steps, batch, 4 * hidden, device=device, dtype=acc)
        else:
            gates = empty_like_nothing(device, acc)
        lengths_on_device = device_lengths(lengths, steps, batch, device)
        constants = {"REVERSE": reverse, "SAVE": save, "PRECISION": dot_precision(x)}
        regularizers, in_loop_constants = in_loop_arguments(in_loop, h_buf)
        del in_loop_constants["ZONEOUT_C"]
        plan = None
        if reset_after:
            plan = slice_plan(gru_slice_forward_kernel, batch, hidden, 3, x)
        if plan is None or not launch_if_it_fits(
            gru_slice_forward_kernel,
            *plan[:2],
            x,
            *(xp, w_hh, b_hn, lengths_on_device, h_buf, out, gates, plan[2]),
            *regularizers[:2],
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
            gru_forward_kernel[launch_grid](
                *(xp, w_hh, b_hn, lengths_on_device, h_buf, scratch, out, gates, counter),
                steps,
                batch,
                hidden,
                RESET_AFTER=reset_after,
                **constants,
                **options,
            )
        if save:
            ctx.save_for_backward(x, h0, w_ih, w_hh, out, gates, lengths_on_device)
            ctx.lengths = lengths
            ctx.reverse = reverse
            ctx.reset_after = reset_after
            ctx.has_bias = b_ih is not None
            ctx.in_loop = in_loop
        return out, h_buf[steps % 2].to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_h_n):
        x, h0, w_ih, w_hh, out, gates, lengths_on_device = ctx.saved_tensors
        steps, batch, _ = x.shape
        hidden = w_hh.size(1)
        acc = gates.dtype
        dh_buf = torch.zeros(2, batch, hidden, device=x.device, dtype=acc)
        if d_h_n is not None:
            dh_buf[0] = d_h_n
        if d_out is None:
            d_out = torch.zeros(steps, batch, hidden, device=x.device, dtype=acc)
        d_out = d_out.to(acc).contiguous()
        dpre = torch.empty(steps, batch, 4 * hidden, device=x.device, dtype=acc)
        arguments = (d_out, dh_buf, gates, out, h0.to(acc).contiguous(), w_hh)
        arguments += (lengths_on_device, dpre)
        constants = {"REVERSE": ctx.reverse, "PRECISION": dot_precision(x)}
        regularizers, in_loop_constants = in_loop_arguments(ctx.in_loop, dh_buf)
        del in_loop_constants["ZONEOUT_C"]
        plan = None
        if ctx.reset_after:
            plan = slice_plan(gru_slice_backward_kernel, batch, hidden, 3, x)
        if plan is None or not launch_if_it_fits(
            gru_slice_backward_kernel,
            *plan[:2],
            x,
            *arguments,
            plan[2],
            *regularizers[:2],
            steps,
            batch,
            hidden,
            **constants,
            **in_loop_constants,
        ):
            if ctx.in_loop is not None:
                raise RuntimeError(regularizers_do_not_fit(hidden, x))
            launch_grid, options, counter = plan_launch(batch, hidden, x.device)
            gru_backward_kernel[launch_grid](
                *arguments,
                counter,
                steps,
                batch,
                hidden,
                RESET_AFTER=ctx.reset_after,
                **constants,
                **options,
            )
        need = ctx.needs_input_grad
        dpre_x = dpre[..., : 3 * hidden]
        if ctx.reset_after:
            dpre_h = torch.cat([dpre[..., : 2 * hidden], dpre[..., 3 * hidden :]], dim=-1)
        else:
            dpre_h = dpre_x
        dx = dpre_x.to(x.dtype) @ w_ih if need[0] else None
        dh0 = dh_buf[steps % 2].to(h0.dtype) if need[1] else None
        dw_ih = (flat(dpre_x).T @ flat(x).to(acc)).to(w_ih.dtype) if need[2] else None
        dw_hh = None
        if need[3]:
            h_prev = previous_states(out.to(acc), h0.to(acc), ctx.lengths, ctx.reverse)
            if ctx.in_loop is not None and ctx.in_loop.mask is not None:
                h_prev = h_prev * ctx.in_loop.mask.to(acc)  # what the products saw
            if ctx.reset_after:
                dw_hh = flat(dpre_h).T @ flat(h_prev)
            else:
                gate_r = gates[..., :hidden]
                dw_hh = torch.cat(
                    [
                        flat(dpre_h[..., : 2 * hidden]).T @ flat(h_prev),
                        flat(dpre_h[..., 2 * hidden :]).T @ flat(gate_r * h_prev),
                    ]
                )
            dw_hh = dw_hh.to(w_hh.dtype)
        db_ih = db_hh = None
        if ctx.has_bias:
            db_ih = dpre_x.sum((0, 1)).to(w_ih.dtype) if need[4] else None
            db_hh = dpre_h.sum((0, 1)).to(w_ih.dtype) if need[5] else None
        return dx, dh0, dw_ih, dw_hh, db_ih, db_hh, None, None, None, None, None


def run_direction(
    x: Tensor,
    state: tuple[Tensor],
    weights: tuple[Tensor | None, ...],
    lengths: Tensor | None,
    reverse: bool,
    reset_after: bool = True,
    in_loop: InLoop | None = None,
) -> tuple[Tensor, tuple[Tensor]]:
    """(T, B, I) input, ((B, H),) state -> (T, B, H) output, (h_n,); in_loop: the direction's
    recurrent dropout and zoneout (only where the slice kernels take the layer)."""
    w_ih, w_hh, b_ih, b_hh = weights[:4]
    (h0,) = state
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, h0, w_ih, w_hh, b_ih, b_hh)
    )
    output, h_n = GRUFunction.apply(
        x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, bool(reset_after), save, in_loop
    )
    return output, (h_n,)
