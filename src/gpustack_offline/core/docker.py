"""The Docker Engine: clean base images made here, builder images, and containers that clean up.

The one way this project reaches Docker: the docker SDK through `client()`, typed, which checks
the engine's version once per client against the floor (`ENGINE_FLOOR`); the `docker` CLI only
where the SDK does not do the same (`docker build` uses BuildKit where the engine has it, the
SDK's build the legacy builder), always through `core.processes.run`. Nothing here pulls from a
registry unless asked to with `pull`. Base images are made with debootstrap from Debian's package
servers and loaded as a Docker archive whose config names the right architecture (`docker
import` would record the host's); containers of another architecture run under qemu binfmt.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import tarfile
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gpustack_offline.core.errors import BundleError, CommandError
from gpustack_offline.core.files import atomic_path, sha256_file
from gpustack_offline.core.processes import run

if TYPE_CHECKING:  # the SDK is imported when Docker is first reached, not with this module
    from docker import DockerClient
    from docker.models.containers import Container

log = logging.getLogger("gpustack_offline")

SUITE = "bookworm"  # Debian 12: Python 3.11, glibc 2.36
BUILDER_PYTHON = "3.11"
BASE_PACKAGES = ("python3", "python3-venv")
BUILDER_DOCKERFILE = """\
FROM {base}
RUN apt-get update \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \\
      build-essential python3-dev python3-pip python3-venv python3-build \\
 && rm -rf /var/lib/apt/lists/*
"""
CONTAINER_CA = "/etc/ssl/certs/build-host-ca.pem"


def host_ca_bundle() -> Path | None:
    """The CA bundle the build host trusts (a site's TLS-inspecting proxy included), if any.

    Builder containers get it too, so that pip inside them reaches the index the host reaches.
    """
    for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT"):
        value = os.environ.get(var)
        if value and Path(value).is_file():
            return Path(value)
    default = Path("/etc/ssl/certs/ca-certificates.crt")
    return default if default.is_file() else None


LABEL = "gpustack-offline.key"


class EngineError(BundleError):
    """The Docker Engine is missing, unreachable or refused a request."""


# The oldest Docker Engine this project is known to work with: Debian 12's docker.io (20.10.24).
ENGINE_FLOOR = (20, 10)


class EngineTooOld(EngineError):
    """The Docker Engine answers but is older than `ENGINE_FLOOR`."""

    def __init__(self, found: str, floor: tuple[int, int], where: str) -> None:
        self.found = found
        self.floor = floor
        wanted = ".".join(str(n) for n in floor)
        super().__init__(
            f"the Docker Engine {where} is version {found}; this project needs Docker Engine "
            f">= {wanted}. Fix: upgrade it (Debian 12's docker.io is 20.10.24), then retry"
        )


def engine_version(found: str) -> tuple[int, int] | None:
    """(major, minor) of an engine version string ("20.10.24+dfsg1", "26.1.3"); None if it
    has no such numbers (a development build)."""
    match = re.match(r"v?(\d+)\.(\d+)", found.strip())
    return (int(match[1]), int(match[2])) if match else None


def check_engine_version(found: str, where: str = "") -> None:
    """Raise EngineTooOld if `found` is older than the floor; an unparsable version passes."""
    numbers = engine_version(found)
    if numbers is None:
        log.warning("cannot read the Docker Engine's version %r; assuming it is recent", found)
    elif numbers < ENGINE_FLOOR:
        raise EngineTooOld(found, ENGINE_FLOOR, where)


def client() -> DockerClient:
    """A client of the engine DOCKER_HOST names (or the local socket), reachable and new enough."""
    host = os.environ.get("DOCKER_HOST")
    where = f"at {host} (DOCKER_HOST)" if host else "at unix:///var/run/docker.sock"
    import docker

    try:
        engine = docker.from_env(timeout=600)
        engine.ping()
        found = str(engine.version().get("Version", ""))
    except Exception as exc:  # noqa: BLE001 - any failure here means the same thing
        fix = (
            "point DOCKER_HOST at a running engine, or unset it"
            if host
            else "install it (`apt-get install docker.io`) and start it (`dockerd &` or "
            "`systemctl start docker`)"
        )
        raise EngineError(
            f"cannot reach the Docker Engine {where}: {_reason(exc)}. Fix: {fix}, then retry"
        ) from exc
    check_engine_version(found, where)
    return engine


def _reason(exc: BaseException) -> str:
    """The innermost cause, in words: `No such file or directory`, `Permission denied`."""
    while exc.__cause__ or exc.__context__:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    for arg in getattr(exc, "args", ()):
        if isinstance(arg, BaseException):
            return _reason(arg)
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def image_key(image: str) -> str | None:
    import docker.errors

    try:
        key = client().images.get(image).labels.get(LABEL)
    except docker.errors.ImageNotFound:
        return None
    return None if key is None else str(key)


def has_image(engine: DockerClient, ref: str) -> bool:
    import docker.errors

    try:
        engine.images.get(ref)
    except docker.errors.ImageNotFound:
        return False
    return True


def remove_images(engine: DockerClient, refs: Sequence[str]) -> None:
    """Remove these images (forced); what is already gone is fine."""
    for ref in refs:
        with contextlib.suppress(Exception):
            engine.images.remove(ref, force=True)


def pull(engine: DockerClient, ref: str) -> tuple[int, str]:
    """Pull `ref` as `docker pull` does; (0, its progress lines) or (1, those and the error)."""
    import docker.errors
    from docker.utils import parse_repository_tag

    repository, tag = parse_repository_tag(ref)
    lines: list[str] = []
    try:
        for event in engine.api.pull(repository, tag=tag or "latest", stream=True, decode=True):
            if "error" in event:
                lines.append(f"Error response from daemon: {event['error']}")
                return 1, "\n".join(lines)
            status = " ".join(str(event[k]) for k in ("id", "status") if event.get(k))
            if status and not event.get("progressDetail"):
                lines.append(status)
    except docker.errors.APIError as exc:
        lines.append(str(exc))
        return 1, "\n".join(lines)
    return 0, "\n".join([*lines, ref])


def _base_key(arch: str, mirror: str) -> str:
    blob = f"{SUITE}|{arch}|minbase|{','.join(BASE_PACKAGES)}|{mirror}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def rootfs_tar(arch: str, cache: Path, mirror: str) -> Path:
    """A debootstrapped Debian root filesystem as a tar, cached by its inputs."""
    final = cache / "base" / f"{SUITE}-{arch}-{_base_key(arch, mirror)}.tar"
    if final.is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rootfs-", dir=final.parent) as tmp:
        root = Path(tmp) / "root"
        run(
            [
                "debootstrap", f"--arch={arch}", "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}", SUITE, root, mirror,
            ],
            what=f"debootstrap of Debian {SUITE} for {arch}",
            fix="install debootstrap (and qemu-user-static + binfmt-support for arm64) and "
            "check that Debian's package servers are reachable",
        )  # fmt: skip
        with atomic_path(final) as part:
            run(["tar", "-C", root, "--numeric-owner", "-cf", part, "."], what="packing rootfs")
    return final


def load_image(layer_tar: Path, tag: str, arch: str, labels: Mapping[str, str]) -> None:
    """Load a one-layer image into the engine as a Docker archive with the right architecture."""
    diff_id = "sha256:" + sha256_file(layer_tar)
    config = {
        "architecture": arch,
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/bash"],
            "Labels": dict(labels),
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": f"gpustack-offline: debootstrap {SUITE} {arch}"}],
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    manifest = [{"Config": config_name, "RepoTags": [tag], "Layers": ["layer/layer.tar"]}]
    with tempfile.TemporaryFile() as archive:
        with tarfile.open(fileobj=archive, mode="w") as tf:
            for name, data in (
                (config_name, config_bytes),
                ("manifest.json", json.dumps(manifest).encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            tf.add(layer_tar, arcname="layer/layer.tar")
        archive.seek(0)
        client().images.load(archive)


def base_image(arch: str, cache: Path, mirror: str = "http://deb.debian.org/debian") -> str:
    """The clean Debian base image for `arch`, made and loaded if the engine lacks it."""
    tag = f"gpustack-offline/base:{SUITE}-{arch}"
    key = _base_key(arch, mirror)
    if image_key(tag) != key:
        log.info("making base image %s", tag)
        load_image(rootfs_tar(arch, cache, mirror), tag, arch, {LABEL: key})
    return tag


def builder_image(arch: str, cache: Path, mirror: str = "http://deb.debian.org/debian") -> str:
    """Base image plus compilers and `build`, for native sdist builds of the target arch."""
    base = base_image(arch, cache, mirror)
    dockerfile = BUILDER_DOCKERFILE.format(base=base)
    key = hashlib.sha256(f"{image_key(base)}|{dockerfile}".encode()).hexdigest()[:16]
    tag = f"gpustack-offline/builder:{SUITE}-{arch}"
    if image_key(tag) != key:
        log.info("making builder image %s", tag)
        with tempfile.TemporaryDirectory() as ctx:
            (Path(ctx) / "Dockerfile").write_text(dockerfile)
            run(
                ["docker", "build", "--pull=false", "--label", f"{LABEL}={key}", "-t", tag, ctx],
                what=f"building the {arch} builder image",
                fix="check that Debian's package servers and PyPI are reachable from containers",
            )
    return tag


@contextlib.contextmanager
def container(
    image: str,
    *,
    network: str = "none",
    mounts: Mapping[Path, str] | None = None,
    read_only: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    name_hint: str = "gpustack-offline",
) -> Iterator[Container]:
    """A started container that idles until used, always removed afterwards. Never pulls.
    It idles whatever the image's entrypoint (upstream's server images have one)."""
    import docker.errors

    engine = client()
    try:
        engine.images.get(image)
    except docker.errors.ImageNotFound:
        raise EngineError(f"image {image} is not in the local engine (nothing is pulled)") from None
    volumes = {
        str(host): {"bind": inside, "mode": "ro" if inside in read_only else "rw"}
        for host, inside in (mounts or {}).items()
    }
    box = engine.containers.create(
        image,
        entrypoint=["sleep", "infinity"],
        name=f"{name_hint}-{int(time.time() * 1000) % 10**9}",
        network=network,
        volumes=volumes,
        environment=dict(env or {}),
        detach=True,
    )
    try:
        box.start()
        yield box
    finally:
        with contextlib.suppress(docker.errors.APIError):
            box.remove(force=True)


@contextlib.contextmanager
def volume(name_hint: str) -> Iterator[Path]:
    """A fresh named volume, removed afterwards; as a `mounts` key of `container()` (a name,
    not a path: Docker mounts the volume) it shares one folder between containers."""
    import docker.errors

    made = client().volumes.create(f"{name_hint}-{int(time.time() * 1000) % 10**9}")
    try:
        yield Path(made.name)
    finally:
        with contextlib.suppress(docker.errors.APIError):
            made.remove(force=True)


def exec_in(
    box: Container, argv: Sequence[str], *, env: Mapping[str, str] | None = None
) -> tuple[int, str]:
    """Run argv in a container; return (exit code, combined output)."""
    code, output = box.exec_run(list(argv), environment=dict(env or {}), demux=False)
    return int(code), (output or b"").decode(errors="replace")


def run_container(
    image: str,
    argv: Sequence[str],
    *,
    mounts: Mapping[Path, str],
    env: Mapping[str, str],
    what: str,
    network: bool,
) -> str:
    """Run one command in a fresh container; raise CommandError with its output if it fails."""
    mounts, env = dict(mounts), dict(env)
    ca = host_ca_bundle() if network else None
    if ca:
        mounts[ca] = CONTAINER_CA
        env.update(PIP_CERT=CONTAINER_CA, SSL_CERT_FILE=CONTAINER_CA)
    with container(
        image,
        network="bridge" if network else "none",
        mounts=mounts,
        read_only=[CONTAINER_CA],
        env=env,
    ) as box:
        code, output = exec_in(box, argv, env=env)
    if code != 0:
        tail = "\n".join(output.strip().splitlines()[-25:])
        raise CommandError(f"{what} failed (exit {code}):\n{tail}")
    return output


def internal_network(name: str = "gpustack-offline-verify") -> str:
    """A Docker network with no route out (`--internal`); made once."""
    engine = client()
    found = engine.networks.list(names=[name])
    if not found:
        engine.networks.create(name, driver="bridge", internal=True)
    elif not found[0].attrs.get("Internal"):
        raise EngineError(
            f"Docker network {name} exists but is not --internal; remove it "
            f"(`docker network rm {name}`) and it is made again without a route out"
        )
    return name
