"""Seed a loopback hub with images shaped like GPUStack's, then run the image benchmark.

`nox -s bench` runs this file as a script (it is not a test module: pytest does not collect it).
A script, because the seeding needs the loopback hub in `registry_fixture` and that lives with
the tests, while the measuring lives in `gpustack_offline.bench`; run from tests/, the helpers
import without any path tricks, and no pytest machinery (socket blocking, fixtures, captured
output) stands between the bench and its timings.

The images are built like the real 0.7.1 tags, scaled down so the bench takes minutes on two
cores: per architecture, the cached Debian bookworm rootfs (what `runnable_image` uses) as the
big base layer shared by every tag, a shared application layer, and one device layer per tag.
A tiny marker layer goes first so the layer chain differs from the engine's own
`gpustack-offline/base` image (same rootfs, same diff ID): otherwise Docker would find the base
layer already extracted and the naive cold run would not be cold.

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

from registry_fixture import (
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

from gpustack_offline import bench
from gpustack_offline.errors import BundleError

ROOT = Path(__file__).resolve().parent.parent
REPOSITORY = "gpustack/gpustack"
PLATFORMS = (AMD64, ARM64)
SHARED_MB = 16  # gpustack and its Python dependencies, the same in every device's image
DEVICE_MB = {"v0.7.1": 24, "v0.7.1-cpu": 4, "v0.7.1-cuda12.8": 32}  # the device runtime
TAGS = tuple(DEVICE_MB)
DOCKER_TYPED = "v0.7.1"  # upstream's plain tag is a Docker manifest list, as in registry_fixture


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
        "127.0.0.1 behind Docker Hub-style token auth (tests/registry_fixture.py)."
    )
    return images, setup


def seed_bench(hub: Hub) -> str:
    """Push the bench images over the hub's small 0.7.1 tags; return what they are."""
    images, setup = bench_images()
    for tag, per_platform in images.items():
        hub.push(REPOSITORY, tag, per_platform, docker=(tag == DOCKER_TYPED))
    return setup


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--output", type=Path, default=ROOT / "docs" / "bench.md", help="the report to write"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory(prefix="gpustack-offline-bench-") as tmp:
        try:
            with hub_registry(Path(tmp) / "hub") as hub:
                setup = seed_bench(hub)
                plan = bench.scenarios(hub.host, TAGS, [str(p) for p in PLATFORMS], REPOSITORY)
                rows = bench.run_all(plan, Path(tmp) / "work")
            text = bench.report(
                rows,
                bench.host_facts(),
                setup,
                "`nox -s bench` (needs the Docker engine and `docker-registry`; "
                "`python tests/bench_seed.py --output PATH` writes elsewhere). "
                "It takes a few minutes; it is not part of the default sessions.",
            )
        except BundleError as exc:
            print(f"bench failed: {exc}", file=sys.stderr)
            return 1
    bench.write_report(args.output, text)
    print(bench.table(rows))
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
