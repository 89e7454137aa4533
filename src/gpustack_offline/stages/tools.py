"""Tools archives: llama-box, gguf-parser and fastfetch for the cell's target, made by upstream.

GPUStack 0.6/0.7 workers run prebuilt tools and download any that are missing when they start.
Upstream's offline answer is `gpustack download-tools --save-archive` online and `--load-archive`
on the target. This stage runs exactly that command, of the cell's GPUStack version, from a tool
venv for the build host, with the cell's `--system/--arch/--device` and the toolkit environment a
cross build needs (`CUDA_VERSION`; `CANN_VERSION` and `CANN_CHIP`: what the target's worker reads,
`Cell.toolkit`). Around it:

- Every asset download-tools asks for goes through `AssetProxy`, a loopback server that fetches
  from the upstream base URL into the content-addressed cache and checks each file against the
  version's checksum lock (`bundles/tools/gpustack-<version>.toml`). A changed upstream asset is a
  build error, every sha256 lands in the manifest, and a warm build downloads nothing.
- `tools_probe.py` asks the version's own worker code, answering the machine questions as the
  target would, whether the archive is complete. GPUStack 0.7 names the llama-box folder after the
  machine that *saved* the archive, not after `--arch/--device`, so an archive saved here for
  another machine is not found by the target's worker, which then downloads at start. Such an
  archive is retargeted (folder, its versions.json key and the `llama-box-default` link renamed to
  what the probe says the target looks for) and probed again; it must then want nothing. The
  probe also names the llama-box build a worker of the target with no tools would fetch (the
  device, toolkit version and chip picking it): the archive must hold that very asset.
- The archive is rewritten deterministically (sorted, fixed times and owners), so the same assets
  give the same bytes.
- Each program in it (llama-box, gguf-parser, fastfetch) must be an executable for the target:
  an ELF (Linux) or PE (Windows) for its machine. Anything else the mirror answered (an HTML
  page with status 200, another machine's build) stops the build, and the asset is not recorded.

Builds share the cache, and download-tools empties and refills the tool venv's
`gpustack/third_party/bin` each time it runs, so one tool venv serves one build at a time: its
creation, and the making of an archive with it, happen under a flock beside it
(`<venv>.lock`), and a build that waited looks at the cache again first. A cached archive is used
only if its record lists an asset for every program the archive holds.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import logging
import os
import re
import shutil
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from gpustack_offline import payload
from gpustack_offline.core.downloads import BlobStore, RetryPolicy, redact, session
from gpustack_offline.core.errors import (
    BundleError,
    DownloadError,
    HTTPStatusError,
    IntegrityError,
    ToolsError,
)
from gpustack_offline.core.files import Busy, atomic_dir, atomic_path, held, sha256_file, write_text
from gpustack_offline.core.matrix import Cell
from gpustack_offline.core.processes import run
from gpustack_offline.core.safety import safe_extract_tar
from gpustack_offline.core.tomlfile import read_toml
from gpustack_offline.stages.locks import Override, matching, without_credentials

log = logging.getLogger("gpustack_offline")

# Where upstream's download-tools looks when no base URL is given (tools_manager.py).
UPSTREAM_BASES = (
    "https://github.com",
    "https://gpustack-1303613262.cos.ap-guangzhou.myqcloud.com",
)
ARCHIVE_NAME = "gpustack-tools.tar.gz"
BUNDLE_PATH = f"tools/{ARCHIVE_NAME}"
# Settings of the build host that would change what download-tools fetches or where it looks.
HOST_ENV_LEAKS = ("CUDA_VERSION", "CANN_VERSION", "CANN_CHIP", "GPUSTACK_")
# The programs of a tools archive, by the folder download-tools puts each in.
PROGRAMS = ("llama-box", "gguf-parser", "fastfetch")
# The machine of a target architecture, as ELF (e_machine) and PE (COFF Machine) headers name it.
ELF_MACHINES = {62: "x86_64", 183: "aarch64", 3: "i386", 40: "arm", 243: "riscv64", 21: "ppc64"}
PE_MACHINES = {0x8664: "x86_64", 0xAA64: "aarch64", 0x14C: "i386", 0x1C4: "arm"}
TARGET_MACHINES = {"amd64": "x86_64", "arm64": "aarch64"}


@dataclass(frozen=True)
class Asset:
    path: str  # upstream URL path, "gpustack/<repo>/releases/download/<version>/<asset>"
    sha256: str
    size: int
    url: str = ""  # where this build fetched it ("" when it came from the cache)


@dataclass
class Archive:
    """A finished tools archive in the cache, and what it is made of."""

    path: Path
    sha256: str
    assets: list[Asset]
    llama_box_dir: str | None
    retargeted_from: str | None
    base_url: str
    # What the target's worker would have downloaded from upstream's own archive (before the fix).
    wanted_before_fix: list[str] = field(default_factory=list)
    # The llama-box asset a worker of the target picks (its device, toolkit version and chip),
    # which is the one the archive holds ("" in records of builds before it was checked).
    llama_box_asset: str = ""

    def manifest(self) -> dict[str, Any]:
        return {
            "archive": BUNDLE_PATH,
            "sha256": self.sha256,
            "llama_box_dir": self.llama_box_dir,
            "retargeted_from": self.retargeted_from,
            "wanted_before_fix": self.wanted_before_fix,
            "llama_box_asset": self.llama_box_asset,
            "base_url": self.base_url or "upstream (github.com or its COS mirror)",
            "assets": [a.__dict__ for a in sorted(self.assets, key=lambda a: a.path)],
        }


def target_identity(cell: Cell) -> dict[str, str]:
    """The machine facts the target's worker derives its tools from (gpustack.utils.platform):
    its system, arch and device kind (cuda, npu, rocm, musa, dcu; "" for a cpu host)."""
    device = cell.toolkit.worker.device if cell.toolkit else ""
    return {"system": cell.os, "arch": cell.arch, "device": device}


def download_env(cell: Cell, base: Mapping[str, str]) -> dict[str, str]:
    """The environment of a download-tools run: the host's, minus what would leak into the
    choice of assets, plus the cell's toolkit version and chip as the target's worker reads
    them (`CUDA_VERSION`; `CANN_VERSION`, `CANN_CHIP`)."""
    env = {k: v for k, v in base.items() if not k.startswith(HOST_ENV_LEAKS)}
    if cell.toolkit:
        env.update(cell.toolkit.env())
    return env


# --- the checksum lock ----------------------------------------------------------------------


class ToolsLock:
    """sha256 and size of every upstream asset, per GPUStack version; new assets are added."""

    def __init__(self, path: Path, frozen: bool) -> None:
        self.path = path
        self.frozen = frozen
        self._lock = threading.Lock()
        self.entries = self._read()

    def _read(self) -> dict[str, tuple[str, int]]:
        if not self.path.is_file():
            return {}
        data = read_toml(self.path, ToolsError, "fix or delete it")
        return {
            name: (str(entry["sha256"]), int(entry["size"]))
            for name, entry in data.get("assets", {}).items()
        }

    def expected(self, path: str) -> str | None:
        entry = self.entries.get(path)
        if entry is None and self.frozen:
            raise ToolsError(
                f"{path} is not in {self.path} and the build is frozen; run the build once "
                "without --frozen on the online side to record it, and review the change"
            )
        return entry[0] if entry else None

    def record(self, asset: Asset) -> None:
        with self._lock:
            known = self.entries.get(asset.path)
            if known and known[0] != asset.sha256:
                raise IntegrityError(
                    f"upstream asset {asset.path} changed: {self.path} has sha256 {known[0]}, "
                    f"the download has {asset.sha256}. The file was not kept. If the change is "
                    "intended, delete its entry from the lock, rebuild, and review the new sum"
                )
            self.entries[asset.path] = (asset.sha256, asset.size)

    def save(self, version: str) -> int:
        """Write the lock, merged with what another build wrote into the file meanwhile (the
        caller serialises saves); the number of entries the file did not have."""
        on_disk = self._read()
        with self._lock:
            for name, entry in on_disk.items():
                ours = self.entries.setdefault(name, entry)
                if ours[0] != entry[0]:
                    raise IntegrityError(
                        f"upstream asset {name} changed while this build ran: {self.path} now "
                        f"has sha256 {entry[0]}, this build fetched {ours[0]}. Rebuild, and "
                        "review the entry"
                    )
        lines = [
            f"# sha256 of every release asset `gpustack download-tools` fetched for GPUStack "
            f"{version}.\n# Written by the build; a changed asset is a build error. Review "
            "changes like code.\n"
        ]
        for name in sorted(self.entries):
            sha, size = self.entries[name]
            lines.append(f'\n[assets."{name}"]\nsha256 = "{sha}"\nsize = {size}\n')
        text = "".join(lines)
        if not self.path.is_file() or self.path.read_text() != text:
            write_text(self.path, text)
        return len(self.entries.keys() - on_disk.keys())


def lock_path(locks_dir: Path, version: str) -> Path:
    return locks_dir / f"gpustack-{version}.toml"


def sum_changes(
    before: Mapping[str, tuple[str, int]], after: Mapping[str, tuple[str, int]]
) -> list[str]:
    """What moved between two readings of a tools lock, one line per asset:
    `<path>: (none) -> sha256:<hex>` for an asset recorded anew."""

    def shown(entry: tuple[str, int] | None) -> str:
        return f"sha256:{entry[0]}" if entry else "(none)"

    return [
        f"{name}: {shown(before.get(name))} -> {shown(after.get(name))}"
        for name in sorted(before.keys() | after.keys())
        if before.get(name) != after.get(name)
    ]


# --- what a file is -------------------------------------------------------------------------


def expected_program(cell: Cell) -> str:
    """What each program of the cell's tools archive must be, in `file_kind`'s words."""
    machine = TARGET_MACHINES.get(cell.arch, cell.arch)
    return f"a PE for {machine}" if cell.os == "windows" else f"an ELF for {machine}"


def file_kind(path: Path) -> str:
    """What a file is, from its first bytes: "an ELF for x86_64", "a PE for aarch64", "an HTML
    page", "a zip archive", "a text file", "an empty file", "data (starts with ...)"."""
    with path.open("rb") as fh:
        head = fh.read(4096)
        if head[:2] == b"MZ" and len(head) >= 0x40:
            offset = int.from_bytes(head[0x3C:0x40], "little")
            fh.seek(offset)
            header = fh.read(6)
            if header[:4] == b"PE\0\0" and len(header) == 6:
                machine = int.from_bytes(header[4:6], "little")
                return f"a PE for {PE_MACHINES.get(machine, f'machine {machine:#x}')}"
    return bytes_kind(head)


