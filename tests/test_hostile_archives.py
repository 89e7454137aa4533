"""Hostile archives: every place the project unpacks an archive refuses it whole, naming the member.

One table per archive format, run through every entry point that unpacks that format:

- tar: `SdistBuilder._unpack` (a .tar.gz sdist built from source) and `safety.safe_extract_tar`
  as `tools.build` calls it on download-tools' archive;
- zip: `SdistBuilder._unpack` (a .zip sdist), through `safety.safe_extract_zip`;
- bundle stream: `scripts/join.sh --extract`, run for real with bash and GNU tar on volumes
  written by `volumes.split`.

Each hostile case must be refused with the exact message, leave the destination empty (the
checks run before anything is written) and write nothing anywhere else; a benign archive per entry
point must unpack. The tools archive on the target is guarded by `scripts/check-tools-archive.py`,
whose own table is in tests/test_scripts.py.
"""

from __future__ import annotations

import io
import stat
import subprocess
import tarfile
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gpustack_offline.bundle import volumes
from gpustack_offline.core.errors import IntegrityError
from gpustack_offline.core.safety import safe_extract_tar
from gpustack_offline.stages.locks import LockedFile, LockedPackage
from gpustack_offline.stages.wheels import SdistBuilder

CELL = "v0.0.0-linux-amd64-cpu-py3.11-base-pip"


@pytest.fixture(scope="module")
def refused(request: pytest.FixtureRequest) -> Iterator[list[str]]:
    """Collects the hostile cases refused; the count is printed once the module is done."""
    cases: list[str] = []
    yield cases
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\nhostile archive cases refused: {len(cases)}")


# ---------------------------------------------------------------------------------------------
# Building archives


Entry = tuple[tarfile.TarInfo, bytes]


def entry(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", data: bytes = b"x") -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o755 if kind == tarfile.DIRTYPE else 0o644
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data if kind == tarfile.REGTYPE else b""


def write_tar(path: Path, entries: list[Entry]) -> Path:
    with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as tf:
        for info, data in entries:
            tf.addfile(info, io.BytesIO(data))
    return path


def zentry(
    name: str, kind: int = stat.S_IFREG, data: bytes = b"x"
) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name, date_time=(2025, 1, 1, 0, 0, 0))
    info.create_system = 3  # Unix: the high 16 bits of external_attr are st_mode
    info.external_attr = (kind | 0o644) << 16
    return info, data


def write_zip(path: Path, entries: list[tuple[zipfile.ZipInfo, bytes]]) -> Path:
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w") as zf:
        warnings.simplefilter("ignore")  # "Duplicate name": the point of one case
        for info, data in entries:
            zf.writestr(info, data)
    return path


def snapshot(root: Path, skip: Path) -> dict[str, str]:
    """Every path under `root` but `skip` and the archives, with its kind and link target."""
    out = {}
    for p in root.rglob("*"):
        if p == skip or skip in p.parents or p.parent.name == "in":
            continue
        out[str(p.relative_to(root))] = (
            f"-> {p.readlink()}" if p.is_symlink() else stat.filemode(p.lstat().st_mode)
        )
    return out


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder beside the destination that every hostile archive aims at."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("secret")
    (tmp_path / "in").mkdir()
    return tmp_path / "outside"


# ---------------------------------------------------------------------------------------------
# tar: sdists and download-tools' archive


def path_max_chain(outside: str) -> list[Entry]:
    """CVE-2025-4517: symlinks through folders deeper than PATH_MAX make `os.path.realpath` give
    up, so the data filter of Python < 3.11.13 judges `escape` by its text while the kernel
    follows it out of the destination: the filter alone lets `escape/<outside>/pwned` through."""
    comp, steps, path, entries = "d" * 247, "abcdefghijklmnop", "", []
    for step in steps:
        entries += [entry(f"{path}{comp}", tarfile.DIRTYPE),
                    entry(f"{path}{step}", tarfile.SYMTYPE, comp)]  # fmt: skip
        path += f"{comp}/"
    deep = "/".join(steps) + "/" + "l" * 254
    return [*entries, entry(deep, tarfile.SYMTYPE, "../" * len(steps)),
            entry("escape", tarfile.SYMTYPE, deep + "/.." * (len(steps) + 1)),
            entry(f"escape{outside}/pwned")]  # fmt: skip


