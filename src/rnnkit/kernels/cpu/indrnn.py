"""Fused CPU kernel for the IndRNN recurrence (Li et al. 2018): h_t = act(p_t + u * h_{t-1}).

p_t = W x_t + b is the input projection of every step, one matmul outside (its gradients are
autograd's). Each hidden unit is its own scalar recurrence, so one numba call walks time,
vectorised over batch and units, for the forward. The backward (derived by hand) walks back:

    dp_t = (dL/dh_t) * act'(h_t)          act' from h: relu' = [h > 0], tanh' = 1 - h^2
    dL/dh_{t-1} += u * dp_t,   du = sum_t,b dp_t * h_{t-1},   dL/dh_0 = what reaches t = 0

Only the output (returned anyway) is kept: h_{t-1} is the output of the step before, or h0.
Lengths: steps t >= lengths[b] output zeros and keep the state; the caller reverses directions.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit
from torch import Tensor
from torch.autograd.function import once_differentiable

from rnnkit.kernels.cpu.lstm import _tanh

NONLINEARITIES = ("relu", "tanh")


@njit(cache=True, nogil=True, error_model="numpy")
def _forward_kernel(pre, h0, u, lengths, relu, output, final):
    """(T, B, H) projections, (B, H) h0, (H,) u -> output (T, B, H) and final (B, H), in place."""
    steps, batch, hidden = pre.shape
    full = lengths.size == 0
    for b in range(batch):
        for j in range(hidden):
            final[b, j] = h0[b, j]
    for t in range(steps):
        for b in range(batch):
            if not full and t >= lengths[b]:
                for j in range(hidden):
                    output[t, b, j] = 0
                continue
            for j in range(hidden):
                value = pre[t, b, j] + u[j] * final[b, j]
                if relu:
                    value = value if value > 0 else value * 0  # NaN stays NaN
                else:
                    value = _tanh(value)
                output[t, b, j] = value
                final[b, j] = value


@njit(cache=True, nogil=True, error_model="numpy")
def _backward_kernel(grad_output, grad_h, h0, u, output, lengths, relu, grad_pre, grad_u):
    """dL/dp (T, B, H), every element written, and dL/du (H,) accumulated in place; grad_h:
    dL/dh_final in, dL/dh0 out."""
    steps, batch, hidden = output.shape
    full = lengths.size == 0
    for t in range(steps - 1, -1, -1):
        for b in range(batch):
            if not full and t >= lengths[b]:
                for j in range(hidden):
                    grad_pre[t, b, j] = 0
                continue
            for j in range(hidden):
                h = output[t, b, j]
                total = grad_output[t, b, j] + grad_h[b, j]
                if relu:
                    d = total if h > 0 else total * 0
                else:
                    d = total * (1 - h * h)
                grad_pre[t, b, j] = d
                previous = output[t - 1, b, j] if t > 0 else h0[b, j]
                grad_u[j] += d * previous
                grad_h[b, j] = d * u[j]


def _lengths_array(lengths: Tensor | None) -> np.ndarray:
    """The kernels' encoding of lengths: an empty array when every sequence is full."""
    if lengths is None:
        return np.empty(0, dtype=np.int64)
    return lengths.to("cpu", torch.int64).contiguous().numpy()


def _array(tensor: Tensor) -> np.ndarray:
    """A contiguous numpy view (or copy) of a tensor, detached from autograd."""
    return tensor.detach().contiguous().numpy()


def _forward(pre: Tensor, h0: Tensor, u: Tensor, lengths: Tensor | None, relu: bool):
    """(T, B, H) detached projections -> (T, B, H) output, (B, H) final state."""
    output = torch.empty(pre.shape, dtype=pre.dtype)
    final = torch.empty(h0.shape, dtype=pre.dtype)
    _forward_kernel(
        pre.numpy(),
        _array(h0),
        _array(u),
        _lengths_array(lengths),
        relu,
        output.numpy(),
        final.numpy(),
    )
    return output, final


class IndRNNFunction(torch.autograd.Function):
    """Autograd node for one direction's IndRNN recurrence: numba forward, hand-derived BPTT."""

    @staticmethod
    def forward(ctx, pre, h0, u, lengths, relu):
        pre = pre.detach().contiguous()
        output, final = _forward(pre, h0, u, lengths, relu)
        ctx.relu = relu
        ctx.save_for_backward(h0, u, output, lengths)
        return output, final

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, grad_final):
        h0, u, output, lengths = ctx.saved_tensors
        grad_h = grad_final.detach().clone(memory_format=torch.contiguous_format)
        grad_pre = torch.empty_like(output)
        # Accumulated in float64: a sum over T * B terms.
        grad_u = torch.zeros(u.shape, dtype=torch.float64)
        _backward_kernel(
            _array(grad_output),
            grad_h.numpy(),
            _array(h0),
            _array(u),
            output.numpy(),
            _lengths_array(lengths),
            ctx.relu,
            grad_pre.numpy(),
            grad_u.numpy(),
        )
        return grad_pre, grad_h, grad_u.to(u.dtype), None, None


def recurrence(
    pre: Tensor, h0: Tensor, u: Tensor, lengths: Tensor | None, nonlinearity: str = "relu"
) -> tuple[Tensor, Tensor]:
    """(T, B, H) projections, (B, H) h0, (H,) u -> (T, B, H) output, (B, H) final state."""
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"nonlinearity must be one of {NONLINEARITIES}, got {nonlinearity!r}")
    relu = nonlinearity == "relu"
    if lengths is not None:
        lengths = lengths.to("cpu", torch.int64).contiguous()
    if torch.is_grad_enabled() and any(t.requires_grad for t in (pre, h0, u)):
        return IndRNNFunction.apply(pre, h0, u, lengths, relu)
    return _forward(pre.detach().contiguous(), h0, u, lengths, relu)


def warmup() -> None:
    """Compile (or load from numba's disk cache) the kernels for float32 and float64."""
    for dtype in (torch.float32, torch.float64):
        for nonlinearity in NONLINEARITIES:
            pre = torch.randn(3, 2, 4, dtype=dtype, requires_grad=True)
            h0 = torch.randn(2, 4, dtype=dtype, requires_grad=True)
            u = torch.rand(4, dtype=dtype, requires_grad=True)
            for lengths in (None, torch.tensor([3, 1])):
                output, final = recurrence(pre, h0, u, lengths, nonlinearity)
                (output.sum() + final.sum()).backward()
