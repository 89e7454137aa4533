"""The tools stage without the network: the lock, the retargeting and the archive's bytes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from gpustack_offline.core.errors import IntegrityError, ToolsError
from gpustack_offline.stages import tools


def make_tree(root: Path, folder: str = "llama-box-v0.0.171-linux-amd64") -> Path:
    """The layout GPUStack 0.7's download-tools writes, with the host's folder name."""
    box = root / "llama-box" / folder
    box.mkdir(parents=True)
    (box / "llama-box").write_bytes(b"\x7fELF fake")
    os.chmod(box / "llama-box", 0o755)
    (box / "llama-box-rpc-server").symlink_to("llama-box")
    (root / "llama-box" / "llama-box-default").symlink_to(folder)
    (root / "gguf-parser").mkdir()
    (root / "gguf-parser" / "gguf-parser").write_bytes(b"parser")
    versions = {folder: "v0.0.171", "gguf-parser": "v0.22.1", "fastfetch": "2.25.0.1"}
    (root / "versions.json").write_text(json.dumps(versions))
    return root


def test_retarget_renames_the_folder_its_version_key_and_the_default_link(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t")
    old = tools.retarget(tree, "llama-box-v0.0.171-linux-arm64-cuda")
    assert old == "llama-box-v0.0.171-linux-amd64"
    box = tree / "llama-box"
    assert sorted(p.name for p in box.iterdir()) == [
        "llama-box-default",
        "llama-box-v0.0.171-linux-arm64-cuda",
    ]
    assert os.readlink(box / "llama-box-default") == "llama-box-v0.0.171-linux-arm64-cuda"
    assert (box / "llama-box-default" / "llama-box-rpc-server").resolve().name == "llama-box"
    versions = json.loads((tree / "versions.json").read_text())
    assert versions == {
        "llama-box-v0.0.171-linux-arm64-cuda": "v0.0.171",
        "gguf-parser": "v0.22.1",
        "fastfetch": "2.25.0.1",
    }


def test_retarget_leaves_a_right_archive_alone(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t")
    assert tools.retarget(tree, "llama-box-v0.0.171-linux-amd64") is None
    assert os.readlink(tree / "llama-box" / "llama-box-default") == "llama-box-v0.0.171-linux-amd64"


def test_retarget_refuses_an_archive_with_two_llama_box_folders(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t")
    (tree / "llama-box" / "llama-box-v0.0.170-linux-amd64").mkdir()
    with pytest.raises(ToolsError, match="expected one llama-box folder"):
        tools.retarget(tree, "llama-box-v0.0.171-linux-arm64")


def test_archives_are_byte_identical_whatever_the_file_times(tmp_path: Path) -> None:
    one = make_tree(tmp_path / "one")
    two = make_tree(tmp_path / "two")
    for path in two.rglob("*"):
        if not path.is_symlink():
            os.utime(path, (1_000_000, 1_000_000))
    tools.write_archive(one, tmp_path / "one.tar.gz")
    tools.write_archive(two, tmp_path / "two.tar.gz")
    assert (tmp_path / "one.tar.gz").read_bytes() == (tmp_path / "two.tar.gz").read_bytes()
    with tarfile.open(tmp_path / "one.tar.gz") as tf:
        members = {m.name: m for m in tf.getmembers()}
    link = members["llama-box/llama-box-default"]
    assert link.issym() and link.linkname == "llama-box-v0.0.171-linux-amd64"
    assert members["llama-box/llama-box-v0.0.171-linux-amd64/llama-box"].mode == 0o755
    assert members["gguf-parser/gguf-parser"].mode == 0o644
    assert all(m.uid == 0 and m.mtime == 0 for m in members.values())


def test_an_archive_with_a_fifo_is_refused_and_leaves_no_file(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t")
    os.mkfifo(tree / "gguf-parser" / "pipe")
    final = tmp_path / "out" / "gpustack-tools.tar.gz"
    with pytest.raises(ToolsError, match="pipe"):
        tools.write_archive(tree, final)
    assert list(final.parent.iterdir()) == []


def lock_file(tmp_path: Path, entries: dict[str, tuple[str, int]]) -> Path:
    lock = tools.ToolsLock(tmp_path / "gpustack-0.7.1.toml", frozen=False)
    for path, (sha, size) in entries.items():
        lock.record(tools.Asset(path, sha, size))
    lock.save("0.7.1")
    return lock.path


def test_the_lock_round_trips_and_refuses_a_changed_asset(tmp_path: Path) -> None:
    asset = "gpustack/gguf-parser-go/releases/download/v0.22.1/gguf-parser-linux-arm64"
    path = lock_file(tmp_path, {asset: ("a" * 64, 10)})
    text = path.read_text()
    assert text.startswith("# sha256 of every release asset") and asset in text
    lock = tools.ToolsLock(path, frozen=True)
    assert lock.expected(asset) == "a" * 64
    with pytest.raises(IntegrityError) as err:
        lock.record(tools.Asset(asset, "b" * 64, 10))
    assert asset in str(err.value) and "a" * 64 in str(err.value) and "b" * 64 in str(err.value)


def test_a_frozen_lock_refuses_an_asset_it_does_not_list(tmp_path: Path) -> None:
    path = lock_file(tmp_path, {})
    lock = tools.ToolsLock(path, frozen=True)
    with pytest.raises(ToolsError, match="not in .*frozen"):
        lock.expected("gpustack/fastfetch/releases/download/2.25.0.1/fastfetch-linux-amd64.zip")
    assert tools.ToolsLock(path, frozen=False).expected("anything") is None


def test_a_malformed_lock_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "gpustack-0.7.1.toml"
    path.write_text("[assets\n")
    with pytest.raises(ToolsError, match=str(path)):
        tools.ToolsLock(path, frozen=False)


def test_download_env_keeps_host_settings_out_and_sets_the_cells_cuda(matrix) -> None:
    host = {
        "PATH": "/usr/bin",
        "CUDA_VERSION": "11.8",
        "GPUSTACK_DISABLE_DYNAMIC_LINK_LLAMA_BOX": "true",
        "GPUSTACK_TOOLS_DOWNLOAD_BASE_URL": "http://elsewhere",
        "CANN_VERSION": "8.0",
    }
    cuda = matrix.cell("v0.7.1-linux-arm64-cuda12.8-py3.11-base-pip")
    assert tools.download_env(cuda, host) == {"PATH": "/usr/bin", "CUDA_VERSION": "12.8"}
    cpu = matrix.cell("v0.7.1-linux-arm64-cpu-py3.11-base-pip")
    assert tools.download_env(cpu, host) == {"PATH": "/usr/bin"}
    # an Ascend target's CANN version and chip, as its worker reads them
    npu = matrix.cell("v0.7.1-linux-arm64-cann8.2.rc1-310p-py3.11-base-pip")
    assert tools.download_env(npu, host) == {
        "PATH": "/usr/bin", "CANN_VERSION": "8.2.rc1", "CANN_CHIP": "310p"
    }  # fmt: skip
    dcu = matrix.cell("v0.7.1-linux-amd64-dtk25.04-py3.11-base-pip")
    assert tools.download_env(dcu, host) == {"PATH": "/usr/bin"}  # one DTK build: none read


@pytest.mark.parametrize(
    ("cell_id", "identity"),
    [
        ("v0.7.1-linux-arm64-cpu-py3.11-base-pip", ("linux", "arm64", "")),
        ("v0.7.1-linux-amd64-cuda12.4-py3.11-base-pip", ("linux", "amd64", "cuda")),
        ("v0.6.2-windows-amd64-cuda12.8-py3.11-audio-pip", ("windows", "amd64", "cuda")),
        ("v0.7.1-linux-arm64-cann8.2.rc1-910b-py3.11-base-pip", ("linux", "arm64", "npu")),
        ("v0.7.1-linux-amd64-rocm6.2-py3.11-audio-pip", ("linux", "amd64", "rocm")),
        ("v0.7.1-linux-amd64-musarc4.2-py3.11-base-pip", ("linux", "amd64", "musa")),
        ("v0.6.2-linux-amd64-dtk24.04-py3.11-base-pip", ("linux", "amd64", "dcu")),
    ],
)
def test_the_target_identity_is_the_cells_not_the_build_hosts(matrix, cell_id, identity) -> None:
    got = tools.target_identity(matrix.cell(cell_id))
    assert (got["system"], got["arch"], got["device"]) == identity


def test_the_manifest_lists_every_asset_sorted(tmp_path: Path) -> None:
    assets = [tools.Asset("b/x", "1" * 64, 3, "http://m/b/x"), tools.Asset("a/y", "2" * 64, 4)]
    archive = tools.Archive(
        tmp_path / "a.tar.gz", "f" * 64, assets, "llama-box-v0.0.171-linux-arm64", "old", ""
    )
    info = archive.manifest()
    assert [a["path"] for a in info["assets"]] == ["a/y", "b/x"]
    assert info["archive"] == "tools/gpustack-tools.tar.gz"
    assert "github.com" in info["base_url"]
    json.dumps(info)  # it goes into manifest.json as it is


def test_tar_reader_rejects_what_write_archive_would_never_write(tmp_path: Path) -> None:
    """The build unpacks download-tools' own archive through the safe extractor."""
    from gpustack_offline.core.safety import safe_extract_tar

    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as tf:
        info = tarfile.TarInfo("../escape")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    with tarfile.open(bad) as tf, pytest.raises(IntegrityError, match="escape"):
        safe_extract_tar(tf, tmp_path / "out", "download-tools archive")


