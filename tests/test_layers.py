"""rnnkit.RNN/LSTM/GRU against torch.nn: same outputs, states and gradients; clear errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnkit
from rnnkit.spec import LayerSpec
from rnnkit.variants.regularization import check_regularizers

KINDS = {
    "lstm": (rnnkit.LSTM, nn.LSTM),
    "gru": (rnnkit.GRU, nn.GRU),
    "rnn_tanh": (rnnkit.RNN, nn.RNN),
    "rnn_relu": (rnnkit.RNN, nn.RNN),
}
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-9}


def make_pair(kind: str, dtype: torch.dtype, backend: str = "reference", **kwargs):
    """A torch.nn layer and an rnnkit layer holding the same weights."""
    _, theirs_cls = KINDS[kind]
    if kind == "rnn_relu":
        kwargs["nonlinearity"] = "relu"
    theirs = theirs_cls(dtype=dtype, **kwargs)
    mine = rnnkit.from_torch(theirs, backend=backend)
    return mine, theirs


def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, atol=tol, rtol=tol)


def run_and_grad(module, x, hx, lengths_mode, lengths, batch_first):
    """Forward, a loss over every output, backward; returns output, states, gradients."""
    if lengths_mode == "packed":
        inp = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    else:
        inp = x
    out, state = module(inp, hx)
    if lengths_mode == "packed":
        out, _ = pad_packed_sequence(
            out, batch_first=batch_first, total_length=x.size(1 if batch_first else 0)
        )
    states = state if isinstance(state, tuple) else (state,)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    loss = (out * weights).sum() + sum((s * s).sum() for s in states)
    params = list(module.parameters())
    inputs = [x] + ([h for h in (hx if isinstance(hx, tuple) else (hx,))] if hx is not None else [])
    grads = torch.autograd.grad(loss, inputs + params, allow_unused=True)
    return out, states, grads


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(sorted(KINDS)),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    input_size=st.integers(1, 5),
    hidden_size=st.integers(1, 6),
    num_layers=st.integers(1, 3),
    bidirectional=st.booleans(),
    batch_first=st.booleans(),
    bias=st.booleans(),
    with_hx=st.booleans(),
    lengths_mode=st.sampled_from(["none", "packed", "lengths"]),
    proj=st.booleans(),
    batch=st.integers(1, 4),
    steps=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_layer_matches_torch(
    kind,
    dtype,
    input_size,
    hidden_size,
    num_layers,
    bidirectional,
    batch_first,
    bias,
    with_hx,
    lengths_mode,
    proj,
    batch,
    steps,
    seed,
):
    torch.manual_seed(seed)
    kwargs = dict(
        input_size=input_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        bidirectional=bidirectional,
        batch_first=batch_first,
        bias=bias,
    )
    proj_size = hidden_size - 1 if (kind == "lstm" and proj and hidden_size > 1) else 0
    if proj_size:
        kwargs["proj_size"] = proj_size
    mine, theirs = make_pair(kind, dtype, **kwargs)
    shape = (batch, steps, input_size) if batch_first else (steps, batch, input_size)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    lengths = torch.randint(1, steps + 1, (batch,))
    hx = None
    if with_hx:
        layers = num_layers * (2 if bidirectional else 1)
        h = torch.randn(layers, batch, proj_size or hidden_size, dtype=dtype, requires_grad=True)
        hx = (
            (h, torch.randn(layers, batch, hidden_size, dtype=dtype, requires_grad=True))
            if kind == "lstm"
            else h
        )
    tol = TOLERANCE[dtype]
    expected = run_and_grad(
        theirs, x, hx, "packed" if lengths_mode != "none" else "none", lengths, batch_first
    )
    if lengths_mode == "lengths":
        out, state = mine(x, hx, lengths=lengths)
        states = state if isinstance(state, tuple) else (state,)
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
        loss = (out * weights).sum() + sum((s * s).sum() for s in states)
        inputs = [x] + (list(hx) if isinstance(hx, tuple) else [hx] if hx is not None else [])
        grads = torch.autograd.grad(loss, inputs + list(mine.parameters()), allow_unused=True)
        got = (out, states, grads)
    else:
        got = run_and_grad(mine, x, hx, lengths_mode, lengths, batch_first)
    assert close(got[0], expected[0], tol)
    for a, b in zip(got[1], expected[1]):
        assert close(a, b, tol)
    for a, b in zip(got[2], expected[2]):
        assert (a is None) == (b is None)
        if a is not None:
            assert close(a, b, tol)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_unbatched_input_matches_torch(kind):
    torch.manual_seed(0)
    mine, theirs = make_pair(
        kind, torch.float64, input_size=3, hidden_size=4, num_layers=2, bidirectional=True
    )
    x = torch.randn(5, 3, dtype=torch.float64)
    out_mine, state_mine = mine(x)
    out_theirs, state_theirs = theirs(x)
    assert out_mine.shape == (5, 8)
    assert torch.allclose(out_mine, out_theirs, atol=1e-12)
    flat = lambda s: s if isinstance(s, tuple) else (s,)  # noqa: E731
    for a, b in zip(flat(state_mine), flat(state_theirs)):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_state_dict_round_trips_both_ways(kind):
    mine_cls, theirs_cls = KINDS[kind]
    extra = {"nonlinearity": "relu"} if kind == "rnn_relu" else {}
    mine = mine_cls(4, 6, num_layers=2, bidirectional=True, **extra)
    theirs = theirs_cls(4, 6, num_layers=2, bidirectional=True, **extra)
    assert list(mine.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(mine.state_dict())
    mine2 = mine_cls(4, 6, num_layers=2, bidirectional=True, **extra)
    mine2.load_state_dict(theirs.state_dict())
    x = torch.randn(7, 2, 4)
    assert torch.allclose(mine2(x)[0], theirs(x)[0], atol=1e-6)


def test_lstm_projection_state_dict_keys_match_torch():
    assert list(rnnkit.LSTM(3, 5, proj_size=2, bidirectional=True).state_dict()) == list(
        nn.LSTM(3, 5, proj_size=2, bidirectional=True).state_dict()
    )


def test_lengths_and_packing_agree_and_zero_the_padding():
    torch.manual_seed(1)
    layer = rnnkit.GRU(3, 4, bidirectional=True, batch_first=True, dtype=torch.float64)
    x = torch.randn(3, 6, 3, dtype=torch.float64)
    lengths = torch.tensor([2, 6, 4])
    out, h = layer(x, lengths=lengths)
    packed_out, packed_h = layer(
        pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    )
    padded, _ = pad_packed_sequence(packed_out, batch_first=True)
    assert torch.allclose(out, padded)
    assert torch.allclose(h, packed_h)
    assert out[0, 2:].abs().max() == 0 and out[2, 4:].abs().max() == 0
    # A padded sequence's final state equals running it alone, unpadded.
    alone_out, alone_h = layer(x[:1, :2])
    assert torch.allclose(alone_h[:, 0], h[:, 0], atol=1e-12)
    assert torch.allclose(alone_out[0], out[0, :2], atol=1e-12)


def test_padding_values_do_not_leak_into_results():
    torch.manual_seed(2)
    layer = rnnkit.LSTM(2, 3, bidirectional=True, dtype=torch.float64)
    x = torch.randn(5, 2, 2, dtype=torch.float64)
    lengths = torch.tensor([3, 5])
    out, (h, c) = layer(x, lengths=lengths)
    x2 = x.clone()
    x2[3:, 0] = 1e6
    out2, (h2, c2) = layer(x2, lengths=lengths)
    assert torch.equal(out, out2) and torch.equal(h, h2) and torch.equal(c, c2)


def test_gradcheck_gru_reset_before_with_lengths():
    torch.manual_seed(3)
    layer = rnnkit.GRU(
        2, 3, num_layers=2, bidirectional=True, reset_after=False, dtype=torch.float64
    )
    x = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([4, 2])

    def fn(x, h0, *params):
        names = [n for n, _ in layer.named_parameters()]
        out, h = torch.func.functional_call(
            layer, dict(zip(names, params)), (x, h0), {"lengths": lengths}
        )
        return out, h

    assert torch.autograd.gradcheck(
        fn, (x, h0, *[p.detach().requires_grad_() for p in layer.parameters()])
    )


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_gradcheck_tiny(kind):
    torch.manual_seed(4)
    mine, _ = make_pair(kind, torch.float64, input_size=2, hidden_size=2, bidirectional=True)
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: mine(x, lengths=torch.tensor([3, 1]))[0], (x,))


def test_dropout_between_layers_behaves_like_torch():
    torch.manual_seed(5)
    mine, theirs = make_pair(
        "lstm", torch.float64, input_size=4, hidden_size=32, num_layers=2, dropout=0.5
    )
    x = torch.randn(3, 64, 4, dtype=torch.float64)
    mine.eval(), theirs.eval()
    assert torch.allclose(mine(x)[0], theirs(x)[0], atol=1e-12)
    mine.train()
    a, b = mine(x)[0], mine(x)[0]
    assert not torch.allclose(a, b)  # dropout is active in training
    # Dropout with p=0.5 on the first layer's output changes the second layer's input by a
    # factor 0 or 2; the spread of train-mode outputs around eval-mode ones matches torch's.
    spread_mine = torch.stack([mine(x)[0] for _ in range(20)]).std(0).mean()
    theirs.train()
    spread_theirs = torch.stack([theirs(x)[0] for _ in range(20)]).std(0).mean()
    assert abs(spread_mine - spread_theirs) / spread_theirs < 0.15


def test_dropout_with_one_layer_warns_like_torch():
    with pytest.warns(UserWarning, match="dropout"):
        rnnkit.GRU(3, 3, dropout=0.2)


# -- bad input -------------------------------------------------------------------------------


@pytest.fixture
def lstm():
    return rnnkit.LSTM(8, 4, num_layers=2, batch_first=True)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda m: m(torch.randn(2, 3, 5)),
            ValueError,
            r"LSTM: input.size\(-1\) must be input_size=8, got 5",
        ),
        (lambda m: m(torch.randn(2, 3, 4, 8)), ValueError, "input must be 3-D"),
        (lambda m: m(torch.randn(2, 0, 8)), ValueError, "at least one time step"),
        (lambda m: m(torch.ones(2, 3, 8, dtype=torch.int64)), TypeError, "floating-point"),
        (lambda m: m(torch.randn(2, 3, 8, dtype=torch.float64)), TypeError, "dtype"),
        (lambda m: m([1, 2, 3]), TypeError, "Tensor or PackedSequence"),
        (lambda m: m(torch.randn(2, 3, 8), torch.zeros(2, 2, 4)), TypeError, r"tuple \(h_0, c_0\)"),
        (
            lambda m: m(torch.randn(2, 3, 8), (torch.zeros(2, 3, 4), torch.zeros(2, 2, 4))),
            ValueError,
            r"hx\[0\] must have shape \(2, 2, 4\), got \(2, 3, 4\)",
        ),
        (
            lambda m: m(torch.randn(2, 3, 8), (torch.zeros(2, 2, 4), torch.zeros(2, 2))),
            ValueError,
            r"hx\[1\] must have shape",
        ),
        (
            lambda m: m(torch.randn(2, 3, 8), lengths=torch.tensor([[1, 2]])),
            ValueError,
            "lengths must be 1-D",
        ),
        (
            lambda m: m(torch.randn(2, 3, 8), lengths=torch.tensor([1.0, 2.0])),
            TypeError,
            "integer dtype",
        ),
        (
            lambda m: m(torch.randn(2, 3, 8), lengths=torch.tensor([1, 2, 3])),
            ValueError,
            "one length per sequence",
        ),
        (
            lambda m: m(torch.randn(2, 3, 8), lengths=torch.tensor([0, 2])),
            ValueError,
            "lengths must be >= 1, got 0",
        ),
        (lambda m: m(torch.randn(2, 3, 8), lengths=torch.tensor([-1, 2])), ValueError, ">= 1"),
        (
            lambda m: m(torch.randn(2, 3, 8), lengths=torch.tensor([4, 2])),
            ValueError,
            "<= the number of time steps 3, got 4",
        ),
        (lambda m: m(torch.randn(2, 3, 8), lengths="ab"), TypeError, "lengths must be"),
        (lambda m: m(torch.randn(3, 8), lengths=torch.tensor([3])), ValueError, "batched"),
    ],
)
def test_bad_input_raises_clear_error(lstm, call, error, message):
    with pytest.raises(error, match=message):
        call(lstm)


def test_hx_of_wrong_shape_for_gru():
    layer = rnnkit.GRU(3, 4)
    with pytest.raises(ValueError, match=r"GRU: hx must have shape \(1, 2, 4\), got \(1, 2, 5\)"):
        layer(torch.randn(5, 2, 3), torch.zeros(1, 2, 5))


def test_hx_dtype_must_match():
    layer = rnnkit.RNN(3, 4)
    with pytest.raises(TypeError, match="hx.dtype"):
        layer(torch.randn(5, 2, 3), torch.zeros(1, 2, 4, dtype=torch.float64))


def test_lengths_with_packed_input_is_rejected():
    layer = rnnkit.RNN(3, 4)
    packed = pack_padded_sequence(torch.randn(4, 2, 3), torch.tensor([4, 2]))
    with pytest.raises(ValueError, match="lengths must be None"):
        layer(packed, lengths=torch.tensor([4, 2]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_size=0, hidden_size=3), "input_size must be an int >= 1, got 0"),
        (dict(input_size=3, hidden_size=-1), "hidden_size"),
        (dict(input_size=3, hidden_size=3, num_layers=0), "num_layers"),
        (dict(input_size=3, hidden_size=3, dropout=1.5), "dropout"),
        (dict(input_size=3, hidden_size=3, proj_size=3), "proj_size must be smaller"),
        (dict(input_size=3, hidden_size=3, backend="fast"), "backend must be one of"),
    ],
)
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rnnkit.LSTM(**kwargs)


def test_proj_size_only_for_lstm():
    with pytest.raises(ValueError, match="proj_size is only supported by LSTM"):
        rnnkit.layers.RNNBase("GRU", 3, 4, proj_size=2)


def test_repr_mentions_non_default_arguments():
    text = repr(rnnkit.GRU(3, 4, num_layers=2, reset_after=False))
    assert "num_layers=2" in text and "reset_after=False" in text


def test_lstm_is_a_drop_in_for_a_classic_classifier():
    """The LSTMClassifier pattern: embedding, bidirectional LSTM, concatenated final states."""

    class LSTMClassifier(nn.Module):
        def __init__(self, lstm_cls):
            super().__init__()
            self.embedding = nn.Embedding(20, 6)
            self.lstm = lstm_cls(6, 5, batch_first=True, bidirectional=True)
            self.head = nn.Linear(10, 3)

        def forward(self, tokens):
            _, (h_n, _) = self.lstm(self.embedding(tokens))
            return self.head(torch.cat([h_n[-2], h_n[-1]], dim=1))

    torch.manual_seed(6)
    theirs = LSTMClassifier(nn.LSTM)
    mine = LSTMClassifier(rnnkit.LSTM)
    mine.load_state_dict(theirs.state_dict())
    tokens = torch.randint(0, 20, (4, 7))
    assert torch.allclose(mine(tokens), theirs(tokens), atol=1e-6)


def test_input_on_another_device_than_the_weights():
    layer = rnnkit.GRU(3, 4, device="meta")
    with pytest.raises(ValueError, match="GRU: input must be on the weights' device meta, got cpu"):
        layer(torch.randn(5, 2, 3))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_changed_weights_are_used_at_the_next_call(kind):
    """Weights replaced, changed in place or loaded between calls are the ones the next call uses:
    the output is still torch.nn's with the same weights (fused kernel, stacked, bidirectional)."""
    torch.manual_seed(7)
    sizes = {"input_size": 3, "hidden_size": 4, "num_layers": 2, "bidirectional": True}
    mine, theirs = make_pair(kind, torch.float32, backend="cpu", **sizes)
    _, other = make_pair(kind, torch.float32, **sizes)
    x = torch.randn(5, 2, 3)

    def assert_agree():
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                (out, state), (expected, expected_state) = mine(x), theirs(x)
            assert close(out, expected, 1e-5)
            states = state if isinstance(state, tuple) else (state,)
            expected_states = expected_state if isinstance(state, tuple) else (expected_state,)
            assert all(close(s, e, 1e-5) for s, e in zip(states, expected_states))

    assert_agree()
    replacement = nn.Parameter(torch.randn_like(mine.weight_hh_l1_reverse))
    mine.weight_hh_l1_reverse = replacement
    with torch.no_grad():
        theirs.weight_hh_l1_reverse.copy_(replacement)
    assert_agree()
    with torch.no_grad():
        for layer in (mine, theirs):
            layer.bias_ih_l0.add_(0.5)
            layer.weight_ih_l1.mul_(-1)
    assert_agree()
    mine.load_state_dict(other.state_dict())
    theirs.load_state_dict(other.state_dict())
    assert_agree()
    assert mine.weight_hh_l1_reverse is replacement  # loaded in place, as in torch.nn


