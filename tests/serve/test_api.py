"""The HTTP and WebSocket API through the test client: wire format, outputs, errors, auth, limits."""

import time

import pytest
import torch
from serve_helpers import client_for
from starlette.testclient import WebSocketDenialResponse

from rnnkit.train.runs import load_run

TOLERANCE = 1e-6


def full_top(run_dir):
    """A client whose LM entries list every character (top-k = the whole vocabulary)."""
    return client_for(run_dir, top_k=1000)


def lm_reference(run_dir, text: str) -> list[dict[str, float]]:
    """The model over the whole text at once: per step, {character: probability}."""
    run = load_run(run_dir)
    vocab = run.state["vocab"]["tokens"]
    ids = torch.tensor([[vocab.index(c) + 2 for c in text]])
    with torch.no_grad():
        probabilities = torch.softmax(run.model(ids)[0][0], dim=-1)
    return [dict(zip(vocab, row[2:].tolist())) for row in probabilities]


def as_dicts(outputs: list[dict]) -> list[dict[str, float]]:
    return [dict((name, p) for name, p in entry["top"]) for entry in outputs]


def assert_same_distributions(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for row, reference in zip(got, expected):
        assert row.keys() == reference.keys()
        for name, p in reference.items():
            assert row[name] == pytest.approx(p, abs=TOLERANCE)


def assert_outputs_close(got: list[dict], expected: list[dict]) -> None:
    """Same entries; probabilities equal to float32 rounding (one-step and chunk paths)."""
    assert len(got) == len(expected)
    for entry, reference in zip(got, expected):
        assert [name for name, _ in entry["top"]] == [name for name, _ in reference["top"]]
        assert [p for _, p in entry["top"]] == pytest.approx(
            [p for _, p in reference["top"]], abs=TOLERANCE
        )


def open_session(client, **headers) -> str:
    response = client.post("/v1/sessions", headers=headers)
    assert response.status_code == 201, response.text
    (session_id,) = response.json().values()
    return session_id


def test_model_route_says_what_is_served_and_the_state_size(lm_run):
    with client_for(lm_run) as client:
        info = client.get("/v1/model").json()
        health = client.get("/v1/health").json()
    assert info["task"] == "lm" and info["model"] == "LanguageModel" and info["input"] == "text"
    # An LSTM of hidden size 16: h and c, float32.
    assert info["state"] == {"numbers_per_session": 32, "bytes_per_session": 128}
    assert info["limits"]["max_sessions"] == 1000
    assert health["status"] == "ok" and health["sessions"] == 0


@pytest.mark.parametrize("run_name", ["lm_run", "gru_lm_run"])
def test_lm_steps_in_chunks_equal_the_whole_sequence_at_once(run_name, request):
    run_dir = request.getfixturevalue(run_name)
    text = "to be or not to be, that"
    with full_top(run_dir) as client:
        session = open_session(client)
        outputs = []
        for chunk in ["t", "o be", " ", "or not to be,", " that"]:
            response = client.post(f"/v1/sessions/{session}/steps", json={"input": chunk})
            assert response.status_code == 200
            outputs += response.json()["outputs"]
        predicted = client.post("/v1/predict", json={"input": text}).json()["outputs"]
    expected = lm_reference(run_dir, text)
    assert_same_distributions(as_dicts(outputs), expected)
    assert_same_distributions(as_dicts(predicted), expected)


def test_lm_entries_hold_the_top_k_characters_likeliest_first(lm_run):
    with client_for(lm_run, top_k=3) as client:
        session = open_session(client)
        (entry,) = client.post(f"/v1/sessions/{session}/steps", json={"input": "t"}).json()[
            "outputs"
        ]
    reference = lm_reference(lm_run, "t")[0]
    best = sorted(reference, key=reference.get, reverse=True)[:3]
    assert [name for name, _ in entry["top"]] == best
    assert [p for _, p in entry["top"]] == pytest.approx([reference[n] for n in best], abs=1e-6)


def test_websocket_streams_the_same_outputs_as_the_whole_sequence(lm_run):
    text = "not to be"
    with full_top(lm_run) as client:
        session = open_session(client)
        outputs = []
        with client.websocket_connect(f"/v1/sessions/{session}/stream") as socket:
            for character in text:
                socket.send_json({"input": character})
                answer = socket.receive_json()
                assert len(answer["outputs"]) == 1
                outputs += answer["outputs"]
    assert_same_distributions(as_dicts(outputs), lm_reference(lm_run, text))


def test_reset_starts_the_stream_anew_and_delete_forgets_the_session(lm_run):
    with full_top(lm_run) as client:
        session = open_session(client)
        first = client.post(f"/v1/sessions/{session}/steps", json={"input": "to"}).json()
        assert client.post(f"/v1/sessions/{session}/reset").status_code == 200
        again = client.post(f"/v1/sessions/{session}/steps", json={"input": "to"}).json()
        assert again == first
        with client.websocket_connect(f"/v1/sessions/{session}/stream") as socket:
            socket.send_json({"reset": True})
            assert socket.receive_json() == {"reset": True}
            socket.send_json({"input": "to"})
            assert socket.receive_json() == first
        assert client.delete(f"/v1/sessions/{session}").json() == {"closed": True}
        gone = client.post(f"/v1/sessions/{session}/steps", json={"input": "t"})
        assert gone.status_code == 404 and "no such session" in gone.json()["error"]
        assert client.delete(f"/v1/sessions/{session}").status_code == 404


def test_classifier_gives_running_probabilities_of_each_prefix(classify_run):
    run = load_run(classify_run)
    text = "catdog"
    with client_for(classify_run) as client:
        session = open_session(client)
        outputs = []
        for chunk in ["ca", "t", "dog"]:
            outputs += client.post(f"/v1/sessions/{session}/steps", json={"input": chunk}).json()[
                "outputs"
            ]
    assert len(outputs) == len(text)
    vocab = run.state["vocab"]["tokens"]
    for k, entry in enumerate(outputs):
        ids = torch.tensor([[vocab.index(c) + 2 for c in text[: k + 1]]])
        with torch.no_grad():
            expected = torch.softmax(run.model(ids)[0], dim=-1).tolist()
        assert list(entry["probs"]) == ["bird", "cat", "dog"]
        assert list(entry["probs"].values()) == pytest.approx(expected, abs=TOLERANCE)


def test_forecaster_gives_the_next_value_once_a_window_is_read(forecast_run):
    run = load_run(forecast_run)
    values = [0.1 * t + 0.5 * (t % 3) for t in range(14)]
    with client_for(forecast_run) as client:
        session = open_session(client)
        outputs = []
        for start in range(0, len(values), 4):
            chunk = values[start : start + 4]
            outputs += client.post(f"/v1/sessions/{session}/steps", json={"input": chunk}).json()[
                "outputs"
            ]
        info = client.get("/v1/model").json()
    window = run.model.config.window
    assert info["needs"] == window
    assert [entry["next"] for entry in outputs[: window - 1]] == [None] * (window - 1)
    series = torch.tensor(values).view(1, -1, 1)
    for t in range(window - 1, len(values)):
        with torch.no_grad():
            expected = run.model(series[:, t - window + 1 : t + 1])[0, 0, 0].item()
        assert outputs[t]["next"] == pytest.approx(expected, abs=1e-5)


def test_tagger_tags_each_token_as_the_whole_sentence_would(tag_run):
    from rnnkit.train.tag import TokenEncoder

    run = load_run(tag_run)
    encoder = TokenEncoder.from_dict(run.state)
    with client_for(tag_run) as client:
        info = client.get("/v1/model").json()
        session = open_session(client)
        outputs = []
        for chunk in ["The cat", "sat on the mat.", "The dog sat"]:  # "dog": an unknown word
            outputs += client.post(f"/v1/sessions/{session}/steps", json={"input": chunk}).json()[
                "outputs"
            ]
    tokens = ["The", "cat", "sat", "on", "the", "mat", ".", "The", "dog", "sat"]
    assert info["task"] == "tag" and info["tags"] == ["DET", "NOUN", "VERB"]
    assert [entry["token"] for entry in outputs] == tokens
    inputs = torch.from_numpy(encoder.encode(tokens)).unsqueeze(0)
    expected = run.model.tag(inputs)[0].tolist()
    assert [entry["tag"] for entry in outputs] == [encoder.tags[i] for i in expected]
    assert len(set(expected)) > 1  # the check can tell tags apart


# -- bad input ------------------------------------------------------------------------------------
BAD_LM_BODIES = [
    (b"{not json", 400, "not valid JSON"),
    (b'{"input": "\xff\xfe"}', 400, "not valid UTF-8"),
    (b'["t"]', 400, "JSON object"),
    (b'{"text": "t"}', 400, 'must be {"input": ...}'),
    (b'{"input": "t", "extra": 1}', 400, 'must be {"input": ...}'),
    (b'{"input": 3}', 400, "must be a string"),
    (b'{"input": ["t"]}', 400, "must be a string"),
    (b'{"input": ""}', 400, "must not be empty"),
    (b'{"input": "tz"}', 400, "character 'z' at position 1 is not in the model's vocabulary"),
]


@pytest.mark.parametrize("body, status, message", BAD_LM_BODIES)
def test_bad_input_gets_a_json_error_and_the_session_carries_on(lm_run, body, status, message):
    with client_for(lm_run) as client:
        session = open_session(client)
        before = client.post(f"/v1/sessions/{session}/steps", json={"input": "to"}).json()
        response = client.post(f"/v1/sessions/{session}/steps", content=body)
        assert response.status_code == status
        assert message in response.json()["error"]
        predict = client.post("/v1/predict", content=body)
        assert predict.status_code == status and message in predict.json()["error"]
        after = client.post(f"/v1/sessions/{session}/steps", json={"input": " b"}).json()
        whole = client.post("/v1/predict", json={"input": "to b"}).json()
    assert_outputs_close(before["outputs"] + after["outputs"], whole["outputs"])


@pytest.mark.parametrize(
    "value, message",
    [
        ("1 2 3", "non-empty list of numbers"),
        ([], "non-empty list of numbers"),
        ([1.0, "x"], '"input"[1] must be a number'),
        ([1.0, [2.0, 3.0]], '"input"[1] must be a number'),
        ([True], '"input"[0] must be a number'),
    ],
)
def test_forecaster_refuses_input_of_the_wrong_type(forecast_run, value, message):
    with client_for(forecast_run) as client:
        session = open_session(client)
        response = client.post(f"/v1/sessions/{session}/steps", json={"input": value})
        assert response.status_code == 400 and message in response.json()["error"]
        not_finite = client.post(f"/v1/sessions/{session}/steps", content=b'{"input": [NaN]}')
        assert not_finite.status_code == 400
        assert (
            client.post(f"/v1/sessions/{session}/steps", json={"input": [1.0]}).status_code == 200
        )


def test_bad_socket_messages_get_an_error_and_the_socket_carries_on(lm_run):
    with client_for(lm_run, max_message_bytes=200) as client:
        session = open_session(client)
        with client.websocket_connect(f"/v1/sessions/{session}/stream") as socket:
            for message, expected in [
                ("{oops", "not valid JSON"),
                ('{"input": "q!"}', "not in the model's vocabulary"),
                ('{"input": 5}', "must be a string"),
                ('{"input": "' + "t" * 300 + '"}', "message too large"),
            ]:
                socket.send_text(message)
                answer = socket.receive_json()
                assert expected in answer["error"]
                assert answer["status"] in (400, 413)
            socket.send_bytes(b'{"input": "\xc3"}')
            assert "not valid UTF-8" in socket.receive_json()["error"]
            socket.send_bytes(b'{"input": "to"}')
            streamed = socket.receive_json()
        whole = client.post("/v1/predict", json={"input": "to"}).json()
    assert_outputs_close(streamed["outputs"], whole["outputs"])


def test_unknown_or_malformed_session_ids_get_404(lm_run):
    with client_for(lm_run) as client:
        open_session(client)
        for session in ["A" * 32, "x", "A" * 31 + "."]:
            response = client.post(f"/v1/sessions/{session}/steps", json={"input": "t"})
            assert response.status_code == 404
            assert "no such session" in response.json()["error"]
        traversal = client.post("/v1/sessions/../../etc/passwd/steps", json={"input": "t"})
        assert traversal.status_code == 404 and "error" in traversal.json()
        assert client.post(f"/v1/sessions/{'B' * 32}/reset").status_code == 404
        with pytest.raises(WebSocketDenialResponse) as denied:
            with client.websocket_connect(f"/v1/sessions/{'C' * 32}/stream"):
                pass
        assert denied.value.status_code == 404
        assert client.get("/v1/nothing-here").json() == {"error": "Not Found"}


# -- limits ---------------------------------------------------------------------------------------
def test_limits_on_sessions_message_size_and_chunk_length(lm_run):
    with client_for(lm_run, max_sessions=2, max_message_bytes=100, max_chunk=5) as client:
        first, _ = open_session(client), open_session(client)
        full = client.post("/v1/sessions")
        assert full.status_code == 429 and "at most 2" in full.json()["error"]
        large = client.post(f"/v1/sessions/{first}/steps", json={"input": "t" * 200})
        assert large.status_code == 413 and "too large" in large.json()["error"]
        long = client.post(f"/v1/sessions/{first}/steps", json={"input": "to be "})
        assert long.status_code == 413 and "at most 5 steps" in long.json()["error"]
        assert client.post("/v1/predict", json={"input": "to be "}).status_code == 413
        client.delete(f"/v1/sessions/{first}")
        assert client.post("/v1/sessions").status_code == 201


def test_sessions_expire_after_their_lifetime(lm_run):
    with client_for(lm_run, session_lifetime_s=0.3) as client:
        session = open_session(client)
        assert client.post(f"/v1/sessions/{session}/steps", json={"input": "t"}).status_code == 200
        time.sleep(0.4)
        expired = client.post(f"/v1/sessions/{session}/steps", json={"input": "t"})
        assert expired.status_code == 404
        deadline = time.monotonic() + 5
        while client.get("/v1/health").json()["sessions"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/v1/health").json()["sessions"] == 0


def test_session_ids_are_unguessable_and_never_repeat(lm_run):
    with client_for(lm_run) as client:
        ids = {open_session(client) for _ in range(50)}
    assert len(ids) == 50
    assert all(len(i) == 32 for i in ids)  # 24 random bytes, URL-safe base64


# -- the token ------------------------------------------------------------------------------------
def test_token_is_required_on_every_api_route_and_the_socket(lm_run):
    token = "s3cret-token"
    good = {"Authorization": f"Bearer {token}"}
    with client_for(lm_run, token=token) as client:
        session = open_session(client, **good)
        routes = [
            ("GET", "/v1/model"),
            ("GET", "/v1/health"),
            ("POST", "/v1/sessions"),
            ("POST", f"/v1/sessions/{session}/steps"),
            ("POST", f"/v1/sessions/{session}/reset"),
            ("POST", "/v1/predict"),
            ("DELETE", f"/v1/sessions/{session}"),
        ]
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}):
                response = client.request(method, path, json={"input": "t"}, headers=headers)
                assert response.status_code == 401, (method, path, headers)
                assert "token" in response.json()["error"]
        with pytest.raises(WebSocketDenialResponse) as denied:
            with client.websocket_connect(f"/v1/sessions/{session}/stream"):
                pass
        assert denied.value.status_code == 401
        with client.websocket_connect(f"/v1/sessions/{session}/stream", headers=good) as socket:
            socket.send_json({"input": "t"})
            assert "outputs" in socket.receive_json()
        # A browser cannot set the header on a socket: the subprotocol carries the token.
        protocol = [f"bearer.{token}"]
        with client.websocket_connect(
            f"/v1/sessions/{session}/stream", subprotocols=protocol
        ) as socket:
            socket.send_json({"input": "o"})
            assert "outputs" in socket.receive_json()
        assert client.post(f"/v1/sessions/{session}/steps", json={"input": "t"}, headers=good)
        assert client.get("/").status_code == 200  # the page itself carries no data
