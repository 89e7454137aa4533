"""A sinkhole that answers every attempt to reach the outside, and writes each one down.

It runs inside a container from the base image (Python 3.11, standard library only) on the same
`--internal` network as the container under audit, which uses it as its only resolver. Every DNS
name resolves to the sinkhole itself, so whatever the target then tries to reach lands here: the
usual TCP ports accept, note who asked for what (HTTP request line and Host header, TLS SNI from
the ClientHello — no TLS is terminated, nothing is forwarded) and close. HTTP gets a 503 so that
clients fail at once instead of waiting out a timeout.

Events are JSON lines appended to one file, flushed per event, and echoed to stdout. The parsing
functions are pure so the host-side tests prove them without sockets.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import ipaddress
import json
import os
import socket
import socketserver
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO, Any

DNS_PORT = 53
# Web, TLS, the alternates proxies and dev servers use, SSH/FTP (git and mirrors), a forward proxy,
# registries (5000), object stores (9000) and model servers (11434: Ollama).
TCP_PORTS = (21, 22, 80, 443, 3128, 5000, 8000, 8080, 8443, 9000, 11434)
DEFAULT_LOG = "/tmp/egress.jsonl"
TTL = 5  # short: an answer from the sinkhole should not outlive the audit in any cache
FIRST_BYTES_WAIT = 2.0  # a client that says nothing first (FTP, or a bare connect) is let go
READ_LIMIT = 64 * 1024
PREVIEW = 64
HTTP_METHODS = (
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE",
)  # fmt: skip
HTTP_BODY = b"egress blocked: this network has no route out (gpustack-offline sinkhole)\n"

QTYPES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA",
          33: "SRV", 64: "SVCB", 65: "HTTPS", 255: "ANY"}  # fmt: skip
QTYPE_A = 1
QCLASS_IN = 1
RCODE_FORMERR = 1
RCODE_NOTIMP = 4


class DnsFormatError(ValueError):
    """A DNS message that cannot be parsed."""


class NeedMore(ValueError):
    """The bytes so far are a valid prefix; read more before deciding."""


# --- DNS --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DnsQuery:
    id: int
    flags: int
    name: str  # lower case, no trailing dot; "" for the root
    qtype: int
    qclass: int
    question: bytes  # the question section exactly as received, echoed in the answer

    @property
    def opcode(self) -> int:
        return (self.flags >> 11) & 0xF

    @property
    def qtype_name(self) -> str:
        return QTYPES.get(self.qtype, str(self.qtype))


def _read_name(data: bytes, offset: int) -> tuple[str, int]:
    """Decode a (possibly compressed) name; return it and the offset just past it in place."""
    labels: list[str] = []
    end: int | None = None
    jumps = 0
    while True:
        if offset >= len(data):
            raise DnsFormatError("name runs past the end of the message")
        length = data[offset]
        if length & 0xC0 == 0xC0:
            if offset + 1 >= len(data):
                raise DnsFormatError("truncated compression pointer")
            if end is None:
                end = offset + 2
            jumps += 1
            if jumps > 32:
                raise DnsFormatError("compression loop")
            offset = ((length & 0x3F) << 8) | data[offset + 1]
            continue
        if length & 0xC0:
            raise DnsFormatError(f"unsupported label type {length:#x}")
        offset += 1
        if length == 0:
            break
        label = data[offset : offset + length]
        if len(label) != length:
            raise DnsFormatError("label runs past the end of the message")
        labels.append(label.decode("ascii", errors="backslashreplace"))
        offset += length
    return ".".join(labels).lower(), end if end is not None else offset


def parse_query(data: bytes) -> DnsQuery:
    """The first question of a DNS query message (header, then QNAME/QTYPE/QCLASS)."""
    if len(data) < 12:
        raise DnsFormatError("shorter than a DNS header")
    ident, flags, qdcount = struct.unpack("!HHH", data[:6])
    if flags & 0x8000:
        raise DnsFormatError("a response, not a query")
    if qdcount < 1:
        raise DnsFormatError("no question")
    name, offset = _read_name(data, 12)
    if offset + 4 > len(data):
        raise DnsFormatError("question runs past the end of the message")
    qtype, qclass = struct.unpack("!HH", data[offset : offset + 4])
    return DnsQuery(ident, flags, name, qtype, qclass, data[12 : offset + 4])


def _header(query_id: int, query_flags: int, rcode: int, qdcount: int, ancount: int) -> bytes:
    # QR=1, opcode and RD echoed, AA=1 (we are the authority for everything), RA=1
    flags = 0x8000 | (query_flags & 0x7800) | 0x0400 | (query_flags & 0x0100) | 0x0080 | rcode
    return struct.pack("!HHHHHH", query_id, flags, qdcount, ancount, 0, 0)


def build_answer(query: DnsQuery, address: str) -> bytes:
    """The sinkhole's answer: A → `address`, anything else → an empty NOERROR answer."""
    if query.opcode != 0:
        return _header(query.id, query.flags, RCODE_NOTIMP, 1, 0) + query.question
    if query.qtype == QTYPE_A and query.qclass == QCLASS_IN:
        record = b"\xc0\x0c" + struct.pack("!HHIH", QTYPE_A, QCLASS_IN, TTL, 4)
        record += ipaddress.IPv4Address(address).packed
        return _header(query.id, query.flags, 0, 1, 1) + query.question + record
    return _header(query.id, query.flags, 0, 1, 0) + query.question


