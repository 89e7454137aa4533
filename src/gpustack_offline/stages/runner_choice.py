"""The worker's choice: which of upstream's runner images a GPUStack 2.x worker asks for.

Which runner the worker picks (`gpustack/worker/backends/base.py:_resolve_image`, 2.2.3 and 2.3.0):
filter by the device's backend, variant (CANN only: detected, else `910b`), service, service version
if the model pins one, and `platform.system_arch()`; deprecated runners are dropped unless a service
version is pinned (`with_deprecated=model_service_version is not None`). Of the backend versions,
the newest not above the device's runtime version (for NVIDIA: the driver's CUDA version,
`nvmlSystemGetCudaDriverVersion`), else the newest of the same major, else the oldest; without a
detected runtime, the newest. Within it: first variant, newest service version.
`select` follows that rule with the backend version given by the cell instead of a detected one.

Registry (`--system-default-container-registry R`): `gpustack/utils/config.py:
apply_registry_override_to_image` returns an image that names a registry unchanged, else `R/<image>`
(`R` stripped, trailing `/` removed), so `gpustack/runner:…` becomes `R/gpustack/runner:…`; R may
carry a path (`host/mirror`), `gpustack` stays the last namespace level. Then
`gpustack_runtime/deployer/__utils__.py:adjust_image_with_envs` replaces the `gpustack` namespace
only when `GPUSTACK_RUNTIME_DEPLOY_DEFAULT_CONTAINER_NAMESPACE` is set (unset here).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpustack_offline.stages.errors import NoRunnerError
from gpustack_offline.stages.runner_data import (
    ARCHES,
    K8S,
    Runner,
    RunnerData,
    load,
    version_sort_key,
)


@dataclass(frozen=True)
class ImageRef:
    """One image as upstream names it (`gpustack/runner:…`), for one platform."""

    name: str
    platform: str
    role: str

    @property
    def reference(self) -> str:
        return self.name if _has_registry(self.name) else f"docker.io/{self.name}"


@dataclass(frozen=True)
class Selection:
    version: str
    arch: str
    server: ImageRef
    runners: tuple[ImageRef, ...]
    pause: ImageRef
    others: tuple[ImageRef, ...]

    @property
    def images(self) -> tuple[ImageRef, ...]:
        return (self.server, *self.runners, self.pause, *self.others)

    @property
    def references(self) -> list[str]:
        return [i.reference for i in self.images]


@dataclass(frozen=True)
class Offer:
    """What one arch offers for a backend version, variant and service: the matrix axes."""

    backend: str
    backend_version: str
    backend_variant: str
    service: str
    versions: tuple[str, ...]  # not deprecated, newest first
    deprecated: tuple[str, ...]  # newest first

    @property
    def default(self) -> str | None:
        return self.versions[0] if self.versions else None


# --- select --------------------------------------------------------------------------------------


def parse_service(spec: str) -> tuple[str, str | None]:
    """`vllm` (newest not deprecated) or `vllm==0.11.0` (that version, deprecated or not)."""
    name, sep, version = spec.strip().partition("==")
    name, version = name.strip().lower(), version.strip()
    if not re.fullmatch(r"[a-z][a-z0-9_-]*", name) or (sep and not version):
        raise NoRunnerError(
            f"service {spec!r} is not `<service>` or `<service>==<version>` (e.g. vllm==0.11.0)"
        )
    return name, version or None


def _platform(arch: str) -> str:
    if arch not in ARCHES:
        raise NoRunnerError(f"arch {arch!r} is not one of {', '.join(ARCHES)}")
    return f"linux/{arch}"


def _pick(
    data: RunnerData,
    platform: str,
    backend: str,
    backend_version: str | None,
    variant: str | None,
    service: str,
    service_version: str | None,
) -> Runner | None:
    """`_resolve_image`'s choice, with the backend version given instead of detected."""
    found = [
        r
        for r in data.runners
        if r.platform == platform
        and r.backend == backend
        and r.service == service
        and (variant is None or r.backend_variant == variant)
        and (service_version is None or r.service_version == service_version)
        and (service_version is not None or not r.deprecated)
    ]
    if backend_version is not None:
        found = [r for r in found if r.backend_version == backend_version]
    if not found:
        return None
    newest_backend = max((r.backend_version for r in found), key=version_sort_key)
    found = [r for r in found if r.backend_version == newest_backend]
    first_variant = min(r.backend_variant for r in found)
    found = [r for r in found if r.backend_variant == first_variant]
    return max(found, key=lambda r: version_sort_key(r.service_version))


