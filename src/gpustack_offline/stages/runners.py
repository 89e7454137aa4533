"""GPUStack 2.x images: the server, the runner per backend and service, and the runtime's helpers.

GPUStack 2.x is Docker only. The worker starts every inference engine as a container through the
Docker socket, so a site with no route out needs, in its registry and for its arch, every image the
worker will ask for. Which images those are is upstream's data, never ours:

- Runners: `gpustack-runner` (pinned `==` by the gpustack wheel's `Requires-Dist`) ships
  `gpustack_runner/runner.py.json`, a list of objects with `backend`, `backend_version`
  (major.minor), `original_backend_version`, `backend_variant` ("" or e.g. `910b`), `service`,
  `service_version`, `platform` (`linux/amd64|arm64`), `docker_image`
  (`gpustack/runner:<backend><ver>[-<variant>]-<service><ver>`), `deprecated` and, from 0.1.31,
  `dependencies` (probed package versions; not kept here). Read by
  `gpustack_runner/runner.py:list_runners`, grouped by `build_backend_runners` (backend versions and
  service versions newest first by `version_sort_key`: PEP 440, unparsable strings lowest;
  variants by name).
- Pause and health images: `gpustack_runtime/envs.py`, defaults of
  `GPUSTACK_RUNTIME_DOCKER_PAUSE_IMAGE` (`gpustack/runtime:pause`) and
  `GPUSTACK_RUNTIME_DOCKER_UNHEALTHY_RESTART_IMAGE` (`gpustack/runtime:health`); both are listed by
  `gpustack_runtime/cmds/images.py` (`append_images`) and put on every Docker workload by
  `gpustack/utils/runtime.py:transform_workload_plan`.
- Server image: `gpustack/gpustack:<__version__>` (`gpustack/__init__.py`, e.g. `v2.3.0`), named by
  `gpustack/config/config.py:get_image_name`, which the server also uses for the worker's
  registration command.
- Benchmark image (only when a benchmark is run): `gpustack/benchmark-runner:<__benchmark_runner_
  version__>` (`gpustack/__init__.py`, default of `benchmark_image_repo` in
  `gpustack/schemas/config.py`).

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

import json
import logging
import re
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from gpustack_offline.core.downloads import BlobStore, Download, session
from gpustack_offline.core.errors import BundleError
from gpustack_offline.core.files import write_text

log = logging.getLogger("gpustack_offline")

SCHEMA = 1
ARCHES = ("amd64", "arm64")
RUNNER_LIST = "gpustack_runner/runner.py.json"
RUNTIME_ENVS = "gpustack_runtime/envs.py"
RUNTIME_IMAGES = "gpustack_runtime/cmds/images.py"
GPUSTACK_INIT = "gpustack/__init__.py"
GPUSTACK_RUNTIME_USE = "gpustack/utils/runtime.py"
GPUSTACK_REGISTRY_OVERRIDE = "gpustack/utils/config.py"
# Runtime images by role: (env variable whose default names the image).
RUNTIME_IMAGE_ENVS = {
    "pause": "GPUSTACK_RUNTIME_DOCKER_PAUSE_IMAGE",
    "health": "GPUSTACK_RUNTIME_DOCKER_UNHEALTHY_RESTART_IMAGE",
}
RUNNER_FIELDS = (
    "backend",
    "backend_version",
    "original_backend_version",
    "backend_variant",
    "service",
    "service_version",
    "platform",
    "docker_image",
    "deprecated",
)


class RunnerDataError(BundleError):
    """The runner data of a GPUStack 2.x version is missing, malformed or cannot be made."""


class NoRunnerError(BundleError):
    """No runner image of upstream's list fits the requested backend, service and platform."""


@dataclass(frozen=True)
class Runner:
    backend: str
    backend_version: str
    original_backend_version: str
    backend_variant: str
    service: str
    service_version: str
    platform: str
    docker_image: str
    deprecated: bool = False


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    wheel: str
    sha256: str


@dataclass(frozen=True)
class ExtraImage:
    role: str
    image: str
    source: str


@dataclass(frozen=True)
class RunnerData:
    version: str
    packages: tuple[Package, ...]
    server: str
    images: tuple[ExtraImage, ...]
    runners: tuple[Runner, ...]
    path: Path | None = None

    def image(self, role: str) -> str:
        return next(i.image for i in self.images if i.role == role)


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


def version_sort_key(version: str) -> tuple[int, Any]:
    """`gpustack_runner/runner.py:version_sort_key`: PEP 440, unparsable strings below all."""
    try:
        return (1, Version(version))
    except InvalidVersion:
        return (0, [(0, int(x)) if x.isdigit() else (1, x) for x in version.split(".")])


