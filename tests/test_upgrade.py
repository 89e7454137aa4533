"""An upgrade across the gap, end to end: GPUStack 0.6.2 and 0.7.1 bundles built from PyPI, the
0.7.1 delta against the 0.6.2 bundle, and `nox -s upgrade`'s verification: 0.6.2 installed
offline and given state through its API, upgraded with the delta (state kept, no outside host),
rolled back (the old state back)."""

from __future__ import annotations

import json

import pytest

from gpustack_offline.bundle import delta
from gpustack_offline.bundle.release import read_sums
from gpustack_offline.cli import commands

pytestmark = pytest.mark.integration

OLD = "v0.6.2-linux-amd64-cpu-py3.11-base-pip"
NEW = "v0.7.1-linux-amd64-cpu-py3.11-base-pip"
STEPS = [
    "isolation", "install-old", "start-old", "healthz-old", "worker-old", "ui-old", "state-made",
    "stop-old", "copy-delta", "install-delta", "start-new", "healthz-new", "worker-new",
    "state-kept", "egress", "stop-new", "rollback", "cli-rolled-back", "start-rolled-back",
    "healthz-rolled-back", "worker-rolled-back", "state-restored", "stop-rolled-back",
]  # fmt: skip


def test_a_delta_upgrade_keeps_the_state_and_rolls_back(pip_ctx) -> None:
    (old,) = commands.build(pip_ctx, [pip_ctx.matrix.cell(OLD)])
    (new,) = commands.build(pip_ctx, [pip_ctx.matrix.cell(NEW)], since=old.directory)

    base = delta.read_base(old.directory)
    delta_dir = pip_ctx.dist / delta.delta_name(NEW, base)
    assert (pip_ctx.dist / f"{delta_dir.name}.tar").is_file()
    carried = sum(p.stat().st_size for p in delta_dir.rglob("*") if p.is_file())
    floor = delta.floor(new.directory, base)
    assert carried <= 1.05 * floor + 1_000_000
    assert carried < new.bytes / 2  # most wheels are the same across the two releases
    left = json.loads((delta_dir / delta.BASE_FILE).read_text())["left_out"]
    old_digests = set(read_sums(old.directory / "SHA256SUMS").values())
    assert left and all(entry["sha256"] in old_digests for entry in left)

    report = commands._recipes().verify_upgrade(pip_ctx, delta_dir)
    assert report.ok
    assert [s.name for s in report.steps] == STEPS
    kept = json.loads(report.steps[STEPS.index("state-kept")].output.splitlines()[-1])
    assert kept["keys"] == ["after-upgrade", "before-upgrade"] and kept["login"] == 200
    back = json.loads(report.steps[STEPS.index("state-restored")].output.splitlines()[-1])
    assert back["keys"] == ["before-upgrade"] and back["login"] == 200
    assert "0.6.2" in report.note
    assert report.egress == {"hosts_attempted": 0, "hosts": []}
    audit = json.loads((pip_ctx.dist / f"{delta_dir.name}.upgrade.egress.json").read_text())
    assert "upgrade" in audit
