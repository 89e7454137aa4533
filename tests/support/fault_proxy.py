"""A loopback reverse proxy that breaks downloads on purpose, as real upstreams and proxies do.

`FaultProxy(upstream_url)` forwards every request to a loopback upstream (the release mirror,
the registry fixture, any file server) and answers with what came back, unless a rule says
otherwise. Rules are scripted per path pattern and per attempt (the n-th request whose path
matches the rule's pattern):

    proxy.on(r"/blobs/", Drop(after=100_000), attempts=[1])      # reset mid-body, first try
    proxy.on(r"\\.whl$", Status(503), attempts=range(1, 4))       # a burst of three 503s
    proxy.on(r"\\.whl$", Flip(at=1000))                           # wrong bytes, every time
    proxy.on(r"/blobs/", Pace(8 << 20))                           # a slow link: 8 MiB/s

Every request is recorded (method, path, Range header, whether it carried credentials, the fault
applied, the status sent), so tests can prove that a resume happened and count the faults.
Bodies are read whole from the upstream (test files are a few MB) and sent with a
Content-Length, one request per connection.
"""

from __future__ import annotations

import http.client
import http.server
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import cast

from support.loopback import LoopbackServer, Served

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}


# -- faults ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Status:
    """Answer `code` without asking the upstream (503 bursts, 429 with Retry-After)."""

    code: int
    retry_after: str | None = None


@dataclass(frozen=True)
class Drop:
    """Send the headers and `after` bytes of the body, then reset the connection."""

    after: int


@dataclass(frozen=True)
class Stall:
    """Send `after` bytes, go silent for `seconds`, then send the rest (if anyone listens)."""

    after: int
    seconds: float


@dataclass(frozen=True)
class Pace:
    """Send the body at `rate` bytes a second, as a slow link does (each request alone)."""

    rate: int


@dataclass(frozen=True)
class Flip:
    """Invert one byte of the body (at `at`, or in the middle)."""

    at: int | None = None


@dataclass(frozen=True)
class Swap:
    """A different body of the same length."""


@dataclass(frozen=True)
class IgnoreRange:
    """Drop the request's Range header: the upstream answers 200 with the whole file."""


@dataclass(frozen=True)
class WrongStart:
    """Ask the upstream for `shift` bytes before the range asked: a 206 that starts too early."""

    shift: int


@dataclass(frozen=True)
class Redirect:
    """307 to `location` (a CDN on another host, as Docker Hub sends blobs)."""

    location: str


@dataclass(frozen=True)
class Unauthorized:
    """Forward without the Authorization header: the upstream's own 401, as for an expired
    token."""


Fault = (
    Status | Drop | Stall | Pace | Flip | Swap | IgnoreRange | WrongStart | Redirect | Unauthorized
)


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    range: str | None
    authorized: bool  # an Authorization header arrived
    fault: str | None  # the fault applied, by class name
    status: int
    at: float  # time.monotonic() when the answer started


@dataclass
class _Rule:
    pattern: re.Pattern[str]
    fault: Fault
    attempts: Collection[int] | None  # None: every request
    seen: int = 0


# -- the proxy ---------------------------------------------------------------------------------


