"""ONNX export of rnnkit layers and of modules built from them.

Each rnnkit RNN/LSTM/GRU layer becomes the standard ONNX `RNN`, `LSTM` or `GRU` operator, one per
stacked layer, with both directions in one operator, initial states as the operator's
`initial_h`/`initial_c` and lengths as its `sequence_lens`. The rest of a module is exported by
torch's TorchScript-based exporter (`torch.onnx.export(..., dynamo=False)`), the one that lets an
autograd Function say which ONNX operator it is (its `symbolic` method).

How rnnkit's layers map onto the operators (ONNX operator specs, opset 14+):

    gate order     torch LSTM (i, f, g, o) -> ONNX (i, o, f, c); torch GRU (r, z, n) -> ONNX (z, r, h)
    GRU            reset_after=True  -> linear_before_reset=1 (r multiplies W_hn h + b_hn)
                   reset_after=False -> linear_before_reset=0 (r multiplies h before W_hn)
    RNN            nonlinearity tanh/relu -> activations Tanh/Relu
    weights        W (D, G*H, I), R (D, G*H, H), B (D, 2*G*H) = [b_ih ; b_hh], D directions
    output         Y (T, D, B, H) -> (T, B, D*H) as torch lays it out

An LSTM with proj_size (or any layer whose cell has no ONNX operator) is exported as its
reference loop unrolled over time: the exported graph takes exactly the example's number of time
steps (batch size and lengths stay dynamic).
"""

from __future__ import annotations

import os
import types
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from rnnkit.io import atomic_path
from rnnkit.layers import RNNBase
from rnnkit.scan import run_layer_reference
from rnnkit.spec import LayerSpec

DEFAULT_OPSET = 17
MIN_OPSET, MAX_OPSET = 9, 20
_ONNX_GATE_ORDER = {"LSTM": (0, 3, 1, 2), "GRU": (1, 0, 2), "RNN_TANH": (0,), "RNN_RELU": (0,)}
_ONNX_OP = {"LSTM": "LSTM", "GRU": "GRU", "RNN_TANH": "RNN", "RNN_RELU": "RNN"}


