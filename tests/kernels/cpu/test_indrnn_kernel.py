"""The fused IndRNN recurrence against its autograd loop, and its hand-derived backward."""

from __future__ import annotations

import pytest
import torch

from rnnkit.kernels.cpu import indrnn as indrnn_kernel
from rnnkit.kernels.cpu.indrnn import IndRNNFunction
from rnnkit.variants.indrnn import indrnn_step
from rnnkit.variants.sequence_input import step_loop


@pytest.mark.parametrize("nonlinearity", ["relu", "tanh"])
def test_gradcheck_of_the_fused_function(nonlinearity):
    torch.manual_seed(0)
    # Pre-activations away from relu's kink at 0, where finite differences are not derivatives.
    pre = (torch.rand(6, 3, 4, dtype=torch.float64) + 0.1).requires_grad_(True)
    h0 = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    u = (torch.rand(4, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    for lengths in (None, torch.tensor([6, 1, 4])):
        assert torch.autograd.gradcheck(
            lambda p, h, w, lengths=lengths: IndRNNFunction.apply(
                p, h, w, lengths, nonlinearity == "relu"
            ),
            (pre, h0, u),
        )


@pytest.mark.parametrize("nonlinearity", ["relu", "tanh"])
def test_fused_recurrence_matches_autograd_loop_in_float32(nonlinearity):
    torch.manual_seed(1)
    pre = torch.randn(200, 4, 16, requires_grad=True)
    h0 = torch.randn(4, 16, requires_grad=True)
    u = (torch.rand(16) * 2 - 1).requires_grad_(True)
    lengths = torch.tensor([200, 50, 1, 199])
    results = []
    for run in (
        lambda: indrnn_kernel.recurrence(pre, h0, u, lengths, nonlinearity),
        lambda: step_loop(lambda p, h: indrnn_step(p, h, u, nonlinearity), pre, h0, lengths),
    ):
        output, final = run()
        loss = (output * torch.linspace(-1, 1, output.numel()).view(output.shape)).sum()
        results.append([output, final, *torch.autograd.grad(loss + final.sum(), (pre, h0, u))])
    # du sums T * B float32 terms: the kernel in float64, autograd in float32, so 1e-4 relative.
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_unknown_nonlinearity_is_rejected():
    with pytest.raises(ValueError, match="nonlinearity must be one of"):
        indrnn_kernel.recurrence(torch.zeros(1, 1, 1), torch.zeros(1, 1), torch.zeros(1), None, "x")


def _outputs_and_grads(pre, h0, u, lengths, nonlinearity):
    output, final = indrnn_kernel.recurrence(pre, h0, u, lengths, nonlinearity)
    weights = torch.linspace(-1, 1, output.numel(), dtype=output.dtype).view(output.shape)
    loss = (output * weights).sum() + (final * final).sum()
    return [output, final, *torch.autograd.grad(loss, (pre, h0, u))]


@pytest.mark.parametrize("nonlinearity", ["relu", "tanh"])
@pytest.mark.parametrize("scale", [1.0, 20.0, 100.0, 1e4])
def test_float32_matches_float64_on_random_and_extreme_inputs(nonlinearity, scale):
    torch.manual_seed(2)
    pre64 = (scale * torch.randn(30, 4, 16, dtype=torch.float64)).float().double()
    h0_64 = torch.randn(4, 16, dtype=torch.float64).float().double()
    # |u| < 1 keeps relu's state from growing without bound over 30 steps.
    u64 = (torch.rand(16, dtype=torch.float64) * 1.8 - 0.9).float().double()
    lengths = torch.tensor([30, 7, 1, 0])
    results = []
    for dtype in (torch.float32, torch.float64):
        inputs = [t.to(dtype).requires_grad_(True) for t in (pre64, h0_64, u64)]
        results.append(_outputs_and_grads(*inputs, lengths, nonlinearity))
    for single, double in zip(*results, strict=True):
        assert torch.isfinite(single).all()
        torch.testing.assert_close(single.double(), double, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("nonlinearity", ["relu", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_in_a_projection_propagates_as_in_the_autograd_loop(nonlinearity, dtype):
    torch.manual_seed(3)
    pre = torch.randn(5, 2, 3, dtype=dtype)
    pre[2, 1, 1] = float("nan")
    h0 = torch.randn(2, 3, dtype=dtype)
    u = torch.rand(3, dtype=dtype) - 0.5
    nan_masks = []
    for fused in (True, False):
        p, h, w = (t.clone().requires_grad_(True) for t in (pre, h0, u))
        if fused:
            output, final = indrnn_kernel.recurrence(p, h, w, None, nonlinearity)
        else:
            output, final = step_loop(
                lambda x, s, w=w: indrnn_step(x, s, w, nonlinearity), p, h, None
            )
        loss = output.sum() + final.sum()
        nan_masks.append(
            [t.isnan() for t in (output, final, *torch.autograd.grad(loss, (p, h, w)))]
        )
    for fused, reference in zip(*nan_masks, strict=True):
        assert torch.equal(fused, reference)
    assert nan_masks[0][0][2:, 1, 1].all() and nan_masks[0][0].sum() == 3


@pytest.mark.parametrize("nonlinearity", ["relu", "tanh"])
def test_gradients_at_padded_steps_are_exactly_zero(nonlinearity):
    torch.manual_seed(4)
    pre = torch.randn(6, 3, 4, requires_grad=True)
    h0 = torch.randn(3, 4, requires_grad=True)
    u = (torch.rand(4) - 0.5).requires_grad_(True)
    output, final = indrnn_kernel.recurrence(pre, h0, u, torch.tensor([6, 2, 0]), nonlinearity)
    assert (output[2:, 1] == 0).all() and (output[:, 2] == 0).all()
    torch.testing.assert_close(final[2], h0[2])
    (output.sum() + final.sum()).backward()
    assert (pre.grad[2:, 1] == 0).all() and (pre.grad[:, 2] == 0).all()
    assert (pre.grad[:2, 1] != 0).any()
    torch.testing.assert_close(h0.grad[2], torch.ones(4))
