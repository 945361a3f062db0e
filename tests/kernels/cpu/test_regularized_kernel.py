"""The fused recurrent-dropout and zoneout kernels against the reference loop.

The kernels draw their masks in the reference loop's order, so the same seed gives the same
masks: outputs, final states and every gradient are compared in training mode (random masks)
and in eval mode (zoneout's expectation), with lengths, initial states, two layers and both
directions.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import rnnkit
from rnnkit.kernels.cpu import regularized

CELLS = {
    "lstm": (rnnkit.LSTM, {}),
    "lstm_proj": (rnnkit.LSTM, {"proj_size": 3}),
    "gru": (rnnkit.GRU, {}),
    "gru_reset_before": (rnnkit.GRU, {"reset_after": False}),
    "rnn_tanh": (rnnkit.RNN, {}),
    "rnn_relu": (rnnkit.RNN, {"nonlinearity": "relu"}),
}
# (recurrent_dropout, zoneout): each alone and both; the LSTM's zoneout pair differs for h and c.
RATES = [(0.3, 0.0), (0.0, 0.25), (0.35, (0.2, 0.4))]


def initial_state(cell, batch, dtype=torch.float64):
    """hx for make_pair's layers (2 layers, both directions, H = 5): (h0, c0) for the LSTMs,
    h0 of the projection's size where there is one."""

    def make(size):
        return torch.randn(4, batch, size, dtype=dtype, requires_grad=True)

    if cell.startswith("lstm"):
        return make(CELLS[cell][1].get("proj_size", 5)), make(5)
    return make(5)


def make_pair(cell, rates, dtype):
    layer_class, options = CELLS[cell]
    recurrent_dropout, zoneout = rates
    if not cell.startswith("lstm") and isinstance(zoneout, tuple):
        zoneout = zoneout[0]
    options = options | {
        "num_layers": 2,
        "bidirectional": True,
        "dtype": dtype,
        "recurrent_dropout": recurrent_dropout,
        "zoneout": zoneout,
    }
    torch.manual_seed(0)
    fused = layer_class(3, 5, backend="cpu", **options)
    reference = layer_class(3, 5, backend="reference", **options)
    reference.load_state_dict(fused.state_dict())
    return fused, reference


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("rates", RATES)
@pytest.mark.parametrize("cell", CELLS)
def test_matches_the_reference_loop_with_the_same_masks_float64(
    cell, rates, training, outputs_and_gradients
):
    fused, reference = make_pair(cell, rates, torch.float64)
    fused.train(training)
    reference.train(training)
    x = torch.randn(6, 4, 3, dtype=torch.float64, requires_grad=True)
    hx = initial_state(cell, 4)
    lengths = torch.tensor([6, 2, 5, 1])
    got = outputs_and_gradients(fused, x, hx, lengths, seed=11)
    expected = outputs_and_gradients(reference, x, hx, lengths, seed=11)
    for index, (a, b) in enumerate(zip(got, expected)):
        assert torch.allclose(a, b, atol=1e-9, rtol=1e-9), (index, (a - b).abs().max())