def nearest(
    data: RunnerData,
    platform: str,
    backend: str,
    backend_version: str | None,
    service: str,
    service_version: str | None,
    limit: int = 8,
) -> list[Runner]:
    """Runners closest to a request that matched none, one per platform, backend version, variant
    and service (the requested service version if there, else the newest not deprecated). Ranked
    by what matches: backend, then service, platform, backend version, service version."""
    groups: dict[tuple[str, str, str, str, str], list[Runner]] = {}
    for r in data.runners:
        key = (r.platform, r.backend, r.backend_version, r.backend_variant, r.service)
        groups.setdefault(key, []).append(r)

    def representative(rs: list[Runner]) -> Runner:
        exact = [r for r in rs if r.service_version == service_version]
        return (
            exact[0]
            if exact
            else max(rs, key=lambda r: (not r.deprecated, version_sort_key(r.service_version)))
        )

    def rank(r: Runner) -> tuple[Any, ...]:
        score = (
            16 * (r.backend == backend)
            + 8 * (r.service == service)
            + 4 * (r.platform == platform)
            + 2 * (r.backend_version == backend_version)
            + (r.service_version == service_version)
        )
        newest = [-x for x in _num(r.backend_version)]
        return (-score, r.deprecated, r.backend, newest, r.backend_variant, r.service, r.platform)

    return sorted((representative(rs) for rs in groups.values()), key=rank)[:limit]


