"""One dispatch picks the backend and says why."""

from __future__ import annotations

import subprocess
import sys
import warnings

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


SINGLE_STEP_LAYERS = {
    "RNN tanh": (rnnkit.RNN, torch.nn.RNN, {}),
    "RNN relu": (rnnkit.RNN, torch.nn.RNN, {"nonlinearity": "relu"}),
    "GRU": (rnnkit.GRU, torch.nn.GRU, {}),
    "LSTM": (rnnkit.LSTM, torch.nn.LSTM, {}),
}
SINGLE_STEP_OPTIONS = [{}, {"num_layers": 2, "bidirectional": True, "batch_first": True}]


@pytest.mark.parametrize("options", SINGLE_STEP_OPTIONS + [{"bias": False}])
@pytest.mark.parametrize("layer", SINGLE_STEP_LAYERS.values(), ids=SINGLE_STEP_LAYERS.keys())
def test_one_time_step_runs_torch_cell_ops_and_matches_torch_nn(layer, options, monkeypatch):
    # A decoder calls its layer once per step, carrying the state: three such calls, then the
    # gradients of everything, against torch.nn.
    ran = []
    original = dispatch.run_layer_single_step
    monkeypatch.setattr(
        dispatch, "run_layer_single_step", lambda *args: ran.append(1) or original(*args)
    )
    mine_class, theirs_class, extra = layer
    torch.manual_seed(0)
    theirs = theirs_class(5, 7, **extra, **options, dtype=torch.float64)
    mine = mine_class(5, 7, **extra, **options, dtype=torch.float64)
    mine.load_state_dict(theirs.state_dict())
    steps = torch.randn(3, 4, 1, 5, dtype=torch.float64, requires_grad=True)
    if not options.get("batch_first"):
        steps = steps.transpose(1, 2)  # (3, 1, 4, 5): time-major chunks
    assert "one time step" in rnnkit.explain_backend(mine, steps[0])
    results = []
    for module in (mine, theirs):
        state, outputs = None, []
        for chunk in steps.unbind(0):
            output, state = module(chunk, state)
            outputs.append(output)
        finals = state if isinstance(state, tuple) else (state,)
        loss = sum((o * o.new_tensor(range(o.numel())).view(o.shape)).sum() for o in outputs)
        loss = loss + sum((f * f).sum() for f in finals)
        grads = torch.autograd.grad(loss, [steps, *module.parameters()])
        results.append([*outputs, *finals, *grads])
    assert len(ran) == 3 * (options.get("num_layers", 1))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    unbatched = torch.randn(1, 5, dtype=torch.float64)
    torch.testing.assert_close(mine(unbatched)[0], theirs(unbatched)[0], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("layer", SINGLE_STEP_LAYERS.values(), ids=SINGLE_STEP_LAYERS.keys())
def test_one_time_step_output_and_final_state_are_separate_tensors(layer):
    # As torch.nn's: an in-place change to one must not change the other.
    mine_class, _, extra = layer
    output, state = mine_class(3, 4, **extra)(torch.randn(1, 2, 3))
    h_n = state[0] if isinstance(state, tuple) else state
    before = h_n.clone()
    output.data.add_(1.0)
    torch.testing.assert_close(h_n, before)


EVERY_CPU_PATH = {
    "RNN": lambda: rnnkit.RNN(3, 4),
    "RNN reference": lambda: rnnkit.RNN(3, 4, backend="reference"),
    "GRU": lambda: rnnkit.GRU(3, 4),
    "GRU, reset before": lambda: rnnkit.GRU(3, 4, reset_after=False),
    "LSTM": lambda: rnnkit.LSTM(3, 4),
    "LSTM with proj_size": lambda: rnnkit.LSTM(3, 4, proj_size=2),
    "LSTM with zoneout": lambda: rnnkit.LSTM(3, 4, zoneout=0.1).eval(),
    "LayerNormLSTM": lambda: rnnkit.LayerNormLSTM(3, 4),
    "LayerNormGRU": lambda: rnnkit.LayerNormGRU(3, 4),
}


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("make", EVERY_CPU_PATH.values(), ids=EVERY_CPU_PATH.keys())
def test_output_and_final_states_never_share_memory(make, steps):
    # The layer hands a one-layer, one-direction final state on as a view of the backend's.
    output, state = make()(torch.randn(steps, 2, 3))
    finals = state if isinstance(state, tuple) else (state,)
    before = [final.clone() for final in finals]
    output.data.add_(1.0)
    for final, value in zip(finals, before, strict=True):
        torch.testing.assert_close(final, value)
    output_before = output.clone()
    for final in finals:
        final.data.add_(1.0)
    torch.testing.assert_close(output, output_before)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("mode", ["RNN_TANH", "GRU", "LSTM", "LN_LSTM"])
def test_dispatch_takes_hx_none_as_zero_states(mode, backend):
    # hx None goes to the CPU kernels as such (zeros made there) and becomes zero tensors for
    # the other backends: every way gives what explicit zero states give, gradients included.
    make = {
        "RNN_TANH": rnnkit.RNN,
        "GRU": rnnkit.GRU,
        "LSTM": rnnkit.LSTM,
        "LN_LSTM": rnnkit.LayerNormLSTM,
    }[mode]
    layer = make(3, 4, bidirectional=True).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    weights = [layer.cell_weights(0, d) for d in range(2)]
    spec = layer.spec
    zeros = [tuple(torch.zeros(2, size, dtype=torch.float64) for size in spec.state_sizes)] * 2
    results = []
    for hx in (None, zeros):
        output, finals = dispatch.run_layer(backend, spec, x, hx, weights, None)
        loss = output.square().sum() + sum(f.square().sum() for state in finals for f in state)
        grads = torch.autograd.grad(loss, [w for w in layer.parameters()])
        results.append([output, *(f for state in finals for f in state), *grads])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


NOT_SINGLE_STEP = {
    "LSTM with proj_size": lambda: rnnkit.LSTM(3, 4, proj_size=2),
    "GRU, reset before": lambda: rnnkit.GRU(3, 4, reset_after=False),
    "GRU with zoneout": lambda: rnnkit.GRU(3, 4, zoneout=0.1).eval(),
    "RNN with recurrent dropout": lambda: rnnkit.RNN(3, 4, recurrent_dropout=0.2).train(),
    "LayerNormLSTM": lambda: rnnkit.LayerNormLSTM(3, 4),
}


@pytest.mark.parametrize("make", NOT_SINGLE_STEP.values(), ids=NOT_SINGLE_STEP.keys())
def test_one_step_that_torch_has_no_cell_op_for_runs_the_fused_kernel(make):
    assert rnnkit.explain_backend(make(), torch.randn(1, 2, 3)) == (
        "auto: fused cpu kernel for cpu tensors"
    )


def test_one_step_runs_the_requested_kernel_and_several_steps_the_fused_kernel(monkeypatch):
    monkeypatch.setattr(dispatch, "run_layer_single_step", None)  # would fail if called
    torch.manual_seed(1)
    for layer in (rnnkit.GRU(3, 4, backend="cpu"), rnnkit.GRU(3, 4)):
        x = torch.randn(2 if layer.backend == "auto" else 1, 5, 3, requires_grad=True)
        expected = layer.to_torch()(x)[0]
        output = layer(x)[0]
        output.sum().backward()
        torch.testing.assert_close(output, expected)
    assert rnnkit.explain_backend(layer, torch.randn(2, 5, 3)).startswith("auto: fused cpu")


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


COMPILED_LAYERS = {
    "LSTM, fused": lambda: rnnkit.LSTM(6, 8, num_layers=2, bidirectional=True, batch_first=True),
    "GRU with zoneout, fused": lambda: rnnkit.GRU(6, 8, zoneout=0.2, batch_first=True).eval(),
    "MinGRU, fused": lambda: rnnkit.MinGRU(6, 8, batch_first=True),
    "IndRNN, fused": lambda: rnnkit.IndRNN(6, 8, batch_first=True),
    "LSTM, reference": lambda: rnnkit.LSTM(6, 8, batch_first=True, backend="reference"),
}


@pytest.mark.parametrize("make_layer", COMPILED_LAYERS.values(), ids=COMPILED_LAYERS.keys())
def test_torch_compile_gives_the_eager_outputs_and_gradients_without_warnings(make_layer):
    # The fused kernels are kept out of dynamo's tracing (dispatch.run_opaque), so a compiled
    # model breaks its graph around them; "aot_eager" runs dynamo and AOTAutograd without
    # inductor's C++ compiler.
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = make_layer()
    head = torch.nn.Linear(layer.hidden_size * (2 if layer.bidirectional else 1), 3)

    def model(x):
        return head(torch.tanh(layer(x * 2.0)[0])).sum()

    x = torch.randn(3, 7, 6, requires_grad=True)
    parameters = [x, *layer.parameters(), *head.parameters()]
    expected = model(x)
    expected_grads = torch.autograd.grad(expected, parameters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(model, backend="aot_eager")
        actual = compiled(x)
        actual_grads = torch.autograd.grad(actual, parameters)
    torch.testing.assert_close(actual, expected)
    for got, want in zip(actual_grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)
    dynamo_warnings = [str(w.message) for w in caught if "ynamo" in str(w.message)]
    assert dynamo_warnings == []


def test_torch_compile_of_a_one_step_call_traces_the_cell_op_without_warnings():
    torch._dynamo.reset()
    layer = rnnkit.GRU(6, 8, batch_first=True)
    x = torch.randn(3, 1, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(lambda x: layer(x)[0], backend="aot_eager")
        torch.testing.assert_close(compiled(x), layer(x)[0])
    assert [str(w.message) for w in caught] == []


def test_jit_trace_of_a_fused_layer_says_what_to_use_instead():
    layer = rnnkit.LSTM(3, 4)
    x = torch.randn(5, 2, 3)
    with pytest.raises(RuntimeError, match="rnnkit.export_onnx, or trace a layer with backend"):
        torch.jit.trace(layer, x)
    layer.backend = "reference"
    traced = torch.jit.trace(layer, x, check_trace=False)
    torch.testing.assert_close(traced(x)[0], layer(x)[0])


def test_torch_export_as_a_process_first_call_exports_the_loop_and_leaves_the_kernels_loadable():
    # torch.export swaps builtins that numba's import checks, so a first import of the kernels
    # under it failed and was remembered as "not implemented": every later call in the process
    # fell back to the reference loop. A fresh process makes this the first call.
    script = """
import torch, rnnkit
x = torch.randn(2, 5, 4)
for layer in (rnnkit.LSTM(4, 6, batch_first=True), rnnkit.MinGRU(4, 6, batch_first=True)):
    for strict in (False, True):
        program = torch.export.export(layer, (x,), strict=strict)
        assert torch.allclose(program.module()(x)[0], layer(x)[0], atol=1e-6)
layer = rnnkit.LSTM(4, 6, batch_first=True)
assert rnnkit.explain_backend(layer, x) == "auto: fused cpu kernel for cpu tensors"
layer.backend = "cpu"
try:
    torch.export.export(layer, (x,))
except RuntimeError as error:
    assert "backend='cpu' cannot run here: torch.export" in str(error), error
else:
    raise AssertionError("backend='cpu' was exported")
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


def test_torch_compile_as_a_process_first_call_loads_the_kernels_outside_the_trace():
    # The kernels' first import ran inside dynamo's trace, which followed the import machinery
    # (warning at posix.stat and posix.listdir) and recompiled over and over.
    script = """
import warnings, torch, rnnkit
layer = rnnkit.LSTM(4, 6, batch_first=True)
x = torch.randn(2, 5, 4)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    compiled = torch.compile(lambda x: layer(x)[0], backend="aot_eager")
    assert torch.allclose(compiled(x), layer(x)[0])
messages = [str(w.message) for w in caught if "ynamo" in str(w.message)]
assert messages == [], messages
assert rnnkit.explain_backend(layer, x) == "auto: fused cpu kernel for cpu tensors"
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "recompil" not in done.stderr
    assert done.stdout.strip().endswith("ok")


@pytest.mark.parametrize("make_layer", [rnnkit.LSTM, rnnkit.GRU, rnnkit.MinGRU, rnnkit.IndRNN])
def test_torch_func_transforms_run_the_reference_loop_under_auto(make_layer):
    # torch.func's grad and vmap need autograd Functions written for them; the fused kernels'
    # are not, so "auto" takes the reference loop inside a transform (and only there).
    torch.manual_seed(4)
    layer = make_layer(4, 6)
    reference = make_layer(4, 6, backend="reference")
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(5, 2, 4)
    parameters = {name: value.detach() for name, value in layer.named_parameters()}

    def loss(module):
        return lambda p: torch.func.functional_call(module, p, (x,))[0].square().sum()

    grads = torch.func.grad(loss(layer))(parameters)
    expected = torch.func.grad(loss(reference))(parameters)
    for name in parameters:
        torch.testing.assert_close(grads[name], expected[name])
    stacked = torch.stack([x, 2 * x], dim=1)  # (T, 2, B, I): vmap over dim 1
    outputs = torch.func.vmap(lambda xs: layer(xs)[0], in_dims=1, out_dims=1)(stacked)
    torch.testing.assert_close(outputs[:, 1], layer(2 * x)[0])
    if hasattr(layer, "spec"):
        assert rnnkit.explain_backend(layer, x) == "auto: fused cpu kernel for cpu tensors"
    layer.backend = "cpu"
    with pytest.raises(RuntimeError, match="cannot run here: torch.func's transforms"):
        torch.func.grad(loss(layer))(parameters)
