"""The release index: which bundles a release holds, their sizes and digests, and its assets.

A bundle job of the release workflow stages its one finished bundle (`stage_release`): the
archive (`<cell>.tar`, or its volumes `<cell>.tar.*`), the SBOM, the signed sums and the
verification report, each under a release-wide unique name, plus `<cell>.release.json`, the
bundle's index entry, computed where the bytes are. The release job needs only those small
entries (`merge_release_entries`) to write the index, its markdown table for the release notes,
and a `SHA256SUMS` over every asset. Locally, `release_index(dist)` does the same for every
finished bundle under `dist/`.

Everything written is deterministic (sorted, no timestamps): the same bundles give the same index.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from gpustack_offline.bundle.errors import ReleaseError
from gpustack_offline.core.files import CHUNK, atomic_dir, link_or_copy, sha256_file, write_text

SCHEMA_VERSION = 1
INDEX_NAME = "release-index.json"
NOTES_NAME = "release-index.md"
SUMS_NAME = "SHA256SUMS"
ENTRY_SUFFIX = ".release.json"
# Inside dist/<cell>/: the SBOM and the detached signature over the bundle's SHA256SUMS.
SBOM_FILE = "sbom.cdx.json"
SIGNATURE_FILE = "SHA256SUMS.sig"
# Beside dist/<cell>/ (a bundle's folder is not a release asset; its tar is).
ASSET_SOURCES = {
    "sbom": "{cell}/" + SBOM_FILE,
    "sums": "{cell}/SHA256SUMS",
    "signature": "{cell}/" + SIGNATURE_FILE,
    "verify": "{cell}.verify.json",
}
ASSET_NAMES = {
    "sbom": "{cell}.sbom.cdx.json",
    "sums": "{cell}.SHA256SUMS",
    "signature": "{cell}.SHA256SUMS.sig",
    "verify": "{cell}.verify.json",
}
_ENTRY_KEYS = {"cell", "gpustack_version", "archive", "size", "manifest_sha256", "verified"}


def _asset(path: Path, name: str | None = None) -> dict[str, Any]:
    return {"name": name or path.name, "size": path.stat().st_size, "sha256": sha256_file(path)}


def read_sums(path: Path) -> dict[str, str]:
    """`sha256sum` lines (`<hex>  <path>`) as path -> hex; lines of another form are left out."""
    sums = {}
    for line in path.read_text().splitlines():
        digest, sep, name = line.partition("  ")
        if sep and name:
            sums[name.lstrip("*")] = digest
    return sums


def _archive_files(dist: Path, cell_id: str) -> list[Path]:
    """The bundle's archive: its split volumes if there are any, else the one tar."""
    volumes = sorted(p for p in dist.glob(f"{cell_id}.tar.*") if p.is_file())
    if volumes:
        return volumes
    tar = dist / f"{cell_id}.tar"
    if tar.is_file():
        return [tar]
    raise ReleaseError(
        f"{cell_id}: no archive beside its folder (neither {tar.name} nor {tar.name}.* volumes "
        f"under {dist}); run `invoke bundle --cell {cell_id}` again"
    )


def _member_sha256(tar: Path, member: str) -> str | None:
    """sha256 of one member of an uncompressed tar (seeks past the others), None if absent."""
    with tarfile.open(tar, "r:") as tf:
        for info in tf:
            if info.name == member and info.isfile():
                fh = tf.extractfile(info)
                if fh is None:
                    return None
                digest = hashlib.sha256()
                while chunk := fh.read(CHUNK):
                    digest.update(chunk)
                return digest.hexdigest()
    return None