def bytes_kind(head: bytes) -> str:
    """`file_kind` for the first bytes of a file (an ELF header, or what else it is)."""
    if not head:
        return "an empty file"
    if head[:4] == b"\x7fELF" and len(head) >= 20:
        machine = int.from_bytes(head[18:20], "big" if head[5] == 2 else "little")
        return f"an ELF for {ELF_MACHINES.get(machine, f'machine {machine}')}"
    text = head[:1024].lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in text:
        return "an HTML page"
    if head[:4] == b"PK\x03\x04" or head[:4] == b"PK\x05\x06":
        return "a zip archive"
    if head[:2] == b"\x1f\x8b":
        return "a gzip file"
    if head[:2] == b"MZ":
        return "a DOS/PE file without a PE header"
    try:
        decoded = head.decode()
    except UnicodeDecodeError:
        decoded = ""
    if decoded and all(c.isprintable() or c.isspace() for c in decoded):
        return "a text file"
    return f"data (it starts with {head[:8].hex(' ')})"


def asset_program(path: str) -> str | None:
    """The program an asset is for, from its repository (gpustack/<repo>/releases/...)."""
    parts = path.split("/")
    repo = parts[1] if len(parts) > 1 else ""
    return next((p for p in PROGRAMS if repo in (p, f"{p}-go")), None)


