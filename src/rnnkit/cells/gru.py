"""Gated recurrent unit (Cho et al. 2014), in both of its published forms.

Torch's gate order in weight_ih / weight_hh is (r, z, n):

    r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)      reset gate
    z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)      update gate ("keep" gate)
    reset_after=True  (torch, cuDNN):  n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
    reset_after=False (Cho et al.):    n = tanh(W_in x + b_in + W_hn (r * h) + b_hn)
    h' = (1 - z) * n + z * h

The textbook writes h_t = (1 - u) h_{t-1} + u * h~ with an update gate u: torch's z is the
textbook's 1 - u (z is the share of the old state that is kept), and n is the textbook's h~.
The original form applies the reset gate to h before the recurrent matmul; the torch form applies
it to the result, which lets all three recurrent matmuls run as one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rnnkit.cells.base import CellBase


def gru_step(
    x: Tensor,
    state: tuple[Tensor],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    reset_after: bool = True,
) -> tuple[Tensor]:
    """One step: (B, I) input, ((B, H),) state -> ((B, H),) next state."""
    (h,) = state
    x_r, x_z, x_n = (x @ w_ih.T).chunk(3, dim=-1)
    w_hr, w_hz, w_hn = w_hh.chunk(3, dim=0)
    if b_ih is not None:
        b_ir, b_iz, b_in = b_ih.chunk(3)
        b_hr, b_hz, b_hn = b_hh.chunk(3)
        x_r, x_z, x_n = x_r + b_ir + b_hr, x_z + b_iz + b_hz, x_n + b_in
    r = torch.sigmoid(x_r + h @ w_hr.T)
    z = torch.sigmoid(x_z + h @ w_hz.T)
    if reset_after:
        h_n = h @ w_hn.T
        if b_ih is not None:
            h_n = h_n + b_hn
        n = torch.tanh(x_n + r * h_n)
    else:
        h_n = (r * h) @ w_hn.T
        if b_ih is not None:
            h_n = h_n + b_hn
        n = torch.tanh(x_n + h_n)
    return ((1 - z) * n + z * h,)


class GRUCell(CellBase):
    """GRU cell, parameters named as torch.nn.GRUCell: (B, I), (B, H) -> (B, H)."""

    gates = 3

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        reset_after: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        self.reset_after = bool(reset_after)
        super().__init__(input_size, hidden_size, bias, device=device, dtype=dtype)

    def step(self, x: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return gru_step(x, state, *self.step_weights(), reset_after=self.reset_after)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text if self.reset_after else f"{text}, reset_after=False"
