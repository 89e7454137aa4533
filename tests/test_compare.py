"""Comparing two bundles (folders or tars) and the provenance that makes it meaningful; the
bundles are assembled for real (bundle.assemble) around tiny wheels, see test_sbom.make_bundle."""

from __future__ import annotations

import json
import platform
import tarfile
from pathlib import Path
from typing import Any

import pytest
from support.bundles import CELL, TOOL_PATHS, WHEELS, finish, make_bundle

import gpustack_offline
from gpustack_offline import recipes
from gpustack_offline.bundle import assemble as bundle
from gpustack_offline.bundle import compare, provenance, sbom
from gpustack_offline.core.context import Context
from gpustack_offline.core.files import sha256_file

TOOL_ASSET = TOOL_PATHS[1]


@pytest.fixture(scope="module")
def first(matrix, root, tmp_path_factory) -> Path:
    return make_bundle(matrix, root, tmp_path_factory.mktemp("a"), with_images=False)


def _rewrite(stage: Path, change: Any) -> None:
    """Change a finished bundle's manifest as another build would have made it, re-finished."""
    manifest = json.loads((stage / "manifest.json").read_text())
    change(manifest)
    finish(stage, manifest)


def _unexpected(differences: list[compare.Difference]) -> dict[str, compare.Difference]:
    return {d.what: d for d in differences if not d.expected}


def test_two_builds_of_the_same_inputs_differ_only_in_expected_ways(
    first, matrix, root, tmp_path, capsys
):
    second = make_bundle(matrix, root, tmp_path, with_images=False)

    def elsewhere_later(manifest: dict[str, Any]) -> None:
        manifest["built_at"] = "2030-01-01T00:00:00Z"
        manifest["provenance"]["host"]["machine"] = "elsewhere"
        manifest["tools"]["assets"][0]["url"] = "https://github.com/" + TOOL_ASSET
        manifest["provenance"]["host"]["docker_server"] = "99.0"

    _rewrite(second, elsewhere_later)
    differences = compare.compare(first, second)
    assert _unexpected(differences) == {}
    expected = {d.what for d in differences}
    assert {
        "built_at",
        "provenance.host.machine",
        "provenance.host.docker_server",
        f"tools.assets[{TOOL_ASSET}].url",
        sbom.SBOM_NAME,  # derived from the manifest, so it follows the time
    } == expected
    assert compare.exit_status(differences) == 0
    assert compare.main(first, second) == 0
    out = capsys.readouterr().out
    assert "No differences beyond the expected ones" in out and "built_at" in out


def test_a_changed_wheel_is_named(first, matrix, root, tmp_path):
    second = make_bundle(matrix, root, tmp_path, payload="rebuilt", with_images=False)
    found = _unexpected(compare.compare(first, second))
    six = "wheels/six-1.17.0-py3-none-any.whl"
    assert six in found
    assert found[six].area == "files" and found[six].a and found[six].b
    assert found[six].a != found[six].b
    # what follows from the new wheel: its hash in requirements.txt and in the index
    assert "requirements.txt" in found
    assert not any(w.startswith("wheels/attrs") or w.startswith("wheels/certifi") for w in found)
    assert compare.exit_status(compare.compare(first, second)) == 1


def test_a_removed_file_is_named(first, matrix, root, tmp_path, capsys):
    second = make_bundle(matrix, root, tmp_path, wheels=WHEELS[:2], with_images=False)
    found = _unexpected(compare.compare(first, second))
    certifi = "wheels/certifi-2025.1.31-py3-none-any.whl"
    assert found[certifi].b is None and found[certifi].a
    assert compare.main(first, second) == 1
    assert f"files: {certifi}: removed in B" in capsys.readouterr().out
    # and the other way round it is an added file
    back = _unexpected(compare.compare(second, first))
    assert back[certifi].a is None and str(back[certifi]).startswith(f"files: {certifi}: added")


