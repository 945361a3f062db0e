"""Character-level language modelling with truncated backpropagation through time.

The text (shipped Shakespeare plays, or a user's UTF-8 file) is split in order: the first 90%
trains, the next 5% validates, the last 5% tests. Training reads `batch_size` parallel streams
in chunks of `seq_len` characters, carrying each stream's state (detached) to its next chunk.
Quality is bits per character on the held-out test part, next to an add-one unigram model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.data import PAD_ID, UNK_ID, CharVocab, load_text
from rnnkit.models import LanguageModel, LanguageModelConfig
from rnnkit.train.checkpoint import Carry
from rnnkit.train.io import atomic_write_bytes
from rnnkit.train.metrics import bits_per_token, unigram_bits_per_token
from rnnkit.train.rundir import RunError
from rnnkit.train.settings import Settings
from rnnkit.train.trainer import Batch, StepOutput

SPLIT = (0.9, 0.05, 0.05)
EVAL_STREAMS = 32
EVAL_CHUNK = 256


@dataclass
class LanguageModelSettings(Settings):
    """LM options: chunk length for truncated BPTT, and the step budget that bounds run time."""

    hidden: int = 256
    epochs: int = 4
    max_steps: int | None = 1500
    batch_size: int = 32
    seq_len: int = 64
    embedding_dim: int = 64
    dropout: float = 0.0
    learning_rate: float = 4e-3
    checkpoint_every: int | None = 100
    eval_every: int | None = 250
    sample_length: int = 400
    temperature: float = 0.8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bidirectional:
            raise RunError(
                "--bidirectional does not apply to lm or music: a language model reads forwards"
            )
        if not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise RunError(f"--seq-len must be an int >= 1, got {self.seq_len!r}")


def split_text(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N,) ids -> contiguous train, valid, test parts in reading order."""
    n_train = int(len(ids) * SPLIT[0])
    n_valid = int(len(ids) * SPLIT[1])
    return ids[:n_train], ids[n_train : n_train + n_valid], ids[n_train + n_valid :]


def stream_layout(ids: np.ndarray, streams: int) -> tuple[np.ndarray, np.ndarray]:
    """(N,) ids -> (streams, S) inputs and the (streams, S) next-token targets."""
    length = (len(ids) - 1) // streams
    if length < 1:
        raise RunError(f"text part of {len(ids)} tokens is too short for {streams} streams")
    inputs = ids[: streams * length].reshape(streams, length)
    targets = ids[1 : streams * length + 1].reshape(streams, length)
    return inputs, targets


@dataclass
class LanguageModelTask:
    """Parallel streams in chunks; each epoch starts at a random offset below seq_len.

    `metric` names the validation figure (bits per token, whatever the tokens are).
    """

    train_ids: np.ndarray
    valid_ids: np.ndarray
    batch_size: int
    seq_len: int
    seed: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    metric: str = "bits_per_char"
    higher_is_better: bool = False

    def __post_init__(self) -> None:
        self.stream_length = (len(self.train_ids) - self.seq_len - 1) // self.batch_size
        if self.stream_length < self.seq_len:
            raise RunError(
                f"the training part ({len(self.train_ids)} tokens) is too short for "
                f"{self.batch_size} streams of chunks of {self.seq_len}; use a longer text "
                "or smaller --batch-size/--seq-len"
            )

    def steps_per_epoch(self) -> int:
        return self.stream_length // self.seq_len

    def batches(self, epoch: int):
        offset = int(np.random.default_rng([self.seed, epoch]).integers(0, self.seq_len))
        span = self.batch_size * self.stream_length
        inputs = self.train_ids[offset : offset + span].reshape(self.batch_size, -1)
        targets = self.train_ids[offset + 1 : offset + 1 + span].reshape(self.batch_size, -1)
        for start in range(0, self.steps_per_epoch() * self.seq_len, self.seq_len):
            chunk = slice(start, start + self.seq_len)
            yield (
                torch.from_numpy(inputs[:, chunk].copy()),
                torch.from_numpy(targets[:, chunk].copy()),
            )

    def loss(self, model: nn.Module, batch: Batch, carry: Carry) -> StepOutput:
        inputs, targets = batch
        logits, state = model(inputs, carry)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return StepOutput(loss, state, inputs.numel())

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {self.metric: held_out_bits_per_char(model, self.valid_ids, self.device)}


