"""RNN, LSTM and GRU sequence layers: drop-in replacements for torch.nn.RNN/LSTM/GRU.

A layer owns time, stacking, directions, lengths and dropout between layers; each of its
layers runs through `rnnkit.dispatch`, which picks the reference loop or a fused kernel.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from rnnkit import dispatch
from rnnkit.autocast import autocast_dtype, in_weights_dtype, run_under_autocast
from rnnkit.cells.base import check_tensor
from rnnkit.spec import LayerSpec

_GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "LSTM": 4, "GRU": 3, "LN_LSTM": 4, "LN_GRU": 3}
_CELL_STATE_MODES = ("LSTM", "LN_LSTM")
_CELL_WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
_LSTM_CELL_WEIGHTS = (*_CELL_WEIGHTS, "weight_hr")


def _regularization():
    """rnnkit.variants.regularization, imported on use: rnnkit.variants imports this module."""
    from rnnkit.variants import regularization

    return regularization


# Memoised in a plain dict, not functools.cache: torch.compile traces a dict lookup quietly but
# warns at every cache-wrapped call.
_SUFFIXED: dict[tuple[tuple[str, ...], int, int], tuple[str, ...]] = {}


def _suffixed(bases: tuple[str, ...], layer: int, direction: int) -> tuple[str, ...]:
    """Parameter names of one layer and direction: "weight_ih" -> "weight_ih_l1_reverse"."""
    key = (bases, layer, direction)
    names = _SUFFIXED.get(key)
    if names is None:
        suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
        names = _SUFFIXED[key] = tuple(base + suffix for base in bases)
    return names


@dataclass(slots=True)
class _Prepared:
    """The input as the backends see it: (T, B, I) time-major, lengths or None."""

    x: Tensor
    lengths: Tensor | None
    batched: bool
    packed: PackedSequence | None


class RNNBase(nn.Module):
    """The shared body of RNN, LSTM and GRU: torch.nn.RNNBase's arguments and parameter names."""

    # (the attributes a LayerSpec is built from, that LayerSpec): see `spec`.
    _spec_cache: tuple[tuple, LayerSpec] | None = None

    def __init__(
        self,
        mode: str,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
        *,
        reset_after: bool = True,
        backend: str = "auto",
        input_dropout: float = 0.0,
        recurrent_dropout: float = 0.0,
        zoneout: float | tuple[float, float] = 0.0,
        weight_drop: float = 0.0,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.regularizers = _regularization().check_regularizers(
            name, mode, input_dropout, recurrent_dropout, zoneout, weight_drop
        )
        for arg, value, low in (
            ("input_size", input_size, 1),
            ("hidden_size", hidden_size, 1),
            ("num_layers", num_layers, 1),
            ("proj_size", proj_size, 0),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}: {arg} must be an int >= {low}, got {value!r}")
        if (
            not isinstance(dropout, numbers.Number)
            or isinstance(dropout, bool)
            or not 0 <= dropout <= 1
        ):
            raise ValueError(f"{name}: dropout must be a number in [0, 1], got {dropout!r}")
        if proj_size and mode != "LSTM":
            raise ValueError(f"{name}: proj_size is only supported by LSTM, got {proj_size}")
        if proj_size >= hidden_size:
            raise ValueError(
                f"{name}: proj_size must be smaller than hidden_size={hidden_size}, got {proj_size}"
            )
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                f"{name}: dropout={dropout} has no effect with num_layers=1: dropout is applied "
                "between layers only",
                stacklevel=3,
            )
        self.mode = mode
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)
        self.bidirectional = bool(bidirectional)
        self.proj_size = proj_size
        self.reset_after = bool(reset_after)
        self.backend = dispatch.check_backend_name(name, backend)

        factory = {"device": device, "dtype": dtype}
        directions = 2 if bidirectional else 1
        out_size = proj_size if proj_size > 0 else hidden_size
        rows = _GATES[mode] * hidden_size
        self._flat_weights_names: list[str] = []
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else out_size * directions
            for direction in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                shapes = [("weight_ih", (rows, layer_input)), ("weight_hh", (rows, out_size))]
                if bias:
                    shapes += [("bias_ih", (rows,)), ("bias_hh", (rows,))]
                if proj_size > 0:
                    shapes.append(("weight_hr", (proj_size, hidden_size)))
                for base, shape in shapes:
                    setattr(self, base + suffix, nn.Parameter(torch.empty(shape, **factory)))
                    self._flat_weights_names.append(base + suffix)
        self.reset_parameters()

    # -- torch.nn compatibility -------------------------------------------------------------
    def reset_parameters(self) -> None:
        """torch's default: every parameter uniform in +-1/sqrt(hidden_size)."""
        bound = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def flatten_parameters(self) -> None:
        """No-op kept for drop-in compatibility (cuDNN's flat buffer is not used)."""

    @property
    def _flat_weights(self) -> list[Tensor]:
        return [getattr(self, name) for name in self._flat_weights_names]

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        per_cell = len(self._flat_weights_names) // (self.num_layers * self.directions)
        flat = self._flat_weights
        return [flat[i : i + per_cell] for i in range(0, len(flat), per_cell)]

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def spec(self) -> LayerSpec:
        """The layer as the dispatch sees it; rebuilt only when an attribute it reads changes."""
        key = (
            self.mode,
            self.hidden_size,
            self.proj_size,
            self.reset_after,
            self.bias,
            self.bidirectional,
            self.regularizers,
            self.training,
        )
        cached = self._spec_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        spec = LayerSpec(
            mode=self.mode,
            hidden_size=self.hidden_size,
            proj_size=self.proj_size,
            reset_after=self.reset_after,
            bias=self.bias,
            bidirectional=self.bidirectional,
            recurrent_dropout=self.regularizers.recurrent_dropout,
            zoneout=self.regularizers.zoneout,
            training=self.training,
        )
        self._spec_cache = (key, spec)
        return spec

    def extra_repr(self) -> str:
        text = f"{self.input_size}, {self.hidden_size}"
        defaults = {
            "proj_size": 0,
            "num_layers": 1,
            "bias": True,
            "batch_first": False,
            "dropout": 0.0,
            "bidirectional": False,
            "reset_after": True,
            "backend": "auto",
        }
        for key, default in defaults.items():
            if getattr(self, key) != default:
                text += f", {key}={getattr(self, key)!r}"
        for key, value in vars(self.regularizers).items():
            if value not in (0.0, (0.0, 0.0)):
                text += f", {key}={value!r}"
        return text

    # -- forward ------------------------------------------------------------------------------
    def cell_weights(self, layer: int, direction: int) -> tuple[Tensor | None, ...]:
        """(w_ih, w_hh, b_ih, b_hh[, w_hr]) of one layer and direction; None where absent."""
        bases = _LSTM_CELL_WEIGHTS if self.mode == "LSTM" else _CELL_WEIGHTS
        return self._cell_attributes(bases, layer, direction)

    def _cell_attributes(
        self, bases: tuple[str, ...], layer: int, direction: int
    ) -> tuple[Tensor | None, ...]:
        """getattr(self, base + suffix, None) of each base name, registered parameters read
        straight from their dict (what nn.Module.__getattr__ does, without its cost)."""
        parameters = self._parameters
        return tuple(
            parameters[name] if name in parameters else self._attribute_or_none(name)
            for name in _suffixed(bases, layer, direction)
        )

    def _attribute_or_none(self, name: str):
        """getattr(self, name, None), without the AttributeError (3 us a call) that
        nn.Module.__getattr__ raises for an absent name (an LSTM's weight_hr without proj_size,
        the biases with bias=False)."""
        if (
            name in self.__dict__
            or name in self._buffers
            or name in self._modules
            or hasattr(type(self), name)  # a property, such as a parametrization's
        ):
            return getattr(self, name)
        return None

    def _first_weight(self) -> Tensor:
        """self._flat_weights[0], without building the list."""
        name = self._flat_weights_names[0]
        parameters = self._parameters
        return parameters[name] if name in parameters else getattr(self, name)

    def layer_inputs(self, input, lengths=None) -> tuple[LayerSpec, Tensor, Tensor | None]:
        """Validated (spec, (T, B, I) input, lengths) as the dispatch sees them."""
        weight = self._first_weight()
        if autocast_dtype(weight) is not None:
            input = in_weights_dtype(input, weight)
        prepared = self._prepare(input, lengths)
        return self.spec, prepared.x, prepared.lengths

    def forward(self, input, hx=None, lengths=None):
        """(T, B, I) / (B, T, I) / (T, I) / PackedSequence -> (output, h_n) or (output, (h_n, c_n))."""
        weight = self._first_weight()
        if autocast_dtype(weight) is not None:
            return run_under_autocast(self._forward, weight, input, hx, lengths)
        return self._forward(input, hx, lengths)

    def _forward(self, input, hx, lengths):
        prepared = self._prepare(input, lengths)
        states = self._initial_states(hx, prepared)
        x = prepared.x
        spec = self.spec
        training = self.training
        rates = self.regularizers
        # input_dropout and weight_drop are identities in eval mode and at rate 0.
        regularize = training and (rates.input_dropout > 0 or rates.weight_drop > 0)
        regularization = _regularization() if regularize else None
        directions = 2 if self.bidirectional else 1
        finals: list[tuple[Tensor, ...]] = []
        for layer in range(self.num_layers):
            first = layer * directions
            layer_hx = None if states is None else states[first : first + directions]
            weights = [self.cell_weights(layer, d) for d in range(directions)]
            if regularization is not None:
                weights = [regularization.drop_weights(w, rates.weight_drop, True) for w in weights]
                x = regularization.drop_input(x, rates.input_dropout, True)
            x, layer_finals = dispatch.run_layer(
                self.backend, spec, x, layer_hx, weights, prepared.lengths
            )
            finals.extend(layer_finals)
            if self.dropout > 0 and training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        if len(finals) == 1:  # one layer and direction: a view, not a stack of one
            final_state = tuple(part.unsqueeze(0) for part in finals[0])
        else:
            final_state = tuple(torch.stack(parts) for parts in zip(*finals))
        return self._format_output(x, final_state, prepared)

    # -- input handling -------------------------------------------------------------------
    def _prepare(self, input, lengths) -> _Prepared:
        name = type(self).__name__
        packed = None
        if isinstance(input, PackedSequence):
            if lengths is not None:
                raise ValueError(f"{name}: lengths must be None when input is a PackedSequence")
            packed = input
            check_tensor(name, "input.data", input.data, self._first_weight())
            x, packed_lengths = pad_packed_sequence(input)
            lengths_tensor = packed_lengths.to(torch.int64)
            batched = True
        elif isinstance(input, Tensor):
            check_tensor(name, "input", input, self._first_weight())
            if input.dim() not in (2, 3):
                raise ValueError(
                    f"{name}: input must be 3-D (batched) or 2-D (unbatched), "
                    f"got shape {tuple(input.shape)}"
                )
            batched = input.dim() == 3
            if not batched:
                x = input.unsqueeze(1)
            else:
                x = input.transpose(0, 1) if self.batch_first else input
            lengths_tensor = None
        else:
            raise TypeError(
                f"{name}: input must be a Tensor or PackedSequence, got {type(input).__name__}"
            )
        if x.size(-1) != self.input_size:
            raise ValueError(
                f"{name}: input.size(-1) must be input_size={self.input_size}, got {x.size(-1)}"
            )
        if x.size(0) == 0:
            raise ValueError(f"{name}: input must have at least one time step, got 0")
        if lengths is not None:
            if not batched:
                raise ValueError(f"{name}: lengths needs batched (3-D) input")
            lengths_tensor = _check_lengths(name, lengths, x.size(1), x.size(0))
        if lengths_tensor is not None and bool((lengths_tensor == x.size(0)).all()):
            lengths_tensor = None
        return _Prepared(x=x, lengths=lengths_tensor, batched=batched, packed=packed)

    def _state_shapes(self, batch: int) -> list[tuple[str, tuple[int, ...]]]:
        layers = self.num_layers * self.directions
        sizes = self.spec.state_sizes
        labels = ("hx[0]", "hx[1]") if len(sizes) == 2 else ("hx",)
        return [(label, (layers, batch, size)) for label, size in zip(labels, sizes)]

    def _initial_states(self, hx, prepared: _Prepared) -> list[tuple[Tensor, ...]] | None:
        """The validated initial state as the backends take it: one (h,) or (h, c) tuple of
        (B, H) tensors per layer and direction (layer * directions + direction); None for
        zeros (hx None), which the dispatch passes on as such (see dispatch.run_layer)."""
        if hx is None:
            return None
        x = prepared.x
        name = type(self).__name__
        shapes = self._state_shapes(x.size(1))
        if self.mode in _CELL_STATE_MODES:
            if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
                raise TypeError(
                    f"{name}: hx must be a tuple (h_0, c_0) of two Tensors, got {type(hx).__name__}"
                )
            parts = tuple(hx)
        else:
            if not isinstance(hx, Tensor):
                raise TypeError(f"{name}: hx must be a Tensor, got {type(hx).__name__}")
            parts = (hx,)
        state = []
        for (label, shape), part in zip(shapes, parts):
            check_tensor(name, label, part, x)
            expected = shape if prepared.batched else (shape[0], shape[2])
            if tuple(part.shape) != expected:
                raise ValueError(
                    f"{name}: {label} must have shape {expected}, got {tuple(part.shape)}"
                )
            state.append(part if prepared.batched else part.unsqueeze(1))
        return list(zip(*(part.unbind(0) for part in state)))

    def _format_output(self, output: Tensor, state: tuple[Tensor, ...], prepared: _Prepared):
        if prepared.packed is not None:
            output = _repack(output, prepared.packed)
        elif not prepared.batched:
            output = output.squeeze(1)
            state = tuple(s.squeeze(1) for s in state)
        elif self.batch_first:
            output = output.transpose(0, 1)
        return output, (state if self.mode in _CELL_STATE_MODES else state[0])

    def to_torch(self) -> nn.Module:
        """The equivalent torch.nn module with the same weights."""
        from rnnkit.convert import to_torch

        return to_torch(self)


