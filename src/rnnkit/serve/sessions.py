"""The session table: unguessable ids, limits, idle eviction to disk, lifetime, shutdown.

A session is in memory (it owns a slot of the state table) or on disk only (evicted, or saved
by a previous server on the same `--state-dir`); `step` brings it back transparently. Each
session's requests run one at a time (a lock per session), so its chunks keep their order.

What is written when (with a `--state-dir`):
- every `persist_every` steps of a session (0: never on this count), after the step;
- when a session has been idle for `idle_seconds`: written, then evicted from memory;
- on shutdown (SIGTERM): every session in memory, after the steps in flight have finished.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from rnnkit.serve.adapters import InputError
from rnnkit.serve.batcher import Batcher, StateTable
from rnnkit.serve.persist import SESSION_ID, SessionStore


@dataclass
class Limits:
    """What one client may ask of the server."""

    max_sessions: int = 1000
    max_chunk: int = 4096
    max_message_bytes: int = 65536
    session_lifetime_s: float = 86400.0
    idle_seconds: float = 60.0
    persist_every: int = 100


@dataclass
class Session:
    """One stream: its id, when it began, steps taken, and where its state is."""

    id: str
    created: float
    steps: int = 0
    slot: int | None = None
    unsaved: int = 0
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    closed: bool = False

    def facts(self) -> dict[str, Any]:
        return {"created": self.created, "steps": self.steps}


class SessionError(Exception):
    """A session request that cannot be served: the HTTP status and the message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class SessionTable:
    """Every session of the server, in memory or on disk, and the steps run for them."""

    def __init__(
        self,
        table: StateTable,
        batcher: Batcher,
        executor: ThreadPoolExecutor,
        limits: Limits,
        store: SessionStore | None,
    ) -> None:
        self.table = table
        self.batcher = batcher
        self.executor = executor
        self.limits = limits
        self.store = store
        self.sessions: dict[str, Session] = {}
        self.accepting = True
        if store is not None:
            for session_id, facts in store.scan().items():
                self.sessions[session_id] = Session(
                    session_id, float(facts["created"]), int(facts["steps"])
                )

    @property
    def in_memory(self) -> int:
        return sum(1 for s in self.sessions.values() if s.slot is not None)

    async def _on_model_thread(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    async def open(self) -> Session:
        """A new session with the initial state; 429 when the table is full."""
        self._check_accepting()
        if len(self.sessions) >= self.limits.max_sessions:
            raise SessionError(
                429, f"too many sessions: the server holds at most {self.limits.max_sessions}"
            )
        session = Session(secrets.token_urlsafe(24), time.time())
        self.sessions[session.id] = session
        session.slot = await self._on_model_thread(self.table.allocate)
        return session

    def get(self, session_id: str) -> Session:
        """The live session with this id; 404 for an unknown, closed or expired one."""
        session = self.sessions.get(session_id) if SESSION_ID.match(session_id) else None
        if session is None or session.closed:
            raise SessionError(404, "no such session (unknown, closed or expired)")
        if time.time() - session.created > self.limits.session_lifetime_s:
            raise SessionError(404, "no such session (unknown, closed or expired)")
        return session

    async def step(self, session: Session, chunk: Tensor, tokens: list[str] | None) -> list:
        """Run one chunk (t, ...) of a session; its t output entries."""
        if chunk.size(0) > self.limits.max_chunk:
            raise InputError(
                f'"input" must hold at most {self.limits.max_chunk} steps, got {chunk.size(0)}',
                413,
            )
        async with session.lock:
            self._check_live(session)
            await self._load(session)
            entries = await self.batcher.submit(session.slot, chunk, tokens)
            session.steps += chunk.size(0)
            session.unsaved += chunk.size(0)
            session.last_used = time.monotonic()
            every = self.limits.persist_every
            if self.store is not None and every and session.unsaved >= every:
                await self._write(session)
        return entries

    async def reset(self, session: Session) -> None:
        """Start the session's stream anew."""
        async with session.lock:
            self._check_live(session)
            await self._load(session)
            await self._on_model_thread(self.table.reset, session.slot)
            session.steps = 0
            session.unsaved += 1
            session.last_used = time.monotonic()

    async def close(self, session: Session) -> None:
        """Forget the session, in memory and on disk."""
        async with session.lock:
            if session.closed:
                raise SessionError(404, "no such session (unknown, closed or expired)")
            await self._drop(session)

    async def _drop(self, session: Session) -> None:
        session.closed = True
        self.sessions.pop(session.id, None)
        if session.slot is not None:
            slot, session.slot = session.slot, None
            await self._on_model_thread(self.table.release, slot)
        if self.store is not None:
            await asyncio.to_thread(self.store.delete, session.id)

    async def sweep(self) -> None:
        """Close expired sessions; write idle ones to the store and evict them from memory."""
        now_wall, now = time.time(), time.monotonic()
        for session in list(self.sessions.values()):
            if session.lock.locked():
                continue
            if now_wall - session.created > self.limits.session_lifetime_s:
                async with session.lock:
                    if not session.closed:
                        await self._drop(session)
            elif (
                self.store is not None
                and session.slot is not None
                and now - session.last_used > self.limits.idle_seconds
            ):
                async with session.lock:
                    if session.slot is not None and not session.closed:
                        await self._evict(session)

    async def shutdown(self) -> int:
        """Refuse new input, finish what is in flight, write every session in memory.

        Returns how many sessions the store holds now."""
        self.accepting = False
        await self.batcher.drain()
        if self.store is None:
            return 0
        for session in list(self.sessions.values()):
            async with session.lock:
                if session.slot is not None and not session.closed:
                    await self._write(session)
        return len(self.sessions)

    def _check_accepting(self) -> None:
        if not self.accepting:
            raise SessionError(503, "the server is shutting down")

    def _check_live(self, session: Session) -> None:
        self._check_accepting()
        if session.closed:
            raise SessionError(404, "no such session (unknown, closed or expired)")

    async def _write(self, session: Session) -> None:
        tensors = await self._on_model_thread(self.table.read, session.slot)
        await asyncio.to_thread(self.store.write, session.id, tensors, session.facts())
        session.unsaved = 0

    async def _evict(self, session: Session) -> None:
        if session.unsaved or not self.store.path(session.id).exists():
            await self._write(session)
        slot, session.slot = session.slot, None
        await self._on_model_thread(self.table.release, slot)

    async def _load(self, session: Session) -> None:
        if session.slot is not None:
            return
        tensors, facts = await asyncio.to_thread(self.store.read, session.id)

        def restore() -> int:
            slot = self.table.allocate()
            try:
                self.table.write(slot, tensors)
            except ValueError:
                self.table.release(slot)
                raise
            return slot

        session.slot = await self._on_model_thread(restore)
        session.steps = int(facts["steps"])
        session.unsaved = 0
