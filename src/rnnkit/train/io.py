"""Atomic file writes: every file of a run directory appears whole or not at all."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from rnnkit.data.errors import DataError
from rnnkit.io import atomic_write_bytes


def atomic_write_json(path: str | os.PathLike, value: Any) -> None:
    """JSON-serialise `value` (indented, keys in insertion order) and write it atomically."""
    text = json.dumps(value, indent=2, allow_nan=True) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value stored in `path`; DataError naming the file if it is not UTF-8 JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
        raise DataError(f"{path}: not a valid JSON file ({error})") from None


def atomic_save_tensors(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Save named tensors as safetensors, atomically (contiguous CPU copies, no pickle)."""
    prepared = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    atomic_write_bytes(path, save_safetensors_bytes(prepared, metadata=metadata))


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The named CPU tensors of a safetensors file; DataError naming the file if it is corrupt."""
    try:
        return load_safetensors_bytes(Path(path).read_bytes())
    except SafetensorError as error:
        raise DataError(f"{path}: not a valid safetensors file ({error})") from None


def atomic_save_figure(path: str | os.PathLike, figure) -> None:
    """Render a matplotlib Figure to PNG and write it atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