def export_onnx(
    module: nn.Module,
    example_input: Tensor | tuple,
    path: str | os.PathLike,
    *,
    lengths: bool | Tensor = False,
    opset: int | None = None,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
) -> Path:
    """Export `module(*example_input[, lengths=...])` to an ONNX file at `path`; returns the path.

    `example_input` is the input tensor or a tuple of positional arguments (for a layer,
    `(x, hx)` makes the initial state a graph input). `lengths=True` adds a (B,) int64
    "lengths" input passed as `module(..., lengths=lengths)` (example: every sequence full);
    a tensor gives the example lengths. For an rnnkit layer the inputs and outputs are named
    (input, h0[, c0], lengths; output, h_n[, c_n]) and batch and time are dynamic axes; for other
    modules pass `input_names`, `output_names` and `dynamic_axes` as torch.onnx.export takes them.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"export_onnx: module must be a torch.nn.Module, got {type(module).__name__}"
        )
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    if not args or not isinstance(args[0], Tensor):
        raise TypeError(
            "export_onnx: example_input must be a Tensor or a tuple starting with one, "
            f"got {type(example_input).__name__}"
        )
    opset = DEFAULT_OPSET if opset is None else opset
    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(
            f"export_onnx: opset must be an int in [{MIN_OPSET}, {MAX_OPSET}], got {opset!r}"
        )
    layers = [m for m in module.modules() if isinstance(m, RNNBase)]
    if not layers:
        raise ValueError(
            f"export_onnx: module must be or contain an rnnkit RNN/LSTM/GRU layer, "
            f"got {type(module).__name__} without one"
        )
    kwargs = {}
    if lengths is not False:
        kwargs["lengths"] = _example_lengths(module, args[0], lengths)
    if isinstance(module, RNNBase):
        names = _layer_io_names(module, args, bool(kwargs))
        input_names = names[0] if input_names is None else input_names
        output_names = names[1] if output_names is None else output_names
        if dynamic_axes is None:
            dynamic_axes = _layer_dynamic_axes(module, args[0], input_names, output_names)
    else:
        count = len(args) + len(kwargs)
        input_names = [f"input_{i}" for i in range(count)] if input_names is None else input_names

    path = Path(path)
    with atomic_path(path) as temporary, _exporting(module), warnings.catch_warnings():
        # The TorchScript exporter is deprecated since torch 2.9 but still shipped; it is
        # the one where an autograd Function's `symbolic` emits an ONNX operator (torch.export
        # would need each layer registered as a custom op with an onnxscript translation).
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            module,
            args + ((kwargs,) if kwargs else ()),
            str(temporary),
            dynamo=False,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )
    return path


# -- the layer as ONNX operators -------------------------------------------------------------------
class _OnnxRecurrentOp(torch.autograd.Function):
    """One ONNX RNN/LSTM/GRU operator: runs rnnkit's reference loop, exports as the operator.

    x (T, B, I), W (D, G*H, I), R (D, G*H, H), B (D, 2*G*H) or None, sequence_lens (B,) int32 or
    None, initial_h / initial_c (D, B, H) or None -> Y (T, D, B, H), Y_h (D, B, H), Y_c (D, B, H).
    """

    @staticmethod
    def forward(
        ctx, x, w, r, b, sequence_lens, initial_h, initial_c, mode, hidden_size, reset_after
    ):
        directions = w.size(0)
        spec = LayerSpec(
            mode=mode,
            hidden_size=hidden_size,
            reset_after=reset_after,
            bias=b is not None,
            bidirectional=directions == 2,
        )
        order = _ONNX_GATE_ORDER[mode]
        back = [order.index(i) for i in range(len(order))]
        weights, states = [], []
        for d in range(directions):
            w_ih, w_hh = _permute_gates(w[d], back), _permute_gates(r[d], back)
            b_ih = b_hh = None
            if b is not None:
                b_ih, b_hh = (_permute_gates(part, back) for part in b[d].chunk(2))
            weights.append((w_ih, w_hh, b_ih, b_hh) + ((None,) if mode == "LSTM" else ()))
            zeros = x.new_zeros(x.size(1), hidden_size)
            h = zeros if initial_h is None else initial_h[d]
            states.append(
                (h,) if mode != "LSTM" else (h, zeros if initial_c is None else initial_c[d])
            )
        lengths = None if sequence_lens is None else sequence_lens.to(torch.int64)
        output, finals = run_layer_reference(spec, x, states, weights, lengths)
        y = output.reshape(x.size(0), x.size(1), directions, hidden_size).permute(0, 2, 1, 3)
        y_h = torch.stack([f[0] for f in finals])
        y_c = torch.stack([f[1] for f in finals]) if mode == "LSTM" else torch.zeros_like(y_h)
        return y.contiguous(), y_h, y_c

    @staticmethod
    def symbolic(
        g, x, w, r, b, sequence_lens, initial_h, initial_c, mode, hidden_size, reset_after
    ):
        directions = 2 if _static_size(w, 0) == 2 else 1
        attributes = {"hidden_size_i": hidden_size}
        if directions == 2:
            attributes["direction_s"] = "bidirectional"
        if mode.startswith("RNN"):
            attributes["activations_s"] = ["Tanh" if mode == "RNN_TANH" else "Relu"] * directions
        if mode == "GRU":
            attributes["linear_before_reset_i"] = int(reset_after)
        inputs = [x, w, r]
        for optional in (b, sequence_lens, initial_h):
            inputs.append(_missing(g) if optional is None else optional)
        if mode == "LSTM":
            inputs.append(_missing(g) if initial_c is None else initial_c)
            y, y_h, y_c = g.op("LSTM", *inputs, outputs=3, **attributes)
            return y, y_h, y_c
        y, y_h = g.op(_ONNX_OP[mode], *inputs, outputs=2, **attributes)
        return y, y_h, y_h


def _missing(g):
    """An omitted optional operator input."""
    node = g.op("prim::Constant")
    node.setType(torch._C.OptionalType.ofTensor())
    return node


def _static_size(value, dim: int) -> int | None:
    sizes = value.type().sizes() if hasattr(value.type(), "sizes") else None
    return None if sizes is None else sizes[dim]


def _permute_gates(weight: Tensor, order: tuple[int, ...] | list[int]) -> Tensor:
    """(G*H, ...) rows in one gate order -> the same rows with gate blocks taken in `order`."""
    blocks = weight.chunk(len(order), dim=0)
    return torch.cat([blocks[i] for i in order], dim=0)


def _onnx_weights(layer: RNNBase, index: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """W (D, G*H, I), R (D, G*H, H), B (D, 2*G*H) or None of one stacked layer, in ONNX order."""
    order = _ONNX_GATE_ORDER[layer.mode]
    ws, rs, bs = [], [], []
    for direction in range(layer.directions):
        w_ih, w_hh, b_ih, b_hh = layer.cell_weights(index, direction)[:4]
        ws.append(_permute_gates(w_ih, order))
        rs.append(_permute_gates(w_hh, order))
        if b_ih is not None:
            bs.append(torch.cat([_permute_gates(b_ih, order), _permute_gates(b_hh, order)]))
    return torch.stack(ws), torch.stack(rs), torch.stack(bs) if bs else None


def _export_forward(layer: RNNBase, input, hx=None, lengths=None):
    """The layer's forward as ONNX operators: same inputs and outputs as RNNBase.forward."""
    name = type(layer).__name__
    if isinstance(input, PackedSequence):
        raise ValueError(
            f"export_onnx: {name} input must be a padded Tensor (pass lengths=), got PackedSequence"
        )
    batched = input.dim() == 3
    if batched:
        x = input.transpose(0, 1) if layer.batch_first else input
    else:
        x = input.unsqueeze(1)
    state = None
    if hx is not None:
        state = tuple(hx) if layer.mode == "LSTM" else (hx,)
        state = state if batched else tuple(part.unsqueeze(1) for part in state)
    directions = layer.directions
    if _unrolled(layer):
        output, final = _unrolled_layers(layer, x, state, lengths)
    else:
        sequence_lens = None if lengths is None else lengths.to(torch.int32)
        finals = []
        for index in range(layer.num_layers):
            w, r, b = _onnx_weights(layer, index)
            rows = slice(index * directions, (index + 1) * directions)
            initial_h = None if state is None else state[0][rows]
            initial_c = None if state is None or layer.mode != "LSTM" else state[1][rows]
            y, y_h, y_c = _OnnxRecurrentOp.apply(
                x,
                w,
                r,
                b,
                sequence_lens,
                initial_h,
                initial_c,
                layer.mode,
                layer.hidden_size,
                layer.reset_after,
            )
            x = (
                y.permute(0, 2, 1, 3).reshape(y.size(0), y.size(2), -1)
                if directions == 2
                else y[:, 0]
            )
            finals.append((y_h, y_c) if layer.mode == "LSTM" else (y_h,))
        output = x
        final = tuple(torch.cat([f[i] for f in finals]) for i in range(len(finals[0])))
    if not batched:
        output = output.squeeze(1)
        final = tuple(part.squeeze(1) for part in final)
    elif layer.batch_first:
        output = output.transpose(0, 1)
    return output, (final if layer.mode == "LSTM" else final[0])


