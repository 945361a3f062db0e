"""The packing space kept from call to call: per thread and slot, grown on demand."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import rnnkit
from rnnkit.kernels.cpu import blas, pack_space


def test_space_is_kept_per_slot_and_dtype_and_grows():
    pack_space._local.__dict__.pop("spaces", None)  # what earlier calls of this thread kept
    first = pack_space.space(0, 100, torch.float32)
    assert first.dtype == np.float32 and first.size >= 100
    assert pack_space.space(0, 50, torch.float32) is first
    assert pack_space.space(1, 50, torch.float32) is not first
    assert pack_space.space(0, 50, torch.float64).dtype == np.float64
    grown = pack_space.space(0, 1000, torch.float32)
    assert grown.size >= 1000 and grown is not first
    assert pack_space.empty(torch.float32).size == 0


def test_each_thread_has_its_own_space():
    mine = pack_space.space(0, 10, torch.float32)
    theirs = []
    thread = threading.Thread(target=lambda: theirs.append(pack_space.space(0, 10, torch.float32)))
    thread.start()
    thread.join()
    assert theirs[0] is not mine


def _assert_turns_match(layers, references, batch: int) -> None:
    """Two rounds of the layers taking turns on 10 steps, forward and backward: outputs, final
    states and gradients as the references (given the layers' weights here) give them."""
    for layer, reference in zip(layers, references):
        reference.load_state_dict(layer.state_dict())
    for _ in range(2):
        for layer, reference in zip(layers, references):
            x = torch.randn(10, batch, layer.input_size)
            output, state = layer(x)
            expected, expected_state = reference(x)
            torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(state, expected_state, rtol=1e-5, atol=1e-5)
            output.sum().backward()
            expected.sum().backward()
            for mine, theirs in zip(layer.parameters(), reference.parameters()):
                torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not blas.PACKED_GEMM, reason="no packed products without MKL")
@pytest.mark.parametrize("batch", [3, 9])  # on Intel CPUs, 9 rows take MKL's packed form
@pytest.mark.parametrize("bidirectional", [False, True])
def test_lstms_taking_turns_in_kept_space_match_torch_nn(bidirectional, batch):
    # Weights of 128 KiB and more (W_ih 512 x 80 and W_hh 512 x 128) are packed into kept space
    # from 8 steps on: layers of different weights, both directions, both weights and a
    # forward's space reused by the backward must not mix.
    pack_space._local.__dict__.pop("spaces", None)
    torch.manual_seed(0)
    layers = [rnnkit.LSTM(80, 128, bidirectional=bidirectional) for _ in range(2)]
    references = [torch.nn.LSTM(80, 128, bidirectional=bidirectional) for _ in range(2)]
    _assert_turns_match(layers, references, batch)
    kept = pack_space._local.spaces
    assert kept[(0, torch.float32)].size > 0 and kept[(1, torch.float32)].size > 0  # W_ih, W_hh


KEPT_SPACE_LAYERS = {  # every weight 128 KiB or more: packed into kept space from 8 steps on
    "GRU": lambda **options: rnnkit.GRU(96, 128, **options),
    "GRU, reset before": lambda **options: rnnkit.GRU(96, 128, reset_after=False, **options),
    "RNN": lambda **options: rnnkit.RNN(192, 192, **options),
}


@pytest.mark.skipif(not blas.PACKED_GEMM, reason="no packed products without MKL")
@pytest.mark.parametrize("parts", [1, 2])
@pytest.mark.parametrize("make", KEPT_SPACE_LAYERS.values(), ids=KEPT_SPACE_LAYERS.keys())
def test_grus_and_rnns_taking_turns_in_kept_space_match_the_reference(make, parts, monkeypatch):
    # Two layers of different weights taking turns, forward and backward, as one batch or as
    # two concurrent parts (each part packs into slots of its own): nothing may mix.
    from rnnkit.kernels.cpu import gru, rnn

    pack_space._local.__dict__.pop("spaces", None)
    if parts == 2:
        for module in (gru, rnn):
            monkeypatch.setattr(
                module, "_batch_parts", lambda batch, work, steps, dtype: [slice(0, 2), slice(2, 6)]
            )
    torch.manual_seed(0)
    layers = [make() for _ in range(2)]
    references = [make(backend="reference") for _ in range(2)]
    _assert_turns_match(layers, references, 6)
    kept = pack_space._local.spaces
    assert kept[(0, torch.float32)].size > 0 and kept[(1, torch.float32)].size > 0
