"""The fused CPU vanilla RNN (tanh and relu) against the reference loop and torch.nn.RNN."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnkit
from rnnkit.kernels.cpu import rnn as rnn_kernel
from rnnkit.kernels.cpu.rnn import FusedRNNFunction

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-9}


def assert_all_close(mine: list, theirs: list, dtype: torch.dtype) -> None:
    tol = TOLERANCE[dtype]
    assert len(mine) == len(theirs)
    for index, (a, b) in enumerate(zip(mine, theirs)):
        torch.testing.assert_close(
            a, b, atol=tol, rtol=tol, msg=lambda m, i=index: f"item {i}: {m}"
        )


def forward_backward(module, x, hx, lengths=None, packed=False) -> list[torch.Tensor]:
    """Output, h_n and the gradients of x, hx (if given) and every parameter for a fixed loss."""
    if packed:
        packed_x = pack_padded_sequence(
            x, lengths, batch_first=module.batch_first, enforce_sorted=False
        )
        output, h_n = module(packed_x, hx)
        total = x.size(1 if module.batch_first else 0)
        output, _ = pad_packed_sequence(output, batch_first=module.batch_first, total_length=total)
    elif lengths is not None:
        output, h_n = module(x, hx, lengths=lengths)
    else:
        output, h_n = module(x, hx)
    weights = torch.linspace(-1, 1, output.numel(), dtype=output.dtype).view(output.shape)
    loss = (output * weights).sum() + (h_n * h_n).sum()
    inputs = [x] + ([hx] if hx is not None else []) + list(module.parameters())
    return [output, h_n, *torch.autograd.grad(loss, inputs)]


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_layer_matches_torch_nn(nonlinearity, dtype):
    torch.manual_seed(0)
    # H = 40 at batch 4 also takes the BLAS branch of the recurrent matmul.
    theirs = nn.RNN(6, 40, num_layers=2, nonlinearity=nonlinearity, bidirectional=True, dtype=dtype)
    mine = rnnkit.from_torch(theirs, backend="cpu")
    x = torch.randn(12, 4, 6, dtype=dtype, requires_grad=True)
    hx = torch.randn(4, 4, 40, dtype=dtype, requires_grad=True)
    assert_all_close(forward_backward(mine, x, hx), forward_backward(theirs, x, hx), dtype)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_packed_input_matches_torch_nn(nonlinearity):
    dtype = torch.float64
    torch.manual_seed(1)
    theirs = nn.RNN(4, 6, nonlinearity=nonlinearity, bidirectional=True, dtype=dtype)
    mine = rnnkit.from_torch(theirs, backend="cpu")
    x = torch.randn(8, 5, 4, dtype=dtype, requires_grad=True)
    lengths = torch.tensor([3, 8, 1, 5, 8])
    assert_all_close(
        forward_backward(mine, x, None, lengths, packed=True),
        forward_backward(theirs, x, None, lengths, packed=True),
        dtype,
    )


@settings(max_examples=20, deadline=None)
@given(
    dtype=st.sampled_from([torch.float64, torch.float32]),
    nonlinearity=st.sampled_from(["tanh", "relu"]),
    steps=st.integers(1, 6),
    batch=st.integers(1, 4),
    input_size=st.integers(1, 5),
    hidden=st.integers(1, 6),
    num_layers=st.integers(1, 2),
    bidirectional=st.booleans(),
    batch_first=st.booleans(),
    bias=st.booleans(),
    give_hx=st.booleans(),
    input_kind=st.sampled_from(["full", "lengths", "packed"]),
    seed=st.integers(0, 2**16),
)
def test_random_layers_match_reference_and_torch_nn(
    dtype,
    nonlinearity,
    steps,
    batch,
    input_size,
    hidden,
    num_layers,
    bidirectional,
    batch_first,
    bias,
    give_hx,
    input_kind,
    seed,
):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    args = dict(
        num_layers=num_layers,
        nonlinearity=nonlinearity,
        bias=bias,
        batch_first=batch_first,
        bidirectional=bidirectional,
        dtype=dtype,
    )
    theirs = nn.RNN(input_size, hidden, **args)
    fused = rnnkit.from_torch(theirs, backend="cpu")
    reference = rnnkit.from_torch(theirs, backend="reference")
    shape = (batch, steps, input_size) if batch_first else (steps, batch, input_size)
    x = torch.randn(shape, dtype=dtype, generator=generator, requires_grad=True)
    hx = None
    if give_hx:
        hx_shape = (num_layers * (1 + bidirectional), batch, hidden)
        hx = torch.randn(hx_shape, dtype=dtype, generator=generator, requires_grad=True)
    lengths = None
    if input_kind != "full":
        lengths = torch.randint(1, steps + 1, (batch,), generator=generator)
    packed = input_kind == "packed"
    result = forward_backward(fused, x, hx, lengths, packed)
    assert_all_close(result, forward_backward(reference, x, hx, lengths, packed), dtype)
    if input_kind != "lengths":  # torch.nn takes variable lengths only as a PackedSequence
        assert_all_close(result, forward_backward(theirs, x, hx, lengths, packed), dtype)


def direction_inputs(steps, batch, input_size, hidden, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return torch.randn(*shape, dtype=dtype, generator=generator).requires_grad_(True)

    x = leaf(steps, batch, input_size)
    h0 = leaf(batch, hidden)
    weights = (leaf(hidden, input_size), leaf(hidden, hidden), leaf(hidden), leaf(hidden))
    return x, h0, weights


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("lengths", [None, [4, 2, 1]])
def test_gradcheck_through_the_autograd_function(nonlinearity, reverse, lengths):
    x, h0, (w_ih, w_hh, b_ih, b_hh) = direction_inputs(4, 3, 2, 3, seed=3)
    lengths = None if lengths is None else torch.tensor(lengths)
    relu = nonlinearity == "relu"

    def function(x, h0, w_ih, w_hh, b_ih, b_hh):
        return FusedRNNFunction.apply(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse, relu)

    assert torch.autograd.gradcheck(function, (x, h0, w_ih, w_hh, b_ih, b_hh))


def test_gradcheck_without_bias():
    x, h0, (w_ih, w_hh, _, _) = direction_inputs(3, 2, 2, 3, seed=4)

    def function(x, h0, w_ih, w_hh):
        return FusedRNNFunction.apply(x, h0, w_ih, w_hh, None, None, None, False, False)

    assert torch.autograd.gradcheck(function, (x, h0, w_ih, w_hh))


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_long_sequence_stays_finite_and_matches_reference(nonlinearity):
    torch.manual_seed(5)
    theirs = nn.RNN(3, 8, nonlinearity=nonlinearity, dtype=torch.float64)
    fused = rnnkit.from_torch(theirs, backend="cpu")
    reference = rnnkit.from_torch(theirs, backend="reference")
    x = torch.randn(2000, 2, 3, dtype=torch.float64, requires_grad=True)
    result = forward_backward(fused, x, None)
    assert all(bool(torch.isfinite(tensor).all()) for tensor in result)
    assert_all_close(result, forward_backward(reference, x, None), torch.float64)


def test_relu_gradient_at_zero_follows_torch():
    # x = 0, h0 = 0, biases = 0: every pre-activation is exactly 0, where torch's relu' is 0.
    x, h0, weights = direction_inputs(3, 2, 2, 3, seed=6)
    with torch.no_grad():
        for tensor in (x, h0, weights[2], weights[3]):
            tensor.zero_()
    grads = []
    for run in (rnn_kernel.run_direction, reference_direction):
        output, (final,) = run(x, (h0,), weights, None, False, "relu")
        loss = output.sum() + final.sum()
        grads.append(torch.autograd.grad(loss, [x, h0, *weights]))
    assert_all_close(list(grads[0]), list(grads[1]), torch.float64)
    assert all(bool((grad == 0).all()) for grad in grads[0])


def reference_direction(x, state, weights, lengths, reverse, nonlinearity):
    from functools import partial

    from rnnkit.cells import rnn_step
    from rnnkit.scan import scan_direction

    step = partial(rnn_step, nonlinearity=nonlinearity)
    return scan_direction(step, x, state, weights, lengths, reverse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tanh_is_accurate_over_its_whole_range(dtype):
    # W_ih = identity and W_hh = 0 make the layer's output tanh(x) as the kernel computes it.
    values = torch.cat(
        [
            torch.linspace(-25, 25, 20001, dtype=dtype),
            torch.logspace(-30, 1.5, 2000, dtype=dtype),
            -torch.logspace(-30, 1.5, 2000, dtype=dtype),
            torch.tensor([0.0, -0.0, 1e3, -1e3, float("inf"), float("-inf")], dtype=dtype),
        ]
    )
    x = values.view(-1, 1, 1)
    weights = (torch.ones(1, 1, dtype=dtype), torch.zeros(1, 1, dtype=dtype), None, None)
    output, _ = rnn_kernel.run_direction(x, (torch.zeros(1, 1, dtype=dtype),), weights, None, False)
    expected = torch.tanh(values.double())
    ulp = torch.finfo(dtype).eps * expected.abs().clamp_min(torch.finfo(dtype).tiny)
    error_in_ulp = (output.view(-1).double() - expected).abs() / ulp
    # float32: the rational tanh shared with the LSTM and GRU kernels (kernels/cpu/activations.py),
    # at most 2.8 ulp over this range (measured).
    assert float(error_in_ulp.max()) <= (3.0 if dtype == torch.float32 else 8.0)
    nan_out, _ = rnn_kernel.run_direction(
        torch.full((1, 1, 1), float("nan"), dtype=dtype),
        (torch.zeros(1, 1, dtype=dtype),),
        weights,
        None,
        False,
    )
    assert bool(nan_out.isnan().all())


def test_inference_keeps_no_graph_and_matches_training_path():
    x, h0, weights = direction_inputs(5, 3, 4, 6, seed=7)
    trained, (trained_final,) = rnn_kernel.run_direction(x, (h0,), weights, None, True)
    with torch.inference_mode():
        inferred, (inferred_final,) = rnn_kernel.run_direction(x, (h0,), weights, None, True)
    assert trained.grad_fn is not None and inferred.grad_fn is None
    assert torch.equal(trained, inferred) and torch.equal(trained_final, inferred_final)


def test_zero_batch_gives_empty_output_and_zero_weight_grads():
    x, h0, weights = direction_inputs(4, 0, 3, 5, seed=8)
    output, (final,) = rnn_kernel.run_direction(x, (h0,), weights, None, False)
    assert output.shape == (4, 0, 5) and final.shape == (0, 5)
    grads = torch.autograd.grad(output.sum() + final.sum(), list(weights))
    assert all(bool((grad == 0).all()) for grad in grads)


def test_changing_the_output_in_place_before_backward_is_caught():
    x, h0, weights = direction_inputs(3, 2, 2, 3, seed=9)
    output, _ = rnn_kernel.run_direction(x, (h0,), weights, None, False)
    loss = output.sum()
    with torch.no_grad():
        output.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_changing_a_weight_in_place_before_backward_is_caught():
    # The backward reads the forward's numpy arrays; unpacking the saved tensors still checks them.
    x, h0, weights = direction_inputs(3, 2, 2, 3, seed=9)
    output, _ = rnn_kernel.run_direction(x, (h0,), weights, None, False)
    loss = output.sum()
    with torch.no_grad():
        weights[1].add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_unknown_nonlinearity_is_rejected():
    x, h0, weights = direction_inputs(2, 1, 2, 2)
    with pytest.raises(ValueError, match="nonlinearity"):
        rnn_kernel.run_direction(x, (h0,), weights, None, False, "sigmoid")


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_auto_backend_uses_the_cpu_kernel(nonlinearity, monkeypatch):
    layer = rnnkit.RNN(3, 4, nonlinearity=nonlinearity)
    x = torch.randn(5, 2, 3)
    assert "fused cpu kernel" in rnnkit.explain_backend(layer, x)
    calls = []
    original = rnn_kernel.run_direction

    def spy(*args, **kwargs):
        calls.append(kwargs.get("nonlinearity"))
        return original(*args, **kwargs)

    monkeypatch.setattr(rnn_kernel, "run_direction", spy)
    layer(x)
    assert calls == [nonlinearity]


def test_warmup_compiles_what_batch_parts_call(monkeypatch):
    """After warmup a batch split into parts compiles nothing new, training with and without
    lengths, in float32 and float64."""
    rnn_kernel.warmup()
    kernels = (
        rnn_kernel._forward_part,
        rnn_kernel._pre_activation_grads,
        rnn_kernel._weight_gradients,
    )
    compiled = [len(kernel.signatures) for kernel in kernels]
    monkeypatch.setattr(
        rnn_kernel,
        "_batch_parts",
        lambda batch, step_work, steps, dtype: [slice(0, 1), slice(1, 3)],
    )
    for dtype in (torch.float32, torch.float64):
        for lengths in (None, torch.tensor([4, 2, 3])):
            x, h0, weights = direction_inputs(4, 3, 2, 5, dtype=dtype, seed=23)
            output, (final,) = rnn_kernel.run_direction(x, (h0,), weights, lengths, True, "relu")
            (output.sum() + final.sum()).backward()
    assert [len(kernel.signatures) for kernel in kernels] == compiled


@pytest.mark.parametrize("reverse", [False, True])
def test_strided_output_gradient_with_lengths_matches_reference(reverse):
    # An expanded (stride-0) output gradient is copied and overwritten in place by the kernel.
    x, h0, weights = direction_inputs(5, 3, 2, 4, seed=10)
    lengths = torch.tensor([2, 5, 3])
    grad_output = torch.randn(1, 3, 4, dtype=torch.float64).expand(5, 3, 4)
    grads = []
    for run in (rnn_kernel.run_direction, reference_direction):
        output, (final,) = run(x, (h0,), weights, lengths, reverse, "tanh")
        grads.append(torch.autograd.grad((output, final), [x, h0, *weights], (grad_output, final)))
    assert_all_close(list(grads[0]), list(grads[1]), torch.float64)


def test_double_backward_is_refused_rather_than_wrong():
    x, h0, weights = direction_inputs(3, 2, 2, 3, seed=11)
    output, _ = rnn_kernel.run_direction(x, (h0,), weights, None, False)
    (grad_x,) = torch.autograd.grad(output.sum(), [x], create_graph=True)
    with pytest.raises(RuntimeError):
        grad_x.sum().backward()


def test_bias_gradients_are_separate_tensors():
    layer = rnnkit.RNN(2, 3, backend="cpu")
    output, _ = layer(torch.randn(4, 1, 2))
    output.sum().backward()
    assert torch.equal(layer.bias_ih_l0.grad, layer.bias_hh_l0.grad)
    layer.bias_ih_l0.grad.add_(1)
    assert not torch.equal(layer.bias_ih_l0.grad, layer.bias_hh_l0.grad)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_batch_split_over_threads_matches_reference(nonlinearity, monkeypatch):
    # With two torch threads a batch of 10 runs as two concurrent parts of 5 (unless the BLAS is
    # OpenBLAS) once the step's product is large enough; the threshold is lowered so that this
    # small case splits.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    split = 1 if rnn_kernel.blas.LIBRARY.startswith("OpenBLAS") else 2
    try:
        parts, float64 = rnn_kernel._batch_parts, torch.float64
        work = 2 * rnn_kernel._MIN_PART_STEP_WORK
        assert len(parts(10, work, 8, float64)) == split
        assert len(parts(10, work // 2, 8, float64)) == 1
        assert len(parts(10, work, 7, float64)) == 1
        monkeypatch.setattr(rnn_kernel, "_MIN_PART_STEP_WORK", 1)
        assert len(parts(10, 10 * 24 * 24, 8, float64)) == split
        torch.manual_seed(12)
        args = dict(nonlinearity=nonlinearity, bidirectional=True, dtype=torch.float64)
        fused = rnnkit.RNN(6, 24, **args, backend="cpu")
        reference = rnnkit.RNN(6, 24, **args, backend="reference")
        reference.load_state_dict(fused.state_dict())
        x = torch.randn(8, 10, 6, dtype=torch.float64, requires_grad=True)
        hx = torch.randn(2, 10, 24, dtype=torch.float64, requires_grad=True)
        lengths = torch.tensor([8, 1, 5, 8, 3, 7, 2, 8, 6, 4])
        assert_all_close(
            forward_backward(fused, x, hx, lengths),
            forward_backward(reference, x, hx, lengths),
            torch.float64,
        )
        with torch.inference_mode():
            output, h_n = fused(x, hx, lengths=lengths)
        expected_output, expected_h_n = reference(x, hx, lengths=lengths)
        assert_all_close([output, h_n], [expected_output, expected_h_n], torch.float64)
    finally:
        torch.set_num_threads(threads)


def assert_fused_direction_matches_reference(x, h0, weights, lengths, reverse, grad_output):
    """The fused direction's output, final state and every gradient (for the given output
    gradient and a fixed one for the final state) equal the reference loop's, in float64."""
    grad_final = torch.randn(
        h0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4)
    )
    results = []
    for run in (rnn_kernel.run_direction, reference_direction):
        output, (final,) = run(x, (h0,), weights, lengths, reverse, "tanh")
        grads = torch.autograd.grad((output, final), [x, h0, *weights], (grad_output, grad_final))
        results.append([output, final, *grads])
    assert_all_close(results[0], results[1], torch.float64)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("expanded_gradient", [False, True])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_uneven_batch_parts_share_the_arrays_and_match_reference(
    reverse, expanded_gradient, with_lengths, monkeypatch
):
    """Parts of 1, 3 and 4 sequences each run their time loop on their rows of the shared
    output and gradient arrays; the projection and the gradients' products cover all rows. An
    expanded output gradient is copied and dP written over the copy; a contiguous one is not
    written to."""
    parts = [slice(0, 1), slice(1, 4), slice(4, 8)]
    monkeypatch.setattr(rnn_kernel, "_batch_parts", lambda batch, step_work, steps, dtype: parts)
    x, h0, weights = direction_inputs(6, 8, 3, 5, seed=21)
    lengths = torch.tensor([6, 2, 5, 1, 6, 3, 4, 6]) if with_lengths else None
    if expanded_gradient:
        grad_output = torch.randn(1, 8, 5, dtype=torch.float64).expand(6, 8, 5)
    else:
        grad_output = torch.randn(6, 8, 5, dtype=torch.float64)
    kept = grad_output.clone()
    assert_fused_direction_matches_reference(x, h0, weights, lengths, reverse, grad_output)
    assert torch.equal(grad_output, kept)


