"""Running the app under uvicorn: in the foreground (`osstune serve`) or in a background thread
(tests and benchmarks, which need a live server on a free loopback port)."""

from __future__ import annotations

import errno
import socket
import threading
import time

from osstune.serve.http.app import create_app
from osstune.serve.http.context import ServerContext


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one), for uvicorn to serve on. Bound here,
    before a model loads for minutes, so a port in use or a host this machine does not have is a
    ValueError that says so at once; the socket is kept until uvicorn takes it, so no other process
    can take the port in between."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise ValueError(f"--host {host}: cannot listen there ({e.strerror or e})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        hint = "; pick another --port or stop what listens there" if e.errno == errno.EADDRINUSE else ""
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}") from None
    sock.set_inheritable(True)
    return sock


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

    def __init__(self, ctx: ServerContext, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.socket = listen(host, port)
        self.port = self.socket.getsockname()[1]
        self.server = uvicorn_server(ctx, self.host, self.port, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, name="osstune-http", daemon=True)

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
        self.socket.close()
