"""Stand-ins for upstream's gpustack/gpustack images, with the real GPUStack inside.

Docker Hub cannot be reached from here, so the Docker path is tested against a loopback
registry seeded with images built like upstream's tags: per architecture, a Debian base layer
(the cached debootstrap rootfs) shared by every tag, a layer with GPUStack 0.7.1 installed from
the cell's own locked wheelhouse (the same for every device here), and a small per-tag layer.
`gpustack start` is the entrypoint, as upstream's `tini -- gpustack start`, on port 80.

The GPUStack layer is made without the daemon and without emulation: uv installs the target's
wheels into a folder for the target platform (`--target --python-platform`), which is then
packed as a layer. Layers are cached by content under the cache dir.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from gpustack_offline.core.cache import in_use
from gpustack_offline.core.matrix import Cell, Matrix
from gpustack_offline.core.safety import safe_extract_tar
from gpustack_offline.stages import tools
from gpustack_offline.stages.locks import load_overrides, lock_path, read_lock
from gpustack_offline.stages.registry import Platform
from gpustack_offline.stages.wheels import wheelhouse
from support.registry_fixture import (
    OCI_LAYER,
    Blob,
    FileLayer,
    FixtureImage,
    Hub,
    debian_layer,
    file_layer,
    make_image,
    tar_layer,
)

VERSION = "0.7.1"


def tags(version: str = VERSION) -> dict[str, str]:
    """Upstream's tag per device for a 0.x version: `v0.7.1` (CUDA 12.4), `v0.7.1-cpu`, … and
    `v0.7.1-rocm` (AMD: a vendor's image, started with upstream's device options)."""
    return {
        "cuda12.4": f"v{version}",
        "cpu": f"v{version}-cpu",
        "cuda12.8": f"v{version}-cuda12.8",
        "rocm6.2": f"v{version}-rocm",
    }


TAGS = tags()
SITE = "usr/local/lib/python3.11/dist-packages"  # on the base image's sys.path
LAUNCHER = b"""#!/bin/sh
# gpustack, installed by the gpustack-offline fixture into Debian's dist-packages
exec python3 -c \\
  'import sys; from gpustack.main import main; sys.argv[0] = "gpustack"; sys.exit(main())' "$@"
"""


def gpustack_layer(
    root: Path, matrix: Matrix, arch: str, cache: Path, mirror: str, version: str = VERSION
) -> tuple[FileLayer, str]:
    """GPUStack from the locked wheelhouse of the arch's cpu pip cell, with its tools loaded from
    the release mirror (upstream's images run download-tools at build time), as a gzip layer."""
    cell = matrix.cell(f"v{version}-linux-{arch}-cpu-py3.11-base-pip")
    lock = read_lock(lock_path(root / "bundles" / "locks", cell))
    archive = tools_archive(root, cell, cache, mirror)
    name = f"{cell.id}-{lock.digest()[:12]}-{archive.sha256[:12]}.tar.gz"
    final = cache / "fixtures" / "gpustack-images" / name
    if final.is_file() and final.with_suffix(".json").is_file():
        return file_layer(final, final)  # made before: file_layer only reads its record
    with in_use(cache), tempfile.TemporaryDirectory(dir=cache) as scratch:
        wheels = wheelhouse(cell, lock, cache, (), "https://pypi.org/simple", show_progress=False)
        links, tree = Path(scratch) / "links", Path(scratch) / "tree"
        links.mkdir()
        for wheel in wheels:
            os.link(wheel.path, links / wheel.filename)
        subprocess.run(
            [sys.executable, "-m", "uv", "pip", "install", "--quiet", "--no-index",
             "--find-links", str(links), "--target", str(tree / SITE),
             "--python-platform", cell.uv_platform, "--python-version", cell.python,
             *[f"{w.name}=={w.version}" for w in wheels]],
            check=True, env={**os.environ, "UV_CACHE_DIR": str(cache / "uv")},
        )  # fmt: skip
        with tarfile.open(archive.path) as tf:
            safe_extract_tar(tf, tree / SITE / "gpustack/third_party/bin", "tools archive")
        (tree / "usr/local/bin").mkdir(parents=True)
        (tree / "usr/local/bin/gpustack").write_bytes(LAUNCHER)
        os.chmod(tree / "usr/local/bin/gpustack", 0o755)
        plain = Path(scratch) / "layer.tar"
        pack_tree(tree, plain)
        return file_layer(plain, final)


def pack_tree(tree: Path, plain: Path) -> None:
    """An uncompressed layer tar of `tree`: sorted, root-owned, mtime 0 (same bytes each time)."""
    with tarfile.open(plain, "w", format=tarfile.PAX_FORMAT) as tf:
        for path in sorted(tree.rglob("*")):
            info = tf.gettarinfo(path, str(path.relative_to(tree)))
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if info.isreg():
                with path.open("rb") as fh:
                    tf.addfile(info, fh)
            else:
                tf.addfile(info)


def tools_archive(root: Path, cell: Cell, cache: Path, mirror: str) -> tools.Archive:
    """The cell's tools archive, built holding the cache as a real build does (a build that
    starts meanwhile would otherwise sweep this one's scratch as a killed build's)."""
    with tempfile.TemporaryDirectory() as locks, in_use(cache):
        overrides = load_overrides(root / "bundles" / "overrides.toml")
        index = "https://pypi.org/simple"
        return tools.build(cell, cache, Path(locks), overrides, index, mirror, frozen=False)


def gpustack_images(
    root: Path,
    matrix: Matrix,
    cache: Path,
    mirror: str,
    version: str = VERSION,
    arches: tuple[str, ...] = ("amd64", "arm64"),
) -> dict[str, list[FixtureImage]]:
    """Per tag, its image for each arch; base and GPUStack layers shared by the tags."""
    out: dict[str, list[FixtureImage]] = {tag: [] for tag in tags(version).values()}
    for arch in arches:
        platform = Platform("linux", arch, "v8" if arch == "arm64" else "")
        base = debian_layer(arch)
        app = gpustack_layer(root, matrix, arch, cache, mirror, version)
        for device, tag in tags(version).items():
            marker = tar_layer({"etc/gpustack-image": f"{tag} {arch} ({device})\n".encode()})
            out[tag].append(
                make_image(
                    platform,
                    [base, app, (Blob(OCI_LAYER, marker[0]), marker[1])],
                    cmd=("/usr/local/bin/gpustack", "start"),
                    labels={"org.opencontainers.image.version": tag},
                )
            )
    return out


def seed_gpustack(
    hub: Hub,
    root: Path,
    matrix: Matrix,
    cache: Path,
    mirror: str,
    version: str = VERSION,
    arches: tuple[str, ...] = ("amd64", "arm64"),
) -> None:
    """Push the stand-ins over the hub's small gpustack/gpustack fixtures; tools come from the
    release mirror at `mirror`."""
    for tag, images in gpustack_images(root, matrix, cache, mirror, version, arches).items():
        hub.push("gpustack/gpustack", tag, images)
