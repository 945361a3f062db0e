"""Stream: chunked stepping equals the whole sequence, state save/load, constant memory."""

from __future__ import annotations

import os
import resource

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

import rnnkit
from rnnkit.stream import Stream

LAYERS = [
    ("rnn_tanh", lambda **kw: rnnkit.RNN(3, 5, **kw)),
    ("rnn_relu", lambda **kw: rnnkit.RNN(3, 5, nonlinearity="relu", **kw)),
    ("lstm", lambda **kw: rnnkit.LSTM(3, 5, **kw)),
    ("lstm_proj", lambda **kw: rnnkit.LSTM(3, 5, proj_size=2, **kw)),
    ("gru", lambda **kw: rnnkit.GRU(3, 5, **kw)),
    ("gru_reset_before", lambda **kw: rnnkit.GRU(3, 5, reset_after=False, **kw)),
]


def random_chunk_sizes(total: int, generator: torch.Generator) -> list[int]:
    sizes = []
    while sum(sizes) < total:
        sizes.append(min(int(torch.randint(1, 6, (1,), generator=generator)), total - sum(sizes)))
    return sizes


def assert_states_close(got, expected, tol: float) -> None:
    got = got if isinstance(got, tuple) else (got,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=tol, atol=tol)


@pytest.mark.parametrize("name,make", LAYERS, ids=[name for name, _ in LAYERS])
@pytest.mark.parametrize("batch_first", [False, True])
def test_chunked_steps_match_whole_sequence(name, make, batch_first):
    torch.manual_seed(0)
    layer = make(num_layers=2, batch_first=batch_first, dtype=torch.float64)
    steps, batch = 23, 3
    x = torch.randn(batch, steps, 3, dtype=torch.float64)
    x_layer = x if batch_first else x.transpose(0, 1)
    expected_output, expected_state = layer(x_layer)
    time_dim = 1 if batch_first else 0
    stream = Stream(layer)
    outputs, start = [], 0
    for size in random_chunk_sizes(steps, torch.Generator().manual_seed(1)):
        outputs.append(stream.step(x_layer.narrow(time_dim, start, size)))
        start += size
    torch.testing.assert_close(torch.cat(outputs, time_dim), expected_output, rtol=0, atol=1e-10)
    assert_states_close(stream.state, expected_state, 1e-10)
    assert stream.steps == steps


@pytest.mark.parametrize("name,make", LAYERS, ids=[name for name, _ in LAYERS])
def test_single_steps_match_whole_sequence(name, make):
    # One step per call takes the stream's own path through the cell equations.
    torch.manual_seed(2)
    layer = make(num_layers=3, batch_first=True, dtype=torch.float64)
    x = torch.randn(2, 9, 3, dtype=torch.float64)
    expected_output, expected_state = layer(x)
    stream = Stream(layer)
    outputs = [stream.step(x[:, t : t + 1]) for t in range(9)]
    torch.testing.assert_close(torch.cat(outputs, 1), expected_output, rtol=0, atol=1e-10)
    assert_states_close(stream.state, expected_state, 1e-10)
    unbatched = Stream(layer)
    outputs = [unbatched.step(x[0, t : t + 1]) for t in range(9)]
    torch.testing.assert_close(torch.cat(outputs), expected_output[0], rtol=0, atol=1e-10)


def test_single_steps_follow_weight_changes_and_keep_the_layers_errors():
    torch.manual_seed(3)
    layer = rnnkit.LSTM(3, 4, dtype=torch.float64)
    x = torch.randn(6, 1, 3, dtype=torch.float64)
    stream = Stream(layer)
    for t in range(3):
        stream.step(x[t : t + 1])
    with torch.no_grad():
        layer.weight_hh_l0.mul_(0.5)
    layer.bias_ih_l0 = nn.Parameter(torch.randn(16, dtype=torch.float64))
    state = tuple(part.clone() for part in stream.state)
    expected, _ = layer(x[3:], state)
    outputs = [stream.step(x[t : t + 1]) for t in range(3, 6)]
    torch.testing.assert_close(torch.cat(outputs), expected, rtol=0, atol=1e-10)
    with pytest.raises(TypeError, match="dtype"):
        stream.step(x[:1].float())
    with pytest.raises(ValueError, match="input_size"):
        stream.step(torch.randn(1, 1, 5, dtype=torch.float64))


def test_unbatched_chunks_match_whole_sequence():
    torch.manual_seed(0)
    layer = rnnkit.GRU(3, 4, num_layers=3, dtype=torch.float64)
    x = torch.randn(17, 3, dtype=torch.float64)
    expected_output, expected_state = layer(x)
    stream = Stream(layer)
    outputs = [stream.step(x[start : start + 4]) for start in range(0, 17, 4)]
    torch.testing.assert_close(torch.cat(outputs), expected_output, rtol=0, atol=1e-10)
    torch.testing.assert_close(stream.state, expected_state, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="2-D"):
        stream.step(x[None, :2])


def test_reset_starts_a_new_sequence():
    torch.manual_seed(0)
    layer = rnnkit.LSTM(3, 4, dtype=torch.float64)
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    stream = Stream(layer)
    first = stream.step(x)
    stream.step(x)
    stream.reset()
    assert stream.state is None and stream.steps == 0
    torch.testing.assert_close(stream.step(x), first, rtol=0, atol=0)