# The names an architecture goes by in upstream's asset names (fastfetch says aarch64).
_ARCH_NAMES = {"amd64": ("amd64", "x86_64"), "arm64": ("arm64", "aarch64")}
# Toolkit words of llama-box assets built for an accelerator (a CPU build names none of them).
_ACCELERATORS = ("cuda", "rocm", "hip", "cann", "musa", "dcu", "corex", "vulkan", "sycl")


def for_target(path: str, cell: Cell) -> bool:
    """Whether a recorded asset is one download-tools fetches for the cell's target, judged by
    its file name (`dl-llama-box-linux-amd64-cuda-12.4.zip`, `gguf-parser-windows-amd64.exe`,
    `fastfetch-linux-aarch64.zip`): the target's OS and architecture and, for llama-box, its
    toolkit (the cell's build: `cuda-12.8`, `cann-8.2.rc1-310p`, or no accelerator at all).
    Which assets a run fetches is
    known for sure only by running it; a version's tools lock records what such runs fetched."""
    name = path.rsplit("/", 1)[-1].lower()

    def names(word: str) -> bool:
        return re.search(rf"(^|[-_.]){re.escape(word)}([-_.]|$)", name) is not None

    if not names(cell.os) or not any(names(a) for a in _ARCH_NAMES.get(cell.arch, (cell.arch,))):
        return False
    if asset_program(path) != "llama-box":
        return True
    if cell.toolkit:  # the build's toolkit ends the name: ...-cann-8.2.rc1-310p.zip
        return name.endswith(f"-{cell.os}-{cell.arch}-{cell.toolkit.build}.zip")
    return not any(word in name for word in _ACCELERATORS)


