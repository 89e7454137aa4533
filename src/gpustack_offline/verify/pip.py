"""Verification: a bundle installs and runs in a clean container with no route out.

Each bundle is mounted read-only into a fresh Debian container of the cell's architecture (arm64
under qemu) on a Docker network made with `--internal`. There it runs exactly what a site runs:
the sums, the preflight, the install, then `gpustack version` and `gpustack start`, which must
answer `/healthz` within a bound. A bundle that merely installs is not verified.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gpustack_offline import payload
from gpustack_offline.core.docker import BUILDER_PYTHON, base_image, exec_in, internal_network
from gpustack_offline.core.errors import BundleError, VerifyError
from gpustack_offline.core.files import write_text
from gpustack_offline.core.matrix import Cell
from gpustack_offline.verify import egress

PREFIX = "/opt/gpustack"
HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), "amd64")
PORT = 8080
# Docker's --internal network drops forwarding out of the bridge (a default route still shows).
# The sinkhole answers every name with its own address, so isolation is checked on addresses:
# pypi.org must resolve to the sinkhole only, and a public address must not answer.
ISOLATION = (
    "import socket, sys\n"
    "names = {a[4][0] for a in socket.getaddrinfo('pypi.org', 443, socket.AF_INET)}\n"
    "if names != {sys.argv[1]}:\n"
    "    sys.exit(f'pypi.org resolves to {names}, not only to the sinkhole {sys.argv[1]}')\n"
    "try:\n"
    "    socket.create_connection(('1.1.1.1', 443), timeout=3).close()\n"
    "except OSError:\n"
    "    sys.exit(0)\n"
    "sys.exit('1.1.1.1:443 answered: the container is not isolated')\n"
)
AUDIT_LOG = "/tmp/egress-audit.jsonl"
# The documented start, and the one install.sh configures for an air-gapped site.
UPSTREAM_START = f"exec {PREFIX}/bin/gpustack start"
SITE_START = (
    f"set -a; . {PREFIX}/gpustack.env; set +a; "
    f"exec {PREFIX}/bin/gpustack start --config-file {PREFIX}/gpustack.yaml"
)
# What an operator does first: log in to the UI as admin, which asks /update/ and the catalog.
UI_VISIT = """
import http.cookiejar, sys, urllib.parse, urllib.request
base, password = sys.argv[1], open(sys.argv[2]).read().strip()
opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
form = urllib.parse.urlencode({"username": "admin", "password": password}).encode()
for path, data in (("/auth/login", form), ("/", None), ("/update/", None),
                   ("/v1/model-sets?page=1&perPage=10", None)):
    try:
        print(path, opener.open(base + path, data=data, timeout=30).status)
    except Exception as exc:
        print(path, "failed:", exc)
