"""Unpacking archives without trusting them.

Every archive this project unpacks (sdists, download-tools' archive) is checked as a whole before
anything is written: a member with an absolute name or a `..` component, one written through a
symlink of the archive, a symlink or hard link leading outside the destination, a device file,
a FIFO or a name that appears twice is refused, with one error naming the archive and the member.

The tar check does not lean on Python's `data` extraction filter (PEP 706) alone: the filter
quietly strips a leading "/" instead of refusing, and before Python 3.11.13 / 3.12.11 it could be
walked around with chains of symlinks (CVE-2025-4517, CVE-2025-4330). The filter still runs at
extraction time as a second line. Names are judged as Linux resolves them: this runs on the
build host. `scripts/check-tools-archive.py` does the same for the target, Windows included.
"""

from __future__ import annotations

import re
import stat
import tarfile
import zipfile
from pathlib import Path

from gpustack_offline.core.errors import IntegrityError

# Linux gives up after 40 symlinks in one lookup (ELOOP); so does the check.
MAX_SYMLINKS = 40
WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")
ZIP_KINDS = {
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFIFO: "FIFO (named pipe)",
    stat.S_IFSOCK: "socket",
}


class _Refused(Exception):
    """Why one member is not safe to unpack."""


def _refuse(what: str, member: str, why: str) -> IntegrityError:
    return IntegrityError(
        f"{what}: refused to unpack {member!r}: {why}. The archive is damaged or hostile; "
        "get it again from its source"
    )


def _parts(path: str, what: str) -> list[str]:
    """The components of a member name or link target; absolute paths and `..` are refused."""
    if not path:
        raise _Refused(f"empty {what}")
    if path.startswith("/"):
        raise _Refused(f"absolute {what}")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _Refused(f"'..' in the {what} leads outside the destination")
    return parts


def _key(name: str) -> str:
    """A member name as the symlink table knows it: `./a//b/` is `a/b`."""
    return "/".join(p for p in name.split("/") if p not in ("", "."))


class _TarCheck:
    """The checks that need every member at once: extraction order must not matter."""

    def __init__(self, members: list[tarfile.TarInfo]) -> None:
        self.members = members
        self.symlinks: dict[str, str] = {}
        for m in members:
            # A symlink with a bad name is refused when the member itself is checked.
            if m.issym() and not m.name.startswith("/"):
                self.symlinks.setdefault(_key(m.name), m.linkname)
        self.seen: dict[str, bool] = {}  # name -> is a directory
        self.files: set[str] = set()  # regular files (and hard links to them) so far

    def check(self, m: tarfile.TarInfo) -> None:
        parts = _parts(m.name, "name")
        name = "/".join(parts)
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in self.symlinks:
                raise _Refused(f"written through {'/'.join(parts[:i])}, a symlink in the archive")
        if not parts and not m.isdir():
            raise _Refused("would replace the destination folder itself")
        if name in self.seen and not (self.seen[name] and m.isdir()):
            raise _Refused("appears more than once in the archive")
        self.seen[name] = m.isdir()
        if m.isdir():
            return
        if m.isreg():
            self.files.add(name)
        elif m.issym():
            self._symlink(parts[:-1], m.linkname)
        elif m.islnk():
            target = _parts(m.linkname, "hard link target")
            if "/".join(target) not in self.files:
                raise _Refused(f"hard link to {m.linkname}, not a regular file earlier in it")
            self.files.add(name)
        elif m.ischr():
            raise _Refused("character device")
        elif m.isblk():
            raise _Refused("block device")
        elif m.isfifo():
            raise _Refused("FIFO (named pipe)")
        else:
            raise _Refused(f"unsupported entry type {m.type!r}")

    def _symlink(self, directory: list[str], target: str) -> None:
        try:
            self._walk(directory, target, [])
        except _Refused as why:
            raise _Refused(f"symlink to {target}: {why}") from None

    def _walk(self, directory: list[str], target: str, via: list[str]) -> list[str]:
        """Where `target` in `directory` leads, resolved part by part through the archive's
        own symlinks as the kernel would, so `a -> .` plus `b -> a/../..` is caught."""
        if target.startswith("/"):
            raise _Refused("absolute target")
        here = list(directory)
        for part in target.split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                if not here:
                    raise _Refused("leads outside the destination")
                here.pop()
                continue
            here.append(part)
            if (key := "/".join(here)) in self.symlinks:
                if len(via) >= MAX_SYMLINKS:
                    raise _Refused("too many levels of symlinks")
                via.append(key)
                here = self._walk(here[:-1], self.symlinks[key], via)
        return here


def check_tar(tf: tarfile.TarFile, what: str) -> None:
    """Refuse the archive, naming its first unsafe member, before anything is unpacked."""
    check = _TarCheck(tf.getmembers())
    for member in check.members:
        try:
            check.check(member)
        except _Refused as why:
            raise _refuse(what, member.name, str(why)) from None


def safe_extract_tar(tf: tarfile.TarFile, dest: Path, what: str) -> None:
    """Unpack `tf` into `dest` after `check_tar`; the data filter runs as a second line."""
    check_tar(tf, what)
    try:
        tf.extractall(dest, filter="data")
    except tarfile.FilterError as exc:
        raise _refuse(what, exc.tarinfo.name, str(exc)) from exc


def _zip_member(info: zipfile.ZipInfo, seen: set[str]) -> None:
    name = info.filename
    # zipfile on Windows reads a backslash as a separator and a drive prefix as a new root; it
    # would also quietly rewrite what it refuses below instead of saying so.
    if "\\" in name:
        raise _Refused("name contains a backslash (a path separator on Windows)")
    if WINDOWS_DRIVE.match(name):
        raise _Refused("name starts with a Windows drive")
    parts = _parts(name, "name")
    if not parts:
        raise _Refused("would replace the destination folder itself")
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind in ZIP_KINDS:
        raise _Refused(ZIP_KINDS[kind])
    key = "/".join(parts)
    if key in seen:
        raise _Refused("appears more than once in the archive")
    seen.add(key)


def check_zip(zf: zipfile.ZipFile, what: str) -> None:
    """Refuse the archive, naming its first unsafe member, before anything is unpacked.

    zipfile writes every member as a plain file or folder, whatever its Unix mode says; a member
    whose mode says symlink or device is refused all the same: no honest sdist has one."""
    seen: set[str] = set()
    for info in zf.infolist():
        try:
            _zip_member(info, seen)
        except _Refused as why:
            raise _refuse(what, info.filename, str(why)) from None


def safe_extract_zip(zf: zipfile.ZipFile, dest: Path, what: str) -> None:
    """Unpack `zf` into `dest` after `check_zip`."""
    check_zip(zf, what)
    zf.extractall(dest)
