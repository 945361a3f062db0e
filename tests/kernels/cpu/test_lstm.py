"""The fused CPU LSTM kernel against the reference loop, torch.nn.LSTM and finite differences."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import rnnkit
from rnnkit.cells import lstm_step
from rnnkit.kernels.cpu import lstm
from rnnkit.scan import scan_direction

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5}


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from threads, and idle OpenMP threads spinning on a loaded
    machine made the long reference loops several times slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(module, inputs, hx, lengths=None):
    """Output, final state and gradients of every input, state and parameter for one loss."""
    inputs = inputs.detach().clone().requires_grad_()
    hx = None if hx is None else tuple(part.detach().clone().requires_grad_() for part in hx)
    module.zero_grad()
    kwargs = {} if lengths is None else {"lengths": lengths}
    output, (h_n, c_n) = module(inputs, hx, **kwargs)
    weights = torch.linspace(-1, 1, output.numel(), dtype=output.dtype).view_as(output)
    loss = (output * weights).sum() + 0.7 * h_n.sum() - 0.3 * (c_n**2).sum()
    loss.backward()
    grads = [inputs.grad] + ([] if hx is None else [part.grad for part in hx])
    grads += [parameter.grad for parameter in module.parameters()]
    return [output, h_n, c_n, *grads]


def _run_packed(module, padded, lengths, hx):
    packed = pack_padded_sequence(padded, lengths, batch_first=True, enforce_sorted=False)
    packed = packed._replace(data=packed.data.detach().clone().requires_grad_())
    module.zero_grad()
    output, (h_n, c_n) = module(packed, hx)
    loss = (output.data * torch.linspace(-1, 1, output.data.numel()).view_as(output.data)).sum()
    (loss + 0.7 * h_n.sum() - 0.3 * (c_n**2).sum()).backward()
    return [output.data, h_n, c_n, packed.data.grad] + [p.grad for p in module.parameters()]


def _assert_all_close(actual, expected, dtype):
    tolerance = TOLERANCE[dtype]
    assert len(actual) == len(expected)
    for index, (mine, theirs) in enumerate(zip(actual, expected)):
        assert mine is not None and theirs is not None, f"gradient {index} missing"
        torch.testing.assert_close(mine, theirs, rtol=tolerance, atol=tolerance)


@pytest.mark.usefixtures("one_thread")
@settings(max_examples=20, deadline=None)
@given(
    input_size=st.integers(1, 4),
    hidden_size=st.integers(1, 6),
    use_proj=st.booleans(),
    num_layers=st.integers(1, 2),
    bidirectional=st.booleans(),
    batch_first=st.booleans(),
    bias=st.booleans(),
    with_hx=st.booleans(),
    batch=st.integers(1, 4),
    steps=st.integers(1, 6),
    length_mode=st.sampled_from(["none", "lengths", "packed"]),
    seed=st.integers(0, 2**16),
)
def test_matches_reference_and_torch_float64(
    input_size,
    hidden_size,
    use_proj,
    num_layers,
    bidirectional,
    batch_first,
    bias,
    with_hx,
    batch,
    steps,
    length_mode,
    seed,
):
    generator = torch.Generator().manual_seed(seed)
    proj_size = (seed % (hidden_size - 1)) + 1 if use_proj and hidden_size > 1 else 0
    torch.manual_seed(seed)
    theirs = nn.LSTM(
        input_size,
        hidden_size,
        num_layers,
        bias=bias,
        batch_first=batch_first,
        bidirectional=bidirectional,
        proj_size=proj_size,
        dtype=torch.float64,
    )
    fused = rnnkit.from_torch(theirs, backend="cpu")
    reference = rnnkit.from_torch(theirs, backend="reference")
    shape = (batch, steps, input_size) if batch_first else (steps, batch, input_size)
    inputs = torch.randn(shape, generator=generator, dtype=torch.float64)
    layers = num_layers * (2 if bidirectional else 1)
    hx = None
    if with_hx:
        hx = (
            torch.randn(layers, batch, proj_size or hidden_size, dtype=torch.float64),
            torch.randn(layers, batch, hidden_size, dtype=torch.float64),
        )
    lengths = torch.randint(1, steps + 1, (batch,), generator=generator)
    if length_mode == "none":
        expected = _run(theirs, inputs, hx)
        _assert_all_close(_run(fused, inputs, hx), expected, torch.float64)
        _assert_all_close(_run(reference, inputs, hx), expected, torch.float64)
    elif length_mode == "lengths":
        expected = _run(reference, inputs, hx, lengths)
        _assert_all_close(_run(fused, inputs, hx, lengths), expected, torch.float64)
    else:
        padded = inputs if batch_first else inputs.transpose(0, 1)
        for module in (theirs, fused):
            module.batch_first = True
        expected = _run_packed(theirs, padded, lengths, hx)
        _assert_all_close(_run_packed(fused, padded, lengths, hx), expected, torch.float64)


@pytest.mark.parametrize("steps", [5, 12])
@pytest.mark.parametrize("proj_size", [0, 24])
def test_float32_matches_torch_on_blas_sizes(proj_size, steps):
    # Batch 9, hidden 64: large enough that every product goes through BLAS; from
    # lstm._PACK_MIN_STEPS steps on, with MKL's packed weights.
    assert 5 < lstm._PACK_MIN_STEPS <= 12
    torch.manual_seed(0)
    theirs = nn.LSTM(20, 64, num_layers=2, bidirectional=True, proj_size=proj_size)
    fused = rnnkit.from_torch(theirs, backend="cpu")
    inputs = torch.randn(steps, 9, 20)
    _assert_all_close(_run(fused, inputs, None), _run(theirs, inputs, None), torch.float32)


def test_float32_lengths_match_reference_on_blas_sizes():
    torch.manual_seed(1)
    reference = rnnkit.LSTM(12, 64, bidirectional=True, proj_size=16, backend="reference")
    fused = rnnkit.LSTM(12, 64, bidirectional=True, proj_size=16, backend="cpu")
    fused.load_state_dict(reference.state_dict())
    inputs = torch.randn(6, 9, 12)
    lengths = torch.tensor([6, 2, 4, 1, 6, 5, 3, 5, 6])
    expected = _run(reference, inputs, None, lengths)
    _assert_all_close(_run(fused, inputs, None, lengths), expected, torch.float32)


def test_batch_split_over_threads_matches_reference(monkeypatch):
    # With two torch threads a batch of 10 runs as two concurrent parts of 5 (MKL builds) once the
    # step's product is large enough; the threshold is lowered so that this small case splits.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    split = 2 if lstm.BLAS_LIBRARY.startswith("MKL") else 1
    try:
        work, float64 = 2 * lstm._MIN_PART_STEP_WORK, torch.float64
        assert len(lstm._batch_parts(10, work, 8, float64)) == split
        assert len(lstm._batch_parts(10, work // 2, 8, float64)) == 1
        assert len(lstm._batch_parts(10, work, 3, float64)) == split
        assert len(lstm._batch_parts(10, work, 2, float64)) == 1  # few steps
        # Where MKL's threads run the whole batch's float32 product, short calls stay whole.
        threaded = lstm.blas.threaded_packed_product(10, work // 10, torch.float32)
        assert len(lstm._batch_parts(10, work, 3, torch.float32)) == (1 if threaded else split)
        monkeypatch.setattr(lstm, "_MIN_PART_STEP_WORK", 1)
        torch.manual_seed(5)
        reference = rnnkit.LSTM(6, 48, bidirectional=True, proj_size=12, dtype=torch.float64)
        reference.backend = "reference"
        fused = rnnkit.LSTM(6, 48, bidirectional=True, proj_size=12, dtype=torch.float64)
        fused.backend = "cpu"
        fused.load_state_dict(reference.state_dict())
        inputs = torch.randn(8, 10, 6, dtype=torch.float64)
        hx = (
            torch.randn(2, 10, 12, dtype=torch.float64),
            torch.randn(2, 10, 48, dtype=torch.float64),
        )
        lengths = torch.tensor([8, 1, 5, 8, 3, 7, 2, 8, 6, 4])
        expected = _run(reference, inputs, hx, lengths)
        _assert_all_close(_run(fused, inputs, hx, lengths), expected, torch.float64)
    finally:
        torch.set_num_threads(threads)


def _direction_inputs(proj_size, batch=3, steps=4, features=2, hidden=3):
    torch.manual_seed(3)
    out_width = proj_size or hidden

    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    x = leaf(steps, batch, features)
    state = (leaf(batch, out_width), leaf(batch, hidden))
    weights = (
        leaf(4 * hidden, features),
        leaf(4 * hidden, out_width),
        leaf(4 * hidden),
        leaf(4 * hidden),
        leaf(proj_size, hidden) if proj_size else None,
    )
    return x, state, weights


@pytest.mark.parametrize("proj_size", [0, 2])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("lengths", [None, [4, 1, 3]])
def test_gradcheck_direction(proj_size, reverse, lengths):
    x, state, weights = _direction_inputs(proj_size)
    lengths = None if lengths is None else torch.tensor(lengths)
    present = [w for w in weights if w is not None]

    def run(x, h0, c0, *present):
        it = iter(present)
        full = tuple(next(it) if w is not None else None for w in weights)
        output, (h_n, c_n) = lstm.run_direction(x, (h0, c0), full, lengths, reverse)
        return output, h_n, c_n

    assert torch.autograd.gradcheck(run, (x, *state, *present))


@pytest.mark.usefixtures("one_thread")
def test_long_sequence_stays_finite_and_matches_reference():
    x, state, weights = _direction_inputs(0, batch=2, steps=2000, features=3, hidden=5)
    lengths = torch.tensor([2000, 1500])
    outputs = []
    for runner in (lstm.run_direction, lambda *a: scan_direction(lstm_step, *a)):
        output, (h_n, c_n) = runner(x, state, weights, lengths, True)
        loss = output.sum() + h_n.sum() + c_n.sum()
        grads = torch.autograd.grad(loss, [x, *state, *[w for w in weights if w is not None]])
        outputs.append([output, h_n, c_n, *grads])
    for tensor in outputs[0]:
        assert torch.isfinite(tensor).all()
    _assert_all_close(outputs[0], outputs[1], torch.float64)


def test_inference_saves_nothing_and_matches():
    x, state, weights = _direction_inputs(2)
    with torch.no_grad():
        output, (h_n, c_n) = lstm.run_direction(x, state, weights, None, False)
    assert output.grad_fn is None and h_n.grad_fn is None
    with torch.inference_mode():
        again, _ = lstm.run_direction(x, state, weights, None, False)
    expected, (h_ref, c_ref) = scan_direction(lstm_step, x, state, weights, None, False)
    _assert_all_close([output, h_n, c_n, again], [expected, h_ref, c_ref, expected], torch.float64)


def test_empty_batch_and_separate_bias_gradients():
    layer = rnnkit.LSTM(3, 4, backend="cpu")
    output, (h_n, _) = layer(torch.randn(5, 0, 3))
    assert output.shape == (5, 0, 4) and h_n.shape == (1, 0, 4)
    output, _ = layer(torch.randn(5, 2, 3))
    output.sum().backward()
    torch.testing.assert_close(layer.bias_ih_l0.grad, layer.bias_hh_l0.grad)
    assert layer.bias_ih_l0.grad.data_ptr() != layer.bias_hh_l0.grad.data_ptr()


def test_explain_backend_picks_the_cpu_kernel():
    layer = rnnkit.LSTM(3, 4, proj_size=2)
    reason = rnnkit.explain_backend(layer, torch.randn(5, 2, 3))
    assert "fused cpu kernel" in reason


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_inference_over_several_input_chunks_matches_reference(dtype):
    # Batch 9 makes chunks of 56 steps (512 // 9): 70 steps are one full and one partial chunk.
    torch.manual_seed(4)
    reference = rnnkit.LSTM(5, 64, bidirectional=True, proj_size=20, dtype=dtype)
    reference.backend = "reference"
    fused = rnnkit.LSTM(5, 64, bidirectional=True, proj_size=20, dtype=dtype, backend="cpu")
    fused.load_state_dict(reference.state_dict())
    inputs = torch.randn(70, 9, 5, dtype=dtype)
    lengths = torch.tensor([70, 3, 56, 57, 1, 69, 70, 12, 40])
    with torch.no_grad():
        expected = reference(inputs, lengths=lengths)
        actual = fused(inputs, lengths=lengths)
    _assert_all_close([actual[0], *actual[1]], [expected[0], *expected[1]], dtype)


@pytest.mark.parametrize("frozen", [None, "weight_hh_l0", "weight_ih_l0"])
@pytest.mark.parametrize("parts", [1, 2])
def test_float32_training_over_several_backward_chunks_matches_torch(monkeypatch, frozen, parts):
    # Batch 9 makes backward chunks of 29 steps (256 rows): 70 steps are two full chunks and a
    # partial one, whose weight gradients must add up over every chunk, both directions and
    # both parts of the batch, with one weight frozen or none.
    threads = torch.get_num_threads()
    torch.set_num_threads(parts)
    monkeypatch.setattr(lstm, "_MIN_PART_STEP_WORK", 1)
    try:
        torch.manual_seed(6)
        theirs = nn.LSTM(7, 20, bidirectional=True, proj_size=12, batch_first=True)
        fused = rnnkit.from_torch(theirs, backend="cpu")
        for module in (theirs, fused):
            if frozen is not None:
                getattr(module, frozen).requires_grad_(False)
        padded = torch.randn(9, 70, 7)
        lengths = torch.tensor([70, 3, 56, 58, 1, 69, 70, 29, 30])
        expected = _run_packed(theirs, padded, lengths, None)
        actual = _run_packed(fused, padded, lengths, None)
        expected = [t for t in expected if t is not None]
        actual = [t for t in actual if t is not None]
        _assert_all_close(actual, expected, torch.float32)
    finally:
        torch.set_num_threads(threads)
