"""The egress audit: the sinkhole's parsers, the report, and a real audit on an internal network.

Unit tests use bytes a real client makes (a ClientHello from `ssl`, DNS messages laid out as a
resolver sends them) and need no sockets. The integration tests start a sinkhole and a target
from the amd64 base image on a `--internal` Docker network and make real attempts from inside.
"""

from __future__ import annotations

import ipaddress
import json
import ssl
import struct

import pytest

from gpustack_offline.payload.sinkhole_server import (
    DnsFormatError,
    NeedMore,
    build_answer,
    classify,
    error_answer,
    parse_client_hello,
    parse_http_request,
    parse_query,
)
from gpustack_offline.verify import egress

SINKHOLE = "172.18.0.2"


def client_hello(server_hostname: str | None, alpn: list[str] | None = None) -> bytes:
    """The first bytes a Python TLS client sends, made in memory."""
    context = ssl.create_default_context()
    if server_hostname is None:
        context.check_hostname = False
    if alpn:
        context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def refragment(record: bytes, cut: int) -> bytes:
    """The same handshake split over two TLS records, as large ClientHellos are."""
    header, body = record[:5], record[5:]
    first, second = body[:cut], body[cut:]
    return (
        header[:3] + struct.pack("!H", len(first)) + first
        + header[:3] + struct.pack("!H", len(second)) + second
    )  # fmt: skip


def dns_query(name: str, qtype: int = 1, ident: int = 0x4A2F, edns: bool = True) -> bytes:
    """A query as glibc sends it: RD set, one question, an EDNS OPT record when asked."""
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".")) + b"\0"
    header = struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 1 if edns else 0)
    opt = b"\0" + struct.pack("!HHIH", 41, 1232, 0, 0) if edns else b""
    return header + qname + struct.pack("!HH", qtype, 1) + opt


def answer_records(reply: bytes, question_end: int) -> list[tuple[int, int, bytes]]:
    """(type, ttl, rdata) of each answer record in a reply whose names are 2-byte pointers."""
    ancount = struct.unpack("!H", reply[6:8])[0]
    records, pos = [], question_end
    for _ in range(ancount):
        assert reply[pos] & 0xC0 == 0xC0  # a pointer to the question's name
        rtype, _, ttl, rdlength = struct.unpack("!HHIH", reply[pos + 2 : pos + 12])
        records.append((rtype, ttl, reply[pos + 12 : pos + 12 + rdlength]))
        pos += 12 + rdlength
    assert pos == len(reply)
    return records


# --- TLS --------------------------------------------------------------------------------------


def test_sni_and_alpn_are_read_from_a_real_client_hello():
    hello = parse_client_hello(client_hello("huggingface.co", ["h2", "http/1.1"]))
    assert hello.sni == "huggingface.co"
    assert hello.alpn == ("h2", "http/1.1")


def test_sni_is_found_when_the_client_hello_spans_two_records():
    data = client_hello("Files.PythonHosted.org")
    assert parse_client_hello(refragment(data, 40)).sni == "files.pythonhosted.org"


def test_a_cut_short_client_hello_asks_for_more_bytes():
    data = client_hello("github.com")
    for cut in (1, 5, 60, len(data) - 1):
        with pytest.raises(NeedMore):
            parse_client_hello(data[:cut])


def test_a_client_hello_without_sni_has_no_name():
    assert parse_client_hello(client_hello(None)).sni is None


def test_first_bytes_are_classified_as_tls_http_or_plain_tcp():
    data = client_hello("pypi.org")
    assert classify(data[:30]) == ("tcp", {}, False)  # wait for the rest
    kind, fields, done = classify(data)
    assert (kind, fields["sni"], done) == ("tls", "pypi.org", True)
    assert classify(data[:30], final=True)[0:2] == ("tls", {"sni": None, "incomplete": True})
    assert classify(b"SSH-2.0-OpenSSH_9.2p1\r\n") == ("tcp", {}, True)
    assert classify(b"GET /x HTTP/1.1\r\nHo") == ("tcp", {}, False)
    kind, fields, done = classify(b"GET /x HTTP/1.1\r\nHost: example.com\r\n\r\n")
    assert (kind, fields, done) == (
        "http",
        {"request": "GET /x HTTP/1.1", "host": "example.com"},
        True,
    )


