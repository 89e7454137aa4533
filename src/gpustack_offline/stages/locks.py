"""Per-cell lock files: the wheel set of a cell, resolved for its target, with hashes.

`uv pip compile --python-platform` resolves for the target platform and Python, not for the host,
and writes a PEP 751 `pylock.toml` that names every file with its URL, size and sha256. One lock
per cell lives in `bundles/locks/<cell-id>/pylock.toml`; its `[tool.gpustack-offline]` table
records a digest of the inputs, so a changed override or requirement shows up as a stale lock
instead of a silently different bundle.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import sys
import tempfile
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import requests
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from gpustack_offline.core.downloads import session, short_reason
from gpustack_offline.core.errors import CommandError, LockError
from gpustack_offline.core.files import write_text
from gpustack_offline.core.matrix import Cell
from gpustack_offline.core.options import TOOL_KEY
from gpustack_offline.core.processes import run
from gpustack_offline.core.tomlfile import read_toml


@dataclass(frozen=True)
class Inputs:
    """Everything that decides a cell's wheel set."""

    requirements: tuple[str, ...]
    installer: tuple[str, ...] = ()  # resolved with the rest, installed by nothing: it installs
    constraints: tuple[str, ...] = ()
    build_constraints: tuple[str, ...] = ()
    platform: str = ""
    python: str = ""
    index_url: str = ""

    def digest(self) -> str:
        # Not the index: the lock pins every file by sha256, so a site mirror of PyPI serves
        # the same lock, and a committed lock stays current whichever index builds it (nor does
        # the digest then carry anything of the index's password).
        values = {k: v for k, v in self.__dict__.items() if k != "index_url"}
        blob = json.dumps(values, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def without_credentials(url: str) -> str:
    """`https://user:secret@host/simple` → `https://host/simple`."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


@dataclass(frozen=True)
class Override:
    select: tuple[str, ...]
    constraints: tuple[str, ...] = ()
    build_constraints: tuple[str, ...] = ()
    extra_requirements: tuple[str, ...] = ()


def load_overrides(path: Path) -> list[Override]:
    if not path.is_file():
        return []
    data = read_toml(path, LockError)
    known = {"select", "constraints", "build-constraints", "extra-requirements"}
    result = []
    for i, entry in enumerate(data.get("override", []), start=1):
        unknown = set(entry) - known
        if unknown or "select" not in entry:
            raise LockError(
                f"{path}: [[override]] #{i} has unknown keys {sorted(unknown)} or no 'select'; "
                f"known keys: {', '.join(sorted(known))}"
            )
        select = entry["select"]
        result.append(
            Override(
                select=(select,) if isinstance(select, str) else tuple(select),
                constraints=tuple(entry.get("constraints", ())),
                build_constraints=tuple(entry.get("build-constraints", ())),
                extra_requirements=tuple(entry.get("extra-requirements", ())),
            )
        )
    return result


def matching(overrides: Sequence[Override], cell: Cell) -> list[Override]:
    return [o for o in overrides if any(fnmatch.fnmatchcase(cell.id, s) for s in o.select)]


def inputs_for(cell: Cell, overrides: Sequence[Override], index_url: str) -> Inputs:
    found = matching(overrides, cell)
    return Inputs(
        requirements=(cell.requirement, *(r for o in found for r in o.extra_requirements)),
        installer=(cell.installer,) if cell.installer else (),
        constraints=tuple(c for o in found for c in o.constraints),
        build_constraints=tuple(c for o in found for c in o.build_constraints),
        platform=cell.uv_platform,
        python=cell.python,
        index_url=index_url,
    )


@dataclass(frozen=True)
class LockedFile:
    url: str
    sha256: str
    size: int | None

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1].split("#", 1)[0]


@dataclass(frozen=True)
class LockedPackage:
    name: str
    version: str
    marker: str | None
    wheels: tuple[LockedFile, ...]
    sdist: LockedFile | None


@dataclass(frozen=True)
class Lock:
    path: Path
    cell_id: str
    inputs_digest: str
    packages: tuple[LockedPackage, ...] = field(default=())
    installer: tuple[str, ...] = ()  # requirements of the site's installer (uv), not of GPUStack

    def installer_names(self) -> set[str]:
        return {canonicalize_name(Requirement(r).name) for r in self.installer}

    def digest(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def lock_path(locks_dir: Path, cell: Cell) -> Path:
    return locks_dir / cell.id / "pylock.toml"


def _file(entry: Mapping[str, object], where: str) -> LockedFile:
    hashes = entry.get("hashes") or {}
    if "url" not in entry or "sha256" not in hashes:  # type: ignore[operator]
        raise LockError(f"{where}: a file entry has no url or sha256; refresh the lock")
    return LockedFile(str(entry["url"]), str(hashes["sha256"]), entry.get("size"))  # type: ignore[index,arg-type]


def read_lock(path: Path) -> Lock:
    data = read_toml(
        path, LockError, "refresh it with `invoke lock`", missing=f"lock {path} does not exist"
    )
    meta = data.get("tool", {}).get(TOOL_KEY, {})
    packages = []
    for entry in data.get("packages", []):
        where = f"{path} package {entry.get('name')}"
        sdist = entry.get("sdist")
        packages.append(
            LockedPackage(
                name=entry["name"],
                version=entry["version"],
                marker=entry.get("marker"),
                wheels=tuple(_file(w, where) for w in entry.get("wheels", [])),
                sdist=_file(sdist, where) if sdist else None,
            )
        )
    return Lock(
        path,
        meta.get("cell", ""),
        meta.get("inputs-digest", ""),
        tuple(packages),
        tuple(meta.get("installer", ())),
    )


def package_changes(old: Lock | None, new: Lock) -> list[str]:
    """What moved between two locks of a cell, one line per package: `name: 1.0 -> 1.1`,
    `(none)` for a package added or dropped (a name with several versions, one per marker,
    lists them all)."""

    def versions(lock: Lock | None) -> dict[str, str]:
        found: dict[str, set[str]] = {}
        for package in lock.packages if lock else ():
            found.setdefault(canonicalize_name(package.name), set()).add(package.version)
        return {name: ", ".join(sorted(v)) for name, v in found.items()}

    before, after = versions(old), versions(new)
    return [
        f"{name}: {before.get(name, '(none)')} -> {after.get(name, '(none)')}"
        for name in sorted(before.keys() | after.keys())
        if before.get(name) != after.get(name)
    ]


def _toml_list(values: Sequence[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def make_lock(cell: Cell, inputs: Inputs, locks_dir: Path, cache_dir: Path) -> Path:
    """Resolve the cell with uv and write its lock atomically."""
    final = lock_path(locks_dir, cell)
    with tempfile.TemporaryDirectory(prefix="lock-") as tmp_name:
        tmp = Path(tmp_name)
        if final.is_file():
            # uv prefers the versions of an existing output file: a refresh for a new input
            # moves only what that input needs, not everything released since the last lock
            (tmp / "pylock.toml").write_bytes(final.read_bytes())
        wanted = (*inputs.requirements, *inputs.installer)
        (tmp / "requirements.in").write_text("\n".join(wanted) + "\n")
        argv: list[str | Path] = [
            sys.executable, "-m", "uv", "pip", "compile", tmp / "requirements.in",
            "--python-platform", inputs.platform,
            "--python-version", inputs.python,
            "--format", "pylock.toml", "--no-header", "--quiet",
            "-o", tmp / "pylock.toml",
        ]  # fmt: skip
        if inputs.constraints:
            (tmp / "constraints.txt").write_text("\n".join(inputs.constraints) + "\n")
            argv += ["--constraints", tmp / "constraints.txt"]
        if inputs.build_constraints:
            (tmp / "build-constraints.txt").write_text("\n".join(inputs.build_constraints) + "\n")
            argv += ["--build-constraints", tmp / "build-constraints.txt"]
        # the index through the environment: credentials in its URL stay off the argument list
        # (visible in /proc to every user) and out of the runner's log; uv keeps them out of
        # the lock's file URLs itself
        env = {
            **os.environ,
            "UV_CACHE_DIR": str(cache_dir / "uv"),
            "UV_INDEX_URL": inputs.index_url,
        }
        try:
            run(
                argv,
                env=env,
                what=f"resolving {cell.id} ({inputs.platform}, Python {inputs.python})",
                fix="read uv's message above; a pin in bundles/overrides.toml (constraints, "
                "build-constraints) for this cell usually settles it",
            )
        except CommandError:
            problem = index_problem(inputs.index_url)
            if problem:  # the index, not the requirements: a pin would not help
                raise LockError(f"resolving {cell.id}: {problem}") from None
            raise
        body = (tmp / "pylock.toml").read_text()
    header = (
        f"# Lock for cell {cell.id}: written by `invoke lock`, read by `invoke bundle`.\n"
        "# Resolved for the target's platform and Python, not the build host's.\n"
    )
    meta = (
        f"\n[tool.{TOOL_KEY}]\n"
        f"cell = {json.dumps(cell.id)}\n"
        f"inputs-digest = {json.dumps(inputs.digest())}\n"
        f"requirements = {_toml_list(inputs.requirements)}\n"
        f"installer = {_toml_list(inputs.installer)}\n"
        f"constraints = {_toml_list(inputs.constraints)}\n"
        f"build-constraints = {_toml_list(inputs.build_constraints)}\n"
        f"platform = {json.dumps(inputs.platform)}\n"
        f"python = {json.dumps(inputs.python)}\n"
    )
    write_text(final, header + body.rstrip() + "\n" + meta)
    return final


def index_problem(index_url: str) -> str | None:
    """What is wrong with the package index, if anything: unreachable, refusing, or not a
    simple index (PEP 503) at all. Asked after a failed resolution, to give the right advice."""
    shown = without_credentials(index_url)
    probe = index_url.rstrip("/") + "/pip/"
    try:
        resp = session().get(probe, timeout=(5, 15))
    except requests.RequestException as exc:
        host = urllib.parse.urlsplit(index_url).hostname or shown
        return (
            f"cannot reach {host}: {short_reason(exc)}. Check the network, the proxy settings "
            f"or the index-url option ({shown}), then rerun"
        )
    if resp.status_code in (401, 403):
        return (
            f"the index {shown} refused access ({resp.status_code}). Fix: put working "
            "credentials in the index-url option (https://user:token@host/simple)"
        )
    if resp.status_code >= 400 or "pip-" not in resp.text:
        return (
            f"{shown} is not a package index: GET {without_credentials(probe)} answered "
            f"{resp.status_code} without pip's files. Fix: set the index-url option to a "
            "simple index (PEP 503), such as https://pypi.org/simple or a mirror's …/simple"
        )
    return None


def ensure_lock(
    cell: Cell, inputs: Inputs, locks_dir: Path, cache_dir: Path, frozen: bool
) -> tuple[Lock, str]:
    """The cell's current lock, made or refreshed unless `frozen`. Returns (lock, what happened)."""
    path = lock_path(locks_dir, cell)
    state = "used"
    if not path.is_file():
        if frozen:
            raise LockError(
                f"no lock for {cell.id} at {path}; run `invoke lock --cell {cell.id}` and commit it"
            )
        make_lock(cell, inputs, locks_dir, cache_dir)
        state = "created"
    lock = read_lock(path)
    if lock.inputs_digest != inputs.digest():
        if frozen:
            raise LockError(
                f"lock {path} is stale: its inputs (requirement, overrides, platform) changed; "
                f"run `invoke lock --cell {cell.id}` and commit it"
            )
        make_lock(cell, inputs, locks_dir, cache_dir)
        lock, state = read_lock(path), "refreshed"
    return lock, state
