"""Pieces the models share: choosing the recurrent layer by name, checking config values."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rnnkit.layers import GRU, LSTM, RNN

CELLS = {"lstm": LSTM, "gru": GRU, "rnn": RNN}
Recurrent = LSTM | GRU | RNN


def recurrent_layer(
    cell: str,
    input_size: int,
    hidden_size: int,
    num_layers: int,
    bidirectional: bool = False,
    dropout: float = 0.0,
) -> nn.Module:
    """A batch-first rnnkit LSTM/GRU/RNN (backend "auto"), named by `cell`."""
    check_choice("cell", cell, tuple(CELLS))
    return CELLS[cell](
        input_size,
        hidden_size,
        num_layers,
        batch_first=True,
        bidirectional=bidirectional,
        dropout=dropout if num_layers > 1 else 0.0,
    )


def zero_state(layer: nn.Module, batch_size: int) -> Tensor | tuple[Tensor, Tensor]:
    """A layer's zero initial state for `batch_size` sequences: (L*D, B, H), (h, c) for LSTM."""
    weight = layer.weight_hh_l0
    shapes = [shape for _, shape in layer._state_shapes(batch_size)]
    zeros = [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for shape in shapes]
    return tuple(zeros) if layer.mode in ("LSTM", "LN_LSTM") else zeros[0]


def check_choice(name: str, value, choices: tuple) -> None:
    """ValueError naming `name` unless value is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_positive_int(owner: str, **values) -> None:
    """ValueError naming the argument unless every value is an int >= 1."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{owner}: {name} must be an int >= 1, got {value!r}")