# --- HTTP -------------------------------------------------------------------------------------


def test_http_request_line_and_host_header_are_read():
    request = b"POST /api HTTP/1.1\r\nUser-Agent: x\r\nhost: Example.COM:8080\r\n\r\nbody"
    assert parse_http_request(request) == ("POST /api HTTP/1.1", "Example.COM:8080")
    assert parse_http_request(b"GET / HTTP/1.0\r\n\r\n") == ("GET / HTTP/1.0", None)
    with pytest.raises(NeedMore):
        parse_http_request(b"GET / HTTP/1.1\r\nHost: a\r\n")


# --- DNS --------------------------------------------------------------------------------------


def test_an_a_query_is_answered_with_the_sinkhole_address():
    data = dns_query("HuggingFace.co.")
    query = parse_query(data)
    assert (query.name, query.qtype_name, query.id) == ("huggingface.co", "A", 0x4A2F)
    reply = build_answer(query, SINKHOLE)
    ident, flags, qd, an, ns, ar = struct.unpack("!HHHHHH", reply[:12])
    assert ident == 0x4A2F
    assert flags & 0x8000 and flags & 0x0100 and flags & 0x0080  # response, RD echoed, RA
    assert flags & 0x000F == 0  # NOERROR
    assert (qd, an, ns, ar) == (1, 1, 0, 0)
    question_end = 12 + len(query.question)
    assert reply[12:question_end] == data[12:question_end]  # the question, echoed as asked
    [(rtype, ttl, rdata)] = answer_records(reply, question_end)
    assert rtype == 1 and 0 < ttl <= 60
    assert str(ipaddress.IPv4Address(rdata)) == SINKHOLE


@pytest.mark.parametrize("qtype", [28, 65, 15, 16, 12])  # AAAA, HTTPS, MX, TXT, PTR
def test_other_queries_get_an_empty_noerror_answer(qtype):
    reply = build_answer(parse_query(dns_query("pypi.org", qtype)), SINKHOLE)
    flags, qd, an = struct.unpack("!HHH", reply[2:8])
    assert flags & 0x8000 and flags & 0x000F == 0
    assert (qd, an) == (1, 0)


def test_compressed_names_are_followed_and_pointer_loops_refused():
    # the question's name is "www" plus a pointer to "example.com", placed after the question
    header = struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0)
    question = b"\x03www\xc0\x16" + struct.pack("!HH", 1, 1)  # 0x16: just past the question
    data = header + question + b"\x07example\x03com\x00"
    query = parse_query(data)
    assert query.name == "www.example.com" and query.question == question
    with pytest.raises(DnsFormatError):
        parse_query(header + b"\xc0\x0c" + struct.pack("!HH", 1, 1))  # a pointer to itself


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00" * 11, b"\x12\x34\x81\x80" + b"\x00" * 8, dns_query("a.b")[:16]],
    ids=["empty", "short", "a-response", "truncated"],
)
def test_malformed_messages_are_refused_not_guessed(data):
    with pytest.raises(DnsFormatError):
        parse_query(data)


def test_an_unreadable_question_gets_formerr_with_its_id():
    reply = error_answer(b"\xbe\xef\x01\x00" + b"\x00" * 8 + b"\x05ab")
    assert reply is not None and reply[:2] == b"\xbe\xef"
    assert struct.unpack("!H", reply[2:4])[0] & 0x000F == 1
    assert error_answer(b"\x01") is None


# --- the report -------------------------------------------------------------------------------


def event(kind: str, mono: float, **fields):
    stamp = f"2025-01-01T00:00:{mono:09.6f}Z"
    return {"kind": kind, "time": stamp, "monotonic": mono, "client": "172.18.0.3", **fields}


