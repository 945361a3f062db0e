"""Fused CPU kernels for minGRU and minLSTM (Feng et al. 2024): the gates and the recurrence.

Both cells are the linear recurrence h_t = a_t * h_{t-1} + b_t, with a_t in (0, 1) and b_t > 0
element-wise functions of the step's input projection (see `rnnkit.variants.minimal`). Given the
projections of all steps (one matmul, outside), one numba call evaluates the gates and walks time,
vectorised over batch and hidden units; the backward is derived by hand and walks time backwards:

    dh_t = dL/dout_t + a_{t+1} dh_{t+1}
    da_t = dh_t * h_{t-1},  db_t = dh_t,  dL/dh_0 = a_1 dh_1

then through the gate functions to the projections. On a CPU this sequential walk does O(T B H)
work against the log-space scan's several exp/log per element (measured in
benchmarks/bench_variants.py), so it runs both of the layers' modes here; the real-space product
also avoids the log-space scan's rounding of |sum of log a_t|.

Lengths: steps t >= lengths[b] output zeros and keep the state, so `final` is the state at each
sequence's last valid step. Directions are the caller's (it reverses each sequence first).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit
from torch import Tensor
from torch.autograd.function import once_differentiable

CELLS = ("min_gru", "min_lstm")


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v))


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _softplus(v):
    return max(v, 0.0) + math.log1p(math.exp(-abs(v)))


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _g(v):
    """g(v) = v + 0.5 for v >= 0, sigmoid(v) below: positive, continuous, slope 1 and 1/4."""
    return v + 0.5 if v >= 0 else _sigmoid(v)


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _g_slope(v):
    if v >= 0:
        return 1.0
    s = _sigmoid(v)
    return s * (1.0 - s)


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _normalised_gates(k_f, k_i):
    """minLSTM's (f', i', 1 - f, 1 - i) from the gate pre-activations, in float64.

    f / (f + i) = (1 + e^-k_i) / (2 + e^-k_f + e^-k_i): two exps. Where a pre-activation is far
    below zero (f or i under 1e-260) that overflows, and the log form takes over:
    f / (f + i) = sigmoid(log f - log i) with log f = -softplus(-k_f).
    """
    k_f = np.float64(k_f)
    k_i = np.float64(k_i)
    if k_f > -600.0 and k_i > -600.0:
        e_f = math.exp(-k_f)
        e_i = math.exp(-k_i)
        total = 2.0 + e_f + e_i
        return (1.0 + e_i) / total, (1.0 + e_f) / total, e_f / (1.0 + e_f), e_i / (1.0 + e_i)
    difference = _softplus(-k_i) - _softplus(-k_f)  # log f - log i
    return _sigmoid(difference), _sigmoid(-difference), _sigmoid(-k_f), _sigmoid(-k_i)


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _coefficients(gates, t, b, j, hidden, lstm):
    """(a, b) of h_t = a h_{t-1} + b at one element, from the step's projections."""
    if lstm:
        # f' = f / (f + i) = sigmoid(log f - log i), stable where f and i both underflow.
        keep, write, _, _ = _normalised_gates(gates[t, b, j], gates[t, b, hidden + j])
        return keep, write * _g(gates[t, b, 2 * hidden + j])
    z = _sigmoid(gates[t, b, j])
    return 1.0 - z, z * _g(gates[t, b, hidden + j])


@njit(cache=True, nogil=True, error_model="numpy")
def _forward_kernel(gates, h0, lengths, lstm, output, final):
    """(T, B, G*H) projections, (B, H) h0 -> output (T, B, H) and final (B, H), in place."""
    steps, batch, _ = gates.shape
    hidden = h0.shape[1]
    full = lengths.size == 0
    final[:] = h0
    for t in range(steps):
        for b in range(batch):
            if not full and t >= lengths[b]:
                for j in range(hidden):
                    output[t, b, j] = 0.0
                continue
            for j in range(hidden):
                keep, write = _coefficients(gates, t, b, j, hidden, lstm)
                h = keep * final[b, j] + write
                output[t, b, j] = h
                final[b, j] = h