"""
# Seconds the audited start keeps running after its worker is up: the first minutes' background
# tasks (update check, catalog, worker status reports) get their turn.
SETTLE = 30
WORKER_PORT = 10150
HEALTH_PROBE = (
    "import sys, urllib.request\n"
    "try:\n"
    "    r = urllib.request.urlopen(f'http://127.0.0.1:{sys.argv[1]}/healthz', timeout=5)\n"
    "    sys.exit(0 if r.status == 200 else 1)\n"
    "except Exception:\n"
    "    sys.exit(1)\n"
)
# What GPUStack's ToolsManager logs when it reaches for the network (0.6/0.7 tools_manager.py).
DOWNLOAD_SIGNS = (
    "Downloading ",
    "Error downloading",
    "Failed to connect to",
    "failed to connect to any of",
    "It is required to download dependency tools",
    "Failed to download tools",
)
# Run with the installed release's Python: every bundled tool runs, and is built for this machine.
TOOLS_EXEC = """
import json, os, platform, subprocess, sys
import gpustack
tools = os.path.join(os.path.dirname(gpustack.__file__), "third_party", "bin")
machine = {"x86_64": 62, "aarch64": 183}[platform.machine()]
driver_only = sys.argv[1] == "cuda"
found = [p for p in (
    os.path.join(tools, "llama-box", "llama-box-default", "llama-box"),
    os.path.join(tools, "llama-box", "llama-box"),
    os.path.join(tools, "gguf-parser", "gguf-parser"),
    os.path.join(tools, "fastfetch", "fastfetch"),
) if os.path.isfile(p)]
failed = not any("llama-box" in p for p in found) or len(found) < 3
for path in found:
    name = os.path.relpath(path, tools)
    with open(path, "rb") as fh:
        head = fh.read(20)
    if head[:4] != b"\x7fELF":
        print(f"FAIL {name}: not an ELF program (it starts with {head[:16]!r})")
        failed = True
        continue
    kind = int.from_bytes(head[18:20], "little")
    if kind != machine:
        print(f"FAIL {name}: an ELF program for machine {kind}, this machine is {machine}")
        failed = True
        continue
    run = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=120)
    out = (run.stdout + run.stderr).strip()
    # A CUDA build loads the driver's libraries, which a container without a GPU lacks.
    waits_for_driver = driver_only and "error while loading shared libraries: libcu" in out
    ok = run.returncode == 0 or waits_for_driver
    failed |= not ok
    note = " (runs up to loading the NVIDIA driver's libraries)" if waits_for_driver else ""
    print(f"{'ok' if ok else 'FAIL'} {name}{note}: {' | '.join(out.splitlines()[:6])}")
print(json.dumps(json.load(open(os.path.join(tools, "versions.json")))))
sys.exit(1 if failed else 0)
"""


class Unverifiable(BundleError):
    """The cell's target cannot be reproduced here; the reason is said, never passed silently."""


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


def _audit_hook() -> Path:
    return payload.path("audit_hook")


def _fake_nvidia_smi() -> Path:
    return payload.path("fakes/nvidia-smi")


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


def verify_pip(
    cell: Cell,
    bundle_dir: Path,
    cache: Path,
    timeout: int,
    mirror: str,
    report: Report,
    allowlist: Sequence[str],
) -> Report:
    """A pip bundle in a clean container of its target, as the module's doc says."""
    image = base_image(cell.arch, cache, mirror)
    mounts = {bundle_dir.resolve(): "/bundle", _audit_hook(): "/opt/egress-audit"}
    env = {}
    if cell.cuda:
        # No GPU here: a stand-in nvidia-smi reports a driver of exactly the cell's floor.
        mounts[_fake_nvidia_smi()] = "/usr/local/bin/nvidia-smi"
        env["FAKE_NVIDIA_CUDA"] = cell.cuda
    with egress.audited_container(
        image,
        network=internal_network(),
        sinkhole_image=base_image(HOST_ARCH, cache, mirror),
        mounts=mounts,
        read_only=list(mounts.values()),
        env=env,
        name_hint=f"verify-{cell.arch}",
    ) as audit:
        box = audit.box

        def step(name: str, argv: list[str]) -> Step:
            started = time.monotonic()
            code, output = exec_in(box, argv, env=env)
            result = Step(name, code, round(time.monotonic() - started, 1), output)
            report.steps.append(result)
            if code != 0:
                raise VerifyError(_failure(cell, result))
            return result

        step("isolation", ["python3", "-c", ISOLATION, audit.sinkhole.address])
        mark = len(egress.read_events(audit.sinkhole))
        step("sums", ["sh", "-c", "cd /bundle && sha256sum -c --quiet --strict SHA256SUMS"])
        step("preflight", ["/bundle/preflight.sh", "--json", "--prefix", PREFIX])
        step("install", ["/bundle/install.sh", "--prefix", PREFIX])
        step("cli", [f"{PREFIX}/bin/gpustack", "version"])
        installing = egress.read_events(audit.sinkhole)[mark:]

        # upstream's plain recipe on the same install: measured and audited, never judged
        upstream = start_audited(audit, cell, report, "upstream", UPSTREAM_START, env, timeout)
        report.upstream = upstream.summary()
        stop_gpustack(box, cell, report)

        site = start_audited(audit, cell, report, "site", SITE_START, env, timeout)
        report.seconds_to_healthz = site.seconds_to_healthz
        report.seconds_to_worker = site.seconds_to_worker
        if "TOOLS_ARCHIVE=tools/" in (bundle_dir / "bundle.env").read_text():
            report.steps.append(offline_tools_step(cell, site.log))
            step("tools", [f"{PREFIX}/current/bin/python", "-c", TOOLS_EXEC, cell.device])
        judged = egress.summarize([*installing, *site.events])
        report.egress = egress_summary(judged)
        report.egress_details = {"install+site": judged, "upstream": upstream.egress}
        report.steps.append(egress_step(cell, judged, site, allowlist))
    report.ok = True
    return report


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


