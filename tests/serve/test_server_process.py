"""The real `rnnkit serve` on loopback: SIGTERM saves every session, a restart continues them."""

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from serve_helpers import free_port
from websockets.sync.client import connect


class ServerProcess:
    """`python -m rnnkit serve RUN_DIR ...` on a free loopback port, until stopped."""

    def __init__(self, run_dir, *options: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "rnnkit", "serve", str(run_dir), "--port", str(self.port)]
        environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [*command, *options],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=environment,
        )
        deadline = time.monotonic() + 90
        while True:
            assert self.process.poll() is None, self.process.stdout.read()
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)

    def stop(self) -> tuple[int, str]:
        """SIGTERM, then wait: the exit code and what it printed."""
        self.process.send_signal(signal.SIGTERM)
        try:
            output, _ = self.process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        return self.process.returncode, output


def step(url: str, session: str, text: str) -> list[dict]:
    response = httpx.post(f"{url}/v1/sessions/{session}/steps", json={"input": text}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["outputs"]


def test_sigterm_saves_sessions_and_a_restarted_server_continues_them_exactly(lm_run, tmp_path):
    state_dir = tmp_path / "state"
    options = ["--state-dir", str(state_dir), "--persist-every", "0", "--top-k", "50"]
    heads = ["to be or", "not to", "that is t"]
    tails = [" not to be", " be, that", "he question"]
    server = ServerProcess(lm_run, *options)
    try:
        sessions = [
            httpx.post(f"{server.url}/v1/sessions").json()["id"] for _ in range(len(heads) + 1)
        ]
        before = [step(server.url, session, head) for session, head in zip(sessions, heads)]
        streamed = []
        socket_url = f"ws://127.0.0.1:{server.port}/v1/sessions/{sessions[-1]}/stream"
        with connect(socket_url) as websocket:
            for character in "quest":
                websocket.send(json.dumps({"input": character}))
                streamed += json.loads(websocket.recv())["outputs"]
    finally:
        code, output = server.stop()
    # uvicorn ends by re-raising SIGTERM once it has shut down cleanly (and we have saved).
    assert code in (0, -signal.SIGTERM), output
    assert f"stopped; {len(sessions)} sessions saved" in output
    assert len(list(state_dir.glob("*.safetensors"))) == len(sessions)

    server = ServerProcess(lm_run, *options)
    try:
        after = [step(server.url, session, tail) for session, tail in zip(sessions, tails)]
        after.append(step(server.url, sessions[-1], "ion"))
        before.append(streamed)
        for head, tail, got_before, got_after in zip(
            [*heads, "quest"], [*tails, "ion"], before, after
        ):
            whole = httpx.post(f"{server.url}/v1/predict", json={"input": head + tail}).json()
            for got, expected in zip(got_before + got_after, whole["outputs"], strict=True):
                assert dict(got["top"]) == pytest.approx(dict(expected["top"]), abs=1e-6)
        unknown = httpx.post(f"{server.url}/v1/sessions/{'Z' * 32}/steps", json={"input": "t"})
        assert unknown.status_code == 404
    finally:
        code, output = server.stop()
    assert code in (0, -signal.SIGTERM), output
    assert f"stopped; {len(sessions)} sessions saved" in output


def test_serve_command_refuses_runs_it_cannot_serve(tmp_path, classify_run):
    from click.testing import CliRunner

    from rnnkit.cli import main

    missing = CliRunner().invoke(main, ["serve", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    state = tmp_path / "state"
    state.mkdir()
    (state / f"{'A' * 32}.safetensors").write_bytes(b"not a session")
    refused = CliRunner().invoke(main, ["serve", str(classify_run), "--state-dir", str(state)])
    assert refused.exit_code == 2 and "is not a saved session" in refused.output