def error_answer(data: bytes, rcode: int = RCODE_FORMERR) -> bytes | None:
    """A bare error reply for a message whose header can be read; None if not even that."""
    if len(data) < 12:
        return None
    ident, flags = struct.unpack("!HH", data[:4])
    return _header(ident, flags, rcode, 0, 0)


# --- TLS --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientHello:
    sni: str | None
    alpn: tuple[str, ...]
    version: str  # the record's legacy version, e.g. "3.1"


def _handshake(data: bytes) -> tuple[bytes, str]:
    """The first handshake message, reassembled from as many TLS records as it spans."""
    body = b""
    offset = 0
    version = ""
    while True:
        if len(data) < offset + 5:
            raise NeedMore("TLS record header")
        ctype, major, minor, length = struct.unpack("!BBBH", data[offset : offset + 5])
        if ctype != 0x16:
            raise ValueError(f"TLS record type {ctype}, not a handshake")
        version = version or f"{major}.{minor}"
        fragment = data[offset + 5 : offset + 5 + length]
        if len(fragment) < length:
            raise NeedMore("TLS record body")
        body += fragment
        offset += 5 + length
        if len(body) >= 4:
            needed = 4 + int.from_bytes(body[1:4], "big")
            if len(body) >= needed:
                return body[:needed], version


def parse_client_hello(data: bytes) -> ClientHello:
    """SNI and ALPN from the start of a TLS connection. NeedMore if it is cut short."""
    message, version = _handshake(data)
    if message[0] != 0x01:
        raise ValueError(f"handshake type {message[0]}, not a ClientHello")
    pos = 4 + 2 + 32  # type+length, client_version, random
    try:
        pos += 1 + message[pos]  # session id
        pos += 2 + int.from_bytes(message[pos : pos + 2], "big")  # cipher suites
        pos += 1 + message[pos]  # compression methods
    except IndexError:
        raise ValueError("ClientHello is malformed") from None
    sni: str | None = None
    alpn: list[str] = []
    if pos + 2 <= len(message):
        end = min(len(message), pos + 2 + int.from_bytes(message[pos : pos + 2], "big"))
        pos += 2
        while pos + 4 <= end:
            ext_type, ext_len = struct.unpack("!HH", message[pos : pos + 4])
            ext = message[pos + 4 : pos + 4 + ext_len]
            pos += 4 + ext_len
            if ext_type == 0 and len(ext) >= 5 and ext[2] == 0:  # server_name, host_name
                name_len = int.from_bytes(ext[3:5], "big")
                sni = ext[5 : 5 + name_len].decode("ascii", errors="backslashreplace").lower()
            elif ext_type == 16 and len(ext) >= 2:  # application_layer_protocol_negotiation
                i = 2
                while i < len(ext):
                    alpn.append(ext[i + 1 : i + 1 + ext[i]].decode("ascii", errors="replace"))
                    i += 1 + ext[i]
    return ClientHello(sni, tuple(alpn), version)


