"""The bundle tar, streamed from the bundle folder into any writable: a file (`dist/<cell>.tar`)
or the volumes (`bundle.volumes`), so the folder's bytes are written once more, and only once.

Its size is known before a byte is written (headers are computed up front and tar pads every
member to 512 bytes), so volumes can be counted, and free space checked, before the tar exists.
Members are in sorted order, owned by root, with no hard-link members: the same folder gives the
same bytes whichever writable they go to.
"""

from __future__ import annotations

import stat
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, NamedTuple

from gpustack_offline.core.errors import BundleError

_ERRORS = "surrogateescape"  # tarfile's own default, named so the sizes below use it too


class Member(NamedTuple):
    path: Path
    info: tarfile.TarInfo


def members(directory: Path) -> list[Member]:
    """Every entry under `directory`, named `<directory name>/<relative path>`, sorted."""
    out = []
    for path in sorted(directory.rglob("*")):
        st = path.lstat()
        info = tarfile.TarInfo(f"{directory.name}/{path.relative_to(directory)}")
        info.mode = stat.S_IMODE(st.st_mode)
        info.mtime = int(st.st_mtime)
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        if stat.S_ISDIR(st.st_mode):
            info.type = tarfile.DIRTYPE
        elif stat.S_ISREG(st.st_mode):
            info.size = st.st_size
        else:
            raise BundleError(f"{path} is neither a file nor a folder; a bundle holds only those")
        out.append(Member(path, info))
    return out


def size(entries: Sequence[Member]) -> int:
    """The bytes `write(entries, …)` writes: each header, each body padded to a block, two
    zero blocks, the whole padded to a record (what `tarfile` does)."""
    total = 0
    for entry in entries:
        total += len(entry.info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, _ERRORS))
        total += -(-entry.info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    total += 2 * tarfile.BLOCKSIZE
    return -(-total // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def write(entries: Sequence[Member], out: BinaryIO) -> None:
    """Stream the tar of `entries` into `out` (which needs `write` and `tell`)."""
    with tarfile.open(
        fileobj=out, mode="w", format=tarfile.PAX_FORMAT, encoding=tarfile.ENCODING, errors=_ERRORS
    ) as tf:
        for entry in entries:
            if not entry.info.isfile():
                tf.addfile(entry.info)
                continue
            with entry.path.open("rb") as fh:
                tf.addfile(entry.info, fh)
