"""Numerical trouble: a NaN/inf loss or gradient is caught at its step, skipped or stopped on."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from trainer_toys import ToyStreamTask, make_trainer

import rnnkit.train.forecast
from rnnkit.cli import main
from rnnkit.train import learning_rate_at
from rnnkit.train.checkpoint import load_checkpoint
from rnnkit.train.rundir import RunError
from rnnkit.train.trainer import NAN_LR_FACTOR, NonFiniteTraining


class PoisonedLossTask(ToyStreamTask):
    """The loss of the steps (1-based) in `poisoned` is NaN."""

    def __init__(self, poisoned: set[int], **kwargs) -> None:
        super().__init__(**kwargs)
        self.poisoned = poisoned
        self.calls = 0

    def loss(self, model, batch, carry):
        self.calls += 1
        output = super().loss(model, batch, carry)
        if self.calls in self.poisoned:
            output.loss = output.loss * math.nan
        return output


class PoisonedGradientTask(ToyStreamTask):
    """Finite loss, but an infinite gradient on the output layer at the steps in `poisoned`."""

    def __init__(self, poisoned: set[int], **kwargs) -> None:
        super().__init__(**kwargs)
        self.poisoned = poisoned
        self.calls = 0

    def loss(self, model, batch, carry):
        self.calls += 1
        output = super().loss(model, batch, carry)
        if self.calls in self.poisoned:
            handles = []

            def once(grad):
                handles.pop().remove()
                return grad * math.inf

            handles.append(model.head.weight.register_hook(once))
        return output


def snapshots(trainer_steps: dict):
    def on_step(trainer, step):
        weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        trainer_steps[step] = (weights, trainer.optimizer.param_groups[0]["lr"])

    return on_step


@pytest.mark.parametrize("task_class", [PoisonedLossTask, PoisonedGradientTask])
def test_nonfinite_step_is_skipped_lr_halved_and_reported(task_class, capsys):
    seen: dict = {}
    trainer = make_trainer(task_class({3}), epochs=2)
    trainer.on_step = snapshots(seen)
    state = trainer.fit()

    assert state.step == 6 and state.skipped_steps == 1
    assert state.lr_scale == NAN_LR_FACTOR
    assert [e["step"] for e in state.nonfinite_events] == [3]
    for name, before in seen[2][0].items():  # step 3 changed nothing
        assert torch.equal(seen[3][0][name], before), name
    assert any(not torch.equal(seen[4][0][n], seen[3][0][n]) for n in seen[3][0])
    config = trainer.config
    assert seen[2][1] == pytest.approx(learning_rate_at(1, 6, config))
    assert seen[4][1] == pytest.approx(learning_rate_at(3, 6, config) * NAN_LR_FACTOR)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert [r["skipped_steps"] for r in state.history] == [1, 0]
    assert math.isfinite(state.history[0]["train_loss"])
    assert "step 3: non-finite loss" in capsys.readouterr().err


def test_skip_state_survives_a_checkpoint(tmp_path):
    trainer = make_trainer(PoisonedLossTask({2, 4}), checkpoint_dir=tmp_path, epochs=2)
    trainer.fit()
    saved = load_checkpoint(tmp_path).state
    assert (saved.skipped_steps, saved.lr_scale) == (2, NAN_LR_FACTOR**2)


def test_stop_policy_saves_the_last_good_state_and_raises(tmp_path):
    seen: dict = {}
    trainer = make_trainer(PoisonedLossTask({5}), checkpoint_dir=tmp_path, on_nan="stop")
    trainer.on_step = snapshots(seen)
    with pytest.raises(NonFiniteTraining, match="step 5: non-finite loss.*--on-nan stop") as info:
        trainer.fit()
    assert isinstance(info.value, RunError)  # the CLI exits with 2
    saved = load_checkpoint(tmp_path)
    assert saved.state.step == 4 and saved.state.batch_in_epoch == 1
    for name, weight in seen[4][0].items():
        assert torch.equal(saved.section("model.")[name], weight), name


def test_on_nan_must_be_skip_or_stop():
    with pytest.raises(ValueError, match="on_nan"):
        make_trainer(on_nan="ignore")


def test_clipping_is_counted_with_the_norm_before_clipping():
    state = make_trainer(clip_grad_norm=1e-3, epochs=1).fit()
    record = state.history[0]
    assert record["clipped_fraction"] == 1.0 and state.clipped_steps == 3
    assert record["grad_norm_max"] >= record["grad_norm_mean"] > 1e-3


@pytest.fixture
def nan_at_step_3(monkeypatch):
    original = rnnkit.train.forecast.ForecastTask.loss
    calls = []

    def poisoned(self, model, batch, carry):
        calls.append(1)
        output = original(self, model, batch, carry)
        if len(calls) == 3:
            output.loss = output.loss * math.nan
        return output

    monkeypatch.setattr(rnnkit.train.forecast.ForecastTask, "loss", poisoned)


TINY_FORECAST = ["train", "forecast", "--hidden", "4", "--max-steps", "5", "--quiet"]


def test_cli_skips_and_counts_the_nonfinite_step(nan_at_step_3, tmp_path):
    result = CliRunner().invoke(main, [*TINY_FORECAST, "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "step 3: non-finite loss (nan)" in result.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["skipped_steps"] == 1 and metrics["steps"] == 5
    assert [event["step"] for event in metrics["nonfinite_events"]] == [3]


def test_cli_on_nan_stop_exits_2_with_the_checkpoint(nan_at_step_3, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, [*TINY_FORECAST, "--on-nan", "stop", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "step 3: non-finite loss" in result.stderr and "Traceback" not in result.output
    assert load_checkpoint(out / "checkpoint").state.step == 2
