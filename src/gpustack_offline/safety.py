"""Unpacking archives without trusting them.

Python's `data` extraction filter (PEP 706) refuses absolute paths, `..`, links that point outside
the destination and device files; every archive this project unpacks goes through it, and its
refusal becomes one error that names the archive and the member.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

from .errors import IntegrityError


def safe_extract_tar(tf: tarfile.TarFile, dest: Path, what: str) -> None:
    try:
        tf.extractall(dest, filter="data")
    except tarfile.FilterError as exc:
        raise IntegrityError(
            f"{what}: refused to unpack {exc.tarinfo.name!r}: {exc}. The archive is damaged or "
            "hostile; get it again from its source"
        ) from exc
