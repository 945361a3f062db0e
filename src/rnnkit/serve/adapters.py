"""Per task: how a request's input becomes model input, one batched step, and the wire entries.

An adapter follows the streaming protocol of `rnnkit.stream` for a batch of sessions:
`initial_state(batch_size)` and `step(inputs, state) -> (raw outputs, state)`, where `inputs`
stacks equally long chunks (B, t[, ...]). `encode` turns one request's input into such a chunk
(t, ...) or raises `InputError`; `entries` turns the raw outputs into one JSON-able entry per step.

language model: a string (music: note tokens separated by spaces) -> {"top": [[char, p], ...]}
classifier:     a string (feature input: a list of rows of numbers) -> {"probs": {label: p}}
tagger:         a string -> {"token": token, "tag": tag}
forecaster:     a list of numbers (several channels: a list of rows) -> {"next": x or null}
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnkit.stream import _SingleStep
from rnnkit.train.rundir import RunError

State = Any


class InputError(ValueError):
    """A request's input the model cannot take; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Adapter:
    """What every task shares: the model, its description, and the fingerprint of its weights."""

    task: str
    input_kind: str

    def __init__(self, run) -> None:
        self.run = run
        self.model: nn.Module = run.model.eval()
        self.fingerprint = model_fingerprint(self.model)

    def describe(self) -> dict[str, Any]:
        """What /v1/model says about the task, besides the state size."""
        config = getattr(self.model, "config", None)
        return {
            "task": self.task,
            "model": type(self.model).__name__,
            "config": dict(vars(config)) if config is not None else {},
            "input": self.input_kind,
        }

    def initial_state(self, batch_size: int) -> State:
        """The state of `batch_size` new sessions."""
        return self.model.initial_state(batch_size)

    def encode(self, value: Any) -> tuple[Tensor, list[str] | None]:
        """A request's "input" -> (t, ...) chunk and its tokens (for the tagger), or InputError."""
        raise NotImplementedError

    def collate(self, chunks: list[Tensor]) -> Tensor:
        """Equally long chunks (t, ...) of several sessions -> one batch (B, t, ...)."""
        return torch.stack(chunks)

    def step(self, inputs: Tensor, state: State) -> tuple[Tensor, State]:
        """(B, t, ...) chunks, their sessions' state -> raw outputs (B, t, ...), the next state."""
        return self.model.stream_step(inputs, state)

    def entries(self, outputs: Tensor, tokens: list[list[str] | None]) -> list[list[dict]]:
        """Raw outputs (B, t, ...) -> per session, one wire entry per step."""
        raise NotImplementedError


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the model's class, config and weights: saved sessions belong to this model."""
    digest = hashlib.sha256(type(model).__name__.encode())
    digest.update(repr(getattr(model, "config", None)).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def _require_text(value: Any) -> str:
    if not isinstance(value, str):
        raise InputError(f'"input" must be a string for this model, got {_kind(value)}')
    if not value:
        raise InputError('"input" must not be empty')
    return value


def _require_numbers(value: Any, width: int, name: str = '"input"') -> list[list[float]]:
    """A list of numbers (width 1) or a list of rows of `width` numbers -> rows."""
    if not isinstance(value, list) or not value:
        raise InputError(f"{name} must be a non-empty list of numbers, got {_kind(value)}")
    rows = []
    for index, item in enumerate(value):
        row = item if isinstance(item, list) else [item]
        if len(row) != width or not all(_is_number(x) for x in row):
            wanted = "a number" if width == 1 else f"a list of {width} numbers"
            raise InputError(f"{name}[{index}] must be {wanted}, got {item!r}"[:300])
        rows.append([float(x) for x in row])
    return rows


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _kind(value: Any) -> str:
    names = {str: "a string", list: "a list", dict: "an object", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number" if _is_number(value) else type(value).__name__)


def _known_ids(vocab, pieces: list[str], what: str) -> list[int]:
    """Ids of `pieces`; InputError naming the first one the vocabulary does not hold."""
    ids = vocab.encode(pieces) if what == "note token" else vocab.encode("".join(pieces))
    for position, (piece, index) in enumerate(zip(pieces, ids)):
        if index == 1:
            raise InputError(
                f"{what} {piece!r} at position {position} is not in the model's vocabulary"
            )
    return ids


class LanguageModelAdapter(Adapter):
    """Characters (or note tokens) in, the likeliest next ones out."""

    task = "lm"

    def __init__(self, run, top_k: int) -> None:
        super().__init__(run)
        from rnnkit.data import CharVocab
        from rnnkit.train.music import NoteVocab

        self.music = run.task == "music"
        vocab_class = NoteVocab if self.music else CharVocab
        self.vocab = vocab_class.from_dict(run.state["vocab"])
        self.input_kind = "note tokens separated by spaces" if self.music else "text"
        self.names = self.vocab.tokens
        self.shown = torch.tensor([i >= 2 for i in range(len(self.names))])  # no <pad>, <unk>
        self.top_k = min(top_k, len(self.names) - 2)
        self.rnn = self.model.rnn
        self.single_step = _SingleStep(self.rnn)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "task": self.run.task, "vocab": self.names[2:]}

    def encode(self, value: Any) -> tuple[Tensor, None]:
        text = _require_text(value)
        if self.music:
            ids = _known_ids(self.vocab, text.split(), "note token")
            if not ids:
                raise InputError('"input" must hold at least one note token')
        else:
            ids = _known_ids(self.vocab, list(text), "character")
        return torch.tensor(ids, dtype=torch.int64), None

    def step(self, inputs: Tensor, state: State) -> tuple[Tensor, State]:
        model = self.model
        x = model.embedding(inputs)
        if inputs.size(1) == 1:
            # One step per session: the cells' equations directly (rnnkit.Stream's fast path);
            # the layer's full forward costs more than the step itself.
            cells = self.single_step.cell_states(state, True)
            outputs, cells = self.single_step(x, cells, True)
            state = self.single_step.layer_state(cells, True)
        else:
            outputs, state = self.rnn(x, state)
        return model.head(outputs), state

    def entries(self, outputs: Tensor, tokens) -> list[list[dict]]:
        probabilities = torch.softmax(outputs.float(), dim=-1).masked_fill(~self.shown, -1.0)
        top = probabilities.topk(self.top_k, dim=-1)
        values, indices = top.values.tolist(), top.indices.tolist()
        names = self.names
        return [
            [
                {"top": [[names[i], p] for i, p in zip(step_ids, step_ps)]}
                for step_ids, step_ps in zip(row_ids, row_ps)
            ]
            for row_ids, row_ps in zip(indices, values)
        ]


class ClassifierAdapter(Adapter):
    """Text (or rows of features) in, the class probabilities of everything read so far out."""

    task = "classify"

    def __init__(self, run) -> None:
        super().__init__(run)
        from rnnkit.data import WordVocab
        from rnnkit.train.classify import vocab_from_state

        if self.model.config.bidirectional:
            raise RunError(
                f"{run.run_dir} is a bidirectional classifier: it reads whole sequences and "
                "cannot stream; use `rnnkit predict`"
            )
        self.vocab = vocab_from_state(run.state)
        self.words = isinstance(self.vocab, WordVocab)
        self.classes = [str(name) for name in run.state["classes"]]
        self.width = self.model.config.input_size
        if self.vocab is None:
            self.input_kind = f"a list of rows of {self.width} numbers (one row per step)"
        else:
            self.input_kind = "text (one step per word)" if self.words else "text"

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "classes": self.classes}

    def encode(self, value: Any) -> tuple[Tensor, None]:
        if self.vocab is None:
            rows = _require_numbers(value, self.width)
            return torch.tensor(rows, dtype=torch.float32), None
        text = _require_text(value)
        if self.words:
            # Unknown words are ordinary for a word model (trained with <unk>), as in `predict`.
            ids = self.vocab.encode(text)
            if not ids:
                raise InputError('"input" must hold at least one word')
        else:
            ids = _known_ids(self.vocab, list(text), "character")
        return torch.tensor(ids, dtype=torch.int64), None

    def entries(self, outputs: Tensor, tokens) -> list[list[dict]]:
        probabilities = torch.softmax(outputs.float(), dim=-1).tolist()
        classes = self.classes
        return [[{"probs": dict(zip(classes, step))} for step in row] for row in probabilities]


