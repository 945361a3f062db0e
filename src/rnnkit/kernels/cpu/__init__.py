"""Fused CPU kernels (numba): forward and hand-derived backpropagation through time.

Each cell file exports `run_direction(x, state, weights, lengths, reverse, **options)`
(`layer_norm.run_direction` takes the spec first, for its two cells):
(T, B, I) input -> ((T, B, H_out) output, final state tuple), differentiable through its own
torch.autograd.Function. This package turns them into the dispatch's backend.
"""

from __future__ import annotations

import functools
import warnings

import torch
from numba.core.errors import NumbaIRAssumptionWarning
from torch import Tensor

from rnnkit.kernels.cpu.cache import keyed_numba_cache
from rnnkit.scan import zero_state
from rnnkit.spec import LayerSpec

# Every module that compiles with cache=True, imported here: numba picks a function's cache
# directory when it is decorated (cache.py). Importing any of them runs this package first.
with keyed_numba_cache():
    from rnnkit.kernels.cpu import (  # noqa: F401
        activations,
        blas,
        gru,
        indrnn,
        layer_norm,
        lstm,
        minimal,
        panels,
        projection,
        random_masks,
        regularized,
        rnn,
    )

# Compiling the layer-norm kernels, which inline the GRU file's tanh overload, trips one of
# numba's internal "pedantic" SSA checks (numba 0.68): a note for numba's developers, printed to
# users at every cold compile, with no effect on the compiled code (tested against the reference).
warnings.filterwarnings("ignore", category=NumbaIRAssumptionWarning)

_DTYPES = (torch.float32, torch.float64)
_LAYER_NORM_MODES = ("LN_LSTM", "LN_GRU")


class CPUBackend:
    """Runs each direction of a layer through the cell's fused numba kernel."""

    # hx None: the plain cells' kernels start from zeros without a state tensor.
    takes_zero_state = True

    def unsupported_reason(self, spec: LayerSpec, x: Tensor, lengths: Tensor | None) -> str | None:
        if not x.is_cpu:
            return f"input is on {x.device}, not the CPU"
        if x.dtype not in _DTYPES:
            return f"dtype {x.dtype} is not float32 or float64"
        return None

    def run_layer(
        self,
        spec: LayerSpec,
        x: Tensor,
        hx: list[tuple[Tensor, ...]] | None,
        weights: list[tuple[Tensor | None, ...]],
        lengths: Tensor | None,
    ) -> tuple[Tensor, list[tuple[Tensor, ...]]]:
        """(T, B, I) -> (T, B, D * H_out) and one final state tuple per direction; hx None:
        zero initial states."""
        check_kernel_inputs(spec, x, hx, weights, lengths)
        outputs, finals = [], []
        for direction, direction_weights in enumerate(weights):
            reverse = direction == 1
            state = None if hx is None else hx[direction]
            if spec.mode in _LAYER_NORM_MODES:  # with or without in-loop regularisers
                output, final = layer_norm.run_direction(
                    spec,
                    x,
                    state or zero_state(spec, x),
                    tuple(direction_weights),
                    lengths,
                    reverse,
                )
            elif regularized.active(spec):
                output, final = regularized.run_direction(
                    spec,
                    x,
                    state or zero_state(spec, x),
                    tuple(direction_weights),
                    lengths,
                    reverse,
                )
            elif spec.mode == "LSTM":
                output, final = lstm.run_direction(x, state, direction_weights, lengths, reverse)
            elif spec.mode == "GRU":
                output, final = gru.run_direction(
                    x, state, direction_weights, lengths, reverse, reset_after=spec.reset_after
                )
            else:
                nonlinearity = "tanh" if spec.mode == "RNN_TANH" else "relu"
                output, final = rnn.run_direction(
                    x, state, direction_weights, lengths, reverse, nonlinearity=nonlinearity
                )
            outputs.append(output)
            finals.append(final)
        output = torch.cat(outputs, dim=-1) if len(outputs) > 1 else outputs[0]
        return output, finals