def start_audited(
    audit: egress.Audit,
    cell: Cell,
    report: Report,
    name: str,
    command: str,
    env: dict[str, str],
    timeout: int,
) -> AuditedRun:
    """Start GPUStack with `command`, wait for server and worker, visit the UI as admin, let the
    first background tasks run, and collect every outside attempt made meanwhile."""
    box = audit.box
    data_dir, log, calls = f"/var/lib/gpustack-{name}", f"/tmp/gpustack-{name}.log", AUDIT_LOG
    mark = len(egress.read_events(audit.sinkhole))
    full = f"{command} --debug --port {PORT} --data-dir {data_dir}"
    launch = 'setsid sh -c "$1" >"$2" 2>&1 & echo $! > /tmp/gpustack.pid'
    run_env = {**env, "PYTHONPATH": "/opt/egress-audit", "GPUSTACK_EGRESS_AUDIT_LOG": calls}
    exec_in(box, ["rm", "-f", calls])
    code, out = exec_in(box, ["sh", "-c", launch, "sh", full, log], env=run_env)
    report.steps.append(Step(f"start-{name}", code, 0.0, full))
    if code != 0:
        raise VerifyError(_failure(cell, report.steps[-1]))
    started = time.monotonic()
    healthz = wait_healthy(box, cell, report, f"healthz-{name}", PORT, timeout, log)
    left = timeout - (time.monotonic() - started)
    # seconds from the start, like /healthz's
    worker = healthz + wait_healthy(box, cell, report, f"worker-{name}", WORKER_PORT, left, log)
    password = f"{data_dir}/initial_admin_password"
    _, visited = exec_in(box, ["python3", "-c", UI_VISIT, f"http://127.0.0.1:{PORT}", password])
    # a login that works proves this start (with its fresh data dir) is the one answering
    logged_in = "/auth/login 200" in visited
    report.steps.append(Step(f"ui-{name}", 0 if logged_in else 1, 0.0, visited))
    if not logged_in:
        raise VerifyError(_failure(cell, report.steps[-1], "the admin could not log in"))
    time.sleep(SETTLE)
    events = egress.collect(audit.sinkhole)[mark:]
    _, hook = exec_in(box, ["sh", "-c", f"cat {calls} 2>/dev/null || true"])
    _, text = exec_in(box, ["cat", log])
    records = [json.loads(line) for line in hook.splitlines() if line.startswith("{")]
    return AuditedRun(name, healthz, worker, events, records, text)


# Stops every gpustack process in the container (server, worker, their children): TERM, then
# KILL, then waits until the ports are free. By command line, as setproctitle renames the worker.
STOP = """
import os, signal, socket, sys, time
def ours():
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(pid) != os.getpid() and b"gpustack" in open(f"/proc/{pid}/cmdline", "rb").read():
                found.append(int(pid))
        except OSError:
            pass
    return found
def listening(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
    for pid in ours():
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    for _ in range(wait):
        if not ours() and not any(listening(p) for p in map(int, sys.argv[1:])):
            sys.exit(0)
        time.sleep(1)
sys.exit(f"gpustack processes {ours()} or ports {sys.argv[1:]} survive SIGKILL")
"""