def _num(version: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", version)]


def _compare(a: str, b: str) -> int:
    """Numeric parts compared, shorter padded with zeros (as gpustack_runtime's
    `compare_versions` does for the plain `major.minor` versions of CUDA and ROCm)."""
    x, y = _num(a), _num(b)
    width = max(len(x), len(y))
    x, y = x + [0] * (width - len(x)), y + [0] * (width - len(y))
    return (x > y) - (x < y)


def backend_version_for_host(
    data: RunnerData,
    arch: str,
    backend: str,
    service: str,
    host_version: str | None,
    variant: str | None = None,
) -> str | None:
    """The runner backend version a worker picks on a host whose runtime is `host_version` (for
    NVIDIA the driver's CUDA version): `gpustack/utils/version.py:pick_runtime_version` (2.3.0; the
    same rule inline in 2.2.3's `_resolve_image`). The newest not above the host; if all are
    newer, the newest of the host's major, else the oldest; with no host version, the newest."""
    platform = _platform(arch)
    name, version = parse_service(service)
    if variant is None and backend == "cann":
        variant = "910b"
    candidates = {
        r.backend_version
        for r in data.runners
        if r.platform == platform
        and r.backend == backend
        and r.service == name
        and (variant is None or r.backend_variant == variant)
        and (r.service_version == version if version else not r.deprecated)
    }
    ordered = sorted(candidates, key=lambda v: [*_num(v)], reverse=True)
    if not ordered:
        return None
    if not host_version:
        return ordered[0]
    for candidate in ordered:
        if _compare(candidate, host_version) <= 0:
            return candidate
    major = host_version.removeprefix("v").split(".", 1)[0]
    return next((c for c in ordered if c.split(".", 1)[0] == major), ordered[-1])


def _describe(r: Runner) -> str:
    return f"{r.docker_image} ({r.platform}{', deprecated' if r.deprecated else ''})"


def select(
    data: RunnerData,
    arch: str,
    backend: str,
    backend_version: str | None,
    services: Sequence[str],
    variant: str | None = None,
    k8s: bool = False,
) -> Selection:
    """The images a Docker-mode site of `arch` with `backend` (and `backend_version`, e.g.
    `12.9`; None: the newest) needs for `services`: the runners, the server, pause, health and
    benchmark images; with `k8s`, also every image only a Kubernetes install names.

    A service is `vllm` (the newest version not deprecated) or `vllm==0.11.0`. For CANN the
    variant defaults to upstream's `910b`; elsewhere to the first by name (`""`).
    """
    platform = _platform(arch)
    backend = backend.lower()
    if variant is None and backend == "cann":
        variant = "910b"
    if not services:
        raise NoRunnerError("no service given: name at least one, e.g. vllm or vllm==0.11.0")
    runners: list[ImageRef] = []
    for spec in services:
        name, version = parse_service(spec)
        picked = _pick(data, platform, backend, backend_version, variant, name, version)
        if picked is None:
            wanted = (
                f"{backend}{backend_version or ''}{'-' + variant if variant else ''} "
                f"{name}{'==' + version if version else ' (newest not deprecated)'}"
            )
            near = nearest(data, platform, backend, backend_version, name, version)
            raise NoRunnerError(
                f"GPUStack {data.version} has no runner for {wanted} on {platform} "
                f"(upstream's list: {data.path or 'runner data'}). Nearest: "
                + "; ".join(_describe(r) for r in near)
                + ". Pick one of those for the cell (a deprecated one only as "
                "`<service>==<version>`)"
            )
        ref = ImageRef(picked.docker_image, platform, "runner")
        if ref not in runners:
            runners.append(ref)
    others = [
        ImageRef(i.image, platform, i.role)
        for i in data.images
        if i.role != "pause" and (i.role != K8S or k8s)
    ]
    return Selection(
        version=data.version,
        arch=arch,
        server=ImageRef(data.server, platform, "server"),
        runners=tuple(runners),
        pause=ImageRef(data.image("pause"), platform, "pause"),
        others=tuple(others),
    )


def available(data: RunnerData, arch: str) -> list[Offer]:
    """Every backend version, variant and service upstream has runners for on `arch`."""
    platform = _platform(arch)
    groups: dict[tuple[str, str, str, str], list[Runner]] = {}
    for r in data.runners:
        if r.platform == platform:
            groups.setdefault(
                (r.backend, r.backend_version, r.backend_variant, r.service), []
            ).append(r)
    offers = []
    for (backend, bver, variant, service), rs in groups.items():
        newest = sorted(rs, key=lambda r: version_sort_key(r.service_version), reverse=True)
        offers.append(
            Offer(
                backend,
                bver,
                variant,
                service,
                versions=tuple(r.service_version for r in newest if not r.deprecated),
                deprecated=tuple(r.service_version for r in newest if r.deprecated),
            )
        )
    return sorted(
        offers,
        key=lambda o: (
            o.backend,
            version_sort_key(o.backend_version),
            o.backend_variant,
            o.service,
        ),
    )


# --- worker references ---------------------------------------------------------------------------


def _has_registry(image: str) -> bool:
    """`apply_registry_override_to_image`'s test: a first path part with `.`, `:` or localhost."""
    parts = image.split("/", 1)
    return len(parts) >= 2 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost")


def apply_registry_override(image: str, registry: str) -> str:
    """`gpustack/utils/config.py:apply_registry_override_to_image` (2.2.3 and 2.3.0) with
    `system_default_container_registry=registry` and, offline, no fallback registry (neither
    Docker Hub nor quay.io answers `determine_default_registry`'s probe)."""
    if _has_registry(image):
        return image
    registry = registry.strip()
    if registry:
        return f"{registry.rstrip('/')}/{image}"
    return image


def worker_references(
    selection: Selection, registry: str, namespace: str = "gpustack"
) -> list[str]:
    """Every reference the server and worker ask Docker for when started with the flags
    `install.sh --registry <registry> [--namespace <namespace>]` prints:
    `--system-default-container-registry <registry>` and, for a namespace other than gpustack,
    `--image-repo <ns>/gpustack`, `--benchmark-image-repo <ns>/benchmark-runner:<tag>` and
    `GPUSTACK_RUNTIME_DEPLOY_DEFAULT_CONTAINER_NAMESPACE=<ns>`.

    The worker image of the registration command (`gpustack/config/config.py:get_image_name`,
    `<registry>/<image_repo>:<tag>`), the benchmark (`benchmark_image_repo`, used as given), the
    runners (`gpustack/worker/backends/base.py:_get_configured_image`), pause and health
    (`gpustack/utils/runtime.py:transform_workload_plan`) each go through
    `apply_registry_override_to_image`; `gpustack_runtime`'s `adjust_image_with_envs` then puts
    the namespace in the place of `gpustack` for every container the deployer starts."""
    out: list[str] = []
    for ref in selection.images:
        name = ref.name
        if namespace != "gpustack" and name.startswith("gpustack/"):
            name = f"{namespace}/{name.removeprefix('gpustack/')}"
        name = apply_registry_override(name, registry)
        if name not in out:
            out.append(name)
    return out


def describe(offers: Iterable[Offer]) -> list[str]:
    """One line per offer, for `invoke matrix`-style listings."""
    return [
        f"{o.backend}{o.backend_version}{'-' + o.backend_variant if o.backend_variant else ''} "
        f"{o.service}: {', '.join(o.versions) or '-'}"
        + (f" (deprecated: {', '.join(o.deprecated)})" if o.deprecated else "")
        for o in offers
    ]


# --- cells ---------------------------------------------------------------------------------------

_DEVICE = re.compile(r"([a-z]+)([0-9]+\.[0-9]+)")
_SERVICE_PIN = re.compile(r"([a-z][a-z_-]*?)([0-9][0-9a-z.]*)")


def cell_selection(data_dir: Path, version: str, arch: str, device: str,
                   services: Sequence[str]) -> Selection:  # fmt: skip
    """The images of a 2.x cell: its device is the runner backend and version (`cuda12.9`), its
    extras the services (`vllm`, or `vllm0.17.1` for that version) and, as `k8s`, the images of
    a Kubernetes install."""
    match = _DEVICE.fullmatch(device)
    if not match:
        raise NoRunnerError(
            f"device {device!r} is not a runner backend and version such as cuda12.9 or rocm7.0"
        )
    specs = [
        f"{pin.group(1)}=={pin.group(2)}" if (pin := _SERVICE_PIN.fullmatch(s)) else s
        for s in services
        if s != K8S
    ]
    data = load(data_dir, version)
    return select(data, arch, match.group(1), match.group(2), specs, k8s=K8S in services)