# --- HTTP -------------------------------------------------------------------------------------


def looks_like_http(data: bytes) -> bool:
    token = data.split(b" ", 1)[0]
    if token in HTTP_METHODS:
        return True
    return len(data) < 8 and any(m.startswith(data) for m in HTTP_METHODS)


def parse_http_request(data: bytes) -> tuple[str, str | None]:
    """The request line and the Host header (None if absent). NeedMore until the header ends."""
    head, sep, _ = data.partition(b"\r\n\r\n")
    if not sep:
        head, sep, _ = data.partition(b"\n\n")
    if not sep:
        raise NeedMore("HTTP header")
    lines = head.decode("latin-1").replace("\r\n", "\n").split("\n")
    host = None
    for line in lines[1:]:
        key, colon, value = line.partition(":")
        if colon and key.strip().lower() == "host":
            host = value.strip()
            break
    return lines[0].strip(), host


def http_503() -> bytes:
    return (
        b"HTTP/1.1 503 Service Unavailable\r\n"
        b"Content-Type: text/plain\r\n"
        + f"Content-Length: {len(HTTP_BODY)}\r\n".encode()
        + b"Connection: close\r\n\r\n"
        + HTTP_BODY
    )


def preview(data: bytes) -> str:
    return data[:PREVIEW].decode("latin-1").encode("unicode_escape").decode("ascii")


# --- the servers ------------------------------------------------------------------------------


def now() -> tuple[str, float]:
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds")
    return stamp.replace("+00:00", "Z"), time.monotonic()


