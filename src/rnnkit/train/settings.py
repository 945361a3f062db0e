"""The options every application shares, as stored in a run's config.json under "settings"."""

from __future__ import annotations

from dataclasses import dataclass

from rnnkit.models.common import CELLS
from rnnkit.train.rundir import RunError
from rnnkit.train.trainer import ON_NAN_POLICIES, TrainerConfig


@dataclass
class Settings:
    """What a user chooses for a run (CLI options); each application subclasses the defaults."""

    data: str | None = None
    cell: str = "lstm"
    hidden: int = 128
    layers: int = 1
    bidirectional: bool = False
    epochs: int = 10
    max_steps: int | None = None
    seed: int = 0
    batch_size: int = 32
    learning_rate: float = 3e-3
    patience: int | None = 3
    checkpoint_every: int | None = 200
    eval_every: int | None = None
    on_nan: str = "skip"

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise RunError(f"--cell must be one of {tuple(CELLS)}, got {self.cell!r}")
        for name in ("hidden", "layers", "epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise RunError(f"--{name.replace('_', '-')} must be an int >= 1, got {value!r}")
        if self.max_steps is not None and (
            not isinstance(self.max_steps, int) or self.max_steps < 1
        ):
            raise RunError(f"--max-steps must be an int >= 1, got {self.max_steps!r}")
        if not self.learning_rate > 0:
            raise RunError(f"--learning-rate must be > 0, got {self.learning_rate!r}")
        if self.on_nan not in ON_NAN_POLICIES:
            raise RunError(f"--on-nan must be one of {ON_NAN_POLICIES}, got {self.on_nan!r}")

    def trainer_config(self, progress: bool = True) -> TrainerConfig:
        """The optimisation part of these settings."""
        return TrainerConfig(
            epochs=self.epochs,
            max_steps=self.max_steps,
            learning_rate=self.learning_rate,
            patience=self.patience,
            checkpoint_every=self.checkpoint_every,
            eval_every=self.eval_every,
            on_nan=self.on_nan,
            warmup_steps=min(20, max(1, (self.max_steps or 10**9) // 10)),
            progress=progress,
        )
