"""The compiled Triton kernels on a CUDA device: parity with cuDNN (torch.nn) and the reference.

Skipped without a CUDA device. TF32 is switched off for both sides so float32 parity is tight.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import rnnkit

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip(
        "TRITON_INTERPRET=1 is set: the kernels would be interpreted", allow_module_level=True
    )
pytest.importorskip("triton", reason="Triton is not installed: the gpu kernels cannot run")

CUDA = torch.device("cuda")
TORCH_CELLS = {
    "lstm": lambda **kw: nn.LSTM(**kw),
    "gru": lambda **kw: nn.GRU(**kw),
    "rnn_tanh": lambda **kw: nn.RNN(nonlinearity="tanh", **kw),
    "rnn_relu": lambda **kw: nn.RNN(nonlinearity="relu", **kw),
}
ALL_CELLS = {
    "lstm": (rnnkit.LSTM, {}),
    "gru": (rnnkit.GRU, {}),
    "gru_reset_before": (rnnkit.GRU, {"reset_after": False}),
    "rnn_tanh": (rnnkit.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (rnnkit.RNN, {"nonlinearity": "relu"}),
}
LAYER_NORM_CELLS = {"ln_lstm": (rnnkit.LayerNormLSTM, {}), "ln_gru": (rnnkit.LayerNormGRU, {})}
# (batch, steps, input_size, hidden_size): one tile, several column tiles, several programs.
SIZES = [(1, 5, 3, 8), (5, 7, 4, 33), (37, 4, 6, 130)]


@pytest.fixture(autouse=True)
def exact_float32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def outputs_and_gradients(layer, x, lengths, hx):
    """Output data, final states and the gradients of input, hx and parameters."""
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    output, state = layer(packed, hx)
    states = state if isinstance(state, tuple) else (state,)
    generator = torch.Generator(device=CUDA).manual_seed(1)
    loss = (output.data * torch.randn(output.data.shape, generator=generator, device=CUDA)).sum()
    for part in states:
        loss = loss + (part * torch.randn(part.shape, generator=generator, device=CUDA)).sum()
    hx_parts = list(hx) if isinstance(hx, tuple) else [hx]
    grads = torch.autograd.grad(loss, [x, *hx_parts, *layer.parameters()])
    return [output.data, *states, *grads]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("cell", TORCH_CELLS)
def test_packed_bidirectional_two_layers_match_cudnn(cell, size):
    batch, steps, inputs, hidden = size
    torch.manual_seed(0)
    options = {"input_size": inputs, "hidden_size": hidden, "num_layers": 2}
    theirs = TORCH_CELLS[cell](**options, bidirectional=True, batch_first=True).to(CUDA)
    mine = rnnkit.from_torch(theirs, backend="gpu")
    x = torch.randn(batch, steps, inputs, device=CUDA, requires_grad=True)
    lengths = torch.randint(1, steps + 1, (batch,))
    lengths[0] = steps
    make = lambda: torch.randn(4, batch, hidden, device=CUDA, requires_grad=True)  # noqa: E731
    hx = (make(), make()) if cell == "lstm" else make()
    got = outputs_and_gradients(mine, x, lengths, hx)
    expected = outputs_and_gradients(theirs, x, lengths, hx)
    for index, (a, b) in enumerate(zip(got, expected)):
        assert torch.allclose(a, b, atol=2e-4, rtol=2e-4), (index, (a - b).abs().max())


@pytest.mark.parametrize("cell", [*ALL_CELLS, *LAYER_NORM_CELLS])
def test_matches_reference_float64(cell):
    layer_class, cell_options = (ALL_CELLS | LAYER_NORM_CELLS)[cell]
    torch.manual_seed(0)
    options = {"input_size": 5, "hidden_size": 70, "bidirectional": True, "dtype": torch.float64}
    mine = layer_class(**options, **cell_options, backend="gpu", device=CUDA)
    reference = layer_class(**options, **cell_options, backend="reference", device=CUDA)
    reference.load_state_dict(mine.state_dict())
    x = torch.randn(20, 6, 5, dtype=torch.float64, device=CUDA, requires_grad=True)
    lengths = torch.tensor([6, 1, 3] * 6 + [2, 5])
    results = []
    for layer in (mine, reference):
        output, state = layer(x.transpose(0, 1), lengths=lengths)
        states = state if isinstance(state, tuple) else (state,)
        loss = output.square().sum() + sum(part.sum() for part in states)
        results.append([output, *states, *torch.autograd.grad(loss, [x, *layer.parameters()])])
    for index, (a, b) in enumerate(zip(*results)):
        assert torch.allclose(a, b, atol=1e-9, rtol=1e-9), (index, (a - b).abs().max())


@pytest.mark.parametrize("cell", ALL_CELLS)
def test_gradcheck_float64(cell):
    from rnnkit.kernels.gpu import gru, lstm, rnn

    if cell == "lstm":
        run_direction, options, gates = lstm.run_direction, {}, 4
    elif cell.startswith("gru"):
        run_direction, options, gates = gru.run_direction, {"reset_after": cell == "gru"}, 3
    else:
        run_direction, options, gates = rnn.run_direction, {"nonlinearity": cell[4:]}, 1
    hidden, inputs = 3, 2
    torch.manual_seed(2)
    make = lambda *shape: torch.randn(  # noqa: E731
        *shape, dtype=torch.float64, device=CUDA, requires_grad=True
    )
    x = make(4, 3, inputs)
    state = (make(3, hidden), make(3, hidden)) if cell == "lstm" else (make(3, hidden),)
    weights = (make(gates * hidden, inputs), make(gates * hidden, hidden))
    weights += (make(gates * hidden), make(gates * hidden))
    lengths = torch.tensor([2, 4, 3])
    extra = (None,) if cell == "lstm" else ()

    for reverse in (False, True):

        def function(x, *tensors, reverse=reverse):
            state_part, weight_part = tensors[: len(state)], tensors[len(state) :]
            output, final = run_direction(
                x, state_part, (*weight_part, *extra), lengths, reverse, **options
            )
            return (output, *final)

        assert torch.autograd.gradcheck(function, (x, *state, *weights))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cell", [*ALL_CELLS, *LAYER_NORM_CELLS])
def test_autocast_runs_in_low_precision_close_to_float32(cell, dtype):
    layer_class, cell_options = (ALL_CELLS | LAYER_NORM_CELLS)[cell]
    torch.manual_seed(0)
    layer = layer_class(8, 64, **cell_options, backend="gpu", device=CUDA)
    x = torch.randn(10, 4, 8, device=CUDA)
    expected, _ = layer(x)
    with torch.autocast("cuda", dtype=dtype):
        output, _ = layer(x)
    assert output.dtype == dtype
    assert torch.allclose(output.float(), expected, atol=5e-2)
    output.float().sum().backward()
    for parameter in layer.parameters():
        assert parameter.grad.dtype == torch.float32
        assert torch.isfinite(parameter.grad).all()


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_autocast_takes_an_input_already_in_low_precision(cell):
    # An autocast op upstream gives the layer a bfloat16 input beside float32 weights, and a
    # float32 initial state: the layer takes them as torch.nn's does.
    layer_class, cell_options = ALL_CELLS[cell]
    torch.manual_seed(0)
    layer = layer_class(8, 64, **cell_options, backend="gpu", device=CUDA)
    projection = torch.nn.Linear(8, 8, device=CUDA)
    x = torch.randn(10, 4, 8, device=CUDA)
    h0 = torch.randn(1, 4, 64, device=CUDA)
    hx = (h0, torch.randn(1, 4, 64, device=CUDA)) if cell == "lstm" else h0
    expected, _ = layer(projection(x), hx)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        source = projection(x)
        output, _ = layer(source, hx)
    assert source.dtype == torch.bfloat16
    assert output.dtype == torch.bfloat16
    assert torch.allclose(output.float(), expected, atol=5e-2)
    output.float().sum().backward()
    assert all(
        torch.isfinite(p.grad).all() for p in [*layer.parameters(), *projection.parameters()]
    )


def test_auto_picks_the_gpu_kernel_for_cuda_tensors():
    for layer_class in (rnnkit.LSTM, rnnkit.LayerNormLSTM, rnnkit.LayerNormGRU):
        layer = layer_class(3, 4, device=CUDA)
        text = rnnkit.explain_backend(layer, torch.randn(2, 1, 3, device=CUDA))
        assert text == "auto: fused gpu kernel for cuda tensors"


@pytest.mark.parametrize("cell", ALL_CELLS)
def test_hidden_units_split_over_programs_match_one_program_per_tile(cell, monkeypatch):
    from rnnkit.kernels.gpu import _common

    layer_class, cell_options = ALL_CELLS[cell]
    torch.manual_seed(0)
    layer = layer_class(16, 256, **cell_options, backend="gpu", device=CUDA)
    x = torch.randn(300, 4, 16, device=CUDA, requires_grad=True)
    grid, options, _ = _common.plan_launch(4, 256, x.device)
    assert options["SPLIT"] and grid[1] > 1, (grid, options)
    results = []
    for split in (True, False):
        monkeypatch.setattr(_common, "SPLIT_HIDDEN", split)
        output, _ = layer(x)
        grads = torch.autograd.grad(output.square().sum(), [x, *layer.parameters()])
        results.append([output, *grads])
    for index, (a, b) in enumerate(zip(*results)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (index, (a - b).abs().max())


ON_CHIP_KERNELS = {  # what each cell runs where its weights fit on chip: forward, backward
    "rnn_tanh": ("rnn_resident_forward_kernel", "rnn_resident_backward_kernel"),
    "rnn_relu": ("rnn_resident_forward_kernel", "rnn_resident_backward_kernel"),
    "lstm": ("lstm_slice_forward_kernel", "lstm_slice_backward_kernel"),
    "gru": ("gru_slice_forward_kernel", "gru_slice_backward_kernel"),
}


@pytest.mark.parametrize("hidden", [20, 100])
@pytest.mark.parametrize("cell", ON_CHIP_KERNELS)
def test_on_chip_and_split_kernels_match_reference_float64(cell, hidden, monkeypatch):
    # hidden 100: four 32-unit slice programs (the last one partly padding) meeting at barriers
    from rnnkit.kernels.gpu import _common, gru, lstm, rnn

    launched = []
    launch = _common.launch_if_it_fits

    def spy(kernel, *args, **kwargs):
        ran = launch(kernel, *args, **kwargs)
        launched.append((_common.kernel_name(kernel), ran))
        return ran

    for module in (rnn, lstm, gru):
        monkeypatch.setattr(module, "launch_if_it_fits", spy)
    layer_class, cell_options = ALL_CELLS[cell]
    torch.manual_seed(0)
    options = {**cell_options, "bidirectional": True, "device": CUDA, "dtype": torch.float64}
    fused = layer_class(5, hidden, backend="gpu", **options)
    reference = layer_class(5, hidden, backend="reference", **options)
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(37, 40, 5, device=CUDA, dtype=torch.float64, requires_grad=True)
    make = lambda: torch.randn(  # noqa: E731
        2, 37, hidden, device=CUDA, dtype=torch.float64, requires_grad=True
    )
    hx = (make(), make()) if cell == "lstm" else make()
    lengths = torch.randint(1, 41, (37,))
    expected = outputs_and_gradients(reference, x, lengths, hx)
    got = outputs_and_gradients(fused, x, lengths, hx)
    assert sorted(set(launched)) == sorted((name, True) for name in ON_CHIP_KERNELS[cell])
    monkeypatch.setattr(rnn, "RESIDENT_MAX_BYTES", 0)
    monkeypatch.setattr(_common, "SLICE_MAX_HIDDEN", 0)
    launched.clear()
    split = outputs_and_gradients(fused, x, lengths, hx)
    assert launched == []
    for index, (a, b, c) in enumerate(zip(got, split, expected)):
        assert torch.allclose(a, c, atol=1e-9, rtol=1e-9), ("on chip", index, (a - c).abs().max())
        assert torch.allclose(b, c, atol=1e-9, rtol=1e-9), ("split", index, (b - c).abs().max())


@pytest.mark.parametrize(
    "layer_class, mode",
    [
        (rnnkit.MinGRU, "parallel"),
        (rnnkit.MinGRU, "sequential"),
        (rnnkit.MinLSTM, "parallel"),
        (rnnkit.MinLSTM, "sequential"),
        (rnnkit.IndRNN, None),
    ],
)
def test_element_wise_walks_match_reference_float64_on_cuda(layer_class, mode):
    torch.manual_seed(0)
    options = {"num_layers": 2, "bidirectional": True, "device": CUDA, "dtype": torch.float64}
    fused = layer_class(3, 130, **options)
    reference = layer_class(3, 130, backend="reference", **options)
    reference.load_state_dict(fused.state_dict())
    assert rnnkit.explain_backend(
        fused, torch.randn(2, 1, 3, device=CUDA, dtype=torch.float64)
    ) == ("auto: fused gpu kernel for cuda tensors")
    x = torch.randn(9, 37, 3, device=CUDA, dtype=torch.float64, requires_grad=True)
    lengths = torch.randint(1, 10, (37,))
    results = []
    for layer in (fused, reference):
        modes = {} if mode is None else {"mode": mode}
        output, h_n = layer(x, lengths=lengths, **modes)
        loss = (output * torch.cos(output)).sum() + (h_n * h_n).sum()
        results.append([output, h_n, *torch.autograd.grad(loss, [x, *layer.parameters()])])
    for got, expected in zip(*results):
        assert torch.allclose(got, expected, atol=1e-9, rtol=1e-9), (got - expected).abs().max()


def test_resident_kernel_out_of_shared_memory_falls_back_to_split(monkeypatch):
    # 256 x 256 float32 needs about 272 KiB of shared memory, more than a Hopper multiprocessor
    # has: the launch fails, is remembered, and the split kernels run instead.
    from rnnkit.kernels.gpu import _common, rnn

    monkeypatch.setattr(rnn, "RESIDENT_MAX_BYTES", 1 << 20)
    monkeypatch.setattr(_common, "OUT_OF_RESOURCES", set())
    monkeypatch.setattr(rnn, "OUT_OF_RESOURCES", _common.OUT_OF_RESOURCES)
    torch.manual_seed(0)
    fused = rnnkit.RNN(4, 256, backend="gpu", device=CUDA)
    reference = rnnkit.RNN(4, 256, backend="reference", device=CUDA)
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(20, 3, 4, device=CUDA, requires_grad=True)
    got, _ = fused(x)
    expected, _ = reference(x)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert (x.device, torch.float32, "rnn_resident_forward_kernel", 256, 256) in (
        _common.OUT_OF_RESOURCES
    )


@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "gru", "ln_lstm", "ln_gru"])
def test_regularized_kernels_match_the_reference_float64(cell):
    # hidden 100: the LSTM's and GRU's slices over four programs, the RNN's resident kernel;
    # the layer-normalised cells' kernels, four unit tiles
    layer_class, cell_options = (ALL_CELLS | LAYER_NORM_CELLS)[cell]
    two_states = cell in ("lstm", "ln_lstm")
    zoneout = (0.2, 0.4) if two_states else 0.2
    options = {**cell_options, "bidirectional": True, "device": CUDA, "dtype": torch.float64}
    options |= {"recurrent_dropout": 0.35, "zoneout": zoneout}
    torch.manual_seed(0)
    fused = layer_class(5, 100, backend="gpu", **options)
    reference = layer_class(5, 100, backend="reference", **options)
    reference.load_state_dict(fused.state_dict())
    assert rnnkit.explain_backend(
        fused, torch.randn(3, 2, 5, device=CUDA, dtype=torch.float64)
    ) == ("backend='gpu' was requested")
    x = torch.randn(37, 40, 5, device=CUDA, dtype=torch.float64, requires_grad=True)
    make = lambda: torch.randn(  # noqa: E731
        2, 37, 100, device=CUDA, dtype=torch.float64, requires_grad=True
    )
    hx = (make(), make()) if two_states else make()
    lengths = torch.randint(1, 41, (37,))
    results = []
    for layer in (fused, reference):
        torch.manual_seed(5)  # the same masks: both draw them in the same order
        results.append(outputs_and_gradients(layer, x, lengths, hx))
    for index, (a, b) in enumerate(zip(*results)):
        assert torch.allclose(a, b, atol=1e-9, rtol=1e-9), (index, (a - b).abs().max())
