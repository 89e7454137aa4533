"""The loopback release mirror serves what `gpustack download-tools` 0.6.2 and 0.7.1 ask for, in
the layouts tools_manager.py unpacks, and answers like GitHub at the wire.

Tests marked integration open loopback sockets; the others only build and run the fixtures.
"""

from __future__ import annotations

import hashlib
import http.client
import shutil
import struct
import subprocess
import zipfile
from pathlib import Path

import pytest
import requests
from support.release_mirror import (
    RangeNotSatisfiable,
    ReleaseMirror,
    build_assets,
    compile_fixture,
    parse_range,
)

# The session fixture. Drop this line once tests/conftest.py imports it for the whole suite,
# or this module gets a mirror of its own.

# Written out from tools_manager.py of each version, not from the mirror's own table, so that a
# wrong name in the table fails here. BUILTIN_LLAMA_BOX_VERSION / BUILTIN_GGUF_PARSER_VERSION:
# 0.6.2 v0.0.154 / v0.19.0, static `llama-box-…` with cpu toolkit avx2 (amd64) or neon (arm64);
# 0.7.1 v0.0.171 / v0.22.1, dynamically linked `dl-llama-box-…` with toolkit cpu. cuda is
# cuda-12.4, or cuda-12.8 when CUDA >= 12.8. fastfetch is 2.25.0.1 in both. The accelerators'
# builds (cann-<version>[-310p], hip-6.2, musa-rc4.x, dtk-<version>) as llama-box's release
# workflow of each version builds them (.github/workflows/ci.yml: linux-cann for amd64 and arm64,
# linux-hip, linux-musa, linux-dtk and windows-hip for amd64).
BOX = "/gpustack/llama-box/releases/download"
PARSER = "/gpustack/gguf-parser-go/releases/download"
FETCH = "/gpustack/fastfetch/releases/download/2.25.0.1"
EXPECTED = {
    f"{BOX}/v0.0.154/llama-box-linux-amd64-avx2.zip",
    f"{BOX}/v0.0.154/llama-box-linux-amd64-cuda-12.4.zip",
    f"{BOX}/v0.0.154/llama-box-linux-amd64-cuda-12.8.zip",
    f"{BOX}/v0.0.154/llama-box-linux-arm64-neon.zip",
    f"{BOX}/v0.0.154/llama-box-linux-arm64-cuda-12.4.zip",
    f"{BOX}/v0.0.154/llama-box-linux-arm64-cuda-12.8.zip",
    f"{BOX}/v0.0.154/llama-box-windows-amd64-avx2.zip",
    f"{BOX}/v0.0.154/llama-box-windows-amd64-cuda-12.4.zip",
    f"{BOX}/v0.0.154/llama-box-windows-amd64-cuda-12.8.zip",
    f"{BOX}/v0.0.171/dl-llama-box-linux-amd64-cpu.zip",
    f"{BOX}/v0.0.171/dl-llama-box-linux-amd64-cuda-12.4.zip",
    f"{BOX}/v0.0.171/dl-llama-box-linux-amd64-cuda-12.8.zip",
    f"{BOX}/v0.0.171/dl-llama-box-linux-arm64-cpu.zip",
    f"{BOX}/v0.0.171/dl-llama-box-linux-arm64-cuda-12.4.zip",
    f"{BOX}/v0.0.171/dl-llama-box-linux-arm64-cuda-12.8.zip",
    f"{BOX}/v0.0.171/dl-llama-box-windows-amd64-cpu.zip",
    f"{BOX}/v0.0.171/dl-llama-box-windows-amd64-cuda-12.4.zip",
    f"{BOX}/v0.0.171/dl-llama-box-windows-amd64-cuda-12.8.zip",
    *(
        f"{BOX}/v0.0.154/llama-box-linux-{arch}-cann-{v}{chip}.zip"
        for arch in ("amd64", "arm64")
        for v in ("8.0", "8.1.rc1")
        for chip in ("", "-310p")
    ),
    *(
        f"{BOX}/v0.0.171/dl-llama-box-linux-{arch}-cann-{v}{chip}.zip"
        for arch in ("amd64", "arm64")
        for v in ("8.1.rc1", "8.2.rc1")
        for chip in ("", "-310p")
    ),
    f"{BOX}/v0.0.154/llama-box-linux-amd64-hip-6.2.zip",
    f"{BOX}/v0.0.154/llama-box-windows-amd64-hip-6.2.zip",
    f"{BOX}/v0.0.154/llama-box-linux-amd64-musa-rc4.0.zip",
    f"{BOX}/v0.0.154/llama-box-linux-amd64-dtk-24.04.zip",
    f"{BOX}/v0.0.171/dl-llama-box-linux-amd64-hip-6.2.zip",
    f"{BOX}/v0.0.171/dl-llama-box-windows-amd64-hip-6.2.zip",
    f"{BOX}/v0.0.171/dl-llama-box-linux-amd64-musa-rc4.2.zip",
    f"{BOX}/v0.0.171/dl-llama-box-linux-amd64-dtk-25.04.zip",
    f"{PARSER}/v0.19.0/gguf-parser-linux-amd64",
    f"{PARSER}/v0.19.0/gguf-parser-linux-arm64",
    f"{PARSER}/v0.19.0/gguf-parser-windows-amd64.exe",
    f"{PARSER}/v0.22.1/gguf-parser-linux-amd64",
    f"{PARSER}/v0.22.1/gguf-parser-linux-arm64",
    f"{PARSER}/v0.22.1/gguf-parser-windows-amd64.exe",
    f"{FETCH}/fastfetch-linux-amd64.zip",
    f"{FETCH}/fastfetch-linux-aarch64.zip",
    f"{FETCH}/fastfetch-windows-amd64.zip",
}
# What upstream's mirror probe requests (_check_and_set_download_base_url): 512 KiB of this.
PROBE = f"{PARSER}/v0.22.1/gguf-parser-linux-amd64"
EM_X86_64, EM_AARCH64 = 62, 183
ET_EXEC, ET_DYN = 2, 3


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("assets")
    return root, build_assets(root)