def program_of(name: str) -> str | None:
    """The program a tools archive member is (`llama-box/<folder>/llama-box`,
    `gguf-parser/gguf-parser.exe`, ...), or None for any other member."""
    parts = name.strip("/").split("/")
    program = parts[-1].removesuffix(".exe")
    return program if program in PROGRAMS and parts[0] == program and len(parts) > 1 else None


def programs_in(files: list[str]) -> set[str]:
    """The programs among a tools archive's regular files (names relative to its root)."""
    return {p for p in map(program_of, files) if p}


# --- the asset proxy ------------------------------------------------------------------------


@dataclass
class AssetProxy:
    """A loopback server with upstream's release paths, backed by the blob cache and the lock."""

    store: BlobStore
    lock: ToolsLock
    base_url: str = ""  # "" = choose among UPSTREAM_BASES as upstream does
    program: str = ""  # what a program asset must be (`expected_program`); "" = not checked
    fetched: dict[str, Asset] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    url: str = ""

    def __post_init__(self) -> None:
        self._http = session()
        self._chosen = self.base_url.rstrip("/")
        self._guard = threading.Lock()

    def asset(self, path: str) -> Path:
        """The cached file for an upstream path, fetched and checked if needed."""
        expected = self.lock.expected(path)
        if expected and self.store.has(expected):
            blob = self.store.path(expected)
            self.fetched[path] = Asset(path, expected, blob.stat().st_size)
            return blob
        url = f"{self._base(path)}/{path}"
        size = self.lock.entries.get(path, (None, None))[1] if expected else None
        try:  # retried, resumed and checked by fetch.download
            sha = self.store.fetch_new(url, self._http, expect=expected, size=size)
        except HTTPStatusError as exc:
            raise ToolsError(
                f"{url} answered {exc.status}: the tools base URL does not have this asset. A "
                "site mirror must serve upstream's paths (/gpustack/<repo>/releases/download/...)"
            ) from None
        except DownloadError as exc:
            raise ToolsError(f"{exc}. The tools mirror option is tools-base-url") from None
        if expected is None:
            self._refuse_if_no_asset(url, path, sha)
        got = Asset(path, sha, self.store.path(sha).stat().st_size, url)
        self.lock.record(got)
        self.fetched[path] = got
        return self.store.path(sha)

    def _refuse_if_no_asset(self, url: str, path: str, sha: str) -> None:
        """A new asset that cannot be the release asset (a web page, a zip that is none, a
        program for another machine) is refused before anything records it, and its file is
        not kept."""
        blob = self.store.path(sha)
        kind = file_kind(blob)
        if path.endswith(".zip"):
            wanted: str | None = "a zip archive"
        else:
            wanted = (self.program or None) if asset_program(path) else None
        if kind != "an HTML page" and (wanted is None or kind == wanted):
            return
        blob.unlink(missing_ok=True)
        raise ToolsError(
            f"{redact(url)} answered {kind} (status 200), not the release asset: "
            f"{wanted or 'a release file'} was expected. It was not kept or recorded in "
            f"{self.lock.path}. The tools base URL (tools-base-url) must serve upstream's "
            "release files at upstream's paths: check it"
        )

    def _base(self, path: str) -> str:
        with self._guard:
            if not self._chosen:
                self._chosen = self._fastest(path)
            return self._chosen

    def _fastest(self, path: str) -> str:
        # Upstream times a ranged 512 KiB GET against each host and takes the faster.
        timings = []
        for base in UPSTREAM_BASES:
            started = time.monotonic()
            try:
                resp = self._http.get(
                    f"{base}/{path}", headers={"Range": "bytes=0-524287"}, timeout=5
                )
                resp.raise_for_status()
                timings.append((time.monotonic() - started, base))
            except requests.RequestException as exc:
                log.info("tools host %s: %s", base, exc)
        if not timings:
            raise ToolsError(
                f"neither {' nor '.join(UPSTREAM_BASES)} answered; set tools-base-url to a "
                "mirror of upstream's release downloads"
            )
        return min(timings)[1]

    @contextmanager
    def serving(self) -> Iterator[str]:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = self.path.lstrip("/").split("?")[0]
                try:
                    blob = proxy.asset(path)
                except BundleError as exc:
                    proxy.failures.append(str(exc))
                    self.send_error(502 if not isinstance(exc, ToolsError) else 404, str(exc)[:200])
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(blob.stat().st_size))
                self.end_headers()
                with blob.open("rb") as fh:
                    shutil.copyfileobj(fh, self.wfile)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                log.debug("tools proxy: " + format, *args)

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            self.url = f"http://127.0.0.1:{server.server_address[1]}"
            yield self.url
        finally:
            server.shutdown()
            server.server_close()


