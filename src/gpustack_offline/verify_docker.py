"""Verification of a docker bundle, as a site uses it: load it, run it offline, push it, run again.

The build host's own Docker Engine plays the target's. The cell's images must be absent from it
first (a bundle that "loads" an image already there proves nothing); `install.sh` then loads the
bundle's tar, the image runs on the `--internal` network with nothing pulled and must answer
`/healthz` from inside; then the same bundle is pushed with `install.sh --registry` into a
loopback distribution registry (the site's registry), the local copies are removed, and the
image pulled from that registry must run and answer again. Everything it adds is removed.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests

from .containers import client, internal_network
from .errors import VerifyError
from .matrix import Cell
from .verify import HEALTH_PROBE, Report, Step, _failure

IMAGE_PORT = 80  # upstream's images run `gpustack start`, which listens on 80 by default


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


def verify_docker(cell: Cell, bundle_dir: Path, timeout: int, report: Report) -> Report:
    refs = bundle_images(bundle_dir)
    if not refs:
        raise VerifyError(f"{bundle_dir}: bundle.env names no IMAGES; rebuild the bundle")
    engine = client()
    added: list[str] = []

    def step(name: str, argv: list[str]) -> Step:
        started = time.monotonic()
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        result = Step(name, proc.returncode, round(time.monotonic() - started, 1),
                      proc.stdout + proc.stderr)  # fmt: skip
        report.steps.append(result)
        if proc.returncode != 0:
            raise VerifyError(_failure(cell, result))
        return result

    present = [r for r in refs if _has(engine, r)]
    report.steps.append(Step("absent", 1 if present else 0, 0.0, " ".join(present) or "none"))
    if present:
        raise VerifyError(
            f"{cell.id}: {', '.join(present)} is already in this Docker Engine, so loading the "
            f"bundle would prove nothing; remove it (`docker rmi {' '.join(present)}`) and rerun"
        )
    # No NVIDIA runtime here: cuda cells skip the preflight, and run without --gpus.
    skip = ["--skip-preflight"] if cell.cuda else []
    try:
        added += refs
        step("install", ["bash", str(bundle_dir / "install.sh"), *skip])
        report.seconds_to_healthz = _run_and_probe(engine, cell, refs[0], "run", timeout, report)
        with site_registry() as host:
            step("push", ["bash", str(bundle_dir / "install.sh"), "--registry", host, *skip])
            pushed = [f"{host}/{r}" for r in refs]
            added += pushed
            for ref in refs + pushed:
                engine.images.remove(ref, force=True)
            step("pull", ["docker", "pull", pushed[0]])
            _run_and_probe(engine, cell, pushed[0], "run-from-registry", timeout, report)
    finally:
        for ref in added:
            with contextlib.suppress(Exception):
                engine.images.remove(ref, force=True)
    report.ok = True
    return report


def _has(engine: Any, ref: str) -> bool:
    import docker.errors

    try:
        engine.images.get(ref)
    except docker.errors.ImageNotFound:
        return False
    return True


def _run_and_probe(
    engine: Any, cell: Cell, ref: str, name: str, timeout: int, report: Report
) -> float:
    """Run the image as it is (its own entrypoint) on the internal network; nothing is pulled."""
    box = engine.containers.create(
        ref, network=internal_network(), name=f"verify-{name}-{int(time.time() * 1000) % 10**9}"
    )
    try:
        box.start()
        started = time.monotonic()
        while True:
            code, _ = box.exec_run(["python3", "-c", HEALTH_PROBE, str(IMAGE_PORT)])
            waited = round(time.monotonic() - started, 1)
            if code == 0:
                report.steps.append(Step(name, 0, waited, f"{ref}: /healthz 200 on {IMAGE_PORT}"))
                return waited
            box.reload()
            if box.status != "running" or waited > timeout:
                logs = box.logs(tail=40).decode(errors="replace")
                result = Step(name, 1, waited, logs)
                report.steps.append(result)
                why = "exited" if box.status != "running" else f"no /healthz in {timeout}s"
                raise VerifyError(_failure(cell, result, f"{ref} {why}"))
            time.sleep(3)
    finally:
        with contextlib.suppress(Exception):
            box.remove(force=True)
