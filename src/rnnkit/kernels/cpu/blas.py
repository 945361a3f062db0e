"""Matrix products for the compiled kernels: BLAS gemm called from numba, on row-major arrays.

torch's x86 wheels carry MKL, the BLAS behind torch.mm, whose threads are torch's own OpenMP
pool: calling it keeps every kernel on the threads torch already uses. numpy's wheels carry
OpenBLAS, whose own spinning thread pool took the cores from torch's threads (4-30x slowdowns of
small torch ops measured on 2 cores), so it is only the fallback. Both export the Fortran ILP64
gemm; it is registered under one symbol name, so that numba's disk-cached code links to whichever
library this process found. Where neither is present (or with RNNKIT_CPU_BLAS=loops), the symbols
point at compiled loops with the same Fortran signature: slower, but every kernel still runs.

RNNKIT_CPU_BLAS=mkl (default) | openblas | loops picks the first library tried.

Also the array copies the kernels share (copy_vector, copy_matrix), written to compile fast.
"""

from __future__ import annotations

import ctypes
import os
import platform

import llvmlite.binding as llvm
import numpy as np
import torch
from numba import carray, cfunc, njit, types
from numba.extending import intrinsic, overload

from rnnkit.kernels.cpu import panels

_MKL_SYMBOLS = {
    "sgemm": "SGEMM_64",
    "dgemm": "DGEMM_64",
    "sgemm_pack_size": "SGEMM_PACK_GET_SIZE_64",
    "sgemm_pack": "SGEMM_PACK_64",
    "sgemm_compute": "SGEMM_COMPUTE_64",
}
_OPENBLAS_SYMBOLS = {"sgemm": "scipy_sgemm_64_", "dgemm": "scipy_dgemm_64_"}
CHOICES = ("mkl", "openblas", "loops")
TORCH_LIBRARY = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")


def _symbol_addresses(path: str, symbols: dict[str, str]) -> dict[str, int] | None:
    if not os.path.exists(path):
        return None
    library = ctypes.CDLL(path)
    if not all(hasattr(library, name) for name in symbols.values()):
        return None
    return {
        key: ctypes.cast(getattr(library, name), ctypes.c_void_p).value
        for key, name in symbols.items()
    }


def _gemm_loops(dtype):
    """A Fortran-convention gemm (column-major, by-reference arguments, no packing) as a C
    callback: the fallback where no BLAS library is found."""
    pointer = types.CPointer(dtype)
    integer = types.CPointer(types.int64)
    signature = types.void(
        types.voidptr, types.voidptr, integer, integer, integer, pointer, pointer, integer,
        pointer, integer, pointer, pointer, integer,
    )  # fmt: skip

    def gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        transposed_a = carray(trans_a, 1, np.uint8)[0] == 84  # 'T'
        transposed_b = carray(trans_b, 1, np.uint8)[0] == 84
        rows, cols, inner = m[0], n[0], k[0]
        a_cols = rows if transposed_a else inner
        b_cols = inner if transposed_b else cols
        a_array = carray(a, (a_cols, lda[0]))
        b_array = carray(b, (b_cols, ldb[0]))
        c_array = carray(c, (cols, ldc[0]))
        for j in range(cols):
            for i in range(rows):
                total = dtype(0)
                for p in range(inner):
                    left = a_array[i, p] if transposed_a else a_array[p, i]
                    right = b_array[p, j] if transposed_b else b_array[j, p]
                    total += left * right
                previous = c_array[j, i] * beta[0] if beta[0] != 0 else dtype(0)
                c_array[j, i] = alpha[0] * total + previous

    return cfunc(signature, cache=True)(gemm).address


def _find_blas(preferred: str) -> tuple[str, dict[str, int]]:
    """(library name, {function: address}); preferred is one of CHOICES, the others follow."""
    if preferred not in CHOICES:
        raise ValueError(f"RNNKIT_CPU_BLAS must be one of {CHOICES}, got {preferred!r}")
    numpy_libs = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
    openblas = [
        os.path.join(numpy_libs, name)
        for name in (sorted(os.listdir(numpy_libs)) if os.path.isdir(numpy_libs) else [])
        if "openblas" in name
    ]
    candidates = {
        "mkl": [("MKL (torch)", TORCH_LIBRARY, _MKL_SYMBOLS)],
        "openblas": [("OpenBLAS (numpy)", path, _OPENBLAS_SYMBOLS) for path in openblas],
    }
    order = [preferred] + [choice for choice in ("mkl", "openblas") if choice != preferred]
    for choice in order:
        for label, path, symbols in candidates.get(choice, []):
            found = _symbol_addresses(path, symbols)
            if found is not None:
                return label, found
        if choice == "loops":
            break
    loops = {"sgemm": _gemm_loops(types.float32), "dgemm": _gemm_loops(types.float64)}
    return "compiled loops", loops


