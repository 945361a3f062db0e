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
