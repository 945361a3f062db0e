"""minGRU and minLSTM (Feng et al. 2024, "Were RNNs All We Needed?"): gates from the input alone.

With k = W x_t + b (one projection per gate, nothing from h_{t-1}):

    minGRU   z_t = sigmoid(k_z)                          update gate
             h~_t = g(k_h)                               candidate state
             h_t = (1 - z_t) * h_{t-1} + z_t * h~_t
    minLSTM  f_t = sigmoid(k_f),  i_t = sigmoid(k_i)     forget and input gates
             f'_t = f_t / (f_t + i_t),  i'_t = i_t / (f_t + i_t)     normalised: f' + i' = 1
             h~_t = g(k_h)
             h_t = f'_t * h_{t-1} + i'_t * h~_t

    g(v) = v + 0.5 for v >= 0, sigmoid(v) for v < 0      (the paper's positive, continuous g)

Weights per layer and direction: weight_ih_l{k}[_reverse] (G*H, I) and bias_ih_l{k}[_reverse]
(G*H,), gate order (z, h) for minGRU and (f, i, h) for minLSTM, G = 2 or 3.

Both are the linear recurrence h_t = a_t h_{t-1} + b_t with a_t in (0, 1) and b_t > 0 depending
on x_t only, so all T steps follow from a scan. The parallel mode is the paper's log-space scan:

    log a_t:  minGRU -softplus(k_z);  minLSTM -softplus(softplus(-k_f) - softplus(-k_i))
    log b_t:  log z_t + log g(k_h) = -softplus(-k_z) + log g(k_h);  minLSTM log i'_t + log g(k_h)
    log g(v) = log(v + 0.5) for v >= 0, -softplus(-v) for v < 0
    A_t = sum_{s<=t} log a_s
    h_t = exp(A_t) * h_0 + exp(A_t + logcumsumexp_{s<=t}(log b_s - A_s))

The initial state enters as the scan's first term, h_0 * prod a, in real space: a user's h_0 can
be negative or zero, whose logarithm is not real, while every other term b_s is positive (that is
what g is for), so the log-sum-exp needs no signs. O(log T) depth; exact to about
eps * |A_t| relative, which is 1e-12 in float64 at T = 4096 but can reach 1e-4 in float32 on long
sequences with small a_t. The sequential mode walks h_t = a_t h_{t-1} + b_t a step at a time
(`min_gru_step` / `min_lstm_step`, also the streaming API `MinGRU.step`).

On CPU, backend="auto" (or "cpu") runs both modes through fused numba kernels
(`rnnkit.kernels.cpu.minimal`) in real space, the gates computed inside: the sequential mode walks
time; the parallel mode is the same associative scan of the maps h -> a_t h + b_t cut into
chunks of time, one per thread, whose states are joined by the chunks' products of a_t (when the
batch is too small to split over the threads; otherwise each thread walks its rows). Composing
the maps never divides, so the real-space products are stable without logarithms and avoid the
log-space scan's eps * |A_t| rounding, and they cost a few operations per element against the
log-space form's several exp/log (measured in benchmarks/bench_minimal.py). When no gradient is
recorded (inference, torch.no_grad) the kernels also compute the input projection, a few dozen
steps of a sequence at a time, instead of taking F.linear's (T, B, G*H) result, and a batch too
small to split over the threads is split by hidden units in either mode. On CUDA tensors
backend="auto" (or "gpu") runs both modes as one Triton walk over time with the B * H units
spread over the GPU's programs (`rnnkit.kernels.gpu.minimal`; on an H200 1.6-2.3x as fast as
the log-space scan on the GPU, benchmarks/RESULTS.md). backend="reference" runs the torch scan
of the mode asked for (the log-space scan above for "parallel"), which is also what runs on
other devices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from rnnkit import dispatch
from rnnkit.autocast import autocast_dtype, run_under_autocast
from rnnkit.cells.base import check_tensor
from rnnkit.variants.sequence_input import (
    BACKENDS,
    StreamsStackedState,
    check_choice,
    check_dropout,
    check_size,
    dropout_between_layers,
    format_output,
    initial_hidden,
    prepare_input,
    resolve_backend,
    run_stacked,
    step_loop,
    uniform_parameters,
    valid_mask,
)

MODES = ("parallel", "sequential")


def g(v: Tensor) -> Tensor:
    """The paper's positive activation: v + 0.5 for v >= 0, sigmoid(v) below."""
    return torch.where(v >= 0, v.clamp(min=0) + 0.5, torch.sigmoid(v))


