"""Opening users' files: existence, compression, binary and UTF-8 checks, streamed line by line."""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

from rnnkit.data.errors import DataError

_BOM = "\ufeff"


def existing_file(path: str | os.PathLike, argument: str = "path") -> Path:
    """Checked path -> Path to an existing, non-empty regular file, else DataError."""
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"{argument} must be a str or os.PathLike, got {type(path).__name__}")
    file = Path(path)
    if not file.exists():
        raise DataError(f"{file}: no such file")
    if file.is_dir():
        raise DataError(f"{file}: is a directory, expected a file")
    if not file.is_file():
        raise DataError(f"{file}: is not a regular file")
    if file.stat().st_size == 0:
        raise DataError(f"{file}: file is empty")
    return file


def base_suffix(file: Path) -> str:
    """'data.CSV.gz' -> '.csv': the lower-case format suffix under an optional .gz."""
    suffixes = [suffix.lower() for suffix in file.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def iter_lines(file: Path) -> Iterator[str]:
    """Decoded lines of a UTF-8 (optionally gzip) file, newline kept; one line in memory at a time.

    Raises DataError naming the line for invalid UTF-8 or NUL bytes (binary files, UTF-16).
    """
    opener = gzip.open if file.suffix.lower() == ".gz" else open
    try:
        with opener(file, "rb") as handle:
            for line_number, raw in enumerate(handle, start=1):
                if b"\x00" in raw:
                    raise DataError(
                        f"{file}: line {line_number} contains NUL bytes; this looks like a binary "
                        "file (or UTF-16 text), expected UTF-8 text"
                    )
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    bad = raw[error.start : error.start + 1].hex()
                    raise DataError(
                        f"{file}: line {line_number} is not valid UTF-8 (byte 0x{bad} at column "
                        f"{error.start + 1}); re-save the file as UTF-8"
                    ) from None
                if line_number == 1 and line.startswith(_BOM):
                    line = line[1:]
                yield line
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise DataError(f"{file}: not a readable gzip file ({error})") from None
