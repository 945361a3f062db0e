"""Many-to-one sequence classification: a recurrent encoder, a pooled summary, a linear head.

x_t = Embed(token_t)  or  x_t = features_t          (B, T, E)
o, h_n = RNN(x, lengths)                            o: (B, T, D*H), h_n: (L*D, B, H)
z = [h_n forward ; h_n backward] of the last layer   ("last", as the classic LSTMClassifier)
  | mean of o over valid steps | max of o over valid steps
logits = W dropout(z) + b                           (B, num_classes)

Streaming (unidirectional only): `stream_step` reads the next chunk and returns, for every step
in it, the logits of the prefix read so far, with the pooling carried as a running sum and
count (mean) or a running maximum (max); "last" pools the newest output of the last layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rnnkit.models.common import (
    check_choice,
    check_positive_int,
    recurrent_layer,
    zero_state,
)

POOLINGS = ("last", "mean", "max")


@dataclass
class SequenceClassifierConfig:
    """Token input (vocab_size set) or feature input (input_size set), and the encoder's shape."""

    num_classes: int
    vocab_size: int | None = None
    input_size: int | None = None
    embedding_dim: int = 64
    cell: str = "lstm"
    hidden_size: int = 128
    num_layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.2
    pooling: str = "last"

    def __post_init__(self) -> None:
        if (self.vocab_size is None) == (self.input_size is None):
            raise ValueError(
                "SequenceClassifierConfig: set exactly one of vocab_size (token input) and "
                f"input_size (feature input), got vocab_size={self.vocab_size!r}, "
                f"input_size={self.input_size!r}"
            )
        check_positive_int(
            "SequenceClassifierConfig",
            embedding_dim=self.embedding_dim,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
        )
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ValueError(
                f"SequenceClassifierConfig: num_classes must be an int >= 2, got {self.num_classes!r}"
            )
        check_choice("pooling", self.pooling, POOLINGS)


class SequenceClassifier(nn.Module):
    """(B, T) token ids or (B, T, input_size) features, (B,) lengths -> (B, num_classes) logits."""

    def __init__(self, config: SequenceClassifierConfig) -> None:
        super().__init__()
        self.config = config
        if config.vocab_size is not None:
            self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim, padding_idx=0)
            input_size = config.embedding_dim
        else:
            self.embedding = None
            input_size = config.input_size
        self.rnn = recurrent_layer(
            config.cell,
            input_size,
            config.hidden_size,
            config.num_layers,
            config.bidirectional,
            config.dropout,
        )
        self.directions = 2 if config.bidirectional else 1
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(self.directions * config.hidden_size, config.num_classes)

    def forward(self, inputs: Tensor, lengths: Tensor | None = None) -> Tensor:
        """(B, T) ids or (B, T, I) features, optional (B,) lengths -> (B, C) logits."""
        x = self.embedding(inputs) if self.embedding is not None else inputs
        outputs, state = self.rnn(x, lengths=lengths)
        h_n = state[0] if isinstance(state, tuple) else state
        if self.config.pooling == "last":
            # (D, B, H) final states of the last layer -> (B, D*H), forward direction first.
            summary = h_n[-self.directions :].transpose(0, 1).flatten(1)
        else:
            steps = torch.arange(outputs.size(1), device=outputs.device)
            if lengths is None:
                valid = torch.ones(outputs.shape[:2], dtype=torch.bool, device=outputs.device)
            else:
                valid = steps.unsqueeze(0) < lengths.to(outputs.device).unsqueeze(1)
            valid = valid.unsqueeze(-1)
            if self.config.pooling == "mean":
                summary = (outputs * valid).sum(1) / valid.sum(1)
            else:
                summary = outputs.masked_fill(~valid, float("-inf")).amax(1)
        return self.head(self.dropout(summary))

    def initial_state(self, batch_size: int) -> dict[str, Tensor | tuple[Tensor, Tensor]]:
        """The state before the first step: the encoder's zero state and the empty pooling."""
        self._check_streamable("initial_state")
        check_positive_int("SequenceClassifier.initial_state", batch_size=batch_size)
        rnn_state = zero_state(self.rnn, batch_size)
        h = rnn_state[0] if isinstance(rnn_state, tuple) else rnn_state
        state = {"rnn": rnn_state}
        if self.config.pooling == "mean":
            state["sum"] = h.new_zeros(batch_size, self.config.hidden_size)
            state["count"] = h.new_zeros(batch_size, 1)
        elif self.config.pooling == "max":
            state["max"] = h.new_full((batch_size, self.config.hidden_size), float("-inf"))
        return state

    def stream_step(self, inputs: Tensor, state: dict) -> tuple[Tensor, dict]:
        """(B, t) ids or (B, t, I) features, state -> (B, t, C) logits of each prefix, state.

        Row k of the output equals `forward` on everything read up to and including step k.
        """
        self._check_streamable("stream_step")
        x = self.embedding(inputs) if self.embedding is not None else inputs
        outputs, rnn_state = self.rnn(x, state["rnn"])
        pooling = self.config.pooling
        if pooling == "last":
            summaries, new_state = outputs, {"rnn": rnn_state}
        elif pooling == "mean":
            sums = state["sum"].unsqueeze(1) + outputs.cumsum(1)
            steps = torch.arange(1, outputs.size(1) + 1, dtype=sums.dtype, device=sums.device)
            counts = state["count"].unsqueeze(1) + steps.view(1, -1, 1)
            summaries = sums / counts
            new_state = {"rnn": rnn_state, "sum": sums[:, -1], "count": counts[:, -1]}
        else:
            carried = state["max"].unsqueeze(1)
            summaries = torch.cat([carried, outputs], dim=1).cummax(1).values[:, 1:]
            new_state = {"rnn": rnn_state, "max": summaries[:, -1]}
        return self.head(self.dropout(summaries)), new_state

    def _check_streamable(self, method: str) -> None:
        if self.config.bidirectional:
            raise ValueError(
                f"SequenceClassifier.{method}: streaming needs a unidirectional encoder (the "
                "backward direction reads the whole sequence first), got bidirectional=True"
            )