# --- the tool venv --------------------------------------------------------------------------


def tool_venv(cell: Cell, overrides: list[Override], cache: Path, index_url: str) -> Path:
    """The cell's GPUStack (with the overrides' extra requirements) in a venv for the build
    host, made once and cached; its python."""
    extra = [r for o in matching(overrides, cell) for r in o.extra_requirements]
    return gpustack_venv(cell.version, extra, cache, index_url)


def gpustack_venv(version: str, extra: list[str], cache: Path, index_url: str) -> Path:
    """GPUStack `version` and `extra` requirements in a venv for the build host, made once and
    cached; its python. Upstream's own commands (`download-tools`, `list-images`) run in it.

    The index URL reaches uv through `UV_INDEX_URL`, never its argument list: a password in it
    would show in `ps`, /proc and the logged command. The cache key leaves the password out
    too, so rotating it does not rebuild the venv."""
    spec = [f"gpustack=={version}", *sorted(set(extra))]
    identity = [spec, sys.version, without_credentials(index_url)]
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
    final = cache / "tools" / "venv" / f"gpustack-{version}-{key}"
    python = final / "bin" / "python"
    if python.exists():
        return python
    with _waiting(venv_lock(python), f"the GPUStack {version} tool venv"):
        if not python.exists():  # another build may have made it while this one waited
            _make_venv(version, spec, cache, index_url, final)
    return python


def start_modules(cell: Cell, overrides: list[Override], cache: Path, index_url: str) -> list[str]:
    """The Python files (relative to site-packages) that the cell's GPUStack loads for `gpustack
    start`, read from the release's own code in the tool venv once and kept beside it."""
    python = tool_venv(cell, overrides, cache, index_url)
    kept = python.parent.parent.with_name(python.parent.parent.name + ".start-modules.json")
    if not kept.is_file():
        out = run(
            [python, payload.path("start_modules.py")],
            env=download_env(cell, os.environ),
            what=f"listing what GPUStack {cell.version}'s start loads",
        ).stdout
        write_text(kept, out.strip().splitlines()[-1] + "\n")
    names: list[str] = json.loads(kept.read_text())
    return names


def venv_lock(python: Path) -> Path:
    """The flock file of the tool venv whose interpreter is `python`, beside the venv."""
    venv = python.parent.parent
    return venv.with_name(f"{venv.name}.lock")


