"""The vanilla (Elman) recurrent cell: h' = act(W_ih x + b_ih + W_hh h + b_hh)."""

from __future__ import annotations

import torch
from torch import Tensor

from rnnkit.cells.base import CellBase

NONLINEARITIES = ("tanh", "relu")


def rnn_step(
    x: Tensor,
    state: tuple[Tensor],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    nonlinearity: str = "tanh",
) -> tuple[Tensor]:
    """One step: (B, I) input, ((B, H),) state -> ((B, H),) next state."""
    (h,) = state
    pre = x @ w_ih.T + h @ w_hh.T
    if b_ih is not None:
        pre = pre + b_ih + b_hh
    h_next = torch.tanh(pre) if nonlinearity == "tanh" else torch.relu(pre)
    return (h_next,)


class RNNCell(CellBase):
    """Elman cell, parameters named as torch.nn.RNNCell: (B, I), (B, H) -> (B, H)."""

    gates = 1

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        nonlinearity: str = "tanh",
        device=None,
        dtype=None,
    ) -> None:
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(
                f"RNNCell: nonlinearity must be one of {NONLINEARITIES}, got {nonlinearity!r}"
            )
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, bias, device=device, dtype=dtype)

    def step(self, x: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return rnn_step(x, state, *self.step_weights(), nonlinearity=self.nonlinearity)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text if self.nonlinearity == "tanh" else f"{text}, nonlinearity={self.nonlinearity}"
