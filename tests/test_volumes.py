"""Transfer-media volumes: `volumes.split` on the build host, `scripts/join.sh` on the target,
run for real with bash and coreutils against a bundle tar written by `bundle.write_tar`.

The bundle is small (a few MB of random files and a SHA256SUMS over them) so every split size and
join mode runs in seconds; a bundle already built under dist/ is split and joined as well when
one is there. The free-space refusal runs on a real tmpfs and the join in the clean Debian base
image with no network: both are integration tests (root to mount, Docker to run).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.bundles import CELL as SBOM_CELL
from support.bundles import make_bundle

from gpustack_offline.bundle import volumes
from gpustack_offline.bundle.assemble import write_tar
from gpustack_offline.bundle.volumes import VolumeError, outputs, parse_size, split, split_folder
from gpustack_offline.cli import commands
from gpustack_offline.core import docker as containers
from gpustack_offline.core.errors import OptionError

ROOT = Path(__file__).resolve().parent.parent
JOIN = ROOT / "scripts" / "join.sh"
CELL = SBOM_CELL  # the cell of test_sbom's real bundle
HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


# ---------------------------------------------------------------------------------------------
# The bundle and helpers


@pytest.fixture(scope="module")
def bundle_tar(matrix, root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real bundle, made by bundle.assemble (wheels, tools archive, an image export, SBOM,
    manifest, SHA256SUMS), and its dist/<cell>.tar as a build writes it."""
    payload = os.urandom(1_300_000).hex()  # about 3.1 MB of bundle: fits the 5 MB disk below
    folder = make_bundle(matrix, root, tmp_path_factory.mktemp("real"), payload=payload)
    tar = folder.with_name(f"{CELL}.tar")
    write_tar(folder, tar)
    return tar


