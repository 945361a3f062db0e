"""The reference path: a plain autograd loop of a cell's step over time.

This is the readable twin that every fused kernel is tested against. It handles one layer at a
time, every direction, variable lengths and initial states; the layer does stacking and dropout.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor

from rnnkit.cells import gru_step, lstm_step, rnn_step
from rnnkit.cells.layer_norm import ln_gru_step, ln_lstm_step
from rnnkit.spec import LayerSpec

State = tuple[Tensor, ...]
Step = Callable[..., State]


def step_function(spec: LayerSpec) -> Step:
    """The cell step that a layer spec names."""
    if spec.mode == "LSTM":
        return lstm_step
    if spec.mode == "LN_LSTM":
        return ln_lstm_step
    if spec.mode == "LN_GRU":
        return ln_gru_step
    if spec.mode == "GRU":
        return partial(gru_step, reset_after=spec.reset_after)
    return partial(rnn_step, nonlinearity="tanh" if spec.mode == "RNN_TANH" else "relu")


def reverse_padded(x: Tensor, lengths: Tensor | None) -> Tensor:
    """(T, B, ...) -> the same with each sequence's first lengths[b] steps reversed, padding kept."""
    if lengths is None:
        return x.flip(0)
    steps = x.size(0)
    time = torch.arange(steps, device=x.device).unsqueeze(1)
    lengths = lengths.to(x.device).unsqueeze(0)
    index = torch.where(time < lengths, lengths - 1 - time, time)
    index = index.reshape(steps, -1, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(0, index)


def scan_direction(
    step: Step,
    x: Tensor,
    state: State,
    weights: Sequence[Tensor | None],
    lengths: Tensor | None,
    reverse: bool,
) -> tuple[Tensor, State]:
    """(T, B, I) input, initial state -> (T, B, H_out) outputs, final state (at each last valid step)."""
    if reverse:
        x = reverse_padded(x, lengths)
    outputs = []
    # unbind, not x[t]: the backward of T separate indexings writes T full-size gradients.
    for t, x_t in enumerate(x.unbind(0)):
        new_state = step(x_t, state, *weights)
        if lengths is None:
            state = new_state
            outputs.append(new_state[0])
        else:
            valid = (t < lengths).to(x.device).unsqueeze(1)
            state = tuple(torch.where(valid, new, old) for new, old in zip(new_state, state))
            outputs.append(new_state[0].masked_fill(~valid, 0))
    output = torch.stack(outputs)
    if reverse:
        output = reverse_padded(output, lengths)
    return output, state


def zero_state(spec: LayerSpec, x: Tensor) -> State:
    """The zero initial state of one direction of a layer, for a (T, B, I) input x."""
    batch = x.size(1)
    return tuple(x.new_zeros(batch, size) for size in spec.state_sizes)


def run_layer_reference(
    spec: LayerSpec,
    x: Tensor,
    hx: Sequence[State],
    weights: Sequence[Sequence[Tensor | None]],
    lengths: Tensor | None,
) -> tuple[Tensor, list[State]]:
    """(T, B, I) -> (T, B, D * H_out) and one final state per direction, by autograd."""
    # Imported here: rnnkit.variants imports the layers, which import this module.
    from rnnkit.variants.regularization import regularized_step

    step = step_function(spec)
    outputs, finals = [], []
    for direction, (state, direction_weights) in enumerate(zip(hx, weights)):
        output, final = scan_direction(
            regularized_step(step, spec, state, x.size(0)),
            x,
            state,
            direction_weights,
            lengths,
            reverse=direction == 1,
        )
        outputs.append(output)
        finals.append(final)
    return torch.cat(outputs, dim=-1) if len(outputs) > 1 else outputs[0], finals


# torch's own fused cell ops, what torch.nn.RNNCell, GRUCell and LSTMCell run, by spec mode.
_TORCH_CELL_OPS = {
    "RNN_TANH": torch.rnn_tanh_cell,
    "RNN_RELU": torch.rnn_relu_cell,
    "GRU": torch.gru_cell,
    "LSTM": torch.lstm_cell,
}


# Memoised in a plain dict, not functools.cache: torch.compile traces a dict lookup quietly but
# warns at every cache-wrapped call (as layers._suffixed).
_SINGLE_STEP_COVERS: dict[LayerSpec, bool] = {}


def single_step_covers(spec: LayerSpec) -> bool:
    """Whether torch's fused cell op computes this layer's step: a plain RNN, torch's form of the
    GRU, an LSTM without projection, with no regulariser inside the recurrence."""
    covers = _SINGLE_STEP_COVERS.get(spec)
    if covers is None:
        # Imported here: rnnkit.variants imports the layers, which import this module.
        from rnnkit.variants.regularization import in_loop_regularizers

        covers = (
            spec.mode in _TORCH_CELL_OPS
            and spec.proj_size == 0
            and (spec.mode != "GRU" or spec.reset_after)
            and in_loop_regularizers(spec) is None
        )
        _SINGLE_STEP_COVERS[spec] = covers
    return covers


def run_layer_single_step(
    spec: LayerSpec,
    x: Tensor,
    hx: Sequence[State],
    weights: Sequence[Sequence[Tensor | None]],
) -> tuple[Tensor, list[State]]:
    """(1, B, I) -> (1, B, D * H_out) and one final state per direction: one time step of each
    direction by torch's fused cell op (single_step_covers(spec) must hold)."""
    cell = _TORCH_CELL_OPS[spec.mode]
    x_t = x[0]
    outputs, finals = [], []
    for state, (w_ih, w_hh, b_ih, b_hh, *_) in zip(hx, weights):
        if spec.mode == "LSTM":
            final = tuple(cell(x_t, state, w_ih, w_hh, b_ih, b_hh))
        else:
            final = (cell(x_t, state[0], w_ih, w_hh, b_ih, b_hh),)
        outputs.append(final[0])
        finals.append(final)
    # A copy for one direction: the output and the final state never share memory (torch.nn's
    # do not, and the layer hands a final state on as a view of what the backend returns).
    output = torch.cat(outputs, dim=-1) if len(outputs) > 1 else outputs[0].clone()
    return output.unsqueeze(0), finals
