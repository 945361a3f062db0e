"""What serving a trained run needs: stream input encoding, top predictions, ONNX signatures."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def stream_input_encoder(run, newlines: bool) -> tuple[Callable[[str, int], Any], list[str | None]]:
    """(a function: line text, line number -> (1, t[, I]) model input; the name of each output).

    Names are None for outputs never shown (padding, unknown token).
    """
    import torch

    from rnnkit.train.rundir import RunError

    def as_ids(ids: list[int]):
        return torch.tensor([ids], dtype=torch.int64)

    if run.task == "classify":
        from rnnkit.train.classify import vocab_from_state

        if run.model.config.bidirectional:
            raise RunError(
                f"{run.run_dir} is a bidirectional classifier: it reads whole sequences and "
                "cannot stream; use `rnnkit predict`"
            )
        vocab = vocab_from_state(run.state)
        classes = list(run.state["classes"])
        if vocab is not None:
            return (lambda text, _: as_ids(vocab.encode(text))), classes
        size = run.model.config.input_size

        def features(text: str, number: int):
            fields = text.replace(",", " ").split()
            try:
                values = [float(field) for field in fields]
            except ValueError:
                values = []
            if len(values) != size:
                raise RunError(
                    f"line {number}: expected {size} numbers (one step's features, separated by "
                    f"commas or spaces), got {text!r}"
                )
            return torch.tensor([[values]], dtype=torch.float32)

        return features, classes
    if run.task == "lm":
        from rnnkit.data import CharVocab

        vocab = CharVocab.from_dict(run.state["vocab"])
        ending = "\n" if newlines else ""
        encode = lambda text, _: as_ids(vocab.encode(text + ending))  # noqa: E731
    else:
        from rnnkit.train.music import NoteVocab

        vocab = NoteVocab.from_dict(run.state["vocab"])
        encode = lambda text, _: as_ids(vocab.encode(text.split()))  # noqa: E731
    return encode, [None, None, *vocab.tokens[2:]]


def top_predictions(probabilities, names: list[str | None], top_k: int) -> list[tuple[str, float]]:
    """The `top_k` likeliest named outputs: (name, probability), the likeliest first."""
    order = probabilities.argsort(descending=True).tolist()
    named = [(names[i], float(probabilities[i])) for i in order if names[i] is not None]
    return named[:top_k]


def onnx_signature(model) -> tuple[tuple, tuple[list[str], list[str], dict]]:
    """An application model's example input and its ONNX input names, output names, axes."""
    import torch

    from rnnkit.models import Forecaster, LanguageModel, SequenceClassifier

    batch_time = {0: "batch", 1: "time"}
    if isinstance(model, LanguageModel):
        state = model.initial_state(1)
        lstm = isinstance(state, tuple)
        states_in = ["h0", "c0"] if lstm else ["h0"]
        states_out = ["h_n", "c_n"] if lstm else ["h_n"]
        axes = {"tokens": batch_time, "logits": batch_time}
        axes.update({name: {1: "batch"} for name in states_in + states_out})
        tokens = torch.ones(1, 4, dtype=torch.int64)
        return (tokens, state), (["tokens", *states_in], ["logits", *states_out], axes)
    if isinstance(model, SequenceClassifier):
        config = model.config
        if config.vocab_size is not None:
            name, example = "tokens", torch.ones(1, 4, dtype=torch.int64)
        else:
            name, example = "features", torch.zeros(1, 4, config.input_size)
        axes = {name: batch_time, "lengths": {0: "batch"}, "logits": {0: "batch"}}
        return (example,), ([name, "lengths"], ["logits"], axes)
    if isinstance(model, Forecaster):
        config = model.config
        window = torch.randn(1, config.window, config.num_channels)
        axes = {"window": {0: "batch"}, "forecast": {0: "batch"}}
        return (window,), (["window"], ["forecast"], axes)
    raise TypeError(f"export: no ONNX signature for {type(model).__name__}")
