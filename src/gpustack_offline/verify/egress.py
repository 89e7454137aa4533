"""Egress audit: every attempt a verification container makes to reach the outside, written down.

A `--internal` network already stops traffic; the audit says what was *tried*. A sinkhole
container (`sinkhole_server.py`, run by the base image's python3) joins the same network and the
target uses it as its only resolver, so every name resolves to the sinkhole and every connection
to the usual ports lands there and is recorded (DNS name, HTTP Host, TLS SNI), then refused.

The resolver is redirected by bind-mounting a generated `/etc/resolv.conf` into the target,
which replaces the one Docker writes (`nameserver 127.0.0.11`, its embedded DNS). `--dns` would
also work on Docker 20.10: its embedded DNS forwards to a server on the internal network from the
container's namespace. But engines 23.0.11, 25.0.5 and 26.0 stopped all forwarding from internal
networks (the CVE-2024-29018 fix, moby#47538) until 26.1 allowed in-network servers again
(moby#47821), and the embedded resolver would stay a second path: with a loopback resolver on the
host, 20.10 forwards from the host's namespace, i.e. out. The mounted file works on every engine
and leaves the sinkhole the only resolver the target is told about.

What the sinkhole cannot see: connections to literal addresses (the network drops those bound
outside; the bridge's gateway, the host itself, is reachable and not watched) and ports it does
not listen on (refused at once; the lookup before them is still recorded).

Docker is only touched when a sinkhole is started; summaries and allowlist checks are pure.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpustack_offline import payload
from gpustack_offline.core.docker import container
from gpustack_offline.core.files import write_text
from gpustack_offline.core.tomlfile import read_toml
from gpustack_offline.payload.sinkhole_server import DEFAULT_LOG, FIRST_BYTES_WAIT, TCP_PORTS
from gpustack_offline.verify.errors import EgressError

if TYPE_CHECKING:
    from docker.models.containers import Container

SERVER_IN_CONTAINER = "/opt/sinkhole/sinkhole_server.py"
OUTPUT_IN_CONTAINER = "/tmp/sinkhole.out"
RESOLV_CONF = "/etc/resolv.conf"
# `sh -c` only to send the server's output to a file; its argument list is passed as "$@".
REDIRECT = 'exec "$@" >' + OUTPUT_IN_CONTAINER + " 2>&1"
KINDS = ("dns", "http", "tls", "tcp")
# A connection with no name of its own (no SNI, no Host) is put down to the last name the same
# client looked up, if that was recent enough to be the lookup that led to it.
ATTRIBUTION_WINDOW = 60.0


def server_source() -> Path:
    return payload.path("sinkhole_server.py")


def resolv_conf(address: str) -> str:
    """A resolv.conf naming only the sinkhole: no search domains, so names are asked as given."""
    return f"nameserver {address}\noptions timeout:2 attempts:2\n"


@dataclass(frozen=True)
class Sinkhole:
    """A running sinkhole: its container, its address on `network`, where it writes events."""

    box: Container
    address: str
    network: str
    log: str = DEFAULT_LOG


@contextlib.contextmanager
def sinkhole(
    image: str,
    network: str,
    *,
    ports: Sequence[int] = TCP_PORTS,
    name_hint: str = "audit-sinkhole",
    ready_timeout: float = 30.0,
) -> Iterator[Sinkhole]:
    """Start a sinkhole on `network` (from `image`, which needs python3); remove it afterwards."""
    source = server_source()
    with container(
        image,
        network=network,
        mounts={source: SERVER_IN_CONTAINER},
        read_only=[SERVER_IN_CONTAINER],
        name_hint=name_hint,
    ) as box:
        address = _address(box, network)
        argv = [
            "python3", SERVER_IN_CONTAINER, "--address", address, "--log", DEFAULT_LOG,
            "--ports", ",".join(str(p) for p in ports),
        ]  # fmt: skip
        hole = Sinkhole(box, address, network)
        hole.box.exec_run(["sh", "-c", REDIRECT, "sh", *argv], detach=True)
        _wait_ready(hole, ready_timeout)
        yield hole


def _address(box: Container, network: str) -> str:
    box.reload()
    networks = box.attrs.get("NetworkSettings", {}).get("Networks", {})
    address = (networks.get(network) or {}).get("IPAddress")
    if not address:
        raise EgressError(f"the sinkhole container has no IPv4 address on network {network}")
    return str(address)


def _wait_ready(hole: Sinkhole, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for event in read_events(hole):
            if event.get("kind") == "ready":
                return
            if event.get("kind") == "error":
                raise EgressError(f"the sinkhole did not start: {event.get('error')}")
        if time.monotonic() > deadline:
            _, out = hole.box.exec_run(["cat", OUTPUT_IN_CONTAINER])
            tail = (out or b"").decode(errors="replace").strip()[-2000:]
            raise EgressError(
                f"the sinkhole did not report ready within {timeout:.0f}s; its output:\n{tail}"
            )
        time.sleep(0.2)


@contextlib.contextmanager
def resolver_mounts(hole: Sinkhole | str) -> Iterator[dict[Path, str]]:
    """Mounts for `containers.container()` that make the sinkhole a target's only resolver.

    Pass them as `mounts` and list `RESOLV_CONF` in `read_only`; the file lives until the block
    ends, so start and finish the target inside it.
    """
    address = hole.address if isinstance(hole, Sinkhole) else hole
    folder = Path(tempfile.mkdtemp(prefix="egress-resolv-"))
    try:
        conf = folder / "resolv.conf"
        conf.write_text(resolv_conf(address))
        os.chmod(conf, 0o644)  # readable by any user in the target, not only root
        yield {conf: RESOLV_CONF}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class Audit:
    """A target container under audit, and the sinkhole that answers it."""

    box: Container
    sinkhole: Sinkhole

    def report(self, settle: float = FIRST_BYTES_WAIT + 0.5) -> EgressReport:
        return summarize(collect(self.sinkhole, settle=settle))


@contextlib.contextmanager
def audited_container(
    image: str,
    *,
    network: str,
    sinkhole_image: str | None = None,
    mounts: Mapping[Path, str] | None = None,
    read_only: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    name_hint: str = "audit-target",
) -> Iterator[Audit]:
    """`containers.container()` on an internal network, with a sinkhole as its only resolver.

    The sinkhole runs from `sinkhole_image` (default: `image`, which needs python3; pass the
    host's base image to keep an arm64 target's sinkhole out of qemu). Both are removed after.
    """
    with (
        sinkhole(sinkhole_image or image, network, name_hint=f"{name_hint}-sinkhole") as hole,
        resolver_mounts(hole) as dns,
        container(
            image,
            network=network,
            mounts={**(mounts or {}), **dns},
            read_only=[*read_only, RESOLV_CONF],
            env=env,
            name_hint=name_hint,
        ) as box,
    ):
        yield Audit(box, hole)


@contextlib.contextmanager
def audited_twin(
    audit: Audit,
    image: str,
    *,
    mounts: Mapping[Path, str] | None = None,
    read_only: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    name_hint: str = "audit-twin",
) -> Iterator[Container]:
    """A second target beside `audit.box`: the same network, the same sinkhole as its only
    resolver. The sinkhole's events tell the two apart by their client address (`address_of`),
    so both can be audited at once."""
    with (
        resolver_mounts(audit.sinkhole) as dns,
        container(
            image,
            network=audit.sinkhole.network,
            mounts={**(mounts or {}), **dns},
            read_only=[*read_only, RESOLV_CONF],
            env=env,
            name_hint=name_hint,
        ) as box,
    ):
        yield box


def address_of(box: Container, network: str) -> str:
    """The container's address on `network`: the `client` of its events at the sinkhole."""
    box.reload()
    return str(box.attrs["NetworkSettings"]["Networks"][network]["IPAddress"])


