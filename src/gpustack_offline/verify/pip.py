"""Verification: a bundle installs and runs in a clean container with no route out.

Each bundle is mounted read-only into a fresh Debian container of the cell's architecture (arm64
under qemu) on a Docker network made with `--internal`. There it runs exactly what a site runs:
the sums, the preflight, the install, then `gpustack version` and `gpustack start`, which must
answer `/healthz` within a bound. A bundle that merely installs is not verified.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpustack_offline import payload
from gpustack_offline.core.docker import base_image, exec_in, internal_network, volume
from gpustack_offline.core.errors import VerifyError
from gpustack_offline.core.matrix import Cell
from gpustack_offline.verify import egress
from gpustack_offline.verify.common import (
    AUDIT_LOG,
    HOST_ARCH,
    SETTLE,
    WORKER_PORT,
    AuditedRun,
    Report,
    Step,
    answers_healthz,
    audit_hook,
    egress_step,
    egress_summary,
    failure,
    log_in,
    offline_tools_step,
)
from gpustack_offline.verify.standins import stand_ins

if TYPE_CHECKING:
    from docker.models.containers import Container

PREFIX = "/opt/gpustack"
PORT = 8080
# Scripts run in the target as `python3 -c TEXT ARG...` (payload/*.py): names resolve only to the
# sinkhole and a public address does not answer; every bundled tool runs (with the installed
# release's Python).
ISOLATION = payload.path("isolation.py").read_text()
TOOLS_EXEC = payload.path("check_tools.py").read_text()
# The documented start, and the one install.sh configures for an air-gapped site.
UPSTREAM_START = f"exec {PREFIX}/bin/gpustack start"
SITE_START = (
    f"set -a; . {PREFIX}/gpustack.env; set +a; "
    f"exec {PREFIX}/bin/gpustack start --config-file {PREFIX}/gpustack.yaml"
)


def verify_pip(
    cell: Cell,
    bundle_dir: Path,
    cache: Path,
    timeout: int,
    mirror: str,
    report: Report,
    allowlist: Sequence[str],
) -> Report:
    """A pip bundle in a clean container of its target, as the module's doc says.

    The install goes into a volume that a second container of the same image shares: upstream's
    plain start runs there while the configured start runs in the first, both at once, and the
    sinkhole tells their attempts apart by address. The two share one settling time."""
    mounts = {bundle_dir.resolve(): "/bundle", audit_hook(): "/opt/egress-audit"}
    # No accelerator here: the vendor's tool (and host facts) at exactly the cell's floor.
    standing_in, env = stand_ins(cell, cache)
    mounts.update(standing_in)
    with (
        volume("gpustack-offline-verify-prefix") as prefix,
        target_container(
            cell, cache, mirror, mounts, f"verify-{cell.arch}", writable={prefix: PREFIX}, env=env
        ) as audit,
        egress.audited_twin(
            audit,
            base_image(cell.arch, cache, mirror),
            mounts={**mounts, prefix: PREFIX},
            read_only=list(mounts.values()),
            env=env,
            name_hint=f"verify-{cell.arch}-upstream",
        ) as twin,
    ):
        box = audit.box

        def step(name: str, argv: list[str]) -> Step:
            return exec_step(cell, report, box, name, argv, env)

        step("isolation", ["python3", "-c", ISOLATION, audit.sinkhole.address])
        mark = len(egress.read_events(audit.sinkhole))
        step("sums", ["sh", "-c", "cd /bundle && sha256sum -c --quiet --strict SHA256SUMS"])
        step("preflight", ["/bundle/preflight.sh", "--json", "--prefix", PREFIX])
        step("install", ["/bundle/install.sh", "--prefix", PREFIX])
        step("cli", [f"{PREFIX}/bin/gpustack", "version"])
        installing = egress.read_events(audit.sinkhole)[mark:]

        # upstream's plain recipe on the same install, beside the configured start: measured
        # and audited, never judged
        network = audit.sinkhole.network
        starts = [
            Start(twin, "upstream", UPSTREAM_START, egress.address_of(twin, network)),
            Start(box, "site", SITE_START, egress.address_of(box, network)),
        ]
        mark = len(egress.read_events(audit.sinkhole))
        for start in starts:
            launch(cell, report, start, env)
        observe(cell, report, starts, timeout)
        time.sleep(SETTLE)
        events = egress.collect(audit.sinkhole)[mark:]
        upstream, site = (finish(start, events) for start in starts)
        report.upstream = upstream.summary()

        report.seconds_to_healthz = site.seconds_to_healthz
        report.seconds_to_worker = site.seconds_to_worker
        if "TOOLS_ARCHIVE=tools/" in (bundle_dir / "bundle.env").read_text():
            report.steps.append(offline_tools_step(cell, site.log))
            step("tools", [f"{PREFIX}/current/bin/python", "-c", TOOLS_EXEC, cell.device])
        judged = egress.summarize([*installing, *site.events])
        report.egress = egress_summary(judged)
        report.egress_details = {"install+site": judged, "upstream": upstream.egress}
        egress_step(cell, judged, site, allowlist, report)
    report.ok = True
    return report


@contextlib.contextmanager
def target_container(
    cell: Cell,
    cache: Path,
    mirror: str,
    mounts: Mapping[Path, str],
    name_hint: str,
    *,
    writable: Mapping[Path, str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[egress.Audit]:
    """A clean container of the cell's target (Debian of its arch, arm64 under qemu) on an
    internal network with the sinkhole as its only resolver: `mounts` read-only (the bundles,
    the audit hook), `writable` not. The sinkhole runs on the host's arch, out of qemu."""
    with egress.audited_container(
        base_image(cell.arch, cache, mirror),
        network=internal_network(),
        sinkhole_image=base_image(HOST_ARCH, cache, mirror),
        mounts={**mounts, **(writable or {})},
        read_only=list(mounts.values()),
        env=env or {},
        name_hint=name_hint,
    ) as audit:
        yield audit