def _check_lengths(name: str, lengths, batch: int, steps: int) -> Tensor:
    if isinstance(lengths, (list, tuple)):
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in lengths):
            raise TypeError(f"{name}: lengths must hold integers, got {lengths!r}")
        lengths = torch.tensor(lengths, dtype=torch.int64)
    if not isinstance(lengths, Tensor):
        raise TypeError(
            f"{name}: lengths must be a 1-D integer Tensor or a list of ints, "
            f"got {type(lengths).__name__}"
        )
    if lengths.dtype == torch.bool or lengths.is_floating_point() or lengths.is_complex():
        raise TypeError(f"{name}: lengths must have an integer dtype, got {lengths.dtype}")
    if lengths.dim() != 1:
        raise ValueError(f"{name}: lengths must be 1-D, got shape {tuple(lengths.shape)}")
    if lengths.numel() != batch:
        raise ValueError(
            f"{name}: lengths must hold one length per sequence (batch size {batch}), "
            f"got {lengths.numel()}"
        )
    lengths = lengths.detach().to("cpu", torch.int64)
    if batch and int(lengths.min()) < 1:
        raise ValueError(f"{name}: lengths must be >= 1, got {int(lengths.min())}")
    if batch and int(lengths.max()) > steps:
        raise ValueError(
            f"{name}: lengths must be <= the number of time steps {steps}, got {int(lengths.max())}"
        )
    return lengths


