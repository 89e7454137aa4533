"""The wheelhouse of a cell: pick the target's wheels from the lock, fetch, build, gate, index.

Every wheel is chosen by the target's own tags (see `targets`), so a wheel set built on an amd64
host installs on an arm64 or Windows target. A package with no wheel for the target is built
from its sdist: pure-Python ones here, native ones inside a container of the target architecture.
"""

from __future__ import annotations

import html
import logging
import re
import sys
import tarfile
import tempfile
import urllib.parse
import zipfile
from collections.abc import Sequence, Set
from dataclasses import dataclass
from pathlib import Path

import requests
from packaging.utils import canonicalize_name

from gpustack_offline.core.downloads import BlobStore, Download, RetryPolicy, session, short_reason
from gpustack_offline.core.errors import CudaGateError, WheelError
from gpustack_offline.core.files import atomic_path, sha256_file
from gpustack_offline.core.matrix import Cell
from gpustack_offline.core.processes import run
from gpustack_offline.core.safety import safe_extract_tar, safe_extract_zip
from gpustack_offline.stages import targets
from gpustack_offline.stages.locks import Lock, LockedFile, LockedPackage, without_credentials

log = logging.getLogger("gpustack_offline")


@dataclass(frozen=True)
class Wheel:
    """A wheel in the bundle: its file, digest, and where it came from."""

    name: str
    version: str
    filename: str
    sha256: str
    path: Path
    origin: str
    built: bool = False


def choose(cell: Cell, package: LockedPackage) -> LockedFile | None:
    """The locked wheel the target's pip would prefer, or None if none installs there."""
    ranked = [(targets.wheel_rank(cell, w.filename), w) for w in package.wheels]
    usable = [(rank, w) for rank, w in ranked if rank is not None]
    return min(usable, key=lambda rw: rw[0])[1] if usable else None


def plan(
    cell: Cell, lock: Lock
) -> tuple[list[tuple[LockedPackage, LockedFile]], list[LockedPackage]]:
    """Split the lock into (wheels to fetch, packages to build from sdist) for this target."""
    fetch: list[tuple[LockedPackage, LockedFile]] = []
    build: list[LockedPackage] = []
    for package in lock.packages:
        if not targets.marker_applies(cell, package.marker):
            continue
        wheel = choose(cell, package)
        if wheel:
            fetch.append((package, wheel))
        elif package.sdist:
            build.append(package)
        else:
            tags = ", ".join(w.filename for w in package.wheels) or "none"
            raise WheelError(
                f"{package.name}=={package.version} has no wheel for {cell.id} "
                f"(Python {cell.python}, {targets.platforms(cell)[0]}) and no sdist to build one "
                f"(locked wheels: {tags}). Pin a version that has one in bundles/overrides.toml"
            )
    return fetch, build


# -- CUDA gate ----------------------------------------------------------------------------------

_CU_SUFFIX = re.compile(r"-cu(\d+)$")
# Packages whose own version is the CUDA toolkit version they ship.
_CUDA_VERSIONED = {
    "nvidia-cuda-runtime",
    "nvidia-cuda-nvrtc",
    "nvidia-cuda-cupti",
    "nvidia-nvtx",
    "cuda-toolkit",
    "cuda-bindings",
    "cuda-python",
}


def cuda_major(name: str, version: str) -> int | None:
    """The CUDA major a package's binaries need, if it is a CUDA runtime package."""
    name = canonicalize_name(name)
    if match := _CU_SUFFIX.search(name):
        return int(match.group(1))
    if name in _CUDA_VERSIONED:
        return int(version.split(".")[0])
    if name.startswith("torch") and (m := re.search(r"\+cu(\d+)\d$", version)):
        return int(m.group(1))
    return None


