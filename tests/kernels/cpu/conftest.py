"""Fixtures shared by the CPU kernel tests."""

from __future__ import annotations

import pytest
import torch

import rnnkit


def _masks_act(layer, x):
    """Check that `layer` (built with recurrent dropout and zoneout) runs the fused kernel, draws
    fresh masks at each training call and none in eval; returns its eval output."""
    assert rnnkit.explain_backend(layer, x) == "auto: fused cpu kernel for cpu tensors"
    torch.manual_seed(1)
    first, _ = layer(x)
    second, _ = layer(x)
    assert not torch.allclose(first, second)  # fresh masks per call in training
    layer.eval()
    evaluated = layer(x)[0]
    assert torch.equal(evaluated, layer(x)[0])  # eval: zoneout's expectation, no randomness
    return evaluated


@pytest.fixture
def masks_act():
    """The function above."""
    return _masks_act
