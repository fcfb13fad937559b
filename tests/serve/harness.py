"""A real uvicorn server on 127.0.0.1 and a free port, in a thread of the test process."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn

from shunter.model.loader import load_model
from shunter.offload import PipelineOptions, load_offloaded
from shunter.serve.scheduler import BatcherOptions, pool_columns
from shunter.serve.server import build_app


@contextmanager
def running(app) -> Iterator[str]:
    """Serve `app` until the block ends; yields its base URL (http://127.0.0.1:PORT)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@contextmanager
def served(
    model_dir: Path | str,
    options: BatcherOptions,
    memory_bytes: int | None = None,
    pipeline: PipelineOptions | None = None,
) -> Iterator[str]:
    """A server of the model at model_dir, in memory or (memory_bytes) streamed by the offload engine."""
    loaded = load_model(model_dir)
    if memory_bytes is None:
        model = loaded.model
    else:
        model = load_offloaded(
            model_dir, memory_bytes, options=pipeline or PipelineOptions(), sequences=options.max_sequences,
            max_slots=pool_columns(options.max_context),
        )  # fmt: skip
    try:
        with running(build_app(model, loaded.spec, loaded.path, options)) as url:
            yield url
    finally:
        if memory_bytes is not None:
            model.close()
