"""Arrays that the kernels pack weights into, kept from one call to the next.

A packed weight of a few MiB allocated afresh at each call is memory the system maps anew each
time (glibc maps blocks of 128 KiB and more on their own and unmaps them when freed): an LSTM
inference call at (16, 8, 512, 512) took 2054 page faults for its two 4 MiB packed weights, and
4.4 ms without them against 7.7-9.5 ms with them (Xeon, 2026-11-29). So the kernels that run
often take their packing space from here: one array per thread and slot (a call's batch parts
and weights take a slot each), grown when a larger weight comes and kept after the call. The
kernels pack into it at every call, so nothing of one call's weights outlives it. The LSTM's
kernels, the GRU's forward kernels and the RNN's kernels take it (`spaces`); the GRU's backward
and the variants' kernels still pack into new memory.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from rnnkit.kernels.cpu import blas

# Below this the allocator serves the space from its free lists, without faults; above the
# largest, the products a packed weight serves cost far more than its faults, and the memory is
# not held.
MIN_KEPT_BYTES = 1 << 17
MAX_KEPT_BYTES = 1 << 26

_local = threading.local()
_EMPTY = {torch.float32: np.empty(0, np.float32), torch.float64: np.empty(0, np.float64)}


def keeps(weight: np.ndarray) -> bool:
    """Whether space is kept for a packed copy of this weight array."""
    return MIN_KEPT_BYTES <= weight.nbytes <= MAX_KEPT_BYTES


def empty(dtype: torch.dtype) -> np.ndarray:
    """No space: the kernel allocates what it packs (read only: shared by every call)."""
    return _EMPTY[dtype]


def spaces(
    weights, first_slot: int, use_packing: bool, dtype: torch.dtype, transposed: bool = True
) -> tuple[np.ndarray, ...]:
    """The kept arrays that (weight array, product rows) pairs are packed into, slots
    first_slot, first_slot + 1, ..., each weight read transposed or not: empty for weights too
    small or too large to keep space for (keeps). A call's forward and backward run one after
    the other, so they share slots; its concurrent batch parts must take different ones."""
    kept = []
    for slot, (weight, rows) in enumerate(weights, first_slot):
        if not use_packing or not keeps(weight):
            kept.append(empty(dtype))
            continue
        elements = blas.packed_size(rows, weight, transposed, use_packing)
        kept.append(space(slot, elements, dtype) if elements else empty(dtype))
    return tuple(kept)


def space(slot: int, elements: int, dtype: torch.dtype) -> np.ndarray:
    """A 1-D array of at least `elements` of dtype, this thread's for `slot` (0, 1, ...); its
    contents are whatever the last call left."""
    kept = getattr(_local, "spaces", None)
    if kept is None:
        kept = _local.spaces = {}
    key = (slot, dtype)
    array = kept.get(key)
    if array is None or array.size < elements:
        array = kept[key] = np.empty(elements, _EMPTY[dtype].dtype)
    return array
