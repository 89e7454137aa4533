"""Rebuild only what changed (`bundle/reuse.py`): the key of a build's inputs and the check of a
finished bundle that decides whether a build may stop there."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from gpustack_offline.bundle import reuse


def finished(tmp_path: Path) -> tuple[Path, Path]:
    """A bundle folder with its SHA256SUMS (and a signature beside the sums), and its tar."""
    folder = tmp_path / "dist" / "cell"
    (folder / "wheels").mkdir(parents=True)
    files = {"bundle.env": b"A=1\n", "wheels/x.whl": b"wheel", "manifest.json": b"{}\n"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    sums = "".join(f"{hashlib.sha256(d).hexdigest()}  {n}\n" for n, d in sorted(files.items()))
    (folder / "SHA256SUMS").write_text(sums)
    (folder / "SHA256SUMS.sig").write_bytes(b"signature")
    tar = tmp_path / "dist" / "cell.tar"
    tar.write_bytes(b"tar bytes")
    return folder, tar


@pytest.fixture
def inputs(tmp_path: Path) -> list[Path]:
    paths = [tmp_path / "matrix.toml", tmp_path / "pylock.toml"]
    for path in paths:
        path.write_text(path.name)
    return paths


def test_an_intact_bundle_with_the_same_inputs_is_unchanged(tmp_path, inputs, root):
    folder, tar = finished(tmp_path)
    key = reuse.inputs_key(root, inputs, None)
    record = reuse.record_path(tmp_path / "dist", "cell")
    reuse.write_record(record, key, tar)

    assert reuse.unchanged(record, reuse.inputs_key(root, inputs, None), folder, tar) == 3


@pytest.mark.parametrize(
    "damage",
    [
        "altered byte",
        "extra file",
        "missing file",
        "tar rewritten",
        "tar gone",
        "no sums",
        "malformed sums line",
    ],
)
def test_a_damaged_bundle_is_not_unchanged(tmp_path, inputs, root, damage):
    folder, tar = finished(tmp_path)
    key = reuse.inputs_key(root, inputs, None)
    record = reuse.record_path(tmp_path / "dist", "cell")
    reuse.write_record(record, key, tar)
    if damage == "altered byte":
        (folder / "wheels/x.whl").write_bytes(b"wheeL")
    elif damage == "extra file":
        (folder / "wheels/y.whl").write_bytes(b"")
    elif damage == "missing file":
        (folder / "bundle.env").unlink()
    elif damage == "tar rewritten":
        os.utime(tar, ns=(1, 1))
    elif damage == "tar gone":
        tar.unlink()
    elif damage == "malformed sums line":
        with (folder / "SHA256SUMS").open("a") as sums:
            sums.write("not a sums line\n")
    else:
        (folder / "SHA256SUMS").unlink()

    assert reuse.unchanged(record, key, folder, tar) is None


def test_a_changed_input_signing_key_or_tool_changes_the_key_and_is_named(tmp_path, inputs, root):
    _, tar = finished(tmp_path)
    record = reuse.record_path(tmp_path / "dist", "cell")
    assert reuse.changed(record, reuse.inputs_key(root, inputs, None)) == ["no earlier build"]
    reuse.write_record(record, reuse.inputs_key(root, inputs, None), tar)

    inputs[1].write_text("moved")
    key = reuse.inputs_key(root, inputs, None)
    assert reuse.changed(record, key) == [str(inputs[1])]
    signing = tmp_path / "release.key"
    signing.write_bytes(b"key")
    assert "signing key" in reuse.changed(record, reuse.inputs_key(root, inputs, signing))
    assert reuse.inputs_key(root, inputs, None)["tool"] == reuse.tool_digest(root)


def test_the_tool_digest_follows_the_scripts_a_bundle_carries(tmp_path):
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "install.sh").write_text("echo one\n")
    before = reuse.tool_digest(tmp_path)
    (tmp_path / "scripts" / "install.sh").write_text("echo two\n")
    assert reuse.tool_digest(tmp_path) != before


def test_a_forgotten_or_foreign_record_vouches_for_nothing(tmp_path, inputs, root):
    folder, tar = finished(tmp_path)
    key = reuse.inputs_key(root, inputs, None)
    record = reuse.record_path(tmp_path / "dist", "cell")
    reuse.write_record(record, key, tar)
    reuse.forget(record)
    assert reuse.unchanged(record, key, folder, tar) is None
    record.write_text('{"schema": 99, "inputs": {}}')
    assert reuse.unchanged(record, key, folder, tar) is None
    record.write_text("not json")
    assert reuse.changed(record, key) == ["no earlier build"]
