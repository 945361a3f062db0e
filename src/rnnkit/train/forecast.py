"""Multi-step forecasting of real series (shipped yearly sunspots, or a user's numeric CSV).

The series is split in time order 70/15/15. A forecast origin t reads the `window` values
before t and predicts the `horizon` values from t on; an origin belongs to the part that holds
all of its targets. Validation MAE drives early stopping; the test part gets MAE and RMSE next
to the seasonal-naive forecast (repeat the last season; the last value without a period).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rnnkit.data import load_series
from rnnkit.models import Forecaster, ForecasterConfig
from rnnkit.train.checkpoint import Carry
from rnnkit.train.metrics import mae, rmse, seasonal_naive_forecast
from rnnkit.train.plots import plot_forecast
from rnnkit.train.rundir import RunError
from rnnkit.train.settings import Settings
from rnnkit.train.trainer import Batch, StepOutput

SPLIT = (0.7, 0.15, 0.15)


@dataclass
class ForecastSettings(Settings):
    """Forecast options. Default horizon: half the seasonal period (rounded up; 8 without a
    period); default window: 3 horizons, and at least one period."""

    hidden: int = 64
    epochs: int = 150
    patience: int | None = 20
    batch_size: int = 16
    learning_rate: float = 1e-2
    horizon: int | None = None
    window: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bidirectional:
            raise RunError("--bidirectional does not apply to forecast: the future is unread")
        for name in ("horizon", "window"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise RunError(f"--{name} must be an int >= 1, got {value!r}")


def split_points(length: int) -> tuple[int, int]:
    """Indices where the validation and the test parts begin."""
    valid_start = int(length * SPLIT[0])
    test_start = int(length * (SPLIT[0] + SPLIT[1]))
    return valid_start, test_start


def origins(first: int, end: int, window: int, horizon: int) -> np.ndarray:
    """Forecast origins t with t >= first, t >= window and t + horizon <= end."""
    return np.arange(max(first, window), end - horizon + 1)


def windows_at(values: np.ndarray, points: np.ndarray, window: int, horizon: int):
    """(B, window, C) inputs and (B, horizon, C) targets at the given origins."""
    inputs = np.stack([values[t - window : t] for t in points])
    targets = np.stack([values[t : t + horizon] for t in points])
    return torch.from_numpy(inputs), torch.from_numpy(targets)


@dataclass
class ForecastTask:
    """Shuffled training origins; loss is the mean squared error in standardised units."""

    values: np.ndarray
    train_origins: np.ndarray
    valid_origins: np.ndarray
    window: int
    horizon: int
    batch_size: int
    seed: int
    std: torch.Tensor
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    metric: str = "mae"
    higher_is_better: bool = False

    def steps_per_epoch(self) -> int:
        return max(1, len(self.train_origins) // self.batch_size)

    def batches(self, epoch: int):
        order = np.random.default_rng([self.seed, epoch]).permutation(self.train_origins)
        size = min(self.batch_size, len(order))
        for start in range(0, self.steps_per_epoch() * size, size):
            yield windows_at(self.values, order[start : start + size], self.window, self.horizon)

    def loss(self, model: nn.Module, batch: Batch, carry: Carry) -> StepOutput:
        inputs, targets = batch
        error = (model(inputs) - targets) / self.std.to(inputs.device)
        return StepOutput((error**2).mean(), None, inputs.size(0) * inputs.size(1))

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        predicted, actual = forecast_origins(model, self.values, self.valid_origins, self.device)
        return {"mae": mae(actual, predicted), "rmse": rmse(actual, predicted)}


def forecast_origins(model: Forecaster, values: np.ndarray, points: np.ndarray, device):
    """(N, horizon, C) model forecasts and actual values at the given origins."""
    window, horizon = model.config.window, model.config.horizon
    inputs, targets = windows_at(values, points, window, horizon)
    model.eval()
    with torch.no_grad():
        predicted = model(inputs.to(device)).cpu().numpy()
    return predicted, targets.numpy()


def seasonal_naive_origins(values: np.ndarray, points: np.ndarray, horizon: int, period):
    """(N, horizon, C) seasonal-naive forecasts at the given origins."""
    return np.stack([seasonal_naive_forecast(values[:t], horizon, period) for t in points])


@dataclass
class PreparedForecast:
    model: Forecaster
    task: ForecastTask
    files: dict[str, Any]
    test_origins: np.ndarray
    period: int | None
    series_name: str
    columns: list[str]


def prepare(settings: ForecastSettings, saved: dict | None, device) -> PreparedForecast:
    """Series, time-ordered splits, scaling and model for a run."""
    series = load_series(settings.data)
    values = series.values.astype(np.float32)
    horizon = settings.horizon or (math.ceil(series.period / 2) if series.period else 8)
    window = settings.window or max(3 * horizon, series.period or 1)
    valid_start, test_start = split_points(len(values))
    train_origins = origins(0, valid_start, window, horizon)
    valid_origins = origins(valid_start, test_start, window, horizon)
    test_origins = origins(test_start, len(values), window, horizon)
    if min(len(train_origins), len(valid_origins), len(test_origins)) < 1:
        raise RunError(
            f"series of {len(values)} steps is too short for window={window} and "
            f"horizon={horizon} (each of the 70/15/15 parts needs a full horizon); "
            "use --window/--horizon to shrink them"
        )
    mean = values[:valid_start].mean(0)
    std = values[:valid_start].std(0)
    config = ForecasterConfig(
        num_channels=values.shape[1],
        window=window,
        horizon=horizon,
        period=series.period if series.period and series.period <= window else 1,
        cell=settings.cell,
        hidden_size=settings.hidden,
        num_layers=settings.layers,
    )
    model = Forecaster(config)
    model.set_scale(torch.from_numpy(mean), torch.from_numpy(std))
    model.to(device)
    task = ForecastTask(
        values,
        train_origins,
        valid_origins,
        window,
        horizon,
        settings.batch_size,
        settings.seed,
        model.std.detach().clone(),
        device,
    )
    files = {
        "preprocessing.json": {
            "series": series.name,
            "columns": series.columns,
            "period": series.period,
            "mean": mean.tolist(),
            "std": std.tolist(),
            "tail": values[-max(window, 4 * horizon) :].tolist(),
            "length": len(values),
        }
    }
    return PreparedForecast(
        model, task, files, test_origins, series.period, series.name, series.columns
    )


def model_config(prepared: PreparedForecast) -> dict[str, Any]:
    return {"class": "Forecaster", "config": asdict(prepared.model.config)}


def score_origins(model: Forecaster, values: np.ndarray, points: np.ndarray, period, device):
    """Model and seasonal-naive MAE/RMSE over the origins."""
    predicted, actual = forecast_origins(model, values, points, device)
    naive = seasonal_naive_origins(values, points, model.config.horizon, period)
    return {
        "mae": mae(actual, predicted),
        "rmse": rmse(actual, predicted),
        "origins": len(points),
    }, {
        "name": f"seasonal naive (period {period or 1})",
        "mae": mae(actual, naive),
        "rmse": rmse(actual, naive),
    }


def finish(prepared: PreparedForecast, run_dir: Path) -> dict[str, Any]:
    """Test MAE/RMSE vs seasonal naive, and forecast.png over the test part."""
    model, task = prepared.model, prepared.task
    test, baseline = score_origins(
        model, task.values, prepared.test_origins, prepared.period, task.device
    )
    horizon = model.config.horizon
    tiled = prepared.test_origins[::horizon]
    predicted, _ = forecast_origins(model, task.values, tiled, task.device)
    naive = seasonal_naive_origins(task.values, tiled, horizon, prepared.period)
    start = int(tiled[0])
    shown_from = max(0, start - 3 * model.config.window)
    plot_forecast(
        run_dir / "forecast.png",
        task.values[shown_from:, 0],
        {
            "rnnkit forecast": predicted[:, :, 0].reshape(-1),
            baseline["name"]: naive[:, :, 0].reshape(-1),
        },
        start,
        column=prepared.columns[0],
        title=f"{prepared.series_name}: {horizon}-step forecasts over the test part",
        offset=shown_from,
    )
    return {"test": test, "baseline": baseline}


def evaluate_run(
    model: Forecaster, state: dict, settings: ForecastSettings, data: str | None
) -> dict[str, Any]:
    """MAE/RMSE and the seasonal-naive baseline on `data` (all origins) or the run's test part."""
    series = load_series(settings.data if data is None else data)
    values = series.values.astype(np.float32)
    if values.shape[1] != model.config.num_channels:
        raise RunError(
            f"{data}: the model forecasts {model.config.num_channels} column(s) "
            f"{state['columns']}, the data has {values.shape[1]} {series.columns}"
        )
    window, horizon = model.config.window, model.config.horizon
    first = split_points(len(values))[1] if data is None else 0
    points = origins(first, len(values), window, horizon)
    if len(points) < 1:
        raise RunError(f"{data}: series of {len(values)} steps is shorter than window + horizon")
    period = state.get("period") if data is None else series.period or state.get("period")
    test, baseline = score_origins(model, values, points, period, torch.device("cpu"))
    return {**test, "baseline": baseline}


def forecast_future(model: Forecaster, state: dict, steps: int, run_dir: Path) -> np.ndarray:
    """(steps, C) forecast after the end of the training series; writes forecast_future.png."""
    tail = np.asarray(state["tail"], dtype=np.float32)
    predicted = model.forecast(torch.from_numpy(tail), steps).numpy()
    offset = state["length"] - len(tail)
    plot_forecast(
        run_dir / "forecast_future.png",
        tail[:, 0],
        {"forecast": predicted[:, 0]},
        offset + len(tail),
        column=state["columns"][0],
        title=f"{state['series']}: the next {steps} steps",
        offset=offset,
    )
    return predicted