def _repack(output: Tensor, packed: PackedSequence) -> PackedSequence:
    """(T, B, H) padded output in the caller's batch order -> PackedSequence shaped like `packed`."""
    sorted_indices = packed.sorted_indices
    batch_sizes = packed.batch_sizes
    sequence = torch.arange(int(batch_sizes[0])).unsqueeze(1)
    lengths_sorted = (batch_sizes.unsqueeze(0) > sequence).sum(1)
    if sorted_indices is not None:
        output = output.index_select(1, sorted_indices)
    data = pack_padded_sequence(output, lengths_sorted, enforce_sorted=True).data
    return PackedSequence(data, batch_sizes, sorted_indices, packed.unsorted_indices)


class RNN(RNNBase):
    """Elman RNN, h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh): same API as torch.nn.RNN."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
        **regularizers: float,
    ) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"RNN: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(
            "RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU",
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            device=device,
            dtype=dtype,
            backend=backend,
            **regularizers,
        )

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text if self.nonlinearity == "tanh" else f"{text}, nonlinearity='relu'"


class LSTM(RNNBase):
    """LSTM over a sequence, optionally projected (proj_size): same API as torch.nn.LSTM."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
        **regularizers: float,
    ) -> None:
        super().__init__(
            "LSTM",
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            proj_size,
            device=device,
            dtype=dtype,
            backend=backend,
            **regularizers,
        )


class GRU(RNNBase):
    """GRU over a sequence: same API as torch.nn.GRU, plus reset_after=False (Cho et al.'s form)."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device=None,
        dtype=None,
        *,
        reset_after: bool = True,
        backend: str = "auto",
        **regularizers: float,
    ) -> None:
        super().__init__(
            "GRU",
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            device=device,
            dtype=dtype,
            reset_after=reset_after,
            backend=backend,
            **regularizers,
        )
