"""The fused CPU GRU (both reset_after forms) against the reference loop and torch.nn.GRU."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnkit
from rnnkit.kernels.cpu import gru as gru_kernel

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-9}


def assert_all_close(mine, theirs, dtype: torch.dtype) -> None:
    tol = TOLERANCE[dtype]
    for a, b in zip(mine, theirs, strict=True):
        if a is None or b is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def forward_backward(module, x, hx, lengths=None, packed=False):
    """Output, final state and the gradients of x, hx and every trainable parameter for a fixed
    loss."""
    if packed:
        inp = pack_padded_sequence(x, lengths, batch_first=module.batch_first, enforce_sorted=False)
        output, h_n = module(inp, hx)
        total = x.size(1 if module.batch_first else 0)
        output, _ = pad_packed_sequence(output, batch_first=module.batch_first, total_length=total)
    elif lengths is not None:
        output, h_n = module(x, hx, lengths=lengths)
    else:
        output, h_n = module(x, hx)
    output_weights = torch.linspace(-1, 1, output.numel(), dtype=output.dtype)
    loss = (output * output_weights.view(output.shape)).sum() + (h_n * h_n).sum()
    trainable = [parameter for parameter in module.parameters() if parameter.requires_grad]
    inputs = [x] + ([hx] if hx is not None else []) + trainable
    grads = torch.autograd.grad(loss, inputs)
    return [output, h_n, *grads]


def fused_and_reference(input_size: int, hidden: int, **options) -> tuple[nn.Module, nn.Module]:
    """A GRU on the fused CPU kernel and one on the reference loop, with the same weights."""
    mine = rnnkit.GRU(input_size, hidden, **options, backend="cpu")
    reference = rnnkit.GRU(input_size, hidden, **options, backend="reference")
    reference.load_state_dict(mine.state_dict())
    return mine, reference


def assert_matches_reference(mine, reference, x, hx, lengths, dtype=torch.float64) -> None:
    """The two layers' outputs, final states and trainable gradients agree."""
    assert_all_close(
        forward_backward(mine, x, hx, lengths), forward_backward(reference, x, hx, lengths), dtype
    )


def random_lengths(batch: int, steps: int, generator: torch.Generator) -> torch.Tensor:
    lengths = torch.randint(1, steps + 1, (batch,), generator=generator)
    lengths[0] = steps
    return lengths


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_layer_matches_torch_nn(dtype, bidirectional):
    torch.manual_seed(0)
    theirs = nn.GRU(5, 7, num_layers=2, bidirectional=bidirectional, batch_first=True, dtype=dtype)
    mine = rnnkit.from_torch(theirs, backend="cpu")
    x = torch.randn(3, 9, 5, dtype=dtype, requires_grad=True)
    hx = torch.randn(2 * (1 + bidirectional), 3, 7, dtype=dtype, requires_grad=True)
    assert_all_close(forward_backward(mine, x, hx), forward_backward(theirs, x, hx), dtype)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_input_matches_torch_nn(bidirectional):
    dtype = torch.float64
    torch.manual_seed(1)
    theirs = nn.GRU(4, 6, bidirectional=bidirectional, dtype=dtype)
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
    dtype=st.sampled_from([torch.float32, torch.float64]),
    reset_after=st.booleans(),
    input_size=st.integers(1, 6),
    hidden_size=st.integers(1, 9),
    num_layers=st.integers(1, 2),
    bidirectional=st.booleans(),
    batch_first=st.booleans(),
    bias=st.booleans(),
    batch=st.integers(1, 4),
    steps=st.integers(1, 7),
    with_hx=st.booleans(),
    lengths_mode=st.sampled_from(["none", "lengths", "packed"]),
    seed=st.integers(0, 2**16),
)
def test_matches_reference(
    dtype,
    reset_after,
    input_size,
    hidden_size,
    num_layers,
    bidirectional,
    batch_first,
    bias,
    batch,
    steps,
    with_hx,
    lengths_mode,
    seed,
):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    args = dict(
        input_size=input_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        bias=bias,
        batch_first=batch_first,
        bidirectional=bidirectional,
        dtype=dtype,
        reset_after=reset_after,
    )
    mine = rnnkit.GRU(**args, backend="cpu")
    reference = rnnkit.GRU(**args, backend="reference")
    reference.load_state_dict(mine.state_dict())
    shape = (batch, steps, input_size) if batch_first else (steps, batch, input_size)
    x = torch.randn(shape, dtype=dtype, generator=generator, requires_grad=True)
    hx = None
    if with_hx:
        state_shape = (num_layers * (1 + bidirectional), batch, hidden_size)
        hx = torch.randn(state_shape, dtype=dtype, generator=generator, requires_grad=True)
    lengths = None if lengths_mode == "none" else random_lengths(batch, steps, generator)
    packed = lengths_mode == "packed"
    assert_all_close(
        forward_backward(mine, x, hx, lengths, packed),
        forward_backward(reference, x, hx, lengths, packed),
        dtype,
    )


