"""Putting a server together from a session, and running it with uvicorn (in the foreground for
`arx serve`, in a thread for tests and the load-test script)."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path

from arx.errors import ArxError
from arx.serve.api import Server, create_app
from arx.serve.metrics import Metrics
from arx.serve.scheduler import DEFAULT_CHUNK, DEFAULT_IDLE_CHUNK, Scheduler


def make_server(session, bundle: str | Path, *, max_batch: int, chunk: int = DEFAULT_CHUNK,
                idle_chunk: int = DEFAULT_IDLE_CHUNK, max_queue: int | None = None,
                model: str | None = None) -> Server:
    """A Server over `session` with its scheduler started (close it with server.scheduler.close())."""
    from arx.serve.chat import ChatTemplate, load_template

    bundle, m = Path(bundle), session.manifest
    tokenizer, chat, missing = None, None, "this bundle has no tokenizer"
    if m.tokenizer.file:
        from arx.runtime.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_bundle(bundle, m.tokenizer)
        template = load_template(bundle)
        chat = ChatTemplate(template, tokenizer) if template else None
        missing = "this bundle's tokenizer has no chat template (chat_template.jinja)"
    metrics = Metrics()
    scheduler = Scheduler(session, max_batch, chunk=chunk, idle_chunk=idle_chunk, max_queue=max_queue,
                          tokenizer=tokenizer, metrics=metrics)
    return Server(scheduler.start(), model or bundle.name.removesuffix(".arx"), m.generation,
                  metrics, tokenizer, chat, missing)


def _uvicorn(server: Server, host: str, port: int):
    import uvicorn

    config = uvicorn.Config(create_app(server), host=host, port=port, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def serve_forever(server: Server, host: str, port: int) -> None:
    """Until Ctrl-C (uvicorn shuts down gracefully, then re-raises it)."""
    try:
        _uvicorn(server, host, port).run()
    finally:
        server.scheduler.close()


def check_address(host: str, port: int) -> None:
    """Refuse an address in use in one line, before uvicorn logs a traceback-like error."""
    import socket

    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(info[0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            s.bind(info[4])
    except OSError as e:
        raise ArxError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another "
                       f"--port, or a --host of this machine") from None


@contextmanager
def background(server: Server, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0):
    """Serve in a thread; yields the base URL (port 0: a free one); stops the server after."""
    http = _uvicorn(server, host, port)
    thread = threading.Thread(target=http.run, name="arx-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not http.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = http.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        http.should_exit = True
        thread.join(timeout)
        server.scheduler.close()
