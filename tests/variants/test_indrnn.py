"""IndRNN against the paper's equation, the fused kernel against the reference loop, and its API."""

from __future__ import annotations

import pytest
import torch

import rnnkit
from rnnkit.variants.indrnn import IndRNN


def paper_layer(module, x, hx, lengths):
    """h_t = act(W x_t + u * h_{t-1} + b) for each sequence alone, over its own valid steps."""
    steps, batch, _ = x.shape
    directions = module.directions
    act = torch.relu if module.nonlinearity == "relu" else torch.tanh
    bound = module.recurrent_max_abs
    lengths = [steps] * batch if lengths is None else [int(n) for n in lengths]
    outputs, finals = [], []
    for b in range(batch):
        n = lengths[b]
        layer_input = x[:n, b]
        sequence_finals = []
        for layer in range(module.num_layers):
            direction_outputs = []
            for direction in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                w = getattr(module, "weight_ih" + suffix)
                u = getattr(module, "weight_hh" + suffix)
                if bound is not None:
                    u = torch.clamp(u, -bound, bound)
                bias = getattr(module, "bias_ih" + suffix)
                h = hx[layer * directions + direction, b]
                hs = [None] * n
                for t in range(n - 1, -1, -1) if direction else range(n):
                    h = act(w @ layer_input[t] + u * h + (0 if bias is None else bias))
                    hs[t] = h
                direction_outputs.append(torch.stack(hs))
                sequence_finals.append(h)
            layer_input = torch.cat(direction_outputs, dim=-1)
        padding = layer_input.new_zeros(steps - n, layer_input.size(-1))
        outputs.append(torch.cat([layer_input, padding]))
        finals.append(torch.stack(sequence_finals))
    return torch.stack(outputs, dim=1), torch.stack(finals, dim=1)


def loss_and_grads(output, h_n, inputs):
    weights = torch.linspace(-1, 1, output.numel(), dtype=output.dtype).view(output.shape)
    loss = (output * weights).sum() + (h_n * h_n).sum()
    return [output, h_n, *torch.autograd.grad(loss, inputs)]


