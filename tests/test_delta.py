"""Delta bundles and upgrades on the site: the inventory `install.sh --inventory` writes, a delta
made against it (or against an earlier bundle or its manifest), the delta applied by the real
install.sh from the pieces the site kept, a piece missing or altered refused before anything
changes, and `--rollback` with the database copy taken at the upgrade."""

from __future__ import annotations

import json
import os
import sqlite3
import tarfile
from pathlib import Path

import pytest
from test_scripts import (
    assert_installed,
    build_gpustack_wheel,
    install,
    make_bundle,
    release_name,
    save_tools_archive,
    sha256_file,
    tools_folder,
)

from gpustack_offline.bundle import delta
from gpustack_offline.bundle.errors import DeltaError
from gpustack_offline.bundle.release import read_sums


def tools_archive(where: Path, marker: str) -> Path:
    folder = tools_folder(where / "src")
    (folder / "marker").write_text(marker)  # another archive, same layout
    return save_tools_archive(folder, where / "tools.tar.gz")


@pytest.fixture(scope="module")
def gpustack_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_gpustack_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture
def pair(tmp_path: Path, gpustack_wheel: Path) -> tuple[Path, Path]:
    """An old and a new bundle sharing the GPUStack wheel, each with its own tools archive."""
    old = make_bundle(
        tmp_path / "old", gpustack_wheel, tools_archive=tools_archive(tmp_path / "t1", "old")
    )
    new = make_bundle(
        tmp_path / "new", gpustack_wheel, tools_archive=tools_archive(tmp_path / "t2", "new"),
        TARGET_EXTRAS="audio",
    )  # fmt: skip
    return old, new


# --- the delta itself -----------------------------------------------------------------------