@dataclass
class FaultProxy(Served):
    """Start with `with FaultProxy(upstream) as proxy:`; `proxy.url` is its base URL."""

    upstream: str
    _rules: list[_Rule] = field(default_factory=list)
    _seen: list[Seen] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    server_name = "fault-proxy"

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        return _Handler

    def on(self, pattern: str, fault: Fault, attempts: Collection[int] | None = None) -> None:
        """Apply `fault` to the requests matching `pattern` whose 1-based number (counted per
        rule) is in `attempts` (all of them when None). The first rule that fires wins."""
        with self._lock:
            self._rules.append(_Rule(re.compile(pattern), fault, attempts))

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def seen(self) -> list[Seen]:
        with self._lock:
            return list(self._seen)

    @property
    def injected(self) -> int:
        return sum(1 for s in self.seen if s.fault)

    def _choose(self, path: str) -> Fault | None:
        with self._lock:
            chosen = None
            for rule in self._rules:
                if not rule.pattern.search(path):
                    continue
                rule.seen += 1
                if chosen is None and (rule.attempts is None or rule.seen in rule.attempts):
                    chosen = rule.fault
            return chosen

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self._seen.append(seen)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._handle()

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def _handle(self) -> None:
        self.close_connection = True
        proxy = cast("LoopbackServer[FaultProxy]", self.server).owner
        fault = proxy._choose(urllib.parse.urlsplit(self.path).path)
        asked_range = self.headers.get("Range")
        applied: Fault | None = fault
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        upstream = urllib.parse.urlsplit(proxy.upstream)
        headers["Host"] = upstream.netloc

        def record(status: int) -> None:
            proxy._record(
                Seen(
                    self.command,
                    self.path,
                    asked_range,
                    "Authorization" in self.headers,
                    type(applied).__name__ if applied is not None else None,
                    status,
                    time.monotonic(),
                )
            )

        if isinstance(fault, Status):
            extra = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            record(fault.code)
            self._send(fault.code, {"Content-Type": "text/plain", **extra}, b"injected\n")
            return
        if isinstance(fault, Redirect):
            record(307)
            self._send(307, {"Location": fault.location}, b"")
            return
        if isinstance(fault, Unauthorized):
            headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        if isinstance(fault, IgnoreRange | WrongStart):
            match = re.fullmatch(r"bytes=(\d+)-", (asked_range or "").strip())
            headers = {k: v for k, v in headers.items() if k.lower() != "range"}
            if match is None:
                applied = None
                if asked_range:
                    headers["Range"] = asked_range
            elif isinstance(fault, WrongStart):
                headers["Range"] = f"bytes={max(0, int(match.group(1)) - fault.shift)}-"

        conn = http.client.HTTPConnection(
            upstream.hostname or "127.0.0.1", upstream.port, timeout=30
        )
        try:
            conn.request(self.command, self.path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            status = resp.status
            answer = {k: v for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP}
        finally:
            conn.close()

        if self.command == "HEAD" or status >= 300:
            if isinstance(fault, Drop | Stall | Pace | Flip | Swap):
                applied = None
            record(status)
            self._send(status, answer, body, head=self.command == "HEAD")
            return
        if isinstance(fault, Flip) and body:
            at = fault.at if fault.at is not None and fault.at < len(body) else len(body) // 2
            body = body[:at] + bytes([body[at] ^ 0xFF]) + body[at + 1 :]
        elif isinstance(fault, Swap):
            body = body[1:] + body[:1]  # rotated: same length, other bytes
        record(status)
        answer = {k: v for k, v in answer.items() if k.lower() != "content-length"}
        answer["Content-Length"] = str(len(body))
        self.send_response(status)
        for name, value in answer.items():
            self.send_header(name, value)
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            if isinstance(fault, Drop):
                self.wfile.write(body[: fault.after])
                self.wfile.flush()
                self._cut()
                return
            if isinstance(fault, Stall):
                self.wfile.write(body[: fault.after])
                self.wfile.flush()
                time.sleep(fault.seconds)
                body = body[fault.after :]
            if isinstance(fault, Pace):
                self._pace(body, fault.rate)
                return
            self.wfile.write(body)
        except OSError:
            pass  # the client gave up (a stall longer than its read timeout)

    def _send(
        self, status: int, headers: dict[str, str], body: bytes, *, head: bool = False
    ) -> None:
        self.send_response(status)
        for name, value in headers.items():
            if not (head and name.lower() == "content-length"):
                self.send_header(name, value)
        if head:
            self.send_header("Content-Length", headers.get("Content-Length", str(len(body))))
        else:
            self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _pace(self, body: bytes, rate: int) -> None:
        """Write `body` in small pieces, each when a link of `rate` bytes a second would."""
        started, piece = time.monotonic(), 16 << 10
        for at in range(0, len(body), piece):
            self.wfile.write(body[at : at + piece])
            self.wfile.flush()
            ahead = started + (at + piece) / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)

    def _cut(self) -> None:
        """End the connection mid-body: the client reads fewer bytes than Content-Length."""
        self.connection.shutdown(socket.SHUT_RDWR)
        self.connection.close()