@contextmanager
def _waiting(lock_file: Path, what: str) -> Iterator[None]:
    """`fsutil.held(lock_file)`, waiting for another build that holds it, and saying so."""
    with ExitStack() as stack:
        try:
            stack.enter_context(held(lock_file, what, wait=False))
        except Busy as exc:
            log.warning("%s; waiting for it", exc)
            stack.enter_context(held(lock_file, what))
        yield


def _make_venv(version: str, spec: list[str], cache: Path, index_url: str, final: Path) -> None:
    env = {**os.environ, "UV_CACHE_DIR": str(cache / "uv")}
    with atomic_dir(final) as stage:
        run(
            [sys.executable, "-m", "uv", "venv", "--quiet", "--python", sys.executable, stage],
            env=env, what=f"creating the GPUStack {version} tool venv",
        )  # fmt: skip
        run(
            [sys.executable, "-m", "uv", "pip", "install", "--quiet", "--python",
             stage / "bin" / "python", *spec],
            env={**env, "UV_INDEX_URL": index_url},
            what=f"installing GPUStack {version} into its tool venv",
            fix="the tool venv runs upstream's own commands on this host; check the index URL",
        )  # fmt: skip


# --- the archive: make, probe, retarget, normalise --------------------------------------------


def probe(python: Path, archive: Path, cell: Cell) -> dict[str, Any]:
    script = payload.path("tools_probe.py")
    out = run(
        [python, script, archive, json.dumps(target_identity(cell))],
        env=download_env(cell, os.environ),
        what=f"probing the tools archive for {cell.id}",
    ).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def retarget(tree: Path, want: str) -> str | None:
    """Rename the one llama-box folder to `want`; return the old name (None if already right)."""
    base = tree / "llama-box"
    folders = [p for p in base.iterdir() if p.name != "llama-box-default" and p.is_dir()
               and not p.is_symlink()]  # fmt: skip
    if len(folders) != 1:
        raise ToolsError(
            f"expected one llama-box folder in the archive, found {[p.name for p in folders]}"
        )
    old = folders[0].name
    if old == want:
        return None
    folders[0].rename(base / want)
    versions_file = tree / "versions.json"
    versions = json.loads(versions_file.read_text())
    versions[want] = versions.pop(old)
    versions_file.write_text(json.dumps(versions, indent=4))
    default = base / "llama-box-default"
    if default.is_symlink():
        default.unlink()
        default.symlink_to(want)
    return old


def write_archive(tree: Path, final: Path) -> None:
    """A reproducible tar.gz of `tree`: sorted entries, fixed times, root-owned."""
    with (
        atomic_path(final) as tmp,
        tmp.open("wb") as raw,
        gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tf,
    ):
        for path in sorted(tree.rglob("*")):
            info = tf.gettarinfo(path, arcname=str(path.relative_to(tree)))
            # Hard links: upstream's Windows layout makes llama-box-default a folder of them.
            if not (info.isreg() or info.isdir() or info.issym() or info.islnk()):
                raise ToolsError(f"{path}: only files, folders and links go into a tools archive")
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if not (info.issym() or info.islnk()):
                info.mode = 0o755 if path.is_dir() or os.access(path, os.X_OK) else 0o644
            if info.isreg():
                with path.open("rb") as fh:
                    tf.addfile(info, fh)
            else:
                tf.addfile(info)


