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

import glob
import hashlib
import re
import shutil
from collections.abc import Iterator
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import BinaryIO

from gpustack_offline import __version__
from gpustack_offline.bundle.errors import VolumeError
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
    if size < 1:
        raise VolumeError(f"volume size must be at least 1 byte, not {size}")
    if not tar.is_file():
        raise VolumeError(f"{tar} does not exist; build the bundle first (invoke bundle)")
    if not join_script.is_file():
        raise VolumeError(f"{join_script} is missing; run from a gpustack-offline checkout")
    dest = dest or tar.parent
    total = tar.stat().st_size
    count = max(1, -(-total // size))
    if count > MAX_VOLUMES:
        raise VolumeError(
            f"{tar.name} ({total} bytes) in volumes of {size} bytes would make {count} volumes; "
            f"the most is {MAX_VOLUMES}: choose a size of at least {-(-total // MAX_VOLUMES)}"
        )
    dest.mkdir(parents=True, exist_ok=True)
    manifest = manifest_path(tar, dest)
    # No manifest may describe a set that is being rewritten.
    manifest.unlink(missing_ok=True)
    _check_space(tar, dest, total)
    width = max(3, len(str(count)))
    names = [f"{tar.name}.{n:0{width}d}" for n in range(1, count + 1)]
    whole = hashlib.sha256()
    lines = []
    with tar.open("rb") as src:
        for name in names:
            length = min(size, total - src.tell())
            digest, whole = _write_volume(src, length, dest / name, whole)
            lines.append(f"volume {digest} {length} {name}")
    _remove_stale(tar.name, set(names), dest)
    script = dest / f"{stem(tar)}.join.sh"
    with atomic_path(script, mode_optional=True) as tmp:
        shutil.copyfile(join_script, tmp)
    header = [
        FORMAT,
        f"# {tar.name} in {count} volume(s) of at most {size} bytes,"
        f" written by gpustack-offline {__version__}.",
        "# Check every volume, then unpack into the current folder (bash and coreutils only):",
        f"#   bash {script.name} {manifest.name}",
        f"#   bash {script.name} --help    (check only, rebuild the tar, free-space options)",
        "# Lines: tar|volume SHA256 SIZE NAME; the volumes join in the order listed.",
        f"tar {whole.hexdigest()} {total} {tar.name}",
    ]
    with atomic_path(manifest, mode_optional=True) as tmp:
        tmp.write_text("\n".join([*header, *lines, f"end {count}"]) + "\n")
    return [*(dest / name for name in names), script, manifest]


def _check_space(tar: Path, dest: Path, total: int) -> None:
    needed = total - sum(p.stat().st_size for p in _numbered(tar.name, dest))
    free = shutil.disk_usage(dest).free
    if needed > free:
        raise VolumeError(
            f"{dest} has {free} bytes free; the volumes of {tar.name} need {needed} more "
            f"({total} in all): free space there or split to other media"
        )


def _write_volume(
    src: BinaryIO, length: int, final: Path, whole: hashlib._Hash
) -> tuple[str, hashlib._Hash]:
    """Copy the next `length` bytes of `src` to `final`, streaming, unless `final` has them.

    Returns the volume's sha256 and `whole` advanced over its bytes (a copy: a comparison that
    fails part way must not leave half a volume folded into the tar's digest).
    """
    start = src.tell()
    if final.is_file() and final.stat().st_size == length:
        digest, advanced = hashlib.sha256(), whole.copy()
        with final.open("rb") as have:
            for chunk in _chunks(src, length):
                if have.read(len(chunk)) != chunk:
                    break
                digest.update(chunk)
                advanced.update(chunk)
            else:
                return digest.hexdigest(), advanced
        src.seek(start)
    digest, advanced = hashlib.sha256(), whole.copy()
    with atomic_path(final, mode_optional=True) as tmp, tmp.open("wb") as out:
        for chunk in _chunks(src, length):
            out.write(chunk)
            digest.update(chunk)
            advanced.update(chunk)
    return digest.hexdigest(), advanced


def _chunks(src: BinaryIO, length: int) -> Iterator[bytes]:
    remaining = length
    while remaining:
        chunk = src.read(min(CHUNK, remaining))
        if not chunk:
            raise VolumeError(f"{src.name} shrank while it was being split; build it again")
        remaining -= len(chunk)
        yield chunk


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