def data_path(data_dir: Path, version: str) -> Path:
    return data_dir / f"gpustack-{version.removeprefix('v')}.json"


# --- refresh: upstream wheels -> bundles/runners/gpustack-<version>.json -------------------------


def _index_files(index_url: str, name: str, http: requests.Session) -> dict[str, tuple[str, str]]:
    """Files of a project on a PEP 691 (JSON) or PEP 503 (HTML) index: filename -> (url, sha256)."""
    page = f"{index_url.rstrip('/')}/{canonicalize_name(name)}/"
    accept = "application/vnd.pypi.simple.v1+json, text/html;q=0.1"
    try:
        resp = http.get(page, headers={"Accept": accept}, timeout=(15, 60))
        resp.raise_for_status()
    except requests.RequestException as exc:
        raise RunnerDataError(
            f"cannot read {page}: {exc}. Check the network or the index-url option"
        ) from exc
    files: dict[str, tuple[str, str]] = {}
    if "json" in resp.headers.get("Content-Type", ""):
        for entry in resp.json().get("files", []):
            sha = entry.get("hashes", {}).get("sha256")
            if sha:
                files[entry["filename"]] = (urljoin(page, entry["url"]), sha)
        return files
    for href in re.findall(r'href="([^"]+)"', resp.text):
        url = urljoin(page, href.replace("&amp;", "&"))
        fragment = urlsplit(url).fragment
        if fragment.startswith("sha256="):
            filename = urlsplit(url).path.rsplit("/", 1)[-1]
            files[filename] = (url.split("#", 1)[0], fragment.removeprefix("sha256="))
    return files


def _fetch_wheel(
    name: str, version: str, index_url: str, store: BlobStore, http: requests.Session
) -> tuple[Package, Path]:
    """The pure-Python wheel of `name==version`, hash-checked into the blob store."""
    wanted = f"{canonicalize_name(name).replace('-', '_')}-{version}-py3-none-any.whl"
    files = _index_files(index_url, name, http)
    match = next(
        ((f, url, sha) for f, (url, sha) in files.items() if f.lower() == wanted.lower()), None
    )
    if match is None:
        raise RunnerDataError(
            f"{index_url} has no {wanted} (with a sha256) for {name}=={version}; "
            "check the version and the index-url option"
        )
    filename, url, sha256 = match
    path = store.fetch(Download(url=url, sha256=sha256, label=filename), http)
    package = Package(canonicalize_name(name), version, filename, sha256)
    return package, path


def _read(wheel: zipfile.ZipFile, member: str, package: Package) -> str:
    try:
        return wheel.read(member).decode()
    except KeyError:
        raise RunnerDataError(
            f"{package.wheel} has no {member}; upstream's layout changed, so this project's "
            "reading of it (gpustack_offline/runners.py) must be updated"
        ) from None


def _pin(metadata: str, name: str, package: Package) -> str:
    """The `==` version the wheel's `Requires-Dist` pins for `name`."""
    for line in HeaderParser().parsestr(metadata).get_all("Requires-Dist") or []:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if canonicalize_name(req.name) != canonicalize_name(name) or req.marker:
            continue
        pins = [s.version for s in req.specifier if s.operator == "=="]
        if len(pins) == 1:
            return pins[0]
        raise RunnerDataError(f"{package.wheel} requires {line!r}, not one `==` version")
    raise RunnerDataError(f"{package.wheel} does not require {name}")


def _attr(source: str, name: str, where: str) -> str:
    found = re.search(rf"^{name}\s*=\s*['\"]([^'\"]+)['\"]", source, re.M)
    if not found:
        raise RunnerDataError(f"{where} does not set {name}; upstream's layout changed")
    return found.group(1)


def _env_default(source: str, env: str, where: str) -> str:
    """The default of `"ENV": lambda: getenv("ENV", "<default>")` in gpustack_runtime/envs.py."""
    found = re.search(rf'"{env}":\s*lambda:\s*getenv\(\s*"{env}",\s*"([^"]+)"', source)
    if not found:
        raise RunnerDataError(f"{where} has no default for {env}; upstream's layout changed")
    return found.group(1)