def parse_events(text: str) -> list[dict[str, Any]]:
    """Events from the JSON lines file; a last line still being written is left for later."""
    complete, _, _ = text.rpartition("\n")
    events = []
    for line in complete.splitlines():
        if line.strip():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise EgressError(
                    f"the sinkhole's log has a line that is not JSON: {line!r}"
                ) from exc
    return events


def read_events(hole: Sinkhole) -> list[dict[str, Any]]:
    code, (out, err) = hole.box.exec_run(["cat", hole.log], demux=True)
    if code != 0:
        if b"No such file" in (err or b""):
            return []
        raise EgressError(f"cannot read {hole.log} in the sinkhole: {(err or b'').decode()}")
    return parse_events((out or b"").decode("utf-8", errors="replace"))


def collect(hole: Sinkhole, *, settle: float = FIRST_BYTES_WAIT + 0.5) -> list[dict[str, Any]]:
    """All events so far, after `settle` seconds for connections still being read.

    A connection that says nothing is written down only when it closes or after the sinkhole's
    first-bytes wait, so an audit that ends the moment its client gives up waits that long.
    """
    if settle > 0:
        time.sleep(settle)
    return read_events(hole)


# --- the report -------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostActivity:
    host: str
    count: int
    first: str
    last: str
    kinds: Mapping[str, int]  # dns/http/tls/tcp -> events
    ports: tuple[int, ...]  # connection ports (not 53)
    clients: tuple[str, ...]
    inferred: int = 0  # connections named after the client's last lookup (no SNI/Host of their own)
    details: tuple[str, ...] = ()  # DNS qtypes, HTTP request lines, ALPN: what a reader checks


