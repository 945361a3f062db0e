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