def check_kernel_inputs(
    spec: LayerSpec,
    x: Tensor,
    hx: list[tuple[Tensor, ...]] | None,
    weights: list[tuple[Tensor | None, ...]],
    lengths: Tensor | None,
) -> None:
    """Raise ValueError/TypeError unless every array the compiled kernels index fits the layout
    (hx None: zero states, made by the kernels).

    The numba kernels do no bounds checks of their own, so a caller that bypasses the layer's
    validation (calling the dispatch directly) must not be able to make them read out of bounds.
    """
    # x.is_cpu, not x.device.type == "cpu": the same test, without building a device object.
    if x.dim() != 3 or x.dtype not in _DTYPES or not x.is_cpu:
        raise TypeError(
            f"cpu kernel: x must be a 3-D float32/float64 CPU tensor, got {x.dim()}-D {x.dtype} "
            f"on {x.device}"
        )
    steps, batch, inputs = x.shape
    states = [()] * spec.directions if hx is None else hx
    if len(states) != spec.directions or len(weights) != spec.directions:
        raise ValueError(
            f"cpu kernel: hx and weights must hold {spec.directions} direction(s), "
            f"got {len(states)} and {len(weights)}"
        )
    dtype = x.dtype
    labels, shapes, weight_count, layouts = _layout(
        spec.mode, spec.hidden_size, spec.proj_size, spec.bias, batch, inputs, dtype
    )
    state_count = len(labels) - weight_count
    if hx is None:  # only the weights to check
        labels, shapes, layouts = labels[state_count:], shapes[state_count:], layouts[state_count:]
    for direction in range(spec.directions):
        if len(weights[direction]) < weight_count:
            raise ValueError(
                f"cpu kernel: weights[{direction}] must hold {weight_count} tensors "
                f"({', '.join(labels[-weight_count:])}), got {len(weights[direction])}"
            )
        if hx is not None and len(hx[direction]) != state_count:
            raise ValueError(
                f"cpu kernel: hx[{direction}] must hold {state_count} tensor(s), "
                f"got {len(hx[direction])}"
            )
        tensors = (*states[direction], *weights[direction][:weight_count])
        # One pass over all tensors; the loop below finds the first mismatch to name it.
        if [None if t is None else (t.shape, t.dtype, t.is_cpu) for t in tensors] == layouts:
            continue
        for label, tensor, shape in zip(labels, tensors, shapes):
            got = None if tensor is None else tuple(tensor.shape)
            if got != shape:
                raise ValueError(
                    f"cpu kernel: {label} of direction {direction} must have shape {shape}, "
                    f"got {got}"
                )
            # x is on the CPU, so tensor.device != x.device is not tensor.is_cpu.
            if tensor is not None and (tensor.dtype != dtype or not tensor.is_cpu):
                raise TypeError(
                    f"cpu kernel: {label} must be {x.dtype} on {x.device}, "
                    f"got {tensor.dtype} on {tensor.device}"
                )
    if lengths is not None:
        if lengths.dim() != 1 or lengths.numel() != batch or lengths.is_floating_point():
            raise ValueError(
                f"cpu kernel: lengths must be a ({batch},) integer tensor, "
                f"got {tuple(lengths.shape)} {lengths.dtype}"
            )
        if batch and not bool(((lengths >= 1) & (lengths <= steps)).all()):
            raise ValueError(
                f"cpu kernel: lengths must lie in [1, {steps}], got {lengths.tolist()}"
            )


@functools.lru_cache(maxsize=256)
def _layout(
    mode: str, hidden: int, proj_size: int, bias: bool, batch: int, inputs: int, dtype: torch.dtype
) -> tuple[tuple[str, ...], tuple[tuple[int, ...] | None, ...], int, list]:
    """(labels, shapes (None: absent)) of one direction's state and weight tensors in order, how
    many of them are weights, and each one's (shape, dtype, on the CPU) as check_kernel_inputs
    compares them, for a layer with these LayerSpec fields, input sizes and dtype."""
    out = proj_size if proj_size > 0 else hidden
    rows = {"LSTM": 4, "GRU": 3, "LN_LSTM": 4, "LN_GRU": 3}.get(mode, 1) * hidden
    has_cell_state = mode in ("LSTM", "LN_LSTM")
    states = {"h": (batch, out), "c": (batch, hidden)} if has_cell_state else {"h": (batch, out)}
    expected = {
        "w_ih": (rows, inputs),
        "w_hh": (rows, out),
        "b_ih": (rows,) if bias else None,
        "b_hh": (rows,) if bias else None,
    }
    if mode == "LSTM":
        expected["w_hr"] = (proj_size, hidden) if proj_size else None
    if mode in _LAYER_NORM_MODES:
        expected |= {"g_ih": (rows,), "g_hh": (rows,)}
    if mode == "LN_LSTM":
        expected |= {"g_c": (hidden,), "b_c": (hidden,) if bias else None}
    named = states | expected
    shapes = tuple(named.values())
    layouts = [None if shape is None else (shape, dtype, True) for shape in shapes]
    return tuple(named), shapes, len(expected), layouts


backend = CPUBackend()


def warmup() -> None:
    """Compile, or load from numba's disk cache, every kernel of every cell (float32, float64)."""
    from rnnkit.kernels.cpu import indrnn, minimal, random_masks

    for module in (random_masks, lstm, gru, rnn, layer_norm, regularized, minimal, indrnn):
        module.warmup()
