"""One dispatch picks the backend and says why."""

from __future__ import annotations

import pytest
import torch

import rnnkit
from rnnkit import dispatch
from rnnkit.scan import reverse_padded


def test_reference_is_explained():
    layer = rnnkit.LSTM(3, 4, backend="reference")
    assert "reference" in rnnkit.explain_backend(layer, torch.randn(2, 1, 3))


def test_auto_names_the_backend_it_chose():
    layer = rnnkit.GRU(3, 4)
    text = rnnkit.explain_backend(layer, torch.randn(2, 1, 3))
    assert text == "auto: fused cpu kernel for cpu tensors"


def test_explain_validates_input():
    with pytest.raises(ValueError, match="input_size=3"):
        rnnkit.explain_backend(rnnkit.GRU(3, 4), torch.randn(2, 1, 5))


def test_gpu_backend_on_cpu_tensor_fails_clearly(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layer = rnnkit.RNN(3, 4, backend="gpu")
    with pytest.raises(RuntimeError, match="backend='gpu'"):
        layer(torch.randn(2, 1, 3))


def test_reverse_padded_reverses_within_lengths_only():
    x = torch.arange(8.0).reshape(4, 2, 1)  # (T=4, B=2)
    out = reverse_padded(x, torch.tensor([4, 2]))
    assert out[:, 0, 0].tolist() == [6.0, 4.0, 2.0, 0.0]
    assert out[:, 1, 0].tolist() == [3.0, 1.0, 5.0, 7.0]
    assert torch.equal(reverse_padded(out, torch.tensor([4, 2])), x)


def test_backend_names():
    assert dispatch.BACKENDS == ("auto", "reference", "cpu", "gpu")


@pytest.mark.parametrize("make", [rnnkit.MinGRU, rnnkit.MinLSTM, rnnkit.IndRNN])
def test_explain_backend_covers_the_element_wise_variants(make):
    x = torch.randn(5, 2, 3)
    assert rnnkit.explain_backend(make(3, 4), x) == "auto: fused cpu kernel for cpu tensors"
    reference = make(3, 4, backend="reference")
    assert rnnkit.explain_backend(reference, x) == "backend='reference' was requested"
