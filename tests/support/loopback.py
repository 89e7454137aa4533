"""One loopback HTTP server for every stand-in: a ThreadingHTTPServer on 127.0.0.1 at a free
port, served from a daemon thread, stopped (shutdown, close, join) by `stop()` or on leaving a
`with` block. The stand-ins (release mirror, fault proxy, token server, one-off indexes) differ
only in their handler and in the object the handler reads (`owner`); a stand-in that is such an
object derives from `Served`, which starts and stops its server."""

from __future__ import annotations

import http.server
import logging
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar, Generic, Self, TypeVar

log = logging.getLogger("gpustack_offline.tests.loopback")
RANGE = re.compile(r"bytes=(\d+)-(\d*)")

Owner = TypeVar("Owner")


class LoopbackServer(http.server.ThreadingHTTPServer, Generic[Owner]):
    """`handler` answers requests; it reaches the stand-in through `self.server.owner` (cast
    to `LoopbackServer[TheStandIn]`). Errors a client causes by hanging up mid-answer are
    logged at debug level, not printed: clients that give up are what several stand-ins test."""

    daemon_threads = True

    def __init__(
        self,
        handler: type[http.server.BaseHTTPRequestHandler],
        owner: Owner,
        *,
        name: str = "loopback",
        poll_interval: float = 0.05,
    ) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.owner = owner
        self.name = name
        self._poll_interval = poll_interval
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        """http://127.0.0.1:PORT, no trailing slash."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LoopbackServer[Owner]:
        if self._thread is not None:
            raise RuntimeError(f"{self.name} is already started")
        self._thread = threading.Thread(
            target=self.serve_forever,
            kwargs={"poll_interval": self._poll_interval},
            name=self.name,
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket; safe to call twice."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()

    def __enter__(self) -> LoopbackServer[Owner]:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def handle_error(self, request: object, client_address: object) -> None:
        log.debug("%s: error serving %s", self.name, client_address, exc_info=True)


class Served:
    """A stand-in served by a LoopbackServer of its `handler` (the owner the handler reads is
    the stand-in): `with TheStandIn(...) as it:`, or start()/stop(); `served_url` once started.
    `handler` is a method so that the handler class may be defined below the stand-in."""

    server_name: ClassVar[str] = "loopback"
    _server: LoopbackServer[Any] | None = None

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        raise NotImplementedError

    @property
    def served_url(self) -> str:
        """http://127.0.0.1:PORT of the started stand-in."""
        if self._server is None:
            raise RuntimeError(f"the {self.server_name} stand-in is not started")
        return self._server.url

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError(f"the {self.server_name} stand-in is not started")
        return self._server.port

    def start(self) -> Self:
        if self._server is not None:
            raise RuntimeError(f"the {self.server_name} stand-in is already started")
        self._server = LoopbackServer(self.handler(), self, name=self.server_name).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class FileHandler(http.server.BaseHTTPRequestHandler):
    """A quiet handler whose GET and HEAD go to `handle_request`, with the answers a file host
    gives: `send` (a body with its length; none for HEAD) and `send_file` (the Range header's
    part with 206, 416 past the end)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.handle_request()

    def do_HEAD(self) -> None:  # noqa: N802
        self.handle_request()

    def handle_request(self) -> None:
        raise NotImplementedError

    def send(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def send_file(self, data: bytes, headers: Mapping[str, str]) -> None:
        """`data` (with `headers` and Accept-Ranges), or the part the Range header asks."""
        answer = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes", **headers}
        status, body = 200, data
        asked = self.headers.get("Range")
        if asked and (match := RANGE.fullmatch(asked.strip())):
            start = int(match[1])
            end = int(match[2]) if match[2] else len(data) - 1
            if start >= len(data):
                self.send(416, {"Content-Range": f"bytes */{len(data)}"}, b"")
                return
            end = min(end, len(data) - 1)
            status, body = 206, data[start : end + 1]
            answer["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        self.send(status, answer, body)


@contextmanager
def serving(
    handler: type[http.server.BaseHTTPRequestHandler], name: str = "loopback"
) -> Iterator[str]:
    """A started server for `handler` alone; yields its base URL (http://127.0.0.1:PORT)."""
    with LoopbackServer(handler, None, name=name) as server:
        yield server.url
