"""ONNX export: the file passes onnx.checker and onnxruntime reproduces PyTorch's outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import rnnkit
from rnnkit.export import export_onnx

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

TOLERANCE = 1e-5
KINDS = {
    "rnn_tanh": lambda **kw: rnnkit.RNN(4, 6, **kw),
    "rnn_relu": lambda **kw: rnnkit.RNN(4, 6, nonlinearity="relu", **kw),
    "lstm": lambda **kw: rnnkit.LSTM(4, 6, **kw),
    "gru": lambda **kw: rnnkit.GRU(4, 6, **kw),
    "gru_reset_before": lambda **kw: rnnkit.GRU(4, 6, reset_after=False, **kw),
}
OPERATOR = {
    "rnn_tanh": "RNN",
    "rnn_relu": "RNN",
    "lstm": "LSTM",
    "gru": "GRU",
    "gru_reset_before": "GRU",
}


def export_and_load(module: nn.Module, example, path, **options):
    """(checked ONNX model, onnxruntime session) of `module` exported at `path`."""
    written = export_onnx(module, example, path, **options)
    model = onnx.load(str(written))
    onnx.checker.check_model(model, full_check=True)
    session = onnxruntime.InferenceSession(str(written), providers=["CPUExecutionProvider"])
    return model, session


def flat_outputs(result) -> list[Tensor]:
    output, state = result
    return [output, *state] if isinstance(state, tuple) else [output, state]


def assert_matches(session, feeds: dict[str, Tensor], expected: list[Tensor]) -> None:
    got = session.run(None, {name: value.numpy() for name, value in feeds.items()})
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e.detach().numpy(), rtol=TOLERANCE, atol=TOLERANCE)


def operators(model) -> list[str]:
    return [node.op_type for node in model.graph.node]


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_stacked_layers_export_as_one_operator_per_layer(tmp_path, kind, bidirectional):
    torch.manual_seed(0)
    layer = KINDS[kind](num_layers=2, bidirectional=bidirectional)
    model, session = export_and_load(layer, torch.randn(5, 2, 4), tmp_path / "layer.onnx")
    assert operators(model).count(OPERATOR[kind]) == 2
    assert not {"MatMul", "Gemm", "Loop", "Scan"} & set(operators(model))
    x = torch.randn(9, 3, 4)  # other time and batch sizes than the example's
    with torch.no_grad():
        expected = flat_outputs(layer(x))
    assert_matches(session, {"input": x}, expected)


@pytest.mark.parametrize("kind", list(KINDS))
def test_initial_states_and_lengths_are_graph_inputs(tmp_path, kind):
    torch.manual_seed(1)
    layer = KINDS[kind](num_layers=2, bidirectional=True, batch_first=True)
    state_shape = (4, 3, 6)
    hx = (
        (torch.randn(state_shape), torch.randn(state_shape))
        if kind == "lstm"
        else torch.randn(state_shape)
    )
    x = torch.randn(3, 8, 4)
    lengths = torch.tensor([8, 2, 5])
    model, session = export_and_load(layer, (x, hx), tmp_path / "layer.onnx", lengths=lengths)
    assert {"h0", "lengths"} <= {value.name for value in model.graph.input}
    with torch.no_grad():
        expected = flat_outputs(layer(x, hx, lengths=lengths))
    feeds = {"input": x, "lengths": lengths}
    if kind == "lstm":
        feeds["h0"], feeds["c0"] = hx
    else:
        feeds["h0"] = hx
    assert_matches(session, feeds, expected)


def test_gru_reset_forms_map_to_linear_before_reset(tmp_path):
    for reset_after, expected in ((True, 1), (False, 0)):
        model, _ = export_and_load(
            rnnkit.GRU(4, 6, reset_after=reset_after), torch.randn(3, 1, 4), tmp_path / "gru.onnx"
        )
        (node,) = [node for node in model.graph.node if node.op_type == "GRU"]
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attributes.get("linear_before_reset", 0) == expected


def test_lengths_true_adds_a_dynamic_lengths_input(tmp_path):
    torch.manual_seed(2)
    layer = rnnkit.LSTM(4, 6, bidirectional=True)
    _, session = export_and_load(layer, torch.randn(6, 2, 4), tmp_path / "lstm.onnx", lengths=True)
    x, lengths = torch.randn(10, 4, 4), torch.tensor([10, 1, 7, 3])
    with torch.no_grad():
        expected = flat_outputs(layer(x, lengths=lengths))
    assert_matches(session, {"input": x, "lengths": lengths}, expected)


def test_unbatched_input_exports(tmp_path):
    torch.manual_seed(3)
    layer = rnnkit.GRU(4, 6, num_layers=2)
    _, session = export_and_load(layer, torch.randn(5, 4), tmp_path / "gru.onnx")
    x = torch.randn(7, 4)
    with torch.no_grad():
        expected = flat_outputs(layer(x))
    assert_matches(session, {"input": x}, expected)


def test_projected_lstm_exports_as_an_unrolled_graph(tmp_path):
    torch.manual_seed(4)
    layer = rnnkit.LSTM(4, 6, num_layers=2, proj_size=3, bidirectional=True)
    x, lengths = torch.randn(6, 3, 4), torch.tensor([6, 2, 4])
    model, session = export_and_load(layer, x, tmp_path / "proj.onnx", lengths=lengths)
    assert "LSTM" not in operators(model) and "MatMul" in operators(model)
    for batch_lengths in (lengths, torch.tensor([1, 6, 6, 3])):
        batch_x = torch.randn(6, len(batch_lengths), 4)
        with torch.no_grad():
            expected = flat_outputs(layer(batch_x, lengths=batch_lengths))
        assert_matches(session, {"input": batch_x, "lengths": batch_lengths}, expected)


class TinyTagger(nn.Module):
    """Embedding -> bidirectional rnnkit GRU -> linear: a model that contains a layer."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(20, 4)
        self.rnn = rnnkit.GRU(4, 6, batch_first=True, bidirectional=True, dropout=0.5, num_layers=2)
        self.head = nn.Linear(12, 3)

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        output, _ = self.rnn(self.embedding(tokens), lengths=lengths)
        return self.head(output)


