"""Tiny in-test tasks for the Trainer: a carried-state sequence task and a stalling one."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import rnnkit
from rnnkit.train import StepOutput, Trainer, TrainerConfig


class ToyRecurrentModel(nn.Module):
    """(B, T) ids, state -> (B, T, V) logits, state; dropout so resumption must restore RNG."""

    def __init__(
        self, vocab: int = 5, hidden: int = 8, dropout: float = 0.3, cell: str = "gru"
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, 4)
        layer = rnnkit.GRU if cell == "gru" else rnnkit.LSTM
        self.rnn = layer(4, hidden, batch_first=True, backend="reference")
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens, state=None):
        outputs, state = self.rnn(self.embedding(tokens), state)
        return self.head(self.dropout(outputs)), state


@dataclass
class ToyStreamTask:
    """Predict the next id of a periodic stream, in chunks with carried state (TBPTT)."""

    batch_size: int = 4
    chunk: int = 5
    chunks: int = 3
    seed: int = 0
    metric: str = "loss"
    higher_is_better: bool = False
    seen_carries: list | None = None

    def __post_init__(self) -> None:
        length = self.chunks * self.chunk + 1
        rows = [(np.arange(length) * (1 + b % 2) + b) % 5 for b in range(self.batch_size)]
        self.stream = torch.tensor(np.stack(rows), dtype=torch.int64)

    def steps_per_epoch(self) -> int:
        return self.chunks

    def batches(self, epoch: int):
        shift = int(np.random.default_rng([self.seed, epoch]).integers(0, 5))
        stream = (self.stream + shift) % 5
        for i in range(self.chunks):
            part = slice(i * self.chunk, (i + 1) * self.chunk)
            yield stream[:, part], stream[:, i * self.chunk + 1 : (i + 1) * self.chunk + 1]

    def loss(self, model, batch, carry):
        if self.seen_carries is not None:
            self.seen_carries.append(carry)
        inputs, targets = batch
        logits, state = model(inputs, carry)
        loss = F.cross_entropy(logits.reshape(-1, 5), targets.reshape(-1))
        return StepOutput(loss, state, inputs.numel())

    def evaluate(self, model):
        inputs, targets = next(iter(self.batches(0)))
        logits, _ = model(inputs)
        return {"loss": F.cross_entropy(logits.reshape(-1, 5), targets.reshape(-1)).item()}


class StallingTask(ToyStreamTask):
    """Its validation metric never improves after the first evaluation."""

    def evaluate(self, model):
        return {"loss": 1.0}


def make_trainer(task=None, checkpoint_dir=None, cell="gru", **config) -> Trainer:
    torch.manual_seed(0)
    settings = {"epochs": 4, "warmup_steps": 2, "progress": False, "patience": None}
    settings.update(config)
    return Trainer(
        ToyRecurrentModel(cell=cell),
        task or ToyStreamTask(),
        TrainerConfig(**settings),
        checkpoint_dir,
    )