def bundle_entry(dist: Path, cell_id: str) -> dict[str, Any]:
    """The index entry of one finished bundle under `dist`, after checking it is releasable.

    The manifest must be the one the signed sums list (and, for a single tar, the one inside the
    tar), so that the digests published for a cell describe the bytes a site receives.
    """
    folder = dist / cell_id
    manifest_path = folder / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError as exc:
        raise ReleaseError(f"{cell_id}: {manifest_path} is missing: not a finished bundle") from exc
    except json.JSONDecodeError as exc:
        raise ReleaseError(f"{manifest_path}: not valid JSON ({exc}); rebuild the bundle") from exc
    # a cell's bundle names its cell; a model's bundle (no GPUStack version) names itself
    named = (manifest.get("cell") or {}).get("id") or (manifest.get("bundle") or {}).get("id")
    if named != cell_id:
        raise ReleaseError(
            f"{manifest_path} describes cell {named!r}, not {cell_id!r}; rebuild the bundle"
        )

    for kind, fix in (
        ("sums", "rebuild the bundle"),
        ("sbom", "rebuild it with a gpustack-offline that writes the SBOM"),
        ("signature", "rebuild it with GPUSTACK_OFFLINE_SIGNING_KEY set to the release key"),
    ):
        required = dist / ASSET_SOURCES[kind].format(cell=cell_id)
        if not required.is_file():
            raise ReleaseError(f"{cell_id}: {required} is missing; {fix}")
    sums = read_sums(folder / "SHA256SUMS")
    manifest_sha256 = sha256_file(manifest_path)
    if sums.get("manifest.json") != manifest_sha256:
        raise ReleaseError(
            f"{cell_id}: manifest.json does not match its line in SHA256SUMS (altered after the "
            "build, or from another build); rebuild the bundle"
        )
    sbom_listed = sums.get(SBOM_FILE)
    if sbom_listed is not None and sbom_listed != sha256_file(folder / SBOM_FILE):
        raise ReleaseError(
            f"{cell_id}: {SBOM_FILE} does not match its line in SHA256SUMS; rebuild the bundle"
        )

    archive = _archive_files(dist, cell_id)
    if len(archive) == 1 and archive[0].suffix == ".tar":
        inside = _member_sha256(archive[0], f"{cell_id}/manifest.json")
        if inside != manifest_sha256:
            raise ReleaseError(
                f"{cell_id}: {archive[0].name} does not hold this manifest.json (the tar is "
                "from another build); rebuild the bundle"
            )

    report_path = dist / ASSET_SOURCES["verify"].format(cell=cell_id)
    verified = "not verified"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        if not report.get("ok"):
            raise ReleaseError(
                f"{cell_id}: {report_path.name} says verification failed; fix the bundle and "
                f'run `nox -s "verify({cell_id})"` again'
            )
        verified = "passed"

    entry: dict[str, Any] = {
        "cell": cell_id,
        "gpustack_version": manifest.get("gpustack_version"),
        "axes": {
            k: v for k, v in (manifest.get("cell") or {}).items() if k not in {"id", "requirement"}
        },
        "tool": manifest.get("tool"),
        "archive": [_asset(p) for p in archive],
        "manifest_sha256": manifest_sha256,
        "verified": verified,
    }
    if manifest.get("model"):
        entry["model"] = manifest["model"]
    entry["size"] = sum(a["size"] for a in entry["archive"])
    for kind, pattern in ASSET_SOURCES.items():
        path = dist / pattern.format(cell=cell_id)
        entry[kind] = (
            _asset(path, ASSET_NAMES[kind].format(cell=cell_id)) if path.is_file() else None
        )
    return entry


def finished_cells(dist: Path) -> list[str]:
    """Cell ids with a finished bundle folder (one with a manifest) under `dist`."""
    return sorted(p.parent.name for p in dist.glob("*/manifest.json")) if dist.is_dir() else []


