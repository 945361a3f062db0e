"""Fused CPU kernels (numba): forward and hand-derived backpropagation through time.

Each cell file exports `run_direction(x, state, weights, lengths, reverse, **options)`:
(T, B, I) input -> ((T, B, H_out) output, final state tuple), differentiable through its own
torch.autograd.Function. This package turns them into the dispatch's backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rnnkit.kernels.cpu import gru, lstm, rnn
from rnnkit.spec import LayerSpec

_DTYPES = (torch.float32, torch.float64)


class CPUBackend:
    """Runs each direction of a layer through the cell's fused numba kernel."""

    def unsupported_reason(self, spec: LayerSpec, x: Tensor, lengths: Tensor | None) -> str | None:
        if x.device.type != "cpu":
            return f"input is on {x.device}, not the CPU"
        if x.dtype not in _DTYPES:
            return f"dtype {x.dtype} is not float32 or float64"
        return None

    def run_layer(
        self,
        spec: LayerSpec,
        x: Tensor,
        hx: list[tuple[Tensor, ...]],
        weights: list[tuple[Tensor | None, ...]],
        lengths: Tensor | None,
    ) -> tuple[Tensor, list[tuple[Tensor, ...]]]:
        """(T, B, I) -> (T, B, D * H_out) and one final state tuple per direction."""
        outputs, finals = [], []
        for direction, (state, direction_weights) in enumerate(zip(hx, weights)):
            reverse = direction == 1
            if spec.mode == "LSTM":
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


backend = CPUBackend()


def warmup() -> None:
    """Compile, or load from numba's disk cache, every kernel of every cell (float32, float64)."""
    for cell in (lstm, gru, rnn):
        cell.warmup()
