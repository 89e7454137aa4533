"""Unpacking archives without trusting them.

Python's `data` extraction filter (PEP 706) refuses absolute paths, `..`, links that point outside
the destination and device files; every archive this project unpacks goes through it, and its
refusal becomes one error that names the archive and the member.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

from .errors import IntegrityError


def _refuse(what: str, member: str, why: str) -> IntegrityError:
    return IntegrityError(
        f"{what}: refused to unpack {member!r}: {why}. The archive is damaged or hostile; "
        "get it again from its source"
    )


def safe_extract_tar(tf: tarfile.TarFile, dest: Path, what: str) -> None:
    # The data filter would quietly strip a leading "/"; an archive that has one is refused.
    for member in tf.getmembers():
        if member.name.startswith("/") or ".." in Path(member.name).parts:
            raise _refuse(what, member.name, "absolute path or '..' component")
    try:
        tf.extractall(dest, filter="data")
    except tarfile.FilterError as exc:
        raise _refuse(what, exc.tarinfo.name, str(exc)) from exc
