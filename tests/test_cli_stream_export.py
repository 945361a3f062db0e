"""`rnnkit stream` and `rnnkit export` on tiny trained runs of each application."""

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from rnnkit.cli import main
from rnnkit.train.classify import vocab_from_state
from rnnkit.train.runs import load_run

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

TINY = ["--hidden", "8", "--max-steps", "2", "--quiet", "--batch-size", "4"]
TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def one_torch_thread():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def run(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def train(tmp_path_factory, name: str, *args) -> object:
    out = tmp_path_factory.mktemp("runs") / name
    result = run("train", *args, "--out", out, *TINY)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("data")
    (directory / "tiny.txt").write_text("to be or not to be, that is the question.\n" * 40)
    rows = ["text,label"] + [
        f"{w}{i},{lab}" for i in range(12) for w, lab in (("cat", "a"), ("dog", "b"))
    ]
    (directory / "pets.csv").write_text("\n".join(rows) + "\n")
    series = ["year,value"] + [f"{1900 + t},{math.sin(t / 2):.4f}" for t in range(80)]
    (directory / "wave.csv").write_text("\n".join(series) + "\n")
    (directory / "tunes.txt").write_text("67:1 69:0.5 71:0.5 72:2 rest:1\n60:1 62:1 64:2\n" * 20)
    return directory


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, data_dir):
    return train(tmp_path_factory, "lm", "lm", "--data", data_dir / "tiny.txt", "--seq-len", "8")


@pytest.fixture(scope="module")
def gru_lm_run(tmp_path_factory, data_dir):
    options = ["--data", data_dir / "tiny.txt", "--seq-len", "8", "--cell", "gru"]
    return train(tmp_path_factory, "gru_lm", "lm", *options)


@pytest.fixture(scope="module")
def music_run(tmp_path_factory, data_dir):
    options = ["--data", data_dir / "tunes.txt", "--seq-len", "8"]
    return train(tmp_path_factory, "music", "music", *options)


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory, data_dir):
    return train(tmp_path_factory, "classify", "classify", "--data", data_dir / "pets.csv")


@pytest.fixture(scope="module")
def bidirectional_run(tmp_path_factory, data_dir):
    data = data_dir / "pets.csv"
    options = ["--data", data, "--bidirectional", "--pooling", "mean", "--cell", "gru"]
    return train(tmp_path_factory, "bi", "classify", *options)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    return train(tmp_path_factory, "digits", "classify", "--data", "digits", "--pooling", "max")


@pytest.fixture(scope="module")
def forecast_run(tmp_path_factory, data_dir):
    return train(tmp_path_factory, "forecast", "forecast", "--data", data_dir / "wave.csv")


def json_lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines()]


def probabilities_of(record: dict) -> dict[str, float]:
    return {entry["prediction"]: entry["probability"] for entry in record["top"]}


def assert_probabilities(record: dict, logits: torch.Tensor, names: list[str]) -> None:
    """Every prediction shown in `record` has the probability softmax(logits) gives it."""
    expected = torch.softmax(logits, dim=-1)
    shown = probabilities_of(record)
    assert shown
    for name, probability in shown.items():
        assert probability == pytest.approx(float(expected[names.index(name)]), abs=1e-6)
    assert list(shown.values()) == sorted(shown.values(), reverse=True)


# -- stream ---------------------------------------------------------------------------------------
def test_stream_lm_predicts_after_each_line_carrying_the_state(lm_run):
    lines = "to be or\n not to b\n\nto be or not to b\n"
    result = run("stream", lm_run, "--json", "--top-k", "4", input=lines)
    assert result.exit_code == 0, result.output
    first, second, reset, again = json_lines(result.output)
    assert reset == {"line": 3, "reset": True}
    assert (first["steps"], second["steps"], again["steps"]) == (8, 17, 17)
    run_ = load_run(lm_run)
    vocab = vocab_from_state({"level": "char", "vocab": run_.state["vocab"]})
    with torch.no_grad():
        logits, _ = run_.model(torch.tensor([vocab.encode("to be or not to b")]))
    names = vocab.tokens
    assert_probabilities(second, logits[0, -1], names)
    # The text fed in two lines and in one line after the reset predicts the same.
    assert probabilities_of(second) == pytest.approx(probabilities_of(again), abs=1e-6)
    assert len(second["top"]) == 4


def test_stream_lm_text_output_shows_quoted_characters(lm_run):
    result = run("stream", lm_run, "--top-k", "2", "--newlines", input="to be\n")
    assert result.exit_code == 0, result.output
    pairs = result.output.strip("\n").split("\t")
    assert len(pairs) == 2
    for pair in pairs:
        token, probability = pair.rsplit(" ", 1)
        assert len(json.loads(token)) == 1 and 0 < float(probability) < 1


def test_stream_music_predicts_the_next_notes(music_run):
    result = run("stream", music_run, "--json", "--top-k", "3", input="67:1 69:0.5\n71:0.5\n")
    assert result.exit_code == 0, result.output
    _, second = json_lines(result.output)
    run_ = load_run(music_run)
    names = [None, None, *run_.state["vocab"]["tokens"]]
    ids = [names.index(token) for token in ("67:1", "69:0.5", "71:0.5")]
    with torch.no_grad():
        logits, _ = run_.model(torch.tensor([ids]))
    assert second["steps"] == 3
    assert_probabilities(second, logits[0, -1], names)


