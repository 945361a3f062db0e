"""float32 products with a weight packed once per sequence, by an AVX-512 register-tile kernel.

The recurrent kernels multiply a few rows (the batch) by the same weight at every step. MKL takes
its AVX2 path on AMD CPUs and reached 65-85 GFLOP/s per core on those shapes here (B = 16-64,
K = 128-512, N = 4K), where this kernel reaches 105-115 (benchmarks/RESULTS.md). The weight is
packed into panels of PANEL columns, each column-block contiguous along K:

    packed[(p * K + k) * PANEL + j] = B[k, p * PANEL + j]     (zero past N)

and a tile of up to TILE_ROWS rows by PANEL columns of C is held in 2 * TILE_ROWS vector
registers while k runs: per k, two vector loads of the panel, one broadcast per row, and
2 * TILE_ROWS fused multiply-adds. The tile is written as LLVM IR (16-lane float vectors,
llvm.fma) through a numba intrinsic; numba compiles it for the host CPU, so it is used only where
the host has AVX-512 (AVAILABLE); elsewhere the kernels keep BLAS.
"""

from __future__ import annotations

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

LANES = 16
PANEL_VECTORS = 2
PANEL = LANES * PANEL_VECTORS
TILE_ROWS = 6
# K is split in blocks so that a block of a panel (K_BLOCK * PANEL floats, 32 KiB) stays in L1
# while every row tile reads it.
K_BLOCK = 256
AVAILABLE = bool(llvm.get_host_cpu_features().get("avx512f", False))


