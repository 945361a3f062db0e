"""What every cell shares: torch.nn-style parameters, initial state and input checks."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class CellBase(nn.Module):
    """A single recurrent step with torch.nn.*Cell parameters; subclasses define `gates` and `step`."""

    gates: int = 1

    def __init__(
        self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None
    ) -> None:
        super().__init__()
        name = type(self).__name__
        for arg, value in (("input_size", input_size), ("hidden_size", hidden_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: {arg} must be a positive int, got {value!r}")
        factory = {"device": device, "dtype": dtype}
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        rows = self.gates * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(rows, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(rows, hidden_size, **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(rows, **factory))
            self.bias_hh = nn.Parameter(torch.empty(rows, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    @property
    def state_count(self) -> int:
        return 2 if self.gates == 4 else 1

    def reset_parameters(self) -> None:
        """torch's default: every parameter uniform in +-1/sqrt(hidden_size)."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def step_weights(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        return self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh

    def step(self, x: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def forward(self, input: Tensor, hx: Tensor | tuple[Tensor, Tensor] | None = None):
        """(B, I) or (I,) input and optional state -> next state (h, or (h, c) for LSTM)."""
        name = type(self).__name__
        if not isinstance(input, Tensor):
            raise TypeError(f"{name}: input must be a Tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2):
            raise ValueError(
                f"{name}: input must be 1-D (I,) or 2-D (B, I), got shape {tuple(input.shape)}"
            )
        if input.size(-1) != self.input_size:
            raise ValueError(
                f"{name}: input.size(-1) must be input_size={self.input_size}, got {input.size(-1)}"
            )
        check_tensor(name, "input", input, self.weight_ih)
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        state_shape = (x.size(0), self.hidden_size)
        if hx is None:
            state = tuple(x.new_zeros(state_shape) for _ in range(self.state_count))
        else:
            parts = _as_tuple(name, hx, self.state_count)
            state = []
            for index, part in enumerate(parts):
                label = "hx" if self.state_count == 1 else f"hx[{index}]"
                check_tensor(name, label, part, self.weight_ih)
                expected = state_shape if batched else state_shape[1:]
                if tuple(part.shape) != expected:
                    raise ValueError(
                        f"{name}: {label} must have shape {expected}, got {tuple(part.shape)}"
                    )
                state.append(part if batched else part.unsqueeze(0))
            state = tuple(state)
        new_state = self.step(x, state)
        if not batched:
            new_state = tuple(s.squeeze(0) for s in new_state)
        return new_state if self.state_count == 2 else new_state[0]

    def extra_repr(self) -> str:
        text = f"{self.input_size}, {self.hidden_size}"
        return text if self.bias else f"{text}, bias=False"


def _as_tuple(name: str, hx, count: int) -> tuple[Tensor, ...]:
    if count == 1:
        if not isinstance(hx, Tensor):
            raise TypeError(f"{name}: hx must be a Tensor, got {type(hx).__name__}")
        return (hx,)
    if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
        raise TypeError(
            f"{name}: hx must be a tuple (h, c) of two Tensors, got {type(hx).__name__}"
        )
    return tuple(hx)


def check_tensor(name: str, label: str, tensor, weight: Tensor) -> None:
    """Raise where `tensor` is not a floating tensor of `weight`'s dtype and device."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name}: {label} must be a Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(
            f"{name}: {label} must be a floating-point tensor, got dtype {tensor.dtype}"
        )
    if tensor.dtype != weight.dtype:
        raise TypeError(
            f"{name}: {label}.dtype must match the weights' dtype {weight.dtype}, got {tensor.dtype}"
        )
    # is_cpu first: comparing devices builds two device objects, which costs more than the rest.
    if not (tensor.is_cpu and weight.is_cpu) and tensor.device != weight.device:
        raise ValueError(
            f"{name}: {label} must be on the weights' device {weight.device}, got {tensor.device}"
        )
