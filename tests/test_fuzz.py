"""Fuzzing the layers: random shapes, layouts, lengths, states and bad values at every CPU backend.

The only acceptable outcomes are the torch.nn result (float64, 1e-9) or a ValueError/TypeError
whose message names the offending argument. Sizes are small and example counts bounded so the
whole file runs in seconds.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnkit
from rnnkit.kernels.cpu import backend as cpu_backend

LAYERS = {
    "RNN": (rnnkit.RNN, torch.nn.RNN),
    "LSTM": (rnnkit.LSTM, torch.nn.LSTM),
    "GRU": (rnnkit.GRU, torch.nn.GRU),
}
BACKENDS = ("reference", "cpu")
FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(autouse=True)
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_pair(mode: str, backend: str, **kwargs):
    """An rnnkit layer and the torch.nn layer with the same float64 weights."""
    ours_class, theirs_class = LAYERS[mode]
    theirs = theirs_class(**kwargs, dtype=torch.float64)
    ours = ours_class(**kwargs, dtype=torch.float64, backend=backend)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def lay_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as `x` in a non-contiguous / strided / expanded memory layout."""
    if layout == "transposed":
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "strided":
        wide = torch.zeros(x.size(0) * 2, x.size(1) * 2, x.size(2) * 3, dtype=x.dtype)
        wide[::2, ::2, ::3] = x
        return wide[::2, ::2, ::3]
    if layout == "expanded":
        return x[:1, :1].expand_as(x)
    return x


def assert_same_outputs(ours, theirs) -> None:
    out_ours, state_ours = ours
    out_theirs, state_theirs = theirs
    torch.testing.assert_close(out_ours, out_theirs, atol=1e-9, rtol=1e-9, equal_nan=True)
    states_ours = state_ours if isinstance(state_ours, tuple) else (state_ours,)
    states_theirs = state_theirs if isinstance(state_theirs, tuple) else (state_theirs,)
    for a, b in zip(states_ours, states_theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9, equal_nan=True)


layer_cases = st.fixed_dictionaries(
    {
        "mode": st.sampled_from(sorted(LAYERS)),
        "backend": st.sampled_from(BACKENDS),
        "steps": st.integers(1, 4),
        "batch": st.integers(0, 3),
        "input_size": st.integers(1, 3),
        "hidden_size": st.integers(1, 3),
        "num_layers": st.integers(1, 2),
        "bidirectional": st.booleans(),
        "batch_first": st.booleans(),
        "layout": st.sampled_from(["contiguous", "transposed", "strided", "expanded"]),
        "with_hx": st.booleans(),
        "with_lengths": st.booleans(),
        "seed": st.integers(0, 2**16),
    }
)


@FUZZ
@given(case=layer_cases, packed_input=st.booleans())
def test_random_shapes_and_layouts_match_torch(case, packed_input):
    torch.manual_seed(case["seed"])
    steps, batch, batch_first = case["steps"], case["batch"], case["batch_first"]
    ours, theirs = make_pair(
        case["mode"],
        case["backend"],
        input_size=case["input_size"],
        hidden_size=case["hidden_size"],
        num_layers=case["num_layers"],
        bidirectional=case["bidirectional"],
        batch_first=batch_first,
    )
    shape = (batch, steps) if batch_first else (steps, batch)
    x = lay_out(torch.randn(*shape, case["input_size"], dtype=torch.float64), case["layout"])
    hx = None
    if case["with_hx"]:
        layers = case["num_layers"] * (2 if case["bidirectional"] else 1)
        h = lay_out(torch.randn(layers, batch, case["hidden_size"], dtype=torch.float64), "strided")
        c = torch.randn(layers, batch, case["hidden_size"], dtype=torch.float64)
        hx = (h, c) if case["mode"] == "LSTM" else h
    if case["with_lengths"] and batch > 0:
        lengths = torch.randint(1, steps + 1, (batch,))
        packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
        out, state = theirs(packed, hx)
        if packed_input:  # a PackedSequence in gives a PackedSequence out
            result, result_state = ours(packed, hx)
            assert torch.equal(result.batch_sizes, out.batch_sizes)
            assert_same_outputs((result.data, result_state), (out.data, state))
            return
        out = pad_packed_sequence(out, batch_first=batch_first, total_length=steps)[0]
        assert_same_outputs(ours(x, hx, lengths=lengths), (out, state))
        return
    # Empty batches work as in torch.nn: (T, 0, D*H) outputs and (L*D, 0, H) states.
    assert_same_outputs(ours(x, hx), theirs(x, hx))


@FUZZ
@given(
    mode=st.sampled_from(sorted(LAYERS)),
    backend=st.sampled_from(BACKENDS),
    bidirectional=st.booleans(),
    poison=st.lists(
        st.tuples(
            st.integers(0, 3),
            st.integers(0, 1),
            st.integers(0, 1),
            st.sampled_from([float("nan"), float("inf"), -float("inf")]),
        ),
        min_size=1,
        max_size=3,
    ),
)
def test_nan_and_inf_inputs_propagate_like_torch(mode, backend, bidirectional, poison):
    torch.manual_seed(0)
    ours, theirs = make_pair(
        mode, backend, input_size=2, hidden_size=3, bidirectional=bidirectional
    )
    x = torch.randn(4, 2, 2, dtype=torch.float64)
    for t, b, i, value in poison:
        x[t, b, i] = value
    assert_same_outputs(ours(x), theirs(x))