def _unrolled(layer: RNNBase) -> bool:
    """Whether no ONNX operator computes this layer (projection, or a cell ONNX lacks)."""
    return layer.proj_size > 0 or layer.mode not in _ONNX_OP


def _unrolled_layers(
    layer: RNNBase, x: Tensor, state, lengths
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The reference loop of each layer, traced step by step: (T, B, I) -> output, final state."""
    directions = layer.directions
    batch = x.size(1)
    shapes = layer._state_shapes(batch)
    if lengths is not None:
        lengths = lengths.to(torch.int64)
    finals = []
    for index in range(layer.num_layers):
        hx = []
        for d in range(directions):
            row = index * directions + d
            if state is None:
                hx.append(tuple(x.new_zeros(batch, shape[-1]) for _, shape in shapes))
            else:
                hx.append(tuple(part[row] for part in state))
        weights = [layer.cell_weights(index, d) for d in range(directions)]
        x, layer_finals = run_layer_reference(layer.spec, x, hx, weights, lengths)
        finals.extend(layer_finals)
    return x, tuple(torch.stack([f[i] for f in finals]) for i in range(len(shapes)))


@contextmanager
def _exporting(module: nn.Module) -> Iterator[None]:
    """Every rnnkit layer in `module` runs as ONNX operators, in eval mode, for the duration."""
    layers = [m for m in module.modules() if isinstance(m, RNNBase)]
    training = [(m, m.training) for m in module.modules()]
    module.eval()
    for layer in layers:
        layer.forward = types.MethodType(_export_forward, layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
        for submodule, was_training in training:
            submodule.training = was_training


# -- names and axes ---------------------------------------------------------------------------------
def _example_lengths(module: nn.Module, x: Tensor, lengths: bool | Tensor) -> Tensor:
    if isinstance(lengths, Tensor):
        if lengths.dim() != 1 or lengths.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                "export_onnx: lengths must be True or a 1-D int32/int64 tensor, "
                f"got dtype {lengths.dtype} and shape {tuple(lengths.shape)}"
            )
        return lengths.to(torch.int64)
    if lengths is not True:
        raise TypeError(f"export_onnx: lengths must be a bool or a Tensor, got {lengths!r}")
    layer = module if isinstance(module, RNNBase) else None
    if x.dim() < 2:
        raise ValueError(f"export_onnx: lengths needs batched input, got shape {tuple(x.shape)}")
    batch_first = layer is None or layer.batch_first
    batch, steps = (x.size(0), x.size(1)) if batch_first else (x.size(1), x.size(0))
    return torch.full((batch,), steps, dtype=torch.int64)


def _layer_io_names(layer: RNNBase, args: tuple, with_lengths: bool) -> tuple[list[str], list[str]]:
    lstm = layer.mode == "LSTM"
    inputs = ["input"]
    if len(args) > 1 and args[1] is not None:
        inputs += ["h0", "c0"] if lstm else ["h0"]
    if with_lengths:
        inputs.append("lengths")
    outputs = ["output", "h_n", "c_n"] if lstm else ["output", "h_n"]
    return inputs, outputs


def _layer_dynamic_axes(
    layer: RNNBase, x: Tensor, input_names: list[str], output_names: list[str]
) -> dict[str, dict[int, str]]:
    """Batch and time dynamic for the layer's inputs and outputs (time fixed if unrolled)."""
    time_axis = {} if _unrolled(layer) else None
    if x.dim() == 3:
        sequence = {0: "batch", 1: "time"} if layer.batch_first else {0: "time", 1: "batch"}
        state = {1: "batch"}
    else:
        sequence, state = {0: "time"}, {}
    if time_axis is not None:
        sequence = {axis: label for axis, label in sequence.items() if label != "time"}
    axes = {}
    for name in input_names + output_names:
        if name in ("input", "output"):
            axes[name] = sequence
        elif name == "lengths":
            axes[name] = {0: "batch"} if x.dim() == 3 else {}
        else:
            axes[name] = state
    return {name: value for name, value in axes.items() if value}