# -- what each program of an archive is ---------------------------------------------------------


def elf(machine: int) -> bytes:
    """The first bytes of a 64-bit little-endian ELF executable for `machine`."""
    return (
        b"\x7fELF\x02\x01\x01"
        + bytes(9)
        + (2).to_bytes(2, "little")
        + machine.to_bytes(2, "little")
    )


HTML = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>mirror</body></html>\n"


def pe(machine: int) -> bytes:
    from support.release_mirror import pe_stub

    data = bytearray(pe_stub("fixture"))
    data[0x84:0x86] = machine.to_bytes(2, "little")  # the COFF header follows the 0x80 DOS stub
    return bytes(data)


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (elf(62) + bytes(100), "an ELF for x86_64"),
        (elf(183) + bytes(100), "an ELF for aarch64"),
        (elf(8) + bytes(100), "an ELF for machine 8"),
        (pe(0x8664), "a PE for x86_64"),
        (pe(0xAA64), "a PE for aarch64"),
        (HTML, "an HTML page"),
        (b"  <html><body>404</body></html>", "an HTML page"),
        (b"PK\x03\x04" + bytes(30), "a zip archive"),
        (b"Not Found\n", "a text file"),
        (b"", "an empty file"),
        (bytes(range(8)) * 4, "data (it starts with 00 01 02 03 04 05 06 07)"),
    ],
)
def test_a_file_is_named_for_what_it_is_never_an_elf_of_machine_none(
    tmp_path: Path, data: bytes, kind: str
) -> None:
    path = tmp_path / "f"
    path.write_bytes(data)
    assert tools.file_kind(path) == kind


