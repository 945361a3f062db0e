"""Batched steps across sessions: a state table, and a batcher that fills one step from many.

Every session in memory owns a row ("slot") of the state table: one tensor per leaf of the
model's state, with the batch dimension sized to the table's capacity. A batched step gathers
its sessions' rows (`index_select`), runs the adapter once, and scatters the new state back
(`index_copy_`). All of it runs on one model thread, so the table needs no lock; the asyncio
event loop keeps taking requests meanwhile and the next batch is ready when the thread is free.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from rnnkit.serve.adapters import Adapter
from rnnkit.stream import _flatten, _unflatten


class StateTable:
    """Rows of model state, one per slot: gather a batch's rows, scatter new ones back."""

    def __init__(self, adapter: Adapter, capacity: int = 16) -> None:
        one, two = adapter.initial_state(1), adapter.initial_state(2)
        self.initial, self.structure = _flatten(one)
        others, _ = _flatten(two)
        self.batch_dims = {
            name: _batch_dim(name, t, others[name]) for name, t in self.initial.items()
        }
        self.capacity = 0
        self.tables: dict[str, Tensor] = {}
        self.free: list[int] = []
        self._grow(capacity)

    @property
    def state_bytes(self) -> int:
        """Bytes of state one session holds."""
        return sum(t.numel() * t.element_size() for t in self.initial.values())

    @property
    def state_numbers(self) -> int:
        """Numbers (floats and counters) of state one session holds."""
        return sum(t.numel() for t in self.initial.values())

    def _grow(self, capacity: int) -> None:
        added = range(self.capacity, capacity)
        for name, first in self.initial.items():
            dim = self.batch_dims[name]
            rows = first.expand(
                *[capacity - self.capacity if d == dim else -1 for d in range(first.dim())]
            )
            old = self.tables.get(name)
            self.tables[name] = rows.clone() if old is None else torch.cat([old, rows], dim)
        self.free.extend(reversed(added))
        self.capacity = capacity

    def allocate(self) -> int:
        """A free slot holding the initial state."""
        if not self.free:
            self._grow(max(16, 2 * self.capacity))
        slot = self.free.pop()
        self.reset(slot)
        return slot

    def release(self, slot: int) -> None:
        """Give a slot back."""
        self.free.append(slot)

    def reset(self, slot: int) -> None:
        """Put the initial state into `slot`."""
        for name, first in self.initial.items():
            self.tables[name].narrow(self.batch_dims[name], slot, 1).copy_(first)

    def gather(self, slots: Tensor) -> Any:
        """(B,) slots -> the model's state for those sessions, batch in that order."""
        tensors = {n: t.index_select(self.batch_dims[n], slots) for n, t in self.tables.items()}
        return _unflatten(self.structure, tensors)

    def scatter(self, slots: Tensor, state: Any) -> None:
        """Write a batch's new state (batch in the order of `slots`) back to their rows."""
        tensors, _ = _flatten(state)
        for name, table in self.tables.items():
            table.index_copy_(self.batch_dims[name], slots, tensors[name].to(table.dtype))

    def read(self, slot: int) -> dict[str, Tensor]:
        """One session's state as {leaf name: tensor with batch size 1}, copied."""
        return {
            name: table.narrow(self.batch_dims[name], slot, 1).clone()
            for name, table in self.tables.items()
        }

    def write(self, slot: int, tensors: dict[str, Tensor]) -> None:
        """Put a state from `read` (or a file of it) into `slot`; ValueError if it does not fit."""
        for name, first in self.initial.items():
            got = tensors.get(name)
            if got is None or got.shape != first.shape or got.dtype != first.dtype:
                shape = None if got is None else tuple(got.shape)
                raise ValueError(
                    f"state {name!r} must have shape {tuple(first.shape)} and dtype "
                    f"{first.dtype}, got {shape}"
                )
        for name, table in self.tables.items():
            table.narrow(self.batch_dims[name], slot, 1).copy_(tensors[name])


def _batch_dim(name: str, one: Tensor, two: Tensor) -> int:
    for dim, (a, b) in enumerate(zip(one.shape, two.shape)):
        if a == 1 and b == 2:
            return dim
    raise TypeError(f"state tensor {name!r} has no batch dimension ({tuple(one.shape)})")


