"""Sequence to sequence: an attentional encoder-decoder transduces one string into another.

Data: the shipped CMUdict set, English spelling -> ARPAbet pronunciation ("cat" -> "K AE1 T"),
or a user's file of `source<TAB>target` lines. Split 80/10/10 by distinct source (seeded), so
no source appears in two splits. Sources are read as characters and targets as space-separated
tokens by default (--source-tokens / --target-tokens). Teacher forcing decays linearly from
--teacher-forcing to --teacher-forcing-end over the run. Greedy exact match on part of the
validation split drives early stopping; the test split is decoded with beam search (and
greedily) and scored by exact match, token error rate, chrF and BLEU (sacrebleu), next to the
copy-the-input baseline. Scores compare case-folded text, so the baseline is not penalised
for case alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn

from rnnkit.data import Pairs, TokenVocab, load_pairs, pad_batch, split_pairs
from rnnkit.data.pairs import BOS_ID, EOS_ID, TOKEN_LEVELS, join_tokens, tokenize
from rnnkit.models.attention import ATTENTIONS
from rnnkit.models.seq2seq import Hypothesis, Seq2Seq, Seq2SeqConfig
from rnnkit.train.checkpoint import Carry
from rnnkit.train.io import atomic_save_figure
from rnnkit.train.rundir import RunError
from rnnkit.train.settings import Settings
from rnnkit.train.trainer import Batch, StepOutput

DECODE_BATCH = 256
# Decoding stops this many tokens past the longest training target.
EXTRA_LENGTH = 5


@dataclass
class Seq2SeqSettings(Settings):
    """Seq2seq options: attention kind, tokenisation of each side, teacher forcing, beam."""

    hidden: int = 64
    bidirectional: bool = True
    epochs: int = 2
    batch_size: int = 64
    learning_rate: float = 5e-3
    eval_every: int | None = 300
    checkpoint_every: int | None = 100
    attention: str = "bahdanau"
    embedding_dim: int = 48
    dropout: float = 0.1
    source_tokens: str = "char"
    target_tokens: str = "space"
    teacher_forcing: float = 1.0
    teacher_forcing_end: float = 0.8
    beam: int = 4
    length_penalty: float = 0.6
    eval_pairs: int = 1000

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.attention not in ATTENTIONS:
            raise RunError(f"--attention must be one of {ATTENTIONS}, got {self.attention!r}")
        for name in ("source_tokens", "target_tokens"):
            if getattr(self, name) not in TOKEN_LEVELS:
                raise RunError(
                    f"--{name.replace('_', '-')} must be one of {TOKEN_LEVELS}, "
                    f"got {getattr(self, name)!r}"
                )
        for name in ("teacher_forcing", "teacher_forcing_end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise RunError(
                    f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)!r}"
                )
        for name in ("beam", "eval_pairs", "embedding_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise RunError(f"--{name.replace('_', '-')} must be an int >= 1, got {value!r}")
        if not self.length_penalty >= 0:
            raise RunError(f"--length-penalty must be >= 0, got {self.length_penalty!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise RunError(f"--dropout must be in [0, 1), got {self.dropout!r}")


@dataclass
class EncodedPairs:
    """Id lists of each side (targets without <s>/</s>) and the texts they came from."""

    sources: list[list[int]]
    targets: list[list[int]]
    pairs: Pairs

    def subset(self, indices) -> EncodedPairs:
        indices = [int(i) for i in indices]
        return EncodedPairs(
            [self.sources[i] for i in indices],
            [self.targets[i] for i in indices],
            self.pairs.subset(indices),
        )

    def __len__(self) -> int:
        return len(self.sources)


def make_batch(examples: EncodedPairs, teacher_forcing: float = 1.0) -> Batch:
    """-> (B, S) source, (B,) lengths, (B, T) <s>+target, (B, T) target+</s>, (B,) ratio."""
    source, lengths = pad_batch([ids or [1] for ids in examples.sources])
    decoder_input, _ = pad_batch([[BOS_ID, *ids] for ids in examples.targets])
    decoder_target, _ = pad_batch([[*ids, EOS_ID] for ids in examples.targets])
    ratio = torch.full((len(examples),), float(teacher_forcing))
    return source, lengths, decoder_input, decoder_target, ratio


@dataclass
class Seq2SeqTask:
    """Shuffled batches of the training split; greedy exact match on validation decides."""

    train: EncodedPairs
    valid: EncodedPairs
    state: dict[str, Any]
    batch_size: int
    seed: int
    teacher_forcing: tuple[float, float]
    total_steps: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    metric: str = "exact_match"
    higher_is_better: bool = True

    def steps_per_epoch(self) -> int:
        return max(1, len(self.train) // self.batch_size)

    def ratio_at(self, step: int) -> float:
        """Teacher-forcing ratio at a global step: linear from start to end over the run."""
        start, end = self.teacher_forcing
        return start + (end - start) * min(1.0, step / max(1, self.total_steps - 1))

    def batches(self, epoch: int):
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.train))
        size = min(self.batch_size, len(self.train))
        first_step = epoch * self.steps_per_epoch()
        for index, start in enumerate(range(0, self.steps_per_epoch() * size, size)):
            chunk = self.train.subset(order[start : start + size])
            yield make_batch(chunk, self.ratio_at(first_step + index))

    def loss(self, model: nn.Module, batch: Batch, carry: Carry) -> StepOutput:
        source, lengths, decoder_input, decoder_target, ratio = batch
        logits, _ = model(source, lengths, decoder_input, teacher_forcing=ratio)
        loss = F.cross_entropy(logits.flatten(0, 1), decoder_target.flatten(), ignore_index=0)
        return StepOutput(loss, None, int((decoder_target != 0).sum()))

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return score_model(model, self.valid, self.state, self.device, beam=1, bleu=False)[0]


# -- decoding and scores ----------------------------------------------------------------------
def decode_pairs(
    model: Seq2Seq,
    examples: EncodedPairs,
    state: dict[str, Any],
    device,
    beam: int = 1,
    length_penalty: float = 0.0,
) -> list[Hypothesis]:
    """The model's output for every source (greedy for beam 1), in batches."""
    model.eval()
    hypotheses: list[Hypothesis] = []
    for start in range(0, len(examples), DECODE_BATCH):
        chunk = examples.subset(range(start, min(start + DECODE_BATCH, len(examples))))
        source, lengths = pad_batch([ids or [1] for ids in chunk.sources])
        hypotheses += model.decode(
            source.to(device), lengths, state["max_length"], beam, length_penalty
        )
    return hypotheses