def index_of(entries: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The index document over some entries: sorted by cell, with totals."""
    cells = sorted(entries, key=lambda e: str(e["cell"]))
    seen: set[str] = set()
    for entry in cells:
        missing = _ENTRY_KEYS - set(entry)
        if missing:
            raise ReleaseError(f"index entry {entry.get('cell')!r} lacks {sorted(missing)}")
        if entry["cell"] in seen:
            raise ReleaseError(f"two index entries for cell {entry['cell']}")
        seen.add(entry["cell"])
    return {
        "schema_version": SCHEMA_VERSION,
        "gpustack_versions": sorted(
            {str(e["gpustack_version"]) for e in cells if e["gpustack_version"]}
        ),
        "total_size": sum(int(e["size"]) for e in cells),
        "cells": cells,
    }


def release_index(dist: Path) -> dict[str, Any]:
    """The index of every finished bundle under `dist` (refusing any that is not releasable)."""
    cells = finished_cells(dist)
    if not cells:
        raise ReleaseError(f"no finished bundle under {dist}; build some with `invoke bundle`")
    return index_of(bundle_entry(dist, c) for c in cells)


def assets(entry: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every release asset of one entry: the archive files, SBOM, sums, signature, report."""
    extra = [entry.get(kind) for kind in ASSET_NAMES]
    return [*entry["archive"], *(a for a in extra if a)]


def render_json(index: Mapping[str, Any]) -> str:
    return json.dumps(index, indent=2, sort_keys=True) + "\n"


def render_sums(index: Mapping[str, Any]) -> str:
    """`sha256sum -c` input for every asset of the release."""
    rows = sorted((a["name"], a["sha256"]) for e in index["cells"] for a in assets(e))
    return "".join(f"{digest}  {name}\n" for name, digest in rows)


def _size(n: int) -> str:
    if n < 1000:
        return f"{n} B"
    value = float(n)
    for unit in ("KB", "MB", "GB"):
        value /= 1000
        if value < 1000 or unit == "GB":
            break
    return f"{value:.1f} {unit}"


def render_markdown(index: Mapping[str, Any]) -> str:
    """A table for the release notes: one row per bundle."""
    lines = [
        f"{len(index['cells'])} bundles, {_size(int(index['total_size']))} in all. Each bundle's "
        "`SHA256SUMS` is signed (`<cell>.SHA256SUMS.sig`, checked with `gpgv`); `SHA256SUMS` "
        "covers every asset of this release.",
        "",
        "| cell | GPUStack | archive | size | sha256 | verified |",
        "|---|---|---|--:|---|---|",
    ]
    for e in index["cells"]:
        archive = e["archive"]
        if len(archive) == 1:
            name, digest = f"`{archive[0]['name']}`", f"`{archive[0]['sha256']}`"
        else:
            name = f"`{e['cell']}.tar.*` ({len(archive)} volumes)"
            digest = f"see `{SUMS_NAME}`"
        lines.append(
            f"| `{e['cell']}` | {e['gpustack_version'] or '-'} | {name} | {_size(int(e['size']))} "
            f"| {digest} | {e['verified']} |"
        )
    return "\n".join(lines) + "\n"


def write_index(index: Mapping[str, Any], out: Path) -> list[Path]:
    """Write the index, its markdown table and the release's SHA256SUMS into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (
        (INDEX_NAME, render_json(index)),
        (NOTES_NAME, render_markdown(index)),
        (SUMS_NAME, render_sums(index)),
    ):
        write_text(out / name, text)
        written.append(out / name)
    return written


def write_release_index(dist: Path, dest: Path) -> list[Path]:
    """Write the index of `dist`'s bundles to `dest` (JSON) and its table beside it (.md)."""
    index = release_index(dist)
    write_text(dest, render_json(index))
    write_text(dest.with_suffix(".md"), render_markdown(index))
    return [dest, dest.with_suffix(".md")]


def stage_release(dist: Path, out: Path) -> dict[str, Any]:
    """Put every finished bundle's assets under their release names into `out` (replaced whole),
    with one `<cell>.release.json` entry per bundle and the index over them."""
    index = release_index(dist)
    with atomic_dir(out) as stage:
        for entry in index["cells"]:
            cell = entry["cell"]
            for asset in entry["archive"]:
                link_or_copy(dist / asset["name"], stage / asset["name"])
            for kind, pattern in ASSET_SOURCES.items():
                if entry.get(kind):
                    link_or_copy(dist / pattern.format(cell=cell), stage / entry[kind]["name"])
            (stage / f"{cell}{ENTRY_SUFFIX}").write_text(render_json(entry))
        write_index(index, stage)
    return index


def merge_release_entries(entries_dir: Path, out: Path) -> dict[str, Any]:
    """The index over the `<cell>.release.json` entries the bundle jobs staged, written to `out`."""
    paths = sorted(entries_dir.rglob(f"*{ENTRY_SUFFIX}")) if entries_dir.is_dir() else []
    if not paths:
        raise ReleaseError(
            f"no *{ENTRY_SUFFIX} entries under {entries_dir}; stage bundles with "
            "`invoke release-index --dist DIST --out DIR` first"
        )
    entries = []
    for path in paths:
        try:
            entries.append(json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise ReleaseError(f"{path}: not valid JSON ({exc})") from exc
    index = index_of(entries)
    write_index(index, out)
    return index
