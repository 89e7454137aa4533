"""A loopback stand-in for GitHub's release downloads of GPUStack's tools.

`gpustack download-tools --tools-download-base-url BASE` fetches
`BASE/gpustack/<repo>/releases/download/<version>/<asset>` (0.6.2 and 0.7.1,
`gpustack/worker/tools_manager.py`). Tests of the tools stage must not depend on github.com, so
this module builds small but real assets of the same names and layouts: every llama-box build
the release workflow of the pinned llama-box version makes for a toolkit a GPUStack worker can
pick (read from upstream's own workflow, `support.upstream`), gguf-parser and fastfetch (static
ELF programs from
tests/fixtures/fake_tool.c, PE stubs for Windows, deterministic zips) and serves them from a
threaded HTTP server on 127.0.0.1 that answers like the real one at the wire: 200, HEAD, single
byte ranges (upstream probes a mirror with a ranged GET), 404 and 416.

Compiled programs are cached under `<cache>/fixtures/<key>/`, the key hashing the source, the
compiler argv and the compiler's `--version`, so reruns do not compile again.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import logging
import os
import re
import struct
import tempfile
import threading
import urllib.parse
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest

from gpustack_offline.core.files import atomic_path, sha256_file
from gpustack_offline.core.processes import run
from gpustack_offline.stages import tools
from support import upstream
from support.loopback import LoopbackServer, Served

log = logging.getLogger("gpustack_offline.release_mirror")

SOURCE = Path(__file__).resolve().parent.parent / "fixtures" / "fake_tool.c"

# -- what download-tools asks for --------------------------------------------------------------


@dataclass(frozen=True)
class ToolVersions:
    """The tool releases one GPUStack version pins (BUILTIN_* in tools_manager.py)."""

    llama_box: str
    gguf_parser: str
    fastfetch: str
    # 0.6 fetches static builds `llama-box-…`; 0.7 dynamically linked `dl-llama-box-…` by default.
    llama_box_prefix: str
    # The llama-box toolkit when no GPU device is given, by arch.
    cpu_toolkit: Mapping[str, str]


GPUSTACK_TOOLS: dict[str, ToolVersions] = {
    "0.6.2": ToolVersions(
        llama_box="v0.0.154",
        gguf_parser="v0.19.0",
        fastfetch="2.25.0.1",
        llama_box_prefix="llama-box",
        cpu_toolkit={"amd64": "avx2", "arm64": "neon"},
    ),
    "0.7.1": ToolVersions(
        llama_box="v0.0.171",
        gguf_parser="v0.22.1",
        fastfetch="2.25.0.1",
        llama_box_prefix="dl-llama-box",
        cpu_toolkit={"amd64": "cpu", "arm64": "cpu"},
    ),
}
# The toolkits of llama-box builds a 0.6/0.7 worker picks (tools_manager.py
# _get_llama_box_platform_name; metal is macOS's): the release also has avx512, oneapi and
# vulkan builds, which no worker asks for, and which the mirror leaves out.
ACCELERATORS = ("cuda", "cann", "hip", "musa", "dtk")
PLATFORMS = (("linux", "amd64"), ("linux", "arm64"), ("windows", "amd64"))
FASTFETCH_PLATFORM = {
    ("linux", "amd64"): "linux-amd64",
    ("linux", "arm64"): "linux-aarch64",
    ("windows", "amd64"): "windows-amd64",
}
COMPILERS = {"amd64": "x86_64-linux-gnu-gcc", "arm64": "aarch64-linux-gnu-gcc"}
PROGRAM_FLAGS = ("-static", "-Os", "-s")
LIBRARY_FLAGS = ("-shared", "-fPIC", "-nostdlib", "-Os", "-s")
LIBRARY_NAME = {"linux": "libllama-box-fixture.so", "windows": "llama-box-fixture.dll"}
# Zip entries carry a fixed time so that two builds of the same inputs are byte-identical.
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class Asset:
    """One release asset, named as tools_manager.py names it."""

    tool: str  # llama-box | gguf-parser | fastfetch
    repo: str
    version: str
    name: str
    os: str
    arch: str
    toolkit: str = ""  # llama-box only

    @property
    def url_path(self) -> str:
        return f"/gpustack/{self.repo}/releases/download/{self.version}/{self.name}"


def assets_for(versions: Iterable[str]) -> list[Asset]:
    """Every asset a download-tools run of these GPUStack versions can fetch for linux
    amd64/arm64 and windows amd64 (llama-box: each build of its release for cpu or a toolkit a
    worker picks); one entry per URL path, sorted by it."""
    found: dict[str, Asset] = {}
    for version in versions:
        try:
            tools = GPUSTACK_TOOLS[version]
        except KeyError:
            known = ", ".join(sorted(GPUSTACK_TOOLS))
            msg = f"no release-mirror fixtures for GPUStack {version} (known: {known})"
            raise ValueError(msg) from None
        dynamic = tools.llama_box_prefix == "dl-llama-box"
        for build in upstream.llama_box_builds(tools.llama_box):
            word = build.toolkit.split("-", 1)[0]
            picked = word in ACCELERATORS or build.toolkit == tools.cpu_toolkit.get(build.arch)
            if (build.os, build.arch) in PLATFORMS and build.dynamic == dynamic and picked:
                box = Asset("llama-box", "llama-box", tools.llama_box, build.name, build.os,
                            build.arch, build.toolkit)  # fmt: skip
                found[box.url_path] = box
        for os_name, arch in PLATFORMS:
            exe = ".exe" if os_name == "windows" else ""
            parser = Asset(
                "gguf-parser",
                "gguf-parser-go",
                tools.gguf_parser,
                f"gguf-parser-{os_name}-{arch}{exe}",
                os_name,
                arch,
            )
            fetch = Asset(
                "fastfetch",
                "fastfetch",
                tools.fastfetch,
                f"fastfetch-{FASTFETCH_PLATFORM[os_name, arch]}.zip",
                os_name,
                arch,
            )
            found[parser.url_path] = parser
            found[fetch.url_path] = fetch
    return [found[path] for path in sorted(found)]


# -- building the assets -----------------------------------------------------------------------


def cache_root() -> Path:
    """The project's cache (option `cache-dir`), so fixtures survive between test sessions."""
    configured = os.environ.get("GPUSTACK_OFFLINE_CACHE_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gpustack-offline"


@functools.cache
def _compiler_identity(cc: str) -> str:
    """Part of the cache key: a compiler upgrade must rebuild the fixtures."""
    what = f"asking {cc} for its version"
    return run([cc, "--version"], what=what, fix=_COMPILER_FIX).stdout


_COMPILER_FIX = "install gcc and gcc-aarch64-linux-gnu (scripts/setup-build-host.sh does)"
_SAFE_DEFINE = re.compile(r"[A-Za-z0-9._/+-]*")


def _define(name: str, value: str) -> str:
    # argv is never passed through a shell, but the value lands in a C string literal.
    if not _SAFE_DEFINE.fullmatch(value):
        raise ValueError(f"unsafe fixture define {name}={value!r}")
    return f'-D{name}="{value}"'


def compile_fixture(
    arch: str, kind: str, version: str, url_path: str, cache_dir: Path | None = None
) -> Path:
    """Compile fake_tool.c for one asset (kind: llama-box, gguf-parser, fastfetch or library)
    and return the cached file; a cache hit runs only the compiler's `--version`."""
    cc = COMPILERS[arch]
    macro = "FIXTURE_" + kind.upper().replace("-", "_")
    flags = LIBRARY_FLAGS if kind == "library" else PROGRAM_FLAGS
    args = [*flags, f"-D{macro}", _define("FIXTURE_URL_PATH", url_path)]
    if kind != "library":
        args.append(_define("FIXTURE_VERSION", version))
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        json.dumps(
            {
                "source": hashlib.sha256(source).hexdigest(),
                "argv": [cc, *args],
                "compiler": _compiler_identity(cc),
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()
    name = "fixture.so" if kind == "library" else "fixture"
    final = (cache_dir or cache_root()) / "fixtures" / key / name
    if final.is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".fixture.", suffix=".part", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        run(
            [cc, *args, SOURCE, "-o", tmp],
            what=f"compiling the {arch} {kind} fixture for {url_path}",
            fix=_COMPILER_FIX,
        )
        with tmp.open("rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o755)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def pe_stub(text: str, dll: bool = False) -> bytes:
    """A well-formed but empty PE32+ image for x86-64: Windows assets are checked for their
    headers here, never run, and a real cross-compiled .exe would need mingw on every host."""
    dos = bytearray(0x80)
    dos[0:2] = b"MZ"
    struct.pack_into("<I", dos, 0x3C, len(dos))  # e_lfanew: the PE header follows
    stub = bytes.fromhex("0e1fba0e00b409cd21b8014ccd21")  # the usual "print and exit" code
    stub += b"This program cannot be run in DOS mode.\r\r\n$"
    dos[0x40 : 0x40 + len(stub)] = stub
    characteristics = 0x0022 | (0x2000 if dll else 0)  # executable, large-address-aware, [dll]
    coff = struct.pack("<4sHHIIIHH", b"PE\0\0", 0x8664, 0, 0, 0, 0, 240, characteristics)
    optional_fields: list[tuple[str, list[int]]] = [
        ("H", [0x20B]),  # magic: PE32+
        ("BB", [14, 0]),  # linker version
        ("IIIII", [0, 0, 0, 0, 0]),  # code/data sizes, entry point, base of code: no sections
        ("Q", [0x180000000 if dll else 0x140000000]),  # image base
        ("II", [0x1000, 0x200]),  # section and file alignment
        ("HHHHHH", [6, 0, 0, 0, 6, 0]),  # OS, image and subsystem versions
        ("I", [0]),  # Win32VersionValue
        ("III", [0x1000, 0x200, 0]),  # size of image, size of headers, checksum
        ("HH", [3, 0x8160]),  # console subsystem; NX, ASLR, high-entropy VA, TS-aware
        ("QQQQ", [0x100000, 0x1000, 0x100000, 0x1000]),  # stack and heap reserve/commit
        ("II", [0, 16]),  # loader flags, number of data directories
    ]
    optional = b"".join(struct.pack("<" + fmt, *values) for fmt, values in optional_fields)
    optional += bytes(16 * 8)  # the data directories, all empty
    assert len(optional) == 240
    return (bytes(dos) + coff + optional).ljust(0x200, b"\0") + text.encode()


def deterministic_zip(entries: Mapping[str, bytes]) -> bytes:
    """A zip whose bytes depend only on the entries: sorted names, fixed times, mode 0755 (every
    entry is a program or a library, and extraction on Linux should keep them executable)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
            info.create_system = 3  # unix, so external_attr carries the mode
            info.external_attr = (0o100755 & 0xFFFF) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, entries[name], compresslevel=6)
    return buf.getvalue()


def _windows_text(asset: Asset) -> str:
    return f"gpustack-offline fixture: {asset.url_path}\n{asset.tool} {asset.version}\n"


def _asset_bytes(asset: Asset, programs: Mapping[tuple[str, str], bytes]) -> bytes:
    windows = asset.os == "windows"
    program = pe_stub(_windows_text(asset)) if windows else programs[asset.url_path, asset.tool]
    if asset.tool == "gguf-parser":
        return program
    if asset.tool == "fastfetch":
        if windows:
            return deterministic_zip({"fastfetch.exe": program})
        inner = asset.name.removesuffix(".zip")
        return deterministic_zip({f"{inner}/usr/bin/fastfetch": program})
    entries = {"llama-box.exe" if windows else "llama-box": program}
    if asset.name.startswith("dl-"):
        library = (
            pe_stub(_windows_text(asset), dll=True)
            if windows
            else programs[asset.url_path, "library"]
        )
        entries[LIBRARY_NAME[asset.os]] = library
    return deterministic_zip(entries)


def build_assets(
    root: Path, versions: Iterable[str] = ("0.6.2", "0.7.1"), cache_dir: Path | None = None
) -> dict[str, str]:
    """Lay out every asset of `versions` under `root` by URL path; return url path -> sha256."""
    assets = assets_for(versions)
    jobs = [(a, a.tool) for a in assets if a.os == "linux"]
    jobs += [(a, "library") for a in assets if a.os == "linux" and a.name.startswith("dl-")]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        paths = pool.map(
            lambda job: compile_fixture(
                job[0].arch, job[1], job[0].version, job[0].url_path, cache_dir
            ),
            jobs,
        )
        programs = {
            (asset.url_path, kind): path.read_bytes()
            for (asset, kind), path in zip(jobs, paths, strict=True)
        }
    digests: dict[str, str] = {}
    for asset in assets:
        data = _asset_bytes(asset, programs)
        with atomic_path(root / asset.url_path.lstrip("/")) as tmp:
            tmp.write_bytes(data)
        digests[asset.url_path] = hashlib.sha256(data).hexdigest()
    return digests


# -- serving them ------------------------------------------------------------------------------


class RangeNotSatisfiable(Exception):
    """The Range starts at or beyond the end of the file: 416."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive byte span of a single `bytes=a-b`, `a-` or `-n` range; None means serve the
    whole file (no header, or one this mirror ignores, as RFC 9110 allows: several ranges)."""
    if header is None:
        return None
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.groups()
    if first == "":
        length = int(last)
        if length == 0 or size == 0:
            raise RangeNotSatisfiable
        return max(size - length, 0), size - 1
    start = int(first)
    if last and int(last) < start:
        return None  # an invalid range: ignored, not refused
    if start >= size:
        raise RangeNotSatisfiable
    end = min(int(last), size - 1) if last else size - 1
    return start, end


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "gpustack-offline-release-mirror"
    timeout = 10  # idle keep-alive connections end, so stop() leaves no thread waiting long

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("release mirror: " + format, *args)

    def _serve(self, body: bool) -> None:
        mirror = cast("LoopbackServer[ReleaseMirror]", self.server).owner
        mirror._record(self.path)
        file = mirror._file(urllib.parse.urlsplit(self.path).path)
        if file is None:
            self._reply(404, b"Not Found", body, content_type="text/plain; charset=utf-8")
            return
        with file.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            try:
                span = parse_range(self.headers.get("Range"), size)
            except RangeNotSatisfiable:
                self._reply(416, b"", body, extra={"Content-Range": f"bytes */{size}"})
                return
            start, end = span if span is not None else (0, size - 1)
            self.send_response(200 if span is None else 206)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(end - start + 1))
            self.send_header("Accept-Ranges", "bytes")
            if span is not None:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if body:
                fh.seek(start)
                left = end - start + 1
                while left > 0 and (chunk := fh.read(min(left, 1 << 16))):
                    self.wfile.write(chunk)
                    left -= len(chunk)

    def _reply(
        self,
        status: int,
        payload: bytes,
        body: bool,
        content_type: str = "application/octet-stream",
        extra: Mapping[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if body:
            self.wfile.write(payload)


class ReleaseMirror(Served):
    """Serves the files under `root` at their relative paths, recording every request path.

    Use as a context manager, or start()/stop(). Assets change with replace(); a test that
    changes assets of the session-wide mirror copies its root into a mirror of its own instead.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._requests: list[str] = []

    server_name = "release-mirror"

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        return _Handler

    @property
    def base_url(self) -> str:
        """`--tools-download-base-url` for download-tools: http://127.0.0.1:PORT."""
        return self.served_url

    @property
    def requests(self) -> list[str]:
        """A snapshot of every GET and HEAD request path so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def url(self, url_path: str) -> str:
        return self.base_url + _normalise(url_path)

    def replace(self, url_path: str, data: bytes) -> bytes:
        """Swap an existing asset's bytes (upstream re-uploaded it); return the old bytes. The
        swap is an atomic rename, so a download in flight gets either the old or the new file."""
        file = self._file(url_path)
        if file is None:
            raise KeyError(f"no asset at {url_path} under {self.root}")
        old = file.read_bytes()
        with atomic_path(file) as tmp:
            tmp.write_bytes(data)
        return old

    def sha256(self, url_path: str) -> str:
        file = self._file(url_path)
        if file is None:
            raise KeyError(f"no asset at {url_path} under {self.root}")
        return hashlib.sha256(file.read_bytes()).hexdigest()

    def _record(self, path: str) -> None:
        with self._lock:
            self._requests.append(path)

    def _file(self, url_path: str) -> Path | None:
        """The file for a URL path, or None: no dot segments, nothing outside root."""
        parts = urllib.parse.unquote(_normalise(url_path)).split("/")[1:]
        if not parts or any(p in ("", ".", "..") or "\\" in p for p in parts):
            return None
        file = self.root.joinpath(*parts)
        if not file.is_file() or not file.resolve().is_relative_to(self.root.resolve()):
            return None
        return file


def _normalise(url_path: str) -> str:
    return url_path if url_path.startswith("/") else "/" + url_path


def write_fixture_locks(mirror_root: Path, locks_dir: Path, versions=("0.6.2", "0.7.1")) -> Path:
    """Tools checksum locks for the fixture assets: what `bundles/tools/` holds for upstream."""
    for version in versions:
        lock = tools.ToolsLock(tools.lock_path(locks_dir, version), frozen=False)
        for file in sorted(p for p in mirror_root.rglob("*") if p.is_file()):
            path = str(file.relative_to(mirror_root))
            lock.record(tools.Asset(path, sha256_file(file), file.stat().st_size))
        lock.save(version)
    return locks_dir


@pytest.fixture(scope="session")
def release_mirror(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReleaseMirror]:
    """A started mirror of every 0.6.2 and 0.7.1 tool asset, shared by the session. Tests that
    replace assets build their own mirror over a copy of `release_mirror.root`."""
    root = tmp_path_factory.mktemp("release-mirror")
    build_assets(root)
    with ReleaseMirror(root) as mirror:
        yield mirror
