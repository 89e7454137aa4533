"""Verification of an upgrade across the gap: an old pip bundle installed, used, upgraded with a
delta bundle of a newer cell, and rolled back, all offline in one clean container.

The container is the one `verify.pip` uses (Debian of the cell's arch, an internal network, the
sinkhole as its only resolver). The bundles are mounted read-only; the delta is copied to the
container's disk first, as a site copies it from the transfer media, because `install.sh`
completes it there from the pieces the site kept.

1. the old bundle is installed and started as `install.sh` configures it; the admin logs in with
   the initial password, changes it, and creates an API key (`before-upgrade`);
2. GPUStack is stopped, the delta is installed over it (the database is copied first), and the
   new release starts on the same data directory: it must answer `/healthz` and its worker, the
   admin must log in with the changed password and see the key; a second key (`after-upgrade`)
   is made. The delta's install and this start must reach no outside host;
3. GPUStack is stopped and `install.sh --rollback` switches back and restores the database copy:
   the old release starts, the admin logs in with the changed password, and sees
   `before-upgrade` but not `after-upgrade`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gpustack_offline import payload
from gpustack_offline.core.docker import client, exec_in, internal_network, remove_images
from gpustack_offline.core.errors import VerifyError
from gpustack_offline.core.matrix import Cell
from gpustack_offline.verify import egress
from gpustack_offline.verify.common import (
    SETTLE,
    Report,
    Step,
    audit_hook,
    egress_step,
    egress_summary,
    failure,
)
from gpustack_offline.verify.docker import (
    IMAGE_PORT,
    PASSWORD_FILE,
    ImageStart,
    bundle_images,
    host_step,
    read_env_file,
    run_audited,
)
from gpustack_offline.verify.pip import (
    ISOLATION,
    PORT,
    PREFIX,
    SITE_START,
    Start,
    exec_step,
    finish,
    launch,
    observe,
    target_container,
)

if TYPE_CHECKING:
    from docker.models.containers import Container

STATE_PROBE = payload.path("state_probe.py").read_text()
DATA_DIR = "/var/lib/gpustack-site"  # `launch`'s data dir for a start named "site"
NEW_PASSWORD = "Upgrade-Check-1!"
STOP = (
    'pid=$(cat /tmp/gpustack.pid); kill -TERM -- -"$pid" 2>/dev/null || kill -TERM "$pid"; '
    'for _ in $(seq 120); do kill -0 "$pid" 2>/dev/null || exit 0; sleep 0.5; done; '
    'kill -KILL -- -"$pid"; exit 0'
)


def verify_upgrade(
    cell: Cell,
    old_dir: Path,
    delta_dir: Path,
    cache: Path,
    timeout: int,
    mirror: str,
    report: Report,
    allowlist: Sequence[str],
) -> Report:
    """The upgrade from the bundle `old_dir` with the delta `delta_dir` (of `cell`), as the
    module's doc says."""
    mounts = {
        old_dir.resolve(): "/old",
        delta_dir.resolve(): "/delta-media",
        audit_hook(): "/opt/egress-audit",
    }
    with target_container(cell, cache, mirror, mounts, f"upgrade-{cell.arch}") as audit:
        box = audit.box
        network = audit.sinkhole.network
        url = f"http://127.0.0.1:{PORT}"

        def step(name: str, argv: list[str]) -> Step:
            return exec_step(cell, report, box, name, argv)

        def start(label: str, login: bool) -> Start:
            run = Start(box, "site", SITE_START, egress.address_of(box, network))
            first = len(report.steps)
            launch(cell, report, run, {})
            observe(cell, report, [run], timeout, login=login)
            for entry in report.steps[first:]:  # start-site -> start-old, healthz-old, ...
                entry.name = entry.name.removesuffix("-site") + f"-{label}"
            return run

        def state(name: str, *args: str) -> dict[str, object]:
            result = step(name, ["python3", "-c", STATE_PROBE, url, *args])
            found: dict[str, object] = json.loads(result.output.strip().splitlines()[-1])
            return found

        step("isolation", ["python3", "-c", ISOLATION, audit.sinkhole.address])
        install = ["--prefix", PREFIX, "--data-dir", DATA_DIR]
        step("install-old", ["/old/install.sh", *install])
        start("old", login=True)
        state("state-made", f"{DATA_DIR}/initial_admin_password", NEW_PASSWORD, "before-upgrade")
        step("stop-old", ["sh", "-c", STOP])

        mark = len(egress.read_events(audit.sinkhole))
        step("copy-delta", ["cp", "-a", "/delta-media", "/tmp/delta"])
        step("install-delta", ["/tmp/delta/install.sh", *install])
        new = start("new", login=False)
        kept = state("state-kept", NEW_PASSWORD, "", "after-upgrade")
        if kept.get("keys") != ["after-upgrade", "before-upgrade"]:
            raise VerifyError(
                failure(cell, report.steps[-1], "the upgraded release lost the state")
            )
        time.sleep(SETTLE)
        events = egress.collect(audit.sinkhole)[mark:]
        site = finish(new, events)
        report.seconds_to_healthz = site.seconds_to_healthz
        report.seconds_to_worker = site.seconds_to_worker
        judged = egress.summarize(events)
        report.egress = egress_summary(judged)
        report.egress_details = {"upgrade": judged}
        report.steps.append(egress_step(cell, judged, site, allowlist))
        step("stop-new", ["sh", "-c", STOP])

        step("rollback", ["/tmp/delta/install.sh", "--prefix", PREFIX, "--rollback",
                          "--data-dir", DATA_DIR])  # fmt: skip
        old_version = step("cli-rolled-back", [f"{PREFIX}/bin/gpustack", "version"])
        start("rolled-back", login=False)
        back = state("state-restored", NEW_PASSWORD)
        if back.get("keys") != ["before-upgrade"]:
            raise VerifyError(
                failure(cell, report.steps[-1], "the rollback did not restore the old state")
            )
        report.note = f"rolled back to {old_version.output.strip().splitlines()[-1]}"
        step("stop-rolled-back", ["sh", "-c", STOP])
    report.ok = True
    return report