def test_modules_containing_layers_export_with_their_layers_as_operators(tmp_path):
    torch.manual_seed(5)
    model = TinyTagger()
    model.train()
    tokens, lengths = torch.randint(0, 20, (3, 7)), torch.tensor([7, 4, 1])
    exported, session = export_and_load(
        model,
        (tokens, lengths),
        tmp_path / "tagger.onnx",
        input_names=["tokens", "lengths"],
        output_names=["logits"],
        dynamic_axes={"tokens": {0: "batch", 1: "time"}, "lengths": {0: "batch"}},
    )
    assert model.training, "export must restore the training flag"
    assert operators(exported).count("GRU") == 2
    tokens, lengths = torch.randint(0, 20, (2, 9)), torch.tensor([3, 9])
    model.eval()
    with torch.no_grad():
        expected = model(tokens, lengths)
    assert_matches(session, {"tokens": tokens, "lengths": lengths}, [expected])
    assert "forward" not in vars(model.rnn), "the export hook must be removed"


def test_bad_arguments_are_rejected(tmp_path):
    layer = rnnkit.GRU(4, 6)
    with pytest.raises(ValueError, match="opset"):
        export_onnx(layer, torch.randn(3, 1, 4), tmp_path / "a.onnx", opset=3)
    with pytest.raises(ValueError, match="rnnkit RNN/LSTM/GRU"):
        export_onnx(nn.Linear(4, 2), torch.randn(3, 4), tmp_path / "a.onnx")
    with pytest.raises(TypeError, match="example_input"):
        export_onnx(layer, [1, 2], tmp_path / "a.onnx")
    assert not list(tmp_path.iterdir()), "a failed export must leave no file behind"