def exec_step(
    cell: Cell,
    report: Report,
    box: Container,
    name: str,
    argv: list[str],
    env: Mapping[str, str] | None = None,
) -> Step:
    """Run one command of the verification in the target, record it, and fail the cell (with
    the command's output) if it failed."""
    started = time.monotonic()
    code, output = exec_in(box, argv, env=env)
    result = Step(name, code, round(time.monotonic() - started, 1), output)
    report.steps.append(result)
    if code != 0:
        raise VerifyError(failure(cell, result))
    return result


@dataclass
class Start:
    """One audited `gpustack start`: where it runs, how, and when it began."""

    box: Container
    name: str
    command: str
    address: str  # the container's address: the `client` of its events at the sinkhole
    launched: float = 0.0
    healthz: float = 0.0
    worker: float = 0.0
    what: str = "gpustack start"

    @property
    def log(self) -> str:
        return f"/tmp/gpustack-{self.name}.log"

    def read_log(self) -> str:
        _, text = exec_in(self.box, ["cat", self.log])
        return text

    def alive(self) -> bool:
        """The start's process (two starts may share a container, so not the container)."""
        code, _ = exec_in(self.box, ["sh", "-c", 'kill -0 "$(cat /tmp/gpustack.pid)"'])
        return code == 0


def launch(cell: Cell, report: Report, start: Start, env: dict[str, str]) -> None:
    """Start GPUStack in the background with a fresh data dir and the audit hook."""
    data_dir = f"/var/lib/gpustack-{start.name}"
    full = f"{start.command} --debug --port {PORT} --data-dir {data_dir}"
    background = 'setsid sh -c "$1" >"$2" 2>&1 & echo $! > /tmp/gpustack.pid'
    run_env = {**env, "PYTHONPATH": "/opt/egress-audit", "GPUSTACK_EGRESS_AUDIT_LOG": AUDIT_LOG}
    exec_in(start.box, ["rm", "-f", AUDIT_LOG])
    code, _ = exec_in(start.box, ["sh", "-c", background, "sh", full, start.log], env=run_env)
    start.launched = time.monotonic()
    report.steps.append(Step(f"start-{start.name}", code, 0.0, full))
    if code != 0:
        raise VerifyError(failure(cell, report.steps[-1]))


def observe(
    cell: Cell, report: Report, starts: Sequence[Start], timeout: int, login: bool = True
) -> None:
    """Wait for every start's server, then every worker, polling them in turn so that each
    figure is the seconds from its own launch; then (with `login`) log in to each UI as admin
    with the initial password, as an operator does first."""
    for port, kind in ((PORT, "healthz"), (WORKER_PORT, "worker")):
        answered: dict[str, float] = {}
        while len(answered) < len(starts):
            for start in starts:
                step = f"{kind}-{start.name}"
                if start.name not in answered and answers_healthz(
                    cell, report, start, port, step, timeout
                ):
                    answered[start.name] = round(time.monotonic() - start.launched, 1)
            if len(answered) < len(starts):
                time.sleep(1)
        for start in starts:
            seconds = answered[start.name]
            setattr(start, kind, seconds)
            report.steps.append(Step(f"{kind}-{start.name}", 0, seconds, f"200 OK on port {port}"))
    for start in starts if login else ():
        password = f"/var/lib/gpustack-{start.name}/initial_admin_password"
        log_in(cell, report, start.box, f"ui-{start.name}", f"http://127.0.0.1:{PORT}", password)


def finish(start: Start, events: list[dict[str, Any]]) -> AuditedRun:
    """The start's own attempts (by its address), its audit hook's records and its log."""
    mine = [e for e in events if e.get("client", start.address) == start.address]
    _, hook = exec_in(start.box, ["sh", "-c", f"cat {AUDIT_LOG} 2>/dev/null || true"])
    text = start.read_log()
    records = [json.loads(line) for line in hook.splitlines() if line.startswith("{")]
    return AuditedRun(start.name, start.healthz, start.worker, mine, records, text)
