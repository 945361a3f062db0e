"""Pieces every GPU cell kernel shares: Triton tile helpers and the Python-side plumbing.

The recurrent kernels loop over all time steps inside one launch. The grid is (batch tiles,
column programs): a program owns BLOCK_B batch rows and every `programs`-th tile of BLOCK_N
hidden units of them, and each step ends with a barrier over the programs of its batch tile (a
CTA barrier, then, when SPLIT, an arrival counter in global memory that the programs spin on;
the grid never exceeds the multiprocessor count, so all its programs are resident at once, as
a persistent kernel must). Splitting the hidden units over programs is what lets a small batch
use more than one multiprocessor. States that other threads or programs read back live in small
global buffers (L2-resident) and are read with the ".cg" cache modifier so that a stale L1 line
is never seen; the recurrent weight tiles are re-read every step from L1/L2. Triton's
interpreter runs programs one after another, so there the hidden units are never split.

Where a program's slice of W_hh (its BLOCK_N units of every gate, over all H inputs) fits on
chip, the cells use "slice" kernels instead (slice_plan): each program owns exactly one unit
tile, loads its weight slice once before the time loop, and keeps its own part of the carried
state (c, or the running dh in the backward) in registers, so a step reads only h (or the gate
gradients) of the other programs. A launch that runs out of on-chip memory is remembered and
falls back to the kernels above (launch_if_it_fits). The on-chip kernels (these and the RNN's
resident ones) also take recurrent dropout and zoneout (InLoop, keep_weight, zone_out), with the
equations of kernels/cpu/regularized.py; the split kernels do not.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.errors import OutOfResources

BLOCK_B = 16  # batch rows per program at least; tl.dot needs at least 16
MAX_BLOCK_B = 64
# Widest hidden tiles (output columns per gate, reduction width per dot), warps and pipeline
# stages per program: the fastest of the shapes benchmarks/bench_gpu_tiles.py swept on an H200
# (LSTM, batch 1 to 256, hidden 128 to 1024; results/gpu-tiles.json), within about 15% of the
# other shapes with 3 stages; one stage was 17-50% slower.
MAX_BLOCK_N = 32
MAX_BLOCK_K = 64
NUM_WARPS = 4
NUM_STAGES = 3
# RNNKIT_GPU_SPLIT=0 keeps each batch tile on one program (no cross-program barrier).
SPLIT_HIDDEN = os.environ.get("RNNKIT_GPU_SPLIT", "1") != "0"
# The on-chip kernels (the RNN's resident kernels; the LSTM's and GRU's slice forwards, see
# prefetch_slices) load each step's input tiles one step ahead; RNNKIT_GPU_PREFETCH=0 loads them
# at their step instead (session 9, not yet timed on a GPU: the switch is for an A/B run).
PREFETCH = os.environ.get("RNNKIT_GPU_PREFETCH", "1") != "0"
# The slice kernels: hidden units per program, and the widest (power-of-two padded) hidden size
# and the most weight-slice bytes per program they take. On an H200 (session 8 probe, float32)
# the LSTM forward with 32-unit slices took 3.6 us a step against the split kernel's 5.2 at
# B = 16, H = 128, and 4.5 against 5.6 at B = 1, H = 256; 16-unit slices at H = 512 were slower.
SLICE_BLOCK_N = 32
SLICE_MAX_HIDDEN = 256
SLICE_MAX_BYTES = 128 * 1024
# (device, dtype, kernel, tile) whose launch ran out of on-chip memory: they run split instead.
OUT_OF_RESOURCES: set[tuple] = set()
# The kernels take do_not_specialize=["T", "B"]: Triton would otherwise compile a new variant
# (seconds each) whenever a step count or batch size changes between 1, multiples of 16 and
# other values. H stays specialised: its alignment lets the compiler vectorise the loads.


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def tanh(x):
    # tl has no tanh that runs in the interpreter and on every backend. This form has an
    # absolute error at rounding level (relative error grows for |x| << 1, which the gate
    # math never divides by) and saturates to +-1 for large |x| without overflow.
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def load_acquire(pointer):
    """The int32 at pointer, read with ld.global.acquire.gpu: a plain load with acquire order."""
    return tl.inline_asm_elementwise(
        "ld.global.acquire.gpu.b32 $0, [$1];", "=r,l", [pointer], tl.int32, is_pure=False, pack=1
    )


@triton.jit
def sync_programs_atomic(counter_ptr, arrivals, programs, SPLIT: tl.constexpr):
    """Barrier over this program's threads and (SPLIT) the programs sharing counter_ptr.

    The counter only grows: `arrivals` is its value after the previous barrier; returns the
    value after this one. The programs poll the counter with atomic reads.
    """
    tl.debug_barrier()
    if SPLIT:
        tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
        while tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu") < arrivals + programs:
            pass
        tl.debug_barrier()
    return arrivals + programs


@triton.jit
def sync_programs_load(counter_ptr, arrivals, programs, SPLIT: tl.constexpr):
    """sync_programs_atomic polling with acquire loads, which the programs need not take turns
    at, as they do at atomic read-modify-writes of one address."""
    tl.debug_barrier()
    if SPLIT:
        tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
        while load_acquire(counter_ptr) < arrivals + programs:
            pass
        tl.debug_barrier()
    return arrivals + programs


def barrier_from_environment() -> str:
    """RNNKIT_GPU_BARRIER: "atomic" (the default, timed on an H200) or "load" (not yet timed:
    benchmarks/bench_gpu_barrier.py compares them)."""
    barrier = os.environ.get("RNNKIT_GPU_BARRIER", "atomic")
    if barrier not in ("atomic", "load"):
        raise ValueError(f"RNNKIT_GPU_BARRIER must be 'atomic' or 'load', got {barrier!r}")
    return barrier


# How the programs poll the barrier counter, read once at import.
sync_programs = sync_programs_load if barrier_from_environment() == "load" else sync_programs_atomic


@triton.jit
def slice_tiles(
    lengths_ptr,
    counter_ptr,
    B,
    H,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """A slice kernel program's tiles: its batch rows and their lengths, its batch tile's barrier
    counter and program count, its unit tile (cols), and every unit padded to BLOCK_H."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    lengths = tl.load(lengths_ptr + rows, mask=row_ok, other=0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    units = tl.arange(0, BLOCK_H)
    counter = counter_ptr + tl.program_id(0)
    programs = tl.num_programs(1)
    return rows, row_ok, lengths, counter, programs, cols, cols < H, units, units < H