@njit(cache=True, nogil=True, error_model="numpy")
def _backward_kernel(grad_output, grad_h, gates, h0, output, lengths, lstm, grad_gates):
    """dL/dgates (T, B, G*H) in place; grad_h: dL/dh_final in, dL/dh0 out."""
    steps, batch, _ = gates.shape
    hidden = h0.shape[1]
    full = lengths.size == 0
    for t in range(steps - 1, -1, -1):
        for b in range(batch):
            if not full and t >= lengths[b]:
                continue
            for j in range(hidden):
                previous = output[t - 1, b, j] if t > 0 else h0[b, j]
                d = grad_output[t, b, j] + grad_h[b, j]
                if lstm:
                    v = gates[t, b, 2 * hidden + j]
                    keep, write, not_f, not_i = _normalised_gates(
                        gates[t, b, j], gates[t, b, hidden + j]
                    )
                    g = _g(v)
                    # d/d(log f - log i) of keep = keep * write, of write = -keep * write;
                    # d log f / dk_f = 1 - f.
                    d_diff = d * (previous - g) * keep * write
                    grad_gates[t, b, j] = d_diff * not_f
                    grad_gates[t, b, hidden + j] = -d_diff * not_i
                    grad_gates[t, b, 2 * hidden + j] = d * write * _g_slope(v)
                    grad_h[b, j] = d * keep
                else:
                    k = gates[t, b, j]
                    v = gates[t, b, hidden + j]
                    z = _sigmoid(k)
                    g = _g(v)
                    grad_gates[t, b, j] = d * (g - previous) * z * (1.0 - z)
                    grad_gates[t, b, hidden + j] = d * z * _g_slope(v)
                    grad_h[b, j] = d * (1.0 - z)


def _lengths_array(lengths: Tensor | None) -> np.ndarray:
    """The kernels' encoding of lengths: an empty array when every sequence is full."""
    if lengths is None:
        return np.empty(0, dtype=np.int64)
    return lengths.to("cpu", torch.int64).contiguous().numpy()


def _forward(gates: Tensor, h0: Tensor, lengths: Tensor | None, lstm: bool):
    """(T, B, G*H) detached projections, (B, H) h0 -> (T, B, H) output, (B, H) final."""
    steps, batch, _ = gates.shape
    hidden = h0.shape[1]
    output = torch.empty(steps, batch, hidden, dtype=gates.dtype)
    final = torch.empty(batch, hidden, dtype=gates.dtype)
    _forward_kernel(
        gates.numpy(),
        h0.detach().contiguous().numpy(),
        _lengths_array(lengths),
        lstm,
        output.numpy(),
        final.numpy(),
    )
    return output, final


class MinimalScanFunction(torch.autograd.Function):
    """Autograd node for the gates + recurrence of minGRU/minLSTM: numba forward and backward."""

    @staticmethod
    def forward(ctx, gates, h0, lengths, lstm):
        gates = gates.detach().contiguous()
        output, final = _forward(gates, h0, lengths, lstm)
        ctx.lstm = lstm
        ctx.save_for_backward(gates, h0, output, lengths)
        return output, final

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, grad_final):
        gates, h0, output, lengths = ctx.saved_tensors
        grad_h = grad_final.detach().clone(memory_format=torch.contiguous_format)
        grad_gates = torch.zeros_like(gates)
        _backward_kernel(
            grad_output.detach().contiguous().numpy(),
            grad_h.numpy(),
            gates.numpy(),
            h0.detach().contiguous().numpy(),
            output.numpy(),
            _lengths_array(lengths),
            ctx.lstm,
            grad_gates.numpy(),
        )
        return grad_gates, grad_h, None, None


def scan_direction(
    cell: str, gates: Tensor, h0: Tensor, lengths: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(T, B, G*H) projections, (B, H) h0 -> (T, B, H) output (zero past lengths), (B, H) final."""
    if cell not in CELLS:
        raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")
    lstm = cell == "min_lstm"
    if lengths is not None:
        lengths = lengths.to("cpu", torch.int64).contiguous()
    if torch.is_grad_enabled() and (gates.requires_grad or h0.requires_grad):
        return MinimalScanFunction.apply(gates, h0, lengths, lstm)
    return _forward(gates.detach().contiguous(), h0, lengths, lstm)


def warmup() -> None:
    """Compile (or load from numba's disk cache) both cells' kernels for float32 and float64."""
    for dtype in (torch.float32, torch.float64):
        for cell, gate_count in (("min_gru", 2), ("min_lstm", 3)):
            gates = torch.randn(3, 2, gate_count * 2, dtype=dtype, requires_grad=True)
            h0 = torch.randn(2, 2, dtype=dtype, requires_grad=True)
            for lengths in (None, torch.tensor([3, 1])):
                output, final = scan_direction(cell, gates, h0, lengths)
                (output.sum() + final.sum()).backward()