# (id, entries given the absolute path of `outside`, the member refused, why)
TarCase = tuple[str, Callable[[str], list[Entry]], str, str]
TAR_CASES: list[TarCase] = [
    ("absolute", lambda o: [entry(f"{o}/abs")], "{o}/abs", "absolute name"),
    ("dotdot", lambda o: [entry("pkg/../../outside/up")], "pkg/../../outside/up",
     "'..' in the name leads outside the destination"),
    ("symlink-absolute", lambda o: [entry("pkg/link", tarfile.SYMTYPE, o)], "pkg/link",
     "symlink to {o}: absolute target"),
    ("symlink-dotdot", lambda o: [entry("pkg/link", tarfile.SYMTYPE, "../../outside")],
     "pkg/link", "symlink to ../../outside: leads outside the destination"),
    # Each link alone stays inside; `a/b/up/..` is the parent of the destination, not `a/b`.
    ("symlink-chain", lambda o: [entry("a/b/up", tarfile.SYMTYPE, "../.."),
                                 entry("esc", tarfile.SYMTYPE, "a/b/up/..")],
     "esc", "symlink to a/b/up/..: leads outside the destination"),
    ("symlink-loop", lambda o: [entry("x", tarfile.SYMTYPE, "y"),
                                entry("y", tarfile.SYMTYPE, "x/..")],
     "x", "symlink to y: too many levels of symlinks"),
    # The file comes first: the link it is written through is judged all the same.
    ("through-symlink", lambda o: [entry("pkg/link/pwned"),
                                   entry("pkg/link", tarfile.SYMTYPE, "../../outside")],
     "pkg/link/pwned", "written through pkg/link, a symlink in the archive"),
    ("hardlink-absolute", lambda o: [entry("pkg/hl", tarfile.LNKTYPE, f"{o}/secret")], "pkg/hl",
     "absolute hard link target"),
    ("hardlink-dotdot", lambda o: [entry("pkg/hl", tarfile.LNKTYPE, "../outside/secret")],
     "pkg/hl", "'..' in the hard link target leads outside the destination"),
    ("hardlink-to-symlink", lambda o: [entry("pkg/s", tarfile.SYMTYPE, "."),
                                       entry("pkg/hl", tarfile.LNKTYPE, "pkg/s")],
     "pkg/hl", "hard link to pkg/s, not a regular file earlier in it"),
    ("path-max-chain", path_max_chain, "/".join("abcdefghijklmnop") + "/" + "l" * 254,
     "written through a, a symlink in the archive"),
    ("character-device", lambda o: [entry("pkg/null", tarfile.CHRTYPE)], "pkg/null",
     "character device"),
    ("block-device", lambda o: [entry("pkg/disk", tarfile.BLKTYPE)], "pkg/disk", "block device"),
    ("fifo", lambda o: [entry("pkg/pipe", tarfile.FIFOTYPE)], "pkg/pipe", "FIFO (named pipe)"),
    ("replaces-destination", lambda o: [entry(".", tarfile.SYMTYPE, o)], ".",
     "would replace the destination folder itself"),
    ("file-then-symlink", lambda o: [entry("pkg/a"), entry("pkg/a", tarfile.SYMTYPE, o)],
     "pkg/a", "appears more than once in the archive"),
]  # fmt: skip

