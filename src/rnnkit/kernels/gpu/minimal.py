"""Fused minGRU/minLSTM and IndRNN walks in Triton: element-wise recurrences over time.

The input projections (T, B, G*H) come from one matmul (torch). Each hidden unit of each sequence
is independent of every other, so the units are spread over the programs, BLOCK of them each, and
every program walks its units through time with the state in registers: nothing is shared
between programs and no step waits for another program. The same walk runs both of the layer's
modes on the GPU. It reads and writes each (T, B, .) tensor once, where the log-space scan makes
several passes, but runs only B * H / BLOCK programs. On an H200 (session 8, float32) a MinGRU
training step at B = 8, T = 4096, H = 128 took 3.9 ms against the reference log-space scan's
8.1 ms and the step loop's 1355 ms (benchmarks/RESULTS.md).

minGRU:  z = sigmoid(k_z), a = 1 - z, b = z g(k_h)
minLSTM: r = softplus(-k_i) - softplus(-k_f), a = f / (f + i) = sigmoid(r), b = (1 - a) g(k_h)
with g(v) = v + 0.5 for v >= 0 and sigmoid(v) below (as variants/minimal.py). Backward, per step:
minGRU   dk_z = dh (g - h_prev) z (1 - z),  dk_h = dh z g'(k_h),        dh_prev = dh a
minLSTM  dr = dh (h_prev - g) a (1 - a),    dk_f = dr sigmoid(-k_f),   dk_i = -dr sigmoid(-k_i),
         dk_h = dh (1 - a) g'(k_h),         dh_prev = dh a
Steps t >= lengths[b] output zero, keep the state and get zero gradients.

IndRNN (variants/indrnn.py) is the same walk with h_t = act(p_t + u h_{t-1}), p the projections,
u (H,) one recurrent weight per unit: dp = dh act'(h_t) (relu: [h_t > 0], tanh: 1 - h_t^2),
dh_prev = dp u, and du = sum over t and b of dp h_{t-1} (each program sums its units over time;
torch sums the (B, H) partial sums over the batch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from rnnkit.kernels.gpu._common import tanh

CELLS = ("min_gru", "min_lstm")
BLOCK = 128


@triton.jit
def _sigmoid(v):
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def _softplus(v):
    return tl.maximum(v, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(v)))


@triton.jit
def _g_and_slope(v):
    """g(v) and g'(v)."""
    s = _sigmoid(v)
    positive = v >= 0
    return tl.where(positive, v + 0.5, s), tl.where(positive, 1.0, s * (1.0 - s))


@triton.jit
def _load_gates(gates_ptr, row, H, j, valid, acc_dtype, LSTM: tl.constexpr):
    """The step's pre-activations of these units: (k_f or k_z, k_i or unused, k_h)."""
    k_0 = tl.load(gates_ptr + row + j, mask=valid, other=0.0).to(acc_dtype)
    if LSTM:
        k_1 = tl.load(gates_ptr + row + H + j, mask=valid, other=0.0).to(acc_dtype)
        k_h = tl.load(gates_ptr + row + 2 * H + j, mask=valid, other=0.0).to(acc_dtype)
    else:
        k_1 = k_0
        k_h = tl.load(gates_ptr + row + H + j, mask=valid, other=0.0).to(acc_dtype)
    return k_0, k_1, k_h


@triton.jit
def _walk_units(lengths_ptr, B, H, BLOCK: tl.constexpr):
    """This program's units of the flattened (B, H) state: their indices, which are in range,
    each one's sequence, hidden unit and sequence length."""
    units = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = units < B * H
    sequence = units // H
    length = tl.load(lengths_ptr + sequence, mask=ok, other=0)
    return units, ok, sequence, units % H, length


