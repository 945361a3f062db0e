"""IndRNN (Li et al. 2018, "Independently Recurrent Neural Network"): one recurrent weight per unit.

    h_t = act(W x_t + b + u * h_{t-1})        act relu (the paper's) or tanh, u in R^H

Every hidden unit is its own scalar recurrence: the projections W x_t + b of all steps are one
matmul, then the time loop is element-wise. Units interact only through the next layer, so depth
comes from stacking (the paper stacks many layers). |u| bounds how far back a unit remembers:
the paper keeps relu units' u within [-gamma, gamma], e.g. gamma = 2 ** (1 / T) to keep a
gradient over T steps from exploding; `recurrent_max_abs=gamma` clips u to that range in every
forward (clipped entries get no gradient, as in the authors' implementation).

Weights per layer and direction: weight_ih_l{k}[_reverse] (H, I), weight_hh_l{k}[_reverse] (H,)
(u), bias_ih_l{k}[_reverse] (H,). Initialisation: W and b uniform in +-1/sqrt(H) (torch.nn's
recurrent default), u uniform in [0, min(1, recurrent_max_abs)].

backend="auto" runs the recurrence through the fused numba kernel (`rnnkit.kernels.cpu.indrnn`)
on CPU and a Triton walk over time (`rnnkit.kernels.gpu.minimal`) on CUDA tensors;
backend="reference" runs `indrnn_step` in an autograd loop.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from rnnkit import dispatch
from rnnkit.autocast import autocast_dtype, run_under_autocast
from rnnkit.variants.sequence_input import (
    BACKENDS,
    StreamsStackedState,
    check_choice,
    check_dropout,
    check_size,
    format_output,
    initial_hidden,
    prepare_input,
    resolve_backend,
    run_stacked,
    step_loop,
    uniform_parameters,
)

NONLINEARITIES = ("relu", "tanh")


def indrnn_step(pre: Tensor, h: Tensor, u: Tensor, nonlinearity: str = "relu") -> Tensor:
    """One step: (B, H) projection W x_t + b, (B, H) state, (H,) u -> (B, H) next state."""
    value = pre + u * h
    return torch.relu(value) if nonlinearity == "relu" else torch.tanh(value)


class IndRNN(StreamsStackedState):
    """Stacked, optionally bidirectional IndRNN layers: h_t = act(W x_t + b + u * h_{t-1})."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "relu",
        batch_first: bool = False,
        bidirectional: bool = False,
        bias: bool = True,
        recurrent_max_abs: float | None = None,
        dropout: float = 0.0,
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.input_size = check_size(name, "input_size", input_size, 1)
        self.hidden_size = check_size(name, "hidden_size", hidden_size, 1)
        self.num_layers = check_size(name, "num_layers", num_layers, 1)
        self.nonlinearity = check_choice(name, "nonlinearity", nonlinearity, NONLINEARITIES)
        if recurrent_max_abs is not None and (
            not isinstance(recurrent_max_abs, numbers.Real)
            or isinstance(recurrent_max_abs, bool)
            or not recurrent_max_abs > 0
        ):
            raise ValueError(
                f"{name}: recurrent_max_abs must be None or a number > 0, got {recurrent_max_abs!r}"
            )
        self.recurrent_max_abs = None if recurrent_max_abs is None else float(recurrent_max_abs)
        self.batch_first = bool(batch_first)
        self.bidirectional = bool(bidirectional)
        self.bias = bool(bias)
        self.dropout = check_dropout(name, dropout)
        self.backend = check_choice(name, "backend", backend, BACKENDS)
        factory = {"device": device, "dtype": dtype}
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else hidden_size * self.directions
            for direction in range(self.directions):
                suffix = _suffix(layer, direction)
                shapes = {"weight_ih": (hidden_size, layer_input), "weight_hh": (hidden_size,)}
                for base, shape in shapes.items():
                    setattr(self, base + suffix, nn.Parameter(torch.empty(shape, **factory)))
                bias_parameter = nn.Parameter(torch.empty(hidden_size, **factory)) if bias else None
                self.register_parameter("bias_ih" + suffix, bias_parameter)
        self.reset_parameters()

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    def reset_parameters(self) -> None:
        """W and b uniform in +-1/sqrt(H); u uniform in [0, min(1, recurrent_max_abs)]."""
        uniform_parameters(self, self.hidden_size)
        top = 1.0 if self.recurrent_max_abs is None else min(1.0, self.recurrent_max_abs)
        for layer in range(self.num_layers):
            for direction in range(self.directions):
                nn.init.uniform_(getattr(self, "weight_hh" + _suffix(layer, direction)), 0, top)

    def extra_repr(self) -> str:
        text = f"{self.input_size}, {self.hidden_size}"
        defaults = {
            "num_layers": 1,
            "nonlinearity": "relu",
            "batch_first": False,
            "bidirectional": False,
            "bias": True,
            "recurrent_max_abs": None,
            "dropout": 0.0,
            "backend": "auto",
        }
        for key, default in defaults.items():
            if getattr(self, key) != default:
                text += f", {key}={getattr(self, key)!r}"
        return text

    def layer_weights(self, layer: int, direction: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """(weight_ih, u as used: clipped to recurrent_max_abs, bias_ih or None)."""
        suffix = _suffix(layer, direction)
        u = getattr(self, "weight_hh" + suffix)
        if self.recurrent_max_abs is not None:
            u = u.clamp(-self.recurrent_max_abs, self.recurrent_max_abs)
        return getattr(self, "weight_ih" + suffix), u, getattr(self, "bias_ih" + suffix)

    def dispatch_input(self, input: Tensor | PackedSequence, lengths=None) -> Tensor:
        """The validated (T, B, I) input that the backend choice depends on."""
        name = type(self).__name__
        weight = self.weight_ih_l0
        return prepare_input(name, input, lengths, self.input_size, self.batch_first, weight).x

    def forward(
        self, input: Tensor | PackedSequence, hx: Tensor | None = None, lengths=None
    ) -> tuple[Tensor | PackedSequence, Tensor]:
        """(T, B, I) / (B, T, I) / (T, I) / PackedSequence -> (output, h_n (L*D, B, H))."""
        if autocast_dtype(self.weight_ih_l0) is not None:
            return run_under_autocast(self._forward, self.weight_ih_l0, input, hx, lengths)
        return self._forward(input, hx, lengths)

    def _forward(self, input, hx, lengths) -> tuple[Tensor | PackedSequence, Tensor]:
        name = type(self).__name__
        weight = self.weight_ih_l0
        prepared = prepare_input(name, input, lengths, self.input_size, self.batch_first, weight)
        h0 = initial_hidden(
            name, hx, prepared, self.num_layers * self.directions, self.hidden_size, weight
        )
        backend = resolve_backend(name, self.backend, prepared.x)
        lengths = prepared.lengths

        def run_direction(layer: int, direction: int, source: Tensor, state: Tensor):
            w_ih, u, b_ih = self.layer_weights(layer, direction)
            pre = F.linear(source, w_ih, b_ih)
            if backend == "cpu":
                from rnnkit.kernels.cpu import indrnn

                return dispatch.run_opaque(
                    indrnn.recurrence, pre, state, u, lengths, self.nonlinearity
                )
            if backend == "gpu":
                from rnnkit.kernels.gpu import minimal as gpu_walks

                return dispatch.run_opaque(
                    gpu_walks.indrnn_recurrence, pre, state, u, lengths, self.nonlinearity
                )
            return step_loop(
                lambda pre_t, h: indrnn_step(pre_t, h, u, self.nonlinearity), pre, state, lengths
            )

        x, h_n = run_stacked(self, prepared.x, h0, lengths, run_direction)
        return format_output(x, h_n, prepared, self.batch_first)


def _suffix(layer: int, direction: int) -> str:
    return f"_l{layer}" + ("_reverse" if direction == 1 else "")
