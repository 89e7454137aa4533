"""Split a bundle tar into numbered volumes that fit transfer media (FAT32 sticks, DVDs).

On the media, beside each other:

    <cell>.tar.001 ... <cell>.tar.NNN   the tar's bytes, cut in order (at least 3 digits)
    <cell>.volumes                      what `scripts/join.sh` checks: sha256 and size of every
                                        volume and of the whole tar (plain text, read by bash)
    <cell>.join.sh                      scripts/join.sh: checks every volume, then unpacks or
                                        rebuilds the tar, with bash and coreutils only

Sizes (`parse_size`): a plain number is bytes; K, M, G, T (with or without a trailing B) are
decimal, as drive makers count, so `4G` is 4,000,000,000 bytes and every volume fits FAT32's
limit of 4 GiB - 1 byte (4,294,967,295) with room to spare; KiB, MiB, GiB, TiB are binary; and
`fat32` is exactly 4 GiB - 1. A fraction is allowed (`4.7G` for a DVD). Case does not matter.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, cast

from gpustack_offline import __version__
from gpustack_offline.bundle import tarball
from gpustack_offline.bundle.errors import VolumeError
from gpustack_offline.core.errors import OptionError
from gpustack_offline.core.files import CHUNK, atomic_path

FORMAT = "gpustack-offline-volumes 1"
FAT32_MAX = 4 * 1024**3 - 1
MIN_SIZE = 1_000_000  # 1M: below this a typo (4K for 4G) would write thousands of files
MAX_VOLUMES = 9999
JOIN_SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "join.sh"

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_SIZE = re.compile(r"(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[kmgt]?)(?P<binary>i?)b?", re.I)
_SIZE_HELP = "a number of bytes with an optional unit: 4G (decimal), 4GiB (binary) or fat32"


def parse_size(text: str) -> int:
    """Bytes per volume from `4G`, `700M`, `4.7G`, `2GiB`, `fat32` or `4000000000`."""
    spec = text.strip()
    if spec.lower() == "fat32":
        return FAT32_MAX
    match = _SIZE.fullmatch(spec)
    if not match or (match["binary"] and not match["unit"]):
        raise VolumeError(f"volume size {text!r} is not a size; give {_SIZE_HELP}")
    unit = match["unit"].lower()
    scale = 1024 ** " kmgt".index(unit) if match["binary"] else _UNITS[unit]
    try:
        size = int(Decimal(match["number"]) * scale)
    except InvalidOperation:  # pragma: no cover - the pattern admits only plain decimals
        raise VolumeError(f"volume size {text!r} is not a size; give {_SIZE_HELP}") from None
    if size < MIN_SIZE:
        raise VolumeError(
            f"volume size {text!r} is {size} bytes; the smallest is 1M ({MIN_SIZE} bytes), "
            f"e.g. 4G for FAT32 media"
        )
    return size


WRITE_CHOICES = ("tar", "volumes", "both")


@dataclass(frozen=True)
class Outputs:
    """What a build writes beside the bundle folder (the `write` and `split` options)."""

    tar: bool  # dist/<cell>.tar
    volume_size: int | None  # volumes of this size, streamed from the folder; None = none


def outputs(write: str, split: str) -> Outputs:
    """`write` = tar, volumes or both; "" = the tar, and volumes too when `split` gives a size.

    `volumes` writes no whole tar: the volumes are streamed from the folder, so the bundle's
    bytes are on disk once beyond the cache instead of twice (tar and volumes)."""
    choice = write.strip().lower()
    if choice not in ("", *WRITE_CHOICES):
        raise OptionError(f"option write={write!r} is not one of {', '.join(WRITE_CHOICES)}")
    size = parse_size(split) if split else None
    if choice in ("volumes", "both") and size is None:
        raise OptionError(
            f"option write={choice} needs a volume size: give split too (e.g. --split 4G)"
        )
    if choice == "tar" and size is not None:
        raise OptionError(
            f"option split={split!r} asks for volumes but write=tar writes none: drop split, "
            "or choose write=both or write=volumes"
        )
    return Outputs(tar=choice != "volumes", volume_size=size)


def stem(tar: Path) -> str:
    """`<cell>` for `<cell>.tar`: the prefix of every name in a volume set."""
    return tar.name.removesuffix(".tar")


def manifest_path(tar: Path, dest: Path | None = None) -> Path:
    return (dest or tar.parent) / f"{stem(tar)}.volumes"


def split(
    tar: Path, size: int, dest: Path | None = None, join_script: Path = JOIN_SCRIPT
) -> list[Path]:
    """Write `tar` as volumes of at most `size` bytes into `dest` (default: beside the tar).

    Returns every file written, in the order to copy them: the volumes, the join script, and the
    volume manifest, which is written last, so a set interrupted part way has no manifest and a
    join refuses it. A volume already there with the same bytes is kept (a re-run after an
    interruption writes only what is missing); volumes of an earlier, longer split are removed.
    """
    if not tar.is_file():
        raise VolumeError(f"{tar} does not exist; build the bundle first (invoke bundle)")

    def feed(sink: BinaryIO) -> None:
        with tar.open("rb") as src:
            while chunk := src.read(CHUNK):
                sink.write(chunk)

    return _split(tar.name, tar.stat().st_size, feed, size, dest or tar.parent, join_script)


def split_folder(
    directory: Path, tar: Path, size: int, dest: Path | None = None,
    join_script: Path = JOIN_SCRIPT,
) -> list[Path]:  # fmt: skip
    """The volumes of the tar that `assemble.write_tar(directory, tar)` would write, byte for
    byte, streamed from the folder: the whole tar is never on disk, so the volumes are the one
    copy of the bundle beyond the cache. Otherwise as `split`."""
    entries = tarball.members(directory)
    return _split(
        tar.name,
        tarball.size(entries),
        lambda sink: tarball.write(entries, sink),
        size,
        dest or tar.parent,
        join_script,
    )


def _split(
    tar_name: str,
    total: int,
    feed: Callable[[BinaryIO], None],
    size: int,
    dest: Path,
    join_script: Path,
) -> list[Path]:
    if size < 1:
        raise VolumeError(f"volume size must be at least 1 byte, not {size}")
    if not join_script.is_file():
        raise VolumeError(f"{join_script} is missing; run from a gpustack-offline checkout")
    count = max(1, -(-total // size))
    if count > MAX_VOLUMES:
        raise VolumeError(
            f"{tar_name} ({total} bytes) in volumes of {size} bytes would make {count} volumes; "
            f"the most is {MAX_VOLUMES}: choose a size of at least {-(-total // MAX_VOLUMES)}"
        )
    dest.mkdir(parents=True, exist_ok=True)
    name = stem(Path(tar_name))
    manifest = dest / f"{name}.volumes"
    # No manifest may describe a set that is being rewritten.
    manifest.unlink(missing_ok=True)
    _check_space(tar_name, dest, total)
    width = max(3, len(str(count)))
    names = [f"{tar_name}.{n:0{width}d}" for n in range(1, count + 1)]
    with _Volumes(dest, names, size, total) as sink:
        feed(cast(BinaryIO, sink))
    _remove_stale(tar_name, set(names), dest)
    script = dest / f"{name}.join.sh"
    with atomic_path(script, mode_optional=True) as tmp:
        shutil.copyfile(join_script, tmp)
    header = [
        FORMAT,
        f"# {tar_name} in {count} volume(s) of at most {size} bytes,"
        f" written by gpustack-offline {__version__}.",
        "# Check every volume, then unpack into the current folder (bash and coreutils only):",
        f"#   bash {script.name} {manifest.name}",
        f"#   bash {script.name} --help    (check only, rebuild the tar, free-space options)",
        "# Lines: tar|volume SHA256 SIZE NAME; the volumes join in the order listed.",
        f"tar {sink.whole.hexdigest()} {total} {tar_name}",
    ]
    with atomic_path(manifest, mode_optional=True) as tmp:
        tmp.write_text("\n".join([*header, *sink.lines, f"end {count}"]) + "\n")
    return [*(dest / n for n in names), script, manifest]


class _Volumes:
    """A writable that cuts what is written into it into the named volumes, in order.

    A volume already there with the right size is compared instead of written; at the first
    byte that differs it is rewritten (its matching start copied from the old file, the rest
    from the stream), so a re-run writes only what is missing and never needs to seek back in
    the stream. Each volume is written under a temporary name and renamed when whole; leaving
    the `with` by an error removes the half-written one."""

    def __init__(self, dest: Path, names: list[str], size: int, total: int) -> None:
        self.dest, self.names, self.size, self.total = dest, names, size, total
        self.offset = 0
        self.whole = hashlib.sha256()
        self.lines: list[str] = []
        self._stack = contextlib.ExitStack()
        self._left = 0  # bytes still to come in the open volume; 0 when none is open
        self._digest = hashlib.sha256()
        self._old: BinaryIO | None = None  # comparing against this existing volume
        self._out: BinaryIO | None = None  # writing the volume here
        self._done = 0  # bytes of the open volume so far

    def __enter__(self) -> _Volumes:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if kind is None and (self.offset != self.total or self._left):
            short = VolumeError(
                f"the bundle tar came to {self.offset} bytes, not the {self.total} counted "
                "before; a file in the bundle folder changed while it was being split: build "
                "it again"
            )
            self._stack.__exit__(VolumeError, short, None)  # the half volume is removed
            raise short
        self._stack.__exit__(kind, exc, tb)

    def tell(self) -> int:
        return self.offset

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            if not self._left:
                self._open()
            piece = view[: self._left]
            view = view[len(piece) :]
            self._take(bytes(piece))
        return len(data)

    def _open(self) -> None:
        number = len(self.lines)
        if number >= len(self.names):
            raise VolumeError(
                f"the bundle tar is longer than the {self.total} bytes counted before; a file "
                "in the bundle folder changed while it was being split: build it again"
            )
        self._left = min(self.size, self.total - self.offset)
        self._digest, self._done = hashlib.sha256(), 0
        final = self.dest / self.names[number]
        if final.is_file() and final.stat().st_size == self._left:
            self._old = self._stack.enter_context(final.open("rb"))
        else:
            self._start_writing(final)

    def _start_writing(self, final: Path) -> None:
        tmp = self._stack.enter_context(atomic_path(final, mode_optional=True))
        self._out = self._stack.enter_context(tmp.open("wb"))

    def _take(self, piece: bytes) -> None:
        if self._old is not None and self._old.read(len(piece)) != piece:
            old, self._old = self._old, None
            self._start_writing(self.dest / self.names[len(self.lines)])
            assert self._out is not None
            old.seek(0)
            _copy(old, self._out, self._done)
        if self._out is not None:
            self._out.write(piece)
        self._digest.update(piece)
        self.whole.update(piece)
        self.offset += len(piece)
        self._done += len(piece)
        self._left -= len(piece)
        if not self._left:
            self._close_volume()

    def _close_volume(self) -> None:
        # closes the open files and renames a written volume into place
        self._stack.close()
        self._stack = contextlib.ExitStack()
        self._old = self._out = None
        name = self.names[len(self.lines)]
        self.lines.append(f"volume {self._digest.hexdigest()} {self._done} {name}")


def _copy(src: BinaryIO, out: BinaryIO, length: int) -> None:
    remaining = length
    while remaining:
        chunk = src.read(min(CHUNK, remaining))
        if not chunk:
            raise VolumeError(f"{src.name} shrank while it was being compared; split again")
        out.write(chunk)
        remaining -= len(chunk)


def _check_space(tar_name: str, dest: Path, total: int) -> None:
    needed = total - sum(p.stat().st_size for p in _numbered(tar_name, dest))
    free = shutil.disk_usage(dest).free
    if needed > free:
        raise VolumeError(
            f"{dest} has {free} bytes free; the volumes of {tar_name} need {needed} more "
            f"({total} in all): free space there or split to other media"
        )


def _remove_stale(tar_name: str, keep: set[str], dest: Path) -> None:
    """Volumes left by an earlier split into more pieces would only confuse the target."""
    for path in _numbered(tar_name, dest):
        if path.name not in keep:
            path.unlink()


def _numbered(tar_name: str, dest: Path) -> list[Path]:
    prefix = f"{tar_name}."
    return [
        p for p in dest.glob(f"{glob.escape(prefix)}*")
        if p.name[len(prefix):].isdigit() and p.is_file()
    ]  # fmt: skip
