"""Multi-step forecasting of multichannel series: read a window, emit the next `horizon` steps.

loc, scale = mean and std of the window          (B, 1, C) each; scale >= 1% of training std
z = (x - loc) / scale                          (B, W, C): level- and amplitude-free input
o, h_n = RNN(z)                                h_n of the last layer: (B, H)
z_naive[h] = z[W - period + h mod period]      the seasonal-naive forecast (period 1: z_last)
z_hat = z_naive + reshape(W h_n + b)           (B, horizon, C): corrections to it
y_hat = z_hat * scale + loc
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rnnkit.models.common import check_positive_int, recurrent_layer


@dataclass
class ForecasterConfig:
    """Channels, input window and output horizon, and the recurrent stack's shape."""

    num_channels: int
    window: int = 24
    horizon: int = 11
    period: int = 1
    cell: str = "lstm"
    hidden_size: int = 64
    num_layers: int = 1
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check_positive_int(
            "ForecasterConfig",
            num_channels=self.num_channels,
            window=self.window,
            horizon=self.horizon,
            period=self.period,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
        )
        if self.period > self.window:
            raise ValueError(
                f"ForecasterConfig: period must be <= window={self.window}, got {self.period}"
            )


class Forecaster(nn.Module):
    """(B, W, C) raw-valued window -> (B, horizon, C) raw-valued forecast."""

    def __init__(self, config: ForecasterConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("mean", torch.zeros(config.num_channels))
        self.register_buffer("std", torch.ones(config.num_channels))
        self.rnn = recurrent_layer(
            config.cell,
            config.num_channels,
            config.hidden_size,
            config.num_layers,
            dropout=config.dropout,
        )
        self.head = nn.Linear(config.hidden_size, config.horizon * config.num_channels)
        # Start from the seasonal-naive forecast: training learns corrections to it.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def set_scale(self, mean: Tensor, std: Tensor) -> None:
        """Store the (C,) training mean and standard deviation (loss weights, scale floor)."""
        self.mean.copy_(torch.as_tensor(mean, dtype=self.mean.dtype))
        self.std.copy_(torch.as_tensor(std, dtype=self.std.dtype).clamp_min(1e-8))

    def window_scale(self, window: Tensor) -> tuple[Tensor, Tensor]:
        """(B, W, C) window -> its (B, 1, C) level and scale."""
        loc = window.mean(1, keepdim=True)
        scale = window.std(1, keepdim=True, correction=0).maximum(0.01 * self.std)
        return loc, scale

    def forward(self, window: Tensor) -> Tensor:
        """(B, W, C) -> (B, horizon, C), in the units of the input."""
        loc, scale = self.window_scale(window)
        z = (window - loc) / scale
        _, state = self.rnn(z)
        h_n = state[0] if isinstance(state, tuple) else state
        config = self.config
        change = self.head(h_n[-1]).view(-1, config.horizon, config.num_channels)
        season = torch.arange(config.horizon, device=z.device) % config.period
        z_naive = z[:, z.size(1) - config.period + season, :]
        z_hat = z_naive + change
        return z_hat * scale + loc

    @torch.no_grad()
    def forecast(self, history: Tensor, steps: int) -> Tensor:
        """(T, C) or (B, T, C) history (T >= window) -> (steps, C) / (B, steps, C) forecast.

        Longer than the trained horizon, forecasts are fed back as inputs.
        """
        if history.dim() not in (2, 3) or history.size(-2) < self.config.window:
            raise ValueError(
                f"forecast: history must have shape (T, C) or (B, T, C) with "
                f"T >= window={self.config.window}, got {tuple(history.shape)}"
            )
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"forecast: steps must be an int >= 1, got {steps!r}")
        was_training = self.training
        self.eval()
        values = history.unsqueeze(0) if history.dim() == 2 else history
        produced: list[Tensor] = []
        count = 0
        while count < steps:
            block = self(values[:, -self.config.window :])
            produced.append(block)
            values = torch.cat([values, block], dim=1)
            count += block.size(1)
        self.train(was_training)
        result = torch.cat(produced, dim=1)[:, :steps]
        return result.squeeze(0) if history.dim() == 2 else result
