"""MinGRU and MinLSTM against the paper's equations, parallel against sequential, and their API."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnkit
from rnnkit.variants.minimal import MODES, MinGRU, MinLSTM, log_space_scan

CLASSES = [MinGRU, MinLSTM]
PATHS = [
    ("reference", "parallel"),
    ("reference", "sequential"),
    ("cpu", "parallel"),
    ("cpu", "sequential"),
]


def paper_g(v: torch.Tensor) -> torch.Tensor:
    return torch.where(v >= 0, v + 0.5, torch.sigmoid(v))


def paper_step(cls, x: torch.Tensor, h: torch.Tensor, w: torch.Tensor, b) -> torch.Tensor:
    """One step written from Feng et al. 2024's equations (sequential form, no log space)."""
    k = x @ w.T + (b if b is not None else 0)
    if cls is MinGRU:
        k_z, k_h = k.chunk(2, dim=-1)
        z = torch.sigmoid(k_z)
        return (1 - z) * h + z * paper_g(k_h)
    k_f, k_i, k_h = k.chunk(3, dim=-1)
    f, i = torch.sigmoid(k_f), torch.sigmoid(k_i)
    return f / (f + i) * h + i / (f + i) * paper_g(k_h)


def paper_layer(module, x, hx, lengths):
    """(T, B, I) -> (T, B, D*H), (L*D, B, H): each sequence alone, over its own valid steps."""
    steps, batch, _ = x.shape
    directions = 2 if module.bidirectional else 1
    lengths = [steps] * batch if lengths is None else [int(n) for n in lengths]
    outputs, finals = [], []
    for b in range(batch):
        n = lengths[b]
        layer_input = x[:n, b]
        sequence_finals = []
        for layer in range(module.num_layers):
            direction_outputs = []
            for direction in range(directions):
                w, bias = module.layer_weights(layer, direction)
                h = hx[layer * directions + direction, b]
                order = range(n - 1, -1, -1) if direction == 1 else range(n)
                hs = [None] * n
                for t in order:
                    h = paper_step(type(module), layer_input[t], h, w, bias)
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


def assert_close_all(mine, theirs, tol):
    for index, (a, b) in enumerate(zip(mine, theirs, strict=True)):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m, i=index: f"{i}: {m}")


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("backend,mode", PATHS)
def test_outputs_and_gradients_match_paper_equations(cls, backend, mode):
    torch.manual_seed(0)
    module = cls(3, 5, num_layers=2, bidirectional=True, dtype=torch.float64, backend=backend)
    x = torch.randn(9, 4, 3, dtype=torch.float64, requires_grad=True)
    hx = torch.randn(4, 4, 5, dtype=torch.float64, requires_grad=True)  # negative entries too
    lengths = torch.tensor([9, 4, 1, 6])
    inputs = [x, hx, *module.parameters()]
    mine = loss_and_grads(*module(x, hx, lengths=lengths, mode=mode), inputs)
    theirs = loss_and_grads(*paper_layer(module, x, hx, lengths), inputs)
    assert_close_all(mine, theirs, 1e-9)


