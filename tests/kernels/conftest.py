"""Fixtures shared by the CPU and GPU kernel tests."""

from __future__ import annotations

import pytest
import torch


def _outputs_and_gradients(layer, x, hx, lengths, seed):
    """[output, *final state, dL/dx, dL/dhx..., dL/dparameter...] of layer(x, hx, lengths=...)
    under torch.manual_seed(seed), for a fixed random loss (the same for every layer); frozen
    parameters (requires_grad False) have no gradient in the list."""
    torch.manual_seed(seed)
    output, state = layer(x, hx, lengths=lengths)
    states = state if isinstance(state, tuple) else (state,)
    generator = torch.Generator().manual_seed(3)
    loss = (output * torch.randn(output.shape, generator=generator, dtype=x.dtype)).sum()
    for part in states:
        loss = loss + (part * torch.randn(part.shape, generator=generator, dtype=x.dtype)).sum()
    hx_parts = list(hx) if isinstance(hx, tuple) else [hx]
    trainable = [parameter for parameter in layer.parameters() if parameter.requires_grad]
    return [output, *states, *torch.autograd.grad(loss, [x, *hx_parts, *trainable])]


@pytest.fixture
def outputs_and_gradients():
    """The function above: a layer's outputs and every gradient, masks drawn from a seed."""
    return _outputs_and_gradients
