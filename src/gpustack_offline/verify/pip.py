"""Verification: a bundle installs and runs in a clean container with no route out.

Each bundle is mounted read-only into a fresh Debian container of the cell's architecture (arm64
under qemu) on a Docker network made with `--internal`. There it runs exactly what a site runs:
the sums, the preflight, the install, then `gpustack version` and `gpustack start`, which must
answer `/healthz` within a bound. A bundle that merely installs is not verified.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gpustack_offline import payload
from gpustack_offline.core.docker import base_image, exec_in, internal_network
from gpustack_offline.core.errors import VerifyError
from gpustack_offline.core.matrix import Cell
from gpustack_offline.verify import egress
from gpustack_offline.verify.common import (
    AUDIT_LOG,
    DOWNLOAD_SIGNS,
    HEALTH_PROBE,
    HOST_ARCH,
    SETTLE,
    UI_VISIT,
    WORKER_PORT,
    AuditedRun,
    Report,
    Step,
    audit_hook,
    egress_step,
    egress_summary,
    failure,
    offline_tools_step,
)

if TYPE_CHECKING:
    from docker.models.containers import Container

PREFIX = "/opt/gpustack"
PORT = 8080
# Scripts run in the target as `python3 -c TEXT ARG...` (payload/*.py): names resolve only to the
# sinkhole and a public address does not answer; every bundled tool runs (with the installed
# release's Python); every gpustack process is stopped and its ports are free.
ISOLATION = payload.path("isolation.py").read_text()
TOOLS_EXEC = payload.path("check_tools.py").read_text()
STOP = payload.path("stop_gpustack.py").read_text()
# The documented start, and the one install.sh configures for an air-gapped site.
UPSTREAM_START = f"exec {PREFIX}/bin/gpustack start"
SITE_START = (
    f"set -a; . {PREFIX}/gpustack.env; set +a; "
    f"exec {PREFIX}/bin/gpustack start --config-file {PREFIX}/gpustack.yaml"
)


def _fake_nvidia_smi() -> Path:
    return payload.path("fakes/nvidia-smi")


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
    mounts = {bundle_dir.resolve(): "/bundle", audit_hook(): "/opt/egress-audit"}
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
                raise VerifyError(failure(cell, result))
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
        raise VerifyError(failure(cell, report.steps[-1]))
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
        raise VerifyError(failure(cell, report.steps[-1], "the admin could not log in"))
    time.sleep(SETTLE)
    events = egress.collect(audit.sinkhole)[mark:]
    _, hook = exec_in(box, ["sh", "-c", f"cat {calls} 2>/dev/null || true"])
    _, text = exec_in(box, ["cat", log])
    records = [json.loads(line) for line in hook.splitlines() if line.startswith("{")]
    return AuditedRun(name, healthz, worker, events, records, text)


def stop_gpustack(box: Container, cell: Cell, report: Report) -> None:
    """Stop the first start completely, so that the second one is measured on its own."""
    started = time.monotonic()
    code, out = exec_in(box, ["python3", "-c", STOP, str(PORT), str(WORKER_PORT)])
    report.steps.append(Step("stop-upstream", code, round(time.monotonic() - started, 1), out))
    if code != 0:
        raise VerifyError(failure(cell, report.steps[-1]))


def wait_healthy(
    box: Container,
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
            raise VerifyError(failure(cell, result, f"gpustack start {why}"))
        time.sleep(3)
