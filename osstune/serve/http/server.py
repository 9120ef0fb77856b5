"""Running the app under uvicorn: in the foreground (`osstune serve`) or in a background thread
(tests and benchmarks, which need a live server on a free loopback port)."""

from __future__ import annotations

import socket
import threading
import time

from osstune.serve.http.app import create_app
from osstune.serve.http.context import ServerContext


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def uvicorn_server(ctx: ServerContext, host: str, port: int, log_level: str = "info", access_log: bool = False):
    import uvicorn

    config = uvicorn.Config(
        # No access log by default: a line per request costs the event loop's time under load.
        create_app(ctx), host=host, port=port, log_level=log_level, access_log=access_log,
        # Ctrl-C: stop accepting, give in-flight requests this long, then cancel them (their
        # cleanup aborts their engine requests), so nothing hangs.
        timeout_graceful_shutdown=5,
    )
    return uvicorn.Server(config)


class BackgroundServer:
    """`with BackgroundServer(ctx) as url:` a live server on a free loopback port."""

    def __init__(self, ctx: ServerContext, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.server = uvicorn_server(ctx, self.host, self.port, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, name="osstune-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
