"""The tools stage for real: upstream's `gpustack download-tools` of each release, run from a tool
venv, fetching from the loopback release mirror through the checking proxy.

The tool venvs come from PyPI (cached by content under the cache dir); the assets come only from
127.0.0.1. The final proof against a running worker is in test_integration.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from support.release_mirror import ReleaseMirror, write_fixture_locks

from gpustack_offline.core.cache import in_use
from gpustack_offline.core.downloads import BlobStore
from gpustack_offline.core.errors import IntegrityError, ToolsError
from gpustack_offline.core.options import resolve
from gpustack_offline.stages import tools
from gpustack_offline.stages.locks import load_overrides

pytestmark = pytest.mark.integration

LLAMA_BOX = "gpustack/llama-box/releases/download"
# cell -> (the folder the target's worker looks for, or None for 0.6's flat layout; llama-box asset)
CASES = {
    "v0.7.1-linux-arm64-cpu-py3.11-base-pip": (
        "llama-box-v0.0.171-linux-arm64",
        f"{LLAMA_BOX}/v0.0.171/dl-llama-box-linux-arm64-cpu.zip",
    ),
    "v0.7.1-linux-amd64-cpu-py3.11-base-pip": (
        "llama-box-v0.0.171-linux-amd64",
        f"{LLAMA_BOX}/v0.0.171/dl-llama-box-linux-amd64-cpu.zip",
    ),
    "v0.7.1-linux-amd64-cuda12.4-py3.11-base-pip": (
        "llama-box-v0.0.171-linux-amd64-cuda",
        f"{LLAMA_BOX}/v0.0.171/dl-llama-box-linux-amd64-cuda-12.4.zip",
    ),
    "v0.7.1-linux-arm64-cuda12.8-py3.11-base-pip": (
        "llama-box-v0.0.171-linux-arm64-cuda",
        f"{LLAMA_BOX}/v0.0.171/dl-llama-box-linux-arm64-cuda-12.8.zip",
    ),
    "v0.7.1-windows-amd64-cuda12.8-py3.11-base-pip": (
        "llama-box-v0.0.171-windows-amd64-cuda",
        f"{LLAMA_BOX}/v0.0.171/dl-llama-box-windows-amd64-cuda-12.8.zip",
    ),
    "v0.6.2-linux-arm64-cuda12.4-py3.11-base-pip": (
        None,
        f"{LLAMA_BOX}/v0.0.154/llama-box-linux-arm64-cuda-12.4.zip",
    ),
    "v0.6.2-linux-amd64-cpu-py3.11-base-pip": (
        None,
        f"{LLAMA_BOX}/v0.0.154/llama-box-linux-amd64-avx2.zip",
    ),
    # accelerators: the build for the device, its toolkit version and (Ascend) its chip (the
    # 910b build of 0.7.1 is test_integration.py's arm64 Ascend cell)
    "v0.7.1-linux-arm64-cann8.2.rc1-310p-py3.11-base-pip": (
        "llama-box-v0.0.171-linux-arm64-npu",
        f"{LLAMA_BOX}/v0.0.171/dl-llama-box-linux-arm64-cann-8.2.rc1-310p.zip",
    ),
    "v0.7.1-linux-amd64-dtk25.04-py3.11-base-pip": (
        "llama-box-v0.0.171-linux-amd64-dcu",
        f"{LLAMA_BOX}/v0.0.171/dl-llama-box-linux-amd64-dtk-25.04.zip",
    ),
    "v0.6.2-linux-amd64-cann8.0-310p-py3.11-base-pip": (
        None,
        f"{LLAMA_BOX}/v0.0.154/llama-box-linux-amd64-cann-8.0-310p.zip",
    ),
}


@pytest.fixture(scope="module")
def setting(root, release_mirror, tmp_path_factory):
    opts = resolve(root)
    locks = write_fixture_locks(release_mirror.root, tmp_path_factory.mktemp("tools-locks"))
    return {
        "cache": opts.path("cache_dir", root),
        "locks_dir": locks,
        "overrides": load_overrides(opts.path("overrides", root)),
        "index_url": opts.index_url,
    }


def build(cell, setting, base_url, frozen=True, **changes):
    args = {**setting, **changes}
    # as a build does (commands.build): a build of another session on the same cache then
    # leaves this one's scratch alone instead of sweeping it as a killed build's
    with in_use(args["cache"]):
        return tools.build(cell, base_url=base_url, frozen=frozen, **args)


def members(archive: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(archive) as tf:
        return {m.name: m for m in tf.getmembers()}


def read(archive: Path, name: str) -> bytes:
    with tarfile.open(archive) as tf:
        fh = tf.extractfile(name)
        assert fh is not None
        return fh.read()


@pytest.mark.parametrize("cell_id", list(CASES))
def test_the_archive_is_what_the_targets_worker_looks_for(matrix, setting, release_mirror, cell_id):
    cell = matrix.cell(cell_id)
    folder, asset = CASES[cell_id]
    archive = build(cell, setting, release_mirror.base_url)

    # upstream's download-tools fetched the cell's own llama-box build, and the sums are recorded
    fetched = {a.path: a.sha256 for a in archive.assets}
    assert fetched[asset] == release_mirror.sha256(asset)
    assert all(release_mirror.sha256(p) == sha for p, sha in fetched.items())
    assert archive.llama_box_dir == folder
    # ... which is the one upstream's worker of the target picks (the probe asked its code)
    assert archive.llama_box_asset == asset

    names = members(archive.path)
    versions = json.loads(read(archive.path, "versions.json"))
    exe = ".exe" if cell.os == "windows" else ""
    toolkit = asset.rsplit("/", 1)[1].removesuffix(".zip").split(f"{cell.os}-{cell.arch}-")[1]
    if folder is None:  # 0.6: one flat folder, keyed by the file name
        assert versions[f"llama-box{exe}"] == "v0.0.154"
        binary = f"llama-box/llama-box{exe}"
    else:
        assert versions[folder] == "v0.0.171"
        assert [k for k in versions if k.startswith("llama-box-")] == [folder]
        binary = f"llama-box/{folder}/llama-box{exe}"
        default = names["llama-box/llama-box-default"]
        if cell.os == "linux":
            assert default.issym() and default.linkname == folder
    # the binary inside is the asset built for the target, whatever machine made the archive
    # (the build itself proved, with the release's own worker code, that nothing is missing)
    assert f"{cell.os}-{cell.arch}-{toolkit}".encode() in read(archive.path, binary)


def test_an_archive_saved_here_for_an_arm64_target_is_fixed_not_shipped_as_is(
    matrix, setting, release_mirror
):
    """download-tools names the llama-box folder after the build host (amd64, no GPU)."""
    cell = matrix.cell("v0.7.1-linux-arm64-cuda12.8-py3.11-base-pip")
    archive = build(cell, setting, release_mirror.base_url)
    assert archive.retargeted_from and archive.retargeted_from.startswith(
        "llama-box-v0.0.171-linux-amd64"
    )
    assert archive.wanted_before_fix == [
        f"{LLAMA_BOX}/v0.0.171/dl-llama-box-linux-arm64-cuda-12.8.zip"
    ]
    assert archive.manifest()["retargeted_from"] == archive.retargeted_from


def test_a_second_build_fetches_nothing_and_gives_the_same_bytes(matrix, setting, release_mirror):
    cell = matrix.cell("v0.7.1-linux-arm64-cpu-py3.11-base-pip")
    first = build(cell, setting, release_mirror.base_url)
    seen = len(release_mirror.requests)
    second = build(cell, setting, release_mirror.base_url)
    assert len(release_mirror.requests) == seen
    assert second.sha256 == first.sha256


@pytest.fixture
def own_mirror(release_mirror, tmp_path):
    root = tmp_path / "mirror"
    shutil.copytree(release_mirror.root, root)
    with ReleaseMirror(root) as mirror:
        yield mirror


def test_a_changed_upstream_asset_stops_the_build_and_is_not_kept(matrix, setting, own_mirror):
    cell = matrix.cell("v0.6.2-linux-amd64-cuda12.8-py3.11-base-pip")
    asset = f"{LLAMA_BOX}/v0.0.154/llama-box-linux-amd64-cuda-12.8.zip"
    store = BlobStore(setting["cache"])
    store.path(own_mirror.sha256(asset)).unlink(missing_ok=True)  # not cached: it must be fetched
    own_mirror.replace(asset, b"PK\x05\x06" + b"\x00" * 18)
    changed = own_mirror.sha256(asset)
    with pytest.raises(ToolsError) as err:
        build(cell, setting, own_mirror.base_url)
    assert asset in str(err.value) and "does not match the locked" in str(err.value)
    assert not store.path(changed).exists()


def test_a_frozen_build_refuses_an_asset_missing_from_the_lock(
    matrix, setting, release_mirror, tmp_path
):
    cell = matrix.cell("v0.7.1-linux-amd64-cpu-py3.11-base-pip")
    with pytest.raises(ToolsError, match=r"gpustack-0\.7\.1\.toml and the build is frozen"):
        build(cell, setting, release_mirror.base_url, locks_dir=tmp_path)


def test_an_unfrozen_build_records_new_assets_in_the_lock(
    matrix, setting, release_mirror, tmp_path
):
    cell = matrix.cell("v0.7.1-linux-amd64-cpu-py3.11-base-pip")
    archive = build(cell, setting, release_mirror.base_url, frozen=False, locks_dir=tmp_path)
    lock = tools.ToolsLock(tools.lock_path(tmp_path, "0.7.1"), frozen=True)
    assert {a.path for a in archive.assets} == set(lock.entries)
    assert all(lock.expected(a.path) == a.sha256 for a in archive.assets)


def test_a_mirror_without_the_asset_is_named_in_the_error(matrix, setting, own_mirror, tmp_path):
    cell = matrix.cell("v0.7.1-linux-amd64-cuda12.8-py3.11-base-pip")
    asset = f"{LLAMA_BOX}/v0.0.171/dl-llama-box-linux-amd64-cuda-12.8.zip"
    BlobStore(setting["cache"]).path(own_mirror.sha256(asset)).unlink(missing_ok=True)
    (own_mirror.root / asset).unlink()
    with pytest.raises((IntegrityError, ToolsError)) as err:
        build(cell, setting, own_mirror.base_url, frozen=False, locks_dir=tmp_path)
    assert "answered 404" in str(err.value) and asset in str(err.value)
    assert not (tmp_path / "gpustack-0.7.1.toml").exists()


PARSER = "gpustack/gguf-parser-go/releases/download/v0.22.1/gguf-parser-linux-amd64"
HTML_PAGE = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body></body></html>\n"


@pytest.mark.parametrize(
    ("served_from", "kind"),
    [(None, "an HTML page"), (PARSER.replace("amd64", "arm64"), "an ELF for aarch64")],
    ids=["html-page", "arm64-build"],
)
def test_a_new_asset_that_is_no_program_for_the_target_stops_the_first_build(
    matrix, setting, own_mirror, tmp_path, served_from, kind
):
    """A mirror answers 200 with a sign-in page, or with another machine's build, for an asset
    the lock does not list yet: refused with the URL, what it is and what was expected;
    nothing is recorded in the lock and the file is not kept."""
    cell = matrix.cell("v0.7.1-linux-amd64-cpu-py3.11-base-pip")
    served = HTML_PAGE if served_from is None else (own_mirror.root / served_from).read_bytes()
    own_mirror.replace(PARSER, served)
    cache = tmp_path / "cache"  # no asset cached (the tool venv is the shared one's)
    (cache / "tools").mkdir(parents=True)
    (cache / "tools" / "venv").symlink_to(setting["cache"] / "tools" / "venv")
    with pytest.raises(ToolsError) as err:
        build(cell, setting, own_mirror.base_url, frozen=False, locks_dir=tmp_path, cache=cache)
    message = str(err.value)
    assert own_mirror.url(PARSER) in message
    assert f"answered {kind} (status 200)" in message and "an ELF for x86_64" in message
    assert "machine None" not in message
    assert not (tmp_path / "gpustack-0.7.1.toml").exists()
    assert not BlobStore(cache).path(hashlib.sha256(served).hexdigest()).exists()
    assert not list((cache / "tools" / "archives").glob("*/archive.json"))


def test_an_unfrozen_build_says_how_many_assets_it_recorded(
    matrix, setting, release_mirror, tmp_path, caplog
):
    cell = matrix.cell("v0.7.1-linux-amd64-cpu-py3.11-base-pip")
    build(cell, setting, release_mirror.base_url, frozen=False, locks_dir=tmp_path)
    path = tools.lock_path(tmp_path, "0.7.1")
    assert f"recorded 3 new assets in {path}" in caplog.messages
    caplog.clear()
    build(cell, setting, release_mirror.base_url, frozen=False, locks_dir=tmp_path)
    assert not [m for m in caplog.messages if m.startswith("recorded")]


def test_a_cached_record_missing_an_asset_is_made_again_not_shipped_again(
    matrix, setting, release_mirror, caplog
):
    """What two builds sharing the tool venv left before it was serialised: the archive holds
    fastfetch, its record lists two assets; every later build copied the record."""
    cell = matrix.cell("v0.7.1-linux-amd64-cpu-py3.11-base-pip")
    first = build(cell, setting, release_mirror.base_url)
    record_file = first.path.with_name("archive.json")
    record = json.loads(record_file.read_text())
    record["assets"] = [a for a in record["assets"] if "/fastfetch/" not in a["path"]]
    record_file.write_text(json.dumps(record))
    again = build(cell, setting, release_mirror.base_url)
    assert "holds fastfetch but its record lists no asset for it" in caplog.text
    assert {tools.asset_program(a.path) for a in again.assets} == set(tools.PROGRAMS)
    assert len(json.loads(record_file.read_text())["assets"]) == 3
    assert "fastfetch/fastfetch" in members(again.path)
