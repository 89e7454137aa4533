"""Seed a loopback hub with images shaped like GPUStack's, then run the image benchmark.

`nox -s bench` runs this file as a script (it is not a test module: pytest does not collect it).
A script, because the seeding needs the loopback hub in `support.registry_fixture` and that
lives with the tests, while the measuring lives in `bench.py`; run from tests/, the helpers
import without any path tricks, and no pytest machinery (socket blocking, fixtures, captured
output) stands between the bench and its timings.

The images are built like the real 0.7.1 tags, scaled down so the bench takes minutes on two
cores: per architecture, the cached Debian bookworm rootfs (what `runnable_image` uses) as the
big base layer shared by every tag, a shared application layer, and one device layer per tag.
A tiny marker layer goes first so the layer chain differs from the engine's own
`gpustack-offline/base` image (same rootfs, same diff ID): otherwise Docker would find the base
layer already extracted and the naive cold run would not be cold.

The 2.x row takes one real cell's image list (`runners.cell_selection`: server, one runner per
service, pause, health) for amd64 and seeds stand-ins: the server from
tests/support/gpustack2_images.py (Debian base plus the real gpustack wheel layer), runners
that share one big base layer as the real CUDA runners do plus a service layer each, the
real-shaped pause image and a tiny health image. skopeo needs no engine, so this row costs
well under a minute.

    python tests/bench_seed.py [--output docs/bench.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import random
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import bench
import bench_delta
import bench_pip
from support.gpustack2_images import push_images, runner_images, server_image
from support.registry_fixture import (
    AMD64,
    ARM64,
    DOCKER_LAYER,
    OCI_LAYER,
    Blob,
    FixtureImage,
    Hub,
    Layer,
    debian_layer,
    hub_registry,
    make_image,
    tar_layer,
)

from gpustack_offline.core.errors import BundleError
from gpustack_offline.stages import runners

ROOT = Path(__file__).resolve().parent.parent
REPOSITORY = "gpustack/gpustack"
PLATFORMS = (AMD64, ARM64)
SHARED_MB = 16  # gpustack and its Python dependencies, the same in every device's image
DEVICE_MB = {"v0.7.1": 24, "v0.7.1-cpu": 4, "v0.7.1-cuda12.8": 32}  # the device runtime
TAGS = tuple(DEVICE_MB)
DOCKER_TYPED = "v0.7.1"  # upstream's plain tag is a Docker manifest list, as in registry_fixture
# The 2.x cell v2.3.0-linux-amd64-cuda12.9-py3.11-vllm+sglang-docker: its image list is upstream's.
CELL_VERSION, CELL_ARCH, CELL_DEVICE, CELL_SERVICES = (
    "2.3.0",
    "amd64",
    "cuda12.9",
    ("vllm", "sglang"),
)
RUNNER_BASE_MB = 128  # the CUDA layers: one layer every runner of the arch shares
SERVICE_MB = {"vllm": 24, "sglang": 16}  # each runner's own layer: the serving engine


def noise_layer(seed: str, path: str, megabytes: int) -> tuple[Blob, str]:
    """A gzip layer of incompressible, deterministic bytes: its size is what it costs."""
    data = random.Random(seed).randbytes(megabytes * 1_000_000)
    packed, diff_id = tar_layer({path: data})
    return Blob(OCI_LAYER, packed), diff_id


def _typed(layer: Layer, docker: bool) -> Layer:
    return dataclasses.replace(layer, media_type=DOCKER_LAYER if docker else OCI_LAYER)


def bench_images() -> tuple[dict[str, list[FixtureImage]], str]:
    """Per tag, its images for amd64 and arm64; and a sentence saying what they are made of."""
    images: dict[str, list[FixtureImage]] = {tag: [] for tag in TAGS}
    base_sizes = []
    for platform in PLATFORMS:
        arch = platform.architecture
        marker = tar_layer({"etc/gpustack-offline-bench": f"bench base {arch}\n".encode()})
        base, base_diff = debian_layer(arch)
        base_sizes.append(f"{arch} {base.size / 1e6:.0f} MB")
        shared = noise_layer(f"bench-shared-{arch}", "opt/gpustack/shared", SHARED_MB)
        for tag in TAGS:
            device = noise_layer(f"bench-{tag}-{arch}", "opt/gpustack/device", DEVICE_MB[tag])
            docker = tag == DOCKER_TYPED
            layers: list[tuple[Layer, str]] = [
                (Blob(OCI_LAYER, marker[0]), marker[1]),
                (base, base_diff),
                shared,
                device,
            ]
            images[tag].append(
                make_image(
                    platform,
                    [(_typed(layer, docker), diff) for layer, diff in layers],
                    docker=docker,
                    labels={"org.opencontainers.image.version": tag},
                )
            )
    devices = ", ".join(f"`{tag}` {mb} MB" for tag, mb in DEVICE_MB.items())
    setup = (
        f"`{REPOSITORY}` with tags {', '.join(f'`{t}`' for t in TAGS)} for linux/amd64 and "
        f"linux/arm64, built like the real 0.7.1 tags: per architecture a tiny marker layer, "
        f"the Debian bookworm minbase rootfs as a gzip layer ({', '.join(base_sizes)}) and a "
        f"{SHARED_MB} MB application layer, both shared by every tag, then one device layer per "
        f"tag ({devices}; incompressible). `{DOCKER_TYPED}` is a Docker manifest list over "
        "Docker schema 2 manifests, the others OCI indexes. Served by distribution 2.8 on "
        "127.0.0.1 behind Docker Hub-style token auth (tests/support/registry_fixture.py)."
    )
    return images, setup


def seed_bench(hub: Hub) -> str:
    """Push the bench images over the hub's small 0.7.1 tags; return what they are."""
    images, setup = bench_images()
    for tag, per_platform in images.items():
        hub.push(REPOSITORY, tag, per_platform, docker=(tag == DOCKER_TYPED))
    return setup