def _file(root: Path, url_path: str) -> Path:
    return root / url_path.lstrip("/")


def _elf(data: bytes) -> tuple[int, int]:
    """(e_type, e_machine) of a 64-bit little-endian ELF."""
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "not an ELF64 LSB file"
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    return e_type, e_machine


def _install(data: bytes, path: Path) -> Path:
    """Write a program as download-tools does: copy the bytes, then add the exec bit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o755)
    return path


def _version(program: Path) -> str:
    proc = subprocess.run(
        [program, "--version"], capture_output=True, text=True, timeout=30, check=True
    )
    return proc.stdout + proc.stderr


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _member(root: Path, url_path: str, name: str) -> bytes:
    with zipfile.ZipFile(_file(root, url_path)) as zf:
        return zf.read(name)


def test_build_makes_exactly_the_assets_download_tools_requests(built):
    root, digests = built
    assert set(digests) == EXPECTED
    assert all(_file(root, path).is_file() for path in EXPECTED)


def test_amd64_programs_run_and_answer_version_like_the_real_tools(built, tmp_path):
    root, _ = built
    cuda = f"{BOX}/v0.0.171/dl-llama-box-linux-amd64-cuda-12.8.zip"
    box = _install(_member(root, cuda, "llama-box"), tmp_path / "box" / "llama-box")
    out = _version(box)
    assert "version    : v0.0.171 (fixture)" in out
    assert "target     : x86_64-linux-gnu" in out
    assert f"gpustack-offline fixture: {cuda}" in out

    parser = _install(_file(root, PROBE).read_bytes(), tmp_path / "parser" / "gguf-parser")
    assert _version(parser).splitlines()[0] == "gguf-parser version v0.22.1"

    zipped = f"{FETCH}/fastfetch-linux-amd64.zip"
    data = _member(root, zipped, "fastfetch-linux-amd64/usr/bin/fastfetch")
    fetch = _install(data, tmp_path / "fetch" / "fastfetch")
    assert _version(fetch).splitlines() == [
        "fastfetch 2.25.0.1 (x86_64)",
        f"gpustack-offline fixture: {zipped}",
    ]


def test_arm64_programs_are_aarch64_elfs_that_run_under_qemu(built, tmp_path):
    root, _ = built
    neon = f"{BOX}/v0.0.154/llama-box-linux-arm64-neon.zip"
    data = _member(root, neon, "llama-box")
    assert _elf(data) == (ET_EXEC, EM_AARCH64)
    out = _version(_install(data, tmp_path / "llama-box"))
    assert "version    : v0.0.154 (fixture)" in out
    assert "target     : aarch64-linux-gnu" in out
    assert f"gpustack-offline fixture: {neon}" in out

    zipped = f"{FETCH}/fastfetch-linux-aarch64.zip"
    data = _member(root, zipped, "fastfetch-linux-aarch64/usr/bin/fastfetch")
    assert _elf(data) == (ET_EXEC, EM_AARCH64)
    assert _version(_install(data, tmp_path / "fastfetch")).startswith(
        "fastfetch 2.25.0.1 (aarch64)\n"
    )
    parser = _file(root, f"{PARSER}/v0.19.0/gguf-parser-linux-arm64").read_bytes()
    assert _elf(parser) == (ET_EXEC, EM_AARCH64)


def test_every_linux_program_is_built_for_its_assets_arch(built):
    root, _ = built
    for path in EXPECTED:
        if "linux" not in path:
            continue
        machine = EM_AARCH64 if ("arm64" in path or "aarch64" in path) else EM_X86_64
        if path.endswith(".zip"):
            with zipfile.ZipFile(_file(root, path)) as zf:
                blobs = [zf.read(name) for name in zf.namelist()]
        else:
            blobs = [_file(root, path).read_bytes()]
        assert all(_elf(blob)[1] == machine for blob in blobs), path


def test_llama_box_zips_hold_the_layout_each_version_unpacks(built):
    root, _ = built
    for path in EXPECTED:
        if "/llama-box/" not in path:
            continue
        windows = "windows" in path
        expected = ["llama-box.exe" if windows else "llama-box"]
        if "/dl-llama-box-" in path:  # 0.7 copies the whole folder: binary and its libraries
            expected.append("llama-box-fixture.dll" if windows else "libllama-box-fixture.so")
        with zipfile.ZipFile(_file(root, path)) as zf:
            assert zf.namelist() == sorted(expected), path
            for info in zf.infolist():
                assert info.external_attr >> 16 == 0o100755, (path, info.filename)
                assert info.date_time == (1980, 1, 1, 0, 0, 0)
            if not windows and "/dl-" in path:
                assert _elf(zf.read("libllama-box-fixture.so"))[0] == ET_DYN


def test_fastfetch_zips_put_the_binary_where_download_tools_looks(built):
    root, _ = built
    for platform, member in [
        ("linux-amd64", "fastfetch-linux-amd64/usr/bin/fastfetch"),
        ("linux-aarch64", "fastfetch-linux-aarch64/usr/bin/fastfetch"),
        ("windows-amd64", "fastfetch.exe"),
    ]:
        with zipfile.ZipFile(_file(root, f"{FETCH}/fastfetch-{platform}.zip")) as zf:
            assert zf.namelist() == [member]


def test_windows_assets_are_pe32_plus_x86_64_images(built):
    root, _ = built
    box = f"{BOX}/v0.0.171/dl-llama-box-windows-amd64-cpu.zip"
    parser = _file(root, f"{PARSER}/v0.22.1/gguf-parser-windows-amd64.exe")
    images = {
        "gguf-parser.exe": parser.read_bytes(),
        "llama-box.exe": _member(root, box, "llama-box.exe"),
        "llama-box-fixture.dll": _member(root, box, "llama-box-fixture.dll"),
        "fastfetch.exe": _member(root, f"{FETCH}/fastfetch-windows-amd64.zip", "fastfetch.exe"),
    }
    for name, data in images.items():
        assert data[:2] == b"MZ", name
        (e_lfanew,) = struct.unpack_from("<I", data, 0x3C)
        assert data[e_lfanew : e_lfanew + 4] == b"PE\0\0", name
        machine, _, _, _, _, optional_size, characteristics = struct.unpack_from(
            "<HHIIIHH", data, e_lfanew + 4
        )
        assert machine == 0x8664 and optional_size == 240, name
        assert struct.unpack_from("<H", data, e_lfanew + 24)[0] == 0x20B, name  # PE32+
        assert bool(characteristics & 0x2000) == name.endswith(".dll"), name
        assert b"gpustack-offline fixture: /gpustack/" in data, name


def test_two_builds_are_byte_identical(built, tmp_path):
    root, digests = built
    assert build_assets(tmp_path) == digests
    for path in EXPECTED:
        assert _file(tmp_path, path).read_bytes() == _file(root, path).read_bytes(), path


def test_a_compiled_fixture_is_reused_from_the_cache(tmp_path):
    path = "/gpustack/gguf-parser-go/releases/download/v0.0.0/cache-test"
    first = compile_fixture("amd64", "gguf-parser", "v0.0.0", path, cache_dir=tmp_path)
    mtime = first.stat().st_mtime_ns
    again = compile_fixture("amd64", "gguf-parser", "v0.0.0", path, cache_dir=tmp_path)
    assert again == first and again.stat().st_mtime_ns == mtime
    assert first.parent.parent == tmp_path / "fixtures"
    assert not [p for p in first.parent.iterdir() if p != first]  # no temp file left behind
    other = compile_fixture("amd64", "gguf-parser", "v0.0.1", path, cache_dir=tmp_path)
    assert other.parent != first.parent  # another define, another key


@pytest.mark.parametrize(
    ("header", "span"),
    [
        (None, None),
        ("bytes=0-524287", (0, 99)),
        ("bytes=10-19", (10, 19)),
        ("bytes=90-", (90, 99)),
        ("bytes=-5", (95, 99)),
        ("bytes=-500", (0, 99)),
        ("bytes=0-1,5-6", None),  # several ranges: serve it all, as RFC 9110 allows
        ("bytes=9-3", None),  # invalid: ignored
        ("items=0-1", None),
    ],
)
def test_parse_range_reads_a_single_byte_range(header, span):
    assert parse_range(header, 100) == span


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=150-200", "bytes=-0"])
def test_parse_range_refuses_a_range_past_the_end(header):
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, 100)


# -- over loopback HTTP ------------------------------------------------------------------------


@pytest.mark.integration
def test_mirror_serves_every_asset_a_download_tools_run_needs(release_mirror):
    for path in sorted(EXPECTED):
        response = requests.get(release_mirror.url(path), timeout=10)
        assert response.status_code == 200, path
        assert response.headers["Content-Type"] == "application/octet-stream"
        assert int(response.headers["Content-Length"]) == len(response.content)
        assert _sha256(response.content) == release_mirror.sha256(path), path


@pytest.mark.integration
def test_mirror_passes_upstreams_ranged_probe(release_mirror):
    # The exact request of _check_and_set_download_base_url: it needs 2xx, a Content-Range and
    # a non-empty body, or it rejects the mirror.
    data = _file(release_mirror.root, PROBE).read_bytes()
    headers = {"Range": f"bytes=0-{512 * 1024 - 1}"}
    response = requests.get(release_mirror.url(PROBE), headers=headers, timeout=5, stream=True)
    response.raise_for_status()
    assert response.status_code == 206
    end = min(len(data), 512 * 1024) - 1
    assert response.headers["Content-Range"] == f"bytes 0-{end}/{len(data)}"
    assert response.content == data[: end + 1]


@pytest.mark.integration
def test_mirror_answers_ranges_head_and_unsatisfiable_ranges(release_mirror):
    data = _file(release_mirror.root, PROBE).read_bytes()
    url = release_mirror.url(PROBE)
    part = requests.get(url, headers={"Range": "bytes=10-19"}, timeout=5)
    assert part.status_code == 206 and part.content == data[10:20]
    assert part.headers["Content-Range"] == f"bytes 10-19/{len(data)}"
    tail = requests.get(url, headers={"Range": "bytes=-7"}, timeout=5)
    assert tail.status_code == 206 and tail.content == data[-7:]

    past = requests.get(url, headers={"Range": f"bytes={len(data)}-"}, timeout=5)
    assert past.status_code == 416
    assert past.headers["Content-Range"] == f"bytes */{len(data)}"

    head = requests.head(url, timeout=5)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["Content-Length"] == str(len(data))
    assert head.headers["Accept-Ranges"] == "bytes"


@pytest.mark.integration
def test_mirror_answers_404_for_unknown_and_escaping_paths(release_mirror):
    host, port = release_mirror.base_url.removeprefix("http://").split(":")
    for path in [
        f"{BOX}/v0.0.154/llama-box-linux-amd64-sycl.zip",
        "/gpustack/llama-box/releases/download/v0.0.154/",
        "/gpustack/llama-box",
        "/gpustack/../../../etc/passwd",
        "/gpustack/%2e%2e/%2e%2e/etc/passwd",
    ]:
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
        try:
            conn.request("GET", path)  # raw: no client-side dot-segment clean-up
            response = conn.getresponse()
            assert (response.status, response.read()) == (404, b"Not Found"), path
        finally:
            conn.close()


@pytest.mark.integration
def test_mirror_records_every_request_path_in_order(release_mirror):
    seen = len(release_mirror.requests)
    requests.head(release_mirror.url(PROBE), timeout=5)
    requests.get(release_mirror.url(f"{FETCH}/fastfetch-linux-amd64.zip"), timeout=5)
    requests.get(release_mirror.url("/missing"), timeout=5)
    assert release_mirror.requests[seen:] == [
        PROBE,
        f"{FETCH}/fastfetch-linux-amd64.zip",
        "/missing",
    ]


@pytest.mark.integration
def test_replace_changes_what_the_mirror_serves(release_mirror, tmp_path):
    # The session-wide mirror stays untouched: this one serves a copy of its root.
    shutil.copytree(release_mirror.root, tmp_path / "root")
    with ReleaseMirror(tmp_path / "root") as mirror:
        path = f"{BOX}/v0.0.171/dl-llama-box-linux-amd64-cpu.zip"
        before = mirror.sha256(path)
        old = mirror.replace(path, b"re-uploaded upstream")
        assert _sha256(old) == before
        assert mirror.sha256(path) == _sha256(b"re-uploaded upstream")
        assert requests.get(mirror.url(path), timeout=5).content == b"re-uploaded upstream"
        with pytest.raises(KeyError):
            mirror.replace(f"{BOX}/v0.0.171/not-an-asset.zip", b"")
    assert release_mirror.sha256(path) == before
    with pytest.raises(RuntimeError):
        _ = mirror.base_url  # stopped