def _cpu_vendor() -> str:
    """The CPU's vendor string (GenuineIntel, AuthenticAMD, ...), or '' where unknown."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    processor = platform.processor()  # Windows: "Intel64 Family 6 ..., GenuineIntel"
    return processor.rsplit(",", 1)[-1].strip() if "," in processor else ""


LIBRARY, _addresses = _find_blas(os.environ.get("RNNKIT_CPU_BLAS", "mkl").strip().lower())
# Where the CPU has AVX-512, float32 weights are packed into panels for rnnkit's own product
# (panels.py); elsewhere MKL packs a weight once for all of a sequence's products with it (10-30%
# faster per step). Read at compile time: numba's disk cache is keyed by the CPU's features.
PANELS = panels.AVAILABLE
PACKED_GEMM = PANELS or "sgemm_pack" in _addresses
for _name in _MKL_SYMBOLS:
    # Without MKL the packing symbols point at sgemm; PACKED_GEMM=False keeps them uncalled.
    llvm.add_symbol(f"rnnkit_{_name}64", _addresses.get(_name, _addresses["sgemm"]))

# On Intel CPUs MKL takes its AVX-512 path, and its packed product beats the panels on products
# of MKL_PACK_MIN_ROWS rows or more with a weight of MKL_PACK_MIN_WEIGHT elements or more (Xeon,
# 2 cores, 2026-11-29, one thread: 8-32 rows, weights 256 x 256 to 512 x 2048: 0.70-0.97x the
# panels' time, 0.74-0.79x at 8 rows from 512 x 512 on; weights of 128 x 128 and less: 0.85-1.24x,
# the panels mostly faster; below 8 rows the panels are as fast or faster). On AMD CPUs MKL takes
# its AVX2 path, and the panels win at every size. Whether MKL is the library is a fact of this
# process, not of the CPU, so compiled code reads it through a symbol resolved per process (as
# the BLAS entry points above), not a global frozen into numba's disk cache.
# RNNKIT_CPU_PACKED_FORM=panels | mkl overrides the choice (the tests run the kernels with both).
PACKED_FORMS = ("auto", "panels", "mkl")


def _choose_mkl_packs_wide(requested: str) -> bool:
    """Whether large enough products take MKL's packed form here, not the panels."""
    if requested not in PACKED_FORMS:
        raise ValueError(f"RNNKIT_CPU_PACKED_FORM must be one of {PACKED_FORMS}, got {requested!r}")
    has_mkl = LIBRARY.startswith("MKL")
    if requested == "mkl" and not has_mkl:
        raise ValueError(f"RNNKIT_CPU_PACKED_FORM=mkl needs MKL; the BLAS found is {LIBRARY}")
    if requested == "auto":
        return PANELS and has_mkl and _cpu_vendor() == "GenuineIntel"
    return PANELS and requested == "mkl"


MKL_PACKS_WIDE = _choose_mkl_packs_wide(
    os.environ.get("RNNKIT_CPU_PACKED_FORM", "auto").strip().lower()
)
MKL_PACK_MIN_ROWS = 8
MKL_PACK_MIN_WEIGHT = 1 << 15


def threaded_packed_product(rows: int, weight_elements: int, dtype: torch.dtype) -> bool:
    """Whether per-step products of `rows` rows by a packed weight of that many elements take
    MKL's packed form here, which runs on MKL's threads (rnnkit's panels run on one)."""
    return (
        MKL_PACKS_WIDE
        and dtype == torch.float32
        and rows >= MKL_PACK_MIN_ROWS
        and weight_elements >= MKL_PACK_MIN_WEIGHT
    )


def _one() -> int:
    return 1


def _zero() -> int:
    return 0