@pytest.mark.parametrize(
    ("cell_id", "expected"),
    [
        ("v0.7.1-linux-amd64-cpu-py3.11-base-pip", "an ELF for x86_64"),
        ("v0.7.1-linux-arm64-cuda12.8-py3.11-base-pip", "an ELF for aarch64"),
        ("v0.7.1-windows-amd64-cuda12.8-py3.11-base-pip", "a PE for x86_64"),
    ],
)
def test_the_programs_must_be_executables_for_the_target(matrix, cell_id, expected) -> None:
    assert tools.expected_program(matrix.cell(cell_id)) == expected


LLAMA_BOX_ASSET = "gpustack/llama-box/releases/download/v0.0.171/dl-llama-box-linux-amd64-cpu.zip"
PARSER_ASSET = "gpustack/gguf-parser-go/releases/download/v0.22.1/gguf-parser-linux-amd64"
FASTFETCH_ASSET = "gpustack/fastfetch/releases/download/2.25.0.1/fastfetch-linux-amd64.zip"


def program_tree(root: Path, parser: bytes) -> Path:
    """An unpacked 0.7 archive for linux/amd64 whose gguf-parser is `parser`."""
    tree = make_tree(root)
    (tree / "llama-box" / "llama-box-v0.0.171-linux-amd64" / "llama-box").write_bytes(elf(62))
    (tree / "gguf-parser" / "gguf-parser").write_bytes(parser)
    (tree / "fastfetch").mkdir()
    (tree / "fastfetch" / "fastfetch").write_bytes(elf(62))
    return tree


def proxy_that_fetched(tmp_path: Path, parser: bytes, url: str) -> tools.AssetProxy:
    from gpustack_offline.core.downloads import BlobStore

    store = BlobStore(tmp_path / "cache")
    store.root.mkdir(parents=True)
    lock = tools.ToolsLock(tmp_path / "locks" / "gpustack-0.7.1.toml", frozen=False)
    proxy = tools.AssetProxy(store, lock, "http://mirror.invalid")
    for path, data in ((LLAMA_BOX_ASSET, b"zip"), (PARSER_ASSET, parser), (FASTFETCH_ASSET, b"z")):
        sha = hashlib.sha256(data).hexdigest()
        store.path(sha).write_bytes(data)
        fetched = url if path == PARSER_ASSET else ""
        proxy.fetched[path] = tools.Asset(path, sha, len(data), fetched and f"{fetched}/{path}")
        lock.record(proxy.fetched[path])
    return proxy


def test_an_html_page_for_a_program_is_refused_named_and_not_kept(matrix, tmp_path: Path) -> None:
    cell = matrix.cell("v0.7.1-linux-amd64-cpu-py3.11-base-pip")
    proxy = proxy_that_fetched(tmp_path, HTML, "http://mirror.invalid")
    with pytest.raises(ToolsError) as err:
        tools.check_programs(cell, program_tree(tmp_path / "t", HTML), proxy)
    message = str(err.value)
    assert f"http://mirror.invalid/{PARSER_ASSET}" in message
    assert "gguf-parser/gguf-parser) is an HTML page, not an ELF for x86_64" in message
    assert "ELF machine None" not in message and "machine None" not in message
    assert f"was not kept or recorded in {proxy.lock.path}" in message
    assert not proxy.store.path(hashlib.sha256(HTML).hexdigest()).exists()
    assert not proxy.lock.path.exists()


