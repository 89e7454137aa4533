"""Model locks: a model's revision pinned to a commit, and every file it carries to its size and
sha256, one reviewed file per model (`bundles/locks/models/<name>.toml`).

The lock is what a build downloads and checks against; `invoke lock --model NAME` writes it
from the source's answer (`stages/hub.py` for Hugging Face, `stages/modelscope.py` for
ModelScope, chosen in `stages/model_sources.py`). It records a digest of the model's entry in
`models.toml` (source, repository, revision, patterns), so a changed entry shows up as a stale
lock, refused by a frozen build, instead of a silently different bundle. The file is written
atomically, its files sorted by path, so a refresh reads as a diff of what moved.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from gpustack_offline.core.errors import LockError
from gpustack_offline.core.files import write_text
from gpustack_offline.core.models import Model
from gpustack_offline.core.tomlfile import read_toml
from gpustack_offline.stages.errors import HubError

SCHEMA = 1
_HEX64 = re.compile(r"[0-9a-f]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")


@dataclass(frozen=True)
class ModelFile:
    path: str  # inside the repository, with "/"
    size: int
    sha256: str
    lfs: bool = False  # the source keeps it in Git LFS (the hub: the sha256 came from its API)
    blob_id: str = ""  # the git blob id the hub names, for a file outside LFS


@dataclass(frozen=True)
class ModelLock:
    path: Path  # the lock file
    name: str
    source: str
    repository: str
    revision: str
    commit: str
    inputs_digest: str
    files: tuple[ModelFile, ...]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def digest(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class Resolved:
    """A source's answer for a model: its revision as a commit, and the files it carries."""

    commit: str
    files: tuple[ModelFile, ...]


# What a lock says of where its sums came from, by source (a comment in the lock file).
HF_NOTE = (
    "size and sha256: from the hub's API for Git LFS files, hashed here for the others (each",
    "checked against the git blob id the hub names). Review a change like code.",
)


def lock_path(locks_dir: Path, name: str) -> Path:
    return locks_dir / f"{name}.toml"


def safe_path(path: str, where: str) -> str:
    """A repository file path that can be a path in a bundle and on a site: relative, no `..`,
    no control characters or backslashes (a `SHA256SUMS` line would escape them)."""
    parts = PurePosixPath(path).parts
    if (
        not path
        or path.startswith("/")
        or _CONTROL.search(path)
        or any(p in ("..", ".") for p in path.split("/"))
        or not parts
    ):
        raise LockError(
            f"{where}: the file path {path!r} cannot be placed safely (absolute, '..', or "
            "control characters); it is refused"
        )
    return path


def read_lock(path: Path) -> ModelLock:
    data = read_toml(
        path,
        LockError,
        "refresh it with `invoke lock --model NAME`",
        missing=f"model lock {path} does not exist",
    )
    where = str(path)
    try:
        if data.get("schema") != SCHEMA:
            raise LockError(f"{where}: schema {data.get('schema')!r}, not {SCHEMA}")
        files = tuple(_file(entry, where) for entry in data.get("files", []))
        lock = ModelLock(
            path=path,
            name=str(data["name"]),
            source=str(data["source"]),
            repository=str(data["repository"]),
            revision=str(data["revision"]),
            commit=str(data["commit"]),
            inputs_digest=str(data["inputs-digest"]),
            files=files,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise LockError(
            f"{where}: malformed model lock, missing or wrong {exc}; refresh it with "
            "`invoke lock --model NAME`"
        ) from exc
    if not _COMMIT.fullmatch(lock.commit):
        raise LockError(f"{where}: commit {lock.commit!r} is not a 40-hex git commit")
    if not files:
        raise LockError(f"{where}: no [[files]]; refresh it with `invoke lock --model {lock.name}`")
    return lock


def _file(entry: Any, where: str) -> ModelFile:
    sha256 = str(entry["sha256"])
    if not _HEX64.fullmatch(sha256):
        raise LockError(f"{where}: file {entry.get('path')!r} has no sha256 of 64 hex digits")
    return ModelFile(
        path=safe_path(str(entry["path"]), where),
        size=int(entry["size"]),
        sha256=sha256,
        lfs=bool(entry.get("lfs", False)),
        blob_id=str(entry.get("git-blob", "")),
    )


def write_lock(
    locks_dir: Path,
    model: Model,
    commit: str,
    files: Sequence[ModelFile],
    note: Sequence[str] = HF_NOTE,
) -> Path:
    """Write the model's lock atomically, files sorted by path; return its path. `note` says
    where the sums came from (the source's own words, a comment)."""
    final = lock_path(locks_dir, model.name)
    lines = [
        f"# Lock for model {model.name}: written by `invoke lock --model {model.name}`, read by",
        f"# `invoke bundle --model {model.name}`. The revision pinned to a commit and every "
        "file to its",
        *(f"# {line}" for line in note),
        f"schema = {SCHEMA}",
        f"name = {json.dumps(model.name)}",
        f"source = {json.dumps(model.source)}",
        f"repository = {json.dumps(model.repository)}",
        f"revision = {json.dumps(model.revision)}",
        f"commit = {json.dumps(commit)}",
        f"inputs-digest = {json.dumps(model.inputs_digest())}",
    ]
    for f in sorted(files, key=lambda f: f.path):
        lines += [
            "",
            "[[files]]",
            f"path = {json.dumps(f.path)}",
            f"size = {f.size}",
            f"sha256 = {json.dumps(f.sha256)}",
            f"lfs = {'true' if f.lfs else 'false'}",
        ]
        if f.blob_id:
            lines.append(f"git-blob = {json.dumps(f.blob_id)}")
    write_text(final, "\n".join(lines) + "\n")
    return final


def changes(old: ModelLock | None, new: ModelLock) -> list[str]:
    """What moved between two locks of a model: the commit, then each file whose sha256 or
    presence changed (`path: old -> new`, `(none)` for one added or dropped)."""
    moved = []
    if old is None or old.commit != new.commit:
        moved.append(f"commit: {old.commit if old else '(none)'} -> {new.commit}")
    before = {f.path: f.sha256 for f in old.files} if old else {}
    after = {f.path: f.sha256 for f in new.files}
    for path in sorted(before.keys() | after.keys()):
        if before.get(path) != after.get(path):
            was, now = before.get(path), after.get(path)
            moved.append(
                f"{path}: {f'sha256:{was}' if was else '(none)'} -> "
                f"{f'sha256:{now}' if now else '(none)'}"
            )
    return moved


def stale(lock: ModelLock, model: Model) -> bool:
    return lock.inputs_digest != model.inputs_digest() or lock.name != model.name


def check_patterns(model: Model, names: Sequence[str], where: str) -> None:
    """Refuse a pattern of the model that matches none of the repository's files `names`,
    naming them (the fix is in models.toml)."""
    for pattern in model.files:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise HubError(
                f"model {model.name}: no file of {where} matches {pattern!r}; it has "
                f"{listing(names)}. Fix: correct files in models.toml"
            )


def listing(names: Iterable[str]) -> str:
    shown = sorted(names)
    more = f" and {len(shown) - 20} more" if len(shown) > 20 else ""
    return f"{', '.join(shown[:20])}{more}" if shown else "no files"