def cuda_gate(cell: Cell, packages: Sequence[LockedPackage], index_url: str = "") -> None:
    """Refuse a wheel set whose CUDA runtime needs a newer major than the cell's driver floor."""
    if not cell.cuda:
        return
    floor = int(cell.cuda.split(".")[0])
    too_new = [
        (p, major)
        for p in packages
        if (major := cuda_major(p.name, p.version)) is not None and major > floor
    ]
    if not too_new:
        return
    package, major = too_new[0]
    pullers = _who_requires(cell, packages, {canonicalize_name(p.name) for p, _ in too_new})
    by = f", pulled in by {', '.join(pullers)}" if pullers else ""
    names = ", ".join(f"{p.name}=={p.version}" for p, _ in too_new[:4])
    hint = pullers[0].split("==")[0] if pullers else package.name
    raise CudaGateError(
        f"{cell.id}: the wheel set needs CUDA {major} ({names}{by}), but the cell's driver floor "
        f"is CUDA {cell.cuda}. Fix: pin {hint} to a release built for CUDA {floor} in "
        f'bundles/overrides.toml `constraints` for this cell (for torch: "torch<2.11" stays on '
        f"CUDA 12), then `invoke lock --cell {cell.id}`"
    )


def _who_requires(cell: Cell, packages: Sequence[LockedPackage], wanted: set[str]) -> list[str]:
    """Locked packages whose metadata requires one of `wanted` (PEP 658 metadata, best effort)."""
    http = session()
    found = []
    for package in packages:
        wheel = choose(cell, package)
        if not wheel or canonicalize_name(package.name) in wanted:
            continue
        try:
            resp = http.get(wheel.url + ".metadata", timeout=20)
        except Exception:  # noqa: BLE001 - naming the culprit is a courtesy, not a requirement
            continue
        if resp.status_code != 200:
            continue
        for line in resp.text.splitlines():
            if line.startswith("Requires-Dist:"):
                dep = re.split(r"[\s;<>=!~\[(]", line.split(":", 1)[1].strip(), maxsplit=1)[0]
                if canonicalize_name(dep) in wanted:
                    found.append(f"{package.name}=={package.version}")
                    break
    return found


# -- a site mirror of PyPI -------------------------------------------------------------------------

PYPI_SIMPLE = "https://pypi.org/simple"
_HREF = re.compile(r"""<a\s[^>]*href=["']([^"']+)["']""", re.I)


def on_index(index_url: str, files: Sequence[tuple[str, str]]) -> dict[str, str]:
    """Where a mirror index (PEP 503) serves each locked file, by file name: the lock names
    PyPI's URLs, but pins every file by sha256, so a site that mirrors PyPI builds from the
    same lock through its mirror. Empty for PyPI itself (the lock's URLs are used)."""
    if without_credentials(index_url).rstrip("/") == PYPI_SIMPLE:
        return {}
    http = session()
    found: dict[str, str] = {}
    for project in sorted({canonicalize_name(name) for name, _ in files}):
        page = f"{index_url.rstrip('/')}/{project}/"
        try:
            resp = http.get(page, timeout=(10, 60))
        except requests.RequestException as exc:
            raise WheelError(
                f"cannot reach the index {without_credentials(index_url)}: {short_reason(exc)}. "
                "Check the network or the index-url option"
            ) from None
        if resp.status_code == 200:
            for href in _HREF.findall(resp.text):
                url = urllib.parse.urljoin(page, html.unescape(href)).split("#", 1)[0]
                found[url.rsplit("/", 1)[-1]] = url
    missing = [name for _, name in files if name not in found]
    if missing:
        raise WheelError(
            f"the index {without_credentials(index_url)} does not serve {len(missing)} locked "
            f"file(s): {', '.join(missing[:5])}. Fix: mirror them from PyPI (the lock names "
            "each with its sha256), or unset the index-url option to fetch from PyPI"
        )
    return found


# -- sdist builds --------------------------------------------------------------------------------