def test_batch_parts_project_their_input_in_chunks_of_steps(monkeypatch):
    """With 1024 units a part of 4 sequences projects 16 steps at a time, one of 3 sequences 21
    (projection.input_chunk_steps): 40 steps span several chunks, read backwards within each
    sequence's length. Weights scaled by 1/sqrt(fan-in): unscaled, 1024 units are chaotic, and
    any two summation orders part within a few steps."""
    parts = [slice(0, 1), slice(1, 4), slice(4, 8)]
    monkeypatch.setattr(rnn_kernel, "_batch_parts", lambda batch, step_work, steps, dtype: parts)
    x, h0, weights = direction_inputs(40, 8, 3, 1024, seed=22)
    weights = tuple((w.detach() / w.shape[-1] ** 0.5).requires_grad_() for w in weights)
    lengths = torch.tensor([40, 17, 33, 1, 40, 25, 39, 8])
    grad_output = torch.randn(40, 8, 1024, dtype=torch.float64)
    assert_fused_direction_matches_reference(x, h0, weights, lengths, True, grad_output)


def test_batch_parts_match_torch_nn(monkeypatch):
    """The parts path (uneven parts, each projecting 90 steps in chunks of 54 or 72 at 300
    units) against torch.nn.RNN: packed lengths, both directions, every gradient."""
    parts = [slice(0, 1), slice(1, 4), slice(4, 8)]
    monkeypatch.setattr(rnn_kernel, "_batch_parts", lambda batch, step_work, steps, dtype: parts)
    torch.manual_seed(24)
    theirs = nn.RNN(3, 300, bidirectional=True, dtype=torch.float64)
    mine = rnnkit.from_torch(theirs, backend="cpu")
    x = torch.randn(90, 8, 3, dtype=torch.float64, requires_grad=True)
    hx = torch.randn(2, 8, 300, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([90, 17, 63, 1, 90, 55, 89, 8])
    assert_all_close(
        forward_backward(mine, x, hx, lengths, packed=True),
        forward_backward(theirs, x, hx, lengths, packed=True),
        torch.float64,
    )
