"""The fused CPU layer-normalised LSTM/GRU against the reference loop: outputs, states, gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnkit
from rnnkit import dispatch
from rnnkit.kernels.cpu import backend as cpu_backend
from rnnkit.kernels.cpu import layer_norm as kernel
from rnnkit.spec import LayerSpec
from rnnkit.variants import LayerNormGRU, LayerNormLSTM

TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-9}
CLASSES = [LayerNormLSTM, LayerNormGRU]


def twins(cls, dtype, hidden=5, **options):
    """(reference layer, fused layer) with the same perturbed parameters (gains away from 1)."""
    torch.manual_seed(0)
    reference = cls(4, hidden, dtype=dtype, backend="reference", **options)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    fused = copy.deepcopy(reference)
    fused.backend = "cpu"
    return reference, fused


def forward_backward(layer, x, hx, lengths=None, packed=False):
    """[output, *final state, dL/dx, dL/dhx..., dL/dparameter...] for a fixed loss."""
    if packed:
        inp = pack_padded_sequence(x, lengths, enforce_sorted=False)
        output, state = layer(inp, hx)
        output, _ = pad_packed_sequence(output, total_length=x.size(0))
    else:
        output, state = layer(x, hx, lengths=lengths)
    state = state if isinstance(state, tuple) else (state,)
    weights = torch.linspace(-1, 1, output.numel(), dtype=output.dtype).view(output.shape)
    loss = (output * weights).sum() + sum((part * part.cos()).sum() for part in state)
    hx_parts = [] if hx is None else list(hx if isinstance(hx, tuple) else (hx,))
    grads = torch.autograd.grad(loss, [x, *hx_parts, *layer.parameters()])
    return [output, *state, *grads]


def assert_all_close(mine, theirs, dtype):
    """Equal up to TOLERANCE times each tensor's largest magnitude: a float32 gradient summed over
    many rows carries rounding proportional to its scale, not to each element."""
    tolerance = TOLERANCE[dtype]
    assert len(mine) == len(theirs)
    for a, b in zip(mine, theirs):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, atol=tolerance * scale, rtol=0)


def initial_state(cls, layers, batch, dtype, hidden=5):
    parts = [torch.randn(layers, batch, hidden, dtype=dtype, requires_grad=True)]
    if cls is LayerNormLSTM:
        parts.append(torch.randn(layers, batch, hidden, dtype=dtype, requires_grad=True))
        return tuple(parts)
    return parts[0]


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("dtype, hidden", [(torch.float64, 5), (torch.float32, 32)])
def test_fused_matches_reference_stacked_bidirectional_with_lengths(cls, dtype, hidden):
    # float32 with 32 units: normalising a 5-unit cell state in float32 can divide by a tiny
    # standard deviation, where both paths stray from the float64 result in different places.
    reference, fused = twins(cls, dtype, hidden, num_layers=2, bidirectional=True)
    x = torch.randn(7, 4, 4, dtype=dtype, requires_grad=True)
    hx = initial_state(cls, 4, 4, dtype, hidden)
    lengths = torch.tensor([3, 7, 1, 5])
    assert_all_close(
        forward_backward(fused, x, hx, lengths),
        forward_backward(reference, x, hx, lengths),
        dtype,
    )


@pytest.mark.parametrize("cls", CLASSES)
def test_batch_split_over_threads_matches_reference(cls, monkeypatch):
    # Two torch threads run the batch as two concurrent parts once a part's per-step product is
    # large enough; the threshold is lowered so that this small case splits, in both passes.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(kernel, "_MIN_PART_STEP_WORK", 1)
        monkeypatch.setattr(kernel, "_MIN_PART", 1)
        monkeypatch.setattr(kernel, "_INPUT_SPLIT_ROWS", 1)
        w_hh = torch.empty(4 * 5, 5)
        split = 1 if kernel.blas.LIBRARY.startswith("OpenBLAS") else 2
        assert len(kernel._batch_parts(10, w_hh, 8)) == split
        assert len(kernel._batch_parts(10, w_hh, 7)) == 1  # too few steps to split
        calls = []
        original = kernel.threads.run_concurrently
        monkeypatch.setattr(
            kernel.threads,
            "run_concurrently",
            lambda function, lists: (
                calls.append((function, len(lists))) or original(function, lists)
            ),
        )
        reference, fused = twins(cls, torch.float64, num_layers=2, bidirectional=True)
        x = torch.randn(8, 10, 4, dtype=torch.float64, requires_grad=True)
        hx = initial_state(cls, 4, 10, torch.float64)
        lengths = torch.tensor([8, 1, 4, 8, 3, 5, 2, 7, 5, 4])
        assert_all_close(
            forward_backward(fused, x, hx, lengths),
            forward_backward(reference, x, hx, lengths),
            torch.float64,
        )
        # Forward and backward of every layer and direction, and the input side's rows.
        input_side = (kernel._input_side_rows, kernel._input_side_backward_rows)
        assert {count for function, count in calls if function not in input_side} == {split}
        assert {(function, count) for function, count in calls if function in input_side} == {
            (function, 2) for function in input_side
        }
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("cls", CLASSES)
def test_fused_matches_reference_without_bias_and_full_lengths(cls):
    reference, fused = twins(cls, torch.float64, bias=False)
    x = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
    assert_all_close(
        forward_backward(fused, x, None), forward_backward(reference, x, None), torch.float64
    )


@pytest.mark.parametrize("cls", CLASSES)
def test_fused_matches_reference_on_packed_input(cls):
    reference, fused = twins(cls, torch.float64, bidirectional=True)
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([2, 5, 4])
    assert_all_close(
        forward_backward(fused, x, None, lengths, packed=True),
        forward_backward(reference, x, None, lengths, packed=True),
        torch.float64,
    )


@pytest.mark.parametrize("cls", CLASSES)
def test_inference_path_gives_the_training_path_output(cls):
    _, fused = twins(cls, torch.float32, bidirectional=True)
    x = torch.randn(6, 3, 4)
    lengths = torch.tensor([6, 2, 4])
    trained_output, _ = fused(x.requires_grad_(True), lengths=lengths)
    with torch.inference_mode():
        inferred, _ = fused(x, lengths=lengths)
    torch.testing.assert_close(inferred, trained_output.detach(), atol=0, rtol=0)


@pytest.mark.parametrize("mode, gates", [("LN_LSTM", 4), ("LN_GRU", 3)])
def test_gradcheck_one_direction_tiny(mode, gates):
    torch.manual_seed(1)
    hidden, double = 3, torch.float64
    spec = LayerSpec(mode=mode, hidden_size=hidden)
    x = torch.randn(4, 3, 2, dtype=double, requires_grad=True)
    states = [torch.randn(3, hidden, dtype=double, requires_grad=True)]
    if gates == 4:
        states.append(torch.randn(3, hidden, dtype=double, requires_grad=True))
    rows = gates * hidden
    weights = [torch.randn(rows, 2, dtype=double), torch.randn(rows, hidden, dtype=double)]
    weights += [torch.randn(rows, dtype=double) for _ in range(2)]
    weights += [1 + 0.3 * torch.randn(rows, dtype=double) for _ in range(2)]
    if gates == 4:
        weights += [1 + 0.3 * torch.randn(hidden, dtype=double), torch.randn(hidden, dtype=double)]
    weights = [w.requires_grad_(True) for w in weights]
    lengths = torch.tensor([4, 1, 3])
    count = len(states)

    def run(x, *rest):
        state, direction_weights = tuple(rest[:count]), tuple(rest[count:])
        output, final = kernel.run_direction(spec, x, state, direction_weights, lengths, True)
        return (output, *final)

    assert torch.autograd.gradcheck(run, (x, *states, *weights))


def test_backward_twice_through_a_retained_graph_gives_the_same_gradients():
    _, fused = twins(LayerNormLSTM, torch.float64)
    x = torch.randn(5, 2, 4, dtype=torch.float64, requires_grad=True)
    output, (h_n, c_n) = fused(x)
    loss = output.sum() + c_n.sum()
    first = torch.autograd.grad(loss, x, retain_graph=True)[0]
    second = torch.autograd.grad(loss, x)[0]
    torch.testing.assert_close(first, second, atol=0, rtol=0)


def test_dispatch_routes_layer_norm_modes_to_the_cpu_backend():
    x = torch.randn(3, 2, 4)
    for cls in CLASSES:
        assert rnnkit.explain_backend(cls(4, 5), x) == "auto: fused cpu kernel for cpu tensors"
    assert dispatch._load("cpu") is cpu_backend
    assert "float32 or float64" in cpu_backend.unsupported_reason(
        LayerSpec("LN_GRU", 5), x.half(), None
    )


def test_empty_batch_runs():
    _, fused = twins(LayerNormGRU, torch.float64)
    output, h_n = fused(torch.randn(3, 0, 4, dtype=torch.float64))
    assert output.shape == (3, 0, 5) and h_n.shape == (1, 0, 5)


def test_direct_dispatch_with_wrong_shapes_is_refused_before_the_compiled_loop():
    layer = LayerNormLSTM(4, 5)
    x = torch.randn(3, 2, 4)
    weights = list(layer.cell_weights(0, 0))
    weights[1] = weights[1][:, :4]  # W_hh (20, 4) instead of (20, 5)
    state = (torch.zeros(2, 5), torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"w_hh of direction 0 must have shape \(20, 5\)"):
        dispatch.run_layer("cpu", layer.spec, x, [state], [tuple(weights)], None)
    with pytest.raises(ValueError, match="lengths"):
        dispatch.run_layer(
            "cpu", layer.spec, x, [state], [layer.cell_weights(0, 0)], torch.tensor([4, 1])
        )