class EventLog:
    """Appends one JSON object per line, flushed per event, and echoes it to stdout."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def write(self, event: dict[str, Any]) -> None:
        line = json.dumps(event, sort_keys=True)
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()
            print(line, flush=True)


class _Server(socketserver.ThreadingMixIn):
    daemon_threads = True
    allow_reuse_address = True
    events: EventLog
    address: str


class UdpServer(_Server, socketserver.UDPServer):
    pass


class TcpServer(_Server, socketserver.TCPServer):
    request_queue_size = 64


def _dns_event(query: DnsQuery | None, client: tuple[str, int], transport: str) -> dict[str, Any]:
    stamp, mono = now()
    event: dict[str, Any] = {
        "kind": "dns", "time": stamp, "monotonic": mono, "client": client[0],
        "client_port": client[1], "port": DNS_PORT, "transport": transport,
    }  # fmt: skip
    if query is not None:
        event.update(name=query.name, qtype=query.qtype_name)
    return event


def answer_dns(data: bytes, address: str) -> tuple[DnsQuery | None, bytes | None]:
    try:
        query = parse_query(data)
    except DnsFormatError:
        return None, error_answer(data)
    return query, build_answer(query, address)


class UdpDns(socketserver.BaseRequestHandler):
    server: UdpServer

    def handle(self) -> None:
        data, sock = self.request
        query, reply = answer_dns(data, self.server.address)
        event = _dns_event(query, self.client_address, "udp")
        if query is not None and query.qtype == QTYPE_A:
            event["answer"] = self.server.address
        self.server.events.write(event)
        if reply:
            sock.sendto(reply, self.client_address)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


class TcpDns(socketserver.BaseRequestHandler):
    server: TcpServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(10)
        with contextlib.suppress(OSError, EOFError):
            while True:
                (length,) = struct.unpack("!H", _recv_exact(sock, 2))
                data = _recv_exact(sock, length)
                query, reply = answer_dns(data, self.server.address)
                event = _dns_event(query, self.client_address, "tcp")
                if query is not None and query.qtype == QTYPE_A:
                    event["answer"] = self.server.address
                self.server.events.write(event)
                if reply is None:
                    return
                sock.sendall(struct.pack("!H", len(reply)) + reply)


class Catch(socketserver.BaseRequestHandler):
    """One connection on a usual port: read what the client says first, note it, close."""

    server: TcpServer

    def handle(self) -> None:
        stamp, mono = now()
        sock: socket.socket = self.request
        port = sock.getsockname()[1]
        event: dict[str, Any] = {
            "kind": "tcp", "time": stamp, "monotonic": mono, "client": self.client_address[0],
            "client_port": self.client_address[1], "port": port,
        }  # fmt: skip
        data = b""
        deadline = time.monotonic() + FIRST_BYTES_WAIT
        reply = b""
        try:
            while len(data) < READ_LIMIT:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                sock.settimeout(left)
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
                kind, fields, done = classify(data)
                if done:
                    event.update(kind=kind, **fields)
                    reply = http_503() if kind == "http" else b""
                    break
        except OSError:
            pass
        if event["kind"] == "tcp" and data:
            kind, fields, _ = classify(data, final=True)
            event.update(kind=kind, **fields)
        event["bytes"] = len(data)
        if event["kind"] == "tcp":
            event["preview"] = preview(data)
        self.server.events.write(event)
        with contextlib.suppress(OSError):
            if reply:
                sock.settimeout(2)
                sock.sendall(reply)
            sock.shutdown(socket.SHUT_RDWR)


def classify(data: bytes, final: bool = False) -> tuple[str, dict[str, Any], bool]:
    """(kind, fields, decided) for what a client sent first: tls, http or plain tcp."""
    if data[:1] == b"\x16":
        try:
            hello = parse_client_hello(data)
        except NeedMore:
            return ("tls", {"sni": None, "incomplete": True}, True) if final else ("tcp", {}, False)
        except ValueError:
            return "tcp", {}, True
        return "tls", {"sni": hello.sni, "alpn": list(hello.alpn), "tls": hello.version}, True
    if looks_like_http(data):
        try:
            request, host = parse_http_request(data)
        except NeedMore:
            if not final:
                return "tcp", {}, False
            request, host = data.split(b"\r\n", 1)[0].decode("latin-1"), None
        return "http", {"request": request, "host": host}, True
    return "tcp", {}, True


def own_address() -> str:
    """This container's IPv4 address on its network, as /etc/hosts names it for our hostname."""
    hostname = socket.gethostname()
    with contextlib.suppress(OSError), open("/etc/hosts") as hosts:
        for line in hosts:
            fields = line.split("#", 1)[0].split()
            if len(fields) > 1 and hostname in fields[1:]:
                with contextlib.suppress(ValueError):
                    if not ipaddress.IPv4Address(fields[0]).is_loopback:
                        return fields[0]
    return socket.gethostbyname(hostname)


def serve(address: str, log_path: str, ports: tuple[int, ...]) -> None:
    stream = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the process
    events = EventLog(stream)
    servers: list[UdpServer | TcpServer] = []
    try:
        servers.append(UdpServer(("0.0.0.0", DNS_PORT), UdpDns))
        servers.append(TcpServer(("0.0.0.0", DNS_PORT), TcpDns))
        servers.extend(TcpServer(("0.0.0.0", port), Catch) for port in ports)
    except OSError as exc:
        events.write({"kind": "error", "time": now()[0], "error": f"cannot listen: {exc}"})
        raise SystemExit(1) from exc
    for server in servers:
        server.events, server.address = events, address
        threading.Thread(target=server.serve_forever, daemon=True).start()
    stamp, mono = now()
    ready = {"kind": "ready", "time": stamp, "monotonic": mono, "address": address}
    events.write({**ready, "ports": [DNS_PORT, *ports], "pid": os.getpid()})
    threading.Event().wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--address", help="IPv4 address every A query gets (default: our own)")
    parser.add_argument("--log", default=DEFAULT_LOG, help="JSON lines file events go to")
    parser.add_argument(
        "--ports", default=",".join(map(str, TCP_PORTS)), help="comma-separated TCP ports"
    )
    args = parser.parse_args(argv)
    address = args.address or own_address()
    ipaddress.IPv4Address(address)
    ports = tuple(int(p) for p in args.ports.split(",") if p.strip())
    serve(address, args.log, ports)
    return 0


if __name__ == "__main__":
    sys.exit(main())
