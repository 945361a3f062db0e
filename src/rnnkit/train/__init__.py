"""Training: the Trainer, checkpoints, metrics, distributed setup, plots, and the applications."""

from rnnkit.train.checkpoint import TrainingState, load_checkpoint, save_checkpoint
from rnnkit.train.distributed import DistributedContext, setup_distributed
from rnnkit.train.trainer import (
    StepOutput,
    Trainer,
    TrainerConfig,
    TrainingInterrupted,
    TrainingTask,
    learning_rate_at,
)

__all__ = [
    "Trainer",
    "TrainerConfig",
    "TrainingTask",
    "StepOutput",
    "TrainingInterrupted",
    "TrainingState",
    "learning_rate_at",
    "save_checkpoint",
    "load_checkpoint",
    "DistributedContext",
    "setup_distributed",
]
