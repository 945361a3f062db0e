"""Where numba keeps the compiled kernels: one directory per version of this package's sources.

numba checks a cached function against the timestamp of its own file only, not of the files whose
functions it compiled into it (numba/numba#8396 proposed that and was not merged). Every kernel
here inlines blas.py's products and others' helpers, so after an edit to blas.py, or an upgrade
that changed it, the cached LSTM kernel would still run the old products. So the kernels are
cached under a directory named by a digest of all of this package's sources and numba's version:
a change to any file starts a fresh cache, and the directories of earlier sources are removed
where the cache sits beside the package.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numba

PACKAGE = Path(__file__).resolve().parent
PREFIX = "rnnkit-kernels-"


def sources_digest(package: Path = PACKAGE) -> str:
    """A digest of numba's version and every .py file of `package` (names and contents)."""
    digest = hashlib.sha256(numba.__version__.encode())
    for path in sorted(package.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def cache_base() -> tuple[Path, bool]:
    """(directory that holds the keyed caches, whether it belongs to this copy of rnnkit alone):
    NUMBA_CACHE_DIR if set, else the package's __pycache__ if writable, else the user's cache."""
    configured = os.environ.get("NUMBA_CACHE_DIR")
    if configured:
        return Path(configured), False
    in_tree = PACKAGE / "__pycache__"
    with contextlib.suppress(OSError):
        in_tree.mkdir(exist_ok=True)
    if os.access(in_tree, os.W_OK):
        return in_tree, True
    user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return user_cache / "rnnkit", False


def cache_directory(base: Path | None = None) -> Path:
    """The directory numba caches this version of the kernels in, under `base` (cache_base's)."""
    return (cache_base()[0] if base is None else base) / f"{PREFIX}{sources_digest()}"


@contextlib.contextmanager
def keyed_numba_cache() -> Iterator[Path]:
    """Within: functions decorated with cache=True are cached under cache_directory(). numba
    reads its CACHE_DIR when a function is decorated, so this wraps the kernels' imports."""
    base, own = cache_base()
    directory = cache_directory(base)
    if own:  # nobody else's cache lives here: the directories of earlier sources are stale
        for stale in base.glob(f"{PREFIX}*"):
            if stale != directory:
                shutil.rmtree(stale, ignore_errors=True)
    previous = numba.config.CACHE_DIR
    numba.config.CACHE_DIR = str(directory)
    try:
        yield directory
    finally:
        numba.config.CACHE_DIR = previous
