"""The HTTP and WebSocket API over a trained run: routes, wire format, errors, the token.

Every answer is JSON; an error is {"error": message} with 400 (bad input), 401 (missing or
wrong token), 404 (unknown session), 413 (too large), 429 (too many sessions) or 503 (shutting
down). With a token, every /v1 route needs `Authorization: Bearer TOKEN`; a browser's WebSocket
cannot send that header, so the socket also takes the token as the subprotocol `bearer.TOKEN`.
The page at / and its script carry no data and are served without the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from rnnkit.serve.adapters import Adapter, InputError, make_adapter
from rnnkit.serve.batcher import Batcher, StateTable
from rnnkit.serve.persist import SessionStore
from rnnkit.serve.sessions import Limits, SessionError, SessionTable

STATIC = Path(__file__).resolve().parent / "static"
# WebSocket close codes: 4000 + the HTTP status that would have answered the same request.
CLOSE_UNKNOWN_SESSION = 4404
CLOSE_UNAUTHORIZED = 4401


@dataclass
class ServeOptions:
    """How the server batches, saves and limits, besides the run it serves."""

    limits: Limits = field(default_factory=Limits)
    token: str | None = None
    state_dir: str | Path | None = None
    max_batch: int = 64
    max_wait_ms: float = 2.0
    top_k: int = 5


class Server:
    """What the routes share: the adapter, the state table, the batcher and the sessions."""

    def __init__(self, run, options: ServeOptions) -> None:
        self.run = run
        self.options = options
        self.limits = options.limits
        self.adapter: Adapter = make_adapter(run, options.top_k)
        self.table = StateTable(self.adapter)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rnnkit-model")
        self.store = (
            SessionStore(options.state_dir, self.adapter.fingerprint)
            if options.state_dir is not None
            else None
        )
        if self.store is not None:
            self.store.scan()  # a state dir of another model is refused before serving
        self.batcher: Batcher | None = None
        self.sessions: SessionTable | None = None

    async def start(self) -> None:
        self.batcher = Batcher(
            self.adapter,
            self.table,
            self.executor,
            self.options.max_batch,
            self.options.max_wait_ms,
        )
        self.batcher.start()
        self.sessions = SessionTable(
            self.table, self.batcher, self.executor, self.limits, self.store
        )

    async def stop(self) -> int:
        """Finish the steps in flight and save every session; how many sessions were saved."""
        saved = await self.sessions.shutdown()
        await self.batcher.stop()
        self.executor.shutdown(wait=True)
        return saved

    def model_info(self) -> dict[str, Any]:
        limits = self.limits
        return {
            **self.adapter.describe(),
            "run": self.run.run_dir.name,
            "state": {
                "numbers_per_session": self.table.state_numbers,
                "bytes_per_session": self.table.state_bytes,
            },
            "top_k": getattr(self.adapter, "top_k", None),
            "limits": {
                "max_sessions": limits.max_sessions,
                "max_chunk": limits.max_chunk,
                "max_message_bytes": limits.max_message_bytes,
                "session_lifetime_s": limits.session_lifetime_s,
            },
            "batching": {
                "max_batch": self.options.max_batch,
                "max_wait_ms": self.options.max_wait_ms,
            },
            "persistence": {
                "state_dir": self.store is not None,
                "persist_every": limits.persist_every,
                "idle_seconds": limits.idle_seconds,
            },
        }

    def predict(self, chunk: torch.Tensor, tokens: list[str] | None) -> list[dict]:
        """On the model thread: a whole input from the initial state -> one entry per step."""
        with torch.inference_mode():
            inputs = self.adapter.collate([chunk])
            outputs, _ = self.adapter.step(inputs, self.adapter.initial_state(1))
            return self.adapter.entries(outputs, [tokens])[0]


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def parse_message(raw: bytes | str, limit: int) -> dict[str, Any]:
    """A request body or socket message -> its JSON object; InputError (400/413) otherwise."""
    if len(raw) > limit:
        raise InputError(f"message too large: at most {limit} bytes, got {len(raw)}", 413)
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise InputError(
                f"message is not valid UTF-8 ({error.reason} at byte {error.start})"
            ) from None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as error:
        raise InputError(
            f"message is not valid JSON ({error.msg} at line {error.lineno} column {error.colno})"
        ) from None
    if not isinstance(value, dict):
        raise InputError('message must be a JSON object such as {"input": ...}')
    return value


def _input_of(message: dict[str, Any]) -> Any:
    unknown = sorted(set(message) - {"input"})
    if "input" not in message or unknown:
        raise InputError(f'message must be {{"input": ...}}, got keys {sorted(message)}')
    return message["input"]


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise InputError(f"message too large: at most {limit} bytes, got {declared}", 413)
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise InputError(f"message too large: at most {limit} bytes", 413)
    return bytes(body)


def _token_matches(expected: str, given: str | None) -> bool:
    return given is not None and secrets.compare_digest(given.encode(), expected.encode())


def _bearer(header: str | None) -> str | None:
    if header is None or not header.startswith("Bearer "):
        return None
    return header[len("Bearer ") :].strip()


def create_app(run, options: ServeOptions | None = None) -> FastAPI:
    """The ASGI app serving a loaded run (rnnkit.train.runs.load_run)."""
    options = options or ServeOptions()
    server = Server(run, options)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        await server.start()
        sweeper = asyncio.get_running_loop().create_task(_sweep(server))
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            saved = await server.stop()
            if server.store is not None:
                print(f"rnnkit serve: stopped; {saved} sessions saved in {server.store.directory}")

    app = FastAPI(title="rnnkit serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    limit = options.limits.max_message_bytes

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return _error(error.status_code, str(error.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        return _error(400, str(error))

    @app.exception_handler(InputError)
    async def input_error(_: Request, error: InputError) -> JSONResponse:
        return _error(error.status, str(error))

    @app.exception_handler(SessionError)
    async def session_error(_: Request, error: SessionError) -> JSONResponse:
        return _error(error.status, str(error))

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        if options.token is not None and request.url.path.startswith("/v1"):
            if not _token_matches(options.token, _bearer(request.headers.get("authorization"))):
                return _error(401, "missing or wrong token (send Authorization: Bearer TOKEN)")
        return await call_next(request)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        sessions = server.sessions
        return {
            "status": "ok" if sessions.accepting else "stopping",
            "sessions": len(sessions.sessions),
            "in_memory": sessions.in_memory,
            "batching": server.batcher.stats.as_dict(),
        }

    @app.get("/v1/model")
    async def model() -> dict[str, Any]:
        return server.model_info()

    @app.post("/v1/sessions", status_code=201)
    async def open_session() -> dict[str, str]:
        session = await server.sessions.open()
        return {"id": session.id}

    @app.post("/v1/sessions/{session_id}/steps")
    async def steps(session_id: str, request: Request) -> dict[str, Any]:
        session = server.sessions.get(session_id)
        value = _input_of(parse_message(await _read_body(request, limit), limit))
        chunk, tokens = server.adapter.encode(value)
        return {"outputs": await server.sessions.step(session, chunk, tokens)}

    @app.post("/v1/sessions/{session_id}/reset")
    async def reset(session_id: str) -> dict[str, Any]:
        session = server.sessions.get(session_id)
        await server.sessions.reset(session)
        return {"id": session.id, "steps": 0}

    @app.delete("/v1/sessions/{session_id}")
    async def close(session_id: str) -> dict[str, Any]:
        await server.sessions.close(server.sessions.get(session_id))
        return {"closed": True}

    @app.post("/v1/predict")
    async def predict(request: Request) -> dict[str, Any]:
        server.sessions._check_accepting()
        value = _input_of(parse_message(await _read_body(request, limit), limit))
        chunk, tokens = server.adapter.encode(value)
        if chunk.size(0) > options.limits.max_chunk:
            raise InputError(
                f'"input" must hold at most {options.limits.max_chunk} steps, got {chunk.size(0)}',
                413,
            )
        loop = asyncio.get_running_loop()
        return {
            "outputs": await loop.run_in_executor(server.executor, server.predict, chunk, tokens)
        }

    @app.websocket("/v1/sessions/{session_id}/stream")
    async def stream(websocket: WebSocket, session_id: str) -> None:
        subprotocol = None
        if options.token is not None:
            offered = [
                p.strip()
                for p in websocket.headers.get("sec-websocket-protocol", "").split(",")
                if p.strip()
            ]
            tokens = [p[len("bearer.") :] for p in offered if p.startswith("bearer.")]
            given = _bearer(websocket.headers.get("authorization"))
            if _token_matches(options.token, given):
                pass
            elif tokens and _token_matches(options.token, tokens[0]):
                subprotocol = f"bearer.{tokens[0]}"
            else:
                await _deny(websocket, 401, "missing or wrong token", CLOSE_UNAUTHORIZED)
                return
        try:
            session = server.sessions.get(session_id)
        except SessionError as error:
            await _deny(websocket, error.status, str(error), CLOSE_UNKNOWN_SESSION)
            return
        await websocket.accept(subprotocol=subprotocol)
        await _serve_socket(websocket, server, session, limit)

    return app


async def _deny(websocket: WebSocket, status: int, message: str, code: int) -> None:
    """Refuse a socket: an HTTP answer if the server can send one, else accept-error-close."""
    try:
        await websocket.send_denial_response(_error(status, message))
    except RuntimeError:
        await websocket.accept()
        await websocket.send_text(json.dumps({"error": message, "status": status}))
        await websocket.close(code)


async def _serve_socket(websocket: WebSocket, server: Server, session, limit: int) -> None:
    """Each message {"input": ...} -> {"outputs": [...]}; {"reset": true} -> {"reset": true}."""
    while True:
        try:
            message = await websocket.receive()
        except WebSocketDisconnect:
            return
        if message["type"] == "websocket.disconnect":
            return
        raw = message.get("text")
        if raw is None:
            raw = message.get("bytes") or b""
        try:
            value = parse_message(raw, limit)
            if value == {"reset": True}:
                await server.sessions.reset(session)
                answer: dict[str, Any] = {"reset": True}
            else:
                chunk, tokens = server.adapter.encode(_input_of(value))
                answer = {"outputs": await server.sessions.step(session, chunk, tokens)}
        except InputError as error:
            answer = {"error": str(error), "status": error.status}
        except SessionError as error:
            await websocket.send_text(json.dumps({"error": str(error), "status": error.status}))
            await websocket.close(1012 if error.status == 503 else 4000 + error.status)
            return
        try:
            await websocket.send_text(json.dumps(answer))
        except (WebSocketDisconnect, RuntimeError):
            return


async def _sweep(server: Server) -> None:
    """Evict idle sessions and close expired ones, every few seconds."""
    limits = server.limits
    period = max(0.05, min(5.0, limits.idle_seconds / 2, limits.session_lifetime_s / 2))
    while True:
        await asyncio.sleep(period)
        await server.sessions.sweep()