def test_parametrized_weight_is_recomputed_at_every_call():
    """torch.nn.utils.parametrize turns a weight into a property; each call reads it anew."""
    from torch.nn.utils import parametrize

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.factor = 2.0

        def forward(self, weight):
            return self.factor * weight

    torch.manual_seed(8)
    mine, theirs = make_pair("gru", torch.float32, backend="cpu", input_size=3, hidden_size=4)
    scale = Scale()
    parametrize.register_parametrization(mine, "weight_hh_l0", scale)
    x = torch.randn(5, 2, 3)
    for factor in (2.0, 0.5):
        scale.factor = factor
        expected = nn.GRU(3, 4)
        expected.load_state_dict(theirs.state_dict())
        with torch.no_grad():
            expected.weight_hh_l0.mul_(factor)
        assert close(mine(x)[0], expected(x)[0], 1e-5)


@pytest.mark.parametrize(
    "change",
    [
        lambda layer: layer.eval(),
        lambda layer: setattr(layer, "reset_after", False),
        lambda layer: setattr(
            layer,
            "regularizers",
            check_regularizers("GRU", "GRU", recurrent_dropout=0.2),
        ),
    ],
)
def test_spec_follows_the_attributes_it_is_built_from(change):
    """The layer keeps its LayerSpec between calls; changing what it is built from rebuilds it."""
    layer = rnnkit.GRU(3, 4, recurrent_dropout=0.4)
    spec = layer.spec
    assert layer.spec is spec
    change(layer)
    rates = layer.regularizers
    assert layer.spec == LayerSpec(
        mode="GRU",
        hidden_size=4,
        reset_after=layer.reset_after,
        recurrent_dropout=rates.recurrent_dropout,
        zoneout=rates.zoneout,
        training=layer.training,
    )
    assert layer.spec != spec