def _size(layer: Layer) -> int:
    return len(layer.data) if isinstance(layer, Blob) else layer.size


def cell_images() -> tuple[dict[str, list[FixtureImage]], str]:
    """The 2.x cell's images by upstream reference (one amd64 image each), and what they are."""
    selection = runners.cell_selection(
        ROOT / "bundles" / "runners", CELL_VERSION, CELL_ARCH, CELL_DEVICE, CELL_SERVICES
    )
    platform = AMD64
    base = noise_layer(f"bench-runner-base-{CELL_ARCH}", "opt/runner-base/blob", RUNNER_BASE_MB)
    images: dict[str, list[FixtureImage]] = {
        selection.server.name: server_image(CELL_VERSION, (platform,))
    }
    for ref, service in zip(selection.runners, CELL_SERVICES, strict=True):
        own = noise_layer(f"bench-{ref.name}", "opt/runner/service", SERVICE_MB[service])
        labels = {"org.opencontainers.image.ref.name": ref.name}
        images[ref.name] = [make_image(platform, [base, own], labels=labels)]
    images.update(runner_images([selection.pause.name], (platform,)))
    for other in selection.others:  # gpustack/runtime:health: a small image of its own
        layer, diff = tar_layer({"health": f"{other.name} stand-in\n".encode()})
        images[other.name] = [make_image(platform, [(Blob(OCI_LAYER, layer), diff)])]
    server_mb = sum(_size(layer) for layer in images[selection.server.name][0].layers) / 1e6
    services = ", ".join(f"{s} {SERVICE_MB[s]} MB" for s in CELL_SERVICES)
    setup = (
        f"The 2.x row is the cell v{CELL_VERSION}-linux-{CELL_ARCH}-{CELL_DEVICE}-py3.11-"
        f"{'+'.join(CELL_SERVICES)}-docker, linux/{CELL_ARCH}, with upstream's image list for it "
        f"({', '.join(f'`{name}`' for name in images)}): the server is the Debian base plus the "
        f"real gpustack {CELL_VERSION} wheel with the dependencies its probes import "
        f"({server_mb:.0f} MB, tests/support/gpustack2_images.py); each runner is one "
        f"{RUNNER_BASE_MB} MB "
        "base layer that both share (standing in for the CUDA layers real runners share) plus a "
        f"service layer of its own ({services}; incompressible); pause and health are a few kB. "
        "These sizes are assumed, not measured (the real images cannot be pulled here); what "
        "carries over is the shape: upstream's layout carries the shared base once per runner, "
        "ours once, so its excess grows by one base for every runner a cell adds."
    )
    return images, setup


