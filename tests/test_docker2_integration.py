"""GPUStack 2.x end to end: runner list → pins → one bundle → site registry → server offline.

Docker Hub is the loopback hub (token auth), seeded with stand-ins for exactly the images
upstream's runner list names for the cell (tests/gpustack2_images.py): the server image carrying
the real GPUStack 2.3.0 probe routes, two runners sharing a base layer, pause and health. The
build pins and pulls them through the `registry-mirror` option; verification pushes them into a
loopback site registry with install.sh and checks every reference the worker will compute.
"""

from __future__ import annotations

import json
import shutil

import pytest
from support.gpustack2_images import push_images, runner_images, server_image
from support.registry_fixture import AMD64, Hub, hub_fixture  # noqa: F401 - the hub fixture

from gpustack_offline.cli import commands
from gpustack_offline.stages import runners
from gpustack_offline.stages.registry import PlatformError

pytestmark = pytest.mark.integration

CELL = "v2.3.0-linux-amd64-cuda12.9-py3.11-vllm+sglang-docker"
ARM_CELL = "v2.3.0-linux-arm64-cuda12.9-py3.11-vllm+sglang-docker"


@pytest.fixture(scope="module")
def ctx(root, hub: Hub, tmp_path_factory):
    runners_dir = tmp_path_factory.mktemp("runners")
    shutil.copy(root / "bundles/runners/gpustack-2.3.0.json", runners_dir)
    cli = {
        "dist_dir": str(tmp_path_factory.mktemp("dist")),
        "images_pins_dir": str(tmp_path_factory.mktemp("pins")),
        "runners_dir": str(runners_dir),
        "registry_mirror": hub.host,
        "progress": False,
    }
    ctx = commands.Context.load(root, cli=cli)
    cell = ctx.matrix.cell(CELL)
    selection = runners.cell_selection(runners_dir, "2.3.0", "amd64", "cuda12.9", cell.extra_names)
    names = [i.name for i in selection.images]
    # amd64 only: the arm64 cell must be refused, naming what the hub has
    push_images(hub, {names[0]: server_image("2.3.0", (AMD64,))})
    push_images(hub, runner_images(names[1:], (AMD64,)))
    return ctx


def test_a_2x_bundle_carries_upstreams_images_and_every_worker_reference_resolves(ctx, root):
    cell = ctx.matrix.cell(CELL)
    pins = commands.lock(ctx, [cell])
    # the runner list was read again from the gpustack-runner wheel 2.3.0 pins: same data
    runner_data = ctx.opts.path("runners_dir", root) / "gpustack-2.3.0.json"
    assert runner_data.read_text() == (root / "bundles/runners/gpustack-2.3.0.json").read_text()
    pin_files = sorted(p.name for p in ctx.opts.path("images_pins_dir", root).iterdir())
    assert pin_files == [
        "benchmark-runner-2.3.0.toml",
        "gpustack-2.3.0.toml",
        "runner-2.3.0.toml",
        "runtime-2.3.0.toml",
    ]
    assert pins

    (result,) = commands.build(ctx, [cell])
    manifest = json.loads((result.directory / "manifest.json").read_text())
    refs = sorted(i["reference"] for i in manifest["images"])
    assert refs == sorted(
        [
            "docker.io/gpustack/gpustack:v2.3.0",
            "docker.io/gpustack/runner:cuda12.9-vllm0.32.0",
            "docker.io/gpustack/runner:cuda12.9-sglang0.5.18",
            "docker.io/gpustack/runtime:pause",
            "docker.io/gpustack/runtime:health",
            "docker.io/gpustack/benchmark-runner:v0.0.9",
        ]
    )
    assert {i["platform"] for i in manifest["images"]} == {"linux/amd64"}
    # layers shared by the two runners are there once, in the one export folder
    docker_view = json.loads((result.directory / "images" / "manifest.json").read_text())
    layers = [layer for image in docker_view for layer in image["Layers"]]
    assert len(layers) > len(set(layers))  # shared ones...
    assert all((result.directory / "images" / layer).is_file() for layer in layers)  # ...once
    index = json.loads((result.directory / "images" / "index.json").read_text())
    assert len(index["manifests"]) == 6
    sbom = json.loads((result.directory / "sbom.cdx.json").read_text())
    assert {c["name"] for c in _walk(sbom["components"]) if c["type"] == "container"} >= {
        "docker.io/gpustack/runner",
        "docker.io/gpustack/runtime",
    }

    report = commands.verify_cell(ctx, cell)
    assert report.ok
    names = [s.name for s in report.steps]
    assert names == ["absent", "install", "registry-references", "pull", "healthz-server"]
    resolved = report.steps[2].output.splitlines()
    assert len(resolved) == 6 and all("(linux/amd64)" in line for line in resolved)
    assert all("/site/mirror/gpustack/" in line for line in resolved)  # under the prefix
    assert any("/gpustack/runtime:pause -> sha256:" in line for line in resolved)
    install_output = report.steps[1].output
    assert "--system-default-container-registry 127.0.0.1:" in install_output
    assert "/gpustack/runner:cuda12.9-sglang0.5.18" in install_output


def test_a_cell_whose_platform_the_upstream_images_lack_is_refused_with_what_they_have(ctx):
    cell = ctx.matrix.cell(ARM_CELL)
    with pytest.raises(PlatformError, match="linux/amd64"):
        commands.lock(ctx, [cell])


def _walk(components):
    for c in components:
        yield c
        yield from _walk(c.get("components", []))
