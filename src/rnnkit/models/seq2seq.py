"""Encoder-decoder with attention (sequence to sequence), greedy and beam-search decoding.

m, h_n = Encoder(Embed(x), lengths)          m: (B, S, D*H) memory, zero past each length
s_0 = tanh(W_b [h_n forward ; h_n backward])  the decoder starts from the encoder's summary
                                              (and the LSTM's c_0 likewise from c_n)
Bahdanau (attend, then step):                 Luong (step, then attend; input feeding):
  c_t, a_t = Attn(s_{t-1}, m)                   s_t = Cell([Embed(y_{t-1}) ; o_{t-1}], s_{t-1})
  s_t = Cell([Embed(y_{t-1}) ; c_t], s_{t-1})   c_t, a_t = Attn(s_t, m)
o_t = tanh(W_c [c_t ; s_t])                   the attentional output
p(y_t | y_<t, x) = softmax(W_o o_t)

Training feeds y_{t-1} from the target (teacher forcing) or, with probability 1 - ratio per
example and step, the model's own previous prediction (scheduled sampling). Decoding never
emits <pad>, <unk> or <s>, and ends with </s> after at most `max_length` tokens.
Beam search scores a finished hypothesis by log p(y | x) / lp(|y|), the length penalty of
GNMT (Wu et al. 2016): lp(n) = ((5 + n) / 6) ** alpha, n counting </s>.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnkit.cells import GRUCell, LSTMCell, RNNCell
from rnnkit.models.attention import ATTENTIONS, make_attention
from rnnkit.models.common import check_choice, check_positive_int, recurrent_layer

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
DECODER_CELLS = {"lstm": LSTMCell, "gru": GRUCell, "rnn": RNNCell}
State = tuple[Tensor, ...]


@dataclass
class Seq2SeqConfig:
    """Vocabulary sizes (ids 0-3: <pad>, <unk>, <s>, </s>), encoder shape and attention kind.

    The decoder's hidden size is the encoder's output size (directions x hidden_size).
    """

    source_vocab_size: int
    target_vocab_size: int
    embedding_dim: int = 64
    cell: str = "lstm"
    hidden_size: int = 128
    num_layers: int = 1
    bidirectional: bool = True
    attention: str = "bahdanau"
    dropout: float = 0.1

    def __post_init__(self) -> None:
        check_positive_int(
            "Seq2SeqConfig",
            embedding_dim=self.embedding_dim,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
        )
        for name in ("source_vocab_size", "target_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 5:
                raise ValueError(
                    f"Seq2SeqConfig: {name} must be an int >= 5 (4 special ids and at least "
                    f"one token), got {value!r}"
                )
        check_choice("cell", self.cell, tuple(DECODER_CELLS))
        check_choice("attention", self.attention, ATTENTIONS)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"Seq2SeqConfig: dropout must be in [0, 1), got {self.dropout!r}")


@dataclass
class Encoded:
    """The encoder's outputs for a batch: memory, attention keys, valid mask, decoder start."""

    memory: Tensor  # (B, S, M)
    keys: Tensor  # (B, S, K)
    mask: Tensor  # (B, S) bool, True at valid source positions
    state: State  # decoder state, each (B, M)

    def select(self, index: Tensor) -> Encoded:
        """The rows at `index` (repeats allowed): for beams."""
        return Encoded(
            self.memory[index],
            self.keys[index],
            self.mask[index],
            tuple(part[index] for part in self.state),
        )


@dataclass
class Hypothesis:
    """One decoded output: token ids (without </s>), its score, (len+1, S) attention weights.

    The score is the log-probability divided by the length penalty (greedy: lp = 1);
    attention row i is the weights over the source when emitting token i (the last: </s>).
    """

    tokens: list[int]
    score: float
    attention: Tensor


