"""What pip and docker verification share: the report and its steps, the wrapper that writes the
report and the egress audit beside a bundle whatever happens, the wait for a start's /healthz and
the admin's login, the audited start's record and the judgements made from it (tools found
offline, egress allowed), and the constants both flows use.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from gpustack_offline import payload
from gpustack_offline.core.docker import BUILDER_PYTHON, exec_in
from gpustack_offline.core.errors import BundleError, VerifyError
from gpustack_offline.core.files import write_text
from gpustack_offline.core.matrix import Cell
from gpustack_offline.verify import egress
from gpustack_offline.verify.errors import Unverifiable

if TYPE_CHECKING:
    from docker.models.containers import Container

HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), "amd64")
AUDIT_LOG = "/tmp/egress-audit.jsonl"
# Scripts run in the target by its python3 as `python3 -c TEXT ARG...` (payload/*.py): log in to
# the UI as admin, as an operator does first (which asks /update/ and the catalog); probe /healthz.
UI_VISIT = payload.path("ui_visit.py").read_text()
# Seconds the audited start keeps running after its worker is up: the first minutes' background
# tasks (update check, catalog, worker status reports) get their turn.
SETTLE = 30
WORKER_PORT = 10150
HEALTH_PROBE = payload.path("health_probe.py").read_text()
# What GPUStack's ToolsManager logs when it reaches for the network (0.6/0.7 tools_manager.py).
DOWNLOAD_SIGNS = (
    "Downloading ",
    "Error downloading",
    "Failed to connect to",
    "failed to connect to any of",
    "It is required to download dependency tools",
    "Failed to download tools",
)


@dataclass
class Step:
    name: str
    code: int
    seconds: float
    output: str


@dataclass
class Report:
    cell: str
    ok: bool = False
    steps: list[Step] = field(default_factory=list)
    seconds_to_healthz: float | None = None
    seconds_to_worker: float | None = None
    note: str = ""
    # upstream's plain `gpustack start` on the same install: seconds and hosts attempted
    upstream: dict[str, Any] | None = None
    # the configured start (and the install): hosts attempted, the allowlist, what broke it
    egress: dict[str, Any] | None = None
    egress_details: dict[str, Any] = field(default_factory=dict, repr=False)


def unverifiable_reason(cell: Cell) -> str | None:
    if cell.os != "linux":
        return (
            f"{cell.id}: {cell.os} bundles cannot be verified in a Linux container here; "
            "install it on a Windows host with install.ps1"
        )
    if cell.python != BUILDER_PYTHON:
        return (
            f"{cell.id}: no clean Debian base image with Python {cell.python} can be made here "
            f"(Debian 12 ships {BUILDER_PYTHON}); verify it on a host with Python {cell.python}"
        )
    return None


def audit_hook() -> Path:
    """The folder put on a target's PYTHONPATH whose sitecustomize records outside calls."""
    return payload.path("audit_hook")


def verify(
    cell: Cell, bundle_dir: Path, report_path: Path, body: Callable[[Report], Report]
) -> Report:
    """Run one kind's verification `body` on a bundle folder; write the report (and the egress
    audit) beside it whatever happens; raise VerifyError if it failed."""
    report = Report(cell=cell.id)
    try:
        reason = unverifiable_reason(cell)
        if reason:
            raise Unverifiable(reason)
        if not (bundle_dir / "manifest.json").is_file():
            raise VerifyError(f"{bundle_dir} is not a bundle (no manifest.json); build it first")
        return body(report)
    except BundleError as exc:
        report.note = str(exc)
        raise
    finally:
        write_report(report, report_path)
        # always one, so a reader never takes a missing audit for a clean one
        details: dict[str, Any] = {
            k: json.loads(v.to_json()) for k, v in report.egress_details.items()
        } or {
            "audited": False,
            "reason": f"verification stopped before the audit: {report.note}"
            if report.note
            else f"no egress audit for {cell.method} cells of GPUStack {cell.version}",
        }
        write_text(egress_path(report_path), json.dumps(details, indent=2) + "\n")


def egress_path(report_path: Path) -> Path:
    return report_path.with_name(report_path.name.replace(".verify.json", ".egress.json"))


def write_report(report: Report, path: Path) -> None:
    data = asdict(report)
    data.pop("egress_details")  # written whole to <cell>.egress.json
    write_text(path, json.dumps(data, indent=2) + "\n")


@dataclass
class AuditedRun:
    """One `gpustack start` in the verification container, and what it reached for."""

    name: str
    seconds_to_healthz: float
    seconds_to_worker: float
    events: list[dict[str, Any]]
    calls: list[dict[str, Any]]  # the audit hook's records: process and code per outside name
    log: str

    @property
    def egress(self) -> egress.EgressReport:
        return egress.summarize(self.events)

    def summary(self) -> dict[str, Any]:
        hosts = [h for h in self.egress.hosts.values() if h.host]
        return {
            "seconds_to_healthz": self.seconds_to_healthz,
            "seconds_to_worker": self.seconds_to_worker,
            "hosts_attempted": len(hosts),
            "hosts": [h.host for h in hosts],
        }


def egress_summary(judged: egress.EgressReport) -> dict[str, Any]:
    hosts = [h for h in judged.hosts.values() if h.host]
    return {"hosts_attempted": len(hosts), "hosts": [h.host for h in hosts]}


