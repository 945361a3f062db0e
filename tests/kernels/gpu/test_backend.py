"""The gpu backend's contract with the dispatch, checked without running any kernel."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

import rnnkit
from rnnkit.spec import LayerSpec


def test_importing_and_running_rnnkit_on_cpu_does_not_import_triton():
    script = (
        "import sys, torch, rnnkit\n"
        "rnnkit.explain_backend(rnnkit.LSTM(3, 4), torch.randn(2, 1, 3))\n"
        "rnnkit.GRU(3, 4, backend='reference')(torch.randn(2, 1, 3))\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "assert 'rnnkit.kernels.gpu' not in sys.modules, 'gpu kernels imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    from rnnkit.kernels.gpu import backend

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = backend.unsupported_reason(LayerSpec("GRU", 4), torch.randn(2, 1, 3), None)
    if importlib.util.find_spec("triton") is None:
        assert "Triton is not installed" in reason
    else:
        assert "TRITON_INTERPRET=1" in reason


def test_missing_triton_is_a_reason_not_an_import_error(monkeypatch):
    from rnnkit.kernels.gpu import backend

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "triton" else real_find_spec(name, *args),
    )
    reason = backend.unsupported_reason(LayerSpec("LSTM", 4), torch.randn(2, 1, 3), None)
    assert reason == "Triton is not installed (pip install triton)"


def test_explicit_gpu_request_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layer = rnnkit.LSTM(3, 4, backend="gpu")
    with pytest.raises(RuntimeError, match="backend='gpu'"):
        layer(torch.randn(2, 1, 3))


def test_in_loop_regularisers_run_where_the_weights_fit_on_chip(monkeypatch):
    from rnnkit.kernels.gpu import backend

    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed: the backend stops at that reason first")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(2, 1, 3)
    spec = LayerSpec("GRU", 4, zoneout=(0.2, 0.0), training=False)
    assert backend.unsupported_reason(spec, x, None) is None
    spec = LayerSpec("LSTM", 4, recurrent_dropout=0.3, training=True)
    assert backend.unsupported_reason(spec, x, None) is None
    spec = LayerSpec("GRU", 4, reset_after=False, zoneout=(0.2, 0.0), training=False)
    assert backend.unsupported_reason(spec, x, None) == (
        "zoneout=(0.2, 0.0) (hidden, cell): the gpu kernels take them for the GRU with "
        "reset_after=True only"
    )
    spec = LayerSpec("RNN_TANH", 300, recurrent_dropout=0.3, training=True)
    assert backend.unsupported_reason(spec, x, None) == (
        "recurrent_dropout=0.3 in training: recurrent dropout and zoneout run in the gpu kernels "
        "that hold the recurrent weights on chip, which hidden_size=300 in torch.float32 does not "
        "fit on cpu"
    )


@pytest.mark.parametrize("make", [rnnkit.MinGRU, rnnkit.MinLSTM, rnnkit.IndRNN])
def test_element_wise_layers_ask_for_the_interpreter_on_cpu(make, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    name = make.__name__
    with pytest.raises(RuntimeError, match=f"{name}: backend='gpu' is unavailable: "):
        make(3, 4, backend="gpu")(torch.randn(2, 1, 3))
    with pytest.raises(ValueError, match="backend must be one of"):
        make(3, 4, backend="cuda")