def build_archive(cell: Cell, python: Path, proxy: AssetProxy, out: Path) -> Archive:
    """Run download-tools for the cell through the proxy; probe, retarget, normalise into `out`.

    The caller holds the tool venv's lock (`venv_lock`): download-tools rewrites the venv."""
    # inside `out`, the stage of the archive's folder: a killed build's scratch goes with it
    with tempfile.TemporaryDirectory(prefix="tools-", dir=out) as scratch:
        raw = Path(scratch) / "raw" / ARCHIVE_NAME
        with proxy.serving() as url:
            try:
                run(
                    [python, "-m", "gpustack.main", "download-tools",
                     "--tools-download-base-url", url, "--save-archive", raw,
                     "--system", cell.os, "--arch", cell.arch,
                     "--device", target_identity(cell)["device"] or "cpu"],
                    env=download_env(cell, os.environ),
                    what=f"gpustack {cell.version} download-tools for {cell.id}",
                )  # fmt: skip
            except BundleError:
                if proxy.failures:
                    raise ToolsError(proxy.failures[0]) from None
                raise
        tree = Path(scratch) / "tree"
        with tarfile.open(raw) as tf:
            safe_extract_tar(tf, tree, f"download-tools archive for {cell.id}")
        check_programs(cell, tree, proxy)
        first = probe(python, raw, cell)
        _fail_on_errors(cell, first)
        check_pick(cell, proxy, first["llama_box_asset"])
        moved = None
        if first["would_download"]:
            if not first["llama_box_dir"]:
                raise ToolsError(_incomplete(cell, first))
            moved = retarget(tree, first["llama_box_dir"])
        archive = out / ARCHIVE_NAME
        write_archive(tree, archive)
        second = probe(python, archive, cell)
        _fail_on_errors(cell, second)
        if second["would_download"]:
            raise ToolsError(_incomplete(cell, second))
    return Archive(
        path=archive,
        sha256=sha256_file(archive),
        assets=list(proxy.fetched.values()),
        llama_box_dir=second["llama_box_dir"],
        retargeted_from=moved,
        base_url=proxy.base_url,
        wanted_before_fix=first["would_download"],
        llama_box_asset=first["llama_box_asset"],
    )


def check_pick(cell: Cell, proxy: AssetProxy, picked: str) -> None:
    """The llama-box asset download-tools fetched is the one a worker of the target picks: the
    build for its device, toolkit version and chip (`picked`, from the probe)."""
    fetched = [a.path for a in proxy.fetched.values() if asset_program(a.path) == "llama-box"]
    if fetched != [picked.lstrip("/")]:
        raise ToolsError(
            f"{cell.id}: download-tools fetched {', '.join(fetched) or 'no llama-box'}, but a "
            f"GPUStack {cell.version} worker of the target ({target_identity(cell)}, "
            f"{cell.toolkit.env() if cell.toolkit else 'no toolkit'}) picks {picked}: the "
            "archive would hold another build than the one that target runs. Report it with "
            "the cell id"
        )


def check_programs(cell: Cell, tree: Path, proxy: AssetProxy) -> None:
    """Every program in the unpacked archive `tree` is an executable for the cell's target, and
    came from an asset this build fetched or took from the cache through the proxy (one that
    download-tools found already there would be missing from the record). A wrong asset's file
    fetched now is not kept; the lock is saved only after the build, so it is not recorded."""
    expected = expected_program(cell)
    sources = {asset_program(a.path): a for a in proxy.fetched.values()}
    files = sorted(p for p in tree.rglob("*") if p.is_file() and not p.is_symlink())
    for file in files:
        rel = file.relative_to(tree).as_posix()
        program = program_of(rel)
        if program is None:
            continue
        kind = file_kind(file)
        if kind == expected:
            continue
        asset = sources.get(program)
        if asset is None:
            why = "download-tools did not fetch it through this build. Rerun the build"
        elif asset.url:
            proxy.store.path(asset.sha256).unlink(missing_ok=True)
            why = (
                f"its asset came from {redact(asset.url)}, and was not kept or recorded in "
                f"{proxy.lock.path}. The tools mirror (tools-base-url) serves something other "
                "than upstream's release asset at that path: check it"
            )
        else:
            why = (
                f"its asset {asset.path} (sha256 {asset.sha256}) is the one {proxy.lock.path} "
                "lists: that entry is wrong. Delete it, rebuild, and review the new sum"
            )
        raise ToolsError(
            f"{cell.id}: {program} in the tools archive ({rel}) is {kind}, not {expected} as "
            f"the target needs; {why}"
        )
    missing = programs_in([f.relative_to(tree).as_posix() for f in files]) - sources.keys()
    if missing:
        raise ToolsError(
            f"{cell.id}: download-tools put {', '.join(sorted(missing))} into the tools archive "
            "without fetching it: another process changed the tool venv's "
            "gpustack/third_party/bin meanwhile. Rerun the build"
        )