BENIGN_TAR = [
    entry("pkg", tarfile.DIRTYPE),
    entry("pkg/v1", tarfile.DIRTYPE),
    entry("pkg/v1/tool", data=b"#!/bin/sh\n"),
    entry("pkg/default", tarfile.SYMTYPE, "v1"),
    entry("pkg/v1/rpc", tarfile.SYMTYPE, "tool"),
    entry("pkg/up", tarfile.SYMTYPE, "../pkg/./v1/../default/tool"),
    entry("pkg/copy", tarfile.LNKTYPE, "pkg/v1/tool"),
]


def unpack_sdist(archive: Path, dest: Path) -> None:
    """What `SdistBuilder.build` does with an sdist before building it."""
    sdist = LockedFile(f"https://files.example/{archive.name}", "f" * 64, 1)
    SdistBuilder._unpack(LockedPackage("evil", "1.0", None, (), sdist), archive, dest)


def unpack_tools(archive: Path, dest: Path) -> None:
    """What `tools.build` does with the archive download-tools saved."""
    with tarfile.open(archive) as tf:
        safe_extract_tar(tf, dest, f"download-tools archive {archive.name}")


TAR_ENTRY_POINTS = {
    "sdist-tar": ("evil-1.0.tar.gz", "evil-1.0.tar.gz", unpack_sdist),
    "tools": (
        "gpustack-tools.tar.gz",
        "download-tools archive gpustack-tools.tar.gz",
        unpack_tools,
    ),
}


@pytest.mark.parametrize("point", TAR_ENTRY_POINTS)
@pytest.mark.parametrize(("entries", "member", "why"), [c[1:] for c in TAR_CASES],
                         ids=[c[0] for c in TAR_CASES])  # fmt: skip
def test_tar_entry_points_refuse_hostile_members(
    point: str,
    entries: Callable[[str], list[Entry]],
    member: str,
    why: str,
    tmp_path: Path,
    outside: Path,
    refused: list[str],
) -> None:
    name, what, unpack = TAR_ENTRY_POINTS[point]
    archive = write_tar(tmp_path / "in" / name, entries(str(outside)))
    dest = tmp_path / "dest"
    before = snapshot(tmp_path, dest)
    with pytest.raises(IntegrityError) as caught:
        unpack(archive, dest)
    member, why = member.format(o=outside), why.format(o=outside)
    assert str(caught.value) == (
        f"{what}: refused to unpack {member!r}: {why}. The archive is damaged or hostile; "
        "get it again from its source"
    )
    assert not dest.exists() or list(dest.iterdir()) == [], "written before the refusal"
    assert snapshot(tmp_path, dest) == before, "something was written outside the destination"
    refused.append(f"{point}:{member}")


@pytest.mark.parametrize("point", TAR_ENTRY_POINTS)
def test_tar_entry_points_unpack_a_benign_archive(point: str, tmp_path: Path) -> None:
    name, _, unpack = TAR_ENTRY_POINTS[point]
    (tmp_path / "in").mkdir()
    archive = write_tar(tmp_path / "in" / name, BENIGN_TAR)
    dest = tmp_path / "dest"
    if point == "tools":
        dest.mkdir()
    unpack(archive, dest)
    assert (dest / "pkg/default/rpc").read_bytes() == b"#!/bin/sh\n"
    assert (dest / "pkg/up").read_bytes() == b"#!/bin/sh\n"
    assert (dest / "pkg/copy").stat().st_ino == (dest / "pkg/v1/tool").stat().st_ino
    assert (dest / "pkg/default").readlink() == Path("v1")


# ---------------------------------------------------------------------------------------------
# zip: sdists