@dataclass
class _Pending:
    slot: int
    chunk: Tensor
    tokens: list[str] | None
    future: asyncio.Future


@dataclass
class BatchStats:
    """Counters: batched steps run, session-chunks and steps they held, the largest batch, and
    the seconds the model thread spent on them (gather, step, scatter, output entries)."""

    batches: int = 0
    chunks: int = 0
    steps: int = 0
    sizes: Counter = field(default_factory=Counter)
    model_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "chunks": self.chunks,
            "steps": self.steps,
            "largest_batch": max(self.sizes, default=0),
            "model_seconds": self.model_seconds,
        }


class Batcher:
    """Collects chunks from many sessions for up to `max_wait_ms` (or `max_batch` of them) and
    runs them as batched steps on the model thread. While a batch runs, the next one fills."""

    def __init__(
        self,
        adapter: Adapter,
        table: StateTable,
        executor: ThreadPoolExecutor,
        max_batch: int,
        max_wait_ms: float,
    ) -> None:
        self.adapter = adapter
        self.table = table
        self.executor = executor
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._arrived = asyncio.Event()
        self._last_seen: dict[int, float] = {}

    def start(self) -> None:
        """Start collecting (inside the running event loop)."""
        self._task = asyncio.get_running_loop().create_task(self._collect())

    async def stop(self) -> None:
        """Finish every chunk already submitted, then stop."""
        await self.drain()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def drain(self) -> None:
        """Wait until nothing is queued or running."""
        while not (self._queue.empty() and self._idle.is_set()):
            await asyncio.sleep(0.001)

    async def submit(self, slot: int, chunk: Tensor, tokens: list[str] | None) -> list[dict]:
        """One session's chunk (t, ...) -> its t output entries, once its batch has run."""
        future = asyncio.get_running_loop().create_future()
        self._last_seen[slot] = time.monotonic()
        self._queue.put_nowait(_Pending(slot, chunk, tokens, future))
        self._arrived.set()
        return await future

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            self._idle.clear()
            batch = await self._fill([first], loop)
            try:
                results = await loop.run_in_executor(self.executor, self.run_batch, batch)
            except Exception as error:  # noqa: BLE001 - every waiting request must hear of it
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(error)
            else:
                for item, entries in zip(batch, results):
                    if not item.future.done():
                        item.future.set_result(entries)
            if self._queue.empty():
                self._idle.set()

    async def _fill(self, batch: list[_Pending], loop) -> list[_Pending]:
        """Add queued chunks to the batch, waiting up to max_wait for more, but only while
        sessions that were active in the last second have yet to send theirs: a lone stream
        never waits."""
        deadline = loop.time() + self.max_wait
        while True:
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            remaining = deadline - loop.time()
            if len(batch) >= min(self.max_batch, self._recently_active()) or remaining <= 0:
                return batch
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                pass

    def _recently_active(self) -> int:
        """Sessions that sent a chunk within the last second (forgetting older ones)."""
        horizon = time.monotonic() - 1.0
        stale = [slot for slot, seen in self._last_seen.items() if seen < horizon]
        for slot in stale:
            del self._last_seen[slot]
        return len(self._last_seen)

    def run_batch(self, batch: list[_Pending]) -> list[list[dict]]:
        """On the model thread: the batch's chunks, grouped by length, as batched steps."""
        started = time.perf_counter()
        results: list[list[dict] | None] = [None] * len(batch)
        groups: dict[int, list[int]] = {}
        for index, item in enumerate(batch):
            groups.setdefault(item.chunk.size(0), []).append(index)
        with torch.inference_mode():
            for length, members in groups.items():
                slots = torch.tensor([batch[i].slot for i in members], dtype=torch.int64)
                inputs = self.adapter.collate([batch[i].chunk for i in members])
                outputs, state = self.adapter.step(inputs, self.table.gather(slots))
                self.table.scatter(slots, state)
                entries = self.adapter.entries(outputs, [batch[i].tokens for i in members])
                for i, row in zip(members, entries):
                    results[i] = row
                self.stats.batches += 1
                self.stats.chunks += len(members)
                self.stats.steps += length * len(members)
                self.stats.sizes[len(members)] += 1
        self.stats.model_seconds += time.perf_counter() - started
        return results
