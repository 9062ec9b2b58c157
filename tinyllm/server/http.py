"""Running the app on uvicorn with the connection limits of guards.py and a shutdown that
ends open streams with an error event (Ctrl-C / SIGTERM) instead of cancelling them."""
from __future__ import annotations

import socket

import uvicorn

from tinyllm.errors import TinyLLMError
from tinyllm.server.guards import guarded_protocol

DEFAULT_MAX_CONNECTIONS = 128


class _Server(uvicorn.Server):
    def __init__(self, config, on_exit):
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        self._on_exit()  # streams end with an error event before uvicorn waits for them
        super().handle_exit(sig, frame)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, or a clear error (address in use, no such address) before anything starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise TinyLLMError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve_app(app, sock: socket.socket, timeout: float, max_connections: int = DEFAULT_MAX_CONNECTIONS,
              log_level: str = "info") -> None:
    """Serve ``app`` on ``sock`` until Ctrl-C/SIGTERM. ``timeout``: seconds a client may take to
    send a request's headers (and, in the app, its body); ``max_connections``: open connections
    at most (more are closed on arrival) and requests in flight at most (more get 503)."""
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=3,
                            http=guarded_protocol(timeout, max_connections), limit_concurrency=max_connections)
    try:
        _Server(config, app.state.service.begin_shutdown).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down for
        pass
