"""What stands between the network and the endpoints: checks on every request, and limits on
every connection.

    GuardMiddleware      ASGI: the Host header (DNS rebinding), JSON-only POST bodies (CSRF),
                         and any unexpected error as a 500 without internals, the connection kept
    guarded_protocol     uvicorn's h11 protocol with a deadline for each request's headers and
                         a cap on open connections (slow or idle clients cannot exhaust sockets)

Why these: a server bound to 127.0.0.1 is still reachable from any web page the user opens.
A page can POST to it (a "simple" cross-origin request needs no preflight when its body is
text/plain, a form, or has no type), and through DNS rebinding it can even read the answers
while its own host name resolves to 127.0.0.1. Requiring ``Content-Type: application/json``
forces the browser's CORS preflight, which this server never grants; checking Host refuses
the rebound name.
"""
from __future__ import annotations

import logging

from uvicorn.protocols.http.h11_impl import H11Protocol

from tinyllm.server.errors import APIError

log = logging.getLogger("tinyllm.server")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def host_name(value: bytes) -> str:
    """The host part of a Host header value: 'example.com:8080' -> 'example.com', '[::1]:80' -> '::1'."""
    text = value.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1:text.find("]")] if "]" in text else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


class GuardMiddleware:
    """ASGI middleware; ``allowed_hosts`` None: any Host (a server bound to a public address)."""

    def __init__(self, app, allowed_hosts=LOOPBACK_HOSTS):
        self.app = app
        self.allowed_hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.allowed_hosts is not None and host_name(headers.get(b"host", b"")) not in self.allowed_hosts:
            err = APIError(403, "Host not allowed: this server answers only requests addressed to "
                                f"{', '.join(sorted(self.allowed_hosts))} (tinyllm serve --host).",
                           code="host_not_allowed")
            return await err.response()(scope, receive, send)
        if scope["method"] == "POST":
            kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if kind != b"application/json":
                err = APIError(415, "Send the request body as JSON with the header 'Content-Type: application/json'.",
                               code="unsupported_media_type")
                return await err.response()(scope, receive, send)

        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            # a bug, not bad input: logged with its traceback here, never shown to the client
            log.exception("internal error on %s %s", scope["method"], scope["path"])
            if not started:
                err = APIError(500, "Internal server error (the server log has the details).", type="server_error",
                               code="internal_error")
                await err.response()(scope, receive, send)


def guarded_protocol(header_timeout: float, max_connections: int):
    """uvicorn's h11 protocol, with a deadline for each request's headers (from the connection's
    start, or from the end of the previous response) and a cap on open connections."""

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            self._header_timer = self._waiting_for = None
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                log.debug("refusing a connection: %d open", len(self.connections))
                transport.close()
                return
            self._arm_header_deadline()

        def _arm_header_deadline(self) -> None:
            self._waiting_for = self.cycle  # a new cycle means the next request's headers arrived
            self._header_timer = self.loop.call_later(header_timeout, self._headers_too_slow)

        def _headers_too_slow(self) -> None:
            if self.cycle is self._waiting_for and not self.transport.is_closing():
                log.debug("closing a connection whose request headers took over %s s", header_timeout)
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._header_timer is not None and self.cycle is not self._waiting_for:
                self._header_timer.cancel()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._arm_header_deadline()

        def connection_lost(self, exc) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

    return GuardedH11Protocol