def test_a_delta_against_an_earlier_bundle_leaves_out_only_what_it_holds(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    old, new = pair
    base = delta.read_base(old)
    made = delta.make(new, base, tmp_path / "delta", tmp_path / "delta.tar")

    sums = read_sums(new / "SHA256SUMS")
    (wheel,) = [p for p in sums if p.endswith(".whl")]
    assert not (made.directory / wheel).exists()  # the site has it
    assert (made.directory / "tools/gpustack-tools.tar.gz").is_file()  # new bytes
    # every other file of the new bundle, the sums and manifest unchanged
    for path in sums:
        if path != wheel:
            assert (made.directory / path).read_bytes() == (new / path).read_bytes()
    assert (made.directory / "SHA256SUMS").read_bytes() == (new / "SHA256SUMS").read_bytes()
    record = json.loads((made.directory / delta.BASE_FILE).read_text())
    assert record["left_out"] == [
        {"path": wheel, "sha256": sums[wheel], "size": (new / wheel).stat().st_size}
    ]
    assert record["base"]["kind"] == "bundle"
    assert made.floor == sum(
        (new / p).stat().st_size
        for p, d in sums.items()
        if d not in set(read_sums(old / "SHA256SUMS").values())
    )
    assert made.carried < made.full
    with tarfile.open(made.tar) as tar:
        names = {m.name for m in tar.getmembers() if m.isfile()}
    assert wheel not in {n.split("/", 1)[-1] for n in names}


def test_the_same_base_read_from_a_tar_and_from_a_manifest(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    old, _ = pair
    tar = tmp_path / "old.tar"
    with tarfile.open(tar, "w") as out:
        out.add(old, arcname=old.name)
    manifest = tmp_path / "manifest.json"
    sums = read_sums(old / "SHA256SUMS")
    manifest.write_text(
        json.dumps(
            {"cell": {"id": "x"}, "files": [{"path": p, "sha256": d} for p, d in sums.items()]}
        )
    )
    assert delta.read_base(tar).digests == delta.read_base(old).digests
    assert delta.read_base(manifest).digests == frozenset(sums.values())


@pytest.mark.parametrize("content", ["not json", '{"some": "thing"}', "missing"])
def test_a_base_that_is_none_of_those_is_one_clear_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "base.json"
    if content != "missing":
        path.write_text(content)
    with pytest.raises(DeltaError, match="give `--since` an inventory written by"):
        delta.read_base(path)


# --- on the site ----------------------------------------------------------------------------


@pytest.mark.target
def test_a_delta_from_the_sites_inventory_installs_from_the_pieces_it_kept(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    old, new = pair
    prefix = tmp_path / "prefix"
    data = tmp_path / "data"
    assert install(old, prefix, "--data-dir", str(data)).returncode == 0

    inventory = tmp_path / "inventory.json"
    proc = install(old, prefix, "--inventory", str(inventory))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    held = json.loads(inventory.read_text())
    assert held["kind"] == "gpustack-offline-inventory"
    assert [b["release"] for b in held["bundles"]] == [release_name(old)]
    old_sums = read_sums(old / "SHA256SUMS")
    kept = {d for p, d in old_sums.items() if p.endswith((".whl", ".tar.gz"))}
    assert set(held["files"]) == kept

    made = delta.make(new, delta.read_base(inventory), tmp_path / "delta")
    proc = install(made.directory, prefix, "--data-dir", str(data))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "delta bundle (base.json): taking the pieces it left out" in proc.stdout
    assert_installed(prefix, made.directory)
    assert release_name(made.directory) == release_name(new)  # the same signed sums
    assert os.readlink(prefix / "previous") == f"releases/{release_name(old)}"


@pytest.mark.target
def test_a_delta_whose_piece_the_site_lacks_or_altered_is_refused_before_any_change(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    old, new = pair
    made = delta.make(new, delta.read_base(old), tmp_path / "delta")
    (wheel,) = [p for p in read_sums(new / "SHA256SUMS") if p.endswith(".whl")]

    empty = tmp_path / "empty-prefix"  # a site that never installed the base
    proc = install(made.directory, empty)
    assert proc.returncode == 3
    assert f"install.sh: missing piece: {wheel} (sha256 " in proc.stderr
    assert "nothing was changed" in proc.stderr
    assert not (empty / "current").exists() and not (empty / "releases").exists()

    prefix = tmp_path / "prefix"
    assert install(old, prefix).returncode == 0
    kept = prefix / "store/sha256" / sha256_file(new / wheel)
    altered = bytearray(kept.read_bytes())
    altered[len(altered) // 2] ^= 0x01
    kept.unlink()  # the store's copy is a hard link of the old bundle's: replace, not write
    kept.write_bytes(bytes(altered))
    before = os.readlink(prefix / "current")
    proc = install(made.directory, prefix)
    assert proc.returncode == 3
    assert (
        f"{wheel} (sha256 {sha256_file(new / wheel)}): the copy in {prefix}/store/sha256 is altered"
        in proc.stderr
    )
    assert os.readlink(prefix / "current") == before
    assert not (made.directory / wheel).exists()  # the bad copy was not left in the bundle


@pytest.mark.target
def test_an_upgrade_copies_the_database_and_rollback_restores_it(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    old, new = pair
    prefix, data = tmp_path / "prefix", tmp_path / "data"
    data.mkdir()
    assert install(old, prefix, "--data-dir", str(data)).returncode == 0
    write_state(data / "database.db", "state of the old release")

    proc = install(new, prefix, "--data-dir", str(data))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    backup = prefix / "backups" / release_name(old) / "database.db"
    assert read_state(backup) == "state of the old release"
    write_state(data / "database.db", "migrated forward by the new release")

    proc = install(new, prefix, "--rollback", "--data-dir", str(data))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert os.readlink(prefix / "current") == f"releases/{release_name(old)}"
    assert os.readlink(prefix / "previous") == f"releases/{release_name(new)}"
    assert read_state(data / "database.db") == "state of the old release"
    (kept,) = data.glob("database.db.before-rollback.*")
    assert read_state(kept) == "migrated forward by the new release"


def write_state(db: Path, text: str) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS state (text TEXT)")
        conn.execute("DELETE FROM state")
        conn.execute("INSERT INTO state VALUES (?)", (text,))
    conn.close()


def read_state(db: Path) -> str:
    with sqlite3.connect(db) as conn:
        (row,) = conn.execute("SELECT text FROM state").fetchall()
    conn.close()
    return str(row[0])


@pytest.mark.target
def test_rollback_with_nothing_before_says_so(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    old, _ = pair
    prefix = tmp_path / "prefix"
    assert install(old, prefix).returncode == 0
    proc = install(old, prefix, "--rollback")
    assert proc.returncode == 6
    assert f"no previous release is recorded in {prefix}" in proc.stderr