@dataclass(frozen=True)
class EgressReport:
    hosts: Mapping[str, HostActivity]  # in order of first attempt
    events: int
    sinkhole: str | None = None
    errors: tuple[str, ...] = field(default=())

    def to_json(self) -> str:
        data = asdict(self)
        data["hosts"] = list(data["hosts"].values())
        return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _normal(host: str | None) -> str | None:
    if not host:
        return None
    host = host.strip().lower()
    if host.startswith("["):  # [v6]:port
        return host[1:].partition("]")[0] or None
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".") or None


def _detail(event: Mapping[str, Any]) -> str | None:
    kind = event.get("kind")
    if kind == "dns":
        return f"dns {event.get('qtype', '?')}"
    if kind == "http":
        return f"http {event.get('request', '')}".strip()
    if kind == "tls" and event.get("alpn"):
        return "tls alpn " + ",".join(event["alpn"])
    if kind == "tcp" and event.get("preview"):
        return f"tcp {event['preview'][:32]}"
    return None


def summarize(events: Iterable[Mapping[str, Any]]) -> EgressReport:
    """Per host: how often, when, by which kind of attempt, to which ports, from which clients."""
    ordered = sorted(events, key=lambda e: (e.get("monotonic", 0.0), e.get("time", "")))
    address = next((str(e["address"]) for e in ordered if e.get("kind") == "ready"), None)
    errors = tuple(str(e.get("error")) for e in ordered if e.get("kind") == "error")
    last_lookup: dict[str, tuple[str, float]] = {}
    groups: dict[str, list[tuple[Mapping[str, Any], bool]]] = {}
    count = 0
    for event in ordered:
        kind = event.get("kind")
        if kind not in KINDS:
            continue
        count += 1
        client = str(event.get("client", "?"))
        when = float(event.get("monotonic", 0.0))
        inferred = False
        if kind == "dns":
            host = _normal(event.get("name")) or "."
            if event.get("qtype") in ("A", "AAAA"):
                last_lookup[client] = (host, when)
        elif said := _normal(event.get("sni") if kind == "tls" else event.get("host")):
            host = said
        else:
            name, looked_up = last_lookup.get(client, ("", float("-inf")))
            inferred = bool(name) and when - looked_up <= ATTRIBUTION_WINDOW
            host = name if inferred else (address or "unknown")
        groups.setdefault(host, []).append((event, inferred))
    hosts = {}
    for host, items in groups.items():
        kinds: dict[str, int] = {}
        for event, _ in items:
            kinds[event["kind"]] = kinds.get(event["kind"], 0) + 1
        details = dict.fromkeys(d for e, _ in items if (d := _detail(e)))
        hosts[host] = HostActivity(
            host=host,
            count=len(items),
            first=str(items[0][0].get("time", "")),
            last=str(items[-1][0].get("time", "")),
            kinds=kinds,
            ports=tuple(sorted({int(e["port"]) for e, _ in items if e["kind"] != "dns"})),
            clients=tuple(sorted({str(e.get("client", "?")) for e, _ in items})),
            inferred=sum(1 for _, i in items if i),
            details=tuple(details),
        )
    return EgressReport(hosts=hosts, events=count, sinkhole=address, errors=errors)


def unexpected(report: EgressReport, allowlist: Sequence[str]) -> list[HostActivity]:
    """Hosts that match none of the fnmatch patterns (case-insensitive; `*.x` does not match x)."""
    patterns = [p.strip().lower().rstrip(".") for p in allowlist if p.strip()]
    return [
        activity
        for host, activity in report.hosts.items()
        if not any(fnmatch.fnmatchcase(host, p) for p in patterns)
    ]


def load_allowlist(path: Path, cell_id: str) -> list[str]:
    """The hosts `[[allow]]` entries of `path` grant the cell (by glob on its id); [] if none."""
    if not path.is_file():
        return []
    data = read_toml(path, EgressError)
    hosts: list[str] = []
    for i, entry in enumerate(data.get("allow", []), start=1):
        if set(entry) != {"select", "hosts", "reason"}:
            raise EgressError(
                f"{path}: [[allow]] #{i} must have exactly select, hosts and reason; "
                f"it has {sorted(entry)}"
            )
        if any(fnmatch.fnmatchcase(cell_id, s) for s in entry["select"]):
            hosts.extend(entry["hosts"])
    return hosts


def write_report(report: EgressReport, path: Path) -> None:
    write_text(path, report.to_json())