_FLAG_SIGNATURE = types.int64()
_flag = cfunc(_FLAG_SIGNATURE, cache=True)(_one if MKL_PACKS_WIDE else _zero)
llvm.add_symbol("rnnkit_mkl_packs_wide", _flag.address)
_mkl_packs_wide_here = types.ExternalFunction("rnnkit_mkl_packs_wide", _FLAG_SIGNATURE)

_P = types.voidptr
_sgemm = types.ExternalFunction("rnnkit_sgemm64", types.void(*([_P] * 13)))
_dgemm = types.ExternalFunction("rnnkit_dgemm64", types.void(*([_P] * 13)))
_sgemm_pack_size = types.ExternalFunction("rnnkit_sgemm_pack_size64", types.int64(*([_P] * 4)))
_sgemm_pack = types.ExternalFunction("rnnkit_sgemm_pack64", types.void(*([_P] * 9)))
_sgemm_compute = types.ExternalFunction("rnnkit_sgemm_compute64", types.void(*([_P] * 12)))

# Below this many multiply-adds a BLAS call's fixed cost exceeds plain compiled loops (measured
# at batch 1: (1, 64) x (64, 4 * 64) products).
SMALL_GEMM = 1 << 15
# Packed weights measured no faster than gemm with the transpose flag for weights up to 1 MiB on
# this project's AMD machine (MKL takes its AVX2 path there), and up to 25% slower at 4 MiB (past
# the 2 MiB L2): weights larger than this are not packed.
PACK_MAX_BYTES = 1 << 19

_set_local_threads = None
if LIBRARY.startswith("MKL"):
    _set_local_threads = ctypes.CDLL(TORCH_LIBRARY).MKL_Set_Num_Threads_Local
    _set_local_threads.argtypes = [ctypes.c_int]
    _set_local_threads.restype = ctypes.c_int


def set_local_threads(count: int) -> int | None:
    """MKL threads for products called from this thread (0: back to the global setting); the
    previous value, or None where the library has no such control."""
    if _set_local_threads is None:
        return None
    return _set_local_threads(count)


_jit = njit(cache=True, nogil=True, error_model="numpy")
# Inlined into each caller instead of compiled per call: numba compiles a jitted callee once per
# argument types, and a constant True/False argument has its own literal type, so each flag
# combination compiled the whole product again (about 1 s each on a cold cache).
_inline = njit(cache=True, nogil=True, error_model="numpy", inline="always")


@intrinsic
def _runtime(typingctx, flag):
    """flag typed as a plain bool rather than a literal True/False (see _inline)."""

    def codegen(context, builder, signature, args):
        return context.cast(builder, args[0], signature.args[0], signature.return_type)

    return types.boolean(flag), codegen


def one_like(array):
    """1 in the array's dtype (numba-only, see the overload): a plain 1 would promote float32
    arithmetic to float64, and np.ones(1, dtype)[0] allocates at each call."""
    raise NotImplementedError("one_like is only callable from numba-compiled code")


@overload(one_like, inline="always")
def _one_like(array):
    if array.dtype == types.float32:
        return lambda array: np.float32(1.0)
    return lambda array: np.float64(1.0)


@_inline
def copy_vector(source, target):
    """target (N,) = source (N,). Loops: numba's slice assignment from an array compiles a
    formatted shape-mismatch message, seconds of string code per process on a cold cache."""
    for i in range(target.shape[0]):
        target[i] = source[i]


@_inline
def copy_matrix(source, target):
    """target (M, N) = source (M, N), by loops (see copy_vector)."""
    for i in range(target.shape[0]):
        for j in range(target.shape[1]):
            target[i, j] = source[i, j]


@_jit
def workspace(like):
    """Scratch for the Fortran by-reference arguments: (ints (5,), scalars (2,), chars (4,))."""
    chars = np.empty(4, np.uint8)
    chars[0] = 78  # 'N'
    chars[1] = 84  # 'T'
    chars[2] = 65  # 'A': pack the left operand of the column-major product
    chars[3] = 80  # 'P': that operand is packed
    return np.empty(5, np.int64), np.empty(2, like.dtype), chars