def test_zero_length_sequence_is_refused_naming_input():
    for mode in LAYERS:
        for backend in BACKENDS:
            layer = LAYERS[mode][0](2, 3, backend=backend)
            with pytest.raises(ValueError, match="input"):
                layer(torch.zeros(0, 2, 2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.complex64, torch.bool]
)
def test_wrong_input_dtype_is_a_type_error_naming_input(backend, dtype):
    layer = rnnkit.LSTM(2, 3, backend=backend)
    x = torch.zeros(4, 2, 2).to(dtype)
    with pytest.raises(TypeError, match="input"):
        layer(x)


bad_lengths = st.one_of(
    st.just(("zero", torch.tensor([0, 2]))),
    st.just(("negative", torch.tensor([-3, 2]))),
    st.just(("too long", torch.tensor([5, 2]))),
    st.just(("float", torch.tensor([1.0, 2.0]))),
    st.just(("bool", torch.tensor([True, True]))),
    st.just(("2-D", torch.tensor([[1, 2]]))),
    st.just(("wrong count", torch.tensor([1, 2, 3]))),
    st.just(("list of floats", [1.5, 2])),
    st.just(("string", "12")),
    st.integers(-(2**40), 0).map(lambda v: ("non-positive", torch.tensor([v, 1]))),
    st.integers(5, 2**40).map(lambda v: ("beyond T", torch.tensor([1, v]))),
)


@FUZZ
@given(
    mode=st.sampled_from(sorted(LAYERS)),
    backend=st.sampled_from(BACKENDS),
    bad=bad_lengths,
)
def test_bad_lengths_are_refused_naming_lengths(mode, backend, bad):
    _, lengths = bad
    layer = LAYERS[mode][0](2, 3, backend=backend)
    with pytest.raises((ValueError, TypeError), match="lengths"):
        layer(torch.zeros(4, 2, 2), lengths=lengths)


bad_states = st.sampled_from(
    [
        ("shape", lambda: torch.zeros(1, 3, 3)),
        ("layers", lambda: torch.zeros(2, 2, 3)),
        ("hidden", lambda: torch.zeros(1, 2, 4)),
        ("int dtype", lambda: torch.zeros(1, 2, 3, dtype=torch.int64)),
        ("float64", lambda: torch.zeros(1, 2, 3, dtype=torch.float64)),
        ("meta device", lambda: torch.zeros(1, 2, 3, device="meta")),
        ("not a tensor", lambda: [[0.0] * 3] * 2),
    ]
)


@FUZZ
@given(mode=st.sampled_from(sorted(LAYERS)), backend=st.sampled_from(BACKENDS), bad=bad_states)
def test_bad_initial_state_is_refused_naming_hx(mode, backend, bad):
    _, make = bad
    layer = LAYERS[mode][0](2, 3, backend=backend)
    good = torch.zeros(1, 2, 3)
    hx = (make(), good) if mode == "LSTM" else make()
    with pytest.raises((ValueError, TypeError), match="hx"):
        layer(torch.zeros(4, 2, 2), hx)
    if mode == "LSTM":
        with pytest.raises((ValueError, TypeError), match=r"hx\[1\]"):
            layer(torch.zeros(4, 2, 2), (good, make()))


def test_gpu_backend_without_a_gpu_says_why():
    layer = rnnkit.GRU(2, 3, backend="gpu")
    with pytest.raises(RuntimeError, match="backend='gpu'"):
        layer(torch.zeros(4, 2, 2))


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda x, hx, w, n: (x[:, :, :1], hx, w, n), "w_ih"),
        (lambda x, hx, w, n: (x, [(hx[0][0][:1],)], w, n), "h of direction 0"),
        (lambda x, hx, w, n: (x, hx, [(w[0][0], w[0][1][:, :2], *w[0][2:])], n), "w_hh"),
        (lambda x, hx, w, n: (x, hx, w, torch.tensor([9, 1])), "lengths"),
        (lambda x, hx, w, n: (x, hx, w, torch.tensor([1])), "lengths"),
        (lambda x, hx, w, n: (x.double(), hx, w, n), "float64"),
        (lambda x, hx, w, n: (x[0], hx, w, n), "3-D"),
    ],
)
def test_cpu_kernel_entry_refuses_arrays_it_would_index_out_of_bounds(change, match):
    layer = rnnkit.GRU(2, 3, backend="cpu")
    x = torch.randn(4, 2, 2)
    hx = [(torch.zeros(2, 3),)]
    weights = [layer.cell_weights(0, 0)]
    x, hx, weights, lengths = change(x, hx, weights, None)
    with pytest.raises((ValueError, TypeError), match=match):
        cpu_backend.run_layer(layer.spec, x, hx, weights, lengths)
