"""Input, state and output handling shared by the minGRU/minLSTM and IndRNN layers.

The same contract as `rnnkit.layers`: (T, B, I), (B, T, I) with batch_first, unbatched (T, I) or
a PackedSequence in; `lengths=` as an easier alternative to packing; outputs past a sequence's
length are zero and the final state is the state at its last valid step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from rnnkit.cells.base import check_tensor
from rnnkit.dispatch import resolve_elementwise
from rnnkit.layers import _check_lengths, _repack
from rnnkit.scan import reverse_padded

BACKENDS = ("auto", "reference", "cpu", "gpu")


@dataclass
class PreparedInput:
    """The input as the scans see it: (T, B, I) time-major, lengths or None."""

    x: Tensor
    lengths: Tensor | None
    batched: bool
    packed: PackedSequence | None


def check_size(name: str, arg: str, value, low: int) -> int:
    """An int argument >= low, or a ValueError naming it."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name}: {arg} must be an int >= {low}, got {value!r}")
    return value


def check_choice(name: str, arg: str, value, choices: tuple[str, ...]) -> str:
    """One of `choices`, or a ValueError naming the argument."""
    if value not in choices:
        raise ValueError(f"{name}: {arg} must be one of {choices}, got {value!r}")
    return value


def prepare_input(
    name: str, input, lengths, input_size: int, batch_first: bool, weight: Tensor
) -> PreparedInput:
    """Validate a layer's input and lengths once -> (T, B, I) time-major input and lengths."""
    packed = None
    if isinstance(input, PackedSequence):
        if lengths is not None:
            raise ValueError(f"{name}: lengths must be None when input is a PackedSequence")
        packed = input
        check_tensor(name, "input.data", input.data, weight)
        x, packed_lengths = pad_packed_sequence(input)
        lengths_tensor = packed_lengths.to(torch.int64)
        batched = True
    elif isinstance(input, Tensor):
        check_tensor(name, "input", input, weight)
        if input.dim() not in (2, 3):
            raise ValueError(
                f"{name}: input must be 3-D (batched) or 2-D (unbatched), "
                f"got shape {tuple(input.shape)}"
            )
        batched = input.dim() == 3
        if not batched:
            x = input.unsqueeze(1)
        else:
            x = input.transpose(0, 1) if batch_first else input
        lengths_tensor = None
    else:
        raise TypeError(
            f"{name}: input must be a Tensor or PackedSequence, got {type(input).__name__}"
        )
    if x.size(-1) != input_size:
        raise ValueError(
            f"{name}: input.size(-1) must be input_size={input_size}, got {x.size(-1)}"
        )
    if x.size(0) == 0:
        raise ValueError(f"{name}: input must have at least one time step, got 0")
    if lengths is not None:
        if not batched:
            raise ValueError(f"{name}: lengths needs batched (3-D) input")
        lengths_tensor = _check_lengths(name, lengths, x.size(1), x.size(0))
    if lengths_tensor is not None and bool((lengths_tensor == x.size(0)).all()):
        lengths_tensor = None
    if lengths_tensor is not None:
        # Padding never reaches a valid step (the scans are causal); zeroing it keeps it finite.
        x = x * valid_mask(lengths_tensor, x.size(0), x).unsqueeze(-1)
    return PreparedInput(x=x, lengths=lengths_tensor, batched=batched, packed=packed)


def valid_mask(lengths: Tensor, steps: int, like: Tensor) -> Tensor:
    """(B,) lengths -> (T, B) mask in `like`'s dtype: 1 where t < lengths[b], else 0."""
    time = torch.arange(steps, device=like.device).unsqueeze(1)
    return (time < lengths.to(like.device).unsqueeze(0)).to(like.dtype)


def initial_hidden(
    name: str, hx, prepared: PreparedInput, layers: int, hidden_size: int, weight: Tensor
) -> Tensor:
    """hx (layers, B, H) (or (layers, H) unbatched) or None -> (layers, B, H) initial states."""
    x = prepared.x
    shape = (layers, x.size(1), hidden_size)
    if hx is None:
        return x.new_zeros(shape)
    check_tensor(name, "hx", hx, weight)
    expected = shape if prepared.batched else (layers, hidden_size)
    if tuple(hx.shape) != expected:
        raise ValueError(f"{name}: hx must have shape {expected}, got {tuple(hx.shape)}")
    return hx if prepared.batched else hx.unsqueeze(1)