def egress_step(
    cell: Cell,
    judged: egress.EgressReport,
    run: AuditedRun,
    allowlist: Sequence[str],
    report: Report | None = None,
) -> Step:
    """Fail the cell on any outside host not allowed for it, naming host, process and log.
    The step is recorded in `report` when one is given, failed or not."""
    bad = egress.unexpected(judged, allowlist)
    if not bad:
        allowed = sorted(h.host for h in judged.hosts.values())
        step = Step("egress", 0, 0.0, f"outside hosts attempted: {allowed or 'none'}")
        if report is not None:
            report.steps.append(step)
        return step
    lines = run.log.splitlines()
    text = []
    for host in bad:
        callers = {f"{c['process']} (pid {c['pid']}) at {c['where']}" for c in run.calls
                   if c["host"] == host.host}  # fmt: skip
        mention = next((line for line in lines if host.host in line), "no log line names it")
        text.append(
            f"{host.host}: {dict(host.kinds)} x{host.count}, first at {host.first}; "
            f"process: {', '.join(sorted(callers)) or 'not a Python call (see the sinkhole)'}; "
            f"log: {mention.strip()}"
        )
    step = Step("egress", 1, 0.0, "\n".join(text))
    if report is not None:
        report.steps.append(step)
    names = ", ".join(h.host for h in bad)
    raise VerifyError(failure(cell, step, f"the configured first start tried to reach {names}"))


class Watched(Protocol):
    """A GPUStack start being waited for: the container it runs in, what to call it in a
    failure, when it was launched, and the two sources a wait reads: its log and its liveness
    (a process in a shared container, or the container itself)."""

    @property
    def box(self) -> Container: ...
    @property
    def what(self) -> str: ...
    @property
    def launched(self) -> float: ...
    def read_log(self) -> str: ...
    def alive(self) -> bool: ...


def answers_healthz(
    cell: Cell, report: Report, start: Watched, port: int, step: str, timeout: float
) -> bool:
    """One probe of /healthz on `port` in the start's container. A start that reached for a
    tool, exited, or is past `timeout` seconds from its launch is a VerifyError; the failed
    `step` is recorded with the log's last lines."""
    if _probe(start.box, port):
        return True
    waited = round(time.monotonic() - start.launched, 1)
    log = start.read_log()
    # A worker that reaches for a tool never gets healthy: say so at once, with the lines.
    if any(sign in log for sign in DOWNLOAD_SIGNS):
        offline_tools_step(cell, log)  # raises, quoting the lines around the attempt
    alive = start.alive()
    if not alive or waited > timeout:
        why = "exited" if not alive else f"did not answer /healthz on {port} in {timeout:.0f}s"
        result = Step(step, 1, waited, "\n".join(log.splitlines()[-60:]))
        report.steps.append(result)
        raise VerifyError(failure(cell, result, f"{start.what} {why}"))
    return False


def wait_healthz(
    cell: Cell,
    report: Report,
    start: Watched,
    port: int,
    step: str,
    timeout: float,
    interval: float = 3.0,
) -> float:
    """Probe until /healthz answers on `port` (see `answers_healthz`); record `step` and return
    the seconds since the start's launch."""
    while not answers_healthz(cell, report, start, port, step, timeout):
        time.sleep(interval)
    waited = round(time.monotonic() - start.launched, 1)
    report.steps.append(Step(step, 0, waited, f"{start.what}: /healthz 200 on {port}"))
    return waited


def _probe(box: Container, port: int) -> bool:
    import docker.errors

    try:
        code, _ = exec_in(box, ["python3", "-c", HEALTH_PROBE, str(port)])
    except docker.errors.APIError:  # the container has stopped: its liveness says so next
        return False
    return code == 0


def log_in(
    cell: Cell,
    report: Report,
    box: Container,
    step: str,
    base: str,
    password_file: str,
    pages: Sequence[str] = (),
) -> Step:
    """Log in to the UI as admin with the initial password, as an operator does first, then
    ask `pages` (the UI's first ones by default); a login refused is a VerifyError. A login
    that works also proves the start answering is this one, with its fresh data dir."""
    _, visited = exec_in(box, ["python3", "-c", UI_VISIT, base, password_file, *pages])
    logged_in = "/auth/login 200" in visited
    result = Step(step, 0 if logged_in else 1, 0.0, visited)
    report.steps.append(result)
    if not logged_in:
        raise VerifyError(failure(cell, result, "the admin could not log in"))
    return result


def offline_tools_step(cell: Cell, log: str) -> Step:
    """The worker found every bundled tool: no download attempt in its log, and with --debug
    ToolsManager says it skipped each download."""
    lines = log.splitlines()
    reached = [i for i, line in enumerate(lines) if any(s in line for s in DOWNLOAD_SIGNS)]
    skipped = [line for line in lines if "already exists, skipping download" in line]
    if reached:
        first = reached[0]
        around = "\n".join(lines[max(0, first - 3) : first + 4])
        step = Step("tools-offline", 1, 0.0, around)
        raise VerifyError(failure(cell, step, "the worker tried to download tools at start"))
    if len(skipped) < 3:
        step = Step("tools-offline", 1, 0.0, "\n".join(lines[-40:]))
        raise VerifyError(
            failure(cell, step, f"the worker confirmed only {len(skipped)} of 3 bundled tools")
        )
    return Step("tools-offline", 0, 0.0, "\n".join(skipped))


def failure(cell: Cell, step: Step, summary: str = "") -> str:
    """The VerifyError message for a failed step: what failed, and the last lines it wrote."""
    tail = "\n".join(step.output.strip().splitlines()[-40:])
    head = summary or f"step {step.name!r} exited {step.code}"
    return f"{cell.id}: verification failed: {head}:\n{tail}"
