"""Layer-normalised LSTM and GRU (Ba, Kiros & Hinton 2016, "Layer Normalization").

Layer normalisation of a vector v of n features, with a gain gamma and a shift beta:

    LN(v; gamma, beta) = gamma * (v - mean(v)) / sqrt(var(v) + eps) + beta
    mean(v) = sum_j v_j / n,   var(v) = sum_j (v_j - mean(v))^2 / n,   eps = 1e-5

LSTM (the paper's layer-normalised LSTM; rows of weight_ih / weight_hh in torch's gate order
i, f, g, o; the whole 4H vector is normalised at once):

    a  = LN(W_ih x; gamma_ih, beta_ih) + LN(W_hh h; gamma_hh, beta_hh)      (4H,)
    i, f, g, o = sigmoid(a_i), sigmoid(a_f), tanh(a_g), sigmoid(a_o)
    c' = f * c + i * g
    h' = o * tanh(LN(c'; gamma_c, beta_c))

GRU (torch's reset-after form, the one that keeps W_hh h whole so that it can be normalised;
gate order r, z, n):

    a_x = LN(W_ih x; gamma_ih, beta_ih),   a_h = LN(W_hh h; gamma_hh, beta_hh)      (3H,)
    r = sigmoid(a_x,r + a_h,r)
    z = sigmoid(a_x,z + a_h,z)
    n = tanh(a_x,n + r * a_h,n)
    h' = (1 - z) * n + z * h

The paper adds a bias b after the two normalisations; a shift beta does the same job, so the
shifts are the biases here: bias_ih = beta_ih and bias_hh = beta_hh (their sum is the paper's b),
and `bias=False` leaves the normalisations with gains only. Parameters: weight_ih, weight_hh,
bias_ih, bias_hh as in torch.nn, plus gain_ih, gain_hh (and gain_c, bias_c for the LSTM).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from rnnkit.cells.base import CellBase

LAYER_NORM_EPS = 1e-5


def layer_norm(v: Tensor, gain: Tensor, shift: Tensor | None) -> Tensor:
    """(..., n) -> (..., n): normalised over the last dimension, then scaled and shifted."""
    mean = v.mean(-1, keepdim=True)
    variance = (v - mean).square().mean(-1, keepdim=True)
    normalised = gain * (v - mean) / torch.sqrt(variance + LAYER_NORM_EPS)
    return normalised if shift is None else normalised + shift


def ln_lstm_step(
    x: Tensor,
    state: tuple[Tensor, Tensor],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    g_ih: Tensor,
    g_hh: Tensor,
    g_c: Tensor,
    b_c: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """One step: (B, I) input, ((B, H), (B, H)) state -> ((B, H), (B, H)) next state."""
    h, c = state
    pre = layer_norm(x @ w_ih.T, g_ih, b_ih) + layer_norm(h @ w_hh.T, g_hh, b_hh)
    i, f, g, o = pre.chunk(4, dim=-1)
    c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_next = torch.sigmoid(o) * torch.tanh(layer_norm(c_next, g_c, b_c))
    return h_next, c_next


def ln_gru_gates(
    x: Tensor,
    h: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    g_ih: Tensor,
    g_hh: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """(B, I) input, (B, H) state -> the (B, H) reset, update and candidate activations r, z, n."""
    x_r, x_z, x_n = layer_norm(x @ w_ih.T, g_ih, b_ih).chunk(3, dim=-1)
    h_r, h_z, h_n = layer_norm(h @ w_hh.T, g_hh, b_hh).chunk(3, dim=-1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return r, z, n


def ln_gru_step(
    x: Tensor,
    state: tuple[Tensor],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    g_ih: Tensor,
    g_hh: Tensor,
) -> tuple[Tensor]:
    """One step: (B, I) input, ((B, H),) state -> ((B, H),) next state."""
    (h,) = state
    _, z, n = ln_gru_gates(x, h, w_ih, w_hh, b_ih, b_hh, g_ih, g_hh)
    return ((1 - z) * n + z * h,)


class _LayerNormCell(CellBase):
    """CellBase plus the gains (and, with bias, shifts) of the layer normalisations."""

    normalises_cell: bool = False

    def __init__(
        self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None
    ) -> None:
        super().__init__(input_size, hidden_size, bias, device=device, dtype=dtype)
        factory = {"device": device, "dtype": dtype}
        rows = self.gates * hidden_size
        self.gain_ih = nn.Parameter(torch.empty(rows, **factory))
        self.gain_hh = nn.Parameter(torch.empty(rows, **factory))
        if self.normalises_cell:
            self.gain_c = nn.Parameter(torch.empty(hidden_size, **factory))
            if bias:
                self.bias_c = nn.Parameter(torch.empty(hidden_size, **factory))
            else:
                self.register_parameter("bias_c", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weights uniform in +-1/sqrt(hidden_size) (torch's default); gains 1, shifts 0."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for name, parameter in self.named_parameters():
            if name.startswith("weight"):
                nn.init.uniform_(parameter, -bound, bound)
            elif name.startswith("gain"):
                nn.init.ones_(parameter)
            else:
                nn.init.zeros_(parameter)

    def step_weights(self) -> tuple[Tensor | None, ...]:
        weights = (*super().step_weights(), self.gain_ih, self.gain_hh)
        return (*weights, self.gain_c, self.bias_c) if self.normalises_cell else weights


class LayerNormLSTMCell(_LayerNormCell):
    """Layer-normalised LSTM cell: (B, I), ((B, H), (B, H)) -> ((B, H), (B, H))."""

    gates = 4
    normalises_cell = True

    def step(self, x: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return ln_lstm_step(x, state, *self.step_weights())


class LayerNormGRUCell(_LayerNormCell):
    """Layer-normalised GRU cell (reset-after form): (B, I), (B, H) -> (B, H)."""

    gates = 3

    def step(self, x: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return ln_gru_step(x, state, *self.step_weights())
