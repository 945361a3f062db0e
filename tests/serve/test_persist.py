"""Sessions written to --state-dir: idle eviction and transparent restore, the write policy,
restarts on the same directory, and a directory of another model refused."""

import json
import time

import pytest
from safetensors import safe_open
from serve_helpers import client_for, lm_model, make_run

from rnnkit.serve.persist import SUFFIX
from rnnkit.train.rundir import RunError


def step(client, session: str, text: str) -> list[dict]:
    response = client.post(f"/v1/sessions/{session}/steps", json={"input": text})
    assert response.status_code == 200, response.text
    return response.json()["outputs"]


def assert_outputs_close(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for entry, reference in zip(got, expected):
        assert dict(entry["top"]) == pytest.approx(dict(reference["top"]), abs=1e-6)


def saved_steps(state_dir, session: str) -> int:
    with safe_open(str(state_dir / f"{session}{SUFFIX}"), framework="pt") as file:
        return json.loads(file.metadata()["session"])["steps"]


def wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_idle_sessions_are_evicted_to_disk_and_come_back_on_their_next_step(lm_run, tmp_path):
    with client_for(lm_run, state_dir=tmp_path, idle_seconds=0.2, persist_every=0) as client:
        session = client.post("/v1/sessions").json()["id"]
        busy = client.post("/v1/sessions").json()["id"]
        first = step(client, session, "to b")
        wait_for(lambda: client.get("/v1/health").json()["in_memory"] == 0)
        assert saved_steps(tmp_path, session) == 4
        health = client.get("/v1/health").json()
        assert health["sessions"] == 2 and health["in_memory"] == 0
        second = step(client, session, "e or")
        assert client.get("/v1/health").json()["in_memory"] == 1
        whole = client.post("/v1/predict", json={"input": "to be or"}).json()["outputs"]
        assert client.delete(f"/v1/sessions/{busy}").status_code == 200
        assert not (tmp_path / f"{busy}{SUFFIX}").exists()
    assert_outputs_close(first + second, whole)


def test_persist_every_n_steps_writes_a_session_as_it_goes(lm_run, tmp_path):
    with client_for(lm_run, state_dir=tmp_path, persist_every=3) as client:
        session = client.post("/v1/sessions").json()["id"]
        step(client, session, "to")
        assert not (tmp_path / f"{session}{SUFFIX}").exists()
        step(client, session, " b")
        assert saved_steps(tmp_path, session) == 4
        step(client, session, "e")
        assert saved_steps(tmp_path, session) == 4  # one step since the last write: not yet


def test_shutdown_writes_every_session_and_a_restart_continues_them(lm_run, tmp_path):
    texts = {"a": ("to be ", "or not"), "b": ("that i", "s the q")}
    with client_for(lm_run, state_dir=tmp_path, persist_every=0) as client:
        sessions = {name: client.post("/v1/sessions").json()["id"] for name in texts}
        before = {name: step(client, sessions[name], texts[name][0]) for name in texts}
        assert not list(tmp_path.glob(f"*{SUFFIX}"))
    assert len(list(tmp_path.glob(f"*{SUFFIX}"))) == 2
    with client_for(lm_run, state_dir=tmp_path) as client:
        health = client.get("/v1/health").json()
        assert health["sessions"] == 2 and health["in_memory"] == 0
        for name, (head, tail) in texts.items():
            after = step(client, sessions[name], tail)
            whole = client.post("/v1/predict", json={"input": head + tail}).json()["outputs"]
            assert_outputs_close(before[name] + after, whole)


def test_a_state_dir_of_another_model_is_refused(lm_run, tmp_path):
    with client_for(lm_run, state_dir=tmp_path / "state") as client:
        client.post("/v1/sessions")
    other = make_run(tmp_path / "other", "lm", *lm_model("gru"))
    with pytest.raises(RunError, match="holds a session of another model"):
        client_for(other, state_dir=tmp_path / "state")
    (tmp_path / "state" / f"{'A' * 32}{SUFFIX}").write_bytes(b"not a safetensors file")
    with pytest.raises(RunError, match="is not a saved session"):
        client_for(lm_run, state_dir=tmp_path / "state")


def test_without_a_clean_shutdown_a_session_comes_back_as_of_its_last_write(lm_run, tmp_path):
    # A second server on the same directory while the first still runs is what the first's
    # SIGKILL leaves behind: the files as last written, nothing written at shutdown.
    with client_for(lm_run, state_dir=tmp_path, persist_every=4) as first:
        session = first.post("/v1/sessions").json()["id"]
        step(first, session, "to b")  # written: 4 steps
        step(first, session, "e")  # not written
        with client_for(lm_run, state_dir=tmp_path) as second:
            resumed = step(second, session, "e or")
            whole = second.post("/v1/predict", json={"input": "to be or"}).json()["outputs"]
    assert_outputs_close(resumed, whole[4:])
