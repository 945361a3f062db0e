"""A recurrent language model over tokens (characters by default), and sampling from it.

x_t = Embed(token_t)                          (B, T, E)
o, state = RNN(x, state)                      (B, T, H)
logits_t = W dropout(o_t) + b                 (B, T, V): the next token's scores
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rnnkit.models.common import check_positive_int, recurrent_layer, zero_state

State = Tensor | tuple[Tensor, Tensor]


@dataclass
class LanguageModelConfig:
    """Vocabulary size and the recurrent stack's shape."""

    vocab_size: int
    embedding_dim: int = 64
    cell: str = "lstm"
    hidden_size: int = 256
    num_layers: int = 1
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check_positive_int(
            "LanguageModelConfig",
            vocab_size=self.vocab_size,
            embedding_dim=self.embedding_dim,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
        )


class LanguageModel(nn.Module):
    """(B, T) token ids, optional carried state -> (B, T, V) next-token logits, new state."""

    def __init__(self, config: LanguageModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim)
        self.rnn = recurrent_layer(
            config.cell,
            config.embedding_dim,
            config.hidden_size,
            config.num_layers,
            dropout=config.dropout,
        )
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, tokens: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """(B, T) ids, state from the previous chunk or None -> (B, T, V) logits, final state."""
        outputs, state = self.rnn(self.embedding(tokens), state)
        return self.head(self.dropout(outputs)), state

    def initial_state(self, batch_size: int) -> State:
        """The zero state before the first token: (L, B, H), or (h, c) of those for an LSTM."""
        check_positive_int("LanguageModel.initial_state", batch_size=batch_size)
        return zero_state(self.rnn, batch_size)

    def stream_step(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:
        """(B, t) ids, the state after the tokens before -> (B, t, V) logits, the next state."""
        return self(tokens, state)

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        length: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        suppress: Sequence[int] = (),
    ) -> Tensor:
        """(B, T0) or (T0,) prompt ids -> the prompt followed by `length` sampled ids.

        temperature scales the logits (0 means greedy); top_k keeps the k likeliest tokens;
        ids in `suppress` (padding, unknown) are never produced.
        """
        if not isinstance(prompt, Tensor) or prompt.dtype != torch.int64:
            raise TypeError(f"generate: prompt must be an int64 Tensor of ids, got {prompt!r}")
        if prompt.dim() not in (1, 2) or prompt.size(-1) < 1:
            raise ValueError(
                f"generate: prompt must have shape (T0,) or (B, T0) with T0 >= 1, "
                f"got {tuple(prompt.shape)}"
            )
        if not isinstance(length, int) or length < 0:
            raise ValueError(f"generate: length must be an int >= 0, got {length!r}")
        if not temperature >= 0:
            raise ValueError(f"generate: temperature must be >= 0, got {temperature!r}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"generate: top_k must be None or an int >= 1, got {top_k!r}")
        was_training = self.training
        self.eval()
        tokens = prompt.unsqueeze(0) if prompt.dim() == 1 else prompt
        logits, state = self(tokens)
        pieces = [tokens]
        next_logits = logits[:, -1]
        blocked = torch.tensor(list(suppress), dtype=torch.int64, device=tokens.device)
        for _ in range(length):
            next_logits = next_logits.index_fill(-1, blocked, float("-inf"))
            if temperature == 0:
                token = next_logits.argmax(-1, keepdim=True)
            else:
                scores = next_logits / temperature
                if top_k is not None and top_k < scores.size(-1):
                    kth = scores.topk(top_k, dim=-1).values[:, -1:]
                    scores = scores.masked_fill(scores < kth, float("-inf"))
                probabilities = torch.softmax(scores, dim=-1)
                token = torch.multinomial(probabilities, 1, generator=generator)
            pieces.append(token)
            logits, state = self(token, state)
            next_logits = logits[:, -1]
        self.train(was_training)
        generated = torch.cat(pieces, dim=1)
        return generated.squeeze(0) if prompt.dim() == 1 else generated