class SdistBuilder:
    """Builds wheels from sdists for one cell; results cached by sdist digest and target."""

    def __init__(self, cell: Cell, cache: Path, build_constraints: Sequence[str], index_url: str):
        self.cell = cell
        self.cache = cache
        self.constraints = "\n".join(build_constraints) + "\n" if build_constraints else ""
        self.index_url = index_url

    def _key(self, sdist_sha: str) -> str:
        import hashlib

        blob = f"{sdist_sha}|{self.cell.os}|{self.cell.arch}|{self.cell.python}|{self.constraints}"
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def build(self, package: LockedPackage, sdist_path: Path) -> Path:
        assert package.sdist is not None
        out_dir = self.cache / "built" / self._key(package.sdist.sha256)
        done = sorted(out_dir.glob("*.whl"))
        if done:
            return done[0]
        with tempfile.TemporaryDirectory(prefix="sdist-") as tmp_name:
            tmp = Path(tmp_name)
            source = self._unpack(package, sdist_path, tmp / "src")
            constraints = tmp / "build-constraints.txt"
            constraints.write_text(self.constraints)
            wheel = self._build_here(package, source, tmp / "host-out", constraints)
            if targets.wheel_rank(self.cell, wheel.name) is None:
                log.info("%s is native (%s); building it for the target", package.name, wheel.name)
                source = self._unpack(package, sdist_path, tmp / "target-src")
                wheel = self._build_in_container(package, source, tmp / "target-out", constraints)
            if targets.wheel_rank(self.cell, wheel.name) is None:
                raise WheelError(
                    f"{package.name}=={package.version}: the wheel built from its sdist "
                    f"({wheel.name}) does not install on {self.cell.id}"
                )
            with atomic_path(out_dir / wheel.name) as tmp_final:
                tmp_final.write_bytes(wheel.read_bytes())
        return out_dir / wheel.name

    @staticmethod
    def _unpack(package: LockedPackage, sdist_path: Path, dest: Path) -> Path:
        assert package.sdist is not None
        name = package.sdist.filename
        dest.mkdir(parents=True)
        if name.endswith(".zip"):
            with zipfile.ZipFile(sdist_path) as zf:
                safe_extract_zip(zf, dest, what=name)
        else:
            with tarfile.open(sdist_path) as tf:
                safe_extract_tar(tf, dest, what=name)
        tops = [p for p in dest.iterdir() if p.is_dir()]
        return tops[0] if len(tops) == 1 else dest

    def _build_here(
        self, package: LockedPackage, source: Path, out: Path, constraints: Path
    ) -> Path:
        import os

        env = {**os.environ, "PIP_CONSTRAINT": str(constraints), "PIP_INDEX_URL": self.index_url}
        run(
            [sys.executable, "-m", "build", "--wheel", "--outdir", out, source],
            env=env,
            what=f"building {package.name}=={package.version} from its sdist",
            fix=f"add old build tools for it to `build-constraints` in bundles/overrides.toml "
            f'for {self.cell.id} (e.g. "setuptools<81"), or pin a version that ships wheels',
        )
        return _only_wheel(out, package)

    def _build_in_container(
        self, package: LockedPackage, source: Path, out: Path, constraints: Path
    ) -> Path:
        from gpustack_offline.core.docker import BUILDER_PYTHON, builder_image, run_container

        if self.cell.os != "linux":
            raise WheelError(
                f"{package.name}=={package.version} has no {self.cell.os} wheel and its sdist is "
                f"native code that cannot be compiled for {self.cell.os} here. Pin a version "
                "that ships a wheel for the target in bundles/overrides.toml"
            )
        if self.cell.python != BUILDER_PYTHON:
            raise WheelError(
                f"{package.name}=={package.version} needs a native build for Python "
                f"{self.cell.python}, but the builder containers (Debian 12) have Python "
                f"{BUILDER_PYTHON} only. Pin a version that ships a "
                f"cp{self.cell.python.replace('.', '')} "
                "wheel in bundles/overrides.toml, or bundle this cell for Python "
                f"{BUILDER_PYTHON}"
            )
        out.mkdir(parents=True)
        image = builder_image(self.cell.arch, self.cache)
        run_container(
            image,
            ["python3", "-m", "build", "--wheel", "--outdir", "/out", "/src"],
            mounts={source: "/src", out: "/out", constraints.parent: "/constraints"},
            env={
                "PIP_CONSTRAINT": f"/constraints/{constraints.name}",
                "PIP_INDEX_URL": self.index_url,
            },
            what=f"building {package.name}=={package.version} for linux/{self.cell.arch}",
            network=True,
        )
        return _only_wheel(out, package)


def _only_wheel(out: Path, package: LockedPackage) -> Path:
    wheels = sorted(out.glob("*.whl"))
    if len(wheels) != 1:
        raise WheelError(f"building {package.name} produced {len(wheels)} wheels, expected one")
    return wheels[0]


# -- the wheelhouse --------------------------------------------------------------------------------


