"""Disk a build takes beyond its cache: what `st_blocks` says is allocated to every file and
folder under the outputs, each inode once, leaving out the files that are hard links to files in
the cache (they cost no byte more). A build deletes nothing after its tar is written, so what is
there when it ends is its peak."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def _inodes(root: Path) -> Iterable[tuple[tuple[int, int], int]]:
    """(device, inode) and allocated bytes of `root` and of everything under it. A file gone
    between the listing and its lstat (another build's `.part` in a shared cache, renamed into
    place meanwhile) is left out: it was never this build's."""
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for path in paths:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        yield (st.st_dev, st.st_ino), st.st_blocks * 512


def extra_disk(outputs: Iterable[Path], cache: Path) -> int:
    """Bytes allocated under `outputs` (files and folders) that the cache does not share."""
    cached = {inode for inode, _ in _inodes(cache)} if cache.exists() else set()
    seen: dict[tuple[int, int], int] = {}
    for output in outputs:
        if output.exists():
            seen.update((inode, size) for inode, size in _inodes(output) if inode not in cached)
    return sum(seen.values())