EVENTS = [
    {"kind": "ready", "time": "2025-01-01T00:00:00Z", "monotonic": 0.0, "address": SINKHOLE},
    event("dns", 1.0, name="huggingface.co", qtype="A", port=53),
    event("dns", 1.1, name="huggingface.co", qtype="AAAA", port=53),
    event("tls", 1.2, sni="huggingface.co", port=443, alpn=["http/1.1"]),
    event("dns", 2.0, name="example.com", qtype="A", port=53),
    event("http", 2.1, host="Example.com:80", request="GET /x HTTP/1.1", port=80),
    event("dns", 3.0, name="github.com", qtype="A", port=53),
    event("tcp", 3.1, port=22, preview=""),
    event("tcp", 500.0, port=21, preview=""),  # long after any lookup: no name to give it
]


def test_the_report_groups_attempts_by_host_with_kinds_ports_and_times():
    report = egress.summarize(EVENTS)
    assert report.sinkhole == SINKHOLE and report.events == 8
    assert list(report.hosts) == ["huggingface.co", "example.com", "github.com", SINKHOLE]
    hf = report.hosts["huggingface.co"]
    assert (hf.count, dict(hf.kinds), hf.ports) == (3, {"dns": 2, "tls": 1}, (443,))
    assert hf.first.endswith("01.000000Z") and hf.last.endswith("01.200000Z")
    assert hf.clients == ("172.18.0.3",) and hf.inferred == 0
    assert "tls alpn http/1.1" in hf.details
    web = report.hosts["example.com"]
    assert (dict(web.kinds), web.ports) == ({"dns": 1, "http": 1}, (80,))
    assert "http GET /x HTTP/1.1" in web.details


def test_a_bare_connection_is_named_after_the_lookup_that_led_to_it():
    report = egress.summarize(EVENTS)
    gh = report.hosts["github.com"]
    assert (dict(gh.kinds), gh.ports, gh.inferred) == ({"dns": 1, "tcp": 1}, (22,), 1)
    bare = report.hosts[SINKHOLE]
    assert (dict(bare.kinds), bare.ports, bare.inferred) == ({"tcp": 1}, (21,), 0)


def test_the_report_is_the_same_whatever_order_events_were_written_in():
    assert egress.summarize(reversed(EVENTS)) == egress.summarize(EVENTS)


def test_the_allowlist_names_every_host_it_does_not_match():
    report = egress.summarize(EVENTS)
    names = [a.host for a in egress.unexpected(report, ["*.co", "EXAMPLE.com."])]
    assert names == ["github.com", SINKHOLE]
    assert egress.unexpected(report, ["*"]) == []
    # `*.github.com` is a subdomain pattern: the bare domain needs its own entry
    assert "github.com" in [a.host for a in egress.unexpected(report, ["*.github.com"])]


def test_the_report_is_written_as_json(tmp_path):
    path = tmp_path / "egress.json"
    egress.write_report(egress.summarize(EVENTS), path)
    data = json.loads(path.read_text())
    assert data["sinkhole"] == SINKHOLE
    assert [h["host"] for h in data["hosts"]][:3] == ["huggingface.co", "example.com", "github.com"]


def test_events_are_read_up_to_the_last_complete_line():
    text = "".join(json.dumps(e) + "\n" for e in EVENTS[:3]) + '{"kind": "dn'
    assert egress.parse_events(text) == EVENTS[:3]
    with pytest.raises(egress.EgressError):
        egress.parse_events("not json\n")


def test_the_target_resolv_conf_names_only_the_sinkhole():
    lines = egress.resolv_conf(SINKHOLE).splitlines()
    assert [line for line in lines if line.startswith("nameserver")] == [f"nameserver {SINKHOLE}"]
    assert not any(line.startswith(("search", "domain")) for line in lines)


# --- a real audit -----------------------------------------------------------------------------

ATTEMPTS = r"""
import json, socket, urllib.error, urllib.request
out = {}
out["resolved"] = sorted({a[4][0] for a in socket.getaddrinfo("huggingface.co", 443)})
for key, url in (("https", "https://huggingface.co/api/models"), ("http", "http://example.com/x")):
    try:
        urllib.request.urlopen(url, timeout=10)
        out[key] = "answered"
    except urllib.error.HTTPError as exc:
        out[key] = exc.code
    except Exception as exc:
        out[key] = type(exc).__name__
socket.create_connection(("github.com", 22), timeout=10).close()
out["ssh"] = "connected"
print(json.dumps(out))
"""

