"""Steps from many sessions become one batched step, with the same outputs as stepping alone."""

import asyncio
import time

import httpx
import pytest
import torch

from rnnkit.serve import ServeOptions, create_app
from rnnkit.serve.adapters import make_adapter
from rnnkit.serve.batcher import StateTable
from rnnkit.train.runs import load_run

TEXTS = [
    "to be or",
    "not to b",
    "that is ",
    "the ques",
    "tion. to",
    "be, or n",
    "ot to be",
    "quest",
]


async def drive(app, rounds: list[list[str]]) -> tuple[list[list[dict]], dict]:
    """Open one session per text; each round sends every session's chunk at once. Returns the
    outputs and the batching counters of the rounds after the first (a session unseen so far
    is not waited for)."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as client:
            ids = [(await client.post("/v1/sessions")).json()["id"] for _ in rounds[0]]
            outputs: list[list[dict]] = [[] for _ in ids]
            for number, chunks in enumerate(rounds):
                if number == 1:  # from the second round on, every session has been active
                    first = (await client.get("/v1/health")).json()["batching"]
                answers = await asyncio.gather(
                    *(
                        client.post(f"/v1/sessions/{i}/steps", json={"input": chunk})
                        for i, chunk in zip(ids, chunks)
                    )
                )
                for row, answer in zip(outputs, answers):
                    assert answer.status_code == 200, answer.text
                    row += answer.json()["outputs"]
            stats = (await client.get("/v1/health")).json()["batching"]
    return outputs, {key: stats[key] - first[key] for key in ("batches", "chunks", "steps")}


def serve(run_dir, max_batch: int, max_wait_ms: float):
    options = ServeOptions(max_batch=max_batch, max_wait_ms=max_wait_ms, top_k=1000)
    return create_app(load_run(run_dir), options)


def assert_close(got: list[list[dict]], expected: list[list[dict]]) -> None:
    for row, reference in zip(got, expected, strict=True):
        for entry, other in zip(row, reference, strict=True):
            assert dict(entry["top"]) == pytest.approx(dict(other["top"]), abs=1e-6)


def test_a_lone_stream_does_not_wait_for_the_batching_window(lm_run):
    rounds = [["t"], ["o"], [" "], ["b"]]
    began = time.monotonic()
    asyncio.run(drive(serve(lm_run, 64, 2000.0), rounds))
    assert time.monotonic() - began < 8.0  # four 2-second windows would take 8 s


@pytest.mark.parametrize("run_name", ["lm_run", "gru_lm_run"])
def test_concurrent_sessions_share_one_batched_step_per_character(run_name, request):
    run_dir = request.getfixturevalue(run_name)
    rounds = [[text[k] for text in TEXTS] for k in range(5)]
    batched, stats = asyncio.run(drive(serve(run_dir, 64, 500.0), rounds))
    alone, alone_stats = asyncio.run(drive(serve(run_dir, 1, 0.0), rounds))
    # 8 sessions x 4 characters: 4 batched steps of 8 against 32 steps of 1.
    assert stats == {"batches": 4, "chunks": 32, "steps": 32}
    assert alone_stats == {"batches": 32, "chunks": 32, "steps": 32}
    assert_close(batched, alone)
    with torch.no_grad():
        run = load_run(run_dir)
        tokens = run.state["vocab"]["tokens"]
        for text, row in zip(TEXTS, batched):
            ids = torch.tensor([[tokens.index(c) + 2 for c in text[:5]]])
            expected = torch.softmax(run.model(ids)[0][0], -1)[:, 2:]
            for step, entry in zip(expected, row):
                assert dict(entry["top"]) == pytest.approx(
                    dict(zip(tokens, step.tolist())), abs=1e-6
                )


def test_chunks_of_different_lengths_in_one_window_give_exact_outputs(lm_run):
    rounds = [
        ["t", "no", "tha", "the ", "t", "be", "o", "quest"],
        ["o", "t", " i", "q", "i", ",", "t", "ion"],
    ]
    batched, stats = asyncio.run(drive(serve(lm_run, 64, 500.0), rounds))
    alone, _ = asyncio.run(drive(serve(lm_run, 1, 0.0), rounds))
    # Second round: lengths 1, 1, 2, 1, 1, 1, 1, 3 -> one batched step per length.
    assert stats["chunks"] == 8 and stats["batches"] == 3
    assert_close(batched, alone)


def test_tagger_chunks_of_words_of_different_lengths_batch_together(tag_run):
    rounds = [["cat", "on", "mat", "."], ["sat", "the", "dog", "on"]]  # one token each
    batched, stats = asyncio.run(drive(serve(tag_run, 64, 500.0), rounds))
    alone, _ = asyncio.run(drive(serve(tag_run, 1, 0.0), rounds))
    assert stats == {"batches": 1, "chunks": 4, "steps": 4}
    assert batched == alone


def test_state_table_gathers_and_scatters_rows_of_any_state_layout(classify_run, forecast_run):
    for run_dir in (classify_run, forecast_run):
        adapter = make_adapter(load_run(run_dir))
        table = StateTable(adapter, capacity=2)
        slots = [table.allocate() for _ in range(5)]  # grows past its first capacity
        assert table.capacity >= 5 and len(set(slots)) == 5
        chosen = torch.tensor([slots[3], slots[1]])
        state = table.gather(chosen)
        bumped = _map(state, lambda t: t + 7)
        table.scatter(chosen, bumped)
        again = table.gather(chosen)
        for got, want in zip(_leaves(again), _leaves(bumped)):
            assert torch.equal(got, want)
        untouched = table.gather(torch.tensor([slots[0]]))
        for got, want in zip(_leaves(untouched), _leaves(adapter.initial_state(1))):
            assert torch.equal(got, want)


def _leaves(state):
    if isinstance(state, torch.Tensor):
        return [state]
    items = state.values() if isinstance(state, dict) else state
    return [leaf for item in items for leaf in _leaves(item)]


def _map(state, function):
    if isinstance(state, torch.Tensor):
        return function(state)
    if isinstance(state, dict):
        return {k: _map(v, function) for k, v in state.items()}
    return type(state)(_map(v, function) for v in state)