def held_out_bits_per_char(model: nn.Module, ids: np.ndarray, device) -> float:
    """Bits per character of `model` on (N,) ids, read as EVAL_STREAMS carried streams."""
    inputs, targets = stream_layout(ids, min(EVAL_STREAMS, max(1, (len(ids) - 1) // 2)))
    inputs, targets = torch.from_numpy(inputs).to(device), torch.from_numpy(targets).to(device)
    model.eval()
    total, count, state = 0.0, 0, None
    with torch.no_grad():
        for start in range(0, inputs.size(1), EVAL_CHUNK):
            logits, state = model(inputs[:, start : start + EVAL_CHUNK], state)
            chunk_targets = targets[:, start : start + EVAL_CHUNK]
            total += F.cross_entropy(
                logits.reshape(-1, logits.size(-1)), chunk_targets.reshape(-1), reduction="sum"
            ).item()
            count += chunk_targets.numel()
    return bits_per_token(total / count)


def unigram_baseline(train_ids: np.ndarray, ids: np.ndarray, vocab_size: int) -> float:
    """Unigram bits per character on the same targets `held_out_bits_per_char` scores."""
    _, targets = stream_layout(ids, min(EVAL_STREAMS, max(1, (len(ids) - 1) // 2)))
    return unigram_bits_per_token(train_ids, targets.reshape(-1), vocab_size)


def encode(vocab: CharVocab, text: str) -> np.ndarray:
    return np.asarray(vocab.encode(text), dtype=np.int64)


@dataclass
class PreparedLanguageModel:
    model: LanguageModel
    task: LanguageModelTask
    files: dict[str, Any]
    vocab: CharVocab
    test_ids: np.ndarray
    settings: LanguageModelSettings


def prepare(settings: LanguageModelSettings, saved: dict | None, device) -> PreparedLanguageModel:
    """Text, contiguous splits, vocabulary (from the training part) and model for a run."""
    text = load_text(settings.data)
    if saved is None:
        n_train = int(len(text) * SPLIT[0])
        vocab = CharVocab.build(text[:n_train])
    else:
        vocab = CharVocab.from_dict(saved["vocab"])
    train_ids, valid_ids, test_ids = split_text(encode(vocab, text))
    if min(len(valid_ids), len(test_ids)) < 3:
        raise RunError(
            f"text of {len(text)} characters is too short: its 5% held-out parts need at least 3 "
            "characters each"
        )
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
        train_ids, valid_ids, settings.batch_size, settings.seq_len, settings.seed, device
    )
    files = {"vocab.json": {"level": "char", "vocab": vocab.to_dict()}}
    return PreparedLanguageModel(model, task, files, vocab, test_ids, settings)


def model_config(prepared: PreparedLanguageModel) -> dict[str, Any]:
    return {"class": "LanguageModel", "config": asdict(prepared.model.config)}


def default_prompt(vocab: CharVocab) -> str:
    """A newline when the vocabulary has one (text then starts like a new speech)."""
    return "\n" if vocab.encode("\n") != [1] else vocab.decode([2])


def sample_text(
    model: LanguageModel,
    vocab: CharVocab,
    prompt: str | None,
    length: int,
    temperature: float,
    top_k: int | None,
    seed: int,
) -> str:
    """The prompt followed by `length` sampled characters."""
    prompt = default_prompt(vocab) if not prompt else prompt
    ids = torch.tensor(vocab.encode(prompt), dtype=torch.int64)
    generator = torch.Generator().manual_seed(seed)
    generated = model.generate(
        ids, length, temperature, top_k, generator=generator, suppress=(PAD_ID, UNK_ID)
    )
    return vocab.decode(generated.tolist())


def finish(prepared: PreparedLanguageModel, run_dir: Path) -> dict[str, Any]:
    """Held-out bits per character vs the unigram model, and a generated sample."""
    model, vocab, settings = prepared.model, prepared.vocab, prepared.settings
    bpc = held_out_bits_per_char(model, prepared.test_ids, prepared.task.device)
    baseline = unigram_baseline(prepared.task.train_ids, prepared.test_ids, len(vocab))
    model.cpu()
    sample = sample_text(
        model, vocab, None, settings.sample_length, settings.temperature, None, settings.seed
    )
    atomic_write_bytes(run_dir / "sample.txt", sample.encode("utf-8"))
    return {
        "test": {
            "bits_per_char": bpc,
            "perplexity": 2.0**bpc,
            "characters": len(prepared.test_ids),
        },
        "baseline": {"name": "unigram (add-one)", "bits_per_char": baseline},
        "sample": sample,
    }


def evaluate_run(
    model: LanguageModel, state: dict, settings: LanguageModelSettings, data: str | None
) -> dict[str, Any]:
    """Bits per character on `data` (all of it) or on the run's test part."""
    vocab = CharVocab.from_dict(state["vocab"])
    text = load_text(settings.data if data is None else data)
    ids = encode(vocab, text)
    train_ids, _, test_ids = split_text(ids)
    if data is not None:
        test_ids = ids
    if len(test_ids) < 3:
        raise RunError(f"{data}: text too short to evaluate (needs at least 3 characters)")
    bpc = held_out_bits_per_char(model, test_ids, torch.device("cpu"))
    result = {
        "bits_per_char": bpc,
        "perplexity": 2.0**bpc,
        "characters": len(test_ids),
        "unknown_fraction": float(np.mean(test_ids == 1)),
    }
    if data is None:
        result["unigram_bits_per_char"] = unigram_baseline(train_ids, test_ids, len(vocab))
    return result