def seed_cell(hub: Hub) -> tuple[bench.Scenario, str]:
    """Push the 2.x cell's stand-ins to the hub; return the scenario over them and what they are."""
    images, setup = cell_images()
    push_images(hub, images)
    name = f"2.x cell v{CELL_VERSION} {CELL_ARCH} {CELL_DEVICE} {'+'.join(CELL_SERVICES)}"
    targets = tuple(bench.Target(hub.ref(ref), f"linux/{CELL_ARCH}") for ref in images)
    return bench.Scenario(f"{name} ({len(targets)} images)", targets), setup


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--output", type=Path, default=ROOT / "docs" / "bench.md", help="the report to write"
    )
    parser.add_argument(
        "--delta-only",
        action="store_true",
        help="measure only the delta table and replace it in the report",
    )
    parser.add_argument(
        "--pip-only",
        action="store_true",
        help="measure only the pip table and replace it in the report",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.pip_only:
        return only(args.output, bench_pip)
    if args.delta_only:
        return only(args.output, bench_delta)
    with tempfile.TemporaryDirectory(prefix="gpustack-offline-bench-") as tmp:
        try:
            with hub_registry(Path(tmp) / "hub") as hub:
                setup = seed_bench(hub)
                plan = bench.scenarios(hub.host, TAGS, [str(p) for p in PLATFORMS], REPOSITORY)
                rows = bench.run_all(plan, Path(tmp) / "work")
                cell, cell_setup = seed_cell(hub)
                cell_row = bench.measure_archives(cell, Path(tmp) / "work" / "cell")
                disk_row = bench.measure_disk(plan[0], Path(tmp) / "work" / "disk")
            text = bench.report(
                rows,
                bench.host_facts(),
                f"{setup}\n\n{cell_setup}",
                "`nox -s bench` (needs the Docker engine, `docker-registry` and `skopeo`; "
                "`python tests/bench_seed.py --output PATH` writes elsewhere). "
                "It takes a few minutes; it is not part of the default sessions.",
                archive_rows=[cell_row],
                disk_rows=[disk_row],
            )
            text += bench_pip.run(ROOT, logging.info)
            text += bench_delta.run(ROOT, logging.info)
        except BundleError as exc:
            print(f"bench failed: {exc}", file=sys.stderr)
            return 1
    bench.write_report(args.output, text)
    print(bench.table([*rows, cell_row]))
    print(bench.disk_table([disk_row]))
    print(f"written to {args.output}")
    return 0


def only(output: Path, part: Any) -> int:
    """One table (`bench_pip` or `bench_delta`) alone, put in place of its section in `output`
    (the rest kept)."""
    try:
        section = part.run(ROOT, logging.info)
    except BundleError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    text = output.read_text() if output.is_file() else ""
    before, _, after = text.partition(part.HEADING)
    later = [h for h in (bench_pip.HEADING, bench_delta.HEADING) if h in after]
    rest = after[after.index(later[0]) :] if later else ""
    bench.write_report(output, before.rstrip("\n") + "\n" + section + rest)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