def test_train_and_eval_switch_the_kernel_of_a_training_only_regulariser(monkeypatch):
    # Recurrent dropout acts in training only: each call must run the kernel of the layer's
    # current mode (the regularised one in training, the plain LSTM's in eval).
    from rnnkit.kernels.cpu import lstm, regularized

    calls = []
    for module in (regularized, lstm):
        original = module.run_direction

        def counted(*args, _original=original, _name=module.__name__, **kwargs):
            calls.append(_name.rsplit(".", 1)[-1])
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, "run_direction", counted)
    layer = rnnkit.LSTM(3, 4, proj_size=2, recurrent_dropout=0.3)
    x = torch.randn(5, 2, 3)
    layer(x)
    layer.eval()
    layer(x)
    layer.train()
    layer(x)
    assert calls == ["regularized", "lstm", "regularized"]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_double_backward_says_it_needs_the_reference_loop(kind):
    # The fused kernels' backward is by hand, once; a gradient of a gradient (create_graph) is
    # refused with torch's message, and the reference loop gives it.
    torch.manual_seed(3)
    mine, _ = make_pair(kind, torch.float64, backend="cpu", input_size=3, hidden_size=4)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(mine(x)[0].square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.square().sum().backward()
    mine.backend = "reference"
    (grad,) = torch.autograd.grad(mine(x)[0].square().sum(), x, create_graph=True)
    grad.square().sum().backward()
    assert all(parameter.grad is not None for parameter in mine.parameters())