def test_runs_under_inference_mode_by_default_and_detaches_otherwise():
    layer = rnnkit.GRU(3, 4)
    x = torch.randn(5, 2, 3)
    output = Stream(layer).step(x)
    assert output.is_inference() and not output.requires_grad
    training_stream = Stream(layer, inference=False)
    output = training_stream.step(x)
    assert output.requires_grad
    assert not training_stream.state.requires_grad


@pytest.mark.parametrize(
    "make", [lambda: rnnkit.LSTM(3, 4, num_layers=2), lambda: rnnkit.RNN(3, 4)]
)
def test_saved_state_resumes_identically_in_a_new_stream(tmp_path, make):
    torch.manual_seed(0)
    layer = make().double()
    x = torch.randn(12, 2, 3, dtype=torch.float64)
    whole, _ = layer(x)
    stream = Stream(layer)
    head = stream.step(x[:5])
    path = stream.save(tmp_path / "session" / "state.safetensors")
    assert path.is_file() and not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    resumed = Stream(layer)
    resumed.load(path)
    assert resumed.steps == 5
    tail = resumed.step(x[5:])
    torch.testing.assert_close(torch.cat([head, tail]), whole, rtol=0, atol=1e-10)
    torch.testing.assert_close(tail, stream.step(x[5:]), rtol=0, atol=0)


def test_load_rejects_a_state_of_another_shape_or_dtype(tmp_path):
    stream = Stream(rnnkit.LSTM(3, 4, num_layers=2))
    stream.step(torch.randn(2, 1, 3))
    path = stream.save(tmp_path / "state.safetensors")
    with pytest.raises(ValueError, match=r"shape \(2, 1, 5\).*got shape \(2, 1, 4\)"):
        Stream(rnnkit.LSTM(3, 5, num_layers=2)).load(path)
    with pytest.raises(ValueError, match="dtype torch.float64"):
        Stream(rnnkit.LSTM(3, 4, num_layers=2).double()).load(path)
    with pytest.raises(ValueError, match="must hold"):
        Stream(rnnkit.GRU(3, 4, num_layers=2)).load(path)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="format"):
        stream.load(foreign)
    with pytest.raises(ValueError, match="no state to save"):
        Stream(rnnkit.GRU(3, 4)).save(tmp_path / "empty.safetensors")


def test_bidirectional_layers_cannot_stream():
    with pytest.raises(ValueError, match="bidirectional"):
        Stream(rnnkit.GRU(3, 4, bidirectional=True))


def test_rejects_modules_without_the_protocol():
    with pytest.raises(TypeError, match="stream_step"):
        Stream(nn.Linear(3, 4))


class RunningMean(nn.Module):
    """A module that speaks the protocol with a nested state: running sum and count."""

    def initial_state(self, batch_size: int) -> dict:
        return {"sum": torch.zeros(batch_size, 2), "count": (torch.zeros(batch_size, 1),)}

    def stream_step(self, chunk: Tensor, state: dict) -> tuple[Tensor, dict]:
        total = state["sum"] + chunk.sum(1)
        count = state["count"][0] + chunk.size(1)
        return total / count, {"sum": total, "count": (count,)}


def test_protocol_modules_stream_and_save_nested_states(tmp_path):
    x = torch.randn(3, 10, 2)
    stream = Stream(RunningMean())
    stream.step(x[:, :4])
    path = stream.save(tmp_path / "mean.safetensors")
    resumed = Stream(RunningMean())
    resumed.load(path)
    torch.testing.assert_close(resumed.step(x[:, 4:]), x.mean(1))
    assert resumed.steps == 10
    with pytest.raises(ValueError, match="must hold"):
        Stream(rnnkit.GRU(2, 2)).load(path)


def resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as file:
            return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def test_hundred_thousand_steps_run_in_constant_memory():
    # 100k time steps, half as single steps (the stream's own one-step path) and half in
    # chunks of 10 through the layer: 100k layer calls of one step would take ~30 s here.
    torch.manual_seed(0)
    stream = Stream(rnnkit.LSTM(4, 16))
    chunk, steps = torch.randn(10, 1, 4), torch.randn(5_000, 1, 1, 4)

    def block() -> None:
        for _ in range(500):
            stream.step(chunk)
        for step in steps:
            stream.step(step)

    block()
    state_shapes = [tuple(part.shape) for part in stream.state]
    state_bytes = sum(part.numel() * part.element_size() for part in stream.state)
    baseline = resident_bytes()
    for _ in range(9):
        block()
        assert [tuple(part.shape) for part in stream.state] == state_shapes
        assert sum(part.numel() * part.element_size() for part in stream.state) == state_bytes
    assert stream.steps == 100_000
    growth = resident_bytes() - baseline
    assert growth < 4 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MiB over 90k steps"


@pytest.mark.parametrize(
    "make",
    [
        lambda: rnnkit.LayerNormLSTM(3, 5, num_layers=2),
        lambda: rnnkit.LayerNormGRU(3, 5, num_layers=2),
        lambda: rnnkit.LSTM(3, 5, zoneout=(0.3, 0.1)),
        lambda: rnnkit.GRU(3, 5, zoneout=0.2),
    ],
)
def test_layer_norm_and_zoneout_layers_stream_like_their_whole_sequence(make):
    torch.manual_seed(0)
    layer = make().double().eval()
    x = torch.randn(9, 2, 3, dtype=torch.float64)
    expected, _ = layer(x)
    stream = Stream(layer)
    outputs = [stream.step(x[t : t + 1]) for t in range(x.size(0))]
    torch.testing.assert_close(torch.cat(outputs), expected, rtol=0, atol=1e-12)
