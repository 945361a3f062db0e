"""Streaming inference: feed a sequence a step or a chunk at a time and carry the state between.

`Stream(module)` wraps a unidirectional rnnkit layer (`RNN`, `LSTM`, `GRU`) or any module that
implements the streaming protocol below. Running a sequence through `step` in chunks of any
sizes gives the same outputs as running it through the module at once, and the memory a stream
holds is its state: constant however long the stream runs.

The streaming protocol, for models (the application models implement it):

    initial_state(batch_size: int) -> state
        the state before the first step of `batch_size` sequences.
    stream_step(chunk, state) -> (output, state)
        the module's output for the next chunk of input and the state after it.

A state is a Tensor or a (nested) tuple, list or dict of Tensors; it is what `save` writes.

For layers, a chunk of one time step skips the layer's forward (validation, dispatch, kernel
set-up cost more than one step) and runs the cells' step equations directly; longer chunks run
through the layer and its fused kernels. Both are tested to equal the whole-sequence output.
The Stream takes the batch size of a protocol module's chunk from `chunk.size(0)`, so chunks
are batch-first (B, t, ...), as the application models take them.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor, nn

from rnnkit.io import atomic_write_bytes
from rnnkit.layers import _CELL_STATE_MODES, RNNBase
from rnnkit.scan import step_function

State = Any
FORMAT = "rnnkit.stream/1"


class Stream:
    """A module run step by step: `step((B, t, I) or (t, B, I) or (t, I) chunk) -> its output`.

    `inference=True` (the default) runs every step under `torch.inference_mode`; with False the
    caller's grad mode applies and the carried state is detached after each step (a truncated
    backpropagation boundary), so the memory held stays constant either way.
    """

    def __init__(self, module: nn.Module, *, inference: bool = True) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"Stream: module must be a torch.nn.Module, got {type(module).__name__}"
            )
        is_layer = isinstance(module, RNNBase)
        if not is_layer and not (
            callable(getattr(module, "stream_step", None))
            and callable(getattr(module, "initial_state", None))
        ):
            raise TypeError(
                f"Stream: module must be an rnnkit RNN/LSTM/GRU or define stream_step(chunk, "
                f"state) and initial_state(batch_size), got {type(module).__name__}"
            )
        if is_layer and module.bidirectional:
            raise ValueError(
                f"Stream: a bidirectional {type(module).__name__} cannot stream (its backward "
                "direction needs the whole sequence first), got bidirectional=True"
            )
        self.module = module
        self.inference = bool(inference)
        self._is_layer = is_layer
        # One time step at a time goes straight to the cells' equations (the layer's whole
        # forward costs more than the step), carrying the state as one (h[, c]) per stacked
        # layer; `_state` holds the layer's form, built from those only when it is asked for.
        self._single_step = _SingleStep(module) if is_layer and self.inference else None
        self._state: State | None = None
        self._cell_states: list[tuple[Tensor, ...]] | None = None
        self._batch_size: int | None = None
        self._batched = True
        # Time steps fed since the last reset (protocol modules: chunk.size(1), batch-first).
        self.steps = 0

    @property
    def state(self) -> State | None:
        """The state after the last step (the module's own form), or None before the first."""
        if self._state is None and self._cell_states is not None:
            self._state = self._single_step.layer_state(self._cell_states, self._batched)
        return self._state

    def reset(self) -> None:
        """Forget the state: the next step starts a new sequence."""
        self._state = None
        self._cell_states = None
        self._batch_size = None
        self._batched = True
        self.steps = 0

    def step(self, chunk: Tensor) -> Any:
        """The module's output for the next chunk of input, the state carried from the last."""
        if not isinstance(chunk, Tensor):
            raise TypeError(
                "Stream.step: chunk must be a Tensor (a stream carries every sequence together), "
                f"got {type(chunk).__name__}"
            )
        entering = self.inference and not torch.is_inference_mode_enabled()
        with torch.inference_mode() if entering else contextlib.nullcontext():
            if self._is_layer:
                output = self._layer_step(chunk)
            else:
                if self._state is None:
                    self._batch_size = int(chunk.size(0)) if chunk.dim() else 1
                    self._state = self.module.initial_state(self._batch_size)
                output, state = self.module.stream_step(chunk, self._state)
                self._state = state if self.inference else _map_tensors(state, Tensor.detach)
        self.steps += self._chunk_steps(chunk)
        return output

    def _layer_step(self, chunk: Tensor) -> Tensor:
        layer = self.module
        if self._state is None and self._cell_states is None:
            output, self._state = layer(chunk)
            self._batched = chunk.dim() == 3
            if self._batched:
                self._batch_size = int(chunk.size(0 if layer.batch_first else 1))
        else:
            if (chunk.dim() == 3) != self._batched:
                raise ValueError(
                    "Stream.step: chunk must be "
                    f"{'3-D (batched)' if self._batched else '2-D (unbatched)'} like the "
                    f"stream's first chunk, got shape {tuple(chunk.shape)}"
                )
            single = self._single_step
            if single is not None and single.accepts(chunk, self._batch_size):
                cells = self._cell_states
                if cells is None:
                    cells = single.cell_states(self._state, self._batched)
                output, self._cell_states = single(chunk, cells, self._batched)
                self._state = None
                return output
            output, self._state = layer(chunk, self.state)
            self._cell_states = None
        if not self.inference:
            self._state = _map_tensors(self._state, Tensor.detach)
        return output

    def _chunk_steps(self, chunk: Tensor) -> int:
        if not self._is_layer:
            return int(chunk.size(1)) if chunk.dim() >= 2 else 1
        return int(chunk.size(1 if chunk.dim() == 3 and self.module.batch_first else 0))

    # -- saving and restoring ---------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the state to a safetensors file, atomically; returns the path."""
        if self.state is None:
            raise ValueError("Stream.save: there is no state to save yet (step the stream first)")
        tensors, structure = _flatten(self.state)
        metadata = {
            "format": FORMAT,
            "structure": json.dumps(structure),
            "batch_size": json.dumps(self._batch_size),
            "batched": json.dumps(self._batched),
            "steps": str(self.steps),
            "module": type(self.module).__name__,
        }
        prepared = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        path = Path(path)
        atomic_write_bytes(path, save_safetensors_bytes(prepared, metadata=metadata))
        return path

    def load(self, path: str | os.PathLike) -> None:
        """Restore a state written by `save`, checking its shapes and dtypes against the module."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Stream.load: no state file at {path}")
        try:
            with safe_open(str(path), framework="pt") as file:
                metadata = file.metadata() or {}
                tensors = {name: file.get_tensor(name) for name in file.keys()}
        except Exception as error:
            raise ValueError(f"Stream.load: {path} is not a safetensors file ({error})") from error
        if metadata.get("format") != FORMAT:
            raise ValueError(
                f"Stream.load: {path} must be a stream state (format {FORMAT!r}), "
                f"got format {metadata.get('format')!r}"
            )
        structure = json.loads(metadata["structure"])
        batch_size = json.loads(metadata["batch_size"])
        batched = json.loads(metadata["batched"])
        expected = self._expected_state(batch_size, batched)
        expected_tensors, expected_structure = _flatten(expected)
        if structure != expected_structure or set(tensors) != set(expected_tensors):
            raise ValueError(
                f"Stream.load: the state in {path} must hold {sorted(expected_tensors)} "
                f"for {type(self.module).__name__}, got {sorted(tensors)}"
            )
        for name, like in expected_tensors.items():
            got = tensors[name]
            if tuple(got.shape) != tuple(like.shape) or got.dtype != like.dtype:
                raise ValueError(
                    f"Stream.load: state tensor {name!r} in {path} must have shape "
                    f"{tuple(like.shape)} and dtype {like.dtype} for this module, "
                    f"got shape {tuple(got.shape)} and dtype {got.dtype}"
                )
        moved = {name: tensors[name].to(expected_tensors[name].device) for name in tensors}
        self._state = _unflatten(structure, moved)
        self._cell_states = None
        self._batch_size = batch_size
        self._batched = batched
        self.steps = int(metadata.get("steps", 0))

    def _expected_state(self, batch_size: int | None, batched: bool) -> State:
        """A zero state of the shapes and dtypes this module carries for `batch_size` sequences."""
        with torch.inference_mode():
            if not self._is_layer:
                return self.module.initial_state(batch_size)
            weight = self.module._flat_weights[0]
            parts = []
            for _, shape in self.module._state_shapes(batch_size if batched else 1):
                full = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
                parts.append(full if batched else full[:, 0])
            return tuple(parts) if self.module.mode in _CELL_STATE_MODES else parts[0]


_SINGLE_STEP_MODES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")


def _deterministic_step(layer: RNNBase) -> bool:
    """Whether one step of `layer` is its plain cell equation (no zoneout, no active dropout)."""
    rates = layer.regularizers
    if any(rates.zoneout):
        return False
    return not layer.training or (
        rates.input_dropout == rates.recurrent_dropout == rates.weight_drop == 0
    )


class _SingleStep:
    """One time step of a unidirectional layer, run through its cells' step equations.

    Called with a chunk of exactly one time step and the state of each stacked layer; returns
    the output `layer(chunk, state)` would return and the next states. LSTM and RNN take the
    transposed weights and the summed biases, cached and rebuilt whenever a parameter changes
    (in place or replaced); GRU runs rnnkit.cells.gru_step as it is.
    """

    def __init__(self, layer: RNNBase) -> None:
        self.layer = layer
        self.step = step_function(layer.spec)
        # The module's own parameter dict: reading it skips nn.Module.__getattr__ per step, and
        # a parameter replaced by a new one shows up in it.
        self._parameters = layer._parameters
        self._key: list | None = None
        self._weights: list[tuple[Tensor | None, ...]] = []

    def accepts(self, chunk: Tensor, batch_size: int | None) -> bool:
        """Whether this chunk is one step the fast path runs exactly as the layer would."""
        layer = self.layer
        weight = self._parameters["weight_ih_l0"]
        if chunk.dtype != weight.dtype or chunk.device != weight.device:
            return False  # the layer's forward raises the error that names the mismatch
        if chunk.size(-1) != layer.input_size or (layer.training and layer.dropout > 0):
            return False
        if layer.mode not in _SINGLE_STEP_MODES or not _deterministic_step(layer):
            return False  # layer-normalised cells and regularised steps run the layer itself
        if chunk.dim() == 2:
            return chunk.size(0) == 1
        time_dim, batch_dim = (1, 0) if layer.batch_first else (0, 1)
        return chunk.size(time_dim) == 1 and chunk.size(batch_dim) == batch_size

    def weights(self) -> list[tuple[Tensor | None, ...]]:
        """Per stacked layer: (W_ih, W_hh, b_ih, b_hh) for GRU, else (W_ih^T, W_hh^T, b, W_hr^T)."""
        try:
            key = [(id(p), p.data_ptr(), p._version) for p in self._parameters.values()]
        except RuntimeError:
            # Inference tensors keep no version counter, so in-place changes cannot be seen.
            return [self._layer_weights(index) for index in range(self.layer.num_layers)]
        if key != self._key:
            self._weights = [self._layer_weights(index) for index in range(self.layer.num_layers)]
            self._key = key
        return self._weights

    def _layer_weights(self, index: int) -> tuple[Tensor | None, ...]:
        w_ih, w_hh, b_ih, b_hh, *w_hr = self.layer.cell_weights(index, 0)
        if self.layer.mode == "GRU":
            return w_ih, w_hh, b_ih, b_hh
        bias = None if b_ih is None else b_ih + b_hh
        projection = w_hr[0].t().contiguous() if w_hr and w_hr[0] is not None else None
        return w_ih.t().contiguous(), w_hh.t().contiguous(), bias, projection

    def cell_states(self, state: State, batched: bool) -> list[tuple[Tensor, ...]]:
        """The layer's state -> one (h,) or (h, c) of (B, H) tensors per stacked layer."""
        parts = state if self.layer.mode in _CELL_STATE_MODES else (state,)
        if batched:
            return [tuple(part[i] for part in parts) for i in range(self.layer.num_layers)]
        return [tuple(part[i : i + 1] for part in parts) for i in range(self.layer.num_layers)]

    def layer_state(self, cells: list[tuple[Tensor, ...]], batched: bool) -> State:
        """The inverse of `cell_states`: (L, B, H) tensors, or (L, H) unbatched."""
        join = torch.stack if batched else torch.cat
        parts = tuple(join(list(layer_parts)) for layer_parts in zip(*cells))
        return parts if self.layer.mode in _CELL_STATE_MODES else parts[0]

    def __call__(
        self, chunk: Tensor, cells: list[tuple[Tensor, ...]], batched: bool
    ) -> tuple[Tensor, list[tuple[Tensor, ...]]]:
        """One-step chunk, per-layer states -> the layer's output for it, the next states."""
        layer = self.layer
        mode = layer.mode
        if batched:
            x = chunk[:, 0] if layer.batch_first else chunk[0]
        else:
            x = chunk
        next_cells = []
        for weights, cell_state in zip(self.weights(), cells):
            if mode == "LSTM":
                cell_state = _lstm_step_fused(x, cell_state, *weights)
            elif mode == "GRU":
                cell_state = self.step(x, cell_state, *weights)
            else:
                cell_state = _rnn_step_fused(x, cell_state, *weights, mode=mode)
            next_cells.append(cell_state)
            x = cell_state[0]
        if batched:
            x = x.unsqueeze(1 if layer.batch_first else 0)
        return x, next_cells


def _input_and_recurrent(
    x: Tensor, h: Tensor, w_ih_t: Tensor, w_hh_t: Tensor, bias: Tensor | None
) -> Tensor:
    """(B, I), (B, H) -> (B, G*H) = x W_ih^T + h W_hh^T + b_ih + b_hh, in two matmuls."""
    pre = x @ w_ih_t if bias is None else torch.addmm(bias, x, w_ih_t)
    return pre.addmm_(h, w_hh_t)


def _lstm_step_fused(
    x: Tensor,
    state: tuple[Tensor, Tensor],
    w_ih_t: Tensor,
    w_hh_t: Tensor,
    bias: Tensor | None,
    projection: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """rnnkit.cells.lstm_step in fewer ops: (B, I), ((B, P), (B, H)) -> ((B, P), (B, H))."""
    h, c = state
    pre = _input_and_recurrent(x, h, w_ih_t, w_hh_t, bias)
    hidden = c.size(1)
    i, f, _, o = pre.sigmoid().chunk(4, dim=1)
    g = pre[:, 2 * hidden : 3 * hidden].tanh()
    c_next = torch.addcmul(f * c, i, g)
    h_next = o * c_next.tanh()
    return (h_next if projection is None else h_next @ projection), c_next


def _rnn_step_fused(
    x: Tensor,
    state: tuple[Tensor],
    w_ih_t: Tensor,
    w_hh_t: Tensor,
    bias: Tensor | None,
    _: None,
    *,
    mode: str,
) -> tuple[Tensor]:
    """rnnkit.cells.rnn_step in fewer ops: (B, I), ((B, H),) -> ((B, H),)."""
    pre = _input_and_recurrent(x, state[0], w_ih_t, w_hh_t, bias)
    return (pre.tanh_() if mode == "RNN_TANH" else pre.relu_(),)


def _flatten(state: State, prefix: str = "state") -> tuple[dict[str, Tensor], Any]:
    """A nested state -> ({dotted name: tensor}, a JSON-able description of its nesting)."""
    if isinstance(state, Tensor):
        return {prefix: state}, "tensor"
    if isinstance(state, (tuple, list)):
        tensors, children = {}, []
        for index, item in enumerate(state):
            item_tensors, child = _flatten(item, f"{prefix}.{index}")
            tensors.update(item_tensors)
            children.append(child)
        return tensors, {type(state).__name__: children}
    if isinstance(state, dict):
        tensors, children = {}, {}
        for key, item in state.items():
            if not isinstance(key, str) or "." in key:
                raise TypeError(f"Stream: state dict keys must be strings without '.', got {key!r}")
            item_tensors, children[key] = _flatten(item, f"{prefix}.{key}")
            tensors.update(item_tensors)
        return tensors, {"dict": children}
    raise TypeError(
        f"Stream: a state must be a Tensor or a tuple, list or dict of them, "
        f"got {type(state).__name__}"
    )


def _unflatten(structure: Any, tensors: dict[str, Tensor], prefix: str = "state") -> State:
    """The inverse of `_flatten`."""
    if structure == "tensor":
        return tensors[prefix]
    ((kind, children),) = structure.items()
    if kind == "dict":
        return {
            key: _unflatten(child, tensors, f"{prefix}.{key}") for key, child in children.items()
        }
    items = [_unflatten(child, tensors, f"{prefix}.{i}") for i, child in enumerate(children)]
    return tuple(items) if kind == "tuple" else items


def _map_tensors(state: State, function) -> State:
    if isinstance(state, Tensor):
        return function(state)
    if isinstance(state, tuple):
        return tuple(_map_tensors(item, function) for item in state)
    if isinstance(state, list):
        return [_map_tensors(item, function) for item in state]
    if isinstance(state, dict):
        return {key: _map_tensors(item, function) for key, item in state.items()}
    return state
