"""The Triton kernels, run by Triton's interpreter on CPU tensors, against the reference loop.

Triton decides when a function is decorated whether it is interpreted, its own library included,
so TRITON_INTERPRET=1 must be set before triton is first imported in this process. This module
sets it while importing triton and the kernels, restores it, and sets it again while its own tests
run (the backend reads it per call). Where a CUDA device is present the compiled kernels are
tested by test_cuda.py instead: one process cannot hold both kinds of kernel.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnnkit

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed: the gpu kernels cannot run", allow_module_level=True)
if torch.cuda.is_available():
    pytest.skip(
        "a CUDA device is present: the compiled kernels are tested by test_cuda.py",
        allow_module_level=True,
    )
if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip(
        "triton was imported in this process before TRITON_INTERPRET=1 could be set",
        allow_module_level=True,
    )
_previous = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    import triton
    import triton.language as tl

    from rnnkit.kernels.gpu import _common, gru, layer_norm, lstm, minimal, rnn

    @triton.jit
    def step_tiles_kernel(source_ptr, lengths_ptr, out_ptr, T, B, H, REVERSE: tl.constexpr):
        """out[s + 1] = step_tile(source, s) for s in -1 .. T (16 x 16 tiles)."""
        rows = tl.arange(0, 16)
        cols = tl.arange(0, 16)
        mask = (rows < B)[:, None] & (cols < H)[None, :]
        lengths = tl.load(lengths_ptr + rows, mask=rows < B, other=0)
        for index in range(T + 2):
            tile = _common.step_tile(
                source_ptr, index - 1, T, lengths, rows, cols, mask, B, H, REVERSE
            )
            tl.store(out_ptr + (index * B + rows)[:, None] * H + cols[None, :], tile, mask=mask)
finally:
    if _previous is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _previous

CELLS = {
    "lstm": (rnnkit.LSTM, {}),
    "gru": (rnnkit.GRU, {}),
    "gru_reset_before": (rnnkit.GRU, {"reset_after": False}),
    "rnn_tanh": (rnnkit.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (rnnkit.RNN, {"nonlinearity": "relu"}),
}


@pytest.fixture(scope="module", autouse=True)
def interpreter():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        yield


def make_pair(cell: str, dtype: torch.dtype, **options):
    """The same layer twice: on the gpu kernels and on the reference loop."""
    layer_class, cell_options = CELLS[cell]
    torch.manual_seed(0)
    fused = layer_class(dtype=dtype, backend="gpu", **cell_options, **options)
    reference = layer_class(dtype=dtype, backend="reference", **cell_options, **options)
    reference.load_state_dict(fused.state_dict())
    return fused, reference


def run_and_differentiate(layer, x, hx, lengths=None):
    """Output, final state and the gradients of a random projection of both."""
    output, state = layer(x, hx, lengths=lengths) if lengths is not None else layer(x, hx)
    states = state if isinstance(state, tuple) else (state,)
    generator = torch.Generator().manual_seed(1)
    loss = (output * torch.randn(output.shape, generator=generator, dtype=output.dtype)).sum()
    for part in states:
        loss = loss + (part * torch.randn(part.shape, generator=generator, dtype=part.dtype)).sum()
    inputs = [
        x,
        *(hx if isinstance(hx, tuple) else (hx,) if hx is not None else ()),
        *layer.parameters(),
    ]
    grads = torch.autograd.grad(loss, inputs)
    return [output, *states, *grads]


def assert_all_close(got, expected, tolerance):
    assert len(got) == len(expected)
    for index, (a, b) in enumerate(zip(got, expected)):
        assert a.shape == b.shape, index
        assert torch.allclose(a, b, atol=tolerance, rtol=tolerance), (index, (a - b).abs().max())


def initial_state(cell: str, shape, dtype):
    make = lambda: torch.randn(shape, dtype=dtype, requires_grad=True)  # noqa: E731
    return (make(), make()) if cell == "lstm" else make()


@pytest.mark.parametrize("cell", CELLS)
def test_bidirectional_with_lengths_and_hx_matches_reference_float64(cell):
    fused, reference = make_pair(
        cell, torch.float64, input_size=4, hidden_size=6, bidirectional=True
    )
    x = torch.randn(4, 3, 4, dtype=torch.float64, requires_grad=True)
    hx = initial_state(cell, (2, 3, 6), torch.float64)
    lengths = torch.tensor([3, 4, 1])
    got = run_and_differentiate(fused, x, hx, lengths)
    expected = run_and_differentiate(reference, x, hx, lengths)
    assert_all_close(got, expected, 1e-9)
    assert got[0][3:, 0].abs().max() == 0 and got[0][1:, 2].abs().max() == 0


@pytest.mark.parametrize("cell", CELLS)
def test_float32_batch_first_without_bias_matches_reference(cell):
    options = {"input_size": 3, "hidden_size": 16, "bias": False, "batch_first": True}
    fused, reference = make_pair(cell, torch.float32, **options)
    x = torch.randn(3, 6, 3, requires_grad=True)
    got = run_and_differentiate(fused, x, None)
    expected = run_and_differentiate(reference, x, None)
    assert_all_close(got, expected, 1e-4)
    with torch.no_grad():
        inference_output, _ = fused(x)
    assert torch.allclose(inference_output, expected[0], atol=1e-4, rtol=1e-4)


def force_split_kernels(monkeypatch) -> None:
    """Keep every cell on the split kernels (no RNN resident or LSTM/GRU slice kernels)."""
    monkeypatch.setattr(rnn, "RESIDENT_MAX_BYTES", 0)
    monkeypatch.setattr(_common, "SLICE_MAX_HIDDEN", 0)


@pytest.mark.parametrize("cell", CELLS)
def test_several_column_tiles_and_programs_match_reference(cell, monkeypatch):
    # 16-wide tiles make hidden size 20 span two column tiles, batch 17 two programs.
    monkeypatch.setattr(_common, "MAX_BLOCK_N", 16)
    monkeypatch.setattr(_common, "MAX_BLOCK_K", 16)
    force_split_kernels(monkeypatch)
    grid, options, _ = _common.plan_launch(17, 20, torch.device("cpu"))
    assert grid == (2, 1) and options["BLOCK_N"] == options["BLOCK_K"] == 16
    fused, reference = make_pair(
        cell, torch.float64, input_size=2, hidden_size=20, bidirectional=True
    )
    x = torch.randn(2, 17, 2, dtype=torch.float64, requires_grad=True)
    hx = initial_state(cell, (2, 17, 20), torch.float64)
    lengths = torch.tensor([2, 1] * 8 + [2])
    got = run_and_differentiate(fused, x, hx, lengths)
    expected = run_and_differentiate(reference, x, hx, lengths)
    assert_all_close(got, expected, 1e-9)


# The kernels each cell runs where its weights fit on chip, forward then backward.
ON_CHIP_KERNELS = {
    "rnn_tanh": ("rnn_resident_forward_kernel", "rnn_resident_backward_kernel"),
    "rnn_relu": ("rnn_resident_forward_kernel", "rnn_resident_backward_kernel"),
    "lstm": ("lstm_slice_forward_kernel", "lstm_slice_backward_kernel"),
    "gru": ("gru_slice_forward_kernel", "gru_slice_backward_kernel"),
}


def spy_on_chip_launches(monkeypatch) -> list[str]:
    """Names of the on-chip (resident or slice) kernels launched from now on, as they run."""
    launched = []
    launch = _common.launch_if_it_fits

    def spy(kernel, *args, **kwargs):
        ran = launch(kernel, *args, **kwargs)
        if ran:
            launched.append(_common.kernel_name(kernel))
        return ran

    for module in (rnn, lstm, gru):
        if hasattr(module, "launch_if_it_fits"):
            monkeypatch.setattr(module, "launch_if_it_fits", spy)
    return launched


@pytest.mark.parametrize("kernels", ["on chip", "split"])
@pytest.mark.parametrize("cell", ON_CHIP_KERNELS)
def test_on_chip_and_split_kernels_match_reference(cell, kernels, monkeypatch):
    # hidden 20 pads to a 32-wide tile; batch 17 needs two programs of batch rows.
    if kernels == "split":
        force_split_kernels(monkeypatch)
    launched = spy_on_chip_launches(monkeypatch)
    fused, reference = make_pair(
        cell, torch.float64, input_size=3, hidden_size=20, bidirectional=True
    )
    x = torch.randn(5, 17, 3, dtype=torch.float64, requires_grad=True)
    hx = initial_state(cell, (2, 17, 20), torch.float64)
    lengths = torch.tensor([5, 2, 1, 4] * 4 + [3])
    got = run_and_differentiate(fused, x, hx, lengths)
    expected = run_and_differentiate(reference, x, hx, lengths)
    assert_all_close(got, expected, 1e-9)
    with torch.no_grad():
        inference_output, _ = fused(x, hx, lengths=lengths)
    assert torch.allclose(inference_output, expected[0], atol=1e-9)
    forward, backward = ON_CHIP_KERNELS[cell]
    if kernels == "on chip":
        # two directions: a training forward, a backward and an inference forward each
        assert sorted(launched) == sorted([forward] * 4 + [backward] * 2)
    else:
        assert launched == []


@pytest.mark.parametrize("cell", ON_CHIP_KERNELS)
def test_on_chip_kernel_out_of_resources_falls_back_to_split(cell, monkeypatch):
    from triton.runtime.errors import OutOfResources

    attempts = []

    class TooBig:
        def __init__(self, name):
            self.__name__ = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                attempts.append((self.__name__, kwargs["BLOCK_H"]))
                raise OutOfResources(300000, 232448, "shared memory")

            return launch

    module = rnn if cell.startswith("rnn") else lstm if cell == "lstm" else gru
    for name in ON_CHIP_KERNELS[cell]:
        monkeypatch.setattr(module, name, TooBig(name))
    monkeypatch.setattr(_common, "OUT_OF_RESOURCES", set())
    for each in (rnn, lstm, gru):
        if hasattr(each, "OUT_OF_RESOURCES"):
            monkeypatch.setattr(each, "OUT_OF_RESOURCES", _common.OUT_OF_RESOURCES)
    fused, reference = make_pair(cell, torch.float64, input_size=3, hidden_size=20)
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    for _ in range(2):
        got = run_and_differentiate(fused, x, None)
        assert_all_close(got, run_and_differentiate(reference, x, None), 1e-9)
    # each tried once, then remembered for this device, dtype and tile
    forward, backward = ON_CHIP_KERNELS[cell]
    assert attempts == [(forward, 32), (backward, 32)]
    assert _common.OUT_OF_RESOURCES == {
        (x.device, torch.float64, forward, 32, 32),
        (x.device, torch.float64, backward, 32, 32),
    }


def direction_function(cell: str):
    if cell == "lstm":
        return lstm.run_direction, {}
    if cell.startswith("gru"):
        return gru.run_direction, {"reset_after": cell == "gru"}
    return rnn.run_direction, {"nonlinearity": cell.removeprefix("rnn_")}


@pytest.mark.parametrize("cell", CELLS)
def test_gradcheck_reverse_with_lengths(cell):
    run_direction, options = direction_function(cell)
    gates = {"lstm": 4, "gru": 3}.get(cell.split("_")[0], 1)
    steps, batch, inputs, hidden = 3, 2, 2, 3
    shapes = [(steps, batch, inputs)] + [(batch, hidden)] * (2 if cell == "lstm" else 1)
    shapes += [
        (gates * hidden, inputs),
        (gates * hidden, hidden),
        (gates * hidden,),
        (gates * hidden,),
    ]
    sizes = [torch.Size(shape).numel() for shape in shapes]
    lengths = torch.tensor([2, 3])

    # One flat input and one flat output keep the interpreted launches gradcheck makes to a few.
    def function(packed):
        x, *tensors = [part.view(shape) for part, shape in zip(packed.split(sizes), shapes)]
        state, weights = tensors[: len(shapes) - 5], tensors[len(shapes) - 5 :]
        extra = (None,) if cell == "lstm" else ()
        output, final = run_direction(x, tuple(state), (*weights, *extra), lengths, True, **options)
        return torch.cat([output.flatten(), *(part.flatten() for part in final)])

    torch.manual_seed(2)
    packed = torch.randn(sum(sizes), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(function, (packed,), fast_mode=True)


def test_packed_two_layer_lstm_matches_reference():
    fused, reference = make_pair("lstm", torch.float64, input_size=3, hidden_size=5, num_layers=2)
    x = torch.randn(4, 3, 3, dtype=torch.float64)
    packed = pack_padded_sequence(x, [2, 4, 3], enforce_sorted=False)
    got, (h_got, c_got) = fused(packed)
    expected, (h_expected, c_expected) = reference(packed)
    assert torch.allclose(got.data, expected.data, atol=1e-9)
    assert torch.allclose(h_got, h_expected, atol=1e-9)
    assert torch.allclose(c_got, c_expected, atol=1e-9)


def test_single_step_and_empty_batch():
    fused, reference = make_pair("gru", torch.float64, input_size=2, hidden_size=4)
    x = torch.randn(1, 2, 2, dtype=torch.float64)
    assert torch.allclose(fused(x)[0], reference(x)[0], atol=1e-12)
    output, h_n = fused(torch.randn(3, 0, 2, dtype=torch.float64))
    assert output.shape == (3, 0, 4) and h_n.shape == (1, 0, 4)


def test_explicit_gpu_backend_explains_itself_and_auto_keeps_cpu_tensors_off_it():
    layer = rnnkit.GRU(2, 4, backend="gpu")
    x = torch.randn(3, 1, 2)
    assert rnnkit.explain_backend(layer, x) == "backend='gpu' was requested"
    layer.backend = "auto"
    assert "gpu" not in rnnkit.explain_backend(layer, x)


def test_projected_lstm_is_refused_with_a_reason():
    layer = rnnkit.LSTM(2, 4, proj_size=2, backend="gpu")
    with pytest.raises(RuntimeError, match="proj_size"):
        layer(torch.randn(3, 1, 2))


@pytest.mark.parametrize("cell", [*CELLS, "ln_lstm", "ln_gru"])
def test_float16_autocast_runs_in_float16_close_to_float32(cell):
    layer_norm_cells = {"ln_lstm": rnnkit.LayerNormLSTM, "ln_gru": rnnkit.LayerNormGRU}
    layer_class, cell_options = CELLS.get(cell) or (layer_norm_cells[cell], {})
    torch.manual_seed(0)
    layer = layer_class(4, 16, **cell_options, backend="gpu")
    x = torch.randn(4, 2, 4)
    expected, _ = layer(x)
    expected_grads = torch.autograd.grad(expected.sum(), list(layer.parameters()))
    with torch.autocast("cpu", dtype=torch.float16):
        output, _ = layer(x)
    assert output.dtype == torch.float16
    assert torch.allclose(output.float(), expected, atol=2e-3)
    grads = torch.autograd.grad(output.float().sum(), list(layer.parameters()))
    for grad, expected_grad in zip(grads, expected_grads):
        assert grad.dtype == torch.float32
        assert torch.allclose(grad, expected_grad, atol=2e-2, rtol=1e-2)


def test_bfloat16_is_refused_under_the_interpreter():
    layer = rnnkit.RNN(2, 4, backend="gpu", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="bfloat16"):
        layer(torch.randn(3, 1, 2, dtype=torch.bfloat16))


def test_environment_is_set_for_this_module_only():
    assert os.environ.get("TRITON_INTERPRET") == "1"


def test_warmup_runs_every_cell_forward_and_backward(monkeypatch):
    from rnnkit.kernels import gpu

    calls = []
    for module in (gru, lstm, rnn, layer_norm):
        function = module.run_direction
        monkeypatch.setattr(
            module,
            "run_direction",
            lambda *args, _function=function, _name=module.__name__, **kwargs: (
                calls.append(_name) or _function(*args, **kwargs)
            ),
        )
    gpu.warmup("cpu", hidden_sizes=(4,))
    # seven cells, two directions, an inference and a training forward each
    assert len(calls) == 28


@pytest.mark.parametrize(
    "batch, hidden, expected_grid, expected_rows",
    [
        (1, 128, (1, 4), 16),  # one batch tile: its 4 unit tiles on 4 programs
        (64, 512, (4, 16), 16),
        (256, 1024, (4, 32), 64),  # 16-row tiles x 32 unit tiles would exceed 132
        (5000, 256, (313, 1), 16),  # the batch alone fills the GPU: no split
    ],
)
def test_tile_plan_splits_hidden_units_only_where_every_program_has_a_multiprocessor(
    batch, hidden, expected_grid, expected_rows
):
    grid, options = _common.tile_plan(batch, hidden, slots=132)
    assert grid == expected_grid and options["BLOCK_B"] == expected_rows
    assert options["SPLIT"] == (grid[1] > 1)
    assert grid[0] * grid[1] <= 132 or grid[1] == 1
    assert _common.tile_plan(batch, hidden, slots=None)[0] == (-(-batch // 16), 1)


# -- MinGRU / MinLSTM: the element-wise walk (kernels/gpu/minimal.py) --------------------------
MINIMAL = {"min_gru": rnnkit.MinGRU, "min_lstm": rnnkit.MinLSTM}


def minimal_pair(cell: str, dtype: torch.dtype, **options):
    """The same MinGRU/MinLSTM twice: on the gpu kernel and on the reference scans."""
    torch.manual_seed(0)
    fused = MINIMAL[cell](dtype=dtype, backend="gpu", **options)
    reference = MINIMAL[cell](dtype=dtype, backend="reference", **options)
    reference.load_state_dict(fused.state_dict())
    return fused, reference


def minimal_outputs_and_gradients(layer, x, hx, lengths, mode):
    """Output, h_n and the gradients of a random projection of both for x, hx and the weights."""
    output, h_n = layer(x, hx, lengths=lengths, mode=mode)
    generator = torch.Generator().manual_seed(1)
    loss = (output * torch.randn(output.shape, generator=generator, dtype=output.dtype)).sum()
    loss = loss + (h_n * torch.randn(h_n.shape, generator=generator, dtype=h_n.dtype)).sum()
    grads = torch.autograd.grad(loss, [x, hx, *layer.parameters()])
    return [output, h_n, *grads]


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
@pytest.mark.parametrize("cell", MINIMAL)
def test_minimal_two_layers_bidirectional_with_lengths_matches_reference_float64(cell, mode):
    fused, reference = minimal_pair(
        cell, torch.float64, input_size=3, hidden_size=5, num_layers=2, bidirectional=True
    )
    x = torch.randn(6, 4, 3, dtype=torch.float64, requires_grad=True)
    hx = torch.randn(4, 4, 5, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([6, 1, 4, 3])
    got = minimal_outputs_and_gradients(fused, x, hx, lengths, mode)
    expected = minimal_outputs_and_gradients(reference, x, hx, lengths, mode)
    assert_all_close(got, expected, 1e-10)
    assert got[0][1:, 1].abs().max() == 0 and got[0][3:, 3].abs().max() == 0


@pytest.mark.parametrize("cell", MINIMAL)
def test_minimal_float32_batch_first_without_bias_over_several_programs(cell):
    # B * H = 3 * 50 units: two programs of minimal.BLOCK = 128.
    assert 3 * 50 > minimal.BLOCK
    fused, reference = minimal_pair(
        cell, torch.float32, input_size=4, hidden_size=50, bias=False, batch_first=True
    )
    x = torch.randn(3, 5, 4, requires_grad=True)
    hx = torch.randn(1, 3, 50, requires_grad=True)
    got = minimal_outputs_and_gradients(fused, x, hx, None, "sequential")
    expected = minimal_outputs_and_gradients(reference, x, hx, None, "sequential")
    assert_all_close(got, expected, 1e-5)
    with torch.no_grad():
        inference_output, _ = fused(x, hx)
    assert torch.allclose(inference_output, expected[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell", MINIMAL)
def test_minimal_walk_passes_gradcheck_with_lengths(cell):
    gate_count = 3 if cell == "min_lstm" else 2
    # Pre-activations of both signs: g(v) changes form at 0.
    gates = torch.randn(4, 3, gate_count * 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([4, 2, 1])
    assert torch.autograd.gradcheck(
        lambda g, h: minimal.scan_direction(cell, g, h, lengths), (gates, h0)
    )


def test_minimal_explain_backend_names_the_gpu_kernel():
    layer = rnnkit.MinGRU(3, 4, backend="gpu")
    assert rnnkit.explain_backend(layer, torch.randn(2, 1, 3)) == "backend='gpu' was requested"
    # auto never takes the gpu kernel for CPU tensors, interpreter or not.
    assert rnnkit.explain_backend(rnnkit.MinGRU(3, 4), torch.randn(2, 1, 3)).startswith(
        "auto: fused cpu kernel"
    )


def test_minimal_scan_direction_names_bad_shapes():
    with pytest.raises(ValueError, match=r"gates must be \(T, B, 2\*H\) with h0 \(B, H\)"):
        minimal.scan_direction("min_gru", torch.randn(2, 3, 5), torch.randn(3, 2), None)
    with pytest.raises(ValueError, match="cell must be one of"):
        minimal.scan_direction("gru", torch.randn(2, 3, 4), torch.randn(3, 2), None)


@pytest.mark.parametrize("nonlinearity", ["relu", "tanh"])
def test_indrnn_two_layers_bidirectional_with_lengths_matches_reference_float64(nonlinearity):
    torch.manual_seed(0)
    options = {"num_layers": 2, "bidirectional": True, "dtype": torch.float64}
    fused = rnnkit.IndRNN(3, 5, nonlinearity=nonlinearity, backend="gpu", **options)
    reference = rnnkit.IndRNN(3, 5, nonlinearity=nonlinearity, backend="reference", **options)
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(6, 4, 3, dtype=torch.float64, requires_grad=True)
    hx = torch.randn(4, 4, 5, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([6, 1, 4, 3])
    results = []
    for layer in (fused, reference):
        output, h_n = layer(x, hx, lengths=lengths)
        generator = torch.Generator().manual_seed(1)
        loss = (output * torch.randn(output.shape, generator=generator, dtype=output.dtype)).sum()
        loss = loss + (h_n * torch.randn(h_n.shape, generator=generator, dtype=h_n.dtype)).sum()
        results.append([output, h_n, *torch.autograd.grad(loss, [x, hx, *layer.parameters()])])
    assert_all_close(results[0], results[1], 1e-10)
    assert rnnkit.explain_backend(fused, x) == "backend='gpu' was requested"


@pytest.mark.parametrize("relu", [True, False])
def test_indrnn_walk_passes_gradcheck(relu):
    # relu's kink is avoided by keeping the projections and states positive.
    pre = (torch.rand(4, 3, 2, dtype=torch.float64) + 0.1).requires_grad_()
    h0 = torch.rand(3, 2, dtype=torch.float64, requires_grad=True)
    u = torch.rand(2, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([4, 2, 1])
    nonlinearity = "relu" if relu else "tanh"
    assert torch.autograd.gradcheck(
        lambda p, h, w: minimal.indrnn_recurrence(p, h, w, lengths, nonlinearity), (pre, h0, u)
    )


def test_indrnn_over_several_programs_matches_reference_float32():
    # B * H = 3 * 50 units: two programs of minimal.BLOCK = 128.
    assert 3 * 50 > minimal.BLOCK
    torch.manual_seed(0)
    fused = rnnkit.IndRNN(4, 50, batch_first=True, backend="gpu")
    reference = rnnkit.IndRNN(4, 50, batch_first=True, backend="reference")
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(3, 5, 4, requires_grad=True)
    results = []
    for layer in (fused, reference):
        output, h_n = layer(x)
        loss = (output * output.detach().cos()).sum() + h_n.sum()
        results.append([output, h_n, *torch.autograd.grad(loss, [x, *layer.parameters()])])
    assert_all_close(results[0], results[1], 1e-5)


def test_indrnn_walk_names_bad_arguments():
    with pytest.raises(ValueError, match=r"pre \(T, B, H\) needs h0 \(B, H\) and u \(H,\)"):
        minimal.indrnn_recurrence(torch.randn(2, 3, 4), torch.randn(3, 5), torch.randn(4), None)
    with pytest.raises(ValueError, match="nonlinearity must be 'relu' or 'tanh', got 'sigmoid'"):
        minimal.indrnn_recurrence(
            torch.randn(2, 3, 4), torch.randn(3, 4), torch.randn(4), None, "sigmoid"
        )


def test_walks_refuse_inputs_past_32_bit_offsets():
    # Expanded views: the sizes are checked before any element is read.
    gates = torch.zeros(1, 1, 1).expand(2**16, 2**8, 2**8)
    with pytest.raises(ValueError, match=r"T \* B \* 256 must be below 2\*\*31"):
        minimal.scan_direction("min_gru", gates, torch.zeros(2**8, 2**7), None)


# -- Recurrent dropout and zoneout in the on-chip kernels ----------------------------------------
REGULARIZED_CELLS = {
    "rnn_tanh": (rnnkit.RNN, {}),
    "rnn_relu": (rnnkit.RNN, {"nonlinearity": "relu"}),
    "lstm": (rnnkit.LSTM, {}),
    "gru": (rnnkit.GRU, {}),
}
# (recurrent_dropout, zoneout): each alone and both; the LSTM's zoneout pair differs for h and c.
REGULARIZER_RATES = [(0.3, 0.0), (0.0, 0.25), (0.35, (0.2, 0.4))]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("rates", REGULARIZER_RATES)
@pytest.mark.parametrize("cell", REGULARIZED_CELLS)
def test_regularized_on_chip_kernels_match_the_reference_with_the_same_masks(
    cell, rates, training, monkeypatch, outputs_and_gradients
):
    layer_class, options = REGULARIZED_CELLS[cell]
    recurrent_dropout, zoneout = rates
    if layer_class is not rnnkit.LSTM and isinstance(zoneout, tuple):
        zoneout = zoneout[0]
    options = options | {
        "num_layers": 2,
        "bidirectional": True,
        "dtype": torch.float64,
        "recurrent_dropout": recurrent_dropout,
        "zoneout": zoneout,
    }
    torch.manual_seed(0)
    fused = layer_class(3, 20, backend="gpu", **options)
    reference = layer_class(3, 20, backend="reference", **options)
    reference.load_state_dict(fused.state_dict())
    fused.train(training)
    reference.train(training)
    launched = spy_on_chip_launches(monkeypatch)
    x = torch.randn(6, 17, 3, dtype=torch.float64, requires_grad=True)
    parts = 2 if layer_class is rnnkit.LSTM else 1
    hx = tuple(
        torch.randn(4, 17, 20, dtype=torch.float64, requires_grad=True) for _ in range(parts)
    )
    hx = hx if parts == 2 else hx[0]
    lengths = torch.tensor([6, 2, 5, 1] * 4 + [3])
    got = outputs_and_gradients(fused, x, hx, lengths, seed=11)
    expected = outputs_and_gradients(reference, x, hx, lengths, seed=11)
    assert_all_close(got, expected, 1e-9)
    if in_loop_active := training or zoneout:
        # two layers, two directions: a forward and a backward each, on the on-chip kernels
        forward, backward = ON_CHIP_KERNELS["lstm" if cell == "lstm" else cell]
        assert sorted(launched) == sorted([forward] * 4 + [backward] * 4), in_loop_active


def test_regularizers_outside_the_on_chip_kernels_are_refused_with_a_reason():
    gru = rnnkit.GRU(3, 8, reset_after=False, zoneout=0.2, backend="gpu", dtype=torch.float64)
    with pytest.raises(RuntimeError, match="GRU with reset_after=True only"):
        gru(torch.randn(4, 2, 3, dtype=torch.float64))
    # hidden 300 pads to 512, past the slice kernels' 256
    lstm = rnnkit.LSTM(3, 300, recurrent_dropout=0.3, backend="gpu", dtype=torch.float64)
    with pytest.raises(RuntimeError, match="hidden_size=300 in torch.float64 does not fit"):
        lstm(torch.randn(4, 2, 3, dtype=torch.float64))
    lstm.eval()  # recurrent dropout is off in eval: the plain kernels run
    output, _ = lstm(torch.randn(2, 1, 3, dtype=torch.float64))
    assert output.shape == (2, 1, 300)


@pytest.mark.parametrize("cell", REGULARIZED_CELLS)
def test_regularized_on_chip_kernels_float32_batch_first_and_float16_autocast(
    cell, outputs_and_gradients
):
    layer_class, options = REGULARIZED_CELLS[cell]
    zoneout = (0.2, 0.3) if layer_class is rnnkit.LSTM else 0.2
    options = options | {"batch_first": True, "recurrent_dropout": 0.3, "zoneout": zoneout}
    torch.manual_seed(0)
    fused = layer_class(3, 16, backend="gpu", **options)
    reference = layer_class(3, 16, backend="reference", **options)
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(5, 7, 3, requires_grad=True)
    parts = 2 if layer_class is rnnkit.LSTM else 1
    hx = tuple(torch.randn(1, 5, 16, requires_grad=True) for _ in range(parts))
    hx = hx if parts == 2 else hx[0]
    got = outputs_and_gradients(fused, x, hx, None, seed=5)
    expected = outputs_and_gradients(reference, x, hx, None, seed=5)
    assert_all_close(got, expected, 1e-5)
    # float16 under autocast: the same masks, the kernels accumulating in float32
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.float16):
        output, _ = fused(x, hx)
    assert output.dtype == torch.float16
    assert torch.allclose(output.float(), expected[0], atol=5e-3)


@pytest.mark.parametrize("cell", ["lstm", "rnn_tanh"])
def test_shared_placeholders_made_under_inference_mode_can_be_saved_later(cell):
    # The per-shape lengths and placeholder tensors are cached: the first call may come under
    # inference_mode, and a later training call saves them for its backward.
    _common._full_lengths.cache_clear()
    _common.empty_like_nothing.cache_clear()
    fused, reference = make_pair(cell, torch.float64, input_size=3, hidden_size=5)
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    with torch.inference_mode():
        fused(x)
    assert _common._full_lengths.cache_info().currsize == 1
    got = run_and_differentiate(fused, x, None)
    expected = run_and_differentiate(reference, x, None)
    assert_all_close(got, expected, 1e-9)


# -- layer-normalised cells -------------------------------------------------------------------
LAYER_NORM_CELLS = {"ln_lstm": rnnkit.LayerNormLSTM, "ln_gru": rnnkit.LayerNormGRU}


def make_layer_norm_pair(cell: str, dtype: torch.dtype, **options):
    """The same layer-normalised layer on the gpu kernels and on the reference loop, with gains
    and shifts away from their 1 and 0 initialisation."""
    torch.manual_seed(0)
    fused = LAYER_NORM_CELLS[cell](dtype=dtype, backend="gpu", **options)
    with torch.no_grad():
        for parameter in fused.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    reference = LAYER_NORM_CELLS[cell](dtype=dtype, backend="reference", **options)
    reference.load_state_dict(fused.state_dict())
    return fused, reference


def spy_on_layer_norm_kernels(monkeypatch) -> list[str]:
    ran = []
    for name in ("ln_lstm_forward_kernel", "ln_lstm_backward_kernel", "ln_gru_forward_kernel",
                 "ln_gru_backward_kernel"):  # fmt: skip
        kernel = getattr(layer_norm, name)

        class Spy:
            def __getitem__(self, grid, _kernel=kernel, _name=name):
                ran.append(_name)
                return _kernel[grid]

        monkeypatch.setattr(layer_norm, name, Spy())
    return ran


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cell", LAYER_NORM_CELLS)
def test_layer_norm_two_layers_bidirectional_lengths_hx_match_reference_float64(
    cell, bias, monkeypatch
):
    # hidden 40: two unit tiles of 32 with padding, and 120 or 160 pre-activation columns;
    # batch 20: two programs, the second with 4 rows.
    fused, reference = make_layer_norm_pair(
        cell, torch.float64, input_size=3, hidden_size=40, num_layers=2, bidirectional=True,
        bias=bias,
    )  # fmt: skip
    ran = spy_on_layer_norm_kernels(monkeypatch)
    x = torch.randn(7, 20, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.randint(1, 8, (20,))
    lengths[0] = 7
    hx = initial_state("lstm" if cell == "ln_lstm" else "gru", (4, 20, 40), torch.float64)
    got = run_and_differentiate(fused, x, hx, lengths)
    expected = run_and_differentiate(reference, x, hx, lengths)
    assert_all_close(got, expected, 1e-9)
    kernel = "ln_lstm" if cell == "ln_lstm" else "ln_gru"
    assert ran.count(f"{kernel}_forward_kernel") == 4  # two layers, two directions
    assert ran.count(f"{kernel}_backward_kernel") == 4


@pytest.mark.parametrize("cell", LAYER_NORM_CELLS)
def test_layer_norm_float32_batch_first_inference_matches_training_forward(cell):
    fused, reference = make_layer_norm_pair(cell, torch.float32, input_size=4, hidden_size=17,
                                            batch_first=True)  # fmt: skip
    x = torch.randn(3, 9, 4)
    with torch.no_grad():
        inference, inference_state = fused(x)
    training, training_state = fused(x.requires_grad_())
    expected, expected_state = reference(x)
    assert torch.allclose(inference, training, atol=1e-6)
    assert torch.allclose(training, expected, atol=1e-5)
    states = zip(*(s if isinstance(s, tuple) else (s,) for s in (inference_state, expected_state)))
    for got_state, expected_part in states:
        assert torch.allclose(got_state, expected_part, atol=1e-5)


@pytest.mark.parametrize("cell", LAYER_NORM_CELLS)
def test_layer_norm_gradcheck_reverse_with_lengths(cell):
    lstm = cell == "ln_lstm"
    gates = 4 if lstm else 3
    steps, batch, inputs, hidden = 3, 2, 2, 3
    shapes = [(steps, batch, inputs)] + [(batch, hidden)] * (2 if lstm else 1)
    shapes += [(gates * hidden, inputs), (gates * hidden, hidden)] + [(gates * hidden,)] * 4
    shapes += [(hidden,), (hidden,)] if lstm else []
    sizes = [torch.Size(shape).numel() for shape in shapes]
    states = 2 if lstm else 1
    lengths = torch.tensor([2, 3])
    mode = "LN_LSTM" if lstm else "LN_GRU"

    # One flat input and one flat output, with fast_mode: few interpreted launches (as above).
    def function(packed):
        x, *tensors = [part.view(shape) for part, shape in zip(packed.split(sizes), shapes)]
        state, weights = tensors[:states], tensors[states:]
        output, final = layer_norm.run_direction(mode, x, tuple(state), weights, lengths, True)
        return torch.cat([output.flatten(), *(part.flatten() for part in final)])

    torch.manual_seed(2)
    packed = torch.randn(sum(sizes), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(function, (packed,), fast_mode=True)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("rates", REGULARIZER_RATES)
@pytest.mark.parametrize("cell", LAYER_NORM_CELLS)
def test_layer_norm_regularized_match_the_reference_with_the_same_masks(
    cell, rates, training, monkeypatch, outputs_and_gradients
):
    recurrent_dropout, zoneout = rates
    if cell == "ln_gru" and isinstance(zoneout, tuple):
        zoneout = zoneout[0]
    fused, reference = make_layer_norm_pair(
        cell, torch.float64, input_size=3, hidden_size=20, bidirectional=True,
        recurrent_dropout=recurrent_dropout, zoneout=zoneout,
    )  # fmt: skip
    fused.train(training)
    reference.train(training)
    ran = spy_on_layer_norm_kernels(monkeypatch)
    x = torch.randn(5, 17, 3, dtype=torch.float64, requires_grad=True)
    hx = initial_state("lstm" if cell == "ln_lstm" else "gru", (2, 17, 20), torch.float64)
    lengths = torch.tensor([5, 2, 4, 1] * 4 + [3])
    got = outputs_and_gradients(fused, x, hx, lengths, seed=11)
    expected = outputs_and_gradients(reference, x, hx, lengths, seed=11)
    assert_all_close(got, expected, 1e-9)
    assert len(ran) == 4  # two directions, a forward and a backward each


def test_layer_norm_unknown_mode_is_refused_by_name():
    with pytest.raises(ValueError, match="mode must be one of"):
        layer_norm.run_direction(
            "LSTM", torch.zeros(1, 1, 1), (torch.zeros(1, 1),), (), None, False
        )


@pytest.mark.parametrize("reverse", [False, True])
def test_step_tile_reads_the_step_and_nothing_past_either_end(reverse):
    # The (T, B, H) tensor sits inside a larger buffer whose other entries are 999: a prefetch
    # past either end of the loop (step -1 or T) must give zeros, not a neighbour's entries.
    steps, batch, hidden = 4, 3, 5
    buffer = torch.full((steps + 2, batch, hidden), 999.0)
    source = buffer[1:-1]
    source.copy_(torch.randn(steps, batch, hidden))
    lengths = torch.tensor([4, 2, 3], dtype=torch.int32)
    out = torch.empty(steps + 2, batch, hidden)
    step_tiles_kernel[(1,)](source, lengths, out, steps, batch, hidden, REVERSE=reverse)
    assert torch.equal(out[0], torch.zeros(batch, hidden))
    assert torch.equal(out[-1], torch.zeros(batch, hidden))
    for step in range(steps):
        for row, length in enumerate(lengths.tolist()):
            time = length - 1 - step if reverse and step < length else step
            assert torch.equal(out[step + 1, row], source[time, row])


def test_slice_forwards_prefetch_up_to_128_units_and_never_when_switched_off(monkeypatch):
    monkeypatch.setattr(_common, "PREFETCH", True)  # the default
    assert _common.prefetch_slices({"BLOCK_H": 128}) is True
    assert _common.prefetch_slices({"BLOCK_H": 256}) is False  # it would spill registers
    monkeypatch.setattr(_common, "PREFETCH", False)
    assert _common.prefetch_slices({"BLOCK_H": 64}) is False