def test_stream_classify_gives_running_class_probabilities(classify_run):
    result = run("stream", classify_run, "--json", input="ca\nt\n")
    assert result.exit_code == 0, result.output
    after_ca, after_cat = json_lines(result.output)
    run_ = load_run(classify_run)
    vocab, classes = vocab_from_state(run_.state), run_.state["classes"]
    with torch.no_grad():
        for record, text in ((after_ca, "ca"), (after_cat, "cat")):
            logits = run_.model(torch.tensor([vocab.encode(text)]))[0]
            assert_probabilities(record, logits, classes)
            assert sum(probabilities_of(record).values()) == pytest.approx(1.0, abs=1e-6)


def test_stream_digits_reads_one_row_of_pixels_per_line(digits_run):
    rows = [[0, 0, 0.5, 1, 1, 0.5, 0, 0], [0, 0.25, 1, 0, 0, 1, 0.25, 0], [0, 1, 0, 0, 0, 0, 1, 0]]
    lines = "\n".join(" ".join(map(str, row)) for row in rows[:2]) + "\n"
    lines += ",".join(map(str, rows[2])) + "\n"
    result = run("stream", digits_run, "--json", "--top-k", "10", input=lines)
    assert result.exit_code == 0, result.output
    records = json_lines(result.output)
    run_ = load_run(digits_run)
    with torch.no_grad():
        logits = run_.model(torch.tensor([rows], dtype=torch.float32))[0]
    assert_probabilities(records[-1], logits, run_.state["classes"])
    bad = run("stream", digits_run, input="0 0 1\n")
    assert bad.exit_code == 2
    assert "line 1: expected 8 numbers" in bad.output


def test_stream_refuses_runs_that_cannot_stream(bidirectional_run, forecast_run):
    bidirectional = run("stream", bidirectional_run, input="cat\n")
    assert bidirectional.exit_code == 2
    assert "bidirectional" in bidirectional.output
    forecast = run("stream", forecast_run, input="1\n")
    assert forecast.exit_code == 2
    assert "`forecast` run" in forecast.output


# -- export ---------------------------------------------------------------------------------------
def export(run_dir, path):
    result = run("export", run_dir, "--onnx", path)
    assert result.exit_code == 0, result.output
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def assert_close(got: np.ndarray, expected: torch.Tensor) -> None:
    np.testing.assert_allclose(got, expected.detach().numpy(), rtol=TOLERANCE, atol=TOLERANCE)


@pytest.mark.parametrize("run_name", ["lm_run", "gru_lm_run"])
def test_export_lm_runs_in_onnxruntime_carrying_its_state(run_name, request, tmp_path):
    run_dir = request.getfixturevalue(run_name)
    session = export(run_dir, tmp_path / "lm.onnx")
    model = load_run(run_dir).model
    torch.manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (3, 11))
    with torch.no_grad():
        logits, final = model(tokens)
    state = model.initial_state(3)
    lstm = isinstance(state, tuple)
    state, final = (state, final) if lstm else ((state,), (final,))
    names = ["h0", "c0"] if lstm else ["h0"]
    pieces = []
    for chunk in (tokens[:, :5], tokens[:, 5:]):  # the state carried from one call to the next
        feeds = {"tokens": chunk.numpy()} | {n: np.asarray(s) for n, s in zip(names, state)}
        chunk_logits, *state = session.run(None, feeds)
        pieces.append(chunk_logits)
    assert_close(np.concatenate(pieces, axis=1), logits)
    assert len(state) == len(final)
    for got, expected in zip(state, final):
        assert_close(got, expected)


def test_export_classifiers_run_in_onnxruntime_with_lengths(
    classify_run, bidirectional_run, tmp_path
):
    for run_dir in (classify_run, bidirectional_run):
        session = export(run_dir, tmp_path / f"{run_dir.name}.onnx")
        model = load_run(run_dir).model
        torch.manual_seed(1)
        tokens = torch.randint(1, model.config.vocab_size, (4, 9))
        lengths = torch.tensor([9, 3, 6, 1])
        with torch.no_grad():
            expected = model(tokens, lengths)
        (logits,) = session.run(None, {"tokens": tokens.numpy(), "lengths": lengths.numpy()})
        assert_close(logits, expected)


def test_export_digit_classifier_and_forecaster(digits_run, forecast_run, tmp_path):
    session = export(digits_run, tmp_path / "digits.onnx")
    model = load_run(digits_run).model
    features = torch.rand(5, 8, 8)
    lengths = torch.full((5,), 8)
    with torch.no_grad():
        expected = model(features, lengths)
    (logits,) = session.run(None, {"features": features.numpy(), "lengths": lengths.numpy()})
    assert_close(logits, expected)

    session = export(forecast_run, tmp_path / "forecast.onnx")
    model = load_run(forecast_run).model
    window = torch.randn(3, model.config.window, model.config.num_channels)
    with torch.no_grad():
        expected = model(window)
    (forecast,) = session.run(None, {"window": window.numpy()})
    assert forecast.shape == (3, model.config.horizon, model.config.num_channels)
    assert_close(forecast, expected)


def test_export_refuses_to_overwrite_without_force(classify_run, tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"keep me")
    refused = run("export", classify_run, "--onnx", path)
    assert refused.exit_code == 2
    assert "--force" in refused.output
    assert path.read_bytes() == b"keep me"
    forced = run("export", classify_run, "--onnx", path, "--force")
    assert forced.exit_code == 0, forced.output
    onnx.checker.check_model(onnx.load(str(path)))
    missing = run("export", classify_run, "--onnx", tmp_path / "absent" / "model.onnx")
    assert missing.exit_code == 2
