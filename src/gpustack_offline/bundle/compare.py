"""What differs between two bundles, from their manifests alone.

Two builds of the same cell from the same commit and locks should hold the same files with the
same digests; they may differ only in when and where they were built. `compare` lists every
difference, each marked expected (the build time, the build host, where a tools asset was
fetched from this time, and the SBOM, which is derived from the manifest) or not. A bundle is a
folder or its `.tar`; from a tar only `manifest.json` is read, not the wheels or images.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpustack_offline.bundle.errors import CompareError
from gpustack_offline.bundle.sbom import SBOM_NAME

# Flattened manifest keys (see `_flatten`) that are expected to differ between two builds.
EXPECTED_KEYS = tuple(
    re.compile(pattern)
    for pattern in (
        r"built_at",
        r"provenance\.host\..+",
        r"tools\.assets\[.+\]\.url",  # "" when the asset came from the cache, else its source
    )
)
# Files derived from the rest of the manifest: their own differences are expected.
EXPECTED_FILES = (SBOM_NAME,)
# List items are keyed by the first of these field groups they have, so an entry is matched by
# what it is, not by its place in the list.
_IDENTITY = (("path",), ("reference", "platform"), ("reference",), ("url",), ("name",))


@dataclass(frozen=True)
class Difference:
    """One thing that differs: `area` is "files" or the manifest section ("cell", "lock", "tool",
    "tools", "images", "provenance", ...); `what` the file path or flattened key."""

    area: str
    what: str
    a: str | None  # None: absent from bundle A
    b: str | None  # None: absent from bundle B
    expected: bool = False

    def __str__(self) -> str:
        if self.a is None:
            change = f"added in B: {self.b}"
        elif self.b is None:
            change = f"removed in B (A: {self.a})"
        else:
            change = f"{self.a} -> {self.b}"
        return f"{self.area}: {self.what}: {change}"


def read_manifest(bundle: Path) -> dict[str, Any]:
    """`manifest.json` of a bundle folder, or of a bundle tar (read from the tar alone)."""
    if bundle.is_dir():
        path = bundle / "manifest.json"
        if not path.is_file():
            raise CompareError(f"{bundle} has no manifest.json: it is not a bundle folder")
        return _parse(path.read_bytes(), str(path))
    if not bundle.is_file():
        raise CompareError(f"{bundle} does not exist; give a bundle folder or its .tar")
    try:
        with tarfile.open(bundle) as tf:
            for member in tf:  # headers only: the members' data is skipped, not read
                parts = member.name.strip("/").split("/")
                if parts[-1] == "manifest.json" and len(parts) <= 2 and member.isfile():
                    fh = tf.extractfile(member)
                    if fh is not None:
                        return _parse(fh.read(), f"{bundle}:{member.name}")
    except tarfile.TarError as exc:
        raise CompareError(f"{bundle} is not a tar ({exc}); give a bundle folder or .tar") from exc
    raise CompareError(f"{bundle} holds no <cell>/manifest.json: it is not a bundle tar")


def _parse(data: bytes, where: str) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
    except json.JSONDecodeError as exc:
        raise CompareError(f"{where} is not valid JSON ({exc}); rebuild the bundle") from exc
    if not isinstance(manifest, dict) or "files" not in manifest:
        raise CompareError(f"{where} is not a bundle manifest (no 'files')")
    return manifest


def compare(a: Path, b: Path) -> list[Difference]:
    """Every difference between bundles `a` and `b`: files first, then manifest fields."""
    return compare_manifests(read_manifest(a), read_manifest(b))


def compare_manifests(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[Difference]:
    out = _files(a.get("files", []), b.get("files", []))
    flat_a = _flatten({k: v for k, v in a.items() if k != "files"})
    flat_b = _flatten({k: v for k, v in b.items() if k != "files"})
    for key in sorted(flat_a.keys() | flat_b.keys()):
        va, vb = flat_a.get(key), flat_b.get(key)
        if va != vb:
            area = key.split(".", 1)[0].split("[", 1)[0]
            expected = any(pattern.fullmatch(key) for pattern in EXPECTED_KEYS)
            out.append(Difference(area, key, va, vb, expected))
    return out


def _files(a: list[Mapping[str, Any]], b: list[Mapping[str, Any]]) -> list[Difference]:
    files_a = {str(f["path"]): f for f in a}
    files_b = {str(f["path"]): f for f in b}
    out = []
    for path in sorted(files_a.keys() | files_b.keys()):
        fa, fb = files_a.get(path), files_b.get(path)
        if fa and fb and (fa["sha256"], fa["size"]) == (fb["sha256"], fb["size"]):
            continue
        out.append(
            Difference(
                "files",
                path,
                _describe(fa) if fa else None,
                _describe(fb) if fb else None,
                path in EXPECTED_FILES,
            )
        )
    return out


def _describe(entry: Mapping[str, Any]) -> str:
    return f"sha256 {str(entry['sha256'])[:12]}… ({entry['size']} bytes)"


def _flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": [{"path": "x", "c": 1}]}} -> {"a.b[x].c": "1"}; scalars as JSON text."""
    if isinstance(value, Mapping):
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list) and value and all(isinstance(i, Mapping) for i in value):
        out = {}
        for n, item in enumerate(value):
            group = next((g for g in _IDENTITY if all(f in item for f in g)), None)
            ident = " ".join(str(item[f]) for f in group) if group else str(n)
            out.update(_flatten(item, f"{prefix}[{ident}]"))
        return out
    return {prefix: json.dumps(value, sort_keys=True)}


def report(differences: list[Difference], a: Path, b: Path) -> str:
    """A readable account: unexpected differences, then the expected ones, then the verdict."""
    real = [d for d in differences if not d.expected]
    expected = [d for d in differences if d.expected]
    lines = [f"A: {a}", f"B: {b}", ""]
    if real:
        lines.append(f"{len(real)} difference(s):")
        lines += [f"  {d}" for d in real]
    else:
        lines.append("No differences beyond the expected ones.")
    if expected:
        lines += ["", f"{len(expected)} expected difference(s) (time, build host, derived):"]
        lines += [f"  {d}" for d in expected]
    return "\n".join(lines) + "\n"


def exit_status(differences: list[Difference]) -> int:
    """0 when only expected differences remain, 1 otherwise."""
    return 1 if any(not d.expected for d in differences) else 0


def main(a: Path, b: Path) -> int:
    """What `invoke compare A B` runs: print the report, return the exit status."""
    differences = compare(a, b)
    print(report(differences, a, b), end="")
    return exit_status(differences)
