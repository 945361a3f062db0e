"""Sessions on disk: one safetensors file per session, its facts as JSON in the file's metadata.

A file is written atomically (a temporary file, fsync, rename), so a session on disk is always
one whole state: the one of its last write. Each file names the model it belongs to (a hash of
the weights); a state directory written for another model is refused, not misread.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from rnnkit.io import atomic_write_bytes
from rnnkit.train.rundir import RunError

FORMAT = "rnnkit.serve.session/1"
SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{32}$")
SUFFIX = ".safetensors"


class SessionStore:
    """The `--state-dir`: write, read, list and delete saved sessions of one model."""

    def __init__(self, directory: str | Path, fingerprint: str) -> None:
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, session_id: str) -> Path:
        """The file of a session (ids are checked against SESSION_ID before they get here)."""
        if not SESSION_ID.match(session_id):
            raise ValueError(f"not a session id: {session_id!r}")
        return self.directory / f"{session_id}{SUFFIX}"

    def write(self, session_id: str, tensors: dict[str, Tensor], facts: dict[str, Any]) -> None:
        """Save one session's state and facts (created, steps), atomically."""
        metadata = {"format": FORMAT, "model": self.fingerprint, "session": json.dumps(facts)}
        prepared = {name: t.contiguous() for name, t in tensors.items()}
        atomic_write_bytes(self.path(session_id), safetensors_bytes(prepared, metadata=metadata))

    def read(self, session_id: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """A saved session's state tensors and facts."""
        path = self.path(session_id)
        with safe_open(str(path), framework="pt") as file:
            metadata = self._check(path, file.metadata())
            tensors = {name: file.get_tensor(name) for name in file.keys()}
        return tensors, metadata

    def delete(self, session_id: str) -> None:
        """Forget a saved session (nothing happens if it was never saved)."""
        self.path(session_id).unlink(missing_ok=True)

    def scan(self) -> dict[str, dict[str, Any]]:
        """Every saved session: id -> facts. RunError if a file belongs to another model."""
        found = {}
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            session_id = path.name[: -len(SUFFIX)]
            if not SESSION_ID.match(session_id):
                continue
            try:
                with safe_open(str(path), framework="pt") as file:
                    found[session_id] = self._check(path, file.metadata())
            except RunError:
                raise
            except Exception as error:
                raise RunError(f"--state-dir: {path} is not a saved session ({error})") from error
        return found

    def _check(self, path: Path, metadata: dict[str, str] | None) -> dict[str, Any]:
        metadata = metadata or {}
        if metadata.get("format") != FORMAT:
            raise RunError(
                f"--state-dir: {path} must be a saved session (format {FORMAT!r}), "
                f"got {metadata.get('format')!r}"
            )
        if metadata.get("model") != self.fingerprint:
            raise RunError(
                f"--state-dir: {path} holds a session of another model (weights "
                f"{metadata.get('model')}, this run's are {self.fingerprint}); use another "
                "--state-dir for this run"
            )
        return json.loads(metadata["session"])