def log_g(v: Tensor) -> Tensor:
    """log g(v), computed without forming g(v) for negative v."""
    return torch.where(v >= 0, torch.log(v.clamp(min=0) + 0.5), -F.softplus(-v))


def min_gru_coefficients(gates: Tensor) -> tuple[Tensor, Tensor]:
    """(..., 2H) projections (z, h) -> (a, b) of h_t = a h_{t-1} + b, each (..., H)."""
    k_z, k_h = gates.chunk(2, dim=-1)
    z = torch.sigmoid(k_z)
    return 1 - z, z * g(k_h)


def min_lstm_coefficients(gates: Tensor) -> tuple[Tensor, Tensor]:
    """(..., 3H) projections (f, i, h) -> (a, b) = (f', i' g(h)), each (..., H)."""
    k_f, k_i, k_h = gates.chunk(3, dim=-1)
    # f / (f + i) = sigmoid(log f - log i): stays finite where f and i both underflow.
    log_ratio = F.softplus(-k_i) - F.softplus(-k_f)
    return torch.sigmoid(log_ratio), torch.sigmoid(-log_ratio) * g(k_h)


def min_gru_log_coefficients(gates: Tensor) -> tuple[Tensor, Tensor]:
    """(..., 2H) projections -> (log a, log b), each (..., H)."""
    k_z, k_h = gates.chunk(2, dim=-1)
    return -F.softplus(k_z), -F.softplus(-k_z) + log_g(k_h)


def min_lstm_log_coefficients(gates: Tensor) -> tuple[Tensor, Tensor]:
    """(..., 3H) projections -> (log f', log i' + log g(h)), each (..., H)."""
    k_f, k_i, k_h = gates.chunk(3, dim=-1)
    difference = F.softplus(-k_f) - F.softplus(-k_i)
    return -F.softplus(difference), -F.softplus(-difference) + log_g(k_h)


_COEFFICIENTS = {"min_gru": min_gru_coefficients, "min_lstm": min_lstm_coefficients}
_LOG_COEFFICIENTS = {"min_gru": min_gru_log_coefficients, "min_lstm": min_lstm_log_coefficients}


def min_gru_step(x: Tensor, h: Tensor, w_ih: Tensor, b_ih: Tensor | None) -> Tensor:
    """One minGRU step: (B, I) input, (B, H) state -> (B, H) next state."""
    a, b = min_gru_coefficients(F.linear(x, w_ih, b_ih))
    return a * h + b


def min_lstm_step(x: Tensor, h: Tensor, w_ih: Tensor, b_ih: Tensor | None) -> Tensor:
    """One minLSTM step: (B, I) input, (B, H) state -> (B, H) next state."""
    a, b = min_lstm_coefficients(F.linear(x, w_ih, b_ih))
    return a * h + b


def log_space_scan(log_a: Tensor, log_b: Tensor, h0: Tensor) -> Tensor:
    """(T, B, H) log a, log b, (B, H) h0 -> (T, B, H) h_t = a_t h_{t-1} + b_t, by logcumsumexp."""
    log_decay = torch.cumsum(log_a, dim=0)
    from_inputs = torch.exp(log_decay + torch.logcumsumexp(log_b - log_decay, dim=0))
    return torch.exp(log_decay) * h0 + from_inputs


