"""Music generation: a language model over note tokens of Bach chorale melodies, sampled to MIDI.

A piece is a list of "pitch:duration" note tokens (see rnnkit.data.chorales). Whole pieces are
split 80/10/10 (shuffled with the seed); within each part every piece is preceded by a piece
break and the part ends with one, so one stream of ids holds many pieces. Training then works
exactly like the character model in lm.py (parallel streams, truncated BPTT, carried state).
Quality is bits per token (with cross-entropy and perplexity) on the held-out pieces, next to an
add-one unigram model. Generation starts after a piece break and stops at the next one.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch

from rnnkit.data import (
    PAD_ID,
    UNK_ID,
    DataError,
    load_chorales,
    load_text,
    parse_note_token,
    split_indices,
    write_midi,
)
from rnnkit.data.vocab import _Vocab
from rnnkit.models import LanguageModel, LanguageModelConfig
from rnnkit.train.lm import (
    LanguageModelSettings,
    LanguageModelTask,
    PreparedLanguageModel,
    held_out_bits_per_char,
    model_config,  # a music run's model is an lm run's LanguageModel, saved the same way
    unigram_baseline,
)
from rnnkit.train.rundir import RunError

__all__ = [
    "MusicSettings",
    "NoteVocab",
    "load_pieces",
    "split_pieces",
    "piece_stream",
    "prepare",
    "model_config",
    "finish",
    "sample_piece",
    "evaluate_run",
]

SPLIT = (0.8, 0.1, 0.1)
PIECE_BREAK = "<piece>"
METRIC = "bits_per_token"


class NoteVocab(_Vocab):
    """One id per whole note token ("67:1.5", "rest:1") plus the piece break, most frequent first."""

    @classmethod
    def build(cls, pieces: Iterable[Sequence[str]]) -> Self:
        """Pieces (lists of note tokens) -> vocabulary of every token seen, and the piece break."""
        counts: Counter[str] = Counter()
        for piece in pieces:
            counts.update(piece)
        return cls([PIECE_BREAK, *sorted(counts, key=lambda token: (-counts[token], token))])

    @classmethod
    def _check_tokens(cls, tokens: list[str]) -> None:
        if PIECE_BREAK not in tokens:
            raise DataError(f"NoteVocab.from_dict: 'tokens' must hold {PIECE_BREAK}")
        for token in tokens:
            if token != PIECE_BREAK:
                try:
                    parse_note_token(token)
                except ValueError as error:
                    raise DataError(f"NoteVocab.from_dict: {error}") from None

    @property
    def piece_break_id(self) -> int:
        return self._ids[PIECE_BREAK]

    def encode(self, tokens: Sequence[str]) -> list[int]:
        """Note tokens -> ids (tokens not in the vocabulary -> 1)."""
        if isinstance(tokens, str):
            raise TypeError("tokens must be a list of note tokens, got a str")
        return [self._ids.get(token, UNK_ID) for token in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Ids -> tokens; padding is dropped."""
        return self._ids_to_tokens(ids)


def load_pieces(path: str | None) -> list[list[str]]:
    """None -> the embedded chorale melodies; a file -> one piece per non-empty line of
    whitespace-separated note tokens ("67:1 69:0.5 rest:1")."""
    if path is None:
        return load_chorales()
    pieces = []
    for number, line in enumerate(load_text(path).split("\n"), start=1):
        tokens = line.split()
        for token in tokens:
            try:
                parse_note_token(token)
            except ValueError as error:
                raise DataError(f"{path}, line {number}: {error}") from None
        if tokens:
            pieces.append(tokens)
    if len(pieces) < 3:
        raise DataError(
            f"{path}: needs at least 3 pieces (one per line) for train/valid/test, "
            f"got {len(pieces)}"
        )
    return pieces


def piece_stream(vocab: NoteVocab, pieces: Iterable[Sequence[str]]) -> np.ndarray:
    """Pieces -> (N,) ids: each piece after a piece break, and a final break."""
    ids = []
    for piece in pieces:
        ids.append(vocab.piece_break_id)
        ids.extend(vocab.encode(piece))
    ids.append(vocab.piece_break_id)
    return np.asarray(ids, dtype=np.int64)


def split_pieces(
    pieces: list[list[str]], seed: int
) -> tuple[list[list[str]], list[list[str]], list[list[str]]]:
    """Pieces -> train, valid, test pieces (whole pieces, shuffled by `seed`)."""
    return tuple([pieces[i] for i in part] for part in split_indices(len(pieces), SPLIT, seed))


