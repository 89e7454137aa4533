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
- Benchmark image (the worker starts it for every benchmark, `gpustack/worker/benchmark/
  runner.py`): `gpustack/benchmark-runner:<__benchmark_runner_version__>` (`gpustack/__init__.py`,
  default of `benchmark_image_repo` in `gpustack/schemas/config.py`).
- Everything else upstream's `gpustack list-images` prints (`gpustack/cmd/images.py`:
  `gpustack/higress-plugins`, the operator, `ssh-server`, `mirrored-higress-*`, `mirrored-kueue`,
  `mirrored-csi-*` …, and what installed plugins add through `extra_image_list()`): no code of
  the Docker-mode server or worker names them; the Helm chart and the operator of a Kubernetes
  install do. They are kept with the role `k8s`, for cells that ask for them.

`refresh` writes that data to `bundles/runners/gpustack-<version>.json`: the runner list and the
helper images read out of the three wheels, and the whole image list taken by running upstream's
own `gpustack list-images` in a venv with that release (the one `download-tools` runs in for
0.x), which must name every Docker-mode image found in the code. `load` reads it back. Which
runner a worker picks from it is `runner_choice`'s.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zipfile
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from gpustack_offline.core.devices import K8S, RUNNER_DATA_SCHEMA, runner_data_path
from gpustack_offline.core.downloads import BlobStore, Download, RetryPolicy, session
from gpustack_offline.core.files import write_text
from gpustack_offline.core.processes import run
from gpustack_offline.stages.errors import RunnerDataError
from gpustack_offline.stages.tools import gpustack_venv

log = logging.getLogger("gpustack_offline")

# 2: images listed by `gpustack list-images`, Kubernetes-only ones as `k8s` (the matrix reads the
# devices out of the same files: core/devices.py)
SCHEMA = RUNNER_DATA_SCHEMA
ARCHES = ("amd64", "arm64")
RUNNER_LIST = "gpustack_runner/runner.py.json"
RUNTIME_ENVS = "gpustack_runtime/envs.py"
RUNTIME_IMAGES = "gpustack_runtime/cmds/images.py"
GPUSTACK_INIT = "gpustack/__init__.py"
GPUSTACK_RUNTIME_USE = "gpustack/utils/runtime.py"
GPUSTACK_REGISTRY_OVERRIDE = "gpustack/utils/config.py"
# Runs a console script of the venv by its entry point: the scripts' `#!` lines name the folder
# the venv was made in, before it was moved to its final name.
CONSOLE_SCRIPT = (
    "import sys, importlib.metadata as m; name = sys.argv[1]; sys.argv = sys.argv[1:]; "
    "sys.exit(m.entry_points(group='console_scripts', name=name)[name].load()())"
)
DOCKER_ROLES = ("server", "pause", "health", "benchmark")  # what a Docker-mode site runs
# K8S (core.devices): listed by `gpustack list-images`, named only by a Kubernetes install
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


def version_sort_key(version: str) -> tuple[int, Any]:
    """`gpustack_runner/runner.py:version_sort_key`: PEP 440, unparsable strings below all."""
    try:
        return (1, Version(version))
    except InvalidVersion:
        return (0, [(0, int(x)) if x.isdigit() else (1, x) for x in version.split(".")])


def data_path(data_dir: Path, version: str) -> Path:
    return runner_data_path(data_dir, version)


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
            "reading of it (gpustack_offline/stages/runner_data.py) must be updated"
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
    image_list: list[dict[str, Any]],
) -> RunnerData:
    """Read the runner list and the helper images out of the three wheels; `image_list` is what
    the release's own `gpustack list-images --format json` printed."""
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
    server = f"gpustack/gpustack:{tag}"
    images += _kubernetes_only(image_list, server, images, runners, gs_pkg)
    return RunnerData(
        version=gs_pkg.version,
        packages=(gs_pkg, rn_pkg, rt_pkg),
        server=server,
        images=tuple(images),
        runners=tuple(runners),
    )


