"""Fused Elman RNN in Triton: one recurrent kernel over all steps, backward through time by hand.

Forward per step:  h' = act(xp[t] + h @ W_hh^T),  xp = x @ W_ih^T + b_ih + b_hh for all steps (torch)
Backward per step: dpre = dh * act'(h')  (1 - h'^2 for tanh, [h' > 0] for relu),
                   dh_prev = dpre @ W_hh
and the weight gradients as matmuls over all T * B rows: dW_ih = dpre^T x, dW_hh = dpre^T h_prev.
The backward needs nothing saved but the output itself.

Two recurrent kernels run those equations. Where the whole W_hh fits in one program
(RESIDENT_MAX_BYTES) the resident kernels load it once, keep h (or dh) in
registers across all steps, and give each program its own batch rows, so steps need no barrier
and h never goes through memory. Larger hidden sizes split the units over programs that meet at
a barrier every step (_common's plan). On an H200 at B = 16, T = 1000, H = 128, float32 (TF32)
the resident kernels took 1.81 us a step in inference and 3.15 in a training step, against
2.79 and 6.06 split over four programs, and at B = 1, T = 1000, H = 256 in bfloat16 2.42 and
4.22 against 3.15 and 6.73 (session 8 probe); at H = 256 in float32 W_hh no longer fits in
shared memory, and a launch that runs out of it falls back to the split kernels.
(The slice kernels of the LSTM and GRU were slower than the split ones for the RNN at B = 32,
H = 256 in the same probe, so the RNN has none.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from rnnkit.kernels.gpu._common import (
    OUT_OF_RESOURCES,
    PREFETCH,
    InLoop,
    accumulate_dtype,
    add_rows_times_weight,
    add_rows_times_weight_t,
    block_size,
    device_lengths,
    dot_precision,
    flat,
    in_loop_arguments,
    keep_weight,
    kernel_name,
    launch_if_it_fits,
    plan_launch,
    previous_states,
    regularizers_do_not_fit,
    step_tile,
    sync_programs,
    tanh,
    time_index,
    zone_out,
)

# Most bytes of (power-of-two padded) W_hh the resident kernels take. Measured on an H200: 128 x
# 128 float32 (64 KiB) and 256 x 256 bfloat16 (128 KiB) fit and beat the split kernels; 256 x 256
# float32 ran out of shared memory.
RESIDENT_MAX_BYTES = 128 * 1024
RESIDENT_BLOCK_B = 16  # batch rows per resident program (tl.dot needs at least 16)


@triton.jit(do_not_specialize=["T", "B"])
def rnn_forward_kernel(
    xp_ptr,  # (T, B, H) input projection with both biases
    w_hh_ptr,  # (H, H)
    lengths_ptr,  # (B,) int32
    h_buf_ptr,  # (2, B, H) accumulate dtype: ping-pong hidden state, [0] holds h0
    out_ptr,  # (T, B, H)
    counter_ptr,  # (batch tiles,) int32 zeros: barrier arrivals when SPLIT
    T,
    B,
    H,
    REVERSE: tl.constexpr,
    RELU: tl.constexpr,
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
        for n_start in range(first_col, H, programs * BLOCK_N):
            cols = n_start + tl.arange(0, BLOCK_N)
            col_ok = cols < H
            mask = row_ok[:, None] & col_ok[None, :]
            keep = valid[:, None] & col_ok[None, :]
            out_offsets = (time * B + rows)[:, None] * H + cols[None, :]
            pre = tl.load(xp_ptr + out_offsets, mask=mask, other=0.0).to(acc_dtype)
            pre = add_rows_times_weight_t(
                pre, h_buf_ptr, h_rows, row_ok, H, w_hh_ptr, 0, H, cols, col_ok, BLOCK_K, PRECISION
            )
            if RELU:
                h_new = tl.maximum(pre, 0.0)
            else:
                h_new = tanh(pre)
            state_offsets = rows[:, None] * H + cols[None, :]
            h_prev = tl.load(
                h_buf_ptr + source + state_offsets, mask=mask, other=0.0, cache_modifier=".cg"
            )
            tl.store(h_buf_ptr + target + state_offsets, tl.where(keep, h_new, h_prev), mask=mask)
            h_out = tl.where(keep, h_new, 0.0)
            tl.store(out_ptr + out_offsets, h_out.to(out_ptr.dtype.element_ty), mask=mask)
        arrivals = sync_programs(counter, arrivals, programs, SPLIT)


@triton.jit(do_not_specialize=["T", "B"])
def rnn_backward_kernel(
    dout_ptr,  # (T, B, H) accumulate dtype
    dh_buf_ptr,  # (2, B, H): ping-pong hidden gradient, [0] holds dh_n; dh0 on exit at [T % 2]
    out_ptr,  # (T, B, H) the forward's output
    w_hh_ptr,  # (H, H)
    lengths_ptr,
    dpre_ptr,  # (T, B, H) out: gradient of the pre-activations (zero at padding)
    counter_ptr,  # (batch tiles,) int32 zeros: barrier arrivals when SPLIT
    T,
    B,
    H,
    REVERSE: tl.constexpr,
    RELU: tl.constexpr,
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
        valid = row_ok & (step < lengths)
        source = (back % 2) * B * H
        target = ((back + 1) % 2) * B * H
        pre_rows = (time * B + rows) * H
        for n_start in range(first_col, H, programs * BLOCK_N):
            cols = n_start + tl.arange(0, BLOCK_N)
            col_ok = cols < H
            mask = row_ok[:, None] & col_ok[None, :]
            keep = valid[:, None] & col_ok[None, :]
            state_offsets = rows[:, None] * H + cols[None, :]
            out_offsets = pre_rows[:, None] + cols[None, :]
            dh = tl.load(
                dh_buf_ptr + source + state_offsets, mask=mask, other=0.0, cache_modifier=".cg"
            )
            dh += tl.load(dout_ptr + out_offsets, mask=keep, other=0.0)
            h = tl.load(out_ptr + out_offsets, mask=keep, other=0.0).to(acc_dtype)
            if RELU:
                dpre = tl.where(h > 0.0, dh, 0.0)
            else:
                dpre = dh * (1.0 - h * h)
            tl.store(dpre_ptr + out_offsets, tl.where(keep, dpre, 0.0), mask=mask)
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
                pre_rows,
                row_ok,
                H,
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
def rnn_resident_forward_kernel(
    xp_ptr,  # (T, B, H) input projection with both biases
    w_hh_ptr,  # (H, H)
    lengths_ptr,  # (B,) int32
    h0_ptr,  # (B, H) accumulate dtype
    out_ptr,  # (T, B, H)
    h_n_ptr,  # (B, H) accumulate dtype, written on exit
    mask_ptr,  # (B, H) recurrent dropout mask, read when DROPOUT
    keep_ptr,  # zoneout: (T, B, H) 0/1 mask by processing step (ZONEOUT 1), or (1,) p (2)
    cand_ptr,  # (T, B, H) act(pre) before zoneout, written when ZONEOUT and SAVE
    T,
    B,
    H,
    REVERSE: tl.constexpr,
    RELU: tl.constexpr,
    DROPOUT: tl.constexpr,
    ZONEOUT: tl.constexpr,
    SAVE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PRECISION: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """The recurrence with W_hh and h held in one program; with the in-loop regularisers, the
    product sees h * m and h' = h~ + k (h - h~) (kernels/cpu/regularized.py's equations).
    PREFETCH loads each step's input projection one step ahead: it does not depend on h, so its
    latency can overlap the step before instead of stalling the product."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    lengths = tl.load(lengths_ptr + rows, mask=row_ok, other=0)
    units = tl.arange(0, BLOCK_H)
    unit_ok = units < H
    mask = row_ok[:, None] & unit_ok[None, :]
    # w_t[k, n] = W_hh[n, k]; the padding rows and columns are zero, so padded units stay 0.
    w_t = tl.load(
        w_hh_ptr + units[None, :] * H + units[:, None],
        mask=unit_ok[None, :] & unit_ok[:, None],
        other=0.0,
    )
    state_offsets = rows[:, None] * H + units[None, :]
    h = tl.load(h0_ptr + state_offsets, mask=mask, other=0.0)
    if DROPOUT:
        dropout = tl.load(mask_ptr + state_offsets, mask=mask, other=0.0)
    if PREFETCH:
        xp_next = step_tile(xp_ptr, 0, T, lengths, rows, units, mask, B, H, REVERSE)
    for step in range(T):
        time = time_index(step, lengths, REVERSE)
        valid = (row_ok & (step < lengths))[:, None]
        out_offsets = (time * B + rows)[:, None] * H + units[None, :]
        if PREFETCH:
            pre = xp_next.to(h.dtype)
            xp_next = step_tile(xp_ptr, step + 1, T, lengths, rows, units, mask, B, H, REVERSE)
        else:
            pre = tl.load(xp_ptr + out_offsets, mask=mask, other=0.0).to(h.dtype)
        recurrent_input = h * dropout if DROPOUT else h
        pre = tl.dot(
            recurrent_input.to(w_t.dtype), w_t, pre, input_precision=PRECISION, out_dtype=h.dtype
        )
        if RELU:
            h_new = tl.maximum(pre, 0.0)
        else:
            h_new = tanh(pre)
        if ZONEOUT != 0:
            if SAVE:
                tl.store(cand_ptr + out_offsets, h_new, mask=mask)
            h_new = zone_out(h, h_new, keep_ptr, step, rows, units, mask, B, H, ZONEOUT)
        h = tl.where(valid, h_new, h)
        h_out = tl.where(valid, h_new, 0.0)
        tl.store(out_ptr + out_offsets, h_out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(h_n_ptr + state_offsets, h, mask=mask)


@triton.jit(do_not_specialize=["T", "B"])
def rnn_resident_backward_kernel(
    dout_ptr,  # (T, B, H) accumulate dtype
    out_ptr,  # (T, B, H) the forward's output
    w_hh_ptr,  # (H, H)
    lengths_ptr,
    dh_n_ptr,  # (B, H) accumulate dtype
    dpre_ptr,  # (T, B, H) out: gradient of the pre-activations (zero at padding)
    dh0_ptr,  # (B, H) accumulate dtype, written on exit
    mask_ptr,  # (B, H) recurrent dropout mask, read when DROPOUT
    keep_ptr,  # zoneout: (T, B, H) 0/1 mask by processing step (ZONEOUT 1), or (1,) p (2)
    cand_ptr,  # (T, B, H) act(pre) before zoneout, read when ZONEOUT
    T,
    B,
    H,
    REVERSE: tl.constexpr,
    RELU: tl.constexpr,
    DROPOUT: tl.constexpr,
    ZONEOUT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PRECISION: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """Backward of rnn_resident_forward_kernel: with zoneout the gradient reaching h' splits
    into (1 - k) dh' for h~ and k dh' straight to h; the product's part is masked by m.
    PREFETCH loads each step's output gradient and activation one step ahead, as the forward
    does its input."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    lengths = tl.load(lengths_ptr + rows, mask=row_ok, other=0)
    units = tl.arange(0, BLOCK_H)
    unit_ok = units < H
    mask = row_ok[:, None] & unit_ok[None, :]
    w = tl.load(
        w_hh_ptr + units[:, None] * H + units[None, :],
        mask=unit_ok[:, None] & unit_ok[None, :],
        other=0.0,
    )
    state_offsets = rows[:, None] * H + units[None, :]
    dh = tl.load(dh_n_ptr + state_offsets, mask=mask, other=0.0)
    if DROPOUT:
        dropout = tl.load(mask_ptr + state_offsets, mask=mask, other=0.0)
    # The activation each step's derivative reads: before zoneout when there is zoneout.
    act_ptr = cand_ptr if ZONEOUT != 0 else out_ptr
    if PREFETCH:
        dout_next = step_tile(dout_ptr, T - 1, T, lengths, rows, units, mask, B, H, REVERSE)
        act_next = step_tile(act_ptr, T - 1, T, lengths, rows, units, mask, B, H, REVERSE)
    for back in range(T):
        step = T - 1 - back
        time = time_index(step, lengths, REVERSE)
        valid = (row_ok & (step < lengths))[:, None]
        keep = valid & unit_ok[None, :]
        out_offsets = (time * B + rows)[:, None] * H + units[None, :]
        if PREFETCH:
            d_out, h = dout_next, act_next.to(dh.dtype)
            dout_next = step_tile(dout_ptr, step - 1, T, lengths, rows, units, mask, B, H, REVERSE)
            act_next = step_tile(act_ptr, step - 1, T, lengths, rows, units, mask, B, H, REVERSE)
            d_out = tl.where(keep, d_out, 0.0)
            h = tl.where(keep, h, 0.0)
        else:
            d_out = tl.load(dout_ptr + out_offsets, mask=keep, other=0.0)
            h = tl.load(act_ptr + out_offsets, mask=keep, other=0.0).to(dh.dtype)
        dh_total = dh + d_out
        if ZONEOUT != 0:
            kept = keep_weight(keep_ptr, step, rows, units, mask, B, H, ZONEOUT)
            d_new = (1.0 - kept) * dh_total
        else:
            d_new = dh_total
        if RELU:
            dpre = tl.where(h > 0.0, d_new, 0.0)
        else:
            dpre = d_new * (1.0 - h * h)
        dpre = tl.where(keep, dpre, 0.0)
        tl.store(dpre_ptr + out_offsets, dpre, mask=mask)
        dh_prev = tl.dot(dpre.to(w.dtype), w, input_precision=PRECISION, out_dtype=dh.dtype)
        if DROPOUT:
            dh_prev = dh_prev * dropout
        if ZONEOUT != 0:
            dh_prev += kept * dh_total
        dh = tl.where(valid, dh_prev, dh)
    tl.store(dh0_ptr + state_offsets, dh, mask=mask)


def resident_plan(kernel, batch: int, hidden: int, x: Tensor) -> tuple[tuple[int], dict] | None:
    """Grid and options of a resident kernel for this shape, or None where W_hh does not fit."""
    block_h = block_size(hidden, 1 << 30)
    if block_h * block_h * x.element_size() > RESIDENT_MAX_BYTES:
        return None
    if (x.device, x.dtype, kernel_name(kernel), block_h, block_h) in OUT_OF_RESOURCES:
        return None
    options = {
        "BLOCK_B": RESIDENT_BLOCK_B,
        "BLOCK_H": block_h,
        "PRECISION": dot_precision(x),
        "PREFETCH": PREFETCH,
        "num_warps": 8 if block_h >= 128 else 4,
    }
    return (triton.cdiv(batch, RESIDENT_BLOCK_B),), options


def forward_steps(
    xp, w_hh, h0, out, lengths, reverse: bool, relu: bool, in_loop: InLoop | None = None,
    cand: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """Run the recurrence over xp (T, B, H) into out; h0 (B, H) in the accumulate dtype -> h_n.

    With in-loop regularisers (only the resident kernel takes them) and `cand` (T, B, H), the
    activations before zoneout are saved there for the backward."""
    steps, batch, hidden = xp.shape
    h_n = torch.empty(batch, hidden, device=xp.device, dtype=h0.dtype)
    plan = resident_plan(rnn_resident_forward_kernel, batch, hidden, xp)
    if plan is not None:
        regularizers, constants = in_loop_arguments(in_loop, h0)
        launched = launch_if_it_fits(
            rnn_resident_forward_kernel,
            *plan,
            xp,
            xp,
            w_hh,
            lengths,
            h0.contiguous(),
            out,
            h_n,
            regularizers[0],
            regularizers[1],
            cand if cand is not None else regularizers[1],
            steps,
            batch,
            hidden,
            REVERSE=reverse,
            RELU=relu,
            DROPOUT=constants["DROPOUT"],
            ZONEOUT=constants["ZONEOUT"],
            SAVE=cand is not None,
        )
        if launched:
            return h_n
    if in_loop is not None:
        raise RuntimeError(regularizers_do_not_fit(hidden, xp))
    h_buf = torch.empty(2, batch, hidden, device=xp.device, dtype=h0.dtype)
    h_buf[0] = h0
    launch_grid, options, counter = plan_launch(batch, hidden, xp.device)
    rnn_forward_kernel[launch_grid](
        xp,
        w_hh,
        lengths,
        h_buf,
        out,
        counter,
        steps,
        batch,
        hidden,
        REVERSE=reverse,
        RELU=relu,
        PRECISION=dot_precision(xp),
        **options,
    )
    return h_buf[steps % 2]


def backward_steps(
    d_out, out, w_hh, lengths, d_h_n, reverse: bool, relu: bool, in_loop: InLoop | None = None,
    cand: Tensor | None = None,
):  # fmt: skip
    """Backward through time from d_out (T, B, H) and d_h_n (B, H) -> (dpre (T, B, H), dh0)."""
    steps, batch, hidden = out.shape
    dpre = torch.empty(steps, batch, hidden, device=out.device, dtype=d_out.dtype)
    plan = resident_plan(rnn_resident_backward_kernel, batch, hidden, out)
    if plan is not None:
        dh0 = torch.empty(batch, hidden, device=out.device, dtype=d_h_n.dtype)
        regularizers, constants = in_loop_arguments(in_loop, d_h_n)
        launched = launch_if_it_fits(
            rnn_resident_backward_kernel,
            *plan,
            out,
            d_out,
            out,
            w_hh,
            lengths,
            d_h_n.contiguous(),
            dpre,
            dh0,
            regularizers[0],
            regularizers[1],
            cand if cand is not None else regularizers[1],
            steps,
            batch,
            hidden,
            REVERSE=reverse,
            RELU=relu,
            DROPOUT=constants["DROPOUT"],
            ZONEOUT=constants["ZONEOUT"],
        )
        if launched:
            return dpre, dh0
    if in_loop is not None:
        raise RuntimeError(regularizers_do_not_fit(hidden, out))
    dh_buf = torch.empty(2, batch, hidden, device=out.device, dtype=d_h_n.dtype)
    dh_buf[0] = d_h_n
    launch_grid, options, counter = plan_launch(batch, hidden, out.device)
    rnn_backward_kernel[launch_grid](
        d_out,
        dh_buf,
        out,
        w_hh,
        lengths,
        dpre,
        counter,
        steps,
        batch,
        hidden,
        REVERSE=reverse,
        RELU=relu,
        PRECISION=dot_precision(out),
        **options,
    )
    return dpre, dh_buf[steps % 2]


class RNNFunction(torch.autograd.Function):
    """(T, B, I) x, (B, H) h0 and the weights -> (T, B, H) output, h_n."""

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, relu, save, in_loop):
        steps, batch, _ = x.shape
        hidden = w_hh.size(1)
        acc = accumulate_dtype(x.dtype)
        bias = None if b_ih is None else b_ih + b_hh
        xp = F.linear(x, w_ih, bias).contiguous()
        w_hh = w_hh.contiguous()
        out = torch.empty(steps, batch, hidden, device=x.device, dtype=x.dtype)
        lengths_on_device = device_lengths(lengths, steps, batch, x.device)
        cand = None
        if save and in_loop is not None and in_loop.keep_h is not None:
            cand = torch.empty(steps, batch, hidden, device=x.device, dtype=acc)
        h_n = forward_steps(
            xp, w_hh, h0.to(acc), out, lengths_on_device, reverse, relu, in_loop, cand
        )
        if save:
            ctx.save_for_backward(x, h0, w_ih, w_hh, out, lengths_on_device)
            ctx.lengths = lengths
            ctx.reverse = reverse
            ctx.relu = relu
            ctx.has_bias = b_ih is not None
            ctx.in_loop, ctx.cand = in_loop, cand
        return out, h_n.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_h_n):
        x, h0, w_ih, w_hh, out, lengths_on_device = ctx.saved_tensors
        steps, batch, _ = x.shape
        hidden = w_hh.size(1)
        acc = accumulate_dtype(x.dtype)
        if d_h_n is None:
            d_h_n = torch.zeros(batch, hidden, device=x.device, dtype=acc)
        if d_out is None:
            d_out = torch.zeros(steps, batch, hidden, device=x.device, dtype=acc)
        d_out = d_out.to(acc).contiguous()
        dpre, dh0 = backward_steps(
            d_out,
            out,
            w_hh,
            lengths_on_device,
            d_h_n.to(acc),
            ctx.reverse,
            ctx.relu,
            ctx.in_loop,
            ctx.cand,
        )
        need = ctx.needs_input_grad
        dx = dpre.to(x.dtype) @ w_ih if need[0] else None
        dh0 = dh0.to(h0.dtype) if need[1] else None
        dw_ih = (flat(dpre).T @ flat(x).to(acc)).to(w_ih.dtype) if need[2] else None
        dw_hh = None
        if need[3]:
            h_prev = previous_states(out.to(acc), h0.to(acc), ctx.lengths, ctx.reverse)
            if ctx.in_loop is not None and ctx.in_loop.mask is not None:
                h_prev = h_prev * ctx.in_loop.mask.to(acc)  # what the products saw
            dw_hh = (flat(dpre).T @ flat(h_prev)).to(w_hh.dtype)
        db = dpre.sum((0, 1)).to(w_ih.dtype) if ctx.has_bias and (need[4] or need[5]) else None
        return dx, dh0, dw_ih, dw_hh, db, db, None, None, None, None, None


def run_direction(
    x: Tensor,
    state: tuple[Tensor],
    weights: tuple[Tensor | None, ...],
    lengths: Tensor | None,
    reverse: bool,
    nonlinearity: str = "tanh",
    in_loop: InLoop | None = None,
) -> tuple[Tensor, tuple[Tensor]]:
    """(T, B, I) input, ((B, H),) state -> (T, B, H) output, (h_n,); in_loop: the direction's
    recurrent dropout and zoneout (only where W_hh fits the resident kernel)."""
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
    w_ih, w_hh, b_ih, b_hh = weights[:4]
    (h0,) = state
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, h0, w_ih, w_hh, b_ih, b_hh)
    )
    relu = nonlinearity == "relu"
    output, h_n = RNNFunction.apply(
        x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, relu, save, in_loop
    )
    return output, (h_n,)