def edit_distance(a: list[str], b: list[str]) -> int:
    """Levenshtein distance between two token lists."""
    previous = list(range(len(b) + 1))
    for i, token in enumerate(a, start=1):
        current = [i]
        for j, other in enumerate(b, start=1):
            current.append(
                min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (token != other))
            )
        previous = current
    return previous[-1]


def transduction_scores(
    hypotheses: list[str], references: list[str], level: str, bleu: bool = True
) -> dict[str, float]:
    """Exact match, token error rate and (with bleu) chrF and BLEU of outputs vs references,
    all on case-folded text."""
    import sacrebleu

    hyps = [h.casefold() for h in hypotheses]
    refs = [r.casefold() for r in references]
    hyp_tokens = [tokenize(h, level) for h in hyps]
    ref_tokens = [tokenize(r, level) for r in refs]
    errors = sum(edit_distance(h, r) for h, r in zip(hyp_tokens, ref_tokens))
    scores = {
        "exact_match": float(np.mean([h == r for h, r in zip(hyp_tokens, ref_tokens)])),
        "token_error_rate": errors / max(1, sum(len(r) for r in ref_tokens)),
    }
    if bleu:
        scores["chrf"] = sacrebleu.corpus_chrf(hyps, [refs]).score
        scores["bleu"] = sacrebleu.corpus_bleu(hyps, [refs]).score
    return scores


def score_model(
    model: Seq2Seq,
    examples: EncodedPairs,
    state: dict[str, Any],
    device,
    beam: int,
    length_penalty: float = 0.0,
    bleu: bool = True,
) -> tuple[dict[str, float], list[str]]:
    """Scores of the model's outputs on examples, and the output texts."""
    target_vocab = TokenVocab.from_dict(state["target"])
    outputs = [
        target_vocab.decode(h.tokens)
        for h in decode_pairs(model, examples, state, device, beam, length_penalty)
    ]
    scores = transduction_scores(outputs, examples.pairs.targets, target_vocab.level, bleu)
    return scores, outputs


def copy_baseline(pairs: Pairs, state: dict[str, Any]) -> dict[str, float]:
    """Scores of outputting each source's tokens unchanged, joined as targets are joined."""
    source_level, target_level = state["source"]["level"], state["target"]["level"]
    copies = [join_tokens(tokenize(s, source_level), target_level) for s in pairs.sources]
    return transduction_scores(copies, pairs.targets, target_level)


