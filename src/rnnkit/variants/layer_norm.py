"""Layer-normalised LSTM and GRU layers (Ba et al. 2016): rnnkit.LSTM / GRU's interface.

The cells' equations are in `rnnkit.cells.layer_norm`. Each layer and direction holds torch's
weight_ih / weight_hh / bias_ih / bias_hh (the biases are the shifts of the two normalisations)
plus gain_ih / gain_hh, and for the LSTM gain_c / bias_c of the cell-state normalisation, all with
torch's `_l{k}[_reverse]` suffixes. The layers run through `rnnkit.dispatch`: the reference loop,
the fused CPU kernel in `rnnkit.kernels.cpu.layer_norm`, or on CUDA tensors the Triton kernels in
`rnnkit.kernels.gpu.layer_norm`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from rnnkit.layers import RNNBase

_LN_CELL_WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "gain_ih", "gain_hh")
_LN_LSTM_CELL_WEIGHTS = (*_LN_CELL_WEIGHTS, "gain_c", "bias_c")


class _LayerNormBase(RNNBase):
    """RNNBase with the gains and shifts of the layer normalisations added per layer/direction."""

    def __init__(self, mode: str, input_size: int, hidden_size: int, *args, **kwargs) -> None:
        super().__init__(mode, input_size, hidden_size, *args, **kwargs)
        factory = {"device": kwargs.get("device"), "dtype": kwargs.get("dtype")}
        rows = self.weight_ih_l0.shape[0]
        names: list[str] = []
        for suffix in self._suffixes():
            base = [f"weight_ih{suffix}", f"weight_hh{suffix}"]
            if self.bias:
                base += [f"bias_ih{suffix}", f"bias_hh{suffix}"]
            extra = [(f"gain_ih{suffix}", rows), (f"gain_hh{suffix}", rows)]
            if self.mode == "LN_LSTM":
                extra.append((f"gain_c{suffix}", hidden_size))
                if self.bias:
                    extra.append((f"bias_c{suffix}", hidden_size))
            for name, size in extra:
                setattr(self, name, nn.Parameter(torch.empty(size, **factory)))
            names += base + [name for name, _ in extra]
        # Grouped per layer and direction, as all_weights expects.
        self._flat_weights_names = names
        self.reset_parameters()

    def _suffixes(self) -> list[str]:
        return [
            f"_l{layer}" + ("_reverse" if direction == 1 else "")
            for layer in range(self.num_layers)
            for direction in range(self.directions)
        ]

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

    def cell_weights(self, layer: int, direction: int) -> tuple[Tensor | None, ...]:
        """(w_ih, w_hh, b_ih, b_hh, g_ih, g_hh[, g_c, b_c]) of one layer and direction."""
        bases = _LN_LSTM_CELL_WEIGHTS if self.mode == "LN_LSTM" else _LN_CELL_WEIGHTS
        return self._cell_attributes(bases, layer, direction)

    def to_torch(self) -> nn.Module:
        raise TypeError(f"{type(self).__name__} has no torch.nn equivalent")


class LayerNormLSTM(_LayerNormBase):
    """Layer-normalised LSTM over a sequence: rnnkit.LSTM's interface (no proj_size).

    (T, B, I) / (B, T, I) / (T, I) / PackedSequence -> (output, (h_n, c_n)).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
        **regularizers: float,
    ) -> None:
        super().__init__(
            "LN_LSTM",
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            device=device,
            dtype=dtype,
            backend=backend,
            **regularizers,
        )


class LayerNormGRU(_LayerNormBase):
    """Layer-normalised GRU over a sequence (reset-after form): rnnkit.GRU's interface.

    (T, B, I) / (B, T, I) / (T, I) / PackedSequence -> (output, h_n).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
        **regularizers: float,
    ) -> None:
        super().__init__(
            "LN_GRU",
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            device=device,
            dtype=dtype,
            backend=backend,
            **regularizers,
        )
