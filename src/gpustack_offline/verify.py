"""Verification: a bundle installs and runs in a clean container with no route out.

Each bundle is mounted read-only into a fresh Debian container of the cell's architecture (arm64
under qemu) on a Docker network made with `--internal`. There it runs exactly what a site runs:
the sums, the preflight, the install, then `gpustack version` and `gpustack start`, which must
answer `/healthz` within a bound. A bundle that merely installs is not verified.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from .containers import BUILDER_PYTHON, base_image, container, exec_in, internal_network
from .errors import BundleError, VerifyError
from .fsutil import write_text
from .matrix import Cell

PREFIX = "/opt/gpustack"
PORT = 8080
# Docker's --internal network drops forwarding out of the bridge (a default route still shows);
# its embedded DNS answers no outside name. A name that resolves means the isolation is broken.
NO_OUTSIDE_NAMES = (
    "import socket, sys\n"
    "try:\n"
    "    socket.getaddrinfo('pypi.org', 443)\n"
    "except OSError:\n"
    "    sys.exit(0)\n"
    "sys.exit('pypi.org resolves inside the container: it is not isolated')\n"
)
HEALTH_PROBE = (
    "import sys, urllib.request\n"
    "try:\n"
    f"    r = urllib.request.urlopen('http://127.0.0.1:{PORT}/healthz', timeout=5)\n"
    "    sys.exit(0 if r.status == 200 else 1)\n"
    "except Exception:\n"
    "    sys.exit(1)\n"
)


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
    note: str = ""


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


def _fake_nvidia_smi() -> Path:
    return Path(str(resources.files("gpustack_offline") / "fakes" / "nvidia-smi"))


def verify(
    cell: Cell, bundle_dir: Path, cache: Path, timeout: int, mirror: str, report_path: Path
) -> Report:
    """Verify one bundle folder; write the report beside it; raise VerifyError if it failed."""
    report = Report(cell=cell.id)
    try:
        return _verify(cell, bundle_dir, cache, timeout, mirror, report)
    except BundleError as exc:
        report.note = str(exc)
        raise
    finally:
        write_report(report, report_path)


def _verify(
    cell: Cell, bundle_dir: Path, cache: Path, timeout: int, mirror: str, report: Report
) -> Report:
    reason = unverifiable_reason(cell)
    if reason:
        raise Unverifiable(reason)
    if not (bundle_dir / "manifest.json").is_file():
        raise VerifyError(f"{bundle_dir} is not a bundle (no manifest.json); build it first")
    image = base_image(cell.arch, cache, mirror)
    mounts = {bundle_dir.resolve(): "/bundle"}
    env = {}
    if cell.cuda:
        # No GPU here: a stand-in nvidia-smi reports a driver of exactly the cell's floor.
        mounts[_fake_nvidia_smi()] = "/usr/local/bin/nvidia-smi"
        env["FAKE_NVIDIA_CUDA"] = cell.cuda
    with container(
        image,
        network=internal_network(),
        mounts=mounts,
        read_only=list(mounts.values()),
        env=env,
        name_hint=f"verify-{cell.arch}",
    ) as box:

        def step(name: str, argv: list[str]) -> Step:
            started = time.monotonic()
            code, output = exec_in(box, argv, env=env)
            result = Step(name, code, round(time.monotonic() - started, 1), output)
            report.steps.append(result)
            if code != 0:
                raise VerifyError(_failure(cell, result))
            return result

        step("isolation", ["python3", "-c", NO_OUTSIDE_NAMES])
        step("sums", ["sh", "-c", "cd /bundle && sha256sum -c --quiet --strict SHA256SUMS"])
        step("preflight", ["/bundle/preflight.sh", "--json", "--prefix", PREFIX])
        step("install", ["/bundle/install.sh", "--prefix", PREFIX])
        step("cli", [f"{PREFIX}/bin/gpustack", "version"])
        start = (
            f"nohup {PREFIX}/bin/gpustack start --port {PORT} --data-dir /var/lib/gpustack "
            "> /tmp/gpustack.log 2>&1 & echo $! > /tmp/gpustack.pid"
        )
        step("start", ["sh", "-c", start])
        started = time.monotonic()
        while True:
            code, _ = exec_in(box, ["python3", "-c", HEALTH_PROBE])
            if code == 0:
                report.seconds_to_healthz = round(time.monotonic() - started, 1)
                break
            alive, _ = exec_in(box, ["sh", "-c", 'kill -0 "$(cat /tmp/gpustack.pid)"'])
            waited = time.monotonic() - started
            if alive != 0 or waited > timeout:
                _, log = exec_in(box, ["sh", "-c", "tail -n 60 /tmp/gpustack.log"])
                why = "exited" if alive != 0 else f"did not answer /healthz within {timeout}s"
                result = Step("healthz", 1, round(waited, 1), log)
                report.steps.append(result)
                raise VerifyError(_failure(cell, result, f"gpustack start {why}"))
            time.sleep(3)
        report.steps.append(Step("healthz", 0, report.seconds_to_healthz, "200 OK"))
    report.ok = True
    return report


def _failure(cell: Cell, step: Step, summary: str = "") -> str:
    tail = "\n".join(step.output.strip().splitlines()[-40:])
    head = summary or f"step {step.name!r} exited {step.code}"
    return f"{cell.id}: verification failed: {head}:\n{tail}"


def write_report(report: Report, path: Path) -> None:
    write_text(path, json.dumps(asdict(report), indent=2) + "\n")