# -- preprocessing: what vocab.json stores -----------------------------------------------------
def encode_pairs(pairs: Pairs, state: dict[str, Any]) -> EncodedPairs:
    """Pairs -> ids with the run's vocabularies."""
    source_vocab = TokenVocab.from_dict(state["source"])
    target_vocab = TokenVocab.from_dict(state["target"])
    return EncodedPairs(
        [source_vocab.encode(s) for s in pairs.sources],
        [target_vocab.encode(t) for t in pairs.targets],
        pairs,
    )


def load_examples(
    settings: Seq2SeqSettings, state: dict[str, Any] | None
) -> tuple[EncodedPairs, dict[str, Any]]:
    """(examples, preprocessing state) for the settings' data; reuse `state` when resuming."""
    pairs = load_pairs(settings.data)
    if state is None:
        train_index = split_pairs(pairs, seed=settings.seed)[0]
        train = pairs.subset(train_index)
        target_vocab = TokenVocab.build(train.targets, settings.target_tokens)
        longest = max(len(tokenize(t, settings.target_tokens)) for t in train.targets)
        state = {
            "source": TokenVocab.build(train.sources, settings.source_tokens).to_dict(),
            "target": target_vocab.to_dict(),
            "max_length": longest + EXTRA_LENGTH,
        }
    return encode_pairs(pairs, state), state


# -- the application --------------------------------------------------------------------------
@dataclass
class PreparedSeq2Seq:
    model: Seq2Seq
    task: Seq2SeqTask
    files: dict[str, Any]
    test: EncodedPairs
    state: dict[str, Any]
    settings: Seq2SeqSettings