@triton.jit(do_not_specialize=["T", "B"])
def min_scan_forward_kernel(
    gates_ptr,  # (T, B, G*H) projections with bias
    h0_ptr,  # (B, H)
    lengths_ptr,  # (B,) int32
    out_ptr,  # (T, B, H)
    final_ptr,  # (B, H) accumulate dtype
    T,
    B,
    H,
    LSTM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    acc_dtype = final_ptr.dtype.element_ty
    units, ok, sequence, j, length = _walk_units(lengths_ptr, B, H, BLOCK)
    gate_width = (3 if LSTM else 2) * H
    h = tl.load(h0_ptr + units, mask=ok, other=0.0).to(acc_dtype)
    for t in range(T):
        valid = ok & (t < length)
        row = (t * B + sequence) * gate_width
        k_0, k_1, k_h = _load_gates(gates_ptr, row, H, j, valid, acc_dtype, LSTM)
        g, _ = _g_and_slope(k_h)
        if LSTM:
            a = _sigmoid(_softplus(-k_1) - _softplus(-k_0))
            b = (1.0 - a) * g
        else:
            z = _sigmoid(k_0)
            a = 1.0 - z
            b = z * g
        h = tl.where(valid, a * h + b, h)
        output = tl.where(valid, h, 0.0)
        tl.store(out_ptr + t * B * H + units, output.to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(final_ptr + units, h, mask=ok)


@triton.jit(do_not_specialize=["T", "B"])
def min_scan_backward_kernel(
    gates_ptr,  # (T, B, G*H)
    h0_ptr,  # (B, H)
    out_ptr,  # (T, B, H) the forward's states
    lengths_ptr,  # (B,) int32
    dout_ptr,  # (T, B, H)
    dh_ptr,  # (B, H) accumulate dtype: dL/dh_final in, dL/dh0 out
    dgates_ptr,  # (T, B, G*H)
    T,
    B,
    H,
    LSTM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    acc_dtype = dh_ptr.dtype.element_ty
    units, ok, sequence, j, length = _walk_units(lengths_ptr, B, H, BLOCK)
    gate_width = (3 if LSTM else 2) * H
    h0 = tl.load(h0_ptr + units, mask=ok, other=0.0).to(acc_dtype)
    dh = tl.load(dh_ptr + units, mask=ok, other=0.0)
    dgate_type = dgates_ptr.dtype.element_ty
    for step in range(T):
        t = T - 1 - step
        valid = ok & (t < length)
        dh += tl.load(dout_ptr + t * B * H + units, mask=valid, other=0.0).to(acc_dtype)
        has_earlier = valid & ((units * 0 + t) > 0)  # a block mask (the interpreter's need)
        earlier = tl.load(out_ptr + (t - 1) * B * H + units, mask=has_earlier, other=0.0)
        h_prev = tl.where(has_earlier, earlier.to(acc_dtype), h0)
        row = (t * B + sequence) * gate_width
        k_0, k_1, k_h = _load_gates(gates_ptr, row, H, j, valid, acc_dtype, LSTM)
        g, slope = _g_and_slope(k_h)
        if LSTM:
            a = _sigmoid(_softplus(-k_1) - _softplus(-k_0))
            dr = dh * (h_prev - g) * a * (1.0 - a)
            d_0 = dr * _sigmoid(-k_0)
            d_1 = -dr * _sigmoid(-k_1)
            d_h = dh * (1.0 - a) * slope
            tl.store(dgates_ptr + row + H + j, tl.where(valid, d_1, 0.0).to(dgate_type), mask=ok)
            tl.store(
                dgates_ptr + row + 2 * H + j, tl.where(valid, d_h, 0.0).to(dgate_type), mask=ok
            )
        else:
            z = _sigmoid(k_0)
            a = 1.0 - z
            d_0 = dh * (g - h_prev) * z * a
            d_h = dh * z * slope
            tl.store(dgates_ptr + row + H + j, tl.where(valid, d_h, 0.0).to(dgate_type), mask=ok)
        tl.store(dgates_ptr + row + j, tl.where(valid, d_0, 0.0).to(dgate_type), mask=ok)
        dh = tl.where(valid, dh * a, dh)
    tl.store(dh_ptr + units, dh, mask=ok)


@triton.jit(do_not_specialize=["T", "B"])
def indrnn_forward_kernel(
    pre_ptr,  # (T, B, H) projections with bias
    h0_ptr,  # (B, H)
    u_ptr,  # (H,)
    lengths_ptr,  # (B,) int32
    out_ptr,  # (T, B, H)
    final_ptr,  # (B, H) accumulate dtype
    T,
    B,
    H,
    RELU: tl.constexpr,
    BLOCK: tl.constexpr,
):
    acc_dtype = final_ptr.dtype.element_ty
    units, ok, _, j, length = _walk_units(lengths_ptr, B, H, BLOCK)
    u = tl.load(u_ptr + j, mask=ok, other=0.0).to(acc_dtype)
    h = tl.load(h0_ptr + units, mask=ok, other=0.0).to(acc_dtype)
    for t in range(T):
        valid = ok & (t < length)
        value = tl.load(pre_ptr + t * B * H + units, mask=valid, other=0.0).to(acc_dtype) + u * h
        if RELU:
            new = tl.maximum(value, 0.0)
        else:
            new = tanh(value)
        h = tl.where(valid, new, h)
        output = tl.where(valid, h, 0.0)
        tl.store(out_ptr + t * B * H + units, output.to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(final_ptr + units, h, mask=ok)


@triton.jit(do_not_specialize=["T", "B"])
def indrnn_backward_kernel(
    h0_ptr,  # (B, H)
    u_ptr,  # (H,)
    out_ptr,  # (T, B, H) the forward's states
    lengths_ptr,  # (B,) int32
    dout_ptr,  # (T, B, H)
    dh_ptr,  # (B, H) accumulate dtype: dL/dh_final in, dL/dh0 out
    dpre_ptr,  # (T, B, H)
    du_ptr,  # (B, H) accumulate dtype: each unit's sum over time of dpre * h_prev
    T,
    B,
    H,
    RELU: tl.constexpr,
    BLOCK: tl.constexpr,
):
    acc_dtype = dh_ptr.dtype.element_ty
    units, ok, _, j, length = _walk_units(lengths_ptr, B, H, BLOCK)
    u = tl.load(u_ptr + j, mask=ok, other=0.0).to(acc_dtype)
    h0 = tl.load(h0_ptr + units, mask=ok, other=0.0).to(acc_dtype)
    dh = tl.load(dh_ptr + units, mask=ok, other=0.0)
    du = dh * 0.0
    for step in range(T):
        t = T - 1 - step
        valid = ok & (t < length)
        dh += tl.load(dout_ptr + t * B * H + units, mask=valid, other=0.0).to(acc_dtype)
        h = tl.load(out_ptr + t * B * H + units, mask=valid, other=0.0).to(acc_dtype)
        has_earlier = valid & ((units * 0 + t) > 0)  # a block mask (the interpreter's need)
        earlier = tl.load(out_ptr + (t - 1) * B * H + units, mask=has_earlier, other=0.0)
        h_prev = tl.where(has_earlier, earlier.to(acc_dtype), h0)
        if RELU:
            dpre = tl.where(h > 0, dh, 0.0)
        else:
            dpre = dh * (1.0 - h * h)
        dpre = tl.where(valid, dpre, 0.0)
        tl.store(dpre_ptr + t * B * H + units, dpre.to(dpre_ptr.dtype.element_ty), mask=ok)
        du += dpre * h_prev
        dh = tl.where(valid, dpre * u, dh)
    tl.store(dh_ptr + units, dh, mask=ok)
    tl.store(du_ptr + units, du, mask=ok)


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class MinimalScanFunction(torch.autograd.Function):
    """One direction's walk: (T, B, G*H) projections, (B, H) h0 -> (T, B, H) output, (B, H) final."""

    @staticmethod
    def forward(ctx, gates, h0, lengths, lstm):
        steps, batch, _ = gates.shape
        hidden = h0.size(1)
        gates = gates.detach().contiguous()
        h0 = h0.detach().contiguous()
        output = torch.empty(steps, batch, hidden, dtype=gates.dtype, device=gates.device)
        final = torch.empty(batch, hidden, dtype=_accumulate_dtype(gates.dtype), device=h0.device)
        grid = (triton.cdiv(batch * hidden, BLOCK),)
        min_scan_forward_kernel[grid](
            gates, h0, lengths, output, final, steps, batch, hidden, LSTM=lstm, BLOCK=BLOCK
        )
        ctx.lstm = lstm
        ctx.save_for_backward(gates, h0, lengths, output)
        return output, final.to(gates.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, grad_final):
        gates, h0, lengths, output = ctx.saved_tensors
        steps, batch, hidden = output.shape
        grad_output = grad_output.contiguous()
        # A copy of its own: the kernel writes dL/dh0 over it.
        dh = torch.empty(batch, hidden, dtype=_accumulate_dtype(gates.dtype), device=h0.device)
        dh.copy_(grad_final)
        grad_gates = torch.empty_like(gates)
        grid = (triton.cdiv(batch * hidden, BLOCK),)
        min_scan_backward_kernel[grid](
            gates, h0, output, lengths, grad_output, dh, grad_gates, steps, batch, hidden,
            LSTM=ctx.lstm, BLOCK=BLOCK,
        )  # fmt: skip
        return grad_gates, dh.to(h0.dtype), None, None


def scan_direction(
    cell: str, gates: Tensor, h0: Tensor, lengths: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(T, B, G*H) projections, (B, H) h0 -> (T, B, H) output (zero past lengths), (B, H) final
    state at each sequence's last valid step, on the device of the tensors."""
    if cell not in CELLS:
        raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")
    steps, batch, width = gates.shape
    gate_count = 3 if cell == "min_lstm" else 2
    if h0.shape != (batch, width // gate_count) or width % gate_count:
        raise ValueError(
            f"gates must be (T, B, {gate_count}*H) with h0 (B, H), got {tuple(gates.shape)} "
            f"and {tuple(h0.shape)}"
        )
    if batch == 0:
        return gates.new_zeros(steps, 0, h0.size(1)), h0
    lengths = _kernel_lengths(gates, lengths)
    return MinimalScanFunction.apply(gates, h0, lengths, cell == "min_lstm")


def _kernel_lengths(inputs: Tensor, lengths: Tensor | None) -> Tensor:
    """(B,) int32 lengths on the inputs' device (every sequence full where None), after checking
    that the kernels' 32-bit offsets reach every element of (T, B, K) inputs."""
    steps, batch, width = inputs.shape
    if steps * batch * width >= 2**31:
        raise ValueError(f"T * B * {width} must be below 2**31 for the gpu kernels")
    if lengths is None:
        return torch.full((batch,), steps, dtype=torch.int32, device=inputs.device)
    return lengths.to(device=inputs.device, dtype=torch.int32).contiguous()


class IndRNNWalkFunction(torch.autograd.Function):
    """One direction's IndRNN walk: (T, B, H) projections, (B, H) h0, (H,) u -> output, final."""

    @staticmethod
    def forward(ctx, pre, h0, u, lengths, relu):
        steps, batch, hidden = pre.shape
        pre = pre.detach().contiguous()
        h0 = h0.detach().contiguous()
        u = u.detach().contiguous()
        output = torch.empty_like(pre)
        final = torch.empty(batch, hidden, dtype=_accumulate_dtype(pre.dtype), device=pre.device)
        grid = (triton.cdiv(batch * hidden, BLOCK),)
        indrnn_forward_kernel[grid](
            pre, h0, u, lengths, output, final, steps, batch, hidden, RELU=relu, BLOCK=BLOCK
        )
        ctx.relu = relu
        ctx.save_for_backward(h0, u, lengths, output)
        return output, final.to(pre.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, grad_final):
        h0, u, lengths, output = ctx.saved_tensors
        steps, batch, hidden = output.shape
        accumulate = _accumulate_dtype(output.dtype)
        grad_output = grad_output.contiguous()
        # A copy of its own: the kernel writes dL/dh0 over it.
        dh = torch.empty(batch, hidden, dtype=accumulate, device=h0.device)
        dh.copy_(grad_final)
        grad_pre = torch.empty_like(output)
        du = torch.empty(batch, hidden, dtype=accumulate, device=h0.device)
        grid = (triton.cdiv(batch * hidden, BLOCK),)
        indrnn_backward_kernel[grid](
            h0, u, output, lengths, grad_output, dh, grad_pre, du, steps, batch, hidden,
            RELU=ctx.relu, BLOCK=BLOCK,
        )  # fmt: skip
        return grad_pre, dh.to(h0.dtype), du.sum(0).to(u.dtype), None, None


def indrnn_recurrence(
    pre: Tensor, h0: Tensor, u: Tensor, lengths: Tensor | None, nonlinearity: str = "relu"
) -> tuple[Tensor, Tensor]:
    """(T, B, H) projections, (B, H) h0, (H,) u -> (T, B, H) output (zero past lengths), (B, H)
    final state at each sequence's last valid step, on the device of the tensors."""
    if nonlinearity not in ("relu", "tanh"):
        raise ValueError(f"nonlinearity must be 'relu' or 'tanh', got {nonlinearity!r}")
    steps, batch, hidden = pre.shape
    if h0.shape != (batch, hidden) or u.shape != (hidden,):
        raise ValueError(
            f"pre (T, B, H) needs h0 (B, H) and u (H,), got {tuple(pre.shape)}, "
            f"{tuple(h0.shape)} and {tuple(u.shape)}"
        )
    if batch == 0:
        return pre.new_zeros(steps, 0, hidden), h0
    lengths = _kernel_lengths(pre, lengths)
    return IndRNNWalkFunction.apply(pre, h0, u, lengths, nonlinearity == "relu")