@triton.jit
def weight_slice(w_hh_ptr, gate, cols, col_ok, units, unit_ok, H, TRANSPOSED: tl.constexpr):
    """(BLOCK_H, BLOCK_N) slice of one gate's (H, H) block of W_hh (G*H, H), zero in the padding:
    [k, n] = W_hh[gate * H + cols[n], k] when TRANSPOSED (the forward's h @ W^T), else
    W_hh[gate * H + k, cols[n]] (the backward's dpre @ W)."""
    if TRANSPOSED:
        offsets = (gate * H + cols[None, :]) * H + units[:, None]
    else:
        offsets = (gate * H + units[:, None]) * H + cols[None, :]
    return tl.load(w_hh_ptr + offsets, mask=col_ok[None, :] & unit_ok[:, None], other=0.0)


@triton.jit
def keep_weight(keep_ptr, step, rows, cols, mask, B, H, ZONEOUT: tl.constexpr):
    """Zoneout's weight k on the old state at processing step `step`, for a (rows, cols) tile:
    the (T, B, H) 0/1 mask in training (ZONEOUT == 1), the one probability there in eval (2)."""
    if ZONEOUT == 1:
        offsets = (step * B + rows)[:, None] * H + cols[None, :]
        return tl.load(keep_ptr + offsets, mask=mask, other=0.0)
    else:
        return tl.load(keep_ptr)


@triton.jit
def zone_out(old, new, keep_ptr, step, rows, cols, mask, B, H, ZONEOUT: tl.constexpr):
    """new + k (old - new): zoneout keeps the old state with weight k (keep_weight)."""
    return new + keep_weight(keep_ptr, step, rows, cols, mask, B, H, ZONEOUT) * (old - new)


@triton.jit
def step_tile(ptr, step, T, lengths, rows, cols, mask, B, width, REVERSE: tl.constexpr):
    """The (rows, cols) tile of a (T, B, width) tensor at processing step `step`; zero where
    `step` lies outside [0, T) (a prefetch past either end of the loop)."""
    offsets = (time_index(step, lengths, REVERSE) * B + rows)[:, None] * width + cols[None, :]
    steps = lengths * 0 + step
    inside = (steps >= 0) & (steps < T)
    return tl.load(ptr + offsets, mask=mask & inside[:, None], other=0.0)