class TaggerAdapter(Adapter):
    """Text in (whole tokens: a chunk is split on whitespace and punctuation), a tag per token out.

    Serves a unidirectional SequenceTagger; with a CRF, a token's tag is the last tag of the
    best path over the tokens read so far (a whole-sentence decode may still revise it).
    """

    task = "tag"

    def __init__(self, run) -> None:
        super().__init__(run)
        from rnnkit.train.tag import TokenEncoder, tokenize

        if self.model.config.bidirectional:
            raise RunError(
                f"{run.run_dir} is a bidirectional tagger: it reads whole sentences and cannot "
                "stream; use `rnnkit predict`"
            )
        self.encoder = TokenEncoder.from_dict(run.state)
        self.tokenize = tokenize
        self.tags = list(self.encoder.tags)
        self.input_kind = "text in whole tokens (one step per token)"

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "tags": self.tags}

    def encode(self, value: Any) -> tuple[Tensor, list[str]]:
        tokens = self.tokenize(_require_text(value))
        if not tokens:
            raise InputError('"input" must hold at least one token')
        return torch.from_numpy(self.encoder.encode(tokens)), tokens

    def collate(self, chunks: list[Tensor]) -> Tensor:
        """Chunks of (t, 1 + C) ids with different C -> (B, t, 1 + max C); 0 pads characters."""
        width = max(chunk.size(1) for chunk in chunks)
        return torch.stack([F.pad(chunk, (0, width - chunk.size(1))) for chunk in chunks])

    def entries(self, outputs: Tensor, tokens) -> list[list[dict]]:
        best = outputs.argmax(-1).tolist()
        return [
            [{"token": token, "tag": self.tags[tag]} for token, tag in zip(row_tokens, row)]
            for row_tokens, row in zip(tokens, best)
        ]


