"""Delta bundles: a finished bundle less the pieces a site already holds.

A site installs once and then upgrades for years; each upgrade carries mostly what it already
has (the same wheels, the same CUDA layers of the runner images). A delta is made from a full
bundle of the new cell and a *base*, what the site holds:

- an inventory written on the site by `install.sh --inventory` (the sha256 of every wheel and
  tool kept in its store, and with `--registry` the blobs the site registry holds for our
  images),
- an earlier bundle (its folder or tar), or its `manifest.json`.

Any kind of cell works the same way: a delta leaves out payload files (`wheels/…`, `tools/…`,
`images/blobs/…`) whose sha256 the base has, and carries everything else of the new bundle
unchanged, its `SHA256SUMS`, signature, manifest and SBOM included. So the manifest still lists
every file of the new cell, and the signature still covers every file, carried or not: the site
checks each piece it finds against the signed `SHA256SUMS` before use. `base.json` (not listed in
the sums: it decides nothing) names the base and each piece left out, with the image
repositories a left-out image blob can be fetched from in the site registry.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from gpustack_offline.bundle import tarball
from gpustack_offline.bundle.errors import DeltaError
from gpustack_offline.bundle.release import read_sums
from gpustack_offline.core.files import atomic_dir, atomic_path, link_or_copy, sha256_file

BASE_FILE = "base.json"
SCHEMA = 1
# Files a site may already hold, by sha256: everything else is small and always carried.
PAYLOAD = ("wheels/", "tools/", "images/blobs/")
SIMPLE_INDEX = "wheels/simple/"


@dataclass(frozen=True)
class Base:
    """What the site holds: the sha256 of every piece, and where that was read from."""

    kind: str  # inventory | bundle | manifest
    source: str
    sha256: str  # of the file that describes the base (inventory, SHA256SUMS or manifest)
    digests: frozenset[str]
    cells: tuple[str, ...] = ()

    @property
    def tag(self) -> str:
        return self.sha256[:12]


@dataclass(frozen=True)
class Delta:
    directory: Path
    tar: Path
    carried: int  # bytes of the files carried
    full: int  # bytes of every file of the new bundle
    floor: int  # bytes of the new bundle's files whose sha256 the base lacks
    left_out: int  # files left out


def read_base(path: Path) -> Base:
    """An inventory (JSON), a bundle folder or tar, or a bundle's `manifest.json`."""
    fix = (
        "give `--since` an inventory written by `install.sh --inventory`, an earlier bundle "
        "(folder or .tar) or its manifest.json"
    )
    if path.is_dir():
        sums = path / "SHA256SUMS"
        if not sums.is_file():
            raise DeltaError(f"{path} has no SHA256SUMS: not a bundle folder; {fix}")
        return Base(
            "bundle", str(path), sha256_file(sums), frozenset(read_sums(sums).values()),
            _cells_of(path / "manifest.json"),
        )  # fmt: skip
    if not path.is_file():
        raise DeltaError(f"{path} does not exist; {fix}")
    if tarfile.is_tarfile(path):
        return _base_of_tar(path, fix)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DeltaError(f"{path} is not JSON, a bundle folder or a tar ({exc}); {fix}") from exc
    digest = sha256_file(path)
    if isinstance(doc, dict) and doc.get("kind") == "gpustack-offline-inventory":
        have = set(doc.get("files", []))
        have |= {b.removeprefix("sha256:") for b in doc.get("registry", {}).get("blobs", [])}
        cells = tuple(str(b.get("cell", "")) for b in doc.get("bundles", []))
        return Base("inventory", str(path), digest, frozenset(have), cells)
    if isinstance(doc, dict) and isinstance(doc.get("files"), list) and "cell" in doc:
        have = {str(f["sha256"]) for f in doc["files"] if isinstance(f, dict) and "sha256" in f}
        return Base("manifest", str(path), digest, frozenset(have), (_cell_id(doc),))
    raise DeltaError(f"{path} is neither an inventory nor a bundle manifest; {fix}")


def _base_of_tar(path: Path, fix: str) -> Base:
    with tarfile.open(path) as tar:
        members = {PurePosixPath(m.name).name: m for m in tar.getmembers() if m.isfile()}
        for name in ("SHA256SUMS", "manifest.json"):
            if name not in members:
                raise DeltaError(f"{path} holds no {name}: not a bundle tar; {fix}")
        sums_bytes = _member(tar, members["SHA256SUMS"])
        manifest = json.loads(_member(tar, members["manifest.json"]))
    digests = {line.split("  ", 1)[0] for line in sums_bytes.decode().splitlines() if line}
    return Base(
        "bundle", str(path), hashlib.sha256(sums_bytes).hexdigest(), frozenset(digests),
        (_cell_id(manifest),),
    )  # fmt: skip


