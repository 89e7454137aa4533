from __future__ import annotations

import json
import subprocess
import tarfile

import pytest
from support.bundles import make_wheel

from gpustack_offline.bundle import assemble as bundle
from gpustack_offline.core.errors import IntegrityError
from gpustack_offline.core.files import atomic_dir, atomic_path, sha256_file
from gpustack_offline.core.safety import safe_extract_tar
from gpustack_offline.stages.locks import Lock
from gpustack_offline.stages.wheels import Wheel

LOCK = "bundles/locks/v0.7.1-linux-amd64-cpu-py3.11-base-pip/pylock.toml"


def _assemble(
    matrix, root, tmp_path, cell_id="v0.7.1-linux-amd64-cpu-py3.11-base-pip", lock_path=None
):
    """A real bundle folder around two small stand-in wheels; returns (cell, stage, manifest)."""
    cell = matrix.cell(cell_id)
    files = tmp_path / "cache"
    files.mkdir()
    wheels = []
    for name, version in (("gpustack", "0.7.1"), ("six", "1.17.0")):
        path = make_wheel(files, name, version, "License: MIT")
        wheels.append(
            Wheel(name, version, path.name, sha256_file(path), path, f"https://x/{path.name}")
        )
    stage = tmp_path / "dist" / cell.id
    stage.mkdir(parents=True)
    lock = Lock(lock_path or root / LOCK, cell.id, "d")
    manifest = bundle.assemble(cell, wheels, lock, stage, root)
    return cell, stage, manifest


def test_a_lock_outside_the_project_is_named_by_its_absolute_path(matrix, root, tmp_path):
    """The locks-dir option may point anywhere: the manifest then names the lock absolutely."""
    outside = tmp_path / "locks" / "pylock.toml"
    outside.parent.mkdir()
    outside.write_bytes((root / LOCK).read_bytes())
    _, _, manifest = _assemble(matrix, root, tmp_path, lock_path=outside)
    assert manifest["lock"]["path"] == str(outside.resolve())


def test_bundle_has_manifest_sums_scripts_and_index(matrix, root, tmp_path):
    cell, stage, manifest = _assemble(matrix, root, tmp_path)
    assert manifest["schema_version"] == bundle.SCHEMA_VERSION
    assert manifest["cell"]["id"] == cell.id and manifest["gpustack_version"] == "0.7.1"
    assert manifest["tool"]["name"] == "gpustack-offline" and manifest["tool"]["commit"]
    paths = {f["path"]: f for f in manifest["files"]}
    for required in (
        "install.sh",
        "check-sums.sh",
        "preflight.sh",
        "README.md",
        "README.zh-CN.md",
        "requirements.txt",
        "bundle.env",
        "wheels/simple/index.html",
        "wheels/gpustack-0.7.1-py3-none-any.whl",
    ):
        assert required in paths, required
    assert paths["wheels/six-1.17.0-py3-none-any.whl"]["kind"] == "wheel"
    assert paths["wheels/six-1.17.0-py3-none-any.whl"]["origin"].startswith("https://")
    for entry in manifest["files"]:
        assert sha256_file(stage / entry["path"]) == entry["sha256"]
        assert (stage / entry["path"]).stat().st_size == entry["size"]
    # sha256sum itself accepts the sums file, which covers the manifest too
    subprocess.run(["sha256sum", "-c", "--strict", "--quiet", "SHA256SUMS"], cwd=stage, check=True)
    assert "manifest.json" in (stage / "SHA256SUMS").read_text()
    assert "{{" not in (stage / "README.md").read_text()
    assert json.loads((stage / "manifest.json").read_text()) == manifest


def test_sha256sum_catches_an_altered_wheel(matrix, root, tmp_path):
    cell, stage, _ = _assemble(matrix, root, tmp_path)
    (stage / "wheels/six-1.17.0-py3-none-any.whl").write_bytes(b"evil")
    proc = subprocess.run(
        ["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=stage, capture_output=True, text=True
    )
    assert proc.returncode != 0 and "six-1.17.0-py3-none-any.whl: FAILED" in proc.stdout


def test_windows_bundle_carries_install_ps1_instead_of_shell_scripts(matrix, root, tmp_path):
    _, _, manifest = _assemble(matrix, root, tmp_path, "v0.7.1-windows-amd64-cpu-py3.11-base-pip")
    paths = {f["path"] for f in manifest["files"]}
    assert "install.ps1" in paths and "install.sh" not in paths


def test_tar_holds_the_bundle_folder(matrix, root, tmp_path):
    cell, stage, _ = _assemble(matrix, root, tmp_path)
    tar = tmp_path / "b.tar"
    bundle.write_tar(stage, tar)
    with tarfile.open(tar) as tf:
        names = tf.getnames()
        assert f"{cell.id}/SHA256SUMS" in names and f"{cell.id}/manifest.json" in names
        out = tmp_path / "out"
        safe_extract_tar(tf, out, "b.tar")
    subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=out / cell.id, check=True)


def test_atomic_path_leaves_nothing_under_the_final_name_on_failure(tmp_path):
    final = tmp_path / "x.tar"
    with pytest.raises(RuntimeError), atomic_path(final) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert not final.exists() and list(tmp_path.iterdir()) == []


def test_atomic_dir_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path):
    final = tmp_path / "cell"
    final.mkdir()
    (final / "old").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(final) as stage:
        (stage / "new").write_text("new")
        raise RuntimeError("interrupted")
    assert (final / "old").exists() and not (final / "new").exists()
    with atomic_dir(final) as stage:
        (stage / "new").write_text("new")
    assert [p.name for p in final.iterdir()] == ["new"]


@pytest.mark.parametrize("member", ["../evil", "/etc/evil"])
def test_hostile_archive_members_are_refused(tmp_path, member):
    import io

    tar = tmp_path / "hostile.tar"
    with tarfile.open(tar, "w") as tf:
        info = tarfile.TarInfo(member)
        info.size = 4
        tf.addfile(info, io.BytesIO(b"evil"))
    with tarfile.open(tar) as tf, pytest.raises(IntegrityError, match="refused to unpack"):
        safe_extract_tar(tf, tmp_path / "out", "hostile.tar")


def test_links_escaping_the_destination_are_refused(tmp_path):
    tar = tmp_path / "link.tar"
    with tarfile.open(tar, "w") as tf:
        info = tarfile.TarInfo("bin/escape")
        info.type = tarfile.SYMTYPE
        info.linkname = "../../../etc/passwd"
        tf.addfile(info)
    with tarfile.open(tar) as tf, pytest.raises(IntegrityError, match="bin/escape"):
        safe_extract_tar(tf, tmp_path / "out", "link.tar")
