#!/usr/bin/env python3
"""check-tools-archive.py: refuse a GPUStack tools archive that is not safe to unpack.

`gpustack download-tools --load-archive FILE` unpacks FILE into the installed package's
`gpustack/third_party/bin/` with `shutil.unpack_archive` and no extraction filter, as whoever runs
the installer (root, usually). A hostile or corrupt archive could then write anywhere, replace a
system file through a symlink or a hard link, or create device files. The installer runs this
check first and loads the archive only when it passes.

An entry is accepted only when it is a regular file, a directory, a symlink or a hard link whose
name and whose target stay inside the tools folder, judged as the filesystem would resolve them
(following the archive's own symlinks), on Linux and on Windows.

Standard library only; runs on Python 3.8 to 3.13 (the target host's interpreter).

Usage: python3 check-tools-archive.py ARCHIVE
Exit status: 0 every entry is safe, 2 usage error, 3 refused (one line per offending entry on
stderr, or one line naming the archive when it is not a readable gzip tar).
"""

from __future__ import annotations

import argparse
import gzip
import re
import stat
import sys
import tarfile
import zlib

PROG = "check-tools-archive.py"
EXIT_REFUSED = 3
# Linux gives up after 40 symlinks in one lookup (ELOOP); so do we.
MAX_SYMLINKS = 40
WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")
READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


class Refused(Exception):
    """Why one entry is not safe to unpack."""


def components(path: str, what: str) -> list[str]:
    """The parts of a member name or link target, refusing forms that leave the root on any OS.

    A backslash is a separator to tarfile on Windows and a drive prefix restarts the path there,
    so both are refused even though they are harmless on Linux: the same bundle may reach either.
    """
    if not path:
        raise Refused(f"empty {what}")
    if "\\" in path:
        raise Refused(f"{what} contains a backslash (a path separator on Windows)")
    if path.startswith("/"):
        raise Refused(f"absolute {what}")
    if WINDOWS_DRIVE.match(path):
        raise Refused(f"{what} starts with a Windows drive")
    return [part for part in path.split("/") if part not in ("", ".")]


def fold(parts: list[str]) -> str:
    """The key two names share when a file system ignores letter case (Windows, macOS)."""
    return "/".join(parts).casefold()


class Archive:
    """The members of one archive and the checks that need all of them at once.

    Names are compared with letter case folded: on a case-insensitive file system `A/x` is
    written through a symlink `a`, so the checks must see them as one name.
    """

    def __init__(self, members: list[tarfile.TarInfo]) -> None:
        self.members = members
        # Every symlink of the archive, wherever it appears: extraction order must not matter.
        self.symlinks: dict[str, str] = {}
        for m in members:
            if m.issym():
                try:
                    key = fold(components(m.name, "name"))
                except Refused:
                    continue  # reported when the member itself is checked
                self.symlinks.setdefault(key, m.linkname)
        self.seen: dict[str, tuple[str, bool]] = {}  # folded name -> (name, is a directory)
        self.earlier_files: set[str] = set()  # regular files and hard links accepted so far

    def check_all(self) -> list[tuple[str, str]]:
        problems = []
        for m in self.members:
            try:
                self.check(m)
            except Refused as why:
                problems.append((m.name, str(why)))
        return problems

    def check(self, m: tarfile.TarInfo) -> None:
        parts = components(m.name, "name")
        if ".." in parts:
            raise Refused("'..' in the name leads outside the tools folder")
        key = fold(parts)
        for i in range(1, len(parts)):
            if fold(parts[:i]) in self.symlinks:
                raise Refused(f"unpacks through {'/'.join(parts[:i])}, a symlink in the archive")
        if not key and not m.isdir():
            raise Refused("would replace the tools folder itself")
        name = "/".join(parts)
        if key in self.seen:
            other, was_dir = self.seen[key]
            if other != name:
                raise Refused(f"differs from {other} only in letter case (one name on Windows)")
            if not (was_dir and m.isdir()):
                raise Refused("appears more than once in the archive")
        self.seen[key] = (name, m.isdir())

        if m.isdir():
            return
        # A hard link's mode is applied to the file it shares, so both kinds are checked.
        if (m.isreg() or m.islnk()) and m.mode & (stat.S_ISUID | stat.S_ISGID):
            raise Refused("set-user-ID or set-group-ID bit")
        if m.issym():
            self.check_symlink(parts[:-1], m.linkname)
            return
        if m.islnk():
            target = components(m.linkname, "hard link target")
            if ".." in target:
                raise Refused(f"hard link to {m.linkname}, outside the tools folder")
            if fold(target) not in self.earlier_files:
                raise Refused(f"hard link to {m.linkname}, not a file earlier in the archive")
            self.earlier_files.add(key)
            return
        if m.isreg():
            self.earlier_files.add(key)
            return
        if m.ischr():
            raise Refused("character device")
        if m.isblk():
            raise Refused("block device")
        if m.isfifo():
            raise Refused("FIFO (named pipe)")
        raise Refused(f"unsupported entry type {m.type!r}")

    def check_symlink(self, directory: list[str], target: str) -> None:
        via: list[str] = []
        try:
            self.walk(directory, target, via)
        except Refused as why:
            through = f" (through {', '.join(dict.fromkeys(via))})" if via else ""
            raise Refused(f"symlink to {target}: {why}{through}") from None

    def walk(self, directory: list[str], target: str, via: list[str]) -> list[str]:
        """Where symlink text `target` in `directory` leads, following the archive's symlinks.

        Resolved part by part as the kernel does, so `a -> .` plus `b -> a/..` is caught even
        though `a/..` looks harmless as text. `via` collects the symlinks passed through.
        """
        here = list(directory)
        for part in components(target, "symlink target"):
            if part == "..":
                if not here:
                    raise Refused("leads outside the tools folder")
                here.pop()
                continue
            here.append(part)
            key = fold(here)
            if key in self.symlinks:
                if len(via) >= MAX_SYMLINKS:
                    raise Refused("too many levels of symlinks")
                via.append("/".join(here))
                here = self.walk(here[:-1], self.symlinks[key], via)
        return here


def read_members(path: str) -> list[tarfile.TarInfo]:
    """All member headers, then the rest of the gzip stream, so its checksum is verified too."""
    with gzip.open(path, "rb") as gz:
        with tarfile.open(fileobj=gz, mode="r:") as tf:
            members = tf.getmembers()
        while gz.read(1 << 20):
            pass
    return members


def shown(name: str) -> str:
    """One printable line per entry, however odd its name."""
    return name if name.isprintable() else ascii(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Exit 0 when every entry of a GPUStack tools archive (tar.gz) is safe to "
        "unpack into the tools folder; else name each offending entry and exit 3.",
    )
    parser.add_argument("archive", help="the tar.gz written by 'gpustack download-tools'")
    args = parser.parse_args(argv)

    try:
        members = read_members(args.archive)
    except READ_ERRORS as e:
        print(f"{PROG}: {shown(args.archive)}: not a readable gzip tar ({e})", file=sys.stderr)
        return EXIT_REFUSED

    problems = Archive(members).check_all()
    for name, why in problems:
        print(f"{PROG}: {shown(name)}: {shown(why)}", file=sys.stderr)
    if problems:
        return EXIT_REFUSED
    print(f"{PROG}: {shown(args.archive)}: {len(members)} entries, all safe to unpack")
    return 0


if __name__ == "__main__":
    sys.exit(main())