def _tile_kernel(rows: int, group: int = 1, k_split: int = 1):
    """A numba intrinsic: C[rows, group * PANEL] (+)= A[rows, depth] @ the next `group` panels
    [depth, PANEL] side by side, panel q starting p_stride elements after panel q - 1; each array
    is addressed as flat from its first element (element (r, j) at r * leading + j), plus the
    given start offsets. k_split > 1 keeps that many partial sums per accumulator (steps k with
    the same k % k_split share one), added together at the end."""
    vectors = PANEL_VECTORS * group

    @intrinsic
    def tile(
        typingctx, a, a_start, lda, packed, p_start, p_stride, depth, c, c_start, ldc, accumulate
    ):
        arrays = (a, packed, c)
        if not all(isinstance(t, types.Array) and t.dtype == types.float32 for t in arrays):
            return None
        signature = types.void(
            a, types.int64, types.int64, packed, types.int64, types.int64, types.int64, c,
            types.int64, types.int64, types.boolean,
        )  # fmt: skip

        def codegen(context, builder, signature, args):
            (a_value, a_off, lda_value, p_value, p_off, p_step, k_count, c_value, c_off,
             ldc_value, acc) = args  # fmt: skip
            a_data = context.make_array(signature.args[0])(context, builder, a_value).data
            p_data = context.make_array(signature.args[3])(context, builder, p_value).data
            c_data = context.make_array(signature.args[7])(context, builder, c_value).data
            vector = ir.VectorType(ir.FloatType(), LANES)
            vector_pointer = vector.as_pointer()
            int64 = ir.IntType(64)
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vector, [vector] * 3), f"llvm.fma.v{LANES}f32"
            )
            # Accumulators live in stack slots that LLVM promotes to registers; partial[s] holds
            # the sums over the steps k with k % k_split == s.
            partial = [
                [
                    [cgutils.alloca_once(builder, vector) for _ in range(vectors)]
                    for _ in range(rows)
                ]
                for _ in range(k_split)
            ]
            slots = partial[0]
            c_base = builder.gep(c_data, [c_off])

            def c_vector(row, part):
                row_start = builder.gep(c_base, [builder.mul(ldc_value, ir.Constant(int64, row))])
                element = builder.gep(row_start, [ir.Constant(int64, part * LANES)])
                return builder.bitcast(element, vector_pointer)

            with builder.if_else(acc) as (then, otherwise):
                with then:
                    for row in range(rows):
                        for part in range(vectors):
                            value = builder.load(c_vector(row, part), align=4)
                            builder.store(value, slots[row][part])
                with otherwise:
                    for row in range(rows):
                        for part in range(vectors):
                            builder.store(ir.Constant(vector, None), slots[row][part])
            for sums in partial[1:]:
                for row in range(rows):
                    for part in range(vectors):
                        builder.store(ir.Constant(vector, None), sums[row][part])
            a_base = builder.gep(a_data, [a_off])
            a_rows = [
                builder.gep(a_base, [builder.mul(lda_value, ir.Constant(int64, row))])
                for row in range(rows)
            ]
            p_bases = [
                builder.gep(
                    p_data, [builder.add(p_off, builder.mul(p_step, ir.Constant(int64, q)))]
                )
                for q in range(group)
            ]
            undefined = ir.Constant(vector, ir.Undefined)
            broadcast = ir.Constant(ir.VectorType(ir.IntType(32), LANES), None)

            def step(k, sums):
                """sums += A[:, k] (broadcast) * the panels' row k."""
                offset = builder.mul(k, ir.Constant(int64, PANEL))
                panel = []
                for part in range(vectors):
                    p_row = builder.gep(p_bases[part // PANEL_VECTORS], [offset])
                    lanes = ir.Constant(int64, (part % PANEL_VECTORS) * LANES)
                    element = builder.gep(p_row, [lanes])
                    panel.append(builder.load(builder.bitcast(element, vector_pointer), align=4))
                for row in range(rows):
                    scalar = builder.load(builder.gep(a_rows[row], [k]))
                    first = builder.insert_element(
                        undefined, scalar, ir.Constant(ir.IntType(32), 0)
                    )
                    splat = builder.shuffle_vector(first, undefined, broadcast)
                    for part in range(vectors):
                        total = builder.load(sums[row][part])
                        total = builder.call(fma, [splat, panel[part], total])
                        builder.store(total, sums[row][part])

            split = ir.Constant(int64, k_split)
            rounds = builder.sdiv(k_count, split) if k_split > 1 else k_count
            with cgutils.for_range(builder, rounds) as loop:
                base = builder.mul(loop.index, split) if k_split > 1 else loop.index
                for index, sums in enumerate(partial):
                    step(builder.add(base, ir.Constant(int64, index)), sums)
            if k_split > 1:
                done = builder.mul(rounds, split)
                with cgutils.for_range(builder, builder.sub(k_count, done)) as loop:
                    step(builder.add(done, loop.index), slots)
            for row in range(rows):
                for part in range(vectors):
                    total = builder.load(slots[row][part])
                    for sums in partial[1:]:
                        total = builder.fadd(total, builder.load(sums[row][part]))
                    builder.store(total, c_vector(row, part), align=4)
            return context.get_dummy_value()

        return signature, codegen

    return tile


_tile_1, _tile_2, _tile_3, _tile_4, _tile_5, _tile_6 = (
    _tile_kernel(rows) for rows in range(1, TILE_ROWS + 1)
)
# One row has only two accumulators per panel, and each fused multiply-add waits for the last
# (latency-bound): a single row runs four panels at once, eight independent accumulators, and
# the one to three panels left over (all of them where N <= 96) keep eight or more by splitting
# K into partial sums (1 x 64 x 64: 203 -> 127 ns, with no scratch allocated per call).
ROW_GROUP = 4
_tile_row_group = _tile_kernel(1, ROW_GROUP)
_tile_row_1, _tile_row_2, _tile_row_3 = (
    _tile_kernel(1, group, k_split) for group, k_split in ((1, 4), (2, 2), (3, 2))
)

_jit = njit(cache=True, nogil=True, error_model="numpy")
# Inlined where called, with blas.gemm_weight: a per-step product called as separately compiled
# functions cost more than the product itself at batch 1 (1 x 64 x 64, one row, Xeon, 2026-11-29:
# 0.09 us inlined against 0.14 as one call in one run, 0.20 as one call against 0.56 through
# gemm_weight's two calls in another).
_inline = njit(cache=True, nogil=True, error_model="numpy", inline="always")


@_jit
def packed_size(b, trans_b):
    """Elements of pack's array for weight b (K, N), or b (N, K) read transposed."""
    k = b.shape[1] if trans_b else b.shape[0]
    n = b.shape[0] if trans_b else b.shape[1]
    return (n + PANEL - 1) // PANEL * k * PANEL


@_jit
def pack(b, trans_b):
    """Weight b (K, N), or b (N, K) read transposed, -> flat panels (see the module)."""
    return pack_into(b, trans_b, np.empty(0, b.dtype))


@_jit
def pack_into(b, trans_b, space):
    """pack, written into the front of `space` where it fits, else into a new array."""
    k = b.shape[1] if trans_b else b.shape[0]
    n = b.shape[0] if trans_b else b.shape[1]
    count = packed_size(b, trans_b)
    packed = space[:count] if space.size >= count else np.empty(count, b.dtype)
    for p in range((n + PANEL - 1) // PANEL):
        width = min(PANEL, n - p * PANEL)
        for inner in range(k):
            start = (p * k + inner) * PANEL
            for j in range(width):
                column = p * PANEL + j
                packed[start + j] = b[column, inner] if trans_b else b[inner, column]
            for j in range(width, PANEL):  # zero past N
                packed[start + j] = 0
    return packed


@_jit
def _tile(rows, a, a_start, lda, packed, p_start, p_stride, depth, c, c_start, ldc, accumulate):
    if rows == 6:
        _tile_6(a, a_start, lda, packed, p_start, p_stride, depth, c, c_start, ldc, accumulate)
    elif rows == 5:
        _tile_5(a, a_start, lda, packed, p_start, p_stride, depth, c, c_start, ldc, accumulate)
    elif rows == 4:
        _tile_4(a, a_start, lda, packed, p_start, p_stride, depth, c, c_start, ldc, accumulate)
    elif rows == 3:
        _tile_3(a, a_start, lda, packed, p_start, p_stride, depth, c, c_start, ldc, accumulate)
    elif rows == 2:
        _tile_2(a, a_start, lda, packed, p_start, p_stride, depth, c, c_start, ldc, accumulate)
    elif rows == 1:
        _tile_1(a, a_start, lda, packed, p_start, p_stride, depth, c, c_start, ldc, accumulate)


# The product is compiled once as a C-callable function and called through its address, with
# its body in that function: numba links every jitted callee into each caller and optimises and
# compiles the whole again, so the tile kernels, linked into each kernel that multiplies, were
# compiled again at every level of calls.
_PRODUCT_SIGNATURE = types.void(
    types.int64, types.int64, types.int64, types.voidptr, types.int64, types.voidptr,
    types.voidptr, types.int64, types.int64,
)  # fmt: skip


def _product_entry(m, k, n, a_pointer, lda, packed_pointer, c_pointer, ldc, accumulate):
    """`product` on pointers: element (r, j) of a and c at r * lda + j and r * ldc + j;
    m, k, n at least 1."""
    panel_count = (n + PANEL - 1) // PANEL
    a = carray(a_pointer, (m - 1) * lda + k, np.float32)
    packed = carray(packed_pointer, panel_count * k * PANEL, np.float32)
    c = carray(c_pointer, (m - 1) * ldc + n, np.float32)
    full_panels = n // PANEL
    width = n - full_panels * PANEL
    start_of_scratch = m - m
    scratch_stride = m - m + PANEL
    for k_start in range(0, k, K_BLOCK):
        depth = min(K_BLOCK, k - k_start)
        add = accumulate != 0 or k_start > 0
        grouped = 0
        if m == 1:
            grouped = full_panels - full_panels % ROW_GROUP
            for p in range(0, grouped, ROW_GROUP):
                _tile_row_group(
                    a, k_start, lda, packed, (p * k + k_start) * PANEL, k * PANEL, depth,
                    c, p * PANEL, ldc, add,
                )  # fmt: skip
            rest = full_panels - grouped
            p_start = (grouped * k + k_start) * PANEL
            if rest == 1:
                _tile_row_1(
                    a, k_start, lda, packed, p_start, k * PANEL, depth, c, grouped * PANEL, ldc,
                    add,
                )  # fmt: skip
            elif rest == 2:
                _tile_row_2(
                    a, k_start, lda, packed, p_start, k * PANEL, depth, c, grouped * PANEL, ldc,
                    add,
                )  # fmt: skip
            elif rest == 3:
                _tile_row_3(
                    a, k_start, lda, packed, p_start, k * PANEL, depth, c, grouped * PANEL, ldc,
                    add,
                )  # fmt: skip
            grouped = full_panels
        for p in range(grouped, full_panels):
            p_start = (p * k + k_start) * PANEL
            for row in range(0, m, TILE_ROWS):
                rows = min(TILE_ROWS, m - row)
                _tile(
                    rows, a, row * lda + k_start, lda, packed, p_start, k * PANEL, depth,
                    c, row * ldc + p * PANEL, ldc, add,
                )  # fmt: skip
        if width > 0:
            # The last, partial panel goes through a full-width scratch tile.
            p_start = (full_panels * k + k_start) * PANEL
            column = full_panels * PANEL
            # Allocated only here: an allocation per call costs a one-row product a tenth.
            scratch = np.zeros(TILE_ROWS * PANEL, np.float32)
            for row in range(0, m, TILE_ROWS):
                rows = min(TILE_ROWS, m - row)
                for i in range(rows):
                    for j in range(width):
                        value = c[(row + i) * ldc + column + j] if add else np.float32(0)
                        scratch[i * PANEL + j] = value
                # Runtime values, not the constants 0, PANEL, True: literal arguments would
                # compile a second copy of every tile kernel.
                _tile(
                    rows, a, row * lda + k_start, lda, packed, p_start, k * PANEL, depth,
                    scratch, start_of_scratch, scratch_stride, depth > 0,
                )  # fmt: skip
                for i in range(rows):
                    for j in range(width):
                        c[(row + i) * ldc + column + j] = scratch[i * PANEL + j]


llvm.add_symbol(
    "rnnkit_panel_product", cfunc(_PRODUCT_SIGNATURE, cache=True)(_product_entry).address
)
_external_product = types.ExternalFunction("rnnkit_panel_product", _PRODUCT_SIGNATURE)


@_inline
def product(a, packed, c, accumulate):
    """c (M, N) = a (M, K) @ B, or c += it, B packed by `pack`; float32, rows of a and c
    contiguous (row views of larger arrays are fine)."""
    m, k = a.shape
    n = c.shape[1]
    if m == 0 or n == 0:
        return
    if k == 0:
        if not accumulate:
            for row in range(m):
                for j in range(n):
                    c[row, j] = 0
        return
    _external_product(
        m, k, n, a.ctypes, a.strides[0] // 4, packed.ctypes, c.ctypes, c.strides[0] // 4,
        1 if accumulate else 0,
    )  # fmt: skip


def product_float32(a, packed, c, accumulate):
    """`product` where the arrays are float32; compiles to nothing for other dtypes, so that
    kernels compiled for float64 can call it on a branch they never take."""


@overload(product_float32, inline="always")
def _product_float32(a, packed, c, accumulate):
    if all(isinstance(t, types.Array) and t.dtype == types.float32 for t in (a, packed, c)):
        return lambda a, packed, c, accumulate: product(a, packed, c, accumulate)
    return lambda a, packed, c, accumulate: None
