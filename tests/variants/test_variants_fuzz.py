"""Fuzzing the variant layers: the fused CPU kernels against the reference loop, with random
shapes, layouts, lengths, states and every regulariser at once, in training and in eval.

Both paths draw the same masks for the same seed, so outputs, final states and every gradient
must agree in float64. Layer norms over a few near-equal values can make gradients huge (1e29
was seen with hidden size 7 and input dropout), so the tolerance is relative to each tensor's
largest entry.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rnnkit

LAYERS = {
    "LSTM": rnnkit.LSTM,
    "GRU": rnnkit.GRU,
    "RNN": rnnkit.RNN,
    "LayerNormLSTM": rnnkit.LayerNormLSTM,
    "LayerNormGRU": rnnkit.LayerNormGRU,
}
TWO_STATE_PARTS = ("LSTM", "LayerNormLSTM")

cases = st.fixed_dictionaries(
    {
        "layer": st.sampled_from(sorted(LAYERS)),
        "steps": st.integers(1, 6),
        "batch": st.integers(1, 5),
        "input_size": st.integers(1, 4),
        "hidden_size": st.integers(1, 8),
        "num_layers": st.integers(1, 2),
        "bidirectional": st.booleans(),
        "batch_first": st.booleans(),
        "recurrent_dropout": st.sampled_from([0.0, 0.3]),
        "zoneout": st.sampled_from([0.0, 0.2, (0.1, 0.3)]),
        "input_dropout": st.sampled_from([0.0, 0.2]),
        "weight_drop": st.sampled_from([0.0, 0.25]),
        "dropout": st.sampled_from([0.0, 0.3]),
        "training": st.booleans(),
        "with_hx": st.booleans(),
        "with_lengths": st.booleans(),
        "seed": st.integers(0, 2**16),
    }
)


def run(layer, x, hx, lengths, seed: int) -> list[torch.Tensor]:
    """Output, final state parts and the gradients of x, hx and the parameters."""
    torch.manual_seed(seed)  # the masks
    output, state = layer(x, hx, lengths=lengths) if lengths is not None else layer(x, hx)
    parts = state if isinstance(state, tuple) else (state,)
    weights = torch.linspace(-1, 1, output.numel(), dtype=output.dtype).view_as(output)
    loss = (output * weights).sum() + sum((part * part).sum() for part in parts)
    hx_parts = [] if hx is None else list(hx) if isinstance(hx, tuple) else [hx]
    inputs = [x, *hx_parts, *layer.parameters()]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [output, *parts, *(g if g is not None else torch.zeros(()) for g in grads)]


@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=cases)
def test_fused_variants_match_the_reference_loop_with_the_same_masks(case):
    name = case["layer"]
    zoneout = case["zoneout"]
    if name not in TWO_STATE_PARTS and isinstance(zoneout, tuple):
        zoneout = zoneout[0]
    options = {
        "num_layers": case["num_layers"],
        "bidirectional": case["bidirectional"],
        "batch_first": case["batch_first"],
        "recurrent_dropout": case["recurrent_dropout"],
        "zoneout": zoneout,
        "input_dropout": case["input_dropout"],
        "weight_drop": case["weight_drop"],
        "dropout": case["dropout"] if case["num_layers"] > 1 else 0.0,
        "dtype": torch.float64,
    }
    size = (case["input_size"], case["hidden_size"])
    torch.manual_seed(case["seed"])
    fused = LAYERS[name](*size, backend="cpu", **options)
    reference = LAYERS[name](*size, backend="reference", **options)
    reference.load_state_dict(fused.state_dict())
    fused.train(case["training"])
    reference.train(case["training"])
    steps, batch = case["steps"], case["batch"]
    shape = (batch, steps) if case["batch_first"] else (steps, batch)
    x = torch.randn(*shape, case["input_size"], dtype=torch.float64, requires_grad=True)
    hx = None
    if case["with_hx"]:
        layers = case["num_layers"] * (2 if case["bidirectional"] else 1)
        parts = 2 if name in TWO_STATE_PARTS else 1
        state_shape = (layers, batch, case["hidden_size"])
        made = [
            torch.randn(state_shape, dtype=torch.float64, requires_grad=True) for _ in range(parts)
        ]
        hx = tuple(made) if parts == 2 else made[0]
    lengths = torch.randint(1, steps + 1, (batch,)) if case["with_lengths"] else None
    got = run(fused, x, hx, lengths, case["seed"] + 1)
    expected = run(reference, x, hx, lengths, case["seed"] + 1)
    assert len(got) == len(expected)
    for index, (a, b) in enumerate(zip(got, expected)):
        scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
        torch.testing.assert_close(a, b, atol=1e-9 * scale, rtol=0, msg=f"tensor {index}: {case}")