def prepare(settings: Seq2SeqSettings, saved: dict[str, Any] | None, device) -> PreparedSeq2Seq:
    """Data, splits, vocabularies and model for a run (saved: vocab.json when resuming)."""
    examples, state = load_examples(settings, saved)
    train_index, valid_index, test_index = split_pairs(examples.pairs, seed=settings.seed)
    if min(len(train_index), len(valid_index), len(test_index)) == 0:
        raise RunError(
            f"{settings.data}: too few distinct sources ({len(set(examples.pairs.sources))}) "
            "to split into train, validation and test; at least 3 are needed"
        )
    config = Seq2SeqConfig(
        source_vocab_size=len(state["source"]["tokens"]) + 4,
        target_vocab_size=len(state["target"]["tokens"]) + 4,
        embedding_dim=settings.embedding_dim,
        cell=settings.cell,
        hidden_size=settings.hidden,
        num_layers=settings.layers,
        bidirectional=settings.bidirectional,
        attention=settings.attention,
        dropout=settings.dropout,
    )
    model = Seq2Seq(config).to(device)
    train = examples.subset(train_index)
    steps_per_epoch = max(1, len(train) // settings.batch_size)
    total = settings.epochs * steps_per_epoch
    total = min(total, settings.max_steps) if settings.max_steps else total
    task = Seq2SeqTask(
        train,
        examples.subset(valid_index[: settings.eval_pairs]),
        state,
        settings.batch_size,
        settings.seed,
        (settings.teacher_forcing, settings.teacher_forcing_end),
        total,
        device,
    )
    return PreparedSeq2Seq(
        model, task, {"vocab.json": state}, examples.subset(test_index), state, settings
    )


def model_config(prepared: PreparedSeq2Seq) -> dict[str, Any]:
    return {"class": "Seq2Seq", "config": asdict(prepared.model.config)}


def finish(prepared: PreparedSeq2Seq, run_dir: Path) -> dict[str, Any]:
    """Test scores with beam search and greedily, the copy baseline, an attention map PNG."""
    settings, state, device = prepared.settings, prepared.state, prepared.task.device
    model, test = prepared.model, prepared.test
    metrics, outputs = score_model(
        model, test, state, device, settings.beam, settings.length_penalty
    )
    greedy, _ = score_model(model, test, state, device, beam=1)
    shown = test.subset(range(min(4, len(test))))
    translations = translate(
        model, state, shown.pairs.sources, settings.beam, settings.length_penalty
    )
    plot_attention(run_dir / "attention.png", translations)
    return {
        "test": {**metrics, "examples": len(test)},
        "test_greedy": greedy,
        "decoding": {"beam": settings.beam, "length_penalty": settings.length_penalty},
        "baseline": {"name": "copy the input", **copy_baseline(test.pairs, state)},
        "samples": [
            {"source": s, "target": t, "output": o}
            for s, t, o in zip(test.pairs.sources[:10], test.pairs.targets[:10], outputs[:10])
        ],
    }


def evaluate_run(
    model: Seq2Seq, state: dict, settings: Seq2SeqSettings, data: str | None
) -> dict[str, Any]:
    """Scores of a trained model on `data` (all of it) or on its run's test split, with the
    copy baseline on the same pairs."""
    if data is None:
        examples, _ = load_examples(settings, state)
        examples = examples.subset(split_pairs(examples.pairs, seed=settings.seed)[2])
    else:
        examples = encode_pairs(load_pairs(data), state)
    device = torch.device("cpu")
    metrics, _ = score_model(model, examples, state, device, settings.beam, settings.length_penalty)
    return {
        **metrics,
        "examples": len(examples),
        "baseline": {"name": "copy the input", **copy_baseline(examples.pairs, state)},
    }


def translate(
    model: Seq2Seq,
    state: dict[str, Any],
    texts: list[str],
    beam: int = 1,
    length_penalty: float = 0.0,
) -> list[dict[str, Any]]:
    """For each text: the output, its score, and the attention over the source tokens."""
    source_vocab = TokenVocab.from_dict(state["source"])
    target_vocab = TokenVocab.from_dict(state["target"])
    empty = [i for i, text in enumerate(texts) if not tokenize(text, source_vocab.level)]
    if empty:
        raise RunError(f"texts[{empty[0]}] is empty; there is nothing to translate")
    examples = EncodedPairs(
        [source_vocab.encode(t) for t in texts], [[] for _ in texts], Pairs(texts, texts)
    )
    hypotheses = decode_pairs(model, examples, state, torch.device("cpu"), beam, length_penalty)
    results = []
    for text, hypothesis in zip(texts, hypotheses):
        output_tokens = [target_vocab.tokens[i] for i in hypothesis.tokens]
        results.append(
            {
                "text": text,
                "output": join_tokens(output_tokens, target_vocab.level),
                "score": hypothesis.score,
                "source_tokens": tokenize(text, source_vocab.level),
                "output_tokens": [*output_tokens, "</s>"],
                "attention": hypothesis.attention.tolist(),
            }
        )
    return results


def plot_attention(path: str | Path, translations: list[dict[str, Any]]) -> None:
    """One heat map per translation: rows = output tokens (and </s>), columns = source tokens."""
    count = len(translations)
    columns = min(count, 2)
    rows = -(-count // columns)
    widths = [max(len(t["source_tokens"]), 1) for t in translations]
    heights = [len(t["output_tokens"]) for t in translations]
    figure = Figure(
        figsize=(columns * (1.5 + 0.35 * max(widths)), rows * (1.5 + 0.3 * max(heights)))
    )
    axes_grid = figure.subplots(rows, columns, squeeze=False)
    for axes, item in zip(axes_grid.flat, translations):
        weights = np.asarray(item["attention"])
        axes.imshow(weights, cmap="Greys", vmin=0.0, vmax=1.0, aspect="auto")
        axes.set_xticks(range(len(item["source_tokens"])), item["source_tokens"])
        axes.set_yticks(range(len(item["output_tokens"])), item["output_tokens"])
        axes.set_title(f"{item['text']} -> {item['output']}", fontsize=9)
        axes.tick_params(labelsize=8)
    for axes in list(axes_grid.flat)[count:]:
        axes.axis("off")
    figure.suptitle("attention weights (row: output token, column: source token)", fontsize=9)
    atomic_save_figure(path, figure)


def predict_seq2seq(
    run, texts: list[str], beam: int | None = None, attention_png: str | Path | None = None
) -> list[str]:
    """What `rnnkit predict` prints for a seq2seq run (output, score, text per line); writes
    the attention maps of all texts to `attention_png` when given."""
    if attention_png is not None and not Path(attention_png).parent.is_dir():
        raise RunError(
            f"--attention {attention_png}: directory {Path(attention_png).parent} does not exist"
        )
    settings = run.settings
    beam = settings.beam if beam is None else beam
    translations = translate(run.model, run.state, texts, beam, settings.length_penalty)
    if attention_png is not None:
        plot_attention(attention_png, translations)
    return [f"{t['output']}\t{t['score']:.3f}\t{t['text']}" for t in translations]