@_jit
def _leading(array):
    """Elements between rows of a 2-D array whose rows are contiguous (at least 1)."""
    return max(1, array.strides[0] // array.itemsize, array.shape[1])


@_jit
def _small_product(a, b, c, accumulate):
    """c (M, N) = a (M, K) @ b (K, N), or c += it, by plain loops (rows of b vectorise)."""
    m, k = a.shape
    n = b.shape[1]
    if not accumulate:
        c[:, :] = 0
    for row in range(m):
        out = c[row]
        for inner in range(k):
            weight = a[row, inner]
            b_row = b[inner]
            for col in range(n):
                out[col] += weight * b_row[col]


# The product is compiled once per dtype as a C-callable function and called through its
# address: numba links every jitted callee into each caller and optimises and compiles the whole
# again, so a product linked into each kernel was compiled again at every level of calls (the
# panel product in panels.py is called the same way). The body sits in the C-callable function
# itself for the same reason.
_GEMM_SIGNATURE = types.void(*([types.int64] * 6), *([types.voidptr, types.int64] * 3))


def _gemm_entry(dtype):
    """c (M, N) = op(a) @ op(b), or c += it (flags 0/1), by BLAS, on row-major pointers with
    leading dimensions lda, ldb, ldc; m, n, k at least 1."""

    def entry(
        trans_a, trans_b, accumulate, m, n, k, a_pointer, lda, b_pointer, ldb, c_pointer, ldc
    ):
        # Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: gemm with the
        # operands swapped, each read as its own transpose. Fortran takes every argument by
        # reference.
        ints = np.empty(6, np.int64)
        ints[0] = n
        ints[1] = m
        ints[2] = k
        ints[3] = ldb
        ints[4] = lda
        ints[5] = ldc
        scalars = np.empty(2, dtype)
        scalars[0] = 1
        scalars[1] = 1 if accumulate else 0
        chars = np.empty(2, np.uint8)
        chars[0] = 78  # 'N'
        chars[1] = 84  # 'T'
        flag_b = chars[1:] if trans_b else chars[0:]
        flag_a = chars[1:] if trans_a else chars[0:]
        if scalars.itemsize == 4:
            _sgemm(
                flag_b.ctypes, flag_a.ctypes, ints[0:].ctypes, ints[1:].ctypes, ints[2:].ctypes,
                scalars.ctypes, b_pointer, ints[3:].ctypes, a_pointer, ints[4:].ctypes,
                scalars[1:].ctypes, c_pointer, ints[5:].ctypes,
            )  # fmt: skip
        else:
            _dgemm(
                flag_b.ctypes, flag_a.ctypes, ints[0:].ctypes, ints[1:].ctypes, ints[2:].ctypes,
                scalars.ctypes, b_pointer, ints[3:].ctypes, a_pointer, ints[4:].ctypes,
                scalars[1:].ctypes, c_pointer, ints[5:].ctypes,
            )  # fmt: skip

    return entry


for _dtype in ("float32", "float64"):
    _entry = cfunc(_GEMM_SIGNATURE, cache=True)(_gemm_entry(getattr(np, _dtype)))
    llvm.add_symbol(f"rnnkit_gemm_{_dtype}", _entry.address)
_gemm_float32 = types.ExternalFunction("rnnkit_gemm_float32", _GEMM_SIGNATURE)
_gemm_float64 = types.ExternalFunction("rnnkit_gemm_float64", _GEMM_SIGNATURE)


@_inline
def gemm(a, b, c, trans_a, trans_b, accumulate, work):
    """c (M, N) = op(a) @ op(b), or c += it; see _gemm. work (workspace(c)) is taken for the
    kernels' uniform calls; the product itself needs none."""
    _gemm(a, b, c, _runtime(trans_a), _runtime(trans_b), _runtime(accumulate))


@_jit
def _gemm(a, b, c, trans_a, trans_b, accumulate):
    """c (M, N) = op(a) @ op(b), or c += it; op transposes when its flag is set; every array's
    rows are contiguous (views of row blocks are fine)."""
    m = a.shape[1] if trans_a else a.shape[0]
    k = a.shape[0] if trans_a else a.shape[1]
    n = b.shape[0] if trans_b else b.shape[1]
    if m == 0 or n == 0:
        return
    if k == 0 or m * n * k <= SMALL_GEMM:
        if k == 0 and not accumulate:
            c[:, :] = 0
        elif k > 0:
            # Transposed operands are copied (small by definition): one loop body to compile.
            left = np.ascontiguousarray(a.T) if trans_a else np.ascontiguousarray(a)
            right = np.ascontiguousarray(b.T) if trans_b else np.ascontiguousarray(b)
            _small_product(left, right, c, accumulate)
        return
    flag_a, flag_b, flag_c = 1 if trans_a else 0, 1 if trans_b else 0, 1 if accumulate else 0
    lda, ldb, ldc = _leading(a), _leading(b), _leading(c)
    if c.itemsize == 4:
        _gemm_float32(flag_a, flag_b, flag_c, m, n, k, a.ctypes, lda, b.ctypes, ldb, c.ctypes, ldc)
    else:
        _gemm_float64(flag_a, flag_b, flag_c, m, n, k, a.ctypes, lda, b.ctypes, ldb, c.ctypes, ldc)


@_jit
def matmul(a, b, c):
    """c (M, N) = a (M, K) @ b (K, N)."""
    gemm(a, b, c, False, False, False, workspace(c))


@_inline
def prepare_weight(rows, b, trans_b, use_packing, work):
    """(b', trans', packed) for gemm_weight; see _prepare_weight."""
    return _prepare_weight(
        rows, b, _runtime(trans_b), _runtime(use_packing), work, np.empty(0, b.dtype)
    )


@_inline
def prepare_weight_into(rows, b, trans_b, use_packing, work, space):
    """prepare_weight, with the packed form written into the front of `space` (1-D, b's dtype)
    where it holds packed_size(rows, b, trans_b, use_packing) elements, else into a new array.
    A large new array is memory the system maps afresh at every call (about 2000 page faults a
    call for an LSTM's two 4 MiB weights), so callers that run often pass space they keep."""
    return _prepare_weight(rows, b, _runtime(trans_b), _runtime(use_packing), work, space)


# What _prepare_weight makes of a weight (_packed_form).
_PLAIN, _TRANSPOSED_COPY, _PANEL_FORM, _MKL_FORM = 0, 1, 2, 3


@_jit
def _packed_form(rows, b, use_packing):
    """Which form _prepare_weight gives b for products of `rows` rows. float32 ones, when
    use_packing or small enough for plain loops, get rnnkit's panels where the CPU has AVX-512 (panels.py), or MKL's packed form
    for large enough products where MKL runs its AVX-512 path (MKL_PACK_MIN_ROWS,
    MKL_PACK_MIN_WEIGHT); others small enough for plain loops get a transposed copy (their loops
    vectorise over rows of b, not over dot products), larger ones MKL's packed form (pass
    PACKED_GEMM and ...: a global read of the library here would be frozen into the disk cache,
    and without MKL the packing symbols are plain sgemm)."""
    # PANELS is a constant: numba drops the branches not taken. A product small enough for the
    # transposed copy is packed into panels even for a few steps: packing costs no more than that
    # copy (a (256, 64) weight: 5.6 us against 19; (192, 64) 6.6 against 6.8) and each product
    # with the panels costs less than the loops (LSTM, batch 1, H = 64, 2 steps: 44 -> 17 us).
    if PANELS and b.itemsize == 4 and (use_packing or rows * b.size <= SMALL_GEMM):
        wide = rows >= MKL_PACK_MIN_ROWS and b.size >= MKL_PACK_MIN_WEIGHT
        if wide and _mkl_packs_wide_here() != 0:
            return _MKL_FORM
        # The register tiles beat plain loops at every size (a batch-1 step of an RNN with
        # H = 64: 0.22 us against 0.77).
        return _PANEL_FORM
    if rows * b.size <= SMALL_GEMM:
        return _TRANSPOSED_COPY
    if PANELS or not use_packing or b.itemsize != 4 or b.size * b.itemsize > PACK_MAX_BYTES:
        return _PLAIN
    return _MKL_FORM


@_jit
def packed_size(rows, b, trans_b, use_packing):
    """Elements of the packed form that prepare_weight makes of b for these arguments (0: none)."""
    form = _packed_form(rows, b, use_packing)
    if form == _PANEL_FORM:
        return panels.packed_size(b, trans_b)
    if form == _MKL_FORM:
        return _mkl_packed_size(rows, b, trans_b, workspace(b))
    return 0


@_jit
def _prepare_weight(rows, b, trans_b, use_packing, work, space):
    """Weight b (K, N), or b (N, K) read transposed, for repeated products (rows, K) @ op(b):
    (b', trans', packed) for gemm_weight, the packed form (see _packed_form) in `space` where it
    fits."""
    form = _packed_form(rows, b, use_packing)
    if form == _TRANSPOSED_COPY:
        if trans_b:
            return np.ascontiguousarray(b.T), False, space[:0]
        return np.ascontiguousarray(b), False, space[:0]
    if form == _PANEL_FORM:
        return np.ascontiguousarray(b), trans_b, panels.pack_into(b, trans_b, space)
    if form == _MKL_FORM:
        return np.ascontiguousarray(b), trans_b, _mkl_pack_into(rows, b, trans_b, work, space)
    return np.ascontiguousarray(b), trans_b, space[:0]


@_jit
def _mkl_packed_size(rows, b, trans_b, work):
    """Elements of _mkl_pack's array for these arguments: MKL's size, and one element more than
    a multiple of panels.PANEL, where panel packs are whole multiples: that is how _gemm_weight
    tells the two forms apart."""
    k = b.shape[1] if trans_b else b.shape[0]
    n = b.shape[0] if trans_b else b.shape[1]
    ints, _, chars = work
    ints[0] = n
    ints[1] = rows
    ints[2] = k
    size = _sgemm_pack_size(chars[2:].ctypes, ints[0:].ctypes, ints[1:].ctypes, ints[2:].ctypes)
    panel = panels.PANEL
    return (size // b.itemsize + 16 + panel) // panel * panel + 1


@_jit
def _mkl_pack(rows, b, trans_b, work):
    """MKL's packed form of float32 b (K, N), or b (N, K) read transposed, for (rows, K) @ op(b)."""
    return _mkl_pack_into(rows, b, trans_b, work, np.empty(0, b.dtype))


@_jit
def _mkl_pack_into(rows, b, trans_b, work, space):
    """_mkl_pack, written into the front of `space` where it fits, else into a new array."""
    count = _mkl_packed_size(rows, b, trans_b, work)  # which sets ints[0:3] to (n, rows, k)
    packed = space[:count] if space.size >= count else np.empty(count, b.dtype)
    ints, scalars, chars = work
    scalars[0] = 1
    ints[3] = _leading(b)
    flag_b = chars[1:] if trans_b else chars[0:]
    _sgemm_pack(
        chars[2:].ctypes, flag_b.ctypes, ints[0:].ctypes, ints[1:].ctypes, ints[2:].ctypes,
        scalars.ctypes, b.ctypes, ints[3:].ctypes, packed.ctypes,
    )  # fmt: skip
    return packed


@_inline
def gemm_weight(a, b, trans_b, packed, c, accumulate, work):
    """c (M, N) = a (M, K) @ op(b), or c += it; see _gemm_weight."""
    _gemm_weight(a, b, _runtime(trans_b), packed, c, _runtime(accumulate), work)


@_inline  # per-step products: see panels._inline
def _gemm_weight(a, b, trans_b, packed, c, accumulate, work):
    """c (M, N) = a (M, K) @ op(b), or c += it, with (b, trans_b, packed) from prepare_weight
    for M rows (packed: empty, rnnkit's panels, or MKL's packed form)."""
    if packed.size == 0:
        _gemm(a, b, c, _runtime(False), trans_b, accumulate)
        return
    if PANELS and packed.size % panels.PANEL == 0:  # panels', not MKL's form (see _mkl_pack)
        panels.product_float32(a, packed, c, accumulate)
    else:
        _mkl_packed_product(a, packed, c, accumulate, work)


@_jit
def _mkl_packed_product(a, packed, c, accumulate, work):
    """c (M, N) = a (M, K) @ B, or c += it, B in MKL's packed form (float32)."""
    m, k = a.shape
    n = c.shape[1]
    if m == 0 or n == 0:
        return
    ints, scalars, chars = work
    ints[0] = n
    ints[1] = m
    ints[2] = k
    scalars[0] = 1
    scalars[1] = 1 if accumulate else 0
    ints[3] = _leading(a)
    ints[4] = _leading(c)
    _sgemm_compute(
        chars[3:].ctypes, chars.ctypes, ints[0:].ctypes, ints[1:].ctypes, ints[2:].ctypes,
        packed.ctypes, ints[0:].ctypes, a.ctypes, ints[3:].ctypes, scalars[1:].ctypes,
        c.ctypes, ints[4:].ctypes,
    )  # fmt: skip
