"""An upgrade across the gap for docker cells: GPUStack 0.6.2 and 0.7.1 cpu image bundles (the
stand-ins of tests/support/gpustack_images.py: the real GPUStack of each version, on one shared
Debian layer), the 0.7.1 delta against the 0.6.2 bundle, and `nox -s upgrade`'s verification:
the old image started on a data volume and given state through its API, the delta installed
(its left-out layers taken from the old bundle, the database in the volume copied), the new
image started on the same volume (state kept, no outside host), rolled back (old state back)."""

from __future__ import annotations

import json

import pytest
from support.gpustack_images import seed_gpustack
from support.registry_fixture import hub_registry

from gpustack_offline.bundle import delta
from gpustack_offline.cli import commands

# The heavy tier: 8.5 min; the default tier's end-to-end upgrade is test_upgrade.py's pip pair.
pytestmark = [pytest.mark.integration, pytest.mark.heavy]

OLD = "v0.6.2-linux-amd64-cpu-py3.11-base-docker"
NEW = "v0.7.1-linux-amd64-cpu-py3.11-base-docker"
STEPS = [
    "install-old", "healthz-old", "worker-old", "ui-old", "state-made",
    "install-delta", "healthz-new", "worker-new", "state-kept", "egress",
    "rollback", "healthz-rolled-back", "worker-rolled-back", "state-restored",
]  # fmt: skip


@pytest.fixture(scope="module")
def ctx(root, matrix, tmp_path_factory, release_mirror):
    with hub_registry(tmp_path_factory.mktemp("hub")) as hub:
        cache = commands.Context.load(root).cache
        for version in ("0.6.2", "0.7.1"):
            seed_gpustack(hub, root, matrix, cache, release_mirror.base_url, version, ("amd64",))
        cli = {
            "dist_dir": str(tmp_path_factory.mktemp("dist")),
            "images_pins_dir": str(tmp_path_factory.mktemp("pins")),
            "registry_mirror": hub.host,
            "progress": False,
        }
        yield commands.Context.load(root, cli=cli)


def test_a_docker_delta_upgrade_keeps_the_state_and_rolls_back(ctx) -> None:
    cells = [ctx.matrix.cell(OLD), ctx.matrix.cell(NEW)]
    commands.lock(ctx, cells)
    (old,) = commands.build(ctx, cells[:1])
    (new,) = commands.build(ctx, cells[1:], since=old.directory)

    base = delta.read_base(old.directory)
    delta_dir = ctx.dist / delta.delta_name(NEW, base)
    left = json.loads((delta_dir / delta.BASE_FILE).read_text())["left_out"]
    assert left and all(e["path"].startswith("images/blobs/") for e in left)  # shared layers
    carried = sum(p.stat().st_size for p in delta_dir.rglob("*") if p.is_file())
    assert carried <= 1.05 * delta.floor(new.directory, base) + 1_000_000

    report = commands._recipes().verify_upgrade(ctx, delta_dir)
    assert report.ok
    assert [s.name for s in report.steps] == STEPS
    install = report.steps[STEPS.index("install-delta")].output
    assert "delta bundle (base.json): taking the pieces it left out" in install
    assert "was copied to" in install  # the database in the volume, before the first start
    kept = json.loads(report.steps[STEPS.index("state-kept")].output.splitlines()[-1])
    assert kept["login"] == 200 and kept["keys"] == ["after-upgrade", "before-upgrade"]
    back = json.loads(report.steps[STEPS.index("state-restored")].output.splitlines()[-1])
    assert back["keys"] == ["before-upgrade"]
    assert report.egress == {"hosts_attempted": 0, "hosts": []}
