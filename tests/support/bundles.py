"""A small but real assembled pip bundle for the tests of what is made from one (SBOM, compare,
volumes, tar): tiny wheels built here with licences in their METADATA, a real tools archive
entry and a real image export."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import zipfile
from pathlib import Path
from typing import Any

from gpustack_offline.bundle import assemble as bundle
from gpustack_offline.bundle import sbom
from gpustack_offline.core.downloads import BlobStore
from gpustack_offline.core.files import sha256_file
from gpustack_offline.stages import tools
from gpustack_offline.stages.images import export_images
from gpustack_offline.stages.locks import Lock
from gpustack_offline.stages.wheels import Wheel
from support.registry_fixture import gpustack_tags, store_image

CELL = "v0.7.1-linux-amd64-cpu-py3.11-base-pip"
TOOL_PATHS = (
    "gpustack/llama-box/releases/download/v0.0.140/llama-box-linux-amd64-cpu.zip",
    "gpustack/gguf-parser-go/releases/download/v0.14.1/gguf-parser-linux-amd64",
)
# name, version, METADATA licence headers, origin (a URL, or how it was built)
WHEELS: tuple[tuple[str, str, str, str], ...] = (
    ("six", "1.17.0", "License: MIT\n", "https://files.example/six-1.17.0-py2.py3-none-any.whl"),
    ("attrs", "25.1.0", "License-Expression: MIT OR Apache-2.0\n", "https://files.example/a.whl"),
    (
        "certifi",
        "2025.1.31",
        "Classifier: License :: OSI Approved :: Mozilla Public License 2.0 (MPL 2.0)\n",
        "built from https://files.example/certifi-2025.1.31.tar.gz (sha256 " + "c" * 64 + ")",
    ),
)


def make_wheel(
    folder: Path,
    name: str,
    version: str,
    licence: str,
    payload: str = "",
    *,
    encoding: str = "utf-8",
    newline: str = "\n",
) -> Path:
    """A small valid wheel: a module, METADATA with the given licence headers (written in
    `encoding`, lines ended by `newline`), WHEEL, RECORD."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.4\nName: {name}\nVersion: {version}\n{licence}\n"
    members = {
        f"{name}.py": f"VALUE = {payload!r}\n".encode(),
        f"{info}/METADATA": metadata.replace("\n", newline).encode(encoding),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{info}/RECORD": b"",
    }
    with zipfile.ZipFile(path, "w") as zf:
        for member, text in members.items():
            zf.writestr(zipfile.ZipInfo(member, date_time=(2025, 1, 1, 0, 0, 0)), text)
    return path


def fake_root(real_root: Path, where: Path, lock_text: str = "lock-version = '1.0'\n") -> Path:
    """A project root whose scripts are the real ones and whose lock file is ours to change."""
    root = where / "root"
    (root / "bundles/locks" / CELL).mkdir(parents=True)
    (root / "scripts").symlink_to(real_root / "scripts")
    (root / "bundles/locks" / CELL / "pylock.toml").write_text(lock_text)
    return root


def make_bundle(
    matrix: Any,
    real_root: Path,
    where: Path,
    *,
    wheels: tuple[tuple[str, str, str, str], ...] = WHEELS,
    payload: str = "",
    lock_text: str = "lock-version = '1.0'\n",
    with_images: bool = True,
) -> Path:
    """An assembled bundle folder (bundle.assemble, as a build makes it) with wheels, a tools
    archive and, if asked, an image export; its SBOM is written the way a build would."""
    where.mkdir(parents=True, exist_ok=True)
    root = fake_root(real_root, where, lock_text)
    cell = matrix.cell(CELL)
    cache = where / "cache"
    cache.mkdir()
    made = []
    for name, version, licence, origin in wheels:
        path = make_wheel(cache, name, version, licence, payload if name == "six" else "")
        built = origin.startswith("built from")
        made.append(Wheel(name, version, path.name, sha256_file(path), path, origin, built))
    archive_path = cache / tools.ARCHIVE_NAME
    with gzip.GzipFile(archive_path, "wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tf:
        data = b"\x7fELF llama-box"
        info = tarfile.TarInfo("llama-box/llama-box")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    assets = [tools.Asset(p, f"{n + 1}" * 64, 1000 + n) for n, p in enumerate(TOOL_PATHS)]
    archive = tools.Archive(
        archive_path, sha256_file(archive_path), assets, "linux-amd64", None, ""
    )
    stage = where / "dist" / cell.id
    stage.mkdir(parents=True)
    exported = []
    if with_images:
        store = BlobStore(where / "blobs")
        image = store_image(
            store, "gpustack/gpustack:v0.7.1-cpu", gpustack_tags()["v0.7.1-cpu"]["linux/amd64"]
        )
        exported = export_images([image], store, stage / bundle.IMAGE_ARCHIVE)
    lock = Lock(root / "bundles/locks" / CELL / "pylock.toml", cell.id, "d")
    bundle.assemble(cell, made, lock, stage, root, archive, exported, inputs=[lock.path])
    return stage


def finish(stage: Path, manifest: dict[str, Any]) -> None:
    """Rewrite a bundle around a changed manifest, as assemble would have finished it: the SBOM,
    its entry, then manifest.json and SHA256SUMS."""
    (stage / sbom.SBOM_NAME).write_text(sbom.sbom_for(stage, manifest))
    entry = {
        "path": sbom.SBOM_NAME,
        "sha256": sha256_file(stage / sbom.SBOM_NAME),
        "size": (stage / sbom.SBOM_NAME).stat().st_size,
        "kind": "sbom",
        "origin": "generated",
    }
    files = [f for f in manifest["files"] if f["path"] != sbom.SBOM_NAME]
    manifest["files"] = sorted([*files, entry], key=lambda f: str(f["path"]))
    (stage / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    sums = [(f["path"], f["sha256"]) for f in manifest["files"]]
    sums.append(("manifest.json", sha256_file(stage / "manifest.json")))
    (stage / "SHA256SUMS").write_text("".join(f"{h}  {p}\n" for p, h in sorted(sums)))