@pytest.mark.parametrize("cell", CELLS)
def test_matches_the_reference_loop_float32_batch_first_without_lengths(
    cell, outputs_and_gradients
):
    fused, reference = make_pair(cell, (0.3, (0.2, 0.3)), torch.float32)
    fused.batch_first = reference.batch_first = True
    x = torch.randn(3, 40, 3, requires_grad=True)
    hx = initial_state(cell, 3, torch.float32)
    got = outputs_and_gradients(fused, x, hx, None, seed=5)
    expected = outputs_and_gradients(reference, x, hx, None, seed=5)
    for index, (a, b) in enumerate(zip(got, expected)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (index, (a - b).abs().max())


def test_auto_runs_the_fused_kernel_and_the_masks_act(masks_act):
    masks_act(rnnkit.GRU(3, 5, recurrent_dropout=0.5, zoneout=0.3), torch.randn(7, 2, 3))


@pytest.mark.parametrize("cell", ["lstm", "lstm_proj", "gru", "gru_reset_before", "rnn_tanh"])
def test_gradcheck_with_fixed_masks(cell):
    layer_class, options = CELLS[cell]
    layer = layer_class(2, 4, dtype=torch.float64, recurrent_dropout=0.3, zoneout=0.2, **options)
    spec = layer.spec
    weights = [w for w in layer.cell_weights(0, 0) if w is not None]  # W_hr after the four
    x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(3, options.get("proj_size", 4), dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([4, 2, 3])
    states = (h0, c0) if cell.startswith("lstm") else (h0,)
    for reverse in (False, True):

        def function(*inputs, reverse=reverse):
            torch.manual_seed(7)  # the same masks at every evaluation
            x, used, state = inputs[0], inputs[1 : 1 + len(weights)], inputs[-len(states) :]
            output, final = regularized.run_direction(spec, x, state, used, lengths, reverse)
            return (output, *final)

        assert torch.autograd.gradcheck(function, (x, *weights, *states))


TORCH_CELLS = {
    "lstm": torch.nn.LSTM,
    "lstm_proj": lambda *args, **kw: torch.nn.LSTM(*args, proj_size=2, **kw),
    "gru": torch.nn.GRU,
    "rnn_tanh": lambda *args, **kw: torch.nn.RNN(*args, nonlinearity="tanh", **kw),
    "rnn_relu": lambda *args, **kw: torch.nn.RNN(*args, nonlinearity="relu", **kw),
}


@pytest.mark.parametrize("cell", TORCH_CELLS)
def test_kernels_with_identity_masks_match_torch_nn(cell):
    """With the masks at their identity (keep every unit, zone out none) the kernels are the
    plain cells: the same outputs and gradients as torch.nn, both directions, with lengths."""
    torch.manual_seed(0)
    theirs = TORCH_CELLS[cell](3, 5, dtype=torch.float64)
    mine = rnnkit.from_torch(theirs)
    spec = mine.spec
    weights = [w for w in mine.cell_weights(0, 0) if w is not None]  # W_hr last, if any
    x = torch.randn(6, 4, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([6, 2, 5, 1])
    h0 = torch.randn(4, spec.proj_size or 5, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    lstm = cell.startswith("lstm")
    state = (h0, c0) if lstm else (h0,)
    output, final = regularized.run_direction(spec, x, state, weights, lengths, reverse=False)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    hx = (h0[None], c0[None]) if lstm else h0[None]
    expected_packed, expected_final = theirs(packed, hx)
    expected, _ = torch.nn.utils.rnn.pad_packed_sequence(expected_packed, total_length=6)
    expected_final = expected_final if lstm else (expected_final,)
    got = [output, *final]
    wanted = [expected, *(part[0] for part in expected_final)]
    for a, b in zip(got, wanted):
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-10), (a - b).abs().max()
    generator = torch.Generator().manual_seed(2)
    weights_out = [torch.randn(t.shape, generator=generator, dtype=t.dtype) for t in got]
    mine_grads = torch.autograd.grad(
        sum((t * w).sum() for t, w in zip(got, weights_out)), [x, *state, *weights]
    )
    theirs_grads = torch.autograd.grad(
        sum((t * w).sum() for t, w in zip(wanted, weights_out)),
        [x, *state, *theirs.parameters()],
    )
    for a, b in zip(mine_grads, theirs_grads):
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-10), (a - b).abs().max()


@pytest.mark.parametrize("cell", CELLS)
def test_batch_parts_match_the_reference_loop(cell, monkeypatch, outputs_and_gradients):
    """Uneven parts of the batch (as run concurrently with several torch threads) give the
    reference loop's numbers: each part walks its own rows of the shared arrays."""
    parts = [slice(0, 1), slice(1, 4), slice(4, 7)]
    monkeypatch.setattr(regularized, "_batch_parts", lambda batch, step_work, steps: parts)
    fused, reference = make_pair(cell, (0.3, (0.2, 0.4)), torch.float64)
    x = torch.randn(9, 7, 3, dtype=torch.float64, requires_grad=True)
    hx = initial_state(cell, 7)
    lengths = torch.tensor([9, 2, 5, 1, 9, 4, 7])
    got = outputs_and_gradients(fused, x, hx, lengths, seed=13)
    expected = outputs_and_gradients(reference, x, hx, lengths, seed=13)
    for index, (a, b) in enumerate(zip(got, expected)):
        assert torch.allclose(a, b, atol=1e-9, rtol=1e-9), (index, (a - b).abs().max())


@pytest.mark.parametrize("cell", ["lstm", "gru", "gru_reset_before", "rnn_tanh"])
def test_input_projected_in_chunks_of_steps_matches_the_reference_loop(
    cell, monkeypatch, outputs_and_gradients
):
    """The kernels project the input a chunk of steps at a time (about 2^16 elements: with 256
    units and 5 rows, 12 steps for the LSTM, 17 for the GRU, 51 for the RNN), each sequence's
    step read at its time position when walking backwards: 70 steps span several chunks, with
    a partial last one, in both directions with lengths."""
    monkeypatch.setattr(
        regularized, "_batch_parts", lambda batch, step_work, steps: [slice(0, 2), slice(2, 7)]
    )
    layer_class, options = CELLS[cell]
    options = options | {
        "bidirectional": True,
        "dtype": torch.float64,
        "recurrent_dropout": 0.3,
        "zoneout": 0.2,
    }
    torch.manual_seed(0)
    fused = layer_class(3, 256, backend="cpu", **options)
    reference = layer_class(3, 256, backend="reference", **options)
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(70, 7, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([70, 23, 64, 1, 70, 49, 12])
    hx = tuple(
        torch.randn(2, 7, 256, dtype=torch.float64, requires_grad=True)
        for _ in range(2 if cell == "lstm" else 1)
    )
    hx = hx if cell == "lstm" else hx[0]
    got = outputs_and_gradients(fused, x, hx, lengths, seed=5)
    expected = outputs_and_gradients(reference, x, hx, lengths, seed=5)
    for index, (a, b) in enumerate(zip(got, expected)):
        assert torch.allclose(a, b, atol=1e-9, rtol=1e-9), (index, (a - b).abs().max())


def test_kernels_first_imported_under_inference_mode_still_train():
    # rnnkit loads its CPU kernels on first use; when that use is under inference_mode, the
    # module-level tensors they keep must still be normal tensors, since training saves them.
    program = (
        "import sys, torch, rnnkit\n"
        "layer = rnnkit.LSTM(3, 4, recurrent_dropout=0.2, zoneout=0.1)\n"
        "x = torch.randn(5, 2, 3)\n"
        "with torch.inference_mode():\n"
        "    layer(x)\n"
        "assert 'rnnkit.kernels.cpu.regularized' in sys.modules\n"
        "layer(x)[0].sum().backward()\n"
        "print(float(layer.weight_hh_l0.grad.abs().sum()) > 0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "True"


FROZEN = {
    "W_ih": ("weight_ih",),
    "W_hh": ("weight_hh",),
    "W_hr": ("weight_hr",),
    "biases": ("bias_ih", "bias_hh"),
    "every weight": ("weight_ih", "weight_hh", "weight_hr"),
}


@pytest.mark.parametrize("frozen", FROZEN.values(), ids=FROZEN.keys())
@pytest.mark.parametrize("cell", ["lstm_proj", "gru", "gru_reset_before", "rnn_tanh"])
def test_frozen_parameters_are_skipped_and_the_other_gradients_match(
    cell, frozen, outputs_and_gradients
):
    # The backward computes no gradient of a frozen parameter; the others must not change.
    fused, reference = make_pair(cell, (0.3, 0.25), torch.float64)
    for layer in (fused, reference):
        for name, parameter in layer.named_parameters():
            parameter.requires_grad_(not name.startswith(frozen))
    x = torch.randn(6, 4, 3, dtype=torch.float64, requires_grad=True)
    hx = initial_state(cell, 4)
    lengths = torch.tensor([6, 2, 5, 1])
    got = outputs_and_gradients(fused, x, hx, lengths, seed=12)
    expected = outputs_and_gradients(reference, x, hx, lengths, seed=12)
    assert len(got) == len(expected)
    for index, (a, b) in enumerate(zip(got, expected)):
        assert torch.allclose(a, b, atol=1e-9, rtol=1e-9), (index, (a - b).abs().max())