@pytest.mark.parametrize("nonlinearity", ["relu", "tanh"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_outputs_and_gradients_match_paper_equation(nonlinearity, backend):
    torch.manual_seed(0)
    module = IndRNN(
        3,
        5,
        num_layers=2,
        nonlinearity=nonlinearity,
        bidirectional=True,
        recurrent_max_abs=0.9,
        dtype=torch.float64,
        backend=backend,
    )
    with torch.no_grad():
        module.weight_hh_l0.uniform_(-1.5, 1.5)  # some entries beyond the bound: clipped
    x = torch.randn(9, 4, 3, dtype=torch.float64, requires_grad=True)
    hx = torch.randn(4, 4, 5, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([9, 4, 1, 6])
    inputs = [x, hx, *module.parameters()]
    mine = loss_and_grads(*module(x, hx, lengths=lengths), inputs)
    theirs = loss_and_grads(*paper_layer(module, x, hx, lengths), inputs)
    for index, (a, b) in enumerate(zip(mine, theirs, strict=True)):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9, msg=lambda m, i=index: f"{i}: {m}")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_on_tiny_sizes(backend):
    torch.manual_seed(1)
    module = IndRNN(
        2, 3, nonlinearity="tanh", bidirectional=True, dtype=torch.float64, backend=backend
    )
    names = [name for name, _ in module.named_parameters()]
    x = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    hx = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)
    weights = [p.detach().clone().requires_grad_(True) for p in module.parameters()]

    def run(x, hx, *weights):
        return torch.func.functional_call(
            module, dict(zip(names, weights)), (x, hx), {"lengths": torch.tensor([4, 3])}
        )

    assert torch.autograd.gradcheck(run, (x, hx, *weights))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_kernel_matches_reference_loop(dtype):
    torch.manual_seed(2)
    module = IndRNN(6, 32, num_layers=2, dtype=dtype, backend="reference")
    x = torch.randn(50, 5, 6, dtype=dtype, requires_grad=True)
    lengths = torch.tensor([50, 31, 2, 50, 7])
    inputs = [x, *module.parameters()]
    reference = loss_and_grads(*module(x, lengths=lengths), inputs)
    module.backend = "cpu"
    fused = loss_and_grads(*module(x, lengths=lengths), inputs)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for a, b in zip(fused, reference, strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    with torch.no_grad():
        inference = module(x, lengths=lengths)
    torch.testing.assert_close(inference[0], reference[0], atol=tol, rtol=tol)


def test_recurrent_max_abs_clips_u_and_stops_its_gradient():
    module = IndRNN(1, 2, bias=False, recurrent_max_abs=0.5, dtype=torch.float64)
    with torch.no_grad():
        module.weight_ih_l0.fill_(1.0)
        module.weight_hh_l0.copy_(torch.tensor([2.0, 0.25], dtype=torch.float64))
    x = torch.ones(3, 1, 1, dtype=torch.float64)
    output, _ = module(x)
    # u = (0.5 after clipping, 0.25): h = 1, 1 + u, 1 + u + u^2.
    expected = torch.tensor([[1.0, 1.0], [1.5, 1.25], [1.75, 1.3125]], dtype=torch.float64)
    torch.testing.assert_close(output[:, 0], expected)
    output.sum().backward()
    assert module.weight_hh_l0.grad[0] == 0 and module.weight_hh_l0.grad[1] > 0
    assert (module.weight_hh_l0.detach().abs() <= 2).all()
    fresh = IndRNN(4, 64, recurrent_max_abs=0.3)
    assert 0 <= fresh.weight_hh_l0.min() and fresh.weight_hh_l0.max() <= 0.3


def test_layout_and_exported_names():
    torch.manual_seed(3)
    module = rnnkit.IndRNN(3, 4, num_layers=2, batch_first=True, bidirectional=True)
    shapes = {name: tuple(p.shape) for name, p in module.named_parameters()}
    assert shapes["weight_hh_l1_reverse"] == (4,) and shapes["weight_ih_l1"] == (4, 8)
    x = torch.randn(2, 5, 3)
    output, h_n = module(x)
    assert output.shape == (2, 5, 8) and h_n.shape == (4, 2, 4)
    single, h_single = module(x[0])
    torch.testing.assert_close(single, output[0])
    torch.testing.assert_close(h_single, h_n[:, 0])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="nonlinearity must be one of"):
        IndRNN(3, 4, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match="recurrent_max_abs must be None or a number > 0, got 0"):
        IndRNN(3, 4, recurrent_max_abs=0)
    with pytest.raises(ValueError, match="num_layers must be an int >= 1"):
        IndRNN(3, 4, num_layers=0)
    with pytest.raises(ValueError, match=r"hx must have shape \(1, 2, 4\)"):
        IndRNN(3, 4)(torch.randn(5, 2, 3), torch.zeros(2, 4))
    with pytest.raises(TypeError, match="lengths must have an integer dtype"):
        IndRNN(3, 4)(torch.randn(5, 2, 3), lengths=torch.tensor([1.0, 2.0]))


def test_rnnkit_stream_in_chunks_matches_whole_sequence():
    torch.manual_seed(4)
    module = IndRNN(3, 4, num_layers=2, nonlinearity="tanh", dtype=torch.float64)
    x = torch.randn(2, 9, 3, dtype=torch.float64)
    whole, _ = module(x.transpose(0, 1))
    stream = rnnkit.Stream(module)
    pieces = [stream.step(x[:, a:b]) for a, b in ((0, 2), (2, 3), (3, 9))]
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole.transpose(0, 1))
    with pytest.raises(ValueError, match="bidirectional layer cannot stream"):
        IndRNN(3, 4, bidirectional=True).stream_step(x.float(), torch.zeros(2, 2, 4))


def test_dropout_between_layers_only_in_training():
    torch.manual_seed(0)
    plain = IndRNN(3, 4, num_layers=2).double()
    dropped = IndRNN(3, 4, num_layers=2, dropout=1.0).double()
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    plain.eval(), dropped.eval()
    torch.testing.assert_close(dropped(x)[0], plain(x)[0], rtol=0, atol=0)
    dropped.train()
    second = IndRNN(4, 4).double()
    for name in ("weight_ih", "weight_hh", "bias_ih"):
        getattr(second, name + "_l0").data.copy_(getattr(plain, name + "_l1").data)
    expected, _ = second(torch.zeros(6, 2, 4, dtype=torch.float64))
    torch.testing.assert_close(dropped(x)[0], expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="dropout must be a number in"):
        IndRNN(3, 4, dropout=-0.1)