def join(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the join script as the target runs it: the copy split() put on the media."""
    *options, manifest = (str(a) for a in args)
    script = Path(manifest).with_name(Path(manifest).name.removesuffix(".volumes") + ".join.sh")
    return subprocess.run(
        ["bash", str(script), *options, manifest],
        capture_output=True, text=True, timeout=120, check=False, cwd=cwd,
    )  # fmt: skip


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_lines(manifest: Path) -> list[list[str]]:
    return [line.split() for line in manifest.read_text().splitlines()[1:] if line[:1] != "#"]


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def leftovers(*folders: Path) -> list[Path]:
    """Temporary names of split (`.NAME.XXXX.part`) and join (`.NAME.join.XXXXXX`)."""
    return [
        p for f in folders for p in f.rglob(".*") if p.name.endswith(".part") or ".join." in p.name
    ]


@pytest.fixture
def media(bundle_tar: Path, tmp_path: Path) -> Iterator[Path]:
    """The tar split into four volumes on the "media": returns the volume manifest."""
    quarter = max(volumes.MIN_SIZE, -(-bundle_tar.stat().st_size // 4))
    written = split(bundle_tar, quarter, tmp_path / "media")
    assert len(written) == 6
    yield written[-1]


# ---------------------------------------------------------------------------------------------
# Sizes


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4G", 4_000_000_000), ("4g", 4_000_000_000), ("4GB", 4_000_000_000),
        ("4.7G", 4_700_000_000), ("700M", 700_000_000), ("2GiB", 2 * 1024**3),
        ("1MiB", 1024**2), ("1M", 1_000_000), ("1T", 10**12), ("5000000", 5_000_000),
        (" fat32 ", 4 * 1024**3 - 1), ("FAT32", 4 * 1024**3 - 1),
    ],
)  # fmt: skip
def test_parse_size_reads_decimal_and_binary_units(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_4g_volumes_fit_fat32() -> None:
    assert parse_size("4G") <= 4 * 1024**3 - 1
    assert parse_size("fat32") == 4 * 1024**3 - 1


@pytest.mark.parametrize("text", ["", "G", "4X", "four", "-1G", "4iB", "4 G B", "1e9", "4GG"])
def test_parse_size_refuses_garbage_naming_the_forms(text: str) -> None:
    with pytest.raises(VolumeError, match=r"is not a size; give a number of bytes .* fat32"):
        parse_size(text)


@pytest.mark.parametrize("text", ["0", "0G", "999999", "100K", "0.0001G"])
def test_parse_size_refuses_zero_and_tiny_sizes(text: str) -> None:
    with pytest.raises(VolumeError, match=r"the smallest is 1M \(1000000 bytes\)"):
        parse_size(text)


# ---------------------------------------------------------------------------------------------
# Splitting


def test_split_refuses_a_size_that_makes_too_many_volumes(bundle_tar: Path, tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match=r"would make \d+ volumes; the most is 9999"):
        split(bundle_tar, 100, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_split_refuses_a_missing_tar(tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match=r"nope.tar does not exist; build the bundle first"):
        split(tmp_path / "nope.tar", 1_000_000)


def test_split_names_volumes_and_describes_them(bundle_tar: Path, tmp_path: Path) -> None:
    total = bundle_tar.stat().st_size
    written = split(bundle_tar, 1_000_000, tmp_path)
    count = -(-total // 1_000_000)
    names = [p.name for p in written]
    assert names == [
        *(f"{CELL}.tar.{n:03d}" for n in range(1, count + 1)),
        f"{CELL}.join.sh",
        f"{CELL}.volumes",
    ]
    assert (tmp_path / f"{CELL}.join.sh").read_bytes() == JOIN.read_bytes()
    text = (tmp_path / f"{CELL}.volumes").read_text()
    assert text.splitlines()[0] == "gpustack-offline-volumes 1"
    lines = manifest_lines(tmp_path / f"{CELL}.volumes")
    assert lines[0] == ["tar", sha256(bundle_tar), str(total), bundle_tar.name]
    assert lines[-1] == ["end", str(count)]
    for (kind, digest, size, name), path in zip(lines[1:-1], written, strict=False):
        assert (kind, name, int(size), digest) == ("volume", path.name, path.stat().st_size,
                                                   sha256(path))  # fmt: skip
        assert int(size) <= 1_000_000
    assert leftovers(tmp_path) == []


def test_split_pads_numbers_to_the_count(tmp_path: Path) -> None:
    tar = tmp_path / "small.tar"
    tar.write_bytes(os.urandom(1000 * 10 + 1))
    written = split(tar, 10, tmp_path / "out")
    assert written[0].name == "small.tar.0001" and written[-3].name == "small.tar.1001"
    assert b"".join(p.read_bytes() for p in written[:-2]) == tar.read_bytes()


def test_an_interrupted_split_leaves_no_manifest_and_no_partial_volume(
    bundle_tar: Path, tmp_path: Path
) -> None:
    (tmp_path / f"{CELL}.tar.002").mkdir()  # the second volume cannot be renamed into place
    with pytest.raises(OSError):
        split(bundle_tar, 1_000_000, tmp_path)
    assert not (tmp_path / f"{CELL}.volumes").exists()
    assert leftovers(tmp_path) == []
    assert (tmp_path / f"{CELL}.tar.001").stat().st_size == 1_000_000


def test_splitting_again_keeps_good_volumes_and_mends_or_drops_the_rest(
    bundle_tar: Path, tmp_path: Path
) -> None:
    first = split(bundle_tar, 1_000_000, tmp_path)
    before = {p.name: os.stat(p).st_ino for p in first[:-2]}
    damaged = first[1]
    data = damaged.read_bytes()
    damaged.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])
    again = split(bundle_tar, 1_000_000, tmp_path)
    assert [p.name for p in again] == [p.name for p in first]
    kept = {p.name for p in again[:-2] if os.stat(p).st_ino == before[p.name]}
    assert kept == set(before) - {damaged.name}  # only the damaged one was written again
    assert join("--check-only", again[-1]).returncode == 0

    bigger = split(bundle_tar, 2_000_000, tmp_path)  # fewer volumes: the old tail goes
    on_disk = sorted(p.name for p in tmp_path.glob(f"{CELL}.tar.*"))
    assert on_disk == [p.name for p in bigger[:-2]]
    assert join("--check-only", bigger[-1]).returncode == 0


# ---------------------------------------------------------------------------------------------
# Volumes only: streamed from the bundle folder, no whole tar


@pytest.mark.parametrize("size", [1_000_000, 1_048_576])
def test_volumes_streamed_from_the_folder_join_to_the_tar_byte_for_byte_and_no_tar_is_written(
    size: int, bundle_tar: Path, tmp_path: Path
) -> None:
    folder = bundle_tar.with_name(CELL)
    media = tmp_path / "media"
    written = split_folder(folder, tmp_path / f"{CELL}.tar", size, media)

    assert not (tmp_path / f"{CELL}.tar").exists() and not list(media.glob("*.tar"))
    assert [p.name for p in written[-2:]] == [f"{CELL}.join.sh", f"{CELL}.volumes"]
    assert all(p.stat().st_size <= size for p in written[:-2])
    # the same bytes as the tar a build writes, and the same description as split() gives it
    assert b"".join(p.read_bytes() for p in written[:-2]) == bundle_tar.read_bytes()
    from_tar = split(bundle_tar, size, tmp_path / "from-tar")
    assert manifest_lines(written[-1]) == manifest_lines(from_tar[-1])
    assert join("--check-only", written[-1]).returncode == 0
    assert leftovers(tmp_path) == []

    again = split_folder(folder, tmp_path / f"{CELL}.tar", size, media)  # nothing to rewrite
    assert [p.stat().st_mtime_ns for p in again[:-2]] == [
        p.stat().st_mtime_ns for p in written[:-2]
    ]


def test_a_file_that_shrinks_while_the_folder_is_streamed_fails_and_keeps_no_half_volume(
    bundle_tar: Path, tmp_path: Path
) -> None:
    folder = tmp_path / CELL
    shutil.copytree(bundle_tar.with_name(CELL), folder)
    entries = volumes.tarball.members(folder)  # counted, then the file shrinks
    biggest = max(folder.rglob("*"), key=lambda p: p.stat().st_size if p.is_file() else 0)
    biggest.write_bytes(biggest.read_bytes()[:1000])

    def feed(sink):
        volumes.tarball.write(entries, sink)

    with pytest.raises(OSError, match="unexpected end of data"):
        volumes._split(f"{CELL}.tar", volumes.tarball.size(entries), feed, 1_000_000,
                       tmp_path / "media", JOIN)  # fmt: skip
    assert leftovers(tmp_path) == [] and not (tmp_path / "media" / f"{CELL}.volumes").exists()


@pytest.mark.parametrize(
    ("write", "split_", "tar", "size"),
    [("", "", True, None), ("", "4G", True, 4 * 10**9), ("tar", "", True, None),
     ("both", "1M", True, 10**6), ("volumes", "fat32", False, volumes.FAT32_MAX),
     ("Volumes", "1M", False, 10**6)],
)  # fmt: skip
def test_the_write_option_chooses_tar_volumes_or_both(
    write: str, split_: str, tar: bool, size: int | None
) -> None:
    assert outputs(write, split_) == volumes.Outputs(tar, size)


@pytest.mark.parametrize(
    ("write", "split_", "message"),
    [("volume", "4G", "is not one of tar, volumes, both"), ("volumes", "", "needs a volume size"),
     ("both", "", "needs a volume size"), ("tar", "4G", "write=tar writes none")],
)  # fmt: skip
def test_the_write_option_refuses_what_it_cannot_do(write: str, split_: str, message: str) -> None:
    with pytest.raises(OptionError, match=message):
        outputs(write, split_)


# ---------------------------------------------------------------------------------------------
# Joining: every size, every mode, byte for byte


def sizes_for(total: int) -> dict[str, int]:
    assert total % 4 == 0  # a tar is whole 512-byte blocks
    return {"one-less": total - 1, "divisor": total // 4, "larger": total * 2, "tiny": 65_536}


@pytest.mark.parametrize("case", ["one-less", "divisor", "larger", "tiny"])
def test_split_and_join_give_back_the_same_bundle(
    case: str, bundle_tar: Path, tmp_path: Path
) -> None:
    total = bundle_tar.stat().st_size
    size = sizes_for(total)[case]
    written = split(bundle_tar, size, tmp_path / "media")
    volumes_ = written[:-2]
    assert len(volumes_) == {"one-less": 2, "divisor": 4, "larger": 1}.get(case, -(-total // size))
    assert len(volumes_) > 1 or case == "larger"
    assert b"".join(p.read_bytes() for p in volumes_) == bundle_tar.read_bytes()
    manifest = written[-1]

    unpacked = join("--extract", tmp_path / "target", manifest)
    assert unpacked.returncode == 0, unpacked.stderr
    assert f"all {len(volumes_)} volume(s) intact" in unpacked.stdout
    assert tree(tmp_path / "target" / CELL) == tree(bundle_tar.parent / CELL)

    rebuilt = join("--output", tmp_path / "rebuilt" / "b.tar", manifest)
    assert rebuilt.returncode == 1 and "its folder does not exist" in rebuilt.stderr
    (tmp_path / "rebuilt").mkdir()
    rebuilt = join("--output", tmp_path / "rebuilt" / "b.tar", manifest)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert (tmp_path / "rebuilt" / "b.tar").read_bytes() == bundle_tar.read_bytes()

    consumed = join("--output", tmp_path / "media" / "c.tar", "--consume", manifest)
    assert consumed.returncode == 0, consumed.stderr
    assert (tmp_path / "media" / "c.tar").read_bytes() == bundle_tar.read_bytes()
    assert not any(p.exists() for p in volumes_)  # each deleted once appended
    assert leftovers(tmp_path) == []


def test_join_unpacks_into_the_current_folder_by_default(media: Path, tmp_path: Path) -> None:
    here = tmp_path / "here"
    here.mkdir()
    proc = join(media, cwd=here)
    assert proc.returncode == 0, proc.stderr
    assert (here / CELL / "SHA256SUMS").is_file()
    again = join(media, cwd=here)
    assert again.returncode == 1
    assert f"./{CELL} exists: remove it or give another --extract DIR" in again.stderr


def test_check_only_writes_nothing(media: Path, tmp_path: Path) -> None:
    before = sorted(tmp_path.rglob("*"))
    proc = join("--check-only", media, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "all 4 volume(s) intact" in proc.stdout
    assert sorted(tmp_path.rglob("*")) == before


# ---------------------------------------------------------------------------------------------
# Damage: every bad volume named, nothing written


def test_join_names_every_missing_truncated_altered_or_long_volume(
    media: Path, tmp_path: Path
) -> None:
    folder = media.parent
    one, two, three, four = (folder / f"{CELL}.tar.{n:03d}" for n in range(1, 5))
    data = bytearray(two.read_bytes())
    data[123_456] ^= 0x01
    two.write_bytes(bytes(data))
    full = three.stat().st_size
    with three.open("r+b") as fh:
        fh.truncate(full - 1000)
    one.unlink()
    with four.open("ab") as fh:
        fh.write(b"\0")
    proc = join("--extract", tmp_path / "target", media)
    assert proc.returncode == 1
    err = proc.stderr
    assert f"MISSING    {one.name}: not in {folder}" in err
    assert f"ALTERED    {two.name}: sha256 {sha256(two)}, expected " in err
    assert f"TRUNCATED  {three.name}: {full - 1000} of {full} bytes" in err
    assert f"TOO LONG   {four.name}: " in err
    named = " ".join(p.name for p in (one, two, three, four))
    assert f"4 of 4 volume(s) missing or damaged: {named}" in err
    assert "re-copy each of them from the source media" in err
    assert not (tmp_path / "target").exists()  # checked before anything was written


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_join_names_the_one_damaged_volume(damage: str, media: Path, tmp_path: Path) -> None:
    victim = media.parent / f"{CELL}.tar.003"
    if damage == "flip":
        data = bytearray(victim.read_bytes())
        data[-1] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:-1])
    else:
        victim.unlink()
    proc = join("--output", tmp_path / "out.tar", media)
    assert proc.returncode == 1
    assert f"1 of 4 volume(s) missing or damaged: {victim.name}\n" in proc.stderr
    label = {"flip": "ALTERED", "truncate": "TRUNCATED", "delete": "MISSING"}[damage]
    assert f"  {label}" in proc.stderr and victim.name in proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("  ")] == [
        ln for ln in proc.stderr.splitlines() if victim.name in ln and ln.startswith("  ")
    ]
    assert list(tmp_path.glob("*out.tar*")) == []


def test_join_notes_an_unexpected_volume_and_ignores_it(
    media: Path, tmp_path: Path, bundle_tar: Path
) -> None:
    (media.parent / f"{CELL}.tar.005").write_bytes(b"left over from another split")
    proc = join("--output", tmp_path / "out.tar", media)
    assert proc.returncode == 0, proc.stderr
    assert f"note: {CELL}.tar.005 is not listed in {CELL}.volumes; it is ignored" in proc.stderr
    assert (tmp_path / "out.tar").read_bytes() == bundle_tar.read_bytes()


def test_join_refuses_an_incomplete_or_foreign_manifest(media: Path) -> None:
    text = media.read_text()
    media.write_text(text.rsplit("end ", 1)[0])
    proc = join("--check-only", media)
    assert proc.returncode == 1
    assert "is incomplete (no end line): copy <cell>.volumes from the media again" in proc.stderr
    media.write_text(text.replace("gpustack-offline-volumes 1", "gpustack-offline-volumes 2"))
    proc = join("--check-only", media)
    assert "is not a volume manifest of this format" in proc.stderr
    media.write_text(text.replace(f"{CELL}.tar.002", "../etc/passwd"))
    proc = join("--check-only", media)
    assert proc.returncode == 1 and "is malformed: volume" in proc.stderr


@pytest.mark.parametrize("mode", ["--extract", "--output"])
def test_a_join_whose_total_does_not_match_keeps_nothing(
    mode: str, media: Path, tmp_path: Path, bundle_tar: Path
) -> None:
    media.write_text(media.read_text().replace(sha256(bundle_tar), "0" * 64))
    target = tmp_path / "target"
    target.mkdir()
    proc = join(mode, target / CELL if mode == "--output" else target, media)
    assert proc.returncode == 1
    assert f"the joined volumes have sha256 {sha256(bundle_tar)}, the manifest says " in proc.stderr
    assert "nothing was kept" in proc.stderr
    assert list(target.iterdir()) == []


def test_join_script_is_shellcheck_clean() -> None:
    assert shutil.which("shellcheck"), "shellcheck is missing: run scripts/setup-build-host.sh"
    proc = subprocess.run(["shellcheck", str(JOIN)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout


# ---------------------------------------------------------------------------------------------
# A bundle built for real, when dist/ has one


# The smallest bundle a build left under dist/, if any, besides the fixture's (never a skip).
BUILT = sorted((ROOT / "dist").glob("*.tar"), key=lambda p: p.stat().st_size)[:1]


@pytest.mark.parametrize("which", ["fixture", *(p.name for p in BUILT)])
def test_a_built_bundle_splits_and_joins(which: str, bundle_tar: Path, tmp_path: Path) -> None:
    tar = bundle_tar if which == "fixture" else ROOT / "dist" / which
    written = split(tar, parse_size("100M"), tmp_path / "media")
    assert len(written) == -(-tar.stat().st_size // 100_000_000) + 2
    proc = join("--extract", tmp_path / "target", written[-1])
    assert proc.returncode == 0, proc.stderr
    cell = tmp_path / "target" / volumes.stem(tar)
    sums = subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=cell, check=False)
    assert sums.returncode == 0


# ---------------------------------------------------------------------------------------------
# Integration: a real small disk, a clean container


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 5 MB tmpfs (needs root, as the build host runs)."""
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert proc.returncode == 0, f"mounting a tmpfs needs root: {proc.stderr}"
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.integration
def test_join_refuses_without_room_and_consume_needs_one_volume(
    small_disk: Path, bundle_tar: Path
) -> None:
    total = bundle_tar.stat().st_size
    written = split(bundle_tar, 1_000_000, small_disk)  # ~3.1 MB of volumes on 5 MB
    manifest = written[-1]
    free = shutil.disk_usage(small_disk).free
    assert 1_000_000 < free < total
    proc = join("--output", small_disk / "out.tar", manifest)
    assert proc.returncode == 1
    assert (f"not enough space in {small_disk}: {free} bytes free, {total} needed for the "
            f"rebuilt tar; add --consume") in proc.stderr  # fmt: skip
    assert f"free {total - free} more bytes" in proc.stderr
    proc = join("--extract", small_disk / "x", manifest)
    assert proc.returncode == 1 and f"{total} needed for the unpacked bundle" in proc.stderr

    proc = join("--output", small_disk / "out.tar", "--consume", manifest)
    assert proc.returncode == 0, proc.stderr
    assert (small_disk / "out.tar").read_bytes() == bundle_tar.read_bytes()
    assert sorted(p.name for p in small_disk.iterdir()) == sorted(
        ["out.tar", manifest.name, f"{CELL}.join.sh"]
    )


@pytest.mark.integration
def test_join_needs_only_the_clean_base_image(media: Path, tmp_path: Path) -> None:
    """Read-only media, no network, Debian 12 as debootstrap makes it: bash, coreutils, tar."""
    assert shutil.which("docker"), "docker is missing: run scripts/setup-build-host.sh"
    ctx = commands.Context.load(ROOT)
    image = containers.base_image(HOST_ARCH, ctx.cache, ctx.opts.debian_mirror)
    script = (
        f"bash /media/{CELL}.join.sh --extract /target /media/{CELL}.volumes"
        f" && cd /target/{CELL} && sha256sum -c SHA256SUMS"
        f" && bash /media/{CELL}.join.sh --output /target/b.tar /media/{CELL}.volumes"
        f" && sha256sum /target/b.tar"
        f" && ! bash /media/{CELL}.join.sh --output /target/c.tar --consume /media/{CELL}.volumes"
    )
    proc = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "--pull", "never",
         "-v", f"{media.parent}:/media:ro", image, "bash", "-c", script],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all 4 volume(s) intact" in proc.stdout
    assert "manifest.json: OK" in proc.stdout and "sbom.cdx.json: OK" in proc.stdout
    whole = manifest_lines(media)[0][1]
    assert f"{whole}  /target/b.tar" in proc.stdout
    assert "--consume deletes each volume once appended, but /media is read-only" in proc.stderr
