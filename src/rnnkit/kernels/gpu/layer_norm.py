"""Layer-normalised LSTM and GRU in Triton: the recurrence in one kernel, backward by hand.

The cells' equations are in rnnkit.cells.layer_norm. The input side does not depend on the
recurrence: a_x = LN(x W_ih^T; gamma_ih, beta_ih) runs for all steps at once as torch ops
(F.layer_norm), and autograd takes it back. The kernels run the rest. A program owns BLOCK_B
batch rows and every unit of them, so the layer norms' sums over a row never leave it. Per
step it passes over the row a few times (the recurrent product P = h W_hh^T, written to a
per-step buffer with its row sum; the spread about the mean; then the gates), with a CTA
barrier between passes that read what other threads wrote, and reads what the kernel wrote
with the ".cg" cache modifier (past L1, as kernels/gpu/_common.py's kernels do).

LSTM forward, per step (G = 4 gates, W = 4H):
    a = a_x + gamma_hh P^ + beta_hh,  P^ = (P - mean(P)) / std(P)        (W,)
    i, f, g, o = sigmoid, sigmoid, tanh, sigmoid of a's four parts
    c' = f c + i g,  h' = o tanh(gamma_c c^ + beta_c),  c^ = (c' - mean(c')) / std(c')
LSTM backward, per step, with g_h = dL/dh' (output and carried) and dc = dL/dc' (carried):
    y = gamma_c c^ + beta_c,  da_o = g_h tanh(y) o (1 - o),  dy = g_h o (1 - tanh(y)^2)
    dc~ = dc + (dx^ - mean(dx^) - c^ mean(dx^ c^)) / std(c'),  dx^ = gamma_c dy
    da_i = dc~ g i (1 - i),  da_f = dc~ c f (1 - f),  da_g = dc~ i (1 - g^2),  dc_prev = dc~ f
    dP = (dP^ - mean(dP^) - P^ mean(dP^ P^)) / std(P),  dP^ = gamma_hh da
    dh_prev = dP W_hh
GRU (reset after), W = 3H, a_h = gamma_hh P^ + beta_hh:
    r = sigmoid(a_x,r + a_h,r),  z = sigmoid(a_x,z + a_h,z),  n = tanh(a_x,n + r a_h,n)
    h' = (1 - z) n + z h
    da_n = g_h (1 - z)(1 - n^2),  da_z = g_h (h - n) z (1 - z),  da_r = da_n a_h,n r (1 - r)
    d a_x = (da_r, da_z, da_n),  d a_h = (da_r, da_z, r da_n)
    dh_prev = g_h z + dP W_hh, dP from d a_h as the LSTM's from da
The weight gradients are sums over all steps and rows, as torch ops after the kernel:
dW_hh = dP^T h_prev, d gamma_hh = sum of d a_h P^, d beta_hh = sum of d a_h, and for the LSTM
d gamma_c = sum of dy c^, d beta_c = sum of dy.

Recurrent dropout and zoneout (rnnkit.variants.regularization; the derivation of
kernels/cpu/layer_norm.py), masks drawn per direction by draw_masks as the reference loop draws
them: the product takes hm = h * m (P = hm W_hh^T, dW_hh = dP^T hm_prev, dh_prev gets
(dP W_hh) * m; the GRU's carry z h keeps the whole h), and zoneout mixes the old state into the
new one, h' = k h + (1 - k) h~, c' = k_c c + (1 - k_c) c~, with h~ = o tanh(LN(c~)). Backward:
h~ gets (1 - k) g_h and h_prev k g_h; c~ gets (1 - k_c) dc and c_prev k_c dc + f dc~.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from rnnkit.cells.layer_norm import LAYER_NORM_EPS
from rnnkit.kernels.gpu._common import (
    BLOCK_B,
    InLoop,
    accumulate_dtype,
    add_rows_times_weight,
    block_size,
    device_lengths,
    dot_precision,
    empty_like_nothing,
    flat,
    in_loop_arguments,
    keep_weight,
    previous_states,
    sigmoid,
    tanh,
    time_index,
    zone_out,
)

MODES = ("LN_LSTM", "LN_GRU")
# Tile widths: units (or columns of the W-wide pre-activations) per pass, and the reduction
# width of each product chunk.
_MAX_BLOCK_N = 32
_MAX_BLOCK_K = 64


@triton.jit
def _inverse_std(v_ptr, v_rows, row_ok, mean, W, EPS: tl.constexpr, BLOCK_N: tl.constexpr):
    """1 / sqrt(var + EPS) of each row's W values at v_ptr (written by other threads: the
    caller's barrier comes first), about their mean."""
    spread = mean * 0
    for start in range(0, W, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = row_ok[:, None] & (cols < W)[None, :]
        v = tl.load(
            v_ptr + v_rows[:, None] + cols[None, :], mask=mask, other=0.0, cache_modifier=".cg"
        )
        d = tl.where(mask, v - mean[:, None], 0.0)
        spread += tl.sum(d * d, axis=1)
    return 1.0 / tl.sqrt(spread / W + EPS)


@triton.jit
def _recurrent_statistics(
    h_ptr, h_rows, rows, row_ok, mask_ptr, w_hh_ptr, p_ptr, p_rows, H, W,
    DROPOUT: tl.constexpr, EPS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """P = hm W_hh^T (BLOCK_B, W) written to p_ptr, hm = h * m with the recurrent dropout mask
    when DROPOUT, else h; returns the rows' mean and 1/std of P."""
    total = tl.zeros([BLOCK_B], p_ptr.dtype.element_ty)
    for start in range(0, W, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < W
        p = tl.zeros([BLOCK_B, BLOCK_N], p_ptr.dtype.element_ty)
        for k_start in range(0, H, BLOCK_K):
            ks = k_start + tl.arange(0, BLOCK_K)
            k_mask = row_ok[:, None] & (ks < H)[None, :]
            h = tl.load(
                h_ptr + h_rows[:, None] + ks[None, :], mask=k_mask, other=0.0, cache_modifier=".cg"
            )
            if DROPOUT:
                h *= tl.load(mask_ptr + rows[:, None] * H + ks[None, :], mask=k_mask, other=0.0)
            w = tl.load(
                w_hh_ptr + cols[None, :] * H + ks[:, None],
                mask=col_ok[None, :] & (ks < H)[:, None],
                other=0.0,
            )
            p = tl.dot(h.to(w.dtype), w, p, input_precision=PRECISION, out_dtype=p.dtype)
        tl.store(p_ptr + p_rows[:, None] + cols[None, :], p, mask=row_ok[:, None] & col_ok[None, :])
        total += tl.sum(p, axis=1)
    mean = total / W
    tl.debug_barrier()
    inverse_std = _inverse_std(p_ptr, p_rows, row_ok, mean, W, EPS, BLOCK_N)
    # The gates' pass writes P^ over P in unit tiles, which map columns to threads otherwise
    # than the column tiles above: every thread must have read P first.
    tl.debug_barrier()
    return mean, inverse_std


@triton.jit
def _step_slot(time, SAVE: tl.constexpr):
    """The row of the per-step buffers for this step: its time, or 0 when they hold one step."""
    if SAVE:
        return time
    else:
        return time * 0


@triton.jit
def _normalised_gate(
    a_x_ptr, x_rows, p_ptr, p_rows, g_hh_ptr, b_hh_ptr, gate, H, units, unit_ok, mask, mean,
    inverse_std, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """(a_x, a_h) of one gate's units: a_h = gamma_hh P^ + beta_hh; P^ replaces P at p_ptr."""
    cols = gate * H + units
    p = tl.load(p_ptr + p_rows[:, None] + cols[None, :], mask=mask, other=0.0, cache_modifier=".cg")
    p_hat = (p - mean[:, None]) * inverse_std[:, None]
    tl.store(p_ptr + p_rows[:, None] + cols[None, :], p_hat, mask=mask)
    a_h = tl.load(g_hh_ptr + cols, mask=unit_ok, other=0.0).to(p.dtype)[None, :] * p_hat
    if HAS_BIAS:
        a_h += tl.load(b_hh_ptr + cols, mask=unit_ok, other=0.0).to(p.dtype)[None, :]
    a_x = tl.load(a_x_ptr + x_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(p.dtype)
    return a_x, a_h


@triton.jit
def _recurrent_norm_backward(
    d_a_h_ptr, p_ptr, rows_w, row_ok, valid, g_hh_ptr, inverse_std, d_p_ptr, W,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dP = (dP^ - mean(dP^) - P^ mean(dP^ P^)) * inverse_std, dP^ = gamma_hh d a_h, written to
    d_p_ptr for the valid rows (d a_h written by other threads: the caller's barrier first)."""
    sum_d = inverse_std * 0
    sum_dp = inverse_std * 0
    for start in range(0, W, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < W
        mask = valid[:, None] & col_ok[None, :]
        offsets = rows_w[:, None] + cols[None, :]
        d_a = tl.load(d_a_h_ptr + offsets, mask=mask, other=0.0, cache_modifier=".cg")
        p_hat = tl.load(p_ptr + offsets, mask=mask, other=0.0)
        d_hat = d_a * tl.load(g_hh_ptr + cols, mask=col_ok, other=0.0).to(d_a.dtype)[None, :]
        sum_d += tl.sum(d_hat, axis=1)
        sum_dp += tl.sum(d_hat * p_hat, axis=1)
    mean_d = sum_d / W
    mean_dp = sum_dp / W
    for start in range(0, W, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < W
        mask = valid[:, None] & col_ok[None, :]
        offsets = rows_w[:, None] + cols[None, :]
        d_a = tl.load(d_a_h_ptr + offsets, mask=mask, other=0.0, cache_modifier=".cg")
        p_hat = tl.load(p_ptr + offsets, mask=mask, other=0.0)
        d_hat = d_a * tl.load(g_hh_ptr + cols, mask=col_ok, other=0.0).to(d_a.dtype)[None, :]
        d_p = (d_hat - mean_d[:, None] - p_hat * mean_dp[:, None]) * inverse_std[:, None]
        tl.store(d_p_ptr + offsets, d_p, mask=mask)


@triton.jit
def _state_gradient(
    dh_ptr, carry_ptr, d_p_ptr, rows_w, rows, row_ok, valid, mask_ptr, w_hh_ptr, H, W,
    CARRY: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dh_prev = (dP W_hh) * m (the mask only when DROPOUT), plus the carried part at carry_ptr
    when CARRY, written to dh_ptr for the valid rows (dP and the carry were written by other
    threads: the caller's barrier comes first)."""
    for start in range(0, H, BLOCK_N):
        units = start + tl.arange(0, BLOCK_N)
        unit_ok = units < H
        state_offsets = rows[:, None] * H + units[None, :]
        mask = valid[:, None] & unit_ok[None, :]
        dh = tl.zeros([BLOCK_B, BLOCK_N], dh_ptr.dtype.element_ty)
        dh = add_rows_times_weight(
            dh, d_p_ptr, rows_w, row_ok, W, w_hh_ptr, 0, H, units, unit_ok, BLOCK_K, PRECISION
        )
        if DROPOUT:
            dh *= tl.load(mask_ptr + state_offsets, mask=mask, other=0.0).to(dh.dtype)
        if CARRY:
            dh += tl.load(carry_ptr + state_offsets, mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(dh_ptr + state_offsets, dh, mask=mask)


@triton.jit(do_not_specialize=["T", "B"])
def ln_lstm_forward_kernel(
    a_x_ptr,  # (T, B, 4H) LN(x W_ih^T) + beta_ih
    w_hh_ptr,  # (4H, H)
    g_hh_ptr,  # (4H,)
    b_hh_ptr,  # (4H,), read when HAS_BIAS
    g_c_ptr,  # (H,)
    b_c_ptr,  # (H,), read when HAS_BIAS
    lengths_ptr,  # (B,) int32
    h_buf_ptr,  # (2, B, H) accumulate dtype: ping-pong hidden state, [0] holds h0
    c_ptr,  # (B, H) accumulate dtype: c0 on entry, final c on exit
    out_ptr,  # (T, B, H)
    p_ptr,  # (T or 1, B, 4H) accumulate dtype: P, then P^ (saved when SAVE)
    gates_ptr,  # (T or 1, B, 4H) accumulate dtype: i, f, g, o
    c_hat_ptr,  # (T or 1, B, H) accumulate dtype: c~ (c' before zoneout), then its c^
    c_prev_ptr,  # (T, B, H) accumulate dtype: c entering each step, written when SAVE
    inverse_std_ptr,  # (T, B, 2) accumulate dtype: 1/std of P and of c~, written when SAVE
    mask_ptr,  # (B, H) recurrent dropout mask, read when DROPOUT
    keep_h_ptr,  # zoneout of h: (T, B, H) 0/1 mask by processing step (ZONEOUT 1), (1,) p (2)
    keep_c_ptr,  # zoneout of c, the same (ZONEOUT_C)
    T,
    B,
    H,
    HAS_BIAS: tl.constexpr,
    REVERSE: tl.constexpr,
    SAVE: tl.constexpr,
    DROPOUT: tl.constexpr,
    ZONEOUT: tl.constexpr,
    ZONEOUT_C: tl.constexpr,
    EPS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    lengths = tl.load(lengths_ptr + rows, mask=row_ok, other=0)
    W = 4 * H
    for step in range(T):
        time = time_index(step, lengths, REVERSE)
        valid = row_ok & (step < lengths)
        slot = _step_slot(time, SAVE)
        h_rows = (step % 2) * B * H + rows * H
        p_rows = (slot * B + rows) * W
        mean, inverse_std = _recurrent_statistics(
            h_buf_ptr, h_rows, rows, row_ok, mask_ptr, w_hh_ptr, p_ptr, p_rows, H, W, DROPOUT,
            EPS, BLOCK_B, BLOCK_N, BLOCK_K, PRECISION,
        )  # fmt: skip
        x_rows = (time * B + rows) * W
        c_rows = (slot * B + rows) * H
        c_total = mean * 0
        for start in range(0, H, BLOCK_N):
            units = start + tl.arange(0, BLOCK_N)
            unit_ok = units < H
            mask = row_ok[:, None] & unit_ok[None, :]
            x_i, h_i = _normalised_gate(
                a_x_ptr, x_rows, p_ptr, p_rows, g_hh_ptr, b_hh_ptr, 0, H, units, unit_ok, mask,
                mean, inverse_std, HAS_BIAS,
            )  # fmt: skip
            x_f, h_f = _normalised_gate(
                a_x_ptr, x_rows, p_ptr, p_rows, g_hh_ptr, b_hh_ptr, 1, H, units, unit_ok, mask,
                mean, inverse_std, HAS_BIAS,
            )  # fmt: skip
            x_g, h_g = _normalised_gate(
                a_x_ptr, x_rows, p_ptr, p_rows, g_hh_ptr, b_hh_ptr, 2, H, units, unit_ok, mask,
                mean, inverse_std, HAS_BIAS,
            )  # fmt: skip
            x_o, h_o = _normalised_gate(
                a_x_ptr, x_rows, p_ptr, p_rows, g_hh_ptr, b_hh_ptr, 3, H, units, unit_ok, mask,
                mean, inverse_std, HAS_BIAS,
            )  # fmt: skip
            gate_i = sigmoid(x_i + h_i)
            gate_f = sigmoid(x_f + h_f)
            gate_g = tanh(x_g + h_g)
            gate_o = sigmoid(x_o + h_o)
            gate_offsets = p_rows[:, None] + units[None, :]
            tl.store(gates_ptr + gate_offsets, gate_i, mask=mask)
            tl.store(gates_ptr + gate_offsets + H, gate_f, mask=mask)
            tl.store(gates_ptr + gate_offsets + 2 * H, gate_g, mask=mask)
            tl.store(gates_ptr + gate_offsets + 3 * H, gate_o, mask=mask)
            state_offsets = rows[:, None] * H + units[None, :]
            c = tl.load(c_ptr + state_offsets, mask=mask, other=0.0, cache_modifier=".cg")
            c_cand = gate_f * c + gate_i * gate_g
            c_new = c_cand
            if ZONEOUT_C != 0:
                c_new = zone_out(c, c_cand, keep_c_ptr, step, rows, units, mask, B, H, ZONEOUT_C)
            if SAVE:
                tl.store(c_prev_ptr + c_rows[:, None] + units[None, :], c, mask=mask)
            tl.store(c_ptr + state_offsets, c_new, mask=valid[:, None] & unit_ok[None, :])
            tl.store(c_hat_ptr + c_rows[:, None] + units[None, :], c_cand, mask=mask)
            c_total += tl.sum(tl.where(mask, c_cand, 0.0), axis=1)
        c_mean = c_total / H
        tl.debug_barrier()
        c_inverse_std = _inverse_std(c_hat_ptr, c_rows, row_ok, c_mean, H, EPS, BLOCK_N)
        tl.debug_barrier()  # c^ is written over c~ next, which every thread must have read
        if SAVE:
            tl.store(inverse_std_ptr + (time * B + rows) * 2, inverse_std, mask=row_ok)
            tl.store(inverse_std_ptr + (time * B + rows) * 2 + 1, c_inverse_std, mask=row_ok)
        target = ((step + 1) % 2) * B * H
        for start in range(0, H, BLOCK_N):
            units = start + tl.arange(0, BLOCK_N)
            unit_ok = units < H
            mask = row_ok[:, None] & unit_ok[None, :]
            c_offsets = c_rows[:, None] + units[None, :]
            c_cand = tl.load(c_hat_ptr + c_offsets, mask=mask, other=0.0, cache_modifier=".cg")
            c_hat = (c_cand - c_mean[:, None]) * c_inverse_std[:, None]
            tl.store(c_hat_ptr + c_offsets, c_hat, mask=mask)
            y = tl.load(g_c_ptr + units, mask=unit_ok, other=0.0).to(c_hat.dtype)[None, :] * c_hat
            if HAS_BIAS:
                y += tl.load(b_c_ptr + units, mask=unit_ok, other=0.0).to(c_hat.dtype)[None, :]
            gate_o = tl.load(
                gates_ptr + p_rows[:, None] + 3 * H + units[None, :], mask=mask, other=0.0,
                cache_modifier=".cg",
            )  # fmt: skip
            h_new = gate_o * tanh(y)
            state_offsets = rows[:, None] * H + units[None, :]
            h_old = tl.load(
                h_buf_ptr + h_rows[:, None] + units[None, :],
                mask=mask,
                other=0.0,
                cache_modifier=".cg",
            )
            if ZONEOUT != 0:
                h_new = zone_out(h_old, h_new, keep_h_ptr, step, rows, units, mask, B, H, ZONEOUT)
            keep = valid[:, None] & unit_ok[None, :]
            tl.store(h_buf_ptr + target + state_offsets, tl.where(keep, h_new, h_old), mask=mask)
            out_offsets = (time * B + rows)[:, None] * H + units[None, :]
            tl.store(out_ptr + out_offsets, tl.where(keep, h_new, 0.0), mask=mask)
        tl.debug_barrier()


@triton.jit(do_not_specialize=["T", "B"])
def ln_lstm_backward_kernel(
    d_out_ptr,  # (T, B, H)
    dh_ptr,  # (B, H) accumulate dtype: dL/dh_n on entry, dL/dh0 on exit
    dc_ptr,  # (B, H) accumulate dtype: dL/dc_n on entry, dL/dc0 on exit
    w_hh_ptr,  # (4H, H)
    g_hh_ptr,  # (4H,)
    g_c_ptr,  # (H,)
    b_c_ptr,  # (H,), read when HAS_BIAS
    lengths_ptr,  # (B,) int32
    p_ptr,  # (T, B, 4H) P^ (forward's)
    gates_ptr,  # (T, B, 4H)
    c_hat_ptr,  # (T, B, H)
    c_prev_ptr,  # (T, B, H)
    inverse_std_ptr,  # (T, B, 2)
    d_a_ptr,  # (T, B, 4H) accumulate dtype, zeros: dL/da (both a_x's and a_h's)
    d_y_ptr,  # (T, B, H) accumulate dtype, zeros: dL/dy of y = LN(c~)
    d_p_ptr,  # (T, B, 4H) accumulate dtype, zeros: dL/dP
    carry_ptr,  # (B, H) accumulate dtype: scratch for k g_h, used when ZONEOUT
    mask_ptr,  # (B, H) recurrent dropout mask, read when DROPOUT
    keep_h_ptr,  # zoneout of h: (T, B, H) 0/1 mask by processing step (ZONEOUT 1), (1,) p (2)
    keep_c_ptr,  # zoneout of c, the same (ZONEOUT_C)
    T,
    B,
    H,
    HAS_BIAS: tl.constexpr,
    REVERSE: tl.constexpr,
    DROPOUT: tl.constexpr,
    ZONEOUT: tl.constexpr,
    ZONEOUT_C: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    lengths = tl.load(lengths_ptr + rows, mask=row_ok, other=0)
    W = 4 * H
    for back in range(T):
        step = T - 1 - back
        time = time_index(step, lengths, REVERSE)
        valid = row_ok & (step < lengths)
        rows_w = (time * B + rows) * W
        rows_h = (time * B + rows) * H
        inverse_std = tl.load(inverse_std_ptr + (time * B + rows) * 2, mask=row_ok, other=0.0)
        c_inverse_std = tl.load(inverse_std_ptr + (time * B + rows) * 2 + 1, mask=row_ok, other=0.0)
        sum_d = inverse_std * 0
        sum_dc = inverse_std * 0
        for start in range(0, H, BLOCK_N):
            units = start + tl.arange(0, BLOCK_N)
            unit_ok = units < H
            mask = valid[:, None] & unit_ok[None, :]
            h_offsets = rows_h[:, None] + units[None, :]
            g_h = tl.load(
                dh_ptr + rows[:, None] * H + units[None, :],
                mask=mask,
                other=0.0,
                cache_modifier=".cg",
            )
            g_h += tl.load(d_out_ptr + h_offsets, mask=mask, other=0.0).to(g_h.dtype)
            if ZONEOUT != 0:
                kept = keep_weight(keep_h_ptr, step, rows, units, mask, B, H, ZONEOUT)
                tl.store(carry_ptr + rows[:, None] * H + units[None, :], kept * g_h, mask=mask)
                g_h = (1.0 - kept) * g_h  # the part that reaches h~
            gate_o = tl.load(
                gates_ptr + rows_w[:, None] + 3 * H + units[None, :], mask=mask, other=0.0
            )
            c_hat = tl.load(c_hat_ptr + h_offsets, mask=mask, other=0.0)
            g_c = tl.load(g_c_ptr + units, mask=unit_ok, other=0.0).to(g_h.dtype)[None, :]
            y = g_c * c_hat
            if HAS_BIAS:
                y += tl.load(b_c_ptr + units, mask=unit_ok, other=0.0).to(g_h.dtype)[None, :]
            tanh_y = tanh(y)
            d_o = g_h * tanh_y * gate_o * (1.0 - gate_o)
            d_y = g_h * gate_o * (1.0 - tanh_y * tanh_y)
            tl.store(d_a_ptr + rows_w[:, None] + 3 * H + units[None, :], d_o, mask=mask)
            tl.store(d_y_ptr + h_offsets, d_y, mask=mask)
            d_hat = tl.where(mask, d_y * g_c, 0.0)
            sum_d += tl.sum(d_hat, axis=1)
            sum_dc += tl.sum(d_hat * c_hat, axis=1)
        mean_d = sum_d / H
        mean_dc = sum_dc / H
        tl.debug_barrier()
        for start in range(0, H, BLOCK_N):
            units = start + tl.arange(0, BLOCK_N)
            unit_ok = units < H
            mask = valid[:, None] & unit_ok[None, :]
            h_offsets = rows_h[:, None] + units[None, :]
            d_y = tl.load(d_y_ptr + h_offsets, mask=mask, other=0.0, cache_modifier=".cg")
            c_hat = tl.load(c_hat_ptr + h_offsets, mask=mask, other=0.0)
            g_c = tl.load(g_c_ptr + units, mask=unit_ok, other=0.0).to(d_y.dtype)[None, :]
            state_offsets = rows[:, None] * H + units[None, :]
            dc = tl.load(dc_ptr + state_offsets, mask=mask, other=0.0, cache_modifier=".cg")
            d_cand = dc  # dL/dc~: the part of dc that reaches c~, and the path through h~
            if ZONEOUT_C != 0:
                kept_c = keep_weight(keep_c_ptr, step, rows, units, mask, B, H, ZONEOUT_C)
                d_cand = (1.0 - kept_c) * dc
            d_hat = d_y * g_c - mean_d[:, None] - c_hat * mean_dc[:, None]
            d_cand += d_hat * c_inverse_std[:, None]
            gate_offsets = rows_w[:, None] + units[None, :]
            gate_i = tl.load(gates_ptr + gate_offsets, mask=mask, other=0.0)
            gate_f = tl.load(gates_ptr + gate_offsets + H, mask=mask, other=0.0)
            gate_g = tl.load(gates_ptr + gate_offsets + 2 * H, mask=mask, other=0.0)
            c_prev = tl.load(c_prev_ptr + h_offsets, mask=mask, other=0.0)
            d_i = d_cand * gate_g * gate_i * (1.0 - gate_i)
            d_f = d_cand * c_prev * gate_f * (1.0 - gate_f)
            d_g = d_cand * gate_i * (1.0 - gate_g * gate_g)
            tl.store(d_a_ptr + gate_offsets, d_i, mask=mask)
            tl.store(d_a_ptr + gate_offsets + H, d_f, mask=mask)
            tl.store(d_a_ptr + gate_offsets + 2 * H, d_g, mask=mask)
            dc_prev = d_cand * gate_f
            if ZONEOUT_C != 0:
                dc_prev += kept_c * dc
            tl.store(dc_ptr + state_offsets, dc_prev, mask=mask)
        tl.debug_barrier()
        _recurrent_norm_backward(
            d_a_ptr, p_ptr, rows_w, row_ok, valid, g_hh_ptr, inverse_std, d_p_ptr, W, BLOCK_N
        )
        tl.debug_barrier()
        _state_gradient(
            dh_ptr, carry_ptr, d_p_ptr, rows_w, rows, row_ok, valid, mask_ptr, w_hh_ptr, H, W,
            ZONEOUT != 0, DROPOUT, BLOCK_B, BLOCK_N, BLOCK_K, PRECISION,
        )  # fmt: skip
        tl.debug_barrier()


@triton.jit(do_not_specialize=["T", "B"])
def ln_gru_forward_kernel(
    a_x_ptr,  # (T, B, 3H) LN(x W_ih^T) + beta_ih
    w_hh_ptr,  # (3H, H)
    g_hh_ptr,  # (3H,)
    b_hh_ptr,  # (3H,), read when HAS_BIAS
    lengths_ptr,  # (B,) int32
    h_buf_ptr,  # (2, B, H) accumulate dtype: ping-pong hidden state, [0] holds h0
    out_ptr,  # (T, B, H)
    p_ptr,  # (T or 1, B, 3H) accumulate dtype: P, then P^ (saved when SAVE)
    gates_ptr,  # (T, B, 3H) accumulate dtype: r, z, n, written when SAVE
    inverse_std_ptr,  # (T, B) accumulate dtype: 1/std of P, written when SAVE
    mask_ptr,  # (B, H) recurrent dropout mask, read when DROPOUT
    keep_h_ptr,  # zoneout of h: (T, B, H) 0/1 mask by processing step (ZONEOUT 1), (1,) p (2)
    T,
    B,
    H,
    HAS_BIAS: tl.constexpr,
    REVERSE: tl.constexpr,
    SAVE: tl.constexpr,
    DROPOUT: tl.constexpr,
    ZONEOUT: tl.constexpr,
    EPS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    lengths = tl.load(lengths_ptr + rows, mask=row_ok, other=0)
    W = 3 * H
    for step in range(T):
        time = time_index(step, lengths, REVERSE)
        valid = row_ok & (step < lengths)
        slot = _step_slot(time, SAVE)
        h_rows = (step % 2) * B * H + rows * H
        p_rows = (slot * B + rows) * W
        mean, inverse_std = _recurrent_statistics(
            h_buf_ptr, h_rows, rows, row_ok, mask_ptr, w_hh_ptr, p_ptr, p_rows, H, W, DROPOUT,
            EPS, BLOCK_B, BLOCK_N, BLOCK_K, PRECISION,
        )  # fmt: skip
        if SAVE:
            tl.store(inverse_std_ptr + time * B + rows, inverse_std, mask=row_ok)
        x_rows = (time * B + rows) * W
        target = ((step + 1) % 2) * B * H
        for start in range(0, H, BLOCK_N):
            units = start + tl.arange(0, BLOCK_N)
            unit_ok = units < H
            mask = row_ok[:, None] & unit_ok[None, :]
            x_r, h_r = _normalised_gate(
                a_x_ptr, x_rows, p_ptr, p_rows, g_hh_ptr, b_hh_ptr, 0, H, units, unit_ok, mask,
                mean, inverse_std, HAS_BIAS,
            )  # fmt: skip
            x_z, h_z = _normalised_gate(
                a_x_ptr, x_rows, p_ptr, p_rows, g_hh_ptr, b_hh_ptr, 1, H, units, unit_ok, mask,
                mean, inverse_std, HAS_BIAS,
            )  # fmt: skip
            x_n, h_n = _normalised_gate(
                a_x_ptr, x_rows, p_ptr, p_rows, g_hh_ptr, b_hh_ptr, 2, H, units, unit_ok, mask,
                mean, inverse_std, HAS_BIAS,
            )  # fmt: skip
            reset = sigmoid(x_r + h_r)
            update = sigmoid(x_z + h_z)
            candidate = tanh(x_n + reset * h_n)
            h_old = tl.load(
                h_buf_ptr + h_rows[:, None] + units[None, :],
                mask=mask,
                other=0.0,
                cache_modifier=".cg",
            )
            h_new = (1.0 - update) * candidate + update * h_old  # the whole h, not hm, is carried
            if ZONEOUT != 0:
                h_new = zone_out(h_old, h_new, keep_h_ptr, step, rows, units, mask, B, H, ZONEOUT)
            if SAVE:
                gate_offsets = p_rows[:, None] + units[None, :]
                tl.store(gates_ptr + gate_offsets, reset, mask=mask)
                tl.store(gates_ptr + gate_offsets + H, update, mask=mask)
                tl.store(gates_ptr + gate_offsets + 2 * H, candidate, mask=mask)
            keep = valid[:, None] & unit_ok[None, :]
            state_offsets = rows[:, None] * H + units[None, :]
            tl.store(h_buf_ptr + target + state_offsets, tl.where(keep, h_new, h_old), mask=mask)
            out_offsets = (time * B + rows)[:, None] * H + units[None, :]
            tl.store(out_ptr + out_offsets, tl.where(keep, h_new, 0.0), mask=mask)
        tl.debug_barrier()


@triton.jit(do_not_specialize=["T", "B"])
def ln_gru_backward_kernel(
    d_out_ptr,  # (T, B, H)
    dh_ptr,  # (B, H) accumulate dtype: dL/dh_n on entry, dL/dh0 on exit
    carry_ptr,  # (B, H) accumulate dtype: scratch for the carried part, g_h z (+ k g_h)
    w_hh_ptr,  # (3H, H)
    g_hh_ptr,  # (3H,)
    b_hh_ptr,  # (3H,), read when HAS_BIAS
    lengths_ptr,  # (B,) int32
    p_ptr,  # (T, B, 3H) P^ (forward's)
    gates_ptr,  # (T, B, 3H) r, z, n
    inverse_std_ptr,  # (T, B)
    h_prev_ptr,  # (T, B, H) the state each step started from
    d_a_x_ptr,  # (T, B, 3H) accumulate dtype, zeros: dL/da_x
    d_a_h_ptr,  # (T, B, 3H) accumulate dtype, zeros: dL/da_h
    d_p_ptr,  # (T, B, 3H) accumulate dtype, zeros: dL/dP
    mask_ptr,  # (B, H) recurrent dropout mask, read when DROPOUT
    keep_h_ptr,  # zoneout of h: (T, B, H) 0/1 mask by processing step (ZONEOUT 1), (1,) p (2)
    T,
    B,
    H,
    HAS_BIAS: tl.constexpr,
    REVERSE: tl.constexpr,
    DROPOUT: tl.constexpr,
    ZONEOUT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    lengths = tl.load(lengths_ptr + rows, mask=row_ok, other=0)
    W = 3 * H
    for back in range(T):
        step = T - 1 - back
        time = time_index(step, lengths, REVERSE)
        valid = row_ok & (step < lengths)
        rows_w = (time * B + rows) * W
        rows_h = (time * B + rows) * H
        for start in range(0, H, BLOCK_N):
            units = start + tl.arange(0, BLOCK_N)
            unit_ok = units < H
            mask = valid[:, None] & unit_ok[None, :]
            state_offsets = rows[:, None] * H + units[None, :]
            g_h = tl.load(dh_ptr + state_offsets, mask=mask, other=0.0, cache_modifier=".cg")
            g_h += tl.load(d_out_ptr + rows_h[:, None] + units[None, :], mask=mask, other=0.0).to(
                g_h.dtype
            )
            carried = g_h * 0
            if ZONEOUT != 0:
                kept = keep_weight(keep_h_ptr, step, rows, units, mask, B, H, ZONEOUT)
                carried = kept * g_h
                g_h = (1.0 - kept) * g_h  # the part that reaches h~
            gate_offsets = rows_w[:, None] + units[None, :]
            reset = tl.load(gates_ptr + gate_offsets, mask=mask, other=0.0)
            update = tl.load(gates_ptr + gate_offsets + H, mask=mask, other=0.0)
            candidate = tl.load(gates_ptr + gate_offsets + 2 * H, mask=mask, other=0.0)
            h_prev = tl.load(h_prev_ptr + rows_h[:, None] + units[None, :], mask=mask, other=0.0)
            a_h_n = tl.load(p_ptr + gate_offsets + 2 * H, mask=mask, other=0.0)
            a_h_n *= tl.load(g_hh_ptr + 2 * H + units, mask=unit_ok, other=0.0).to(g_h.dtype)[
                None, :
            ]
            if HAS_BIAS:
                a_h_n += tl.load(b_hh_ptr + 2 * H + units, mask=unit_ok, other=0.0).to(g_h.dtype)[
                    None, :
                ]
            d_n = g_h * (1.0 - update) * (1.0 - candidate * candidate)
            d_z = g_h * (h_prev.to(g_h.dtype) - candidate) * update * (1.0 - update)
            d_r = d_n * a_h_n * reset * (1.0 - reset)
            tl.store(d_a_x_ptr + gate_offsets, d_r, mask=mask)
            tl.store(d_a_x_ptr + gate_offsets + H, d_z, mask=mask)
            tl.store(d_a_x_ptr + gate_offsets + 2 * H, d_n, mask=mask)
            tl.store(d_a_h_ptr + gate_offsets, d_r, mask=mask)
            tl.store(d_a_h_ptr + gate_offsets + H, d_z, mask=mask)
            tl.store(d_a_h_ptr + gate_offsets + 2 * H, d_n * reset, mask=mask)
            tl.store(carry_ptr + state_offsets, carried + g_h * update, mask=mask)
        tl.debug_barrier()
        inverse_std = tl.load(inverse_std_ptr + time * B + rows, mask=row_ok, other=0.0)
        _recurrent_norm_backward(
            d_a_h_ptr, p_ptr, rows_w, row_ok, valid, g_hh_ptr, inverse_std, d_p_ptr, W, BLOCK_N
        )
        tl.debug_barrier()
        _state_gradient(
            dh_ptr, carry_ptr, d_p_ptr, rows_w, rows, row_ok, valid, mask_ptr, w_hh_ptr, H, W,
            True, DROPOUT, BLOCK_B, BLOCK_N, BLOCK_K, PRECISION,
        )  # fmt: skip
        tl.debug_barrier()


def _tiles(hidden: int, width: int) -> tuple[int, int, int]:
    """BLOCK_N, and BLOCK_K of the forward's (over H) and the backward's (over W) products."""
    return (
        block_size(hidden, _MAX_BLOCK_N),
        block_size(hidden, _MAX_BLOCK_K),
        block_size(width, _MAX_BLOCK_K),
    )


def _grid(batch: int) -> tuple[int]:
    return (triton.cdiv(batch, BLOCK_B),)


def _bias_or_nothing(bias: Tensor | None, like: Tensor) -> Tensor:
    return empty_like_nothing(like.device, like.dtype) if bias is None else bias.contiguous()


def _forward(a_x, h0, c0, w_hh, g_hh, b_hh, g_c, b_c, lengths, reverse, in_loop, save):
    """Run the forward kernel: output (T, B, H), h_n, c_n (None for the GRU), and the buffers
    the backward reads when save (else None). in_loop: in_loop_arguments' (tensors, constants)."""
    steps, batch, width = a_x.shape
    hidden = w_hh.size(1)
    lstm = c0 is not None
    acc = accumulate_dtype(a_x.dtype)
    slots = steps if save else 1
    h_buf = torch.empty(2, batch, hidden, device=a_x.device, dtype=acc)
    h_buf[0] = h0
    out = torch.empty(steps, batch, hidden, device=a_x.device, dtype=a_x.dtype)
    p = torch.empty(slots, batch, width, device=a_x.device, dtype=acc)
    kernel_lengths = device_lengths(lengths, steps, batch, a_x.device)
    block_n, block_k, _ = _tiles(hidden, width)
    (mask, keep_h, keep_c), switches = in_loop
    constants = {
        "HAS_BIAS": b_hh is not None, "REVERSE": reverse, "SAVE": save, "EPS": LAYER_NORM_EPS,
        "DROPOUT": switches["DROPOUT"], "ZONEOUT": switches["ZONEOUT"], "BLOCK_B": BLOCK_B,
        "BLOCK_N": block_n, "BLOCK_K": block_k, "PRECISION": dot_precision(a_x),
    }  # fmt: skip
    nothing = empty_like_nothing(a_x.device, acc)
    if lstm:
        c = c0.to(acc).contiguous().clone()
        gates = torch.empty(slots, batch, width, device=a_x.device, dtype=acc)
        c_hat = torch.empty(slots, batch, hidden, device=a_x.device, dtype=acc)
        c_prev = torch.empty_like(c_hat) if save else nothing
        inverse_std = (
            torch.empty(steps, batch, 2, device=a_x.device, dtype=acc) if save else nothing
        )
        ln_lstm_forward_kernel[_grid(batch)](
            a_x, w_hh, g_hh, _bias_or_nothing(b_hh, g_hh), g_c, _bias_or_nothing(b_c, g_c),
            kernel_lengths, h_buf, c, out, p, gates, c_hat, c_prev, inverse_std, mask, keep_h,
            keep_c, steps, batch, hidden, ZONEOUT_C=switches["ZONEOUT_C"], **constants,
        )  # fmt: skip
        saved = (p, gates, c_hat, c_prev, inverse_std) if save else None
        c_n = c.to(a_x.dtype)
    else:
        gates = torch.empty(steps, batch, width, device=a_x.device, dtype=acc) if save else nothing
        inverse_std = torch.empty(steps, batch, device=a_x.device, dtype=acc) if save else nothing
        ln_gru_forward_kernel[_grid(batch)](
            a_x, w_hh, g_hh, _bias_or_nothing(b_hh, g_hh), kernel_lengths, h_buf, out, p, gates,
            inverse_std, mask, keep_h, steps, batch, hidden, **constants,
        )  # fmt: skip
        saved = (p, gates, inverse_std) if save else None
        c_n = None
    return out, h_buf[steps % 2].to(a_x.dtype), c_n, saved


class LayerNormRecurrence(torch.autograd.Function):
    """One direction's recurrence of a layer-normalised LSTM or GRU: a_x (T, B, G*H) -> output
    (T, B, H), h_n, and c_n (LSTM; None for the GRU). mask, keep_h, keep_c and switches: the
    in-loop regularisers as in_loop_arguments gives them."""

    @staticmethod
    def forward(
        ctx, a_x, h0, c0, w_hh, g_hh, b_hh, g_c, b_c, lengths, reverse, mask, keep_h, keep_c,
        switches,
    ):  # fmt: skip
        a_x = a_x.contiguous()
        in_loop = ((mask, keep_h, keep_c), switches)
        out, h_n, c_n, saved = _forward(
            a_x, h0, c0, w_hh, g_hh, b_hh, g_c, b_c, lengths, reverse, in_loop, save=True
        )
        ctx.reverse, ctx.switches = reverse, switches
        ctx.save_for_backward(
            h0, c0, w_hh, g_hh, b_hh, g_c, b_c, lengths, mask, keep_h, keep_c, out, *saved
        )
        return out, h_n, c_n

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_h_n, d_c_n):
        h0, c0, w_hh, g_hh, b_hh, g_c, b_c, lengths, mask, keep_h, keep_c, out, *saved = (
            ctx.saved_tensors
        )
        steps, batch, hidden = out.shape
        width = w_hh.size(0)
        acc = saved[0].dtype
        device = out.device
        zeros = lambda *shape: torch.zeros(*shape, device=device, dtype=acc)  # noqa: E731
        d_out = torch.zeros_like(out) if d_out is None else d_out.contiguous()
        dh = zeros(batch, hidden) if d_h_n is None else d_h_n.to(acc).contiguous().clone()
        kernel_lengths = device_lengths(lengths, steps, batch, device)
        block_n, _, block_k = _tiles(hidden, width)
        switches = ctx.switches
        constants = {
            "HAS_BIAS": b_hh is not None, "REVERSE": ctx.reverse, "DROPOUT": switches["DROPOUT"],
            "ZONEOUT": switches["ZONEOUT"], "BLOCK_B": BLOCK_B, "BLOCK_N": block_n,
            "BLOCK_K": block_k, "PRECISION": dot_precision(out),
        }  # fmt: skip
        d_a_x = zeros(steps, batch, width)
        d_p = zeros(steps, batch, width)
        carry = torch.empty_like(dh)
        h_prev = previous_states(out, h0.to(out.dtype), lengths, ctx.reverse)
        d_g_c = d_b_c = d_c0 = None
        if c0 is not None:
            p, gates, c_hat, c_prev, inverse_std = saved
            dc = zeros(batch, hidden) if d_c_n is None else d_c_n.to(acc).contiguous().clone()
            d_y = zeros(steps, batch, hidden)
            ln_lstm_backward_kernel[_grid(batch)](
                d_out, dh, dc, w_hh, g_hh, g_c, _bias_or_nothing(b_c, g_c), kernel_lengths, p,
                gates, c_hat, c_prev, inverse_std, d_a_x, d_y, d_p, carry, mask, keep_h, keep_c,
                steps, batch, hidden, ZONEOUT_C=switches["ZONEOUT_C"], **constants,
            )  # fmt: skip
            d_a_h = d_a_x
            d_g_c = (d_y * c_hat).sum((0, 1))
            d_b_c = d_y.sum((0, 1)) if b_c is not None else None
            d_c0 = dc
        else:
            p, gates, inverse_std = saved
            d_a_h = zeros(steps, batch, width)
            ln_gru_backward_kernel[_grid(batch)](
                d_out, dh, carry, w_hh, g_hh, _bias_or_nothing(b_hh, g_hh), kernel_lengths, p,
                gates, inverse_std, h_prev.contiguous(), d_a_x, d_a_h, d_p, mask, keep_h, steps,
                batch, hidden, **constants,
            )  # fmt: skip
        if switches["DROPOUT"]:  # the product saw hm = h * m
            h_prev = h_prev * mask
        d_w_hh = flat(d_p).T @ flat(h_prev).to(acc)
        d_g_hh = (d_a_h * p).sum((0, 1))
        d_b_hh = d_a_h.sum((0, 1)) if b_hh is not None else None
        dtype = out.dtype
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        return (
            cast(d_a_x), cast(dh), cast(d_c0), cast(d_w_hh), cast(d_g_hh), cast(d_b_hh),
            cast(d_g_c), cast(d_b_c), None, None, None, None, None, None,
        )  # fmt: skip


def run_direction(
    mode: str,
    x: Tensor,
    state: tuple[Tensor, ...],
    weights: tuple[Tensor | None, ...],
    lengths: Tensor | None,
    reverse: bool,
    in_loop: InLoop | None = None,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """(T, B, I) input, ((B, H),) or ((B, H), (B, H)) state -> (T, B, H) output, final state;
    in_loop: the direction's recurrent dropout and zoneout (draw_masks), None when off."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    lstm = mode == "LN_LSTM"
    w_ih, w_hh, b_ih, b_hh, g_ih, g_hh = weights[:6]
    g_c, b_c = weights[6:8] if lstm else (None, None)
    width = w_ih.size(0)
    a_x = F.layer_norm(x @ w_ih.T, (width,), g_ih, b_ih, eps=LAYER_NORM_EPS)
    h0 = state[0].contiguous()
    c0 = state[1].contiguous() if lstm else None
    w_hh, g_hh = w_hh.contiguous(), g_hh.contiguous()
    reverse = bool(reverse)
    if lengths is not None:
        lengths = lengths.to(x.device)
    in_loop_tensors, switches = in_loop_arguments(in_loop, a_x)
    inputs = (a_x, h0, c0, w_hh, g_hh, b_hh, g_c, b_c)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        output, h_n, c_n = LayerNormRecurrence.apply(
            *inputs, lengths, reverse, *in_loop_tensors, switches
        )
    else:
        in_loop_pair = (in_loop_tensors, switches)
        output, h_n, c_n, _ = _forward(*inputs, lengths, reverse, in_loop_pair, save=False)
    return output, ((h_n, c_n) if lstm else (h_n,))