# Outside addresses, without DNS, and DNS servers other than the sinkhole (Docker's embedded one
# included): each must give no connection and no address.
NOTHING_REAL = r"""
import json, socket, struct
from concurrent.futures import ThreadPoolExecutor
QUERY = struct.pack("!6H", 0x1234, 0x0100, 1, 0, 0, 0) + b"\x04pypi\x03org\x00\x00\x01\x00\x01"
def connect(address):
    socket.create_connection(address, timeout=3).close()
    return "connected"
def ask(server):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(3)
    sock.sendto(QUERY, (server, 53))
    return "answers: %d" % struct.unpack("!H", sock.recv(512)[6:8])[0]
def attempt(job):
    try:
        return job[0](job[1])
    except OSError as exc:
        return type(exc).__name__
jobs = {
    "cloudflare-https": (connect, ("1.1.1.1", 443)),
    "google-dns-tcp": (connect, ("8.8.8.8", 53)),
    "docker-embedded-dns": (ask, "127.0.0.11"),
    "google-dns": (ask, "8.8.8.8"),
}
with ThreadPoolExecutor(len(jobs)) as pool:
    print(json.dumps(dict(zip(jobs, pool.map(attempt, jobs.values())))))
"""


@pytest.fixture(scope="module")
def audit(root):
    from gpustack_offline.cli import commands
    from gpustack_offline.core import docker as containers

    ctx = commands.Context.load(root)
    image = containers.base_image("amd64", ctx.cache, ctx.opts.debian_mirror)
    network = containers.internal_network()
    with egress.audited_container(image, network=network, name_hint="audit-target") as audit:
        yield audit


def run_in(audit, script: str) -> dict:
    from gpustack_offline.core.docker import exec_in

    code, output = exec_in(audit.box, ["python3", "-c", script])
    assert code == 0, output
    return json.loads(output.strip().splitlines()[-1])


@pytest.mark.integration
def test_every_outside_attempt_lands_in_the_sinkhole_and_is_reported(audit):
    code, conf = audit.box.exec_run(["cat", "/etc/resolv.conf"])
    assert code == 0 and conf.decode() == egress.resolv_conf(audit.sinkhole.address)

    out = run_in(audit, ATTEMPTS)
    assert out["resolved"] == [audit.sinkhole.address]
    assert out["https"] != "answered" and out["http"] == 503  # refused at once, no hang
    assert out["ssh"] == "connected"

    report = audit.report()
    assert report.sinkhole == audit.sinkhole.address and report.errors == ()
    assert set(report.hosts) == {"huggingface.co", "example.com", "github.com"}
    hf, web, gh = (report.hosts[h] for h in ("huggingface.co", "example.com", "github.com"))
    assert set(hf.kinds) == {"dns", "tls"} and hf.kinds["tls"] == 1 and hf.ports == (443,)
    assert set(web.kinds) == {"dns", "http"} and web.kinds["http"] == 1 and web.ports == (80,)
    assert "http GET /x HTTP/1.1" in web.details
    assert set(gh.kinds) == {"dns", "tcp"} and gh.kinds["tcp"] == 1 and gh.ports == (22,)
    assert gh.inferred == 1
    assert all(a.clients == (hf.clients[0],) for a in report.hosts.values())
    assert hf.clients[0] != audit.sinkhole.address

    assert egress.unexpected(report, ["huggingface.co", "example.com", "github.com"]) == []
    flagged = egress.unexpected(report, ["*.huggingface.co", "huggingface.co"])
    assert [a.host for a in flagged] == ["example.com", "github.com"]


@pytest.mark.integration
def test_the_target_reaches_nothing_real_past_the_sinkhole(audit):
    out = run_in(audit, NOTHING_REAL)
    assert not any(v == "connected" for v in out.values()), out
    assert not any(str(v).startswith("answers:") and v != "answers: 0" for v in out.values()), out


@pytest.mark.integration
def test_a_sinkhole_that_cannot_listen_says_why(audit):
    image = audit.box.image.tags[0]
    network = audit.sinkhole.network
    with (
        pytest.raises(egress.EgressError, match="cannot listen"),  # 53/tcp is the DNS listener
        egress.sinkhole(image, network, ports=[53], name_hint="audit-bad"),
    ):
        pass
