"""Verification of a docker bundle, as a site uses it: load it, run it offline, push it, run again.

The build host's own Docker Engine plays the target's. The cell's images must be absent from it
first (a bundle that "loads" an image already there proves nothing); `install.sh` then loads the
bundle's tar, and the image runs on the `--internal` network with nothing pulled, twice, as
the pip path's starts are audited: once as upstream's `docker run` line starts it, once with the
`docker.env` that install.sh wrote; each must answer `/healthz` (server and worker) from inside,
and the second must reach no outside host beyond the cell's allowlist. Then the same bundle is
pushed with `install.sh --registry` into a loopback distribution registry (the site's
registry), the local copies are removed, and the image pulled from that registry must run and
answer again. Everything it adds is removed.

A GPUStack 2.x bundle (`verify_docker2`) is pushed into the site registry by `install.sh
--registry`; every image the server and worker will ask for must resolve there, and the server
pulled from there is started once, as the operator is told to start it (install.sh's
`server.args` and `docker.env`), with the same audit: its first start, an admin login and
`SETTLE` seconds more must reach no outside host beyond the cell's allowlist.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests

from gpustack_offline.core.docker import (
    client,
    exec_in,
    has_image,
    internal_network,
    pull,
    remove_images,
)
from gpustack_offline.core.downloads import BlobStore
from gpustack_offline.core.errors import CommandError, VerifyError
from gpustack_offline.core.matrix import Cell
from gpustack_offline.core.processes import run
from gpustack_offline.stages import runners
from gpustack_offline.stages.registry import Registry, RegistryError
from gpustack_offline.verify import egress, standins
from gpustack_offline.verify.common import (
    AUDIT_LOG,
    SETTLE,
    WORKER_PORT,
    AuditedRun,
    Report,
    Step,
    audit_hook,
    egress_step,
    egress_summary,
    failure,
    log_in,
    wait_healthz,
)

if TYPE_CHECKING:
    from docker import DockerClient
    from docker.models.containers import Container

IMAGE_PORT = 80  # upstream's images run `gpustack start`, which listens on 80 by default
# GPUStack 2.x: the API server's port (`api_port`); with the embedded gateway it binds 127.0.0.1,
# so the probe runs inside the container, as for 0.x
API_PORT_2X = 30080
SITE_PREFIX = "site/mirror"  # 2.x cells are pushed under a registry prefix, as sites mirror
DATA_DIR = "/var/lib/gpustack"  # the images' default data directory
PASSWORD_FILE = f"{DATA_DIR}/initial_admin_password"
# What GPUStack 2.x's UI asks first after the login: the update check and the model catalog,
# under the versioned API (2.x `gpustack/routes/routes.py`: versioned_prefix = "/v2").
UI_PAGES_2X = ("/", "/update/", "/v2/model-sets?page=1&perPage=10")


def bundle_images(bundle_dir: Path) -> list[str]:
    for line in (bundle_dir / "bundle.env").read_text().splitlines():
        if line.startswith("IMAGES="):
            return [r for r in line.removeprefix("IMAGES=").split(",") if r]
    return []


@contextlib.contextmanager
def site_registry() -> Iterator[str]:
    """A loopback distribution registry (Debian's docker-registry) for the push check."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="site-registry-") as root:
        config = Path(root) / "config.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
            f"    rootdirectory: {root}/data\nhttp:\n  addr: 127.0.0.1:{port}\n"
        )
        try:
            server = subprocess.Popen(
                ["docker-registry", "serve", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except FileNotFoundError:
            raise VerifyError(
                "docker-registry is not installed; run scripts/setup-build-host.sh"
            ) from None
        try:
            for _ in range(100):
                try:
                    if requests.get(f"http://127.0.0.1:{port}/v2/", timeout=1).ok:
                        break
                except requests.RequestException:
                    time.sleep(0.1)
            else:
                raise VerifyError("the loopback registry did not start within 10 s")
            yield f"127.0.0.1:{port}"
        finally:
            server.terminate()
            server.wait(timeout=30)


def verify_docker(
    cell: Cell,
    bundle_dir: Path,
    cache: Path,
    timeout: int,
    report: Report,
    sinkhole_image: str,
    allowlist: Sequence[str] = (),
) -> Report:
    """A GPUStack 0.x docker bundle, as the module's doc says. A vendor's image (Ascend, AMD,
    Hygon, Moore Threads) is installed with the stand-ins of `verify.standins` for its preflight
    and started with upstream's options for it (`standins.image_options`)."""
    refs = bundle_images(bundle_dir)
    if not refs:
        raise VerifyError(f"{bundle_dir}: bundle.env names no IMAGES; rebuild the bundle")
    engine = client()
    added: list[str] = []
    stand_in = standins.host_env(cell, cache, os.environ.get("PATH", ""))
    env = {**os.environ, **stand_in} if stand_in else None
    options = standins.image_options(cell, standins.host_root(cell, cache)) if stand_in else {}

    def step(name: str, argv: list[str]) -> Step:
        return host_step(cell, report, name, argv, env)

    _require_absent(engine, cell, refs, report)
    # No NVIDIA runtime here: cuda cells skip the preflight, and run without --gpus.
    skip = ["--skip-preflight"] if cell.cuda else []
    install = ["bash", str(bundle_dir / "install.sh"), *skip]
    with tempfile.TemporaryDirectory(prefix="docker-prefix-") as prefix:
        try:
            added += refs
            step("install", [*install, "--prefix", prefix])
            site_env = read_env_file(Path(prefix) / "docker.env")
            with (
                egress.sinkhole(sinkhole_image, internal_network()) as hole,
                egress.resolver_mounts(hole) as dns,
            ):
                audit = (engine, hole, dns)
                plain = ImageStart("upstream", IMAGE_PORT, options=options)
                upstream = run_audited(audit, cell, refs[0], plain, timeout, report)
                site = run_audited(
                    audit, cell, refs[0], ImageStart("site", IMAGE_PORT, env=site_env,
                                                     options=options),
                    timeout, report,
                )  # fmt: skip
            report.upstream = upstream.summary()
            report.seconds_to_healthz = site.seconds_to_healthz
            report.seconds_to_worker = site.seconds_to_worker
            report.egress = egress_summary(site.egress)
            report.egress_details = {"site": site.egress, "upstream": upstream.egress}
            egress_step(cell, site.egress, site, allowlist, report)
            with site_registry() as host:
                step("push", [*install, "--prefix", prefix, "--registry", host])
                pushed = [f"{host}/{r}" for r in refs]
                added += pushed
                for ref in refs + pushed:
                    engine.images.remove(ref, force=True)
                _pull(engine, cell, report, pushed[0])
                _run_and_probe(engine, cell, pushed[0], "run-from-registry", timeout, report)
        finally:
            remove_images(engine, added)
    report.ok = True
    return report


def verify_docker2(
    cell: Cell,
    bundle_dir: Path,
    timeout: int,
    report: Report,
    runners_dir: Path,
    sinkhole_image: str | None = None,
    allowlist: Sequence[str] = (),
) -> Report:
    """A GPUStack 2.x bundle as a site uses it (`docker2_site`), then the server image pulled
    from the site registry started as install.sh told the operator (`server_start`) with no
    route out and audited (`audit_server`).

    The sinkhole runs from `sinkhole_image` (the host's base image keeps it out of qemu), else
    from the server image itself, which has python3."""
    with docker2_site(cell, bundle_dir, report, runners_dir) as site:
        start = server_start(site.prefix, site.registry)
        sinkhole = sinkhole_image or site.server
        audit_server(cell, site.server, start, timeout, report, sinkhole, allowlist)
    report.ok = True
    return report


@dataclass(frozen=True)
class Docker2Site:
    """A 2.x bundle installed as a site installs it: the prefix install.sh wrote its files to,
    the site registry (with its prefix) it pushed to, and the server image pulled from there."""

    prefix: Path
    registry: str
    server: str


@contextlib.contextmanager
def docker2_site(
    cell: Cell, bundle_dir: Path, report: Report, runners_dir: Path
) -> Iterator[Docker2Site]:
    """`install.sh --registry` loads every image of the 2.x bundle and pushes it into a
    loopback site registry; every reference the server and worker will compute with
    `--system-default-container-registry` (runners, pause and health included) must then
    resolve there to a manifest for the cell's platform; the local copies are removed and the
    server image pulled from that registry. Everything it added is removed after."""
    refs = bundle_images(bundle_dir)
    if not refs:
        raise VerifyError(f"{bundle_dir}: bundle.env names no IMAGES; rebuild the bundle")
    engine = client()
    _require_absent(engine, cell, refs, report)
    selection = runners.cell_selection(
        runners_dir, cell.version, cell.arch, cell.device, cell.extra_names
    )
    added: list[str] = list(refs)
    # No GPU runtime here: the preflight's driver checks cannot pass, so they are skipped.
    install = ["bash", str(bundle_dir / "install.sh"), "--skip-preflight"]
    try:
        with (
            tempfile.TemporaryDirectory(prefix="docker-prefix-") as prefix,
            site_registry() as host,
        ):
            registry = f"{host}/{SITE_PREFIX}"  # under a prefix, as sites mirror
            host_step(
                cell, report, "install", [*install, "--prefix", prefix, "--registry", registry]
            )
            wanted = runners.worker_references(selection, registry)
            added += wanted
            report.steps.append(_resolve_in(cell, wanted, f"linux/{cell.arch}", prefix))
            remove_images(engine, added)
            _pull(engine, cell, report, wanted[0])
            yield Docker2Site(Path(prefix), registry, wanted[0])
    finally:
        remove_images(engine, added)


def server_start(prefix: Path, registry: str) -> ImageStart:
    """The start install.sh told the operator for the 2.x server: the arguments after the image
    from `<prefix>/server.args` (one a line) if install.sh wrote one, else the registry flag its
    printed line ends with; the environment of `<prefix>/docker.env` (its `--env-file`); the
    folders of `<prefix>/docker.volumes` (its `--volume`s: the models install-model.sh placed)."""
    args_file, env_file = prefix / "server.args", prefix / "docker.env"
    if args_file.is_file():
        args = [line for line in args_file.read_text().splitlines() if line.strip()]
    else:
        args = ["--system-default-container-registry", registry]
    env = read_env_file(env_file) if env_file.is_file() else {}
    return ImageStart("server", API_PORT_2X, args=args, env=env, worker_port=None,
                      pages=UI_PAGES_2X, mounts=site_volumes(prefix))  # fmt: skip


def site_volumes(prefix: Path) -> tuple[str, ...]:
    """The `HOST:CONTAINER[:ro]` lines of `<prefix>/docker.volumes` (comments and blanks
    skipped), as install.sh adds each to its run lines."""
    path = prefix / "docker.volumes"
    lines = path.read_text().splitlines() if path.is_file() else []
    return tuple(line for line in lines if line.strip() and not line.startswith("#"))


def audit_server(
    cell: Cell,
    ref: str,
    start: ImageStart,
    timeout: int,
    report: Report,
    sinkhole_image: str,
    allowlist: Sequence[str] = (),
    settle: float = SETTLE,
) -> AuditedRun:
    """Start the 2.x server image `ref` as `start` says, on the internal network with the
    sinkhole as its only resolver: its /healthz, an admin login, `settle` seconds more. The
    report gets the seconds, the egress summary and details (written to <cell>.egress.json);
    an outside host not in `allowlist` fails the `egress` step, naming it."""
    engine = client()
    with (
        egress.sinkhole(sinkhole_image, internal_network()) as hole,
        egress.resolver_mounts(hole) as dns,
    ):
        run_ = run_audited((engine, hole, dns), cell, ref, start, timeout, report, settle)
    judged = run_.egress
    report.seconds_to_healthz = run_.seconds_to_healthz
    report.egress = egress_summary(judged)
    report.egress_details = {start.name: judged}
    egress_step(cell, judged, run_, allowlist, report)
    return run_


def _resolve_in(cell: Cell, references: Sequence[str], platform: str, scratch: str) -> Step:
    """Each reference must resolve in its registry to a manifest of `platform`."""
    found, problems = [], []
    with Registry(BlobStore(Path(scratch) / "resolve")) as registry:
        for ref in references:
            try:
                image = registry.resolve(ref, platform)
                found.append(f"{ref} -> {image.manifest.digest} ({image.platform})")
            except RegistryError as exc:
                problems.append(f"{ref}: {exc}")
    step = Step("registry-references", 1 if problems else 0, 0.0, "\n".join(found + problems))
    if problems:
        raise VerifyError(
            f"{cell.id}: the site registry lacks what the worker will ask for: "
            + "; ".join(problems)
        )
    return step


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as `docker run --env-file` reads them (comments and blanks skipped)."""
    pairs = (line.split("=", 1) for line in path.read_text().splitlines())
    return {p[0]: p[1] for p in pairs if len(p) == 2 and not p[0].startswith("#")}


@dataclass(frozen=True)
class ImageStart:
    """One audited start of an image: its name in the steps, the port its /healthz answers on,
    the arguments after the image, its environment, the embedded worker's port if it has one,
    and the pages the admin asks after the login (the 0.x UI's when empty); for an upgrade, the
    data volume, whether to log in, and what to do in the running container; the site's
    folders to mount (`HOST:CONTAINER[:ro]`, from docker.volumes)."""

    name: str
    port: int
    args: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    worker_port: int | None = WORKER_PORT
    pages: Sequence[str] = ()
    volume: str = ""  # a named volume at GPUStack's data directory, kept after the start
    log_in: bool = True  # with the initial password (not once an operator has changed it)
    during: Callable[[Container], None] | None = None  # after the login, before the settling
    mounts: Sequence[str] = ()
    options: Mapping[str, Any] = field(default_factory=dict)  # more Docker SDK create arguments


@dataclass(frozen=True)
class _Running:
    """A container running its image's own entrypoint: Docker keeps its log and its state."""

    box: Container
    what: str
    launched: float

    def read_log(self) -> str:
        return bytes(self.box.logs()).decode(errors="replace")

    def alive(self) -> bool:
        self.box.reload()
        return self.box.status == "running"


def run_audited(
    audit: tuple[DockerClient, egress.Sinkhole, dict[Path, str]],
    cell: Cell,
    ref: str,
    start: ImageStart,
    timeout: int,
    report: Report,
    settle: float = SETTLE,
) -> AuditedRun:
    """Run the image as `start` says with the sinkhole as its resolver, as `verify.pip.launch`
    does for a pip install: health of server (and worker), an admin login, `settle` seconds of
    the first background tasks. The events are this container's own (by its address)."""
    engine, hole, dns = audit
    mark = len(egress.read_events(hole))
    volumes = {str(host): {"bind": inside, "mode": "ro"} for host, inside in dns.items()}
    volumes[str(audit_hook())] = {"bind": "/opt/egress-audit", "mode": "ro"}
    if start.volume:
        volumes[start.volume] = {"bind": DATA_DIR, "mode": "rw"}
    for spec in start.mounts:
        host, inside, *mode = spec.split(":")
        volumes[host] = {"bind": inside, "mode": mode[0] if mode else "rw"}
    more = dict(start.options)
    volumes.update(more.pop("volumes", {}))
    box = engine.containers.create(
        ref,
        command=list(start.args) or None,
        network=hole.network,
        environment=_hooked(engine, ref, start.env),
        volumes=volumes,
        name=f"verify-{start.name}-{int(time.time() * 1000) % 10**9}",
        **more,
    )
    try:
        box.start()
        running = _Running(box, ref, time.monotonic())
        address = egress.address_of(box, hole.network)
        healthz = wait_healthz(cell, report, running, start.port, f"healthz-{start.name}", timeout)
        worker = 0.0
        if start.worker_port is not None:
            step = f"worker-{start.name}"
            worker = wait_healthz(cell, report, running, start.worker_port, step, timeout)
        base = f"http://127.0.0.1:{start.port}"
        if start.log_in:
            log_in(cell, report, box, f"ui-{start.name}", base, PASSWORD_FILE, start.pages)
        if start.during is not None:
            start.during(box)
        time.sleep(settle)
        seen = egress.collect(hole)
        # this start's attempts, and the sinkhole's `ready` (its address, for the report)
        events = [e for e in seen[:mark] if e.get("kind") == "ready"] + [
            e for e in seen[mark:] if e.get("client", address) == address
        ]
        _, hook = exec_in(box, ["sh", "-c", f"cat {AUDIT_LOG} 2>/dev/null || true"])
        calls = [json.loads(x) for x in hook.splitlines() if x[:1] == "{"]
        return AuditedRun(start.name, healthz, worker, events, calls, running.read_log())
    finally:
        with contextlib.suppress(Exception):
            box.remove(force=True)


def _hooked(engine: DockerClient, ref: str, env: Mapping[str, str]) -> dict[str, str]:
    """`env` plus what the audit hook needs: its folder first on PYTHONPATH, ahead of (not
    instead of) any folders `env` or else the image sets there, and the file it writes to."""
    image_env = engine.images.get(ref).attrs.get("Config", {}).get("Env") or []
    given = dict(line.split("=", 1) for line in image_env if "=" in line)
    paths = [p for p in (env.get("PYTHONPATH") or given.get("PYTHONPATH", "")).split(":") if p]
    return {
        **env,
        "PYTHONPATH": ":".join(["/opt/egress-audit", *paths]),
        "GPUSTACK_EGRESS_AUDIT_LOG": AUDIT_LOG,
    }


def host_step(
    cell: Cell, report: Report, name: str, argv: list[str], env: Mapping[str, str] | None = None
) -> Step:
    """Run one command of the verification, record it, and fail the cell if it failed."""
    started = time.monotonic()
    try:
        code, output = 0, run(argv, what=name, env=env).stdout or ""
    except CommandError as exc:  # its message has the exit status and the output's tail
        found = re.search(r"\(exit (-?\d+)\)", str(exc))
        code, output = (int(found[1]) if found else 1), str(exc)
    return _record(cell, report, Step(name, code, round(time.monotonic() - started, 1), output))


def _pull(engine: DockerClient, cell: Cell, report: Report, ref: str) -> Step:
    """Pull `ref` from its registry into the engine, as `docker pull` would, recorded as a step."""
    started = time.monotonic()
    code, output = pull(engine, ref)
    return _record(cell, report, Step("pull", code, round(time.monotonic() - started, 1), output))


def _record(cell: Cell, report: Report, result: Step) -> Step:
    report.steps.append(result)
    if result.code != 0:
        raise VerifyError(failure(cell, result))
    return result


def _require_absent(engine: DockerClient, cell: Cell, refs: Sequence[str], report: Report) -> None:
    """A bundle that "loads" an image the engine already has proves nothing."""
    present = [r for r in refs if has_image(engine, r)]
    report.steps.append(Step("absent", 1 if present else 0, 0.0, " ".join(present) or "none"))
    if present:
        raise VerifyError(
            f"{cell.id}: {', '.join(present)} is already in this Docker Engine, so loading the "
            f"bundle would prove nothing; remove it (`docker rmi {' '.join(present)}`) and rerun"
        )


def _run_and_probe(
    engine: DockerClient, cell: Cell, ref: str, name: str, timeout: int, report: Report
) -> float:
    """Run the image as it is (its own entrypoint) on the internal network; nothing is pulled."""
    box = engine.containers.create(
        ref, network=internal_network(), name=f"verify-{name}-{int(time.time() * 1000) % 10**9}"
    )
    try:
        box.start()
        running = _Running(box, ref, time.monotonic())
        return wait_healthz(cell, report, running, IMAGE_PORT, name, timeout)
    finally:
        with contextlib.suppress(Exception):
            box.remove(force=True)