def _member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    stream = tar.extractfile(member)
    assert stream is not None  # a regular file
    return stream.read()


def _cells_of(manifest: Path) -> tuple[str, ...]:
    try:
        return (_cell_id(json.loads(manifest.read_text())),)
    except (OSError, ValueError):
        return ()


def _cell_id(manifest: dict[str, Any]) -> str:
    cell = manifest.get("cell")
    return str(cell.get("id", "")) if isinstance(cell, dict) else str(cell or "")


def left_out(sums: dict[str, str], base: Base) -> dict[str, str]:
    """The payload files of a bundle (path -> sha256) whose bytes the base holds."""
    return {
        path: digest
        for path, digest in sums.items()
        if path.startswith(PAYLOAD) and not path.startswith(SIMPLE_INDEX) and digest in base.digests
    }


def blob_repositories(bundle: Path) -> dict[str, list[str]]:
    """Image blob sha256 -> the repositories (`gpustack/runner`) of the images that hold it, read
    from the export folder's docker-archive manifest."""
    path = bundle / "images" / "manifest.json"
    if not path.is_file():
        return {}
    out: dict[str, list[str]] = {}
    for image in json.loads(path.read_text()):
        repos = [tag.rsplit(":", 1)[0] for tag in image.get("RepoTags") or []]
        for blob in [image["Config"], *image["Layers"]] if repos else []:
            held = out.setdefault(blob.rsplit("/", 1)[-1], [])
            held.extend(repo for repo in repos if repo not in held)
    return out


def delta_name(cell_id: str, base: Base) -> str:
    return f"{cell_id}.since-{base.tag}"


def make(full: Path, base: Base, out: Path, tar: Path | None = None) -> Delta:
    """Write the delta of the finished bundle `full` against `base` to `out` (and `tar`), each
    under a temporary name until whole."""
    sums = read_sums(full / "SHA256SUMS")
    omitted = left_out(sums, base)
    repositories = blob_repositories(full)
    sizes = {p: (full / p).stat().st_size for p in sums}
    record = {
        "schema": SCHEMA,
        "kind": "gpustack-offline-delta",
        "cell": _cells_of(full / "manifest.json")[0] if (full / "manifest.json").is_file() else "",
        "base": {"kind": base.kind, "source": Path(base.source).name, "sha256": base.sha256,
                 "cells": list(base.cells)},
        "left_out": [
            {"path": p, "sha256": d, "size": sizes[p],
             **({"repositories": repositories[d]} if d in repositories else {})}
            for p, d in sorted(omitted.items())
        ],
    }  # fmt: skip
    with atomic_dir(out) as stage:
        for path in _files(full):
            rel = path.relative_to(full).as_posix()
            if rel not in omitted:
                link_or_copy(path, stage / rel)
        (stage / BASE_FILE).write_text(_render(record))
    if tar is not None:
        with atomic_path(tar) as tmp, tmp.open("wb") as handle:
            tarball.write(tarball.members(out), handle)
    carried = sum(p.stat().st_size for p in _files(out))
    return Delta(
        directory=out,
        tar=tar or out.with_name(out.name + ".tar"),
        carried=carried,
        full=sum(sizes.values()) + sum(
            p.stat().st_size for p in _files(full) if p.relative_to(full).as_posix() not in sums
        ),
        floor=sum(size for p, size in sizes.items() if sums[p] not in base.digests),
        left_out=len(omitted),
    )  # fmt: skip


def _render(record: dict[str, Any]) -> str:
    """JSON with one left-out piece a line: install.sh reads a piece's repositories with grep."""
    head = json.dumps({k: v for k, v in record.items() if k != "left_out"}, indent=2)
    pieces = ",\n    ".join(json.dumps(p, sort_keys=True) for p in record["left_out"])
    return f'{head[:-2]},\n  "left_out": [\n    {pieces}\n  ]\n}}\n'


def floor(full: Path, base: Base) -> int:
    """Bytes of the new bundle's files whose sha256 the base lacks: what no delta can skip."""
    sums = read_sums(full / "SHA256SUMS")
    return sum((full / p).stat().st_size for p, d in sums.items() if d not in base.digests)


def _files(folder: Path) -> Iterable[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