def test_a_program_for_another_machine_is_refused(matrix, tmp_path: Path) -> None:
    cell = matrix.cell("v0.7.1-linux-amd64-cpu-py3.11-base-pip")
    proxy = proxy_that_fetched(tmp_path, elf(183), "")  # from the cache, as the lock lists it
    with pytest.raises(ToolsError, match="is an ELF for aarch64, not an ELF for x86_64") as err:
        tools.check_programs(cell, program_tree(tmp_path / "t", elf(183)), proxy)
    assert f"its asset {PARSER_ASSET} (sha256 " in str(err.value)
    assert f"is the one {proxy.lock.path} lists: that entry is wrong" in str(err.value)


def test_programs_for_the_target_pass(matrix, tmp_path: Path) -> None:
    cell = matrix.cell("v0.7.1-linux-amd64-cpu-py3.11-base-pip")
    proxy = proxy_that_fetched(tmp_path, elf(62), "http://mirror.invalid")
    tools.check_programs(cell, program_tree(tmp_path / "t", elf(62)), proxy)


def test_a_program_that_download_tools_did_not_fetch_is_refused(matrix, tmp_path: Path) -> None:
    """What a concurrent download-tools in the same tool venv did: the archive holds fastfetch,
    but no asset of this build's record is for it."""
    cell = matrix.cell("v0.7.1-linux-amd64-cpu-py3.11-base-pip")
    proxy = proxy_that_fetched(tmp_path, elf(62), "")
    del proxy.fetched[FASTFETCH_ASSET]
    with pytest.raises(ToolsError, match="put fastfetch into the tools archive without fetching"):
        tools.check_programs(cell, program_tree(tmp_path / "t", elf(62)), proxy)


def cached_archive(tmp_path: Path, assets: list[str]) -> Path:
    """A cached archive folder of the three programs whose record lists `assets`."""
    final = tmp_path / "cache" / "tools" / "archives" / "0.7.1-linux-amd64-cpu-0123456789abcdef"
    final.mkdir(parents=True)
    tools.write_archive(program_tree(tmp_path / "t", elf(62)), final / tools.ARCHIVE_NAME)
    archive = final / tools.ARCHIVE_NAME
    record = {
        "path": tools.ARCHIVE_NAME,
        "sha256": hashlib.sha256(archive.read_bytes()).hexdigest(),
        "assets": [{"path": p, "sha256": "a" * 64, "size": 1, "url": ""} for p in assets],
        "llama_box_dir": "llama-box-v0.0.171-linux-amd64",
        "retargeted_from": None,
        "base_url": "",
        "wanted_before_fix": [],
    }
    (final / "archive.json").write_text(json.dumps(record))
    return final


def test_a_cached_record_without_an_asset_for_every_program_is_not_trusted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The record two concurrent builds left: the tar holds fastfetch/fastfetch, the record
    lists two assets. It is made again, not shipped without fastfetch build after build."""
    final = cached_archive(tmp_path, [LLAMA_BOX_ASSET, PARSER_ASSET])
    lock = tools.ToolsLock(tmp_path / "gpustack-0.7.1.toml", frozen=False)
    assert tools._cached(final, lock) is None
    assert "holds fastfetch but its record lists no asset for it" in caplog.text


def test_a_complete_cached_record_is_used(tmp_path: Path) -> None:
    final = cached_archive(tmp_path, [LLAMA_BOX_ASSET, PARSER_ASSET, FASTFETCH_ASSET])
    lock = tools.ToolsLock(tmp_path / "gpustack-0.7.1.toml", frozen=False)
    archive = tools._cached(final, lock)
    assert archive is not None and len(archive.assets) == 3


def test_saving_the_lock_keeps_what_another_build_saved_meanwhile(tmp_path: Path) -> None:
    path = tmp_path / "gpustack-0.7.1.toml"
    one = tools.ToolsLock(path, frozen=False)
    two = tools.ToolsLock(path, frozen=False)
    one.record(tools.Asset(PARSER_ASSET, "1" * 64, 1))
    two.record(tools.Asset(FASTFETCH_ASSET, "2" * 64, 2))
    assert one.save("0.7.1") == 1
    assert two.save("0.7.1") == 1  # fastfetch is new; gguf-parser was the other build's
    assert set(tools.ToolsLock(path, frozen=True).entries) == {PARSER_ASSET, FASTFETCH_ASSET}
    assert tools.ToolsLock(path, frozen=False).save("0.7.1") == 0