def verify_docker_upgrade(
    cell: Cell,
    old_dir: Path,
    delta_dir: Path,
    timeout: int,
    report: Report,
    sinkhole_image: str,
    allowlist: Sequence[str],
) -> Report:
    """The same upgrade for a GPUStack 0.x docker bundle: install.sh loads the old image, which
    runs with its docker.env on a data volume of its own; the delta (copied to disk) completes
    its image layers from the old bundle (`--base`), copies the database in the volume and
    loads the new image, which starts on the same volume; `--rollback` puts the database back
    and the old image starts again. Each start runs with the sinkhole as its resolver."""
    old_ref, new_ref = bundle_images(old_dir)[0], bundle_images(delta_dir)[0]
    engine = client()
    volume = f"gpustack-offline-upgrade-{int(time.time() * 1000) % 10**9}"
    url = f"http://127.0.0.1:{IMAGE_PORT}"

    def state(name: str, *args: str) -> Callable[[Container], None]:
        def run_probe(box: Container) -> None:
            started = time.monotonic()
            code, out = exec_in(box, ["python3", "-c", STATE_PROBE, url, *args])
            found = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
            step = Step(name, code, round(time.monotonic() - started, 1), out)
            report.steps.append(step)
            want = {"state-kept": ["after-upgrade", "before-upgrade"],
                    "state-restored": ["before-upgrade"]}.get(name)  # fmt: skip
            if code != 0 or (want is not None and found.get("keys") != want):
                raise VerifyError(failure(cell, step, f"{name}: the state is not as it was"))

        return run_probe

    added = [old_ref, new_ref]
    try:
        with tempfile.TemporaryDirectory(prefix="upgrade-prefix-") as prefix:
            common = ["--prefix", prefix, "--volume", volume]
            host_step(cell, report, "install-old", ["bash", str(old_dir / "install.sh"), *common])
            env = read_env_file(Path(prefix) / "docker.env")
            media = Path(prefix) / "delta"
            shutil.copytree(delta_dir, media, symlinks=True)
            with (
                egress.sinkhole(sinkhole_image, internal_network()) as hole,
                egress.resolver_mounts(hole) as dns,
            ):
                audit = (engine, hole, dns)
                made = state("state-made", PASSWORD_FILE, NEW_PASSWORD, "before-upgrade")
                old = ImageStart("old", IMAGE_PORT, env=env, volume=volume, during=made)
                run_audited(audit, cell, old_ref, old, timeout, report)
                install_delta = ["bash", str(media / "install.sh"), *common, "--base", str(old_dir)]
                host_step(cell, report, "install-delta", install_delta)
                kept = state("state-kept", NEW_PASSWORD, "", "after-upgrade")
                new = ImageStart("new", IMAGE_PORT, env=env, volume=volume, log_in=False,
                                 during=kept)  # fmt: skip
                site = run_audited(audit, cell, new_ref, new, timeout, report)
                report.seconds_to_healthz = site.seconds_to_healthz
                report.seconds_to_worker = site.seconds_to_worker
                report.egress = egress_summary(site.egress)
                report.egress_details = {"upgrade": site.egress}
                egress_step(cell, site.egress, site, allowlist, report)
                host_step(cell, report, "rollback",
                          ["bash", str(media / "install.sh"), *common, "--rollback"])  # fmt: skip
                restored = state("state-restored", NEW_PASSWORD)
                back = ImageStart("rolled-back", IMAGE_PORT, env=env, volume=volume,
                                  log_in=False, during=restored)  # fmt: skip
                run_audited(audit, cell, old_ref, back, timeout, report)
        report.note = f"rolled back to {old_ref}"
    finally:
        remove_images(engine, added)
        with contextlib.suppress(Exception):
            engine.volumes.get(volume).remove(force=True)
    report.ok = True
    return report