def parallel_scan(
    cell: str, gates: Tensor, h0: Tensor, lengths: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(T, B, G*H) projections, (B, H) h0 -> (T, B, H) output (0 past lengths), (B, H) final."""
    log_a, log_b = _LOG_COEFFICIENTS[cell](gates)
    output = log_space_scan(log_a, log_b, h0)
    if lengths is None:
        return output, output[-1]
    last = (lengths.to(output.device) - 1).view(1, -1, 1).expand(1, *output.shape[1:])
    final = output.gather(0, last).squeeze(0)
    return output * valid_mask(lengths, output.size(0), output).unsqueeze(-1), final


def sequential_scan(
    cell: str, gates: Tensor, h0: Tensor, lengths: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The same by a step-by-step autograd loop."""
    coefficients = _COEFFICIENTS[cell]

    def step(gates_t: Tensor, h: Tensor) -> Tensor:
        a, b = coefficients(gates_t)
        return a * h + b

    return step_loop(step, gates, h0, lengths)


class _MinimalRNN(StreamsStackedState):
    """Stacked, optionally bidirectional minGRU/minLSTM layers; subclasses set `cell`, `gates`."""

    cell = ""
    gates = 0

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        batch_first: bool = False,
        bidirectional: bool = False,
        bias: bool = True,
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
        self.batch_first = bool(batch_first)
        self.bidirectional = bool(bidirectional)
        self.bias = bool(bias)
        self.dropout = check_dropout(name, dropout)
        self.backend = check_choice(name, "backend", backend, BACKENDS)
        factory = {"device": device, "dtype": dtype}
        rows = self.gates * hidden_size
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else hidden_size * self.directions
            for direction in range(self.directions):
                suffix = _suffix(layer, direction)
                weight = nn.Parameter(torch.empty(rows, layer_input, **factory))
                setattr(self, "weight_ih" + suffix, weight)
                bias_parameter = nn.Parameter(torch.empty(rows, **factory)) if bias else None
                self.register_parameter("bias_ih" + suffix, bias_parameter)
        self.reset_parameters()

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    def reset_parameters(self) -> None:
        """Every parameter uniform in +-1/sqrt(hidden_size), as torch.nn's recurrent layers."""
        uniform_parameters(self, self.hidden_size)

    def extra_repr(self) -> str:
        text = f"{self.input_size}, {self.hidden_size}"
        defaults = {
            "num_layers": 1,
            "batch_first": False,
            "bidirectional": False,
            "bias": True,
            "dropout": 0.0,
            "backend": "auto",
        }
        for key, default in defaults.items():
            if getattr(self, key) != default:
                text += f", {key}={getattr(self, key)!r}"
        return text

    def layer_weights(self, layer: int, direction: int) -> tuple[Tensor, Tensor | None]:
        """(weight_ih, bias_ih or None) of one layer and direction."""
        suffix = _suffix(layer, direction)
        return getattr(self, "weight_ih" + suffix), getattr(self, "bias_ih" + suffix)

    def dispatch_input(self, input: Tensor | PackedSequence, lengths=None) -> Tensor:
        """The validated (T, B, I) input that the backend choice depends on."""
        name = type(self).__name__
        weight = self.weight_ih_l0
        return prepare_input(name, input, lengths, self.input_size, self.batch_first, weight).x

    def forward(
        self,
        input: Tensor | PackedSequence,
        hx: Tensor | None = None,
        lengths=None,
        mode: str = "parallel",
    ) -> tuple[Tensor | PackedSequence, Tensor]:
        """(T, B, I) / (B, T, I) / (T, I) / PackedSequence -> (output, h_n (L*D, B, H))."""
        if autocast_dtype(self.weight_ih_l0) is not None:
            return run_under_autocast(self._forward, self.weight_ih_l0, input, hx, lengths, mode)
        return self._forward(input, hx, lengths, mode)

    def _forward(self, input, hx, lengths, mode: str) -> tuple[Tensor | PackedSequence, Tensor]:
        name = type(self).__name__
        check_choice(name, "mode", mode, MODES)
        weight = self.weight_ih_l0
        prepared = prepare_input(name, input, lengths, self.input_size, self.batch_first, weight)
        h0 = initial_hidden(
            name, hx, prepared, self.num_layers * self.directions, self.hidden_size, weight
        )
        backend = resolve_backend(name, self.backend, prepared.x)
        lengths = prepared.lengths

        def run_direction(layer: int, direction: int, source: Tensor, state: Tensor):
            weight, bias = self.layer_weights(layer, direction)
            if backend == "cpu":
                from rnnkit.kernels.cpu import minimal

                # The projection runs inside the kernel when no gradient is recorded.
                return dispatch.run_opaque(
                    minimal.project_and_scan,
                    self.cell,
                    source,
                    weight,
                    bias,
                    state,
                    lengths,
                    mode == "parallel",
                )
            gates = F.linear(source, weight, bias)
            if backend == "gpu":
                from rnnkit.kernels.gpu import minimal as gpu_minimal

                return dispatch.run_opaque(
                    gpu_minimal.scan_direction, self.cell, gates, state, lengths
                )
            if mode == "parallel":
                return parallel_scan(self.cell, gates, state, lengths)
            return sequential_scan(self.cell, gates, state, lengths)

        x, h_n = run_stacked(self, prepared.x, h0, lengths, run_direction)
        return format_output(x, h_n, prepared, self.batch_first)

    def step(self, input: Tensor, hx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Streaming: (B, I) one step's input, (L, B, H) state -> (B, H) output, (L, B, H) state.

        Unbatched (I,) input with (L, H) state works too. Running a sequence step by step gives
        the same outputs as `forward` (unidirectional layers only: a reverse pass needs the end).
        """
        name = type(self).__name__
        if self.bidirectional:
            raise ValueError(f"{name}: step needs a unidirectional layer, got bidirectional=True")
        weight = self.weight_ih_l0
        check_tensor(name, "input", input, weight)
        if input.dim() not in (1, 2) or input.size(-1) != self.input_size:
            raise ValueError(
                f"{name}: input must be (B, input_size={self.input_size}) or (input_size,), "
                f"got shape {tuple(input.shape)}"
            )
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        expected = (self.num_layers, x.size(0), self.hidden_size)
        if hx is None:
            hx = x.new_zeros(expected)
        else:
            check_tensor(name, "hx", hx, weight)
            shape = expected if batched else (self.num_layers, self.hidden_size)
            if tuple(hx.shape) != shape:
                raise ValueError(f"{name}: hx must have shape {shape}, got {tuple(hx.shape)}")
            hx = hx if batched else hx.unsqueeze(1)
        step = min_lstm_step if self.cell == "min_lstm" else min_gru_step
        states = []
        for layer in range(self.num_layers):
            x = step(x, hx[layer], *self.layer_weights(layer, 0))
            states.append(x)
            x = dropout_between_layers(self, x, layer)
        h_n = torch.stack(states)
        return (x, h_n) if batched else (x.squeeze(0), h_n.squeeze(1))


def _suffix(layer: int, direction: int) -> str:
    return f"_l{layer}" + ("_reverse" if direction == 1 else "")


class MinGRU(_MinimalRNN):
    """minGRU layers (Feng et al. 2024): h_t = (1 - z_t) h_{t-1} + z_t g(W_h x_t), z from x_t."""

    cell = "min_gru"
    gates = 2


class MinLSTM(_MinimalRNN):
    """minLSTM layers (Feng et al. 2024): h_t = f'_t h_{t-1} + i'_t g(W_h x_t), f' + i' = 1."""

    cell = "min_lstm"
    gates = 3