ZipCase = tuple[str, Callable[[str], list[tuple[zipfile.ZipInfo, bytes]]], str, str]
ZIP_CASES: list[ZipCase] = [
    ("absolute", lambda o: [zentry(f"{o}/abs")], "{o}/abs", "absolute name"),
    ("dotdot", lambda o: [zentry("pkg/../../outside/up")], "pkg/../../outside/up",
     "'..' in the name leads outside the destination"),
    ("backslash", lambda o: [zentry("pkg\\..\\..\\outside\\up")], "pkg\\..\\..\\outside\\up",
     "name contains a backslash (a path separator on Windows)"),
    ("drive", lambda o: [zentry("C:/outside/up")], "C:/outside/up",
     "name starts with a Windows drive"),
    ("symlink", lambda o: [zentry("pkg/link", stat.S_IFLNK, b"../../outside")], "pkg/link",
     "symlink"),
    ("character-device", lambda o: [zentry("pkg/null", stat.S_IFCHR, b"")], "pkg/null",
     "character device"),
    ("block-device", lambda o: [zentry("pkg/disk", stat.S_IFBLK, b"")], "pkg/disk",
     "block device"),
    ("fifo", lambda o: [zentry("pkg/pipe", stat.S_IFIFO, b"")], "pkg/pipe", "FIFO (named pipe)"),
    ("duplicate", lambda o: [zentry("pkg/setup.py"), zentry("pkg/./setup.py", data=b"evil")],
     "pkg/./setup.py", "appears more than once in the archive"),
    ("replaces-destination", lambda o: [zentry("./")], "./",
     "would replace the destination folder itself"),
]  # fmt: skip


@pytest.mark.parametrize(("entries", "member", "why"), [c[1:] for c in ZIP_CASES],
                         ids=[c[0] for c in ZIP_CASES])  # fmt: skip
def test_zip_sdists_with_hostile_members_are_refused(
    entries: Callable[[str], list[tuple[zipfile.ZipInfo, bytes]]],
    member: str,
    why: str,
    tmp_path: Path,
    outside: Path,
    refused: list[str],
) -> None:
    archive = write_zip(tmp_path / "in" / "evil-1.0.zip", entries(str(outside)))
    dest = tmp_path / "dest"
    before = snapshot(tmp_path, dest)
    with pytest.raises(IntegrityError) as caught:
        unpack_sdist(archive, dest)
    member, why = member.format(o=outside), why.format(o=outside)
    assert str(caught.value) == (
        f"evil-1.0.zip: refused to unpack {member!r}: {why}. The archive is damaged or hostile; "
        "get it again from its source"
    )
    assert list(dest.iterdir()) == [], "written before the refusal"
    assert snapshot(tmp_path, dest) == before, "something was written outside the destination"
    refused.append(f"sdist-zip:{member}")