def _fail_on_errors(cell: Cell, probed: Mapping[str, Any]) -> None:
    if probed["errors"]:
        raise ToolsError(
            f"{cell.id}: GPUStack {cell.version}'s worker code fails on the tools archive: "
            + "; ".join(probed["errors"])
        )


def _incomplete(cell: Cell, probed: Mapping[str, Any]) -> str:
    return (
        f"{cell.id}: the tools archive is not complete for the target: its worker would "
        f"download {', '.join(probed['would_download'])} at start. This project cannot fix the "
        "archive for this cell; report it with the cell id"
    )


def build(
    cell: Cell,
    cache: Path,
    locks_dir: Path,
    overrides: list[Override],
    index_url: str,
    base_url: str,
    frozen: bool,
    policy: RetryPolicy | None = None,
) -> Archive:
    """The cell's tools archive. Cells that share a target (extras, Python) share one archive,
    made once and cached with a record of its assets, which are checked against the lock again.

    The archive is made under the tool venv's lock, after looking at the cache again: a build
    that waited for another one finds what that one made."""
    python = tool_venv(cell, overrides, cache, index_url)
    lock = ToolsLock(lock_path(locks_dir, cell.version), frozen)
    identity = [cell.version, target_identity(cell), cell.cuda, str(python), base_url]
    if cell.toolkit and cell.toolkit.env().keys() - {"CUDA_VERSION"}:
        identity.append(cell.toolkit.env())  # the chip, the CANN version: another build
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
    final = (
        cache / "tools" / "archives" / f"{cell.version}-{cell.os}-{cell.arch}-{cell.device}-{key}"
    )
    archive = _cached(final, lock)
    if archive is None:
        with _waiting(venv_lock(python), f"the GPUStack {cell.version} tool venv"):
            archive = _cached(final, lock)  # another build may have made it meanwhile
            if archive is None:
                archive = _make_archive(cell, python, cache, lock, base_url, final, policy)
    if not frozen:
        with held(cache / "tools" / "locks.lock", f"saving {lock.path}"):
            added = lock.save(cell.version)
        if added:
            log.warning("recorded %d new assets in %s", added, lock.path)
    return archive


def _make_archive(
    cell: Cell,
    python: Path,
    cache: Path,
    lock: ToolsLock,
    base_url: str,
    final: Path,
    policy: RetryPolicy | None = None,
) -> Archive:
    proxy = AssetProxy(BlobStore(cache, policy), lock, base_url, program=expected_program(cell))
    with atomic_dir(final) as stage:
        archive = build_archive(cell, python, proxy, stage)
        record = {**archive.__dict__, "path": ARCHIVE_NAME,
                  "assets": [a.__dict__ for a in archive.assets]}  # fmt: skip
        (stage / "archive.json").write_text(json.dumps(record, indent=2))
    archive.path = final / ARCHIVE_NAME
    return archive


def _cached(final: Path, lock: ToolsLock) -> Archive | None:
    """The cached archive if it is intact and its record complete (an asset for every program
    it holds); its assets are checked against the lock (frozen or not), so deleting a lock
    entry or changing it is never hidden by the cache."""
    try:
        record = json.loads((final / "archive.json").read_text())
        archive = Archive(**{**record, "path": final / ARCHIVE_NAME,
                             "assets": [Asset(**a) for a in record["assets"]]})  # fmt: skip
    except (OSError, ValueError, TypeError):
        return None
    if not archive.path.is_file() or sha256_file(archive.path) != archive.sha256:
        return None
    try:
        with tarfile.open(archive.path) as tf:
            files = [m.name for m in tf if m.isfile() or m.islnk()]
    except (OSError, tarfile.TarError, EOFError):
        return None
    unrecorded = programs_in(files) - {asset_program(a.path) for a in archive.assets}
    if unrecorded:
        log.warning(
            "the cached tools archive %s holds %s but its record lists no asset for it; "
            "making it again", final, ", ".join(sorted(unrecorded)),
        )  # fmt: skip
        return None
    for asset in archive.assets:
        lock.expected(asset.path)
        lock.record(asset)
    return archive