def _kubernetes_only(
    listed: list[dict[str, Any]],
    server: str,
    docker: list[ExtraImage],
    runners: list[Runner],
    package: Package,
) -> list[ExtraImage]:
    """What `gpustack list-images` names beyond the Docker-mode images and the runners; it must
    name all of those, or this reading of upstream no longer matches upstream."""
    where = f"`gpustack list-images` of {package.wheel}"
    try:
        names = [str(i["name"]) for i in listed]
    except (TypeError, KeyError) as exc:
        raise RunnerDataError(f"{where} printed no image list: {exc}") from exc
    runner_images = {r.docker_image for r in runners}
    missing = [i for i in [server, *(e.image for e in docker)] if i not in names]
    unknown = [n for n in names if n.startswith("gpustack/runner:") and n not in runner_images]
    if missing or unknown:
        raise RunnerDataError(
            f"{where} does not match the code read out of the wheels (missing: "
            f"{', '.join(missing) or '-'}; runners not in {RUNNER_LIST}: "
            f"{', '.join(unknown) or '-'}); upstream changed how it names its images, so "
            "gpustack_offline/stages/runner_data.py must be updated"
        )
    known = {server, *(e.image for e in docker), *runner_images}
    source = f"{package.wheel}: gpustack list-images"
    return [ExtraImage(K8S, n, source) for n in dict.fromkeys(names) if n not in known]


def list_images(python: Path, version: str) -> list[dict[str, Any]]:
    """Run the release's own `gpustack list-images --format json` (no filter) with `python`'s
    venv; no `GPUSTACK_*` variable of this host reaches it (`GPUSTACK_IMAGE_REPO` would rename
    the server image)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUSTACK_")}
    out = run(
        [python, "-c", CONSOLE_SCRIPT, "gpustack", "list-images", "--format", "json"],
        env=env,
        what=f"listing GPUStack {version}'s images with its own `gpustack list-images`",
    ).stdout
    start = out.find("\n[") + 1 if not out.startswith("[") else 0
    try:
        listed, _ = json.JSONDecoder().raw_decode(out[start:])
    except ValueError as exc:
        raise RunnerDataError(
            f"`gpustack list-images` of GPUStack {version} printed no JSON list ({exc}): "
            f"{out[-500:]}"
        ) from exc
    if not isinstance(listed, list):
        raise RunnerDataError(f"`gpustack list-images` of GPUStack {version} printed {listed!r}")
    return listed


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


# What each refresh of this process wrote, by (version, folder, index): `invoke lock` locks every
# cell of a version (a 2.x version has ~150-190, one per runner device, arch and services), and
# upstream's data is read once per version and run, while the file still holds what was written.
_WRITTEN: dict[tuple[str, Path, str], str] = {}


def refresh(
    version: str,
    data_dir: Path,
    cache: Path,
    index_url: str = "https://pypi.org/simple",
    policy: RetryPolicy | None = None,
) -> Path:
    """Download the version's gpustack wheel and its pinned runner and runtime wheels, run its
    `gpustack list-images` in its tool venv; write `<data_dir>/gpustack-<version>.json`
    (atomically) and return its path. Once per version, folder and index in a process."""
    version = version.removeprefix("v")
    final = data_path(data_dir, version)
    key = (version, data_dir.resolve(), index_url)
    if key in _WRITTEN and final.is_file() and final.read_text() == _WRITTEN[key]:
        return final
    store, http = BlobStore(cache, policy), session()
    gpustack = _fetch_wheel("gpustack", version, index_url, store, http)
    with zipfile.ZipFile(gpustack[1]) as gs:
        metadata = _read(gs, f"gpustack-{version}.dist-info/METADATA", gpustack[0])
    runner = _fetch_wheel(
        "gpustack-runner", _pin(metadata, "gpustack-runner", gpustack[0]), index_url, store, http
    )
    runtime = _fetch_wheel(
        "gpustack-runtime", _pin(metadata, "gpustack-runtime", gpustack[0]), index_url, store, http
    )
    python = gpustack_venv(version, [], cache, index_url)
    data = extract(gpustack, runner, runtime, list_images(python, version))
    text = render(data)
    write_text(final, text)
    _WRITTEN[key] = text
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
        roles = {i.role for i in data.images}
        if not data.runners or not set(DOCKER_ROLES) - {"server"} <= roles:
            raise ValueError("no runners, or no pause, health or benchmark image")
    except (KeyError, TypeError, ValueError) as exc:
        raise RunnerDataError(f"{path} is malformed ({exc}); {fix}") from exc
    return data