def test_a_benign_zip_sdist_unpacks(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    archive = write_zip(
        tmp_path / "in" / "good-1.0.zip",
        [zentry("good-1.0/", stat.S_IFDIR, b""), zentry("good-1.0/setup.py", data=b"setup()"),
         zentry("good-1.0/src/good/__init__.py", data=b"")],
    )  # fmt: skip
    unpack_sdist(archive, tmp_path / "dest")
    assert (tmp_path / "dest/good-1.0/setup.py").read_bytes() == b"setup()"
    assert (tmp_path / "dest/good-1.0/src/good/__init__.py").is_file()


# ---------------------------------------------------------------------------------------------
# The bundle stream: scripts/join.sh --extract


def join_volumes(
    entries: list[Entry], tmp_path: Path
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Split a bundle tar of `entries` into volumes, then join it into a fresh target folder."""
    bundle = [entry(CELL, tarfile.DIRTYPE), entry(f"{CELL}/SHA256SUMS", data=b"0" * 3000)]
    tar = write_tar(tmp_path / "in" / f"{CELL}.tar", bundle + entries)
    manifest = volumes.split(tar, 8192, tmp_path / "media")[-1]
    target = tmp_path / "target"
    target.mkdir()
    proc = subprocess.run(
        ["bash", str(tmp_path / "media" / f"{CELL}.join.sh"), "--extract", str(target),
         str(manifest)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    return proc, target


JoinCase = tuple[str, Callable[[str], list[Entry]], str, str]
JOIN_CASES: list[JoinCase] = [
    ("absolute", lambda o: [entry(f"{o}/abs")], "{o}/abs", "absolute name"),
    ("dotdot", lambda o: [entry(f"{CELL}/../outside-up")], f"{CELL}/../outside-up",
     "'..' in the name leads outside the folder"),
    ("dotdot-top", lambda o: [entry("..", tarfile.DIRTYPE)], "../",
     "'..' in the name leads outside the folder"),
    ("symlink", lambda o: [entry(f"{CELL}/link", tarfile.SYMTYPE, o)], f"{CELL}/link",
     "symlink"),
    ("hardlink", lambda o: [entry(f"{CELL}/hl", tarfile.LNKTYPE, f"{o}/secret")],
     f"{CELL}/hl", "hard link"),
    ("hardlink-inside", lambda o: [entry(f"{CELL}/hl", tarfile.LNKTYPE, f"{CELL}/SHA256SUMS")],
     f"{CELL}/hl", "hard link"),
    ("character-device", lambda o: [entry(f"{CELL}/null", tarfile.CHRTYPE)], f"{CELL}/null",
     "character device"),
    ("block-device", lambda o: [entry(f"{CELL}/disk", tarfile.BLKTYPE)], f"{CELL}/disk",
     "block device"),
    ("fifo", lambda o: [entry(f"{CELL}/pipe", tarfile.FIFOTYPE)], f"{CELL}/pipe",
     "FIFO (named pipe)"),
    ("absolute-symlink", lambda o: [entry(f"{o}/l", tarfile.SYMTYPE, "/etc")], "{o}/l",
     "absolute name, symlink"),
]  # fmt: skip


@pytest.mark.parametrize(("entries", "member", "why"), [c[1:] for c in JOIN_CASES],
                         ids=[c[0] for c in JOIN_CASES])  # fmt: skip
def test_join_refuses_a_bundle_stream_with_hostile_members(
    entries: Callable[[str], list[Entry]],
    member: str,
    why: str,
    tmp_path: Path,
    outside: Path,
    refused: list[str],
) -> None:
    before = snapshot(tmp_path, tmp_path / "media")
    proc, target = join_volumes(entries(str(outside)), tmp_path)
    member, why = member.format(o=outside), why.format(o=outside)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"  REFUSED    {member}: {why}" in proc.stderr.splitlines(), proc.stderr
    assert f"{CELL}.tar holds 1 member(s) a bundle never has (listed above)" in proc.stderr
    assert list(target.iterdir()) == [], "a final or temporary folder was left behind"
    after = snapshot(tmp_path, tmp_path / "media")
    del after["target"]
    assert after == before, "something was written outside the target"
    refused.append(f"join:{member}")


def test_join_names_every_hostile_member_at_once(tmp_path: Path, outside: Path) -> None:
    proc, target = join_volumes(
        [entry("/abs"), entry(f"{CELL}/ok"), entry(f"{CELL}/pipe", tarfile.FIFOTYPE),
         entry(f"{CELL}/new\nline", tarfile.SYMTYPE, "ok")],
        tmp_path,
    )  # fmt: skip
    assert proc.returncode == 1
    assert [line for line in proc.stderr.splitlines() if "REFUSED" in line] == [
        "  REFUSED    /abs: absolute name",
        f"  REFUSED    {CELL}/pipe: FIFO (named pipe)",
        f"  REFUSED    {CELL}/new\\nline: symlink",
    ]
    assert "holds 3 member(s) a bundle never has" in proc.stderr
    assert list(target.iterdir()) == []


def test_join_unpacks_a_benign_bundle_stream(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    proc, target = join_volumes(
        [entry(f"{CELL}/wheels", tarfile.DIRTYPE), entry(f"{CELL}/wheels/a.whl", data=b"w" * 9000),
         entry(f"./{CELL}/install.sh", data=b"#!/bin/bash\n")],
        tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (target / CELL / "wheels/a.whl").read_bytes() == b"w" * 9000
    assert (target / CELL / "install.sh").read_bytes() == b"#!/bin/bash\n"
    assert sorted(p.name for p in target.iterdir()) == [CELL]
