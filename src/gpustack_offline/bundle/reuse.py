"""Rebuild only what changed: a finished bundle whose inputs are unchanged is checked, not
rewritten.

A build's inputs are the data files its recipe reads (matrix, lock, overrides, tools lock, image
pins, runner data), the signing key, and this tool itself (its code and the scripts a bundle
carries). Each is named by its sha256 in `dist/.<cell>.build.json`, written after the bundle is
complete. The next build of the cell compares; when nothing moved it checks the finished folder
against its own SHA256SUMS (every byte, nothing unlisted) and the tar against the size and time
recorded when it was written, and is done: nothing downloaded, nothing written. When something
moved, the record says what, for the build table.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from gpustack_offline.bundle.release import read_sums
from gpustack_offline.core.files import sha256_file, write_text

RECORD_SCHEMA = 1
_PACKAGE = Path(__file__).resolve().parents[1]  # src/gpustack_offline
# Beside the sums, not in them: the detached signature over SHA256SUMS.
_UNLISTED = {"SHA256SUMS", "SHA256SUMS.sig"}


def record_path(dist: Path, cell_id: str) -> Path:
    return dist / f".{cell_id}.build.json"


def tool_digest(root: Path) -> str:
    """This tool as it builds: its code and the scripts and templates every bundle carries."""
    digest = hashlib.sha256()
    files = sorted(_PACKAGE.rglob("*.py")) + sorted(p for p in (root / "scripts").iterdir())
    for path in files:
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def inputs_key(root: Path, inputs: Sequence[Path], signing_key: Path | None) -> dict[str, str]:
    """What a build of the cell is made from, each by its sha256."""
    key = {"tool": tool_digest(root)}
    for path in inputs:
        key[_name(path, root)] = sha256_file(path)
    if signing_key is not None:
        key["signing key"] = sha256_file(signing_key)
    return key


def _name(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def changed(record: Path, key: Mapping[str, str]) -> list[str]:
    """The inputs that differ from the last finished build's (all of them if there was none)."""
    previous = _read(record).get("inputs", {})
    if not previous:
        return ["no earlier build"]
    names = sorted(set(previous) | set(key))
    return [n for n in names if previous.get(n) != key.get(n)]


def unchanged(record: Path, key: Mapping[str, str], folder: Path, tar: Path) -> int | None:
    """The number of files checked when the finished bundle matches `key` and is intact, else
    None (rebuild)."""
    data = _read(record)
    if data.get("inputs") != dict(key) or not folder.is_dir():
        return None
    if data.get("tar") != _stat(tar):
        return None
    return check_folder(folder)


def check_folder(folder: Path) -> int | None:
    """Every file listed in SHA256SUMS has its sum and nothing else is there: the count, or None."""
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        return None
    listed = read_sums(sums)
    if len(listed) != len(sums.read_text().splitlines()):
        return None  # a line of another form: not a file this tool wrote
    present = {
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink()
    }
    if present - _UNLISTED != set(listed):
        return None
    for name, digest in listed.items():
        path = folder / name
        if path.is_symlink() or sha256_file(path) != digest:
            return None
    return len(listed)


def write_record(record: Path, key: Mapping[str, str], tar: Path) -> None:
    data = {"schema": RECORD_SCHEMA, "inputs": dict(key), "tar": _stat(tar)}
    write_text(record, json.dumps(data, indent=2, sort_keys=True) + "\n")


def forget(record: Path) -> None:
    """Before a rebuild starts: a record must never vouch for a half-rebuilt bundle."""
    record.unlink(missing_ok=True)


def _stat(path: Path) -> dict[str, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read(record: Path) -> dict:
    try:
        data = json.loads(record.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("schema") == RECORD_SCHEMA else {}
