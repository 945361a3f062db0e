"""The fused minGRU/minLSTM scan kernel against the torch log-space and step-by-step scans."""

from __future__ import annotations

import pytest
import torch

from rnnkit.kernels.cpu import minimal as minimal_kernel
from rnnkit.kernels.cpu import threads
from rnnkit.kernels.cpu.minimal import MinimalScanFunction
from rnnkit.variants.minimal import parallel_scan, sequential_scan

GATES = {"min_gru": 2, "min_lstm": 3}
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def outputs_and_grads(scan, cell, gates, h0, lengths):
    output, final = scan(cell, gates, h0, lengths)
    weights = torch.linspace(-1, 1, output.numel(), dtype=output.dtype).view(output.shape)
    loss = (output * weights).sum() + (final * final).sum()
    return [output, final, *torch.autograd.grad(loss, (gates, h0))]


@pytest.mark.parametrize("cell", list(GATES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("lengths", [None, [40, 1, 17]])
def test_fused_scan_matches_both_torch_scans(cell, dtype, lengths):
    torch.manual_seed(0)
    gates = (3 * torch.randn(40, 3, GATES[cell] * 6, dtype=dtype)).requires_grad_(True)
    h0 = torch.randn(3, 6, dtype=dtype, requires_grad=True)
    lengths = None if lengths is None else torch.tensor(lengths)
    fused = outputs_and_grads(minimal_kernel.scan_direction, cell, gates, h0, lengths)
    for scan in (sequential_scan, parallel_scan):
        # In float32 the log-space scan rounds log h to about eps * |sum of log a| (see its doc).
        tol = 2e-3 if scan is parallel_scan and dtype == torch.float32 else TOLERANCE[dtype]
        reference = outputs_and_grads(scan, cell, gates, h0, lengths)
        for a, b in zip(fused, reference, strict=True):
            torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("cell", list(GATES))
def test_gradcheck_of_the_fused_function(cell):
    torch.manual_seed(1)
    gates = torch.randn(5, 2, GATES[cell] * 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    for lengths in (None, torch.tensor([5, 3])):
        assert torch.autograd.gradcheck(
            lambda g, h, lengths=lengths: MinimalScanFunction.apply(
                g, h, lengths, cell == "min_lstm"
            ),
            (gates, h0),
        )


def test_saturated_gates_stay_finite_and_exact():
    # f and i both below float64's smallest number: f / (f + i) is 0/0 unless done in log space.
    gates = torch.tensor([[[-800.0, -801.0, 2.0]]], dtype=torch.float64, requires_grad=True)
    h0 = torch.tensor([[4.0]], dtype=torch.float64, requires_grad=True)
    output, _ = minimal_kernel.scan_direction("min_lstm", gates, h0, None)
    keep = torch.sigmoid(torch.tensor(1.0, dtype=torch.float64))  # f/(f+i) = e/(e+1)
    expected = keep * 4.0 + (1 - keep) * 2.5
    torch.testing.assert_close(output[0, 0, 0], expected)
    output.sum().backward()
    assert torch.isfinite(gates.grad).all() and torch.isfinite(h0.grad).all()


def test_padding_outputs_zero_and_final_is_last_valid_state():
    torch.manual_seed(2)
    gates = torch.randn(6, 2, 4, dtype=torch.float64)
    h0 = torch.randn(2, 2, dtype=torch.float64)
    output, final = minimal_kernel.scan_direction("min_gru", gates, h0, torch.tensor([6, 2]))
    assert (output[2:, 1] == 0).all()
    torch.testing.assert_close(final[1], output[1, 1])
    torch.testing.assert_close(final[0], output[5, 0])


def test_unknown_cell_is_rejected():
    with pytest.raises(ValueError, match="cell must be one of"):
        minimal_kernel.scan_direction("gru", torch.zeros(1, 1, 2), torch.zeros(1, 1), None)
    with pytest.raises(ValueError, match="cell must be one of"):
        minimal_kernel.project_and_scan(
            "gru", torch.zeros(1, 1, 2), torch.zeros(2, 2), None, torch.zeros(1, 1), None
        )


def _grid_of_extremes(cell, scale):
    """(T, B, G*H) projections where each unit pairs every sign and size of each gate."""
    values = torch.tensor([-scale, -1.0, 0.0, 1.0, scale])
    combos = torch.cartesian_prod(*[values] * GATES[cell])  # (5^G, G): one column per gate
    return combos.t().reshape(1, 1, -1).repeat(3, 2, 1).double()


@pytest.mark.parametrize("cell", list(GATES))
@pytest.mark.parametrize("scale", [None, 20.0, 100.0, 1e4])
def test_float32_matches_float64_on_random_and_extreme_gates(cell, scale):
    torch.manual_seed(3)
    if scale is None:
        gates64 = 4 * torch.randn(30, 4, GATES[cell] * 16, dtype=torch.float64)
    else:
        gates64 = _grid_of_extremes(cell, scale)
    hidden = gates64.shape[-1] // GATES[cell]
    h0_64 = torch.randn(gates64.shape[1], hidden, dtype=torch.float64)
    gates64 = gates64.float().double()  # the same values in both precisions
    lengths = torch.tensor([gates64.shape[0], 1] + [2] * (gates64.shape[1] - 2))
    results = []
    for dtype in (torch.float32, torch.float64):
        gates = gates64.to(dtype).requires_grad_(True)
        h0 = h0_64.to(dtype).requires_grad_(True)
        results.append(outputs_and_grads(minimal_kernel.scan_direction, cell, gates, h0, lengths))
    for single, double in zip(*results, strict=True):
        assert torch.isfinite(single).all()
        torch.testing.assert_close(single.double(), double, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "cell, gate", [(cell, gate) for cell in GATES for gate in range(GATES[cell])]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_in_a_projection_propagates_as_in_the_torch_scan(cell, dtype, gate):
    torch.manual_seed(5)
    gates = torch.randn(5, 2, GATES[cell] * 3, dtype=dtype)
    gates[2, 1, gate * 3 + 1] = float("nan")
    h0 = torch.randn(2, 3, dtype=dtype)
    nan_masks = []
    for scan in (minimal_kernel.scan_direction, sequential_scan):
        inputs = (gates.clone().requires_grad_(True), h0.clone().requires_grad_(True))
        nan_masks.append([t.isnan() for t in outputs_and_grads(scan, cell, *inputs, None)])
    for fused, reference in zip(*nan_masks, strict=True):
        assert torch.equal(fused, reference)
    output_nan = nan_masks[0][0]
    assert output_nan[2:, 1, 1].all() and output_nan.sum() == 3  # that unit, from that step on


@pytest.mark.parametrize("cell", list(GATES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_at_padded_steps_are_exactly_zero(cell, dtype):
    torch.manual_seed(4)
    gates = torch.randn(7, 3, GATES[cell] * 5, dtype=dtype, requires_grad=True)
    h0 = torch.randn(3, 5, dtype=dtype, requires_grad=True)
    output, final = minimal_kernel.scan_direction(cell, gates, h0, torch.tensor([7, 3, 0]))
    assert (output[3:, 1] == 0).all() and (output[:, 2] == 0).all()
    torch.testing.assert_close(final[2], h0[2])
    # Non-zero incoming gradients at padded steps must not leak into the projections.
    (output.sum() + final.sum()).backward()
    assert (gates.grad[3:, 1] == 0).all() and (gates.grad[:, 2] == 0).all()
    assert (gates.grad[:3, 1] != 0).any()
    torch.testing.assert_close(h0.grad[2], torch.ones(5, dtype=dtype))


# --- threads: batch parts and the parallel mode's chunks of time ------------------------------


@pytest.fixture
def split_everything(monkeypatch):
    """Tiny thresholds, so that tiny inputs run as batch parts or chunks of time."""
    monkeypatch.setattr(minimal_kernel, "_MIN_ELEMENTS_PER_THREAD", 1)
    monkeypatch.setattr(minimal_kernel, "_MIN_FORWARD_ELEMENTS_PER_THREAD", 1)
    monkeypatch.setattr(minimal_kernel, "_MIN_CHUNK_STEPS", 2)


@pytest.fixture(params=[2, 3, 4])
def thread_count(request):
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


def _run_counting(monkeypatch, name):
    """Calls of minimal_kernel.<name> during a test, recorded by their arguments."""
    calls = []
    original = getattr(minimal_kernel, name)

    def counted(*arguments):
        calls.append(arguments)
        return original(*arguments)

    monkeypatch.setattr(minimal_kernel, name, counted)
    return calls


@pytest.mark.skipif(not threads.AVAILABLE, reason="torch's OpenMP runtime is not GNU libgomp")
@pytest.mark.parametrize("cell", list(GATES))
@pytest.mark.parametrize("steps, lengths", [(37, None), (5, None), (37, [20]), (9, [0])])
def test_chunked_parallel_scan_matches_the_sequential_walk(
    cell, steps, lengths, split_everything, thread_count, monkeypatch
):
    torch.manual_seed(6)
    gates = (3 * torch.randn(steps, 1, GATES[cell] * 5, dtype=torch.float64)).requires_grad_(True)
    h0 = torch.randn(1, 5, dtype=torch.float64, requires_grad=True)
    lengths = None if lengths is None else torch.tensor(lengths)
    chunked = _run_counting(monkeypatch, "_forward_chunks")
    carried = _run_counting(monkeypatch, "_carry_back_kernel")
    results = [outputs_and_grads(minimal_kernel.scan_direction, cell, gates, h0, lengths)]
    count = minimal_kernel.chunk_count(steps, 1, 5)
    assert count == min(thread_count, steps // 2) and len(chunked) == 0
    results.append(
        outputs_and_grads(
            lambda *a: minimal_kernel.scan_direction(*a, parallel=True), cell, gates, h0, lengths
        )
    )
    assert len(chunked) == 1 and len(carried) == count - 1  # one carry per chunk but the last
    results.append(outputs_and_grads(sequential_scan, cell, gates, h0, lengths))
    walked, scanned, loop = results
    for a, b, c in zip(walked, scanned, loop, strict=True):
        torch.testing.assert_close(b, a, atol=1e-13, rtol=1e-13)
        torch.testing.assert_close(b, c, atol=1e-12, rtol=1e-12)
    if lengths is not None:
        valid = int(lengths[0])
        assert (scanned[0][valid:] == 0).all() and (scanned[2][valid:] == 0).all()


@pytest.mark.parametrize("cell", list(GATES))
def test_chunked_backward_is_the_sequential_arithmetic(cell, split_everything, monkeypatch):
    """Given the same saved states, the chunked backward gives bit-identical gradients: each
    thread's carry repeats the walk's own operations."""
    monkeypatch.setattr(minimal_kernel.threads, "concurrency", lambda: 3)
    torch.manual_seed(7)
    steps, hidden = 40, 6
    gates = 3 * torch.randn(steps, 1, GATES[cell] * hidden)
    h0 = torch.randn(1, hidden)
    lstm = cell == "min_lstm"
    output, _ = minimal_kernel._forward(gates, h0, None, lstm, parallel=False)
    grad_output, grad_final = torch.randn(steps, 1, hidden), torch.randn(1, hidden)
    for lengths in (None, torch.tensor([23])):
        walked, scanned = (
            minimal_kernel._backward(
                grad_output, grad_final, gates, h0, output, lengths, lstm, parallel
            )
            for parallel in (False, True)
        )
        for a, b in zip(walked, scanned, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("cell", list(GATES))
@pytest.mark.parametrize("parallel", [False, True])
def test_batch_parts_match_one_part(cell, parallel, split_everything, monkeypatch):
    """Batch rows split over threads (the parallel mode too: chunks only when rows cannot be
    split) give the same numbers as one walk over all rows."""
    monkeypatch.setattr(minimal_kernel.threads, "concurrency", lambda: 2)
    torch.manual_seed(8)
    gates = (3 * torch.randn(11, 5, GATES[cell] * 4, dtype=torch.float64)).requires_grad_(True)
    h0 = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([11, 3, 7, 1, 11])
    chunked = _run_counting(monkeypatch, "_forward_chunks")
    split = outputs_and_grads(
        lambda *a: minimal_kernel.scan_direction(*a, parallel=parallel), cell, gates, h0, lengths
    )
    assert len(chunked) == 0
    assert len(minimal_kernel._batch_parts(11, 5, 4)) == 2
    monkeypatch.setattr(minimal_kernel.threads, "concurrency", lambda: 1)
    whole = outputs_and_grads(minimal_kernel.scan_direction, cell, gates, h0, lengths)
    for a, b in zip(split, whole, strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif(not threads.AVAILABLE, reason="torch's OpenMP runtime is not GNU libgomp")
@pytest.mark.parametrize("cell", list(GATES))
def test_gradcheck_of_the_chunked_scan(cell, split_everything, monkeypatch):
    monkeypatch.setattr(minimal_kernel.threads, "concurrency", lambda: 2)
    torch.manual_seed(9)
    gates = torch.randn(7, 1, GATES[cell] * 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(1, 3, dtype=torch.float64, requires_grad=True)
    for lengths in (None, torch.tensor([4])):
        assert torch.autograd.gradcheck(
            lambda g, h, lengths=lengths: MinimalScanFunction.apply(
                g, h, lengths, cell == "min_lstm", True
            ),
            (gates, h0),
        )


@pytest.mark.parametrize("cell, gate", [("min_gru", 0), ("min_lstm", 1), ("min_lstm", 2)])
def test_nan_propagates_through_the_chunked_scan_as_through_the_walk(
    cell, gate, split_everything, monkeypatch
):
    monkeypatch.setattr(minimal_kernel.threads, "concurrency", lambda: 2)
    torch.manual_seed(10)
    gates = torch.randn(12, 1, GATES[cell] * 3)
    gates[3, 0, gate * 3 + 1] = float("nan")  # in the first chunk: every later chunk's carry
    h0 = torch.randn(1, 3)
    masks = []
    for parallel in (False, True):
        inputs = (gates.clone().requires_grad_(True), h0.clone().requires_grad_(True))
        results = outputs_and_grads(
            lambda *a, parallel=parallel: minimal_kernel.scan_direction(*a, parallel=parallel),
            cell,
            *inputs,
            None,
        )
        masks.append([t.isnan() for t in results])
    for walked, scanned in zip(*masks, strict=True):
        assert torch.equal(walked, scanned)
    assert masks[1][0][3:, 0, 1].all() and masks[1][0].sum() == 9


def test_backward_chunks_give_every_thread_the_same_work():
    for count in (2, 3, 4):
        sizes = minimal_kernel.backward_chunk_weights(count, carry_cost=0.3)
        work = [0.3 * sum(sizes[k + 1 :]) + sizes[k] for k in range(count)]
        assert all(size > 0 for size in sizes)
        assert max(work) - min(work) < 1e-12
    assert minimal_kernel._edges(10, [1.0, 1.0, 2.0]) == [0, 2, 5, 10]


def test_chunk_count_follows_threads_and_sizes(monkeypatch):
    monkeypatch.setattr(minimal_kernel.threads, "concurrency", lambda: 4)
    assert minimal_kernel.chunk_count(4096, 1, 128) == 4
    assert minimal_kernel.chunk_count(40, 16, 128) == 2  # 16 steps a chunk at least
    assert minimal_kernel.chunk_count(4096, 1, 4) == 1  # too little work to start a thread
    assert minimal_kernel.chunk_count(1024, 1, 128) == 4
    assert minimal_kernel.chunk_count(1024, 1, 128, forward=True) == 1  # the forward pays later
    assert minimal_kernel.chunk_count(4096, 1, 128, forward=True) == 2
    monkeypatch.setattr(minimal_kernel.threads, "concurrency", lambda: 1)
    assert minimal_kernel.chunk_count(4096, 1, 128) == 1


# --- the input projection fused into the forward (no gradients) -------------------------------


@pytest.fixture
def one_thread(monkeypatch):
    """One thread: the fused projection runs however small the walk (see the next tests)."""
    monkeypatch.setattr(minimal_kernel.threads, "concurrency", lambda: 1)


@pytest.fixture
def small_projection_chunks(monkeypatch):
    """Chunks of 4 steps for minGRU's gate width of 10, 3 for minLSTM's 15 (no test's length is
    a multiple)."""
    monkeypatch.setattr(minimal_kernel, "_PROJECTION_ELEMENTS", 45)
    monkeypatch.setattr(minimal_kernel, "_MIN_PROJECTION_STEPS", 1)


def _projection_inputs(cell, dtype, steps, batch, layout, seed, hidden=5, features=4):
    torch.manual_seed(seed)
    if layout == "batch_first":  # a transposed view, as the layers pass batch-first input
        x = torch.randn(batch, steps, features, dtype=dtype).transpose(0, 1)
    elif layout == "strided":  # every other feature: neither layout, copied
        x = torch.randn(steps, batch, 2 * features, dtype=dtype)[:, :, ::2]
    else:
        x = torch.randn(steps, batch, features, dtype=dtype)
    weight = torch.randn(GATES[cell] * hidden, features, dtype=dtype)
    bias = torch.randn(GATES[cell] * hidden, dtype=dtype)
    h0 = torch.randn(batch, hidden, dtype=dtype)
    return x, weight, bias, h0


def _fused_and_unfused(cell, x, weight, bias, h0, lengths, parallel):
    with torch.no_grad():
        fused = minimal_kernel.project_and_scan(cell, x, weight, bias, h0, lengths, parallel)
        gates = torch.nn.functional.linear(x, weight, bias)
        unfused = minimal_kernel.scan_direction(cell, gates, h0, lengths, parallel)
        loop = sequential_scan(cell, gates, h0, lengths)
    return fused, unfused, loop


@pytest.mark.parametrize("cell", list(GATES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("lengths", [None, [37, 1, 14, 0]])
@pytest.mark.parametrize("layout", ["time_major", "batch_first", "strided"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_projection_matches_linear_then_scan(
    cell, dtype, lengths, layout, with_bias, small_projection_chunks, one_thread, monkeypatch
):
    x, weight, bias, h0 = _projection_inputs(cell, dtype, 37, 4, layout, seed=11)
    bias = bias if with_bias else None
    lengths = None if lengths is None else torch.tensor(lengths)
    chunk = minimal_kernel.projection_chunk(37, weight.shape[0])
    assert 1 < chunk < 37 and 37 % chunk != 0
    walks = _run_counting(monkeypatch, "_projected_forward_kernel")
    fused, unfused, loop = _fused_and_unfused(cell, x, weight, bias, h0, lengths, False)
    assert len(walks) == 1
    for reference in (unfused, loop):
        for a, b in zip(fused, reference, strict=True):
            torch.testing.assert_close(a, b, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    if lengths is not None:
        assert (fused[0][1:, 1] == 0).all() and (fused[0][:, 3] == 0).all()
        torch.testing.assert_close(fused[1][3], h0[3], atol=0, rtol=0)
        torch.testing.assert_close(fused[1][2], fused[0][13, 2], atol=0, rtol=0)


@pytest.mark.parametrize("cell", list(GATES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_projection_at_the_default_chunk_size(cell, dtype, one_thread):
    """Real sizes: the panel product (float32 with AVX-512) or BLAS, several chunks and a part
    of one, with every step of the walk reading its row of the chunk."""
    torch.manual_seed(12)
    steps, batch, features, hidden = 203, 3, 64, 128
    x = torch.randn(batch, steps, features, dtype=dtype).transpose(0, 1)
    weight = torch.randn(GATES[cell] * hidden, features, dtype=dtype) / 8
    bias = torch.randn(GATES[cell] * hidden, dtype=dtype)
    h0 = torch.randn(batch, hidden, dtype=dtype)
    lengths = torch.tensor([203, 150, 1])
    assert steps % minimal_kernel.projection_chunk(steps, weight.shape[0]) != 0
    fused, unfused, loop = _fused_and_unfused(cell, x, weight, bias, h0, lengths, False)
    for reference in (unfused, loop):
        for a, b in zip(fused, reference, strict=True):
            torch.testing.assert_close(a, b, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("cell", list(GATES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch, lengths", [(5, [23, 3, 1, 23, 9]), (1, None), (1, [17])])
@pytest.mark.parametrize("parallel", [False, True])
def test_fused_projection_over_parts_of_the_batch_or_of_the_units(
    cell, dtype, batch, lengths, parallel, split_everything, small_projection_chunks, monkeypatch
):
    """Two threads: a batch of 5 as two parts of its rows (the weight packed once), a batch of 1
    as two parts of the hidden units (each part's rows of the weight packed once), in either
    mode; never chunks of time."""
    monkeypatch.setattr(minimal_kernel.threads, "concurrency", lambda: 2)
    monkeypatch.setattr(minimal_kernel, "_UNIT_ALIGNMENT", 2)
    x, weight, bias, h0 = _projection_inputs(cell, dtype, 23, batch, "batch_first", seed=13)
    lengths = None if lengths is None else torch.tensor(lengths)
    chunked = _run_counting(monkeypatch, "_forward_chunks")
    prepared = _run_counting(monkeypatch, "_prepare_projection")
    walks = _run_counting(monkeypatch, "_projected_forward_kernel")
    fused, unfused, loop = _fused_and_unfused(cell, x, weight, bias, h0, lengths, parallel)
    # In the order the threads started them: sorted.
    units = sorted((walk[13], walk[14]) for walk in walks)  # unit_start, unit_stop
    rows = sorted((walk[11], walk[12]) for walk in walks)  # batch_start, batch_stop
    if batch == 1:
        assert units == [(0, 2), (2, 5)] and rows == [(0, 1)] * 2 and len(prepared) == 2
        assert sorted(len(call[1]) for call in prepared) == [GATES[cell] * 2, GATES[cell] * 3]
    else:
        assert units == [(0, 5)] * 2 and rows == [(0, 2), (2, 5)] and len(prepared) == 1
    # Only scan_direction, for the unfused result, runs chunks of time.
    assert len(chunked) == (1 if batch == 1 and parallel else 0)
    for reference in (unfused, loop):
        for a, b in zip(fused, reference, strict=True):
            torch.testing.assert_close(a, b, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_unit_parts_are_aligned_and_cover_the_units(monkeypatch):
    monkeypatch.setattr(minimal_kernel.threads, "concurrency", lambda: 3)
    assert minimal_kernel.unit_parts(4096, 1, 128) == [(0, 48), (48, 80), (80, 128)]
    assert minimal_kernel.unit_parts(4096, 1, 40) == [(0, 16), (16, 40)]  # 16 units a part
    assert minimal_kernel.unit_parts(4096, 1, 31) == [(0, 31)]
    assert minimal_kernel.unit_parts(256, 1, 128) == [(0, 128)]  # too little work to split
    monkeypatch.setattr(minimal_kernel.threads, "concurrency", lambda: 1)
    assert minimal_kernel.unit_parts(4096, 1, 128) == [(0, 128)]


def test_fused_projection_only_without_gradients(one_thread, monkeypatch):
    """Fused under no_grad, inference_mode, or when nothing requires grad; otherwise F.linear
    and the autograd node, whose gradients reach the weight."""
    calls = _run_counting(monkeypatch, "_projected_forward")
    x, weight, bias, h0 = _projection_inputs("min_gru", torch.float64, 6, 2, "time_major", 14)
    arguments = ("min_gru", x, weight, bias, h0, None)
    with torch.no_grad():
        minimal_kernel.project_and_scan(*arguments)
    with torch.inference_mode():
        minimal_kernel.project_and_scan(*arguments)
    minimal_kernel.project_and_scan(*arguments)
    assert len(calls) == 3
    for requires in ("x", "weight", "bias", "h0"):
        tensors = {"x": x, "weight": weight, "bias": bias, "h0": h0}
        tensors[requires] = tensors[requires].clone().requires_grad_(True)
        output, final = minimal_kernel.project_and_scan(
            "min_gru", tensors["x"], tensors["weight"], tensors["bias"], tensors["h0"], None
        )
        assert output.requires_grad and final.requires_grad
        (output.sum() + final.sum()).backward()
        assert tensors[requires].grad is not None
    assert len(calls) == 3


@pytest.mark.parametrize("cell", list(GATES))
def test_a_walk_too_small_to_split_takes_linear_while_threads_wait(cell, monkeypatch):
    """On several threads a walk that runs as one part takes F.linear's projections (which the
    threads share); on one thread, or split over several, the projection is fused."""
    fused_calls = _run_counting(monkeypatch, "_projected_forward")
    scanned = _run_counting(monkeypatch, "scan_direction")  # of F.linear's projections
    x, weight, bias, h0 = _projection_inputs(cell, torch.float64, 9, 2, "time_major", seed=15)
    runs = []
    for concurrency, per_thread in ((2, 1 << 15), (1, 1 << 15), (2, 1)):
        monkeypatch.setattr(minimal_kernel.threads, "concurrency", lambda c=concurrency: c)
        monkeypatch.setattr(minimal_kernel, "_MIN_ELEMENTS_PER_THREAD", per_thread)
        with torch.no_grad():
            runs.append(minimal_kernel.project_and_scan(cell, x, weight, bias, h0, None))
    assert len(scanned) == 1 and len(fused_calls) == 2
    for run in runs[1:]:
        for a, b in zip(run, runs[0], strict=True):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