class ForecasterAdapter(Adapter):
    """Numbers in, the forecast of the next value after each out (once a window has been read).

    The Forecaster reads a window of the last `window` values, so a session's state is that
    window (a ring held as a shifted buffer) and the count of values read: fixed in size too.
    """

    task = "forecast"

    def __init__(self, run) -> None:
        super().__init__(run)
        config = self.model.config
        self.window, self.channels = config.window, config.num_channels
        wanted = "numbers" if self.channels == 1 else f"rows of {self.channels} numbers"
        self.input_kind = f"a list of {wanted} (one per step)"

    def describe(self) -> dict[str, Any]:
        columns = self.run.state.get("columns")
        return {**super().describe(), "columns": columns, "needs": self.window}

    def initial_state(self, batch_size: int) -> dict[str, Tensor]:
        values = torch.zeros(batch_size, self.window, self.channels)
        return {"window": values, "seen": torch.zeros(batch_size, dtype=torch.int64)}

    def encode(self, value: Any) -> tuple[Tensor, None]:
        return torch.tensor(_require_numbers(value, self.channels), dtype=torch.float32), None

    def step(self, inputs: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict]:
        history = torch.cat([state["window"], inputs], dim=1)  # (B, W + t, C)
        t = inputs.size(1)
        windows = history.unfold(1, self.window, 1)[:, 1:]  # (B, t, C, W): ends at each new value
        flat = windows.permute(0, 1, 3, 2).reshape(-1, self.window, self.channels)
        forecasts = self.model(flat)[:, 0].view(inputs.size(0), t, self.channels)
        seen = state["seen"].unsqueeze(1) + torch.arange(1, t + 1)  # (B, t)
        ready = (seen >= self.window).unsqueeze(-1)
        outputs = forecasts.masked_fill(~ready, float("nan"))
        new_state = {"window": history[:, -self.window :].contiguous(), "seen": seen[:, -1]}
        return outputs, new_state

    def entries(self, outputs: Tensor, tokens) -> list[list[dict]]:
        single = self.channels == 1
        result = []
        for row in outputs.tolist():
            entries = []
            for values in row:
                if math.isnan(values[0]):
                    entries.append({"next": None})
                else:
                    entries.append({"next": values[0] if single else values})
            result.append(entries)
        return result


def make_adapter(run, top_k: int = 5) -> Adapter:
    """The adapter for a loaded run's task; RunError for a run that cannot be served."""
    if run.task in ("lm", "music"):
        return LanguageModelAdapter(run, top_k)
    if run.task == "classify":
        return ClassifierAdapter(run)
    if run.task == "forecast":
        return ForecasterAdapter(run)
    if run.task == "tag":
        return TaggerAdapter(run)
    raise RunError(f"{run.run_dir}: `rnnkit serve` cannot serve a `{run.task}` run")
