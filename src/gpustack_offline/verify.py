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
from typing import Any

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
    kind = int.from_bytes(head[18:20], "little") if head[:4] == b"\x7fELF" else None
    if kind != machine:
        print(f"FAIL {name}: ELF machine {kind}, this machine is {machine}")
        failed = True
        continue
    run = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=120)
    out = (run.stdout + run.stderr).strip()
    # A CUDA build loads the driver's libraries, which a container without a GPU lacks.
    waits_for_driver = driver_only and "error while loading shared libraries: libcu" in out
    ok = run.returncode == 0 or waits_for_driver
    failed |= not ok
    note = " (runs up to loading the NVIDIA driver's libraries)" if waits_for_driver else ""
    print(f"{'ok' if ok else 'FAIL'} {name}{note}: {' | '.join(out.splitlines()[:3])}")
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
            f"nohup {PREFIX}/bin/gpustack start --debug --port {PORT} "
            "--data-dir /var/lib/gpustack > /tmp/gpustack.log 2>&1 & echo $! > /tmp/gpustack.pid"
        )
        step("start", ["sh", "-c", start])
        started = time.monotonic()
        report.seconds_to_healthz = wait_healthy(box, cell, report, "healthz", PORT, timeout)
        report.seconds_to_worker = wait_healthy(
            box, cell, report, "worker", WORKER_PORT, timeout - (time.monotonic() - started)
        )
        if (bundle_dir / "bundle.env").read_text().find("TOOLS_ARCHIVE=tools/") >= 0:
            _, log = exec_in(box, ["cat", "/tmp/gpustack.log"])
            report.steps.append(offline_tools_step(cell, log))
            step("tools", [f"{PREFIX}/current/bin/python", "-c", TOOLS_EXEC, cell.device])
    report.ok = True
    return report


def wait_healthy(
    box: Any, cell: Cell, report: Report, name: str, port: int, timeout: float
) -> float:
    """Poll /healthz on `port` inside the container; the seconds it took, or VerifyError."""
    started = time.monotonic()
    while True:
        code, _ = exec_in(box, ["python3", "-c", HEALTH_PROBE, str(port)])
        waited = round(time.monotonic() - started, 1)
        if code == 0:
            report.steps.append(Step(name, 0, waited, f"200 OK on port {port}"))
            return waited
        alive, _ = exec_in(box, ["sh", "-c", 'kill -0 "$(cat /tmp/gpustack.pid)"'])
        if alive != 0 or waited > timeout:
            _, log = exec_in(box, ["sh", "-c", "tail -n 60 /tmp/gpustack.log"])
            why = (
                "exited"
                if alive != 0
                else f"did not answer /healthz on {port} within {timeout:.0f}s"
            )
            result = Step(name, 1, waited, log)
            report.steps.append(result)
            raise VerifyError(_failure(cell, result, f"gpustack start {why}"))
        time.sleep(3)


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
    write_text(path, json.dumps(asdict(report), indent=2) + "\n")