@pytest.mark.parametrize("cls", CLASSES)
def test_parallel_equals_sequential_over_4096_steps(cls):
    torch.manual_seed(1)
    module = cls(2, 3, dtype=torch.float64, backend="reference")
    x = torch.randn(4096, 2, 2, dtype=torch.float64)
    hx = torch.tensor([[[-2.0, 0.0, 3.0], [0.5, -0.1, 1.0]]], dtype=torch.float64)
    lengths = torch.tensor([4096, 3001])
    with torch.no_grad():
        parallel = module(x, hx, lengths=lengths, mode="parallel")
        sequential = module(x, hx, lengths=lengths, mode="sequential")
        module.backend = "cpu"
        fused = module(x, hx, lengths=lengths, mode="parallel")
    for mine in (parallel, fused):
        torch.testing.assert_close(mine[0], sequential[0], atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(mine[1], sequential[1], atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("backend,mode", PATHS)
def test_gradcheck_on_tiny_sizes(cls, backend, mode):
    torch.manual_seed(2)
    module = cls(2, 2, num_layers=2, bidirectional=True, dtype=torch.float64, backend=backend)
    x = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    hx = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in module.named_parameters()]

    def run(x, hx, *weights):
        return torch.func.functional_call(
            module,
            dict(zip(names, weights)),
            (x, hx),
            {"lengths": torch.tensor([4, 2]), "mode": mode},
        )

    weights = [p.detach().clone().requires_grad_(True) for p in module.parameters()]
    assert torch.autograd.gradcheck(run, (x, hx, *weights))


def test_log_space_scan_solves_the_linear_recurrence_with_any_initial_sign():
    torch.manual_seed(3)
    a = torch.rand(50, 2, 3, dtype=torch.float64) * 0.9 + 0.05
    b = torch.rand(50, 2, 3, dtype=torch.float64) + 0.01
    h0 = torch.tensor([[-3.0, 0.0, 2.0], [1e-3, -1e-3, 7.0]], dtype=torch.float64)
    h, expected = h0, []
    for t in range(50):
        h = a[t] * h + b[t]
        expected.append(h)
    torch.testing.assert_close(
        log_space_scan(a.log(), b.log(), h0), torch.stack(expected), atol=1e-12, rtol=1e-12
    )


@pytest.mark.parametrize("cls", CLASSES)
def test_step_by_step_streaming_matches_forward(cls):
    torch.manual_seed(4)
    module = cls(3, 4, num_layers=2, dtype=torch.float64)
    x = torch.randn(7, 2, 3, dtype=torch.float64)
    hx = torch.randn(2, 2, 4, dtype=torch.float64)
    output, h_n = module(x, hx)
    state, steps = hx, []
    for t in range(7):
        y, state = module.step(x[t], state)
        steps.append(y)
    torch.testing.assert_close(torch.stack(steps), output, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(state, h_n, atol=1e-12, rtol=1e-12)
    y, state = module.step(x[0, 0])
    assert y.shape == (4,) and state.shape == (2, 4)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_float32_paths_agree(backend):
    torch.manual_seed(5)
    module = MinLSTM(4, 8, bidirectional=True, backend=backend)
    x = torch.randn(300, 3, 4)
    with torch.no_grad():
        parallel = module(x, mode="parallel")
        sequential = module(x, mode="sequential")
    torch.testing.assert_close(parallel[0], sequential[0], atol=1e-4, rtol=1e-4)


def test_layouts_batch_first_unbatched_and_packed_agree():
    torch.manual_seed(6)
    module = MinGRU(3, 4, bidirectional=True, dtype=torch.float64)
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    lengths = torch.tensor([5, 2, 4])
    output, h_n = module(x, lengths=lengths)
    module.batch_first = True
    output_bf, h_n_bf = module(x.transpose(0, 1), lengths=lengths)
    torch.testing.assert_close(output_bf.transpose(0, 1), output)
    torch.testing.assert_close(h_n_bf, h_n)
    packed = pack_padded_sequence(
        x.transpose(0, 1), lengths, batch_first=True, enforce_sorted=False
    )
    output_packed, h_n_packed = module(packed)
    unpacked, _ = pad_packed_sequence(output_packed, batch_first=True, total_length=5)
    torch.testing.assert_close(unpacked.transpose(0, 1), output)
    torch.testing.assert_close(h_n_packed, h_n)
    module.batch_first = False
    single, h_single = module(x[:, 0])
    torch.testing.assert_close(single, output[:, 0])
    torch.testing.assert_close(h_single, h_n[:, 0])
    assert (output[2:, 1] == 0).all()


def test_exported_from_rnnkit_with_parameter_names_and_shapes():
    module = rnnkit.MinLSTM(3, 4, num_layers=2, bidirectional=True, bias=False)
    shapes = {name: tuple(p.shape) for name, p in module.named_parameters()}
    assert shapes == {
        "weight_ih_l0": (12, 3),
        "weight_ih_l0_reverse": (12, 3),
        "weight_ih_l1": (12, 8),
        "weight_ih_l1_reverse": (12, 8),
    }
    output, h_n = module(torch.randn(5, 2, 3))
    assert output.shape == (5, 2, 8) and h_n.shape == (4, 2, 4)
    assert rnnkit.MinGRU(3, 4).weight_ih_l0.shape == (8, 3)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda m: m(torch.randn(5, 2, 3), mode="scan"), "mode must be one of"),
        (lambda m: m(torch.randn(5, 2, 2)), r"input.size\(-1\) must be input_size=3, got 2"),
        (
            lambda m: m(torch.randn(5, 2, 3), torch.zeros(1, 3, 4)),
            r"hx must have shape \(1, 2, 4\)",
        ),
        (lambda m: m(torch.randn(5, 2, 3), lengths=[5, 6]), "lengths must be <= the number"),
        (lambda m: m(torch.randn(5, 2, 3).double()), "input.dtype must match"),
        (lambda m: m.step(torch.randn(2, 5)), r"input must be \(B, input_size=3\)"),
    ],
)
def test_bad_arguments_are_named(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call(MinGRU(3, 4))


def test_bad_constructor_arguments_are_named():
    with pytest.raises(ValueError, match="hidden_size must be an int >= 1, got 0"):
        MinGRU(3, 0)
    with pytest.raises(ValueError, match="backend must be one of"):
        MinLSTM(3, 4, backend="cuda")
    with pytest.raises(ValueError, match="step needs a unidirectional layer"):
        MinGRU(3, 4, bidirectional=True).step(torch.randn(2, 3))


def test_rnnkit_stream_in_chunks_matches_whole_sequence():
    torch.manual_seed(7)
    module = MinLSTM(3, 4, num_layers=2, dtype=torch.float64)
    x = torch.randn(2, 10, 3, dtype=torch.float64)  # Stream's protocol chunks are batch-first
    whole, _ = module(x.transpose(0, 1))
    stream = rnnkit.Stream(module)
    pieces = [stream.step(x[:, a:b]) for a, b in ((0, 1), (1, 4), (4, 10))]
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole.transpose(0, 1))
    assert stream.steps == 10


