"""The Docker path end to end: pin, pull, bundle, load, run offline, push, run from the registry.

Docker Hub is replaced by a loopback registry with token auth in front (the `registry-mirror`
option redirects docker.io to it, as a site's mirror would), seeded with stand-ins for
gpustack/gpustack:v0.7.1, -cpu and -cuda12.8 for amd64 and arm64 that carry the real GPUStack
(tests/gpustack_images.py). The engine never pulls from anywhere but 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re

import pytest
from support.disk import extra_disk
from support.gpustack_images import seed_gpustack
from support.registry_fixture import gpustack_tags, hub_registry

from gpustack_offline.bundle import assemble
from gpustack_offline.cli import commands
from gpustack_offline.core import docker as containers
from gpustack_offline.core.errors import VerifyError
from gpustack_offline.stages import images
from gpustack_offline.stages.registry import Reference

pytestmark = pytest.mark.integration

CELL = "v0.7.1-linux-amd64-cpu-py3.11-base-docker"
REF = "gpustack/gpustack:v0.7.1-cpu"


@pytest.fixture(scope="module")
def hub(root, matrix, tmp_path_factory, release_mirror):
    with hub_registry(tmp_path_factory.mktemp("hub")) as started:
        cache = commands.Context.load(root).cache
        seed_gpustack(started, root, matrix, cache, release_mirror.base_url)
        yield started


@pytest.fixture(scope="module")
def ctx(root, hub, tmp_path_factory):
    cli = {
        "dist_dir": str(tmp_path_factory.mktemp("dist")),
        "images_pins_dir": str(tmp_path_factory.mktemp("pins")),
        "registry_mirror": hub.host,
        "progress": False,
    }
    return commands.Context.load(root, cli=cli)


def test_a_docker_bundle_loads_runs_offline_and_runs_again_from_a_site_registry(ctx, hub):
    cell = ctx.matrix.cell(CELL)
    (pins,) = set(commands.lock(ctx, [cell]))
    pinned = images.pinned_image(images.read_pins(pins), "-cpu", "linux/amd64")
    assert pinned.reference.tag == "v0.7.1-cpu"

    (result,) = commands.build(ctx, [cell])
    manifest = json.loads((result.directory / "manifest.json").read_text())
    (image,) = manifest["images"]
    assert image["reference"] == f"docker.io/{REF}" and image["platform"] == "linux/amd64"
    assert image["digest"] == pinned.manifest  # the pinned bytes, not whatever the tag is now
    assert "IMAGES=gpustack/gpustack:v0.7.1-cpu" in (result.directory / "bundle.env").read_text()
    names = {p.name for p in (result.directory / "images").iterdir()}
    assert {"oci-layout", "index.json", "manifest.json", "blobs"} <= names  # OCI and docker load

    report = commands.verify_cell(ctx, cell)
    assert report.ok
    assert [s.name for s in report.steps] == [
        "absent", "install",
        "healthz-upstream", "worker-upstream", "ui-upstream",
        "healthz-site", "worker-site", "ui-site", "egress",
        "push", "pull", "run-from-registry",
    ]  # fmt: skip
    assert "/healthz 200" in report.steps[-1].output
    # upstream's run line reaches for the catalog and update hosts; with docker.env, nothing
    assert {"huggingface.co", "update-service.gpustack.ai"} <= set(report.upstream["hosts"])
    assert report.egress == {"hosts_attempted": 0, "hosts": []}


ROCM = "v0.7.1-linux-amd64-rocm6.2-py3.11-base-docker"


def test_a_vendors_image_passes_preflight_on_stand_ins_and_starts_with_upstreams_line(ctx, hub):
    """The AMD image: install.sh's preflight finds the stand-in rocm-smi and the device nodes
    upstream's line for the image names (a stand-in host root), prints that line, and the image
    starts offline with its options (each node /dev/null under its name), audited, then again
    from the site registry."""
    cell = ctx.matrix.cell(ROCM)
    commands.lock(ctx, [cell])
    (result,) = commands.build(ctx, [cell])
    options = (result.directory / assemble.WORKER_OPTIONS).read_text().splitlines()
    assert options == list(cell.worker_options()) and "--device=/dev/kfd" in options

    report = commands.verify_cell(ctx, cell)

    assert report.ok
    install = next(s for s in report.steps if s.name == "install").output
    assert re.search(r"^\[ ok \] rocm-devices +/dev/kfd, /dev/dri$", install, re.M), install
    assert re.search(r"^\[ ok \] rocm-smi ", install, re.M), install
    assert "preflight: passed" in install
    assert all(f"{o} \\\n" in install for o in options), install  # the printed run line
    assert [s.name for s in report.steps][-3:] == ["push", "pull", "run-from-registry"]
    assert report.egress == {"hosts_attempted": 0, "hosts": []}


def _like(ctx, root, **cli):
    """`ctx` (same pins, mirror, cache) with other options."""
    same = {
        "images_pins_dir": ctx.opts.images_pins_dir,
        "registry_mirror": ctx.opts.registry_mirror,
    }
    return commands.Context.load(root, cli={**same, "progress": False, **cli})


def test_a_docker_bundle_is_on_disk_once_beyond_the_cache(ctx, hub, root, tmp_path):
    """Peak extra disk of a build (nothing is deleted after the tar, so the end is the peak):
    the images folder is hard links into the blob store, and the tar the one copy."""
    cell = ctx.matrix.cell(CELL)
    commands.lock(ctx, [cell])
    (result,) = commands.build(_like(ctx, root, dist_dir=str(tmp_path / "dist")), [cell])
    extra = extra_disk([result.directory, result.tar], ctx.cache)
    ratio = extra / result.tar.stat().st_size
    print(f"\npeak extra disk {extra} bytes, bundle tar {result.tar.stat().st_size}: {ratio:.3f}x")
    assert ratio <= 1.1
    blobs = list((result.directory / "images" / "blobs" / "sha256").iterdir())
    stored = [b for b in blobs if ctx.store().path(b.name).is_file()]
    assert stored and all(os.path.samefile(b, ctx.store().path(b.name)) for b in stored)

    # volumes only: no whole tar; the volumes are the one copy and join to the very same tar
    volumes_only = _like(ctx, root, dist_dir=str(tmp_path / "volumes"), write="volumes", split="1M")
    (again,) = commands.build(volumes_only, [cell])
    assert not again.tar.exists()
    parts = sorted(again.tar.parent.glob(f"{CELL}.tar.[0-9]*"))
    joined = tmp_path / "joined.tar"
    with joined.open("wb") as out:
        for part in parts:
            out.write(part.read_bytes())
    assemble.write_tar(again.directory, tmp_path / "direct" / f"{CELL}.tar")
    assert joined.read_bytes() == (tmp_path / "direct" / f"{CELL}.tar").read_bytes()
    extra = extra_disk([again.directory, *parts], ctx.cache)
    assert extra <= 1.1 * sum(p.stat().st_size for p in parts)


def test_verification_refuses_an_image_already_in_the_engine(ctx, hub):
    cell = ctx.matrix.cell(CELL)
    if not (ctx.dist / CELL / "manifest.json").is_file():
        commands.lock(ctx, [cell])
        commands.build(ctx, [cell])
    engine = containers.client()
    base = engine.images.get(containers.base_image("amd64", ctx.cache))
    base.tag(REF)
    try:
        with pytest.raises(VerifyError, match="already in this Docker Engine"):
            commands.verify_cell(ctx, cell)
    finally:
        engine.images.remove(REF)


def test_a_moved_tag_is_a_diff_in_the_pin_file(ctx, hub, matrix, root):
    cell = ctx.matrix.cell(CELL)
    pins = images.pin_path(ctx.opts.path("images_pins_dir", ctx.root), "0.7.1")
    commands.lock(ctx, [cell])
    before = pins.read_text()
    moved = gpustack_tags(build="2")["v0.7.1-cpu"]
    hub.push("gpustack/gpustack", "v0.7.1-cpu", list(moved.values()))
    commands.lock(ctx, [cell])
    after = pins.read_text()
    assert before != after
    assert Reference.parse(f"docker.io/{REF}").tag in after