def stop_gpustack(box: Any, cell: Cell, report: Report) -> None:
    """Stop the first start completely, so that the second one is measured on its own."""
    started = time.monotonic()
    code, out = exec_in(box, ["python3", "-c", STOP, str(PORT), str(WORKER_PORT)])
    report.steps.append(Step("stop-upstream", code, round(time.monotonic() - started, 1), out))
    if code != 0:
        raise VerifyError(_failure(cell, report.steps[-1]))


def wait_healthy(
    box: Any,
    cell: Cell,
    report: Report,
    name: str,
    port: int,
    timeout: float,
    log: str = "/tmp/gpustack.log",
) -> float:
    """Poll /healthz on `port` inside the container; the seconds it took, or VerifyError."""
    started = time.monotonic()
    while True:
        code, _ = exec_in(box, ["python3", "-c", HEALTH_PROBE, str(port)])
        waited = round(time.monotonic() - started, 1)
        if code == 0:
            report.steps.append(Step(name, 0, waited, f"200 OK on port {port}"))
            return waited
        # A worker that reaches for a tool never gets healthy: say so at once, with the lines.
        signs = [arg for sign in DOWNLOAD_SIGNS for arg in ("-e", sign)]
        reached, _ = exec_in(box, ["grep", "-q", "-F", *signs, log])
        if reached == 0:
            _, text = exec_in(box, ["cat", log])
            offline_tools_step(cell, text)
        alive, _ = exec_in(box, ["sh", "-c", 'kill -0 "$(cat /tmp/gpustack.pid)"'])
        if alive != 0 or waited > timeout:
            _, tail = exec_in(box, ["tail", "-n", "60", log])
            why = "exited" if alive != 0 else f"did not answer /healthz on {port} in {timeout:.0f}s"
            result = Step(name, 1, waited, tail)
            report.steps.append(result)
            raise VerifyError(_failure(cell, result, f"gpustack start {why}"))
        time.sleep(3)


def egress_summary(judged: egress.EgressReport) -> dict[str, Any]:
    hosts = [h for h in judged.hosts.values() if h.host]
    return {"hosts_attempted": len(hosts), "hosts": [h.host for h in hosts]}


def egress_step(
    cell: Cell, judged: egress.EgressReport, run: AuditedRun, allowlist: Sequence[str]
) -> Step:
    """Fail the cell on any outside host not allowed for it, naming host, process and log."""
    bad = egress.unexpected(judged, allowlist)
    if not bad:
        allowed = sorted(h.host for h in judged.hosts.values())
        return Step("egress", 0, 0.0, f"outside hosts attempted: {allowed or 'none'}")
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
    names = ", ".join(h.host for h in bad)
    raise VerifyError(_failure(cell, step, f"the configured first start tried to reach {names}"))


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
        raise VerifyError(_failure(cell, step, "the worker tried to download tools at start"))
    if len(skipped) < 3:
        step = Step("tools-offline", 1, 0.0, "\n".join(lines[-40:]))
        raise VerifyError(
            _failure(cell, step, f"the worker confirmed only {len(skipped)} of 3 bundled tools")
        )
    return Step("tools-offline", 0, 0.0, "\n".join(skipped))


def _failure(cell: Cell, step: Step, summary: str = "") -> str:
    tail = "\n".join(step.output.strip().splitlines()[-40:])
    head = summary or f"step {step.name!r} exited {step.code}"
    return f"{cell.id}: verification failed: {head}:\n{tail}"


def write_report(report: Report, path: Path) -> None:
    data = asdict(report)
    data.pop("egress_details")  # written whole to <cell>.egress.json
    write_text(path, json.dumps(data, indent=2) + "\n")