# Each size takes another branch of the per-step product: batch 17 plain OpenBLAS, batch 32
# the transposed product with a plain and (hidden 344) a tiled transpose back.
@pytest.mark.parametrize(
    "batch,hidden,dtype",
    [
        (17, 40, torch.float64),
        (17, 40, torch.float32),
        (32, 24, torch.float64),
        (32, 24, torch.float32),
        (32, 344, torch.float32),
    ],
)
@pytest.mark.parametrize("reset_after", [True, False])
def test_blas_sized_steps_match_reference(batch, hidden, dtype, reset_after):
    torch.manual_seed(6)
    args = dict(bidirectional=True, dtype=dtype, reset_after=reset_after)
    mine, reference = fused_and_reference(8, hidden, **args)
    x = torch.randn(3, batch, 8, dtype=dtype, requires_grad=True)
    hx = torch.randn(2, batch, hidden, dtype=dtype, requires_grad=True)
    lengths = random_lengths(batch, 3, torch.Generator().manual_seed(6))
    assert_matches_reference(mine, reference, x, hx, lengths, dtype)


@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("reverse", [False, True])
def test_gradcheck_autograd_function(reset_after, reverse):
    torch.manual_seed(2)
    steps, batch, inputs, hidden = 4, 3, 2, 3

    def make(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    args = (
        make(steps, batch, inputs),
        make(batch, hidden),
        make(3 * hidden, inputs),
        make(3 * hidden, hidden),
        make(3 * hidden),
        make(3 * hidden),
    )
    lengths = torch.tensor([4, 1, 3])

    def function(*tensors):
        return gru_kernel.GRUFunction.apply(*tensors, lengths, reverse, reset_after)

    assert torch.autograd.gradcheck(function, args, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("reset_after", [True, False])
def test_input_projected_in_chunks_of_steps_matches_reference(reset_after):
    """With 1024 units (3072 gate columns) the kernel projects 32 // batch rows' steps at a
    time (projection.input_chunk_steps): 40 steps span several chunks, in both directions,
    with lengths."""
    torch.manual_seed(8)
    args = dict(bidirectional=True, dtype=torch.float64, reset_after=reset_after)
    mine, reference = fused_and_reference(3, 1024, **args)
    x = torch.randn(40, 8, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([40, 17, 33, 1, 40, 25, 39, 8])
    assert_matches_reference(mine, reference, x, None, lengths)


def test_input_projected_in_chunks_of_steps_matches_torch_nn():
    """The same chunked projection against torch.nn.GRU (torch's reset-after form), with packed
    lengths."""
    torch.manual_seed(9)
    theirs = nn.GRU(3, 1024, bidirectional=True, dtype=torch.float64)
    mine = rnnkit.from_torch(theirs, backend="cpu")
    x = torch.randn(40, 8, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([40, 17, 33, 1, 40, 25, 39, 8])
    assert_all_close(
        forward_backward(mine, x, None, lengths, packed=True),
        forward_backward(theirs, x, None, lengths, packed=True),
        torch.float64,
    )


@pytest.mark.parametrize("reset_after", [True, False])
def test_long_sequence_stays_finite_and_matches_reference(reset_after):
    torch.manual_seed(3)
    dtype = torch.float64
    mine = rnnkit.GRU(3, 4, dtype=dtype, reset_after=reset_after, backend="cpu")
    reference = rnnkit.GRU(3, 4, dtype=dtype, reset_after=reset_after, backend="reference")
    reference.load_state_dict(mine.state_dict())
    x = torch.randn(2000, 2, 3, dtype=dtype, requires_grad=True)
    mine_results = forward_backward(mine, x, None)
    assert all(torch.isfinite(t).all() for t in mine_results)
    assert_all_close(mine_results, forward_backward(reference, x, None), dtype)


@pytest.mark.parametrize("reset_after", [True, False])
def test_inference_path_matches_training_path(reset_after):
    torch.manual_seed(4)
    layer = rnnkit.GRU(5, 6, bidirectional=True, reset_after=reset_after, backend="cpu")
    x = torch.randn(7, 3, 5)
    lengths = torch.tensor([7, 2, 5])
    output, h_n = layer(x, lengths=lengths)
    assert output.requires_grad
    with torch.inference_mode():
        output_inference, h_n_inference = layer(x, lengths=lengths)
    torch.testing.assert_close(output_inference, output.detach(), rtol=0, atol=0)
    torch.testing.assert_close(h_n_inference, h_n.detach(), rtol=0, atol=0)
    assert bool((output_inference[2:, 1] == 0).all())


def test_padding_outputs_zero_and_final_state_at_last_valid_step():
    torch.manual_seed(5)
    layer = rnnkit.GRU(2, 3, batch_first=True, backend="cpu")
    x = torch.randn(2, 6, 2)
    output, h_n = layer(x, lengths=[6, 3])
    assert bool((output[1, 3:] == 0).all())
    torch.testing.assert_close(h_n[0, 1], output[1, 2])
    alone, h_alone = layer(x[1:, :3])
    torch.testing.assert_close(h_n[0, 1], h_alone[0, 0])


def test_auto_backend_uses_cpu_kernel():
    layer = rnnkit.GRU(3, 4)
    x = torch.randn(5, 2, 3)
    assert "fused cpu kernel" in rnnkit.explain_backend(layer, x)
    layer_original_form = rnnkit.GRU(3, 4, reset_after=False)
    assert "fused cpu kernel" in rnnkit.explain_backend(layer_original_form, x)


def test_input_without_grad_still_gives_weight_grads():
    torch.manual_seed(7)
    mine = rnnkit.GRU(3, 5, reset_after=False, backend="cpu")
    reference = rnnkit.GRU(3, 5, reset_after=False, backend="reference")
    reference.load_state_dict(mine.state_dict())
    x = torch.randn(4, 2, 3)
    for module in (mine, reference):
        output, h_n = module(x)
        (output.sum() + h_n.sum()).backward()
    for a, b in zip(mine.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)


def test_empty_batch_runs_forward_and_backward():
    layer = rnnkit.GRU(3, 4, backend="cpu")
    x = torch.randn(5, 0, 3, requires_grad=True)
    output, h_n = layer(x)
    assert output.shape == (5, 0, 4) and h_n.shape == (1, 0, 4)
    (output.sum() + h_n.sum()).backward()
    assert bool((layer.weight_hh_l0.grad == 0).all())


def test_warmup_runs():
    gru_kernel.warmup()


@pytest.mark.parametrize("reset_after", [True, False])
def test_batch_split_over_threads_matches_reference(reset_after, monkeypatch):
    # With two torch threads a batch of 10 runs as two concurrent parts of 5 (unless the BLAS is
    # OpenBLAS) once the step's product is large enough; the threshold is lowered so that this
    # small case splits.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    split = 1 if gru_kernel.blas.LIBRARY.startswith("OpenBLAS") else 2
    try:
        parts, float64 = gru_kernel._batch_parts, torch.float64
        work = 2 * gru_kernel._MIN_PART_STEP_WORK
        assert len(parts(10, work, 8, float64)) == split
        assert len(parts(10, work // 2, 8, float64)) == 1
        assert len(parts(10, work, 7, float64)) == 1
        monkeypatch.setattr(gru_kernel, "_MIN_PART_STEP_WORK", 1)
        assert len(parts(10, 10 * 3 * 24 * 24, 8, float64)) == split
        torch.manual_seed(8)
        args = dict(bidirectional=True, dtype=torch.float64, reset_after=reset_after)
        mine, reference = fused_and_reference(6, 24, **args)
        x = torch.randn(8, 10, 6, dtype=torch.float64, requires_grad=True)
        hx = torch.randn(2, 10, 24, dtype=torch.float64, requires_grad=True)
        lengths = torch.tensor([8, 1, 5, 8, 3, 7, 2, 8, 6, 4])
        assert_matches_reference(mine, reference, x, hx, lengths)
        with torch.inference_mode():
            output, h_n = mine(x, hx, lengths=lengths)
        expected_output, expected_h_n = reference(x, hx, lengths=lengths)
        assert_all_close([output, h_n], [expected_output, expected_h_n], torch.float64)
    finally:
        torch.set_num_threads(threads)


FROZEN = {
    "W_ih": ("weight_ih",),
    "W_hh": ("weight_hh",),
    "biases": ("bias_ih", "bias_hh"),
    "every parameter": ("weight_ih", "weight_hh", "bias_ih", "bias_hh"),
}


@pytest.mark.parametrize("frozen", FROZEN.values(), ids=FROZEN.keys())
@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("parts", [1, 2])
def test_frozen_parameters_are_skipped_and_the_other_gradients_match(
    frozen, reset_after, parts, monkeypatch
):
    # The kernel computes no gradient of a frozen parameter; what it still computes (dx, dh0, the
    # others) must not depend on the skipped products (torch's form scales dL/da_n by r in place
    # for W_hn's and b_hn's gradients).
    threads = torch.get_num_threads()
    torch.set_num_threads(parts)
    monkeypatch.setattr(gru_kernel, "_MIN_PART_STEP_WORK", 1)
    try:
        torch.manual_seed(9)
        args = dict(bidirectional=True, dtype=torch.float64, reset_after=reset_after)
        mine, reference = fused_and_reference(6, 10, **args)
        for module in (mine, reference):
            for name, parameter in module.named_parameters():
                parameter.requires_grad_(not name.startswith(frozen))
        x = torch.randn(12, 8, 6, dtype=torch.float64, requires_grad=True)
        hx = torch.randn(2, 8, 10, dtype=torch.float64, requires_grad=True)
        lengths = torch.tensor([12, 1, 5, 12, 3, 7, 2, 9])
        assert_matches_reference(mine, reference, x, hx, lengths)
        if reset_after:  # torch's form: torch.nn.GRU, packed, with the same parameters frozen
            theirs = nn.GRU(6, 10, bidirectional=True, dtype=torch.float64)
            theirs.load_state_dict(mine.state_dict())
            for name, parameter in theirs.named_parameters():
                parameter.requires_grad_(not name.startswith(frozen))
            assert_all_close(
                forward_backward(mine, x, hx, lengths, packed=True),
                forward_backward(theirs, x, hx, lengths, packed=True),
                torch.float64,
            )
    finally:
        torch.set_num_threads(threads)