def _runners(raw: str, where: str) -> list[Runner]:
    try:
        entries = json.loads(raw)
        runners = [
            Runner(
                **{k: e.get(k, "") for k in RUNNER_FIELDS[:-1]},
                deprecated=bool(e.get("deprecated", False)),
            )
            for e in entries
        ]
    except (ValueError, TypeError, AttributeError) as exc:
        raise RunnerDataError(f"{where} is not a runner list: {exc}") from exc
    for r in runners:
        if not (
            r.backend
            and r.service
            and r.service_version
            and r.docker_image
            and r.platform.startswith("linux/")
        ):
            raise RunnerDataError(f"{where}: incomplete runner entry {r}")
    return sorted(set(runners), key=_runner_order)


def _runner_order(r: Runner) -> tuple[str, ...]:
    return (
        r.platform,
        r.backend,
        r.backend_version,
        r.backend_variant,
        r.service,
        r.service_version,
        r.docker_image,
    )


def extract(
    gpustack: tuple[Package, Path],
    runner: tuple[Package, Path],
    runtime: tuple[Package, Path],
) -> RunnerData:
    """Read the runner list and the extra images out of the three wheels."""
    (gs_pkg, gs_path), (rn_pkg, rn_path), (rt_pkg, rt_path) = gpustack, runner, runtime
    with (
        zipfile.ZipFile(gs_path) as gs,
        zipfile.ZipFile(rn_path) as rn,
        zipfile.ZipFile(rt_path) as rt,
    ):
        init = _read(gs, GPUSTACK_INIT, gs_pkg)
        uses = _read(gs, GPUSTACK_RUNTIME_USE, gs_pkg)
        override = _read(gs, GPUSTACK_REGISTRY_OVERRIDE, gs_pkg)
        envs = _read(rt, RUNTIME_ENVS, rt_pkg)
        listed = _read(rt, RUNTIME_IMAGES, rt_pkg)
        runners = _runners(_read(rn, RUNNER_LIST, rn_pkg), f"{rn_pkg.wheel}:{RUNNER_LIST}")
    if "def apply_registry_override_to_image" not in override:
        raise RunnerDataError(
            f"{gs_pkg.wheel}:{GPUSTACK_REGISTRY_OVERRIDE} no longer defines "
            "apply_registry_override_to_image; check worker_references against upstream"
        )
    images: list[ExtraImage] = []
    for role, env in RUNTIME_IMAGE_ENVS.items():
        if env not in uses or f"envs.{env}" not in listed:
            raise RunnerDataError(
                f"{gs_pkg.wheel}:{GPUSTACK_RUNTIME_USE} or {rt_pkg.wheel}:{RUNTIME_IMAGES} no "
                f"longer uses {env}; upstream changed which helper images the worker needs"
            )
        image = _env_default(envs, env, f"{rt_pkg.wheel}:{RUNTIME_ENVS}")
        images.append(ExtraImage(role, image, f"{rt_pkg.wheel}:{RUNTIME_ENVS} {env}"))
    benchmark = _attr(init, "__benchmark_runner_version__", f"{gs_pkg.wheel}:{GPUSTACK_INIT}")
    images.append(
        ExtraImage(
            "benchmark",
            f"gpustack/benchmark-runner:{benchmark}",
            f"{gs_pkg.wheel}:{GPUSTACK_INIT} __benchmark_runner_version__",
        )
    )
    tag = _attr(init, "__version__", f"{gs_pkg.wheel}:{GPUSTACK_INIT}")
    return RunnerData(
        version=gs_pkg.version,
        packages=(gs_pkg, rn_pkg, rt_pkg),
        server=f"gpustack/gpustack:{tag}",
        images=tuple(images),
        runners=tuple(runners),
    )


def render(data: RunnerData) -> str:
    """The committed JSON: sorted keys, one runner per line, so a review diff is one line each."""
    head = {
        "schema": SCHEMA,
        "gpustack": data.version,
        "packages": [p.__dict__ for p in data.packages],
        "server": {
            "image": data.server,
            "source": f"{data.packages[0].wheel}:{GPUSTACK_INIT} __version__, "
            "gpustack/config/config.py get_image_name",
        },
        "images": [i.__dict__ for i in data.images],
        "runners_source": f"{data.packages[1].wheel}:{RUNNER_LIST}",
    }
    text = json.dumps(head, indent=2, sort_keys=True)
    lines = ",\n    ".join(json.dumps(r.__dict__, sort_keys=True) for r in data.runners)
    return f'{text[:-2]},\n  "runners": [\n    {lines}\n  ]\n}}\n'