@dataclass
class MusicSettings(LanguageModelSettings):
    """Music options: the lm's, sized for about 15k training tokens (a few minutes on 2 cores)."""

    hidden: int = 256
    epochs: int = 40
    max_steps: int | None = 600
    batch_size: int = 16
    seq_len: int = 32
    dropout: float = 0.2
    checkpoint_every: int | None = 100
    eval_every: int | None = None
    sample_length: int = 200


def prepare(settings: MusicSettings, saved: dict | None, device) -> PreparedLanguageModel:
    """Pieces, whole-piece splits, vocabulary (from the training pieces) and model for a run."""
    train, valid, test = split_pieces(load_pieces(settings.data), settings.seed)
    vocab = NoteVocab.build(train) if saved is None else NoteVocab.from_dict(saved["vocab"])
    config = LanguageModelConfig(
        vocab_size=len(vocab),
        embedding_dim=settings.embedding_dim,
        cell=settings.cell,
        hidden_size=settings.hidden,
        num_layers=settings.layers,
        dropout=settings.dropout,
    )
    model = LanguageModel(config).to(device)
    task = LanguageModelTask(
        piece_stream(vocab, train),
        piece_stream(vocab, valid),
        settings.batch_size,
        settings.seq_len,
        settings.seed,
        device,
        metric=METRIC,
    )
    files = {"vocab.json": {"level": "note", "vocab": vocab.to_dict()}}
    return PreparedLanguageModel(model, task, files, vocab, piece_stream(vocab, test), settings)


def token_figures(bits: float) -> dict[str, float]:
    """Bits per token -> the same figure as bits, cross-entropy in nats, and perplexity."""
    return {METRIC: bits, "cross_entropy": bits * math.log(2), "perplexity": 2.0**bits}


def sample_piece(
    model: LanguageModel,
    vocab: NoteVocab,
    prompt: Sequence[str] | None,
    length: int,
    temperature: float,
    top_k: int | None,
    seed: int,
) -> list[str]:
    """The prompt's note tokens followed by up to `length` sampled ones (a piece break ends it)."""
    prompt = list(prompt or [])
    for token in prompt:
        try:
            parse_note_token(token)
        except ValueError as error:
            raise RunError(f"--prompt: {error}") from None
    unknown = [token for token in prompt if vocab.encode([token]) == [UNK_ID]]
    if unknown:
        raise RunError(f"--prompt: tokens {unknown[:5]} are not in the run's vocabulary")
    ids = torch.tensor([vocab.piece_break_id, *vocab.encode(prompt)], dtype=torch.int64)
    generator = torch.Generator().manual_seed(seed)
    generated = model.generate(
        ids, length, temperature, top_k, generator=generator, suppress=(PAD_ID, UNK_ID)
    )
    tokens = vocab.decode(generated[1:].tolist())
    return tokens[: tokens.index(PIECE_BREAK)] if PIECE_BREAK in tokens else tokens


def finish(prepared: PreparedLanguageModel, run_dir: Path) -> dict[str, Any]:
    """Held-out bits per token vs the unigram model, and a generated piece (sample.mid)."""
    model, vocab, settings = prepared.model, prepared.vocab, prepared.settings
    bits = held_out_bits_per_char(model, prepared.test_ids, prepared.task.device)
    baseline = unigram_baseline(prepared.task.train_ids, prepared.test_ids, len(vocab))
    model.cpu()
    piece = sample_piece(
        model, vocab, None, settings.sample_length, settings.temperature, None, settings.seed
    )
    midi = write_midi(piece, Path(run_dir) / "sample.mid")
    return {
        "test": {**token_figures(bits), "tokens": len(prepared.test_ids)},
        "baseline": {"name": "unigram (add-one)", **token_figures(baseline)},
        "sample": " ".join(piece),
        "sample_midi": str(midi),
    }


def evaluate_run(
    model: LanguageModel, state: dict, settings: MusicSettings, data: str | None
) -> dict[str, Any]:
    """Bits per token on all pieces of `data`, or on the run's held-out test pieces."""
    vocab = NoteVocab.from_dict(state["vocab"])
    pieces = load_pieces(settings.data if data is None else data)
    train, _, test = split_pieces(pieces, settings.seed)
    test_ids = piece_stream(vocab, pieces if data is not None else test)
    bits = held_out_bits_per_char(model, test_ids, torch.device("cpu"))
    result = {
        **token_figures(bits),
        "tokens": len(test_ids),
        "unknown_fraction": float(np.mean(test_ids == UNK_ID)),
    }
    if data is None:
        baseline = unigram_baseline(piece_stream(vocab, train), test_ids, len(vocab))
        result["unigram_bits_per_token"] = baseline
    return result