class Seq2Seq(nn.Module):
    """(B, S) source ids, (B,) lengths, (B, T) decoder input ids -> (B, T, V) logits."""

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.directions = 2 if c.bidirectional else 1
        size = self.directions * c.hidden_size
        self.source_embedding = nn.Embedding(c.source_vocab_size, c.embedding_dim, PAD_ID)
        self.target_embedding = nn.Embedding(c.target_vocab_size, c.embedding_dim, PAD_ID)
        self.encoder = recurrent_layer(
            c.cell, c.embedding_dim, c.hidden_size, c.num_layers, c.bidirectional, c.dropout
        )
        self.bridge = nn.ModuleList(
            nn.Linear(size, size) for _ in range(2 if c.cell == "lstm" else 1)
        )
        self.decoder_cell = DECODER_CELLS[c.cell](c.embedding_dim + size, size)
        self.attention = make_attention(c.attention, size, size)
        self.combine = nn.Linear(2 * size, size)
        self.output = nn.Linear(size, c.target_vocab_size)
        self.dropout = nn.Dropout(c.dropout)
        never = torch.zeros(c.target_vocab_size, dtype=torch.bool)
        never[[PAD_ID, UNK_ID, BOS_ID]] = True
        self.register_buffer("never_emitted", never, persistent=False)

    # -- the pieces ---------------------------------------------------------------------------
    def encode(self, source: Tensor, lengths: Tensor) -> Encoded:
        """(B, S) ids, (B,) lengths -> memory (B, S, M), keys, mask and the decoder's start."""
        lengths = torch.as_tensor(lengths, dtype=torch.int64)
        if source.dim() != 2 or lengths.shape != (source.size(0),):
            raise ValueError(
                f"Seq2Seq: source must be (B, S) and lengths (B,), got {tuple(source.shape)} "
                f"and {tuple(lengths.shape)}"
            )
        if int(lengths.min()) < 1 or int(lengths.max()) > source.size(1):
            raise ValueError(
                f"Seq2Seq: lengths must lie in [1, {source.size(1)}], got {lengths.tolist()}"
            )
        x = self.dropout(self.source_embedding(source))
        memory, final = self.encoder(x, lengths=lengths)
        finals = final if isinstance(final, tuple) else (final,)
        # (L*D, B, H) -> the last layer's directions side by side: (B, D*H)
        summaries = [part[-self.directions :].transpose(0, 1).flatten(1) for part in finals]
        state = tuple(torch.tanh(layer(s)) for layer, s in zip(self.bridge, summaries))
        steps = torch.arange(source.size(1), device=source.device)
        mask = steps.unsqueeze(0) < lengths.to(source.device).unsqueeze(1)
        return Encoded(memory, self.attention.keys(memory), mask, state)

    def decode_step(
        self, token: Tensor, state: State, feed: Tensor, encoded: Encoded
    ) -> tuple[Tensor, State, Tensor, Tensor]:
        """(B,) previous ids, state, (B, M) previous output -> (B, V) logits, state, output,
        (B, S) attention weights."""
        embedded = self.dropout(self.target_embedding(token))
        if self.config.attention == "bahdanau":
            context, weights = self.attention(state[0], encoded.keys, encoded.memory, encoded.mask)
            state = self.decoder_cell.step(torch.cat([embedded, context], dim=-1), state)
        else:
            state = self.decoder_cell.step(torch.cat([embedded, feed], dim=-1), state)
            context, weights = self.attention(state[0], encoded.keys, encoded.memory, encoded.mask)
        output = torch.tanh(self.combine(torch.cat([context, state[0]], dim=-1)))
        return self.output(self.dropout(output)), state, output, weights

    # -- training -----------------------------------------------------------------------------
    def forward(
        self,
        source: Tensor,
        source_lengths: Tensor,
        decoder_input: Tensor,
        teacher_forcing: float | Tensor = 1.0,
    ) -> tuple[Tensor, Tensor]:
        """(B, S), (B,), (B, T) ids starting with <s> -> (B, T, V) logits, (B, T, S) weights.

        teacher_forcing: the probability (a float, or (B,) per example) that step t > 0 reads
        the target token rather than the model's previous argmax.
        """
        if decoder_input.dim() != 2 or decoder_input.size(0) != source.size(0):
            raise ValueError(
                f"Seq2Seq: decoder_input must be (B={source.size(0)}, T) ids, got shape "
                f"{tuple(decoder_input.shape)}"
            )
        encoded = self.encode(source, source_lengths)
        batch, steps = decoder_input.shape
        ratio = torch.as_tensor(teacher_forcing, dtype=torch.float32, device=source.device)
        sampled = bool((ratio < 1).any())
        state = encoded.state
        feed = encoded.memory.new_zeros(batch, encoded.memory.size(-1))
        token = decoder_input[:, 0]
        all_logits, all_weights = [], []
        for t in range(steps):
            if t > 0:
                token = decoder_input[:, t]
                if sampled:
                    own = all_logits[-1].detach().masked_fill(self.never_emitted, float("-inf"))
                    use_target = torch.rand(batch, device=source.device) < ratio
                    token = torch.where(use_target, token, own.argmax(-1))
            logits, state, feed, weights = self.decode_step(token, state, feed, encoded)
            all_logits.append(logits)
            all_weights.append(weights)
        return torch.stack(all_logits, dim=1), torch.stack(all_weights, dim=1)

    # -- decoding -----------------------------------------------------------------------------
    def _log_probs(self, logits: Tensor, last_step: bool) -> Tensor:
        log_probs = F.log_softmax(logits.masked_fill(self.never_emitted, float("-inf")), dim=-1)
        if last_step:
            eos_only = torch.ones_like(self.never_emitted)
            eos_only[EOS_ID] = False
            log_probs = log_probs.masked_fill(eos_only, float("-inf"))
        return log_probs

    @torch.no_grad()
    def greedy_decode(self, source: Tensor, lengths: Tensor, max_length: int) -> list[Hypothesis]:
        """(B, S) ids, (B,) lengths -> per example the argmax output (at most max_length tokens).

        Call on a model in eval mode.
        """
        check_positive_int("Seq2Seq.greedy_decode", max_length=max_length)
        encoded = self.encode(source, lengths)
        batch = source.size(0)
        state, feed = encoded.state, encoded.memory.new_zeros(batch, encoded.memory.size(-1))
        token = torch.full((batch,), BOS_ID, dtype=torch.int64, device=source.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=source.device)
        score = torch.zeros(batch, device=source.device)
        tokens, weights_seen = [], []
        for t in range(max_length + 1):
            logits, state, feed, weights = self.decode_step(token, state, feed, encoded)
            log_probs = self._log_probs(logits, last_step=t == max_length)
            best, token = log_probs.max(-1)
            score = score + best.masked_fill(finished, 0.0)
            tokens.append(token)
            weights_seen.append(weights)
            finished = finished | (token == EOS_ID)
            if bool(finished.all()):
                break
        tokens_t, weights_t = torch.stack(tokens, 1).tolist(), torch.stack(weights_seen, 1)
        results = []
        for b in range(batch):
            ids = tokens_t[b]
            size = ids.index(EOS_ID)
            attention = weights_t[b, : size + 1, : int(lengths[b])].cpu()
            results.append(Hypothesis(ids[:size], float(score[b]), attention))
        return results

    @torch.no_grad()
    def beam_search(
        self,
        source: Tensor,
        lengths: Tensor,
        beam_size: int,
        max_length: int,
        length_penalty: float = 0.0,
    ) -> list[Hypothesis]:
        """(B, S) ids, (B,) lengths -> per example the best hypothesis found by beam search.

        All B x beam_size hypotheses step together. A hypothesis that emits </s> is finished
        and leaves the beam; an example stops once no live hypothesis can still beat its best
        finished one (a live log-probability only falls, and lp grows at most to
        lp(max_length + 1)). Beam size 1 is greedy decoding. Call on a model in eval mode.
        """
        check_positive_int("Seq2Seq.beam_search", beam_size=beam_size, max_length=max_length)
        if not length_penalty >= 0:
            raise ValueError(
                f"Seq2Seq.beam_search: length_penalty must be >= 0, got {length_penalty}"
            )

        def penalty(n: int) -> float:
            return ((5.0 + n) / 6.0) ** length_penalty

        batch, k, device = source.size(0), beam_size, source.device
        rows = torch.arange(batch, device=device).repeat_interleave(k)
        encoded = self.encode(source, lengths).select(rows)
        state, feed = encoded.state, encoded.memory.new_zeros(batch * k, encoded.memory.size(-1))
        token = torch.full((batch * k,), BOS_ID, dtype=torch.int64, device=device)
        scores = torch.full((batch, k), float("-inf"), device=device)
        scores[:, 0] = 0.0  # one live hypothesis at the start, not k copies of it
        history = torch.zeros(batch, k, 0, dtype=torch.int64, device=device)
        attention = encoded.memory.new_zeros(batch, k, 0, source.size(1))
        best: list[Hypothesis | None] = [None] * batch
        done = [False] * batch
        for t in range(max_length + 1):
            logits, state, feed, weights = self.decode_step(token, state, feed, encoded)
            log_probs = self._log_probs(logits, last_step=t == max_length)
            vocab = log_probs.size(-1)
            total = (scores.unsqueeze(-1) + log_probs.view(batch, k, vocab)).view(batch, -1)
            scores, index = total.topk(k, dim=1)
            origin, token = index // vocab, index % vocab
            history = torch.cat([history.gather(1, _expand(origin, history)), token[..., None]], 2)
            step_weights = weights.view(batch, k, -1).gather(
                1, origin.unsqueeze(-1).expand(-1, -1, weights.size(-1))
            )
            attention = torch.cat(
                [attention.gather(1, _expand(origin, attention)), step_weights.unsqueeze(2)], 2
            )
            ended = (token == EOS_ID) & torch.isfinite(scores)
            for b, j in ended.nonzero().tolist():
                normalised = float(scores[b, j]) / penalty(t + 1)
                if not done[b] and (best[b] is None or normalised > best[b].score):
                    size = int(lengths[b])
                    best[b] = Hypothesis(
                        history[b, j, :-1].tolist(), normalised, attention[b, j, :, :size].cpu()
                    )
            scores = scores.masked_fill(ended, float("-inf"))
            bound = (scores.max(1).values / penalty(max_length + 1)).tolist()
            for b in range(batch):
                if best[b] is not None and best[b].score >= bound[b]:
                    done[b] = True
            if all(done):
                break
            flat = (torch.arange(batch, device=device).unsqueeze(1) * k + origin).view(-1)
            state = tuple(part[flat] for part in state)
            feed, token = feed[flat], token.view(-1)
        return best

    def decode(
        self,
        source: Tensor,
        lengths: Tensor,
        max_length: int,
        beam_size: int = 1,
        length_penalty: float = 0.0,
    ) -> list[Hypothesis]:
        """Greedy decoding for beam_size 1 (and no length penalty), beam search otherwise."""
        if beam_size == 1 and length_penalty == 0:
            return self.greedy_decode(source, lengths, max_length)
        return self.beam_search(source, lengths, beam_size, max_length, length_penalty)


def _expand(index: Tensor, like: Tensor) -> Tensor:
    """(B, K) beam index -> an index for gather along dim 1 of `like` (B, K, ...)."""
    return index.view(*index.shape, *([1] * (like.dim() - 2))).expand(-1, -1, *like.shape[2:])