def wheelhouse(
    cell: Cell,
    lock: Lock,
    cache: Path,
    build_constraints: Sequence[str],
    index_url: str,
    jobs: int = 4,
    show_progress: bool = True,
    policy: RetryPolicy | None = None,
) -> list[Wheel]:
    """Fetch and build every wheel the cell's target needs; gate and check them."""
    to_fetch, to_build = plan(cell, lock)
    cuda_gate(cell, [p for p, _ in to_fetch] + to_build, index_url)
    store = BlobStore(cache, policy)
    files = [(p.name, w) for p, w in to_fetch]
    files += [(p.name, p.sdist) for p in to_build if p.sdist]
    # only what the cache lacks is looked up: a warm build asks no index anything
    absent = [(name, f.filename) for name, f in files if not store.has(f.sha256)]
    urls = on_index(index_url, absent) if absent else {}
    downloads = [
        Download(urls.get(f.filename, f.url), f.sha256, f.size, f.filename) for _, f in files
    ]
    paths = store.fetch_all(downloads, jobs=jobs, show=show_progress)
    result = [
        Wheel(p.name, p.version, w.filename, w.sha256, path, w.url)
        for (p, w), path in zip(to_fetch, paths, strict=False)
    ]
    builder = SdistBuilder(cell, cache, build_constraints, index_url)
    for package, sdist_path in zip(to_build, paths[len(to_fetch) :], strict=True):
        assert package.sdist is not None
        built = builder.build(package, sdist_path)
        result.append(
            Wheel(
                package.name,
                package.version,
                built.name,
                sha256_file(built),
                built,
                f"built from {package.sdist.url} (sha256 {package.sdist.sha256})",
                built=True,
            )
        )
    check_tags(cell, result)
    return sorted(result, key=lambda w: canonicalize_name(w.name))


def check_tags(cell: Cell, wheels: Sequence[Wheel]) -> None:
    """Every wheel must carry a tag the target's pip accepts."""
    bad = [w.filename for w in wheels if targets.wheel_rank(cell, w.filename) is None]
    if bad:
        raise WheelError(
            f"{cell.id}: {len(bad)} wheel(s) cannot install on the target "
            f"(Python {cell.python}, {targets.platforms(cell)[0]}): {', '.join(bad[:5])}"
        )


def requirements_txt(cell: Cell, wheels: Sequence[Wheel], leave_out: Set[str] = frozenset()) -> str:
    """The install set for `pip install --require-hashes --no-deps -r`: every wheel but those
    named in `leave_out` (the installer, which installs and is not installed)."""
    top = canonicalize_name("gpustack")
    wheels = [w for w in wheels if canonicalize_name(w.name) not in leave_out]
    lines = [
        "# Every package of the bundle, pinned to the exact file shipped in wheels/.",
        f"# Cell {cell.id}; install with install.sh, or:",
        "#   pip install --no-index --find-links wheels --require-hashes --no-deps \\",
        "#       -r requirements.txt",
    ]
    for w in wheels:
        name = cell.requirement.split("==")[0] if canonicalize_name(w.name) == top else w.name
        lines.append(f"{name}=={w.version} --hash=sha256:{w.sha256}")
    return "\n".join(lines) + "\n"


def simple_index(wheels: Sequence[Wheel]) -> dict[str, str]:
    """PEP 503 pages, relative paths under `wheels/simple/`, linking `../../<file>#sha256=`."""
    projects: dict[str, list[Wheel]] = {}
    for w in wheels:
        projects.setdefault(str(canonicalize_name(w.name)), []).append(w)
    page = (
        "<!DOCTYPE html>\n<html><head><title>{title}</title></head><body>\n{body}</body></html>\n"
    )
    pages = {
        "index.html": page.format(
            title="Simple index",
            body="".join(f'<a href="{n}/">{n}</a><br/>\n' for n in sorted(projects)),
        )
    }
    for name, files in projects.items():
        links = "".join(
            f'<a href="../../{html.escape(w.filename)}#sha256={w.sha256}">'
            f"{html.escape(w.filename)}</a><br/>\n"
            for w in sorted(files, key=lambda w: w.filename)
        )
        pages[f"{name}/index.html"] = page.format(title=f"Links for {name}", body=links)
    return pages
