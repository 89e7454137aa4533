"""The cache as a whole: which builds are using it, and what killed builds left in it.

Every build holds `in_use(cache)` for its whole run: a shared flock on `<cache>/.in-use.lock`,
which the kernel drops however the build ends. Before taking it, a build tries the same lock
exclusively; only when it gets it, so no other build is live on this cache, does it remove the
temporary entries that killed builds left behind (a live build's are never touched):

- `.<name>.XXXXXXXX.part` files and folders: what `fsutil.atomic_path`, `atomic_dir` and
  `scratch_file` write before publishing (the blob store's `.new.XXXXXXXX.part` too), and
  `.<name>.old`, a folder `atomic_dir` was replacing;
- `tools-XXXXXXXX` in `tools/archives/`, the scratch folder of the tools stage before it moved
  into the stage folder of its archive.

(A killed debootstrap's `base/rootfs-XXXXXXXX` is left alone: it may still have file systems
mounted into it.)

Only the cache's own folders are looked at, to the depth where the cache puts files
(`blobs/sha256/`, `tools/venv/`, `tools/archives/`, `built/<key>/`, `base/`), never inside a
finished entry and never in uv's cache, `uv/`, which uv manages itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from gpustack_offline.core.files import held, try_exclusive

log = logging.getLogger("gpustack_offline")

LOCK_NAME = ".in-use.lock"
# mkstemp/mkdtemp put eight of these between prefix and suffix (fsutil.temp_names)
_RANDOM = r"[a-z0-9_]{8}"
# Anywhere in the swept folders: the union of every fsutil.temp_names(final), and atomic_dir's
# `.<name>.old`.
_TEMPORARY = re.compile(rf"\..+\.{_RANDOM}\.part|\..+\.old")
# Scratch folders (tempfile.TemporaryDirectory) with a known prefix, in their one folder.
_SCRATCH = {Path("tools") / "archives": re.compile(rf"tools-{_RANDOM}")}
# Folders of the cache, relative to it, whose entries are never the cache's own files.
_NOT_OURS = {Path("uv")}
# The cache's files are at most this deep: blobs/sha256/<sha256>, built/<key>/<wheel>.
_DEPTH = 2


@contextlib.contextmanager
def in_use(cache: Path) -> Iterator[None]:
    """Hold the cache as one of its live builds for the body; sweep first if none other is."""
    lock_file = cache / LOCK_NAME
    fd = try_exclusive(lock_file)
    if fd is not None:
        try:
            removed = sweep(cache)
        finally:
            os.close(fd)
        if removed:
            log.info("removed %d leftovers of interrupted builds from %s", len(removed), cache)
    with held(lock_file, f"the cache {cache}", shared=True):
        yield


def leftovers(cache: Path) -> list[Path]:
    """The temporary entries under `cache` (see the module's doc), without removing them."""
    found: list[Path] = []

    def scan(folder: Path, depth: int) -> None:
        relative = folder.relative_to(cache)
        if relative in _NOT_OURS:
            return
        scratch = _SCRATCH.get(relative)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            if _TEMPORARY.fullmatch(entry.name) or (scratch and scratch.fullmatch(entry.name)):
                found.append(Path(entry.path))
            elif depth < _DEPTH and entry.is_dir(follow_symlinks=False):
                scan(Path(entry.path), depth + 1)

    scan(cache, 0)
    return found


def sweep(cache: Path) -> list[Path]:
    """Remove the temporary entries under `cache`; the removed. Only for a caller that holds
    the cache exclusively (`in_use` does): a live build's entries look the same."""
    removed = leftovers(cache)
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed
