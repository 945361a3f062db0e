"""Sequence tagging (aligned many-to-many): one tag per token, from words and their characters.

A token t arrives as its word id w_t and its character ids c_t,1..c_t,C, packed as one
(B, T, 1 + C) int64 tensor: column 0 the word id, columns 1.. the characters (0 = padding).

x_t = [Embed(w_t) ; max_i relu(Conv1d(CharEmbed(c_t))_i)]    (B, T, E + F)  char CNN (Ma & Hovy)
o, _ = RNN(dropout(x), lengths)                              (B, T, D*H)
e_t = W dropout(o_t) + b                                     (B, T, K) tag scores (emissions)
tags = argmax_k e_t(k), or Viterbi over a linear-chain CRF when crf=True.

The character encoder gives rare and unknown words a representation from their spelling;
word dropout (training only) replaces word ids by <unk> so the model learns to use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnkit.models.common import check_positive_int, recurrent_layer, zero_state
from rnnkit.models.crf import LinearChainCRF

PAD_ID, UNK_ID = 0, 1


@dataclass
class SequenceTaggerConfig:
    """Vocabulary sizes, embedding and encoder shapes, and the output layer."""

    num_tags: int
    vocab_size: int
    char_vocab_size: int = 0
    embedding_dim: int = 100
    char_embedding_dim: int = 32
    char_channels: int = 64
    char_kernel: int = 3
    cell: str = "lstm"
    hidden_size: int = 128
    num_layers: int = 1
    bidirectional: bool = True
    dropout: float = 0.3
    word_dropout: float = 0.05
    crf: bool = False

    def __post_init__(self) -> None:
        check_positive_int(
            "SequenceTaggerConfig",
            num_tags=self.num_tags,
            vocab_size=self.vocab_size,
            embedding_dim=self.embedding_dim,
            char_embedding_dim=self.char_embedding_dim,
            char_channels=self.char_channels,
            char_kernel=self.char_kernel,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
        )
        if not isinstance(self.char_vocab_size, int) or self.char_vocab_size < 0:
            raise ValueError(
                "SequenceTaggerConfig: char_vocab_size must be an int >= 0 (0: no character "
                f"encoder), got {self.char_vocab_size!r}"
            )
        for name in ("dropout", "word_dropout"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ValueError(f"SequenceTaggerConfig: {name} must be in [0, 1), got {value!r}")


class CharCNN(nn.Module):
    """(N, C) character ids of N words -> (N, F): max over positions of a 1-D convolution."""

    def __init__(self, vocab_size: int, embedding_dim: int, channels: int, kernel: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=PAD_ID)
        self.conv = nn.Conv1d(embedding_dim, channels, kernel, padding=kernel // 2)

    def forward(self, chars: Tensor) -> Tensor:
        """(N, C) ids, 0 = padding -> (N, F); a word without characters gives zeros."""
        features = self.conv(self.embedding(chars).transpose(1, 2))[:, :, : chars.size(1)]
        present = (chars != PAD_ID).unsqueeze(1)
        # relu >= 0, so zeroing the padding leaves the max of the real positions (or 0).
        return torch.relu(features).masked_fill(~present, 0.0).amax(dim=2)


class SequenceTagger(nn.Module):
    """(B, T, 1 + C) word and character ids, (B,) lengths -> (B, T, num_tags) tag scores."""

    def __init__(self, config: SequenceTaggerConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim, padding_idx=PAD_ID)
        input_size = config.embedding_dim
        if config.char_vocab_size:
            self.chars = CharCNN(
                config.char_vocab_size,
                config.char_embedding_dim,
                config.char_channels,
                config.char_kernel,
            )
            input_size += config.char_channels
        else:
            self.chars = None
        self.rnn = recurrent_layer(
            config.cell,
            input_size,
            config.hidden_size,
            config.num_layers,
            config.bidirectional,
            config.dropout,
        )
        directions = 2 if config.bidirectional else 1
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(directions * config.hidden_size, config.num_tags)
        self.crf = LinearChainCRF(config.num_tags) if config.crf else None

    def token_features(self, inputs: Tensor) -> Tensor:
        """(B, T, 1 + C) ids -> (B, T, E [+ F]) word embedding [and character summary]."""
        if inputs.dim() != 3 or inputs.size(2) < 1 or inputs.dtype != torch.int64:
            raise ValueError(
                "SequenceTagger: inputs must be an int64 tensor of shape (B, T, 1 + C) (word id, "
                f"then C character ids), got {inputs.dtype} {tuple(inputs.shape)}"
            )
        words = inputs[:, :, 0]
        if self.training and self.config.word_dropout > 0:
            dropped = torch.rand(words.shape, device=words.device) < self.config.word_dropout
            words = words.masked_fill(dropped & (words != PAD_ID), UNK_ID)
        parts = [self.embedding(words)]
        if self.chars is not None:
            batch, steps = words.shape
            chars = inputs[:, :, 1:]
            if chars.size(2) == 0:
                chars = inputs.new_zeros(batch, steps, 1)
            parts.append(self.chars(chars.reshape(batch * steps, -1)).view(batch, steps, -1))
        return torch.cat(parts, dim=2)

    def forward(self, inputs: Tensor, lengths: Tensor | None = None) -> Tensor:
        """(B, T, 1 + C) ids, optional (B,) lengths -> (B, T, K) tag scores (emissions)."""
        outputs, _ = self.rnn(self.dropout(self.token_features(inputs)), lengths=lengths)
        return self.head(self.dropout(outputs))

    def neg_log_likelihood(
        self, emissions: Tensor, tags: Tensor, lengths: Tensor | None = None
    ) -> Tensor:
        """(B, T, K) scores, (B, T) gold tag ids, (B,) lengths -> mean loss per valid token.

        Softmax cross-entropy per token, or the CRF's sequence NLL summed over the batch and
        divided by the number of valid tokens.
        """
        valid = _valid_steps(emissions, lengths)
        if self.crf is not None:
            return self.crf.neg_log_likelihood(emissions, tags, lengths).sum() / valid.sum()
        return F.cross_entropy(emissions[valid], tags[valid])

    def decode(self, emissions: Tensor, lengths: Tensor | None = None) -> Tensor:
        """(B, T, K) scores, (B,) lengths -> (B, T) tag ids (Viterbi with a CRF), -1 as padding."""
        if self.crf is not None:
            return self.crf.decode(emissions, lengths)
        return emissions.argmax(dim=2).masked_fill(~_valid_steps(emissions, lengths), -1)

    @torch.no_grad()
    def tag(self, inputs: Tensor, lengths: Tensor | None = None) -> Tensor:
        """(B, T, 1 + C) ids, optional (B,) lengths -> (B, T) predicted tag ids, -1 as padding."""
        was_training = self.training
        self.eval()
        try:
            return self.decode(self(inputs, lengths), lengths)
        finally:
            self.train(was_training)

    # -- streaming (unidirectional only) ------------------------------------------------------
    def initial_state(self, batch_size: int) -> dict[str, Tensor | tuple[Tensor, Tensor]]:
        """The state before the first token: the encoder's zero state (and the CRF's scores)."""
        self._check_streamable("initial_state")
        check_positive_int("SequenceTagger.initial_state", batch_size=batch_size)
        state: dict[str, Tensor | tuple[Tensor, Tensor]] = {"rnn": zero_state(self.rnn, batch_size)}
        if self.crf is not None:
            weight = self.head.weight
            state["viterbi"] = weight.new_zeros(batch_size, self.config.num_tags)
            state["steps"] = weight.new_zeros(batch_size, 1)
        return state

    def stream_step(self, inputs: Tensor, state: dict) -> tuple[Tensor, dict]:
        """(B, t, 1 + C) ids of the next tokens, state -> (B, t, K) scores, the next state.

        argmax over the last dimension is each token's tag. Without a CRF the scores are the
        emissions, equal to `forward` on the whole sequence. With a CRF they are, per tag, the
        best score of a tag path over the tokens read so far that ends in that tag (end
        transition included): their argmax is the last tag of the Viterbi path of the prefix,
        which later tokens may still revise in a whole-sequence decode.
        """
        self._check_streamable("stream_step")
        outputs, rnn_state = self.rnn(self.dropout(self.token_features(inputs)), state["rnn"])
        emissions = self.head(self.dropout(outputs))
        if self.crf is None:
            return emissions, {"rnn": rnn_state}
        delta, steps = state["viterbi"], state["steps"]
        scores = []
        for t in range(emissions.size(1)):
            started = self.crf.viterbi_step(delta, emissions[:, t])
            delta = torch.where(steps > 0, started, self.crf.viterbi_start(emissions[:, t]))
            steps = steps + 1
            scores.append(delta + self.crf.end)
        new_state = {"rnn": rnn_state, "viterbi": delta, "steps": steps}
        return torch.stack(scores, dim=1), new_state

    def _check_streamable(self, method: str) -> None:
        if self.config.bidirectional:
            raise ValueError(
                f"SequenceTagger.{method}: streaming needs a unidirectional encoder (the "
                "backward direction reads the whole sentence first), got bidirectional=True"
            )


def _valid_steps(emissions: Tensor, lengths: Tensor | None) -> Tensor:
    """(B, T, K) scores, (B,) lengths -> (B, T) bool, True at valid steps."""
    if lengths is None:
        return torch.ones(emissions.shape[:2], dtype=torch.bool, device=emissions.device)
    steps = torch.arange(emissions.size(1), device=emissions.device)
    return steps.unsqueeze(0) < torch.as_tensor(lengths, device=emissions.device).unsqueeze(1)
