"""Plain text for character language models."""

from __future__ import annotations

import gzip
import os

from rnnkit.data._files import existing_file, iter_lines
from rnnkit.data.builtin import builtin_file
from rnnkit.data.errors import DataError


def load_text(path: str | os.PathLike | None = None) -> str:
    """UTF-8 text file (optionally .gz) -> str with '\\n' newlines; None -> embedded Shakespeare."""
    if path is None:
        with gzip.open(builtin_file("shakespeare.txt.gz"), "rt", encoding="utf-8") as handle:
            return handle.read()
    file = existing_file(path)
    text = "".join(iter_lines(file)).replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise DataError(f"{file}: contains only whitespace, expected text")
    return text
