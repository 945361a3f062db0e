"""The models the experiments train: an rnnkit layer with a linear readout, and a small causal
torch.nn.TransformerEncoder of the same shape of interface."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

import rnnkit

CELLS = {"RNN": rnnkit.RNN, "LSTM": rnnkit.LSTM, "GRU": rnnkit.GRU}


def parameter_count(module: nn.Module) -> int:
    """Number of trainable scalars in the module."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class RecurrentReadout(nn.Module):
    """(B, T, I) -> (B, T, O) per step (`per_step=True`) or (B, O) from the final states."""

    def __init__(
        self,
        cell: str,
        input_size: int,
        hidden_size: int,
        output_size: int,
        *,
        num_layers: int = 1,
        bidirectional: bool = False,
        per_step: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"RecurrentReadout: cell must be one of {tuple(CELLS)}, got {cell!r}")
        self.cell = cell
        self.per_step = per_step
        self.recurrent = CELLS[cell](
            input_size,
            hidden_size,
            num_layers=num_layers,
            bidirectional=bidirectional,
            batch_first=True,
            backend=backend,
        )
        directions = 2 if bidirectional else 1
        self.readout = nn.Linear(directions * hidden_size, output_size)

    def forward(self, x: Tensor) -> Tensor:
        outputs, _ = self.recurrent(x)
        if self.per_step:
            return self.readout(outputs)
        if self.recurrent.bidirectional:
            # The backward direction has read the whole sequence at t = 0, not at t = T - 1.
            hidden = self.recurrent.hidden_size
            return self.readout(torch.cat([outputs[:, -1, :hidden], outputs[:, 0, hidden:]], -1))
        return self.readout(outputs[:, -1])


def sinusoidal_positions(length: int, width: int) -> Tensor:
    """(T, D) fixed sinusoidal position encodings (Vaswani et al. 2017)."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(1e4) / width))
    table = torch.zeros(length, width)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: width // 2])
    return table


class CausalTransformer(nn.Module):
    """(B, T, I) -> (B, O) read at the last step of a causal (left-to-right) TransformerEncoder.

    Position encodings are sinusoidal, so the parameter count does not depend on the length.
    `step` runs one token at a time against a key/value cache: the streaming form of the same
    function, checked against `forward` by the tests.
    """

    def __init__(
        self, input_size: int, width: int, heads: int, feedforward: int, layers: int, output: int
    ) -> None:
        super().__init__()
        self.width = width
        self.heads = heads
        self.embed = nn.Linear(input_size, width)
        layer = nn.TransformerEncoderLayer(
            width, heads, feedforward, dropout=0.0, batch_first=True, norm_first=False
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.readout = nn.Linear(width, output)

    def encode(self, x: Tensor) -> Tensor:
        """(B, T, I) -> (B, T, D) causal encodings."""
        steps = x.size(1)
        hidden = self.embed(x) + sinusoidal_positions(steps, self.width).to(x)
        mask = nn.Transformer.generate_square_subsequent_mask(steps, device=x.device, dtype=x.dtype)
        return self.encoder(hidden, mask=mask, is_causal=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.readout(self.encode(x)[:, -1])

    def empty_cache(self, batch: int) -> list[tuple[Tensor, Tensor]]:
        """One (keys, values) pair per layer, each (B, heads, 0, D / heads)."""
        head_width = self.width // self.heads
        empty = self.embed.weight.new_zeros(batch, self.heads, 0, head_width)
        return [(empty, empty) for _ in self.encoder.layers]

    def step(
        self, x: Tensor, position: int, cache: list[tuple[Tensor, Tensor]]
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """(B, I) token at `position`, cache -> (B, D) encoding of this token, grown cache."""
        hidden = self.embed(x) + sinusoidal_positions(position + 1, self.width)[position].to(x)
        batch, head_width = x.size(0), self.width // self.heads
        grown = []
        for layer, (keys, values) in zip(self.encoder.layers, cache):
            attention = layer.self_attn
            q, k, v = (hidden @ attention.in_proj_weight.T + attention.in_proj_bias).chunk(3, -1)
            q, k, v = (t.view(batch, self.heads, 1, head_width) for t in (q, k, v))
            keys, values = torch.cat([keys, k], dim=2), torch.cat([values, v], dim=2)
            weights = torch.softmax(q @ keys.transpose(-1, -2) / math.sqrt(head_width), dim=-1)
            mixed = (weights @ values).reshape(batch, self.width)
            hidden = layer.norm1(hidden + attention.out_proj(mixed))
            feed = layer.linear2(layer.activation(layer.linear1(hidden)))
            hidden = layer.norm2(hidden + feed)
            grown.append((keys, values))
        return hidden, grown