@pytest.mark.parametrize("cls", [MinGRU, MinLSTM])
def test_dropout_between_layers_only_in_training(cls):
    torch.manual_seed(0)
    plain = cls(3, 4, num_layers=2).double()
    dropped = cls(3, 4, num_layers=2, dropout=1.0).double()
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    plain.eval(), dropped.eval()
    torch.testing.assert_close(dropped(x)[0], plain(x)[0], rtol=0, atol=0)
    dropped.train()
    # p = 1 zeroes the first layer's output: the second layer then sees only zeros.
    second = cls(4, 4).double()
    second.weight_ih_l0.data.copy_(plain.weight_ih_l1.data)
    second.bias_ih_l0.data.copy_(plain.bias_ih_l1.data)
    expected, _ = second(torch.zeros(6, 2, 4, dtype=torch.float64))
    torch.testing.assert_close(dropped(x)[0], expected, rtol=0, atol=1e-12)
    stepped, _ = dropped.step(x[0])
    torch.testing.assert_close(stepped, expected[0], rtol=0, atol=1e-12)


def test_dropout_out_of_range_is_named():
    with pytest.raises(ValueError, match="dropout must be a number in"):
        MinGRU(3, 4, dropout=1.5)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("steps,num_layers", [(1, 2), (37, 2), (4096, 1)])
