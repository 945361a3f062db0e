"""Opening users' files: existence, compression, binary and UTF-8 checks, streamed line by line."""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

from rnnkit.data.errors import DataError

_BOM = "\ufeff"
# Users' files are read a line at a time, and a data set is held in memory, so both are capped:
# a longer line or a larger file is a DataError rather than an exhausted memory.
MAX_LINE_BYTES = 4 * 2**20
MAX_FILE_BYTES = 512 * 2**20


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

    Raises DataError naming the line for invalid UTF-8 or NUL bytes (binary files, UTF-16), a
    line over MAX_LINE_BYTES, or more than MAX_FILE_BYTES in all (uncompressed).
    """
    opener = gzip.open if file.suffix.lower() == ".gz" else open
    total = 0
    try:
        with opener(file, "rb") as handle:
            for line_number, raw in enumerate(
                iter(lambda: handle.readline(MAX_LINE_BYTES + 1), b""), start=1
            ):
                if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                    raise DataError(
                        f"{file}: line {line_number} is longer than {MAX_LINE_BYTES:,} bytes, "
                        "the most rnnkit reads as one line; is this a text file with line breaks?"
                    )
                total += len(raw)
                if total > MAX_FILE_BYTES:
                    raise DataError(
                        f"{file}: more than {MAX_FILE_BYTES // 2**20} MiB of text (at line "
                        f"{line_number}); rnnkit holds a data set in memory, so use a sample "
                        "or a part of the file"
                    )
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
