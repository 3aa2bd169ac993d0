"""uvicorn's h11 protocol with a deadline for request headers, against slow-header
(slowloris) clients.

uvicorn has no timer before a connection's first request, and it cancels its keep-alive timer
on any byte received: a client that sends a header byte now and then holds a connection, and
a file descriptor, for as long as it likes. Here a connection that waits for request headers
always has a deadline: `header_timeout` seconds from the connection's opening for its first
request, and from the first byte of each later request on a keep-alive connection. An idle
keep-alive connection (no byte of a next request yet) stays under uvicorn's own keep-alive
timeout.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import h11
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

log = logging.getLogger("loraplex.server")


class HeaderTimeoutProtocol(H11Protocol):
    """H11Protocol that closes a connection whose request headers are not complete in time.
    Pass `HeaderTimeoutProtocol.with_timeout(seconds)` as `uvicorn.Config(http=...)`."""

    header_timeout: float  # seconds; set on the class by `with_timeout`

    @classmethod
    def with_timeout(cls, header_timeout: float) -> type[HeaderTimeoutProtocol]:
        """This protocol with its deadline. A class, because uvicorn builds each connection's
        protocol from a class and its own Config, which has no field for the deadline."""
        assert header_timeout > 0, header_timeout
        return type(cls.__name__, (cls,), {"header_timeout": header_timeout})

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch_headers()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request h11 cannot parse (a Content-Length that is not a
        number, a malformed request line), in OpenAI's error shape like every other error."""
        body = json.dumps({"error": {"message": msg, "type": "invalid_request_error",
                                     "param": None, "code": "invalid_http_request"}}).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
                   (b"content-length", str(len(body)).encode())]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                      h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def _watch_headers(self) -> None:
        """Keep a deadline running while the client owes request headers (h11's IDLE: no
        complete request yet in this cycle); none once they are in, or the connection fails."""
        if self.conn.their_state is not h11.IDLE:
            self._stop_timer()
        elif self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _stop_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        # No 408: there is no request yet to answer, and a slow client is not worth a write
        # (uvicorn's keep-alive timeout closes the same way).
        log.debug("closing %s: no complete request headers within %gs", self.client,
                  self.header_timeout)
        self.conn.send(h11.ConnectionClosed())
        self.transport.close()