def refresh(
    version: str, data_dir: Path, cache: Path, index_url: str = "https://pypi.org/simple"
) -> Path:
    """Download the version's gpustack wheel and its pinned runner and runtime wheels; write
    `<data_dir>/gpustack-<version>.json` (atomically) and return its path."""
    version = version.removeprefix("v")
    store, http = BlobStore(cache), session()
    gpustack = _fetch_wheel("gpustack", version, index_url, store, http)
    with zipfile.ZipFile(gpustack[1]) as gs:
        metadata = _read(gs, f"gpustack-{version}.dist-info/METADATA", gpustack[0])
    runner = _fetch_wheel(
        "gpustack-runner", _pin(metadata, "gpustack-runner", gpustack[0]), index_url, store, http
    )
    runtime = _fetch_wheel(
        "gpustack-runtime", _pin(metadata, "gpustack-runtime", gpustack[0]), index_url, store, http
    )
    data = extract(gpustack, runner, runtime)
    final = data_path(data_dir, version)
    write_text(final, render(data))
    log.info("wrote %s (%d runners)", final, len(data.runners))
    return final


# --- load ----------------------------------------------------------------------------------------


def load(data_dir: Path, version: str) -> RunnerData:
    path = data_path(data_dir, version)
    fix = f"run `invoke lock` for a GPUStack {version} cell to write it again"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunnerDataError(
            f"{path} is missing: no runner list for GPUStack {version}; {fix}"
        ) from None
    except (OSError, ValueError) as exc:
        raise RunnerDataError(f"{path} cannot be read: {exc}; {fix}") from exc
    try:
        if doc["schema"] != SCHEMA or doc["gpustack"] != version.removeprefix("v"):
            raise ValueError(f"schema {doc['schema']} for GPUStack {doc['gpustack']}")
        data = RunnerData(
            version=doc["gpustack"],
            packages=tuple(Package(**p) for p in doc["packages"]),
            server=doc["server"]["image"],
            images=tuple(ExtraImage(**i) for i in doc["images"]),
            runners=tuple(Runner(**r) for r in doc["runners"]),
            path=path,
        )
        if not data.runners or {i.role for i in data.images} < set(RUNTIME_IMAGE_ENVS):
            raise ValueError("no runners or no pause/health image")
    except (KeyError, TypeError, ValueError) as exc:
        raise RunnerDataError(f"{path} is malformed ({exc}); {fix}") from exc
    return data


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
    benchmark: bool = False,
) -> Selection:
    """The images a worker of `arch` with `backend` (and `backend_version`, e.g. `12.9`; None: the
    newest) needs for `services`, plus the server, pause and health images.

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
        if i.role != "pause" and (i.role != "benchmark" or benchmark)
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


def worker_references(selection: Selection, registry: str) -> list[str]:
    """Every reference the server and worker ask Docker for when started with
    `--system-default-container-registry <registry>`: the worker image of the registration command
    (`gpustack/config/config.py:get_image_name`, `<registry>/gpustack/gpustack:<tag>`), runners
    (`gpustack/worker/backends/base.py:_get_configured_image`), pause and health
    (`gpustack/utils/runtime.py:transform_workload_plan`), each through
    `apply_registry_override_to_image`; `gpustack_runtime`'s `adjust_image_with_envs` then keeps
    them as they are (no `GPUSTACK_RUNTIME_DEPLOY_DEFAULT_CONTAINER_NAMESPACE`)."""
    out: list[str] = []
    for ref in selection.images:
        name = apply_registry_override(ref.name, registry)
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


__all__ = [
    "ExtraImage",
    "ImageRef",
    "NoRunnerError",
    "Offer",
    "Package",
    "Runner",
    "RunnerData",
    "RunnerDataError",
    "Selection",
    "apply_registry_override",
    "available",
    "backend_version_for_host",
    "describe",
    "load",
    "nearest",
    "parse_service",
    "refresh",
    "select",
    "worker_references",
]


# --- cells ---------------------------------------------------------------------------------------

_DEVICE = re.compile(r"([a-z]+)([0-9]+\.[0-9]+)")
_SERVICE_PIN = re.compile(r"([a-z][a-z_-]*?)([0-9][0-9a-z.]*)")


def cell_selection(data_dir: Path, version: str, arch: str, device: str,
                   services: Sequence[str]) -> Selection:  # fmt: skip
    """The images of a 2.x cell: its device is the runner backend and version (`cuda12.9`), its
    extras the services (`vllm`, or `vllm0.17.1` for that version)."""
    match = _DEVICE.fullmatch(device)
    if not match:
        raise NoRunnerError(
            f"device {device!r} is not a runner backend and version such as cuda12.9 or rocm7.0"
        )
    specs = [
        f"{pin.group(1)}=={pin.group(2)}" if (pin := _SERVICE_PIN.fullmatch(s)) else s
        for s in services
    ]
    return select(load(data_dir, version), arch, match.group(1), match.group(2), specs)