def test_a_different_lock_is_named(first, matrix, root, tmp_path):
    second = make_bundle(
        matrix, root, tmp_path, lock_text="lock-version = '1.1'\n", with_images=False
    )
    found = _unexpected(compare.compare(first, second))
    lock_rel = f"bundles/locks/{CELL}/pylock.toml"
    assert found["lock.sha256"].area == "lock"
    assert found[f"provenance.inputs[{lock_rel}].sha256"].area == "provenance"
    assert "lock/pylock.toml" in found
    assert found["lock.sha256"].a == json.dumps(sha256_file(first / "lock/pylock.toml"))


def test_a_bundle_tar_is_compared_from_its_manifest(first, tmp_path):
    tar = tmp_path / f"{first.name}.tar"
    bundle.write_tar(first, tar)
    assert compare.compare(first, tar) == []
    assert compare.read_manifest(tar) == json.loads((first / "manifest.json").read_text())
    # a changed image digest in the other bundle's manifest is named
    other = json.loads((first / "manifest.json").read_text())
    other["images"] = [{"reference": "docker.io/x/y:1", "digest": "sha256:" + "1" * 64,
                        "platform": "linux/amd64"}]  # fmt: skip
    mine = {**other, "images": [{**other["images"][0], "digest": "sha256:" + "2" * 64}]}
    (diff,) = compare.compare_manifests(other, mine)
    assert (diff.area, diff.what) == ("images", "images[docker.io/x/y:1 linux/amd64].digest")


def test_what_is_not_a_bundle_is_refused_by_name(tmp_path):
    with pytest.raises(compare.CompareError, match="no manifest.json"):
        compare.compare(tmp_path, tmp_path)
    with pytest.raises(compare.CompareError, match="does not exist"):
        compare.read_manifest(tmp_path / "missing.tar")
    plain = tmp_path / "plain.tar"
    with tarfile.open(plain, "w") as tf:
        tf.add(__file__, arcname="x/other.txt")
    with pytest.raises(compare.CompareError, match="no <cell>/manifest.json"):
        compare.read_manifest(plain)


def test_provenance_records_the_commit_inputs_images_tools_and_host(root, first):
    manifest = json.loads((first / "manifest.json").read_text())
    record = provenance.provenance(
        root,
        [root / "bundles/matrix.toml", root / "bundles/overrides.toml"],
        manifest["tools"],
        [
            {
                "reference": "docker.io/gpustack/gpustack:v0.7.1-cpu",
                "digest": "sha256:" + "a" * 64,
                "platform": "linux/amd64",
            }
        ],  # fmt: skip
    )
    project = record["project"]
    assert project == {
        "name": "gpustack-offline",
        "version": gpustack_offline.__version__,
        "commit": provenance.tool_commit(root),
    }
    assert record["inputs"] == [
        {"path": "bundles/matrix.toml", "sha256": sha256_file(root / "bundles/matrix.toml")},
        {"path": "bundles/overrides.toml", "sha256": sha256_file(root / "bundles/overrides.toml")},
    ]
    assert record["images"][0]["digest"] == "sha256:" + "a" * 64
    assert record["tools"]["archive_sha256"] == manifest["tools"]["sha256"]
    assert {a["url"] for a in record["tools"]["assets"]} == {
        f"https://github.com/{a['path']}" for a in manifest["tools"]["assets"]
    }
    host = record["host"]
    assert (host["system"], host["machine"]) == (platform.system(), platform.machine())
    assert host["python"] == platform.python_version() and host["uv"]
    # a site mirror's base URL is the URL a build names
    assert provenance.tool_url("http://mirror.site/gh/", "a/b") == "http://mirror.site/gh/a/b"


def test_input_files_are_the_cells_lock_overrides_tools_lock_and_matrix(matrix, root):
    ctx = Context.load(root, env={})
    pip = recipes.for_cell(matrix.cell(CELL)).inputs(ctx, matrix.cell(CELL))
    rel = {str(p.relative_to(root)) for p in pip}
    assert {"bundles/matrix.toml", "bundles/overrides.toml"} <= rel
    assert f"bundles/locks/{CELL}/pylock.toml" in rel
    assert all(p.is_file() for p in pip)
