"""Long short-term memory (Hochreiter & Schmidhuber 1997, with the forget gate of Gers et al.).

    i = sigmoid(W_ii x + b_ii + W_hi h + b_hi)      input gate
    f = sigmoid(W_if x + b_if + W_hf h + b_hf)      forget gate
    g = tanh(W_ig x + b_ig + W_hg h + b_hg)         cell candidate
    o = sigmoid(W_io x + b_io + W_ho h + b_ho)      output gate
    c' = f * c + i * g
    h' = o * tanh(c')            (with proj_size: h' = W_hr (o * tanh(c')))

The rows of weight_ih / weight_hh are the gates in torch's order (i, f, g, o).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rnnkit.cells.base import CellBase


def lstm_step(
    x: Tensor,
    state: tuple[Tensor, Tensor],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    w_hr: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One step: (B, I) input, ((B, P), (B, H)) state -> ((B, P), (B, H)); P = H without projection."""
    h, c = state
    pre = x @ w_ih.T + h @ w_hh.T
    if b_ih is not None:
        pre = pre + b_ih + b_hh
    i, f, g, o = pre.chunk(4, dim=-1)
    c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_next = torch.sigmoid(o) * torch.tanh(c_next)
    if w_hr is not None:
        h_next = h_next @ w_hr.T
    return h_next, c_next


class LSTMCell(CellBase):
    """LSTM cell, parameters named as torch.nn.LSTMCell: (B, I), ((B, H), (B, H)) -> ((B, H), (B, H))."""

    gates = 4

    def step(self, x: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return lstm_step(x, state, *self.step_weights())
