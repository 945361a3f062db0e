"""The kernels' numba cache is keyed by all of their sources, not by each function's own file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numba

from rnnkit.kernels.cpu import blas, cache, lstm, minimal


def test_digest_changes_with_any_source_file(tmp_path):
    for path in cache.PACKAGE.glob("*.py"):
        shutil.copy(path, tmp_path / path.name)
    before = cache.sources_digest(tmp_path)
    assert cache.sources_digest(tmp_path) == before  # stable
    with open(tmp_path / "blas.py", "a") as source:
        source.write("\n# an edit\n")
    edited = cache.sources_digest(tmp_path)
    assert edited != before
    (tmp_path / "panels.py").rename(tmp_path / "panels_renamed.py")
    assert cache.sources_digest(tmp_path) not in (before, edited)


def test_kernels_are_cached_under_the_digest_of_their_sources():
    directory = str(cache.cache_directory())
    assert cache.sources_digest() in directory
    for kernel in (blas.copy_vector, lstm.lstm_forward_loop, minimal._prepare_projection):
        assert kernel._cache._cache_path.startswith(directory), kernel
    # The setting was numba's again after the imports: other code's caches are not moved.
    assert numba.config.CACHE_DIR == os.environ.get("NUMBA_CACHE_DIR", "")


def test_stale_directories_go_only_where_the_cache_is_rnnkits_own(tmp_path, monkeypatch):
    stale = tmp_path / f"{cache.PREFIX}0123456789abcdef"
    stale.mkdir()
    unrelated = tmp_path / "someone-elses"
    unrelated.mkdir()
    before = numba.config.CACHE_DIR
    monkeypatch.setattr(cache, "cache_base", lambda: (tmp_path, False))
    with cache.keyed_numba_cache() as directory:
        assert numba.config.CACHE_DIR == str(directory)
    assert numba.config.CACHE_DIR == before
    assert stale.exists()  # a shared NUMBA_CACHE_DIR may serve another copy of rnnkit
    monkeypatch.setattr(cache, "cache_base", lambda: (tmp_path, True))
    with cache.keyed_numba_cache() as directory:
        assert directory.parent == tmp_path
    assert not stale.exists() and unrelated.exists()


def test_a_fresh_process_writes_and_reads_the_keyed_cache(tmp_path):
    script = textwrap.dedent(
        """
        import numpy as np
        from rnnkit.kernels.cpu import blas, cache
        blas.copy_vector(np.zeros(3), np.ones(3))
        print(cache.cache_directory())
        print(len(blas.copy_vector.stats.cache_hits))
        """
    )
    environment = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    runs = [
        subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=environment
        )
        for _ in range(2)
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    (directory, first_hits), (_, second_hits) = (run.stdout.split() for run in runs)
    assert Path(directory).parent == tmp_path
    assert list(Path(directory).rglob("blas.copy_vector-*.nbi"))
    assert (int(first_hits), int(second_hits)) == (0, 1)  # compiled once, then read back


def test_cache_base_prefers_numba_cache_dir_then_the_package_then_the_user(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba"))
    assert cache.cache_base() == (tmp_path / "numba", False)
    monkeypatch.delenv("NUMBA_CACHE_DIR")
    monkeypatch.setattr(cache, "PACKAGE", tmp_path / "package")
    (tmp_path / "package").mkdir()
    assert cache.cache_base() == (tmp_path / "package" / "__pycache__", True)
    # A package installed read-only: the user's cache, shared with other copies of rnnkit.
    monkeypatch.setattr(cache.os, "access", lambda path, mode: False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_base() == (tmp_path / "xdg" / "rnnkit", False)