@triton.jit
def time_index(step, lengths, REVERSE: tl.constexpr):
    """(BLOCK_B,) time position each row works on at processing step `step`."""
    if REVERSE:
        return tl.where(step < lengths, lengths - 1 - step, step)
    else:
        return step + lengths * 0


@triton.jit
def add_rows_times_weight_t(
    acc,
    a_ptr,
    a_row_offsets,
    row_ok,
    K,
    w_ptr,
    w_row_start,
    w_row_stride,
    cols,
    col_ok,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """acc + A[rows, :K] @ W[w_row_start + cols, :K]^T (A written in-kernel, read past L1)."""
    for k_start in range(0, K, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(
            a_ptr + a_row_offsets[:, None] + ks[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
            cache_modifier=".cg",
        )
        w = tl.load(
            w_ptr + (w_row_start + cols[None, :]) * w_row_stride + ks[:, None],
            mask=col_ok[None, :] & k_ok[:, None],
            other=0.0,
        )
        acc = tl.dot(a.to(w.dtype), w, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    return acc


@triton.jit
def add_rows_times_gate_weights_t(
    acc0,
    acc1,
    acc2,
    acc3,
    a_ptr,
    a_row_offsets,
    row_ok,
    K,
    w_ptr,
    gate_rows,
    cols,
    col_ok,
    GATES: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """acc_g + A[rows, :K] @ W[g * gate_rows + cols, :K]^T for the first GATES gates g.

    Each chunk of A (written in-kernel, read past L1) is loaded once for all the gates.
    """
    for k_start in range(0, K, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(
            a_ptr + a_row_offsets[:, None] + ks[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
            cache_modifier=".cg",
        )
        w_tile = w_ptr + cols[None, :] * K + ks[:, None]
        w_mask = col_ok[None, :] & k_ok[:, None]
        w = tl.load(w_tile, mask=w_mask, other=0.0)
        a = a.to(w.dtype)
        acc0 = tl.dot(a, w, acc0, input_precision=PRECISION, out_dtype=acc0.dtype)
        w = tl.load(w_tile + gate_rows * K, mask=w_mask, other=0.0)
        acc1 = tl.dot(a, w, acc1, input_precision=PRECISION, out_dtype=acc1.dtype)
        if GATES > 2:
            w = tl.load(w_tile + 2 * gate_rows * K, mask=w_mask, other=0.0)
            acc2 = tl.dot(a, w, acc2, input_precision=PRECISION, out_dtype=acc2.dtype)
        if GATES > 3:
            w = tl.load(w_tile + 3 * gate_rows * K, mask=w_mask, other=0.0)
            acc3 = tl.dot(a, w, acc3, input_precision=PRECISION, out_dtype=acc3.dtype)
    return acc0, acc1, acc2, acc3


@triton.jit
def add_rows_times_weight(
    acc,
    a_ptr,
    a_row_offsets,
    row_ok,
    K,
    w_ptr,
    w_row_start,
    w_row_stride,
    cols,
    col_ok,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """acc + A[rows, :K] @ W[w_row_start : w_row_start + K, cols] (A read past L1)."""
    for k_start in range(0, K, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(
            a_ptr + a_row_offsets[:, None] + ks[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
            cache_modifier=".cg",
        )
        w = tl.load(
            w_ptr + (w_row_start + ks[:, None]) * w_row_stride + cols[None, :],
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(a.to(w.dtype), w, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    return acc


def block_size(size: int, limit: int) -> int:
    """Tile width for a hidden dimension: a power of two in [16, limit]."""
    return max(16, min(limit, triton.next_power_of_2(size)))


@functools.cache
def multiprocessors(device_index: int) -> int:
    """The multiprocessor count of a CUDA device."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def tile_plan(batch: int, hidden: int, slots: int | None) -> tuple[tuple[int, int], dict]:
    """Grid (batch tiles, programs per tile) and tile options; `slots`: multiprocessors, or None
    where programs run one after another (the interpreter) and must not be split.

    The batch tile grows (up to MAX_BLOCK_B rows) while the batch tiles times the hidden-unit
    tiles exceed the slots, then the unit tiles are spread over as many programs per batch tile
    as the slots hold, one program each.
    """
    block_n = block_size(hidden, MAX_BLOCK_N)
    unit_tiles = triton.cdiv(hidden, block_n)
    block_b, programs = BLOCK_B, 1
    if slots is not None and SPLIT_HIDDEN:
        while block_b < MAX_BLOCK_B and triton.cdiv(batch, block_b) * unit_tiles > slots:
            block_b *= 2
        batch_tiles = triton.cdiv(batch, block_b)
        if 2 * batch_tiles <= slots:
            programs = min(unit_tiles, slots // batch_tiles)
        else:
            block_b = BLOCK_B
    options = {
        "BLOCK_B": block_b,
        "BLOCK_N": block_n,
        "BLOCK_K": block_size(hidden, MAX_BLOCK_K),
        "SPLIT": programs > 1,
        "num_warps": NUM_WARPS,
        "num_stages": NUM_STAGES,
    }
    return (triton.cdiv(batch, block_b), programs), options


def plan_launch(batch: int, hidden: int, device: torch.device) -> tuple[tuple, dict, Tensor]:
    """tile_plan for this device, with the zeroed barrier counter (one per batch tile)."""
    slots = None
    if device.type == "cuda":
        slots = multiprocessors(device.index if device.index is not None else 0)
    grid, options = tile_plan(batch, hidden, slots)
    counter = torch.zeros(grid[0], device=device, dtype=torch.int32)
    return grid, options, counter


def slice_tiling(kernel, batch: int, hidden: int, gates: int, x: Tensor) -> tuple | None:
    """Grid and options for a slice kernel, or None where it does not apply.

    On CUDA each program owns SLICE_BLOCK_N units, so the unit tiles times the batch tiles must fit
    in the multiprocessors; under the interpreter one program owns every unit (no barrier).
    """
    block_h = block_size(hidden, 1 << 30)
    if block_h > SLICE_MAX_HIDDEN:
        return None
    if x.device.type == "cuda":
        slots = multiprocessors(x.device.index if x.device.index is not None else 0)
        block_n = min(SLICE_BLOCK_N, block_h)
        units = triton.cdiv(hidden, block_n)
        if units > 1 and not SPLIT_HIDDEN:
            return None
        block_b = BLOCK_B
        while block_b < MAX_BLOCK_B and triton.cdiv(batch, block_b) * units > slots:
            block_b *= 2
        if triton.cdiv(batch, block_b) * units > slots:
            return None
    else:
        block_n, units, block_b = block_h, 1, BLOCK_B
    if gates * block_h * block_n * x.element_size() > SLICE_MAX_BYTES:
        return None
    if (x.device, x.dtype, kernel_name(kernel), block_h, block_n) in OUT_OF_RESOURCES:
        return None
    options = {
        "BLOCK_B": block_b,
        "BLOCK_N": block_n,
        "BLOCK_H": block_h,
        "SPLIT": units > 1,
        "num_warps": NUM_WARPS,
    }
    return (triton.cdiv(batch, block_b), units), options


def prefetch_slices(options: dict) -> bool:
    """Whether a slice forward loads its input tiles a step ahead (PREFETCH): not at the widest
    slices, where the extra tiles spill registers (sm_90, cuobjdump: the GRU's at BLOCK_H = 256
    goes from 255 registers and no stack to 40 bytes of stack; at 128 neither spills)."""
    return PREFETCH and options["BLOCK_H"] <= 128


def slice_plan(
    kernel, batch: int, hidden: int, gates: int, x: Tensor
) -> tuple[tuple, dict, Tensor] | None:
    """slice_tiling's grid and options with the zeroed barrier counter, or None."""
    tiling = slice_tiling(kernel, batch, hidden, gates, x)
    if tiling is None:
        return None
    grid, options = tiling
    return grid, options, torch.zeros(grid[0], device=x.device, dtype=torch.int32)


def kernel_name(kernel) -> str:
    """A Triton kernel's function name (the JIT wrapper's, or a stand-in's own)."""
    function = getattr(kernel, "fn", kernel)
    return getattr(function, "__name__", type(kernel).__name__)


def launch_if_it_fits(kernel, grid, options: dict, x: Tensor, *args, **constants) -> bool:
    """Launch kernel[grid]; False, remembered for x's device and dtype, if it ran out of on-chip
    memory (shared memory or registers), so that the caller runs another kernel instead."""
    try:
        kernel[grid](*args, **constants, **options)
    except OutOfResources:
        tile = (options["BLOCK_H"], options.get("BLOCK_N", options["BLOCK_H"]))
        OUT_OF_RESOURCES.add((x.device, x.dtype, kernel_name(kernel), *tile))
        return False
    return True


class InLoop(NamedTuple):
    """One direction's in-loop regularisers (rnnkit.variants.regularization.draw_masks): the
    (B, H) recurrent dropout mask or None, and each state part's zoneout: a (T, B, H) 0/1 mask
    in training, its probability in eval, None when off."""

    mask: Tensor | None
    keep_h: Tensor | float | None
    keep_c: Tensor | float | None = None


def in_loop_arguments(in_loop: InLoop | None, like: Tensor) -> tuple[tuple, dict]:
    """The kernels' regulariser arguments (mask, keep_h, keep_c) and constants (DROPOUT, ZONEOUT,
    ZONEOUT_C: 0 off, 1 a (T, B, H) mask, 2 one probability), in like's dtype and device; a
    one-element stand-in where unused."""
    nothing = empty_like_nothing(like.device, like.dtype)
    if in_loop is None:
        in_loop = InLoop(None, None, None)
    mask = nothing if in_loop.mask is None else in_loop.mask.to(like).contiguous()
    tensors, modes = [], []
    for keep in (in_loop.keep_h, in_loop.keep_c):
        if keep is None:
            tensors.append(nothing)
            modes.append(0)
        elif isinstance(keep, float):
            tensors.append(torch.full((1,), keep, device=like.device, dtype=like.dtype))
            modes.append(2)
        else:
            tensors.append(keep.to(like).contiguous())
            modes.append(1)
    constants = {"DROPOUT": in_loop.mask is not None, "ZONEOUT": modes[0], "ZONEOUT_C": modes[1]}
    return (mask, *tensors), constants


def regularizers_do_not_fit(hidden: int, x: Tensor) -> str:
    """The reason in-loop regularisers cannot run on the gpu kernels for this layer."""
    return (
        f"recurrent dropout and zoneout run in the gpu kernels that hold the recurrent weights on "
        f"chip, which hidden_size={hidden} in {x.dtype} does not fit on {x.device}"
    )


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float32/bfloat16/float16 accumulate in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_precision(x: Tensor) -> str:
    """TF32 for float32 CUDA input when cudnn.allow_tf32 (as torch.nn's cuDNN RNNs), else exact."""
    if x.dtype == torch.float32 and x.is_cuda and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def device_lengths(lengths: Tensor | None, steps: int, batch: int, device) -> Tensor:
    """(B,) int32 lengths on the kernel's device; all `steps` when lengths is None (one shared
    tensor per shape and device: the kernels only read it)."""
    if lengths is None:
        return _full_lengths(steps, batch, torch.device(device))
    return lengths.to(device=device, dtype=torch.int32)


@functools.lru_cache(maxsize=64)
def _full_lengths(steps: int, batch: int, device: torch.device) -> Tensor:
    # Shared by later calls that may save it for the backward: never an inference tensor.
    with torch.inference_mode(False):
        return torch.full((batch,), steps, dtype=torch.int32, device=device)


def previous_states(sequence: Tensor, initial: Tensor, lengths: Tensor | None, reverse: bool):
    """(T, B, K) per-step states, (B, K) initial -> (T, B, K): the state each step started from.

    Only positions of valid steps are meaningful (the others get zero weight-gradient rows).
    """
    if not reverse:
        return torch.cat([initial.unsqueeze(0), sequence[:-1]])
    shifted = torch.cat([sequence[1:], initial.unsqueeze(0)])
    if lengths is None:
        return shifted
    steps = sequence.size(0)
    time = torch.arange(steps, device=sequence.device).unsqueeze(1)
    first = time == (lengths.to(sequence.device) - 1).unsqueeze(0)
    return torch.where(first.unsqueeze(-1), initial.unsqueeze(0), shifted)


def flat(tensor: Tensor) -> Tensor:
    """(T, B, K) -> (T * B, K)."""
    return tensor.reshape(-1, tensor.size(-1))


@functools.cache
def empty_like_nothing(device, dtype) -> Tensor:
    """A one-element placeholder for buffers a kernel variant does not touch: made once per
    device and dtype and shared, since no kernel reads or writes it (saves an allocation per
    placeholder per call). Never an inference tensor, so that a later call may save it."""
    with torch.inference_mode(False):
        return torch.empty(1, device=device, dtype=dtype)