@pytest.mark.parametrize("split", [False, True])
def test_cpu_parallel_mode_matches_reference_sequential_mode(
    cls, steps, num_layers, split, monkeypatch
):
    """backend='cpu', mode='parallel' (the fused kernels; split: with thresholds so low that a
    batch of 2 runs as two parts and a batch of 1 as chunks of time) against the step loop:
    outputs and every gradient, with lengths and both directions."""
    from rnnkit.kernels.cpu import minimal as minimal_kernel

    if split:
        monkeypatch.setattr(minimal_kernel, "_MIN_ELEMENTS_PER_THREAD", 1)
        monkeypatch.setattr(minimal_kernel, "_MIN_FORWARD_ELEMENTS_PER_THREAD", 1)
        monkeypatch.setattr(minimal_kernel, "_MIN_CHUNK_STEPS", 2)
        monkeypatch.setattr(minimal_kernel.threads, "concurrency", lambda: 2)
    torch.manual_seed(8)
    compiled = cls(3, 4, num_layers, bidirectional=True, dtype=torch.float64, backend="cpu")
    loop = cls(3, 4, num_layers, bidirectional=True, dtype=torch.float64, backend="reference")
    loop.load_state_dict(compiled.state_dict())
    for batch in (2, 1):
        x = torch.randn(steps, batch, 3, dtype=torch.float64, requires_grad=True)
        hx = torch.randn(2 * num_layers, batch, 4, dtype=torch.float64, requires_grad=True)
        lengths = torch.tensor([steps, steps // 2 + 1][:batch])
        results = []
        for module, mode in ((compiled, "parallel"), (loop, "sequential")):
            inputs = [x, hx, *module.parameters()]
            results.append(loss_and_grads(*module(x, hx, lengths=lengths, mode=mode), inputs))
        mine, theirs = results
        assert_close_all(mine, theirs, 1e-9)


@pytest.mark.parametrize("cls", CLASSES)
def test_chunks_of_time_only_in_the_cpu_parallel_mode(cls, monkeypatch):
    from rnnkit.kernels.cpu import minimal as minimal_kernel

    monkeypatch.setattr(minimal_kernel, "_MIN_ELEMENTS_PER_THREAD", 1)
    monkeypatch.setattr(minimal_kernel, "_MIN_FORWARD_ELEMENTS_PER_THREAD", 1)
    monkeypatch.setattr(minimal_kernel, "_MIN_CHUNK_STEPS", 2)
    monkeypatch.setattr(minimal_kernel.threads, "concurrency", lambda: 2)
    calls = []
    original = minimal_kernel._forward_chunks

    def counted(arrays, h0, count):
        calls.append(count)
        return original(arrays, h0, count)

    monkeypatch.setattr(minimal_kernel, "_forward_chunks", counted)
    x = torch.randn(6, 1, 3)
    runs = {}
    for backend in ("auto", "cpu", "reference"):
        module = cls(3, 4, num_layers=2, bidirectional=True, backend=backend)
        for mode in MODES:
            calls.clear()
            module(x, mode=mode)[0].sum().backward()
            runs[backend, mode] = len(calls)
    assert runs == {
        ("auto", "parallel"): 4,  # one per layer and direction
        ("auto", "sequential"): 0,
        ("cpu", "parallel"): 4,
        ("cpu", "sequential"): 0,
        ("reference", "parallel"): 0,
        ("reference", "sequential"): 0,
    }


# --- inference: the input projection fused into the CPU kernels ---------------------------------


@pytest.fixture
def count_fused_projections(monkeypatch):
    """The calls of the fused projection-and-walk, one per layer and direction."""
    from rnnkit.kernels.cpu import minimal as minimal_kernel

    calls = []
    original = minimal_kernel._projected_forward

    def counted(*arguments):
        calls.append(arguments)
        return original(*arguments)

    monkeypatch.setattr(minimal_kernel, "_projected_forward", counted)
    return calls


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_inference_matches_linear_then_scan_and_the_reference(
    cls, dtype, bias, split, batch_first, count_fused_projections, monkeypatch
):
    """backend='cpu' under torch.inference_mode (the projection inside the kernels) against the
    same layer with gradients (F.linear, then the fused scan) and backend='reference': two
    bidirectional layers, lengths 1 to full, h0 given or not, batch 4 and 1, both modes; split:
    two threads with thresholds so low that the batch of 4 runs as two parts of its rows, the
    batch of 1 as two parts of the hidden units, with chunks of projection that do not divide
    T."""
    from rnnkit.kernels.cpu import minimal as minimal_kernel

    if split:
        monkeypatch.setattr(minimal_kernel, "_MIN_ELEMENTS_PER_THREAD", 1)
        monkeypatch.setattr(minimal_kernel, "_MIN_FORWARD_ELEMENTS_PER_THREAD", 1)
        monkeypatch.setattr(minimal_kernel, "_MIN_CHUNK_STEPS", 2)
        monkeypatch.setattr(minimal_kernel, "_UNIT_ALIGNMENT", 1)
        monkeypatch.setattr(minimal_kernel, "_PROJECTION_ELEMENTS", 7 * cls.gates * 5)
        monkeypatch.setattr(minimal_kernel.threads, "concurrency", lambda: 2)
    else:  # one thread: walks too small to split are fused only there
        monkeypatch.setattr(minimal_kernel.threads, "concurrency", lambda: 1)
    torch.manual_seed(9)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}[dtype]
    options = {"bidirectional": True, "bias": bias, "batch_first": batch_first, "dtype": dtype}
    fused = cls(3, 5, 2, backend="cpu", **options)
    reference = cls(3, 5, 2, backend="reference", **options)
    reference.load_state_dict(fused.state_dict())
    steps = 30
    for batch, lengths in ((4, [30, 1, 17, 8]), (1, None)):
        x = torch.randn(steps, batch, 3, dtype=dtype)
        x = x.transpose(0, 1).contiguous() if batch_first else x
        lengths = None if lengths is None else torch.tensor(lengths)
        for hx in (None, torch.randn(4, batch, 5, dtype=dtype)):
            for mode in MODES:
                count_fused_projections.clear()
                with torch.inference_mode():
                    inferred = fused(x, hx, lengths=lengths, mode=mode)
                assert len(count_fused_projections) == 4  # 2 layers x 2 directions
                trained = fused(x.clone().requires_grad_(True), hx, lengths=lengths, mode=mode)
                assert len(count_fused_projections) == 4 and trained[0].requires_grad
                with torch.no_grad():
                    expected = reference(x, hx, lengths=lengths, mode="sequential")
                for theirs in (trained, expected):
                    assert_close_all(inferred, [t.detach() for t in theirs], tol)


@pytest.mark.parametrize("cls", CLASSES)
def test_fused_projection_runs_only_where_no_gradient_is_recorded(
    cls, count_fused_projections, monkeypatch
):
    from rnnkit.kernels.cpu import minimal as minimal_kernel

    # One thread, on which the fused projection runs however small the walk.
    monkeypatch.setattr(minimal_kernel.threads, "concurrency", lambda: 1)
    torch.manual_seed(10)
    x = torch.randn(6, 2, 3)
    runs = {}
    for backend in ("auto", "cpu", "reference"):
        module = cls(3, 4, num_layers=2, bidirectional=True, backend=backend)
        for name, context in (
            ("inference_mode", torch.inference_mode),
            ("no_grad", torch.no_grad),
            ("grad", torch.enable_grad),
        ):
            count_fused_projections.clear()
            with context():
                module(x)
            runs[backend, name] = len(count_fused_projections)
        count_fused_projections.clear()
        module.requires_grad_(False)  # nothing requires grad: no gradient to record either
        module(x)
        runs[backend, "frozen"] = len(count_fused_projections)
    assert runs == {
        **{("auto", name): 4 for name in ("inference_mode", "no_grad", "frozen")},
        **{("cpu", name): 4 for name in ("inference_mode", "no_grad", "frozen")},
        ("auto", "grad"): 0,
        ("cpu", "grad"): 0,
        **{("reference", name): 0 for name in ("inference_mode", "no_grad", "grad", "frozen")},
    }
