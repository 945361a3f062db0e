"""`rnnkit serve`: a trained run served to many concurrent streams over HTTP and WebSocket.

create_app(run, options) builds the ASGI app (rnnkit.serve.app); serve(...) runs it under
uvicorn. The API is described in docs/serve.md.
"""

from __future__ import annotations

from pathlib import Path

from rnnkit.serve.adapters import InputError
from rnnkit.serve.app import ServeOptions, create_app
from rnnkit.serve.sessions import Limits

__all__ = ["Limits", "InputError", "ServeOptions", "create_app", "serve"]


def serve(
    run_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    options: ServeOptions | None = None,
    threads: int = 1,
    log_level: str = "warning",
) -> None:
    """Load the run in `run_dir` and serve it until SIGINT/SIGTERM (then save every session)."""
    import torch
    import uvicorn

    from rnnkit.train.runs import load_run

    torch.set_num_threads(threads)
    options = options or ServeOptions()
    app = create_app(load_run(run_dir), options)
    print(f"rnnkit serve: {run_dir} on http://{host}:{port}/", flush=True)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        ws_max_size=options.limits.max_message_bytes,
        # Messages are a few dozen bytes: compressing each costs more than it saves.
        ws_per_message_deflate=False,
        timeout_graceful_shutdown=30,
    )