def format_output(
    output: Tensor, h_n: Tensor, prepared: PreparedInput, batch_first: bool
) -> tuple[Tensor | PackedSequence, Tensor]:
    """(T, B, D*H) output, (layers, B, H) final states -> the caller's layout."""
    if prepared.packed is not None:
        return _repack(output, prepared.packed), h_n
    if not prepared.batched:
        return output.squeeze(1), h_n.squeeze(1)
    return (output.transpose(0, 1) if batch_first else output), h_n


def uniform_parameters(module: nn.Module, hidden_size: int) -> None:
    """Every parameter uniform in +-1/sqrt(hidden_size), torch.nn's recurrent default."""
    bound = 1.0 / math.sqrt(hidden_size)
    for weight in module.parameters():
        nn.init.uniform_(weight, -bound, bound)


def check_dropout(name: str, dropout) -> float:
    """The between-layer dropout probability, or a ValueError naming the argument."""
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout <= 1:
        raise ValueError(f"{name}: dropout must be a number in [0, 1], got {dropout!r}")
    return float(dropout)


def dropout_between_layers(module: nn.Module, x: Tensor, layer: int) -> Tensor:
    """Dropout on every layer's output but the last, in training (as torch.nn's layers)."""
    if module.training and module.dropout > 0 and layer < module.num_layers - 1:
        return F.dropout(x, module.dropout, training=True)
    return x


def run_stacked(
    module: nn.Module,
    x: Tensor,
    h0: Tensor,
    lengths: Tensor | None,
    run_direction: Callable[[int, int, Tensor, Tensor], tuple[Tensor, Tensor]],
) -> tuple[Tensor, Tensor]:
    """(T, B, I) input, (L*D, B, H) h0 -> last layer's (T, B, D*H) output, (L*D, B, H) h_n.

    `run_direction(layer, direction, source, h0)` scans one direction forward in time; a reverse
    direction gets each sequence reversed within its length, and its output reversed back.
    """
    finals = []
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(module.directions):
            reverse = direction == 1
            source = reverse_padded(x, lengths) if reverse else x
            state = h0[layer * module.directions + direction]
            output, final = run_direction(layer, direction, source, state)
            outputs.append(reverse_padded(output, lengths) if reverse else output)
            finals.append(final)
        x = torch.cat(outputs, dim=-1) if len(outputs) > 1 else outputs[0]
        x = dropout_between_layers(module, x, layer)
    return x, torch.stack(finals)


def resolve_backend(name: str, requested: str, x: Tensor) -> str:
    """'reference', 'cpu' or 'gpu' for this input (decided by rnnkit.dispatch, which says why)."""
    return resolve_elementwise(name, requested, x)[0]


def step_loop(
    step: Callable[[Tensor, Tensor], Tensor], inputs: Tensor, h0: Tensor, lengths: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(T, B, K) per-step inputs, (B, H) h0 -> (T, B, H) states (0 past lengths), (B, H) final.

    The autograd loop `h = step(inputs[t], h)`. `unbind` rather than `inputs[t]`: indexing a
    tensor T times costs a T-sized zero-filled gradient per step in the backward, T^2 in all.
    """
    h, outputs = h0, []
    if lengths is None:
        for inputs_t in inputs.unbind(0):
            h = step(inputs_t, h)
            outputs.append(h)
        return torch.stack(outputs), h
    valid = valid_mask(lengths, inputs.size(0), inputs).unsqueeze(-1).unbind(0)
    for inputs_t, valid_t in zip(inputs.unbind(0), valid):
        new = step(inputs_t, h)
        h = torch.where(valid_t > 0, new, h)
        outputs.append(new * valid_t)
    return torch.stack(outputs), h


class StreamsStackedState(nn.Module):
    """rnnkit.Stream's protocol for stacked layers with one (L, B, H) state tensor (MinGRU,
    MinLSTM, IndRNN): the subclass has weight_ih_l0, num_layers, hidden_size, bidirectional,
    batch_first and forward(input, hx) -> (output, h_n)."""

    def initial_state(self, batch_size: int) -> Tensor:
        """(L, B, H) zeros: the state before a stream's first chunk (rnnkit.Stream's protocol)."""
        return self.weight_ih_l0.new_zeros(self.num_layers, batch_size, self.hidden_size)

    def stream_step(self, chunk: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """rnnkit.Stream's protocol: (B, t, I) chunk, (L, B, H) state -> (B, t, H), state."""
        if self.bidirectional:
            raise ValueError(
                f"{type(self).__name__}: a bidirectional layer cannot stream (its backward "
                "direction needs the whole sequence first), got bidirectional=True"
            )
        output, h_n = self(chunk if self.batch_first else chunk.transpose(0, 1), state)
        return (output if self.batch_first else output.transpose(0, 1)), h_n
