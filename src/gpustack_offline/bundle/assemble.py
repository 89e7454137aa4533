"""One bundle per cell or model: `dist/<id>/` and `dist/<id>.tar`, with manifest and sums.

The folder is assembled beside its final name and renamed into place only when complete, and the
tar likewise, so an interrupted build never leaves a bundle that looks finished. A cell's bundle
(`assemble`) and a model's (`assemble_model`) list their files, write the SBOM, manifest and
SHA256SUMS the same way (`_Listing`).
"""

from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.utils import canonicalize_name

from gpustack_offline import __version__
from gpustack_offline.bundle import catalog, provenance, sbom, tarball
from gpustack_offline.core.files import (
    atomic_path,
    link_or_copy,
    remove_temps,
    sha256_file,
)
from gpustack_offline.core.matrix import Cell
from gpustack_offline.core.models import Model
from gpustack_offline.stages import images as images_
from gpustack_offline.stages import tools
from gpustack_offline.stages.locks import Lock
from gpustack_offline.stages.model_locks import ModelLock
from gpustack_offline.stages.wheels import Wheel, requirements_txt, simple_index

SCHEMA_VERSION = 1
# The images' export folder (`stages.images.export_images`): an OCI layout whose blobs are hard
# links into the cache; `install.sh` streams it into `docker load` as a tar. Bundles before it
# named a tar, `images/images.tar`, under the same key; the site scripts read both.
IMAGE_ARCHIVE = "images"
README_TEMPLATES = ("README.md", "README.zh-CN.md")
START_MODULES = "start-modules.txt"
# The docker run options of the cell's device, one a line: a GPUStack 2.x worker's, a 0.x
# image's as upstream's docs run it (install.sh prints them in its run line; an option may hold
# spaces and quotes, which bundle.env cannot)
WORKER_OPTIONS = "worker-options.txt"
DEVICE_KEYS = (
    "DEVICE_BACKEND", "DEVICE_FLOOR", "DEVICE_VARIANT", "DEVICE_CEILING", "DEVICE_NEWEST",
    "DEVICE_TOOLKIT", "DEVICE_TOOL", "DEVICE_VERSION_READER", "DEVICE_RUNTIME", "DEVICE_NODES",
    "DEVICE_PATHS", "WORKER_OPTIONS", "DEVICE_BUILD",
)  # fmt: skip
MODEL_SCRIPTS = ("install-model.sh", "check-sums.sh", "verify-signature.sh")
MODEL_README = "README.model.md"  # scripts/ template, shipped as README.md
MODELS_DIR = "models"  # a model bundle's files: models/<name>/<path in the repository>


@dataclass(frozen=True)
class Result:
    id: str  # the cell's id, or the model's bundle id
    directory: Path
    tar: Path
    files: int
    bytes: int
    seconds: float
    lock_state: str
    stages: str = ""  # reused or rebuilt, and why


def bundle_env(
    cell: Cell,
    tools_archive: str = "",
    images: Sequence[images_.ExportedImage] = (),
    installer_wheel: str = "",
    start_modules: str = "",
) -> dict[str, str]:
    return {
        "BUNDLE_CELL": cell.id,
        "GPUSTACK_VERSION": cell.version,
        "TARGET_OS": cell.os,
        "TARGET_ARCH": cell.arch,
        "TARGET_DEVICE": cell.device,
        "TARGET_PYTHON": cell.python,
        "TARGET_EXTRAS": cell.extras,
        "INSTALL_METHOD": cell.method,
        "GLIBC_FLOOR": cell.glibc or "",
        "CUDA_FLOOR": cell.cuda or "",
        "ROCM_FLOOR": cell.rocm or "",
        "REQUIREMENT": cell.requirement,
        "TOOLS_ARCHIVE": tools_archive,
        # the uv wheel install.sh installs the wheelhouse with (pip when empty or --installer pip)
        "INSTALLER_WHEEL": installer_wheel,
        # what `gpustack start` loads, one path under site-packages per line: compiled by install.sh
        "START_MODULES": start_modules,
        "IMAGE_ARCHIVE": IMAGE_ARCHIVE if images else "",
        # what `install.sh --registry` uploads with the bundle's own bytes (see images.push_list)
        "IMAGE_PUSH": images_.PUSH_LIST if images else "",
        # comma-separated: bundle.env is read by sh and PowerShell, so no value has a space
        "IMAGES": ",".join(_familiar(i.reference) for i in images),
        **device_env(cell),
    }


def device_env(cell: Cell) -> dict[str, str]:
    """What preflight.sh checks on a host of an accelerator other than a 0.x CUDA one, from the
    matrix (2.x: the runner data and the cell's [backends] table; 0.x: the llama-box build and
    the table's "0.x" part): the backend, its floor (and for 2.x its ceiling), the device tool,
    the version reader, the container runtime, device nodes and folders (a 0.x image's: those
    its run line names); for 0.x the build the bundle carries. Empty values for other cells."""
    vendor = cell.vendor
    device = cell.runner_device or (cell.toolkit.device if cell.toolkit else None)
    if device is None or vendor is None:
        return dict.fromkeys(DEVICE_KEYS, "")
    return {
        "DEVICE_BACKEND": device.backend,
        "DEVICE_FLOOR": device.version,
        "DEVICE_VARIANT": device.variant,
        "DEVICE_CEILING": cell.ceiling or "",
        "DEVICE_NEWEST": cell.newest or "",
        "DEVICE_TOOLKIT": vendor.toolkit,
        "DEVICE_TOOL": ",".join(vendor.tool),
        "DEVICE_VERSION_READER": vendor.version,
        "DEVICE_RUNTIME": vendor.runtime,
        "DEVICE_NODES": ",".join(vendor.devices),
        "DEVICE_PATHS": ",".join(vendor.paths),
        "WORKER_OPTIONS": WORKER_OPTIONS if cell.worker_options() else "",
        # 0.x: the llama-box build in the tools archive (cann-8.2.rc1-310p), for messages
        "DEVICE_BUILD": cell.toolkit.build if cell.toolkit else "",
    }


def _familiar(reference: str) -> str:
    """docker.io/gpustack/gpustack:v0.7.1 -> gpustack/gpustack:v0.7.1, as `docker images` shows."""
    return reference.removeprefix("docker.io/").removeprefix("library/")


def render(template: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        template = template.replace("{{" + key + "}}", value or "-")
    return template


def _scripts(cell: Cell) -> tuple[str, ...]:
    entry = (
        ("install.ps1",)
        if cell.os == "windows"
        else ("install.sh", "check-sums.sh", "preflight.sh", "verify-signature.sh")
    )
    return (*entry, "check-tools-archive.py")


class _Listing:
    """The files of a bundle being staged, each with sha256, size, kind and origin; `finish`
    writes the SBOM, the manifest that lists them and SHA256SUMS over them all."""

    def __init__(self, stage: Path) -> None:
        self.stage = stage
        self.files: list[dict[str, Any]] = []

    def add(self, rel: str, kind: str, origin: str, sha256: str | None = None) -> None:
        path = self.stage / rel
        self.files.append(
            {"path": rel, "sha256": sha256 or sha256_file(path), "size": path.stat().st_size,
             "kind": kind, "origin": origin}
        )  # fmt: skip

    def texts(self, texts: dict[str, str]) -> None:
        for rel, text in texts.items():
            (self.stage / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.stage / rel).write_text(text)
            self.add(rel, "lock" if rel.startswith("lock/") else "config", "generated")

    def scripts(self, root: Path, names: Sequence[str]) -> None:
        for name in names:
            (self.stage / name).write_bytes((root / "scripts" / name).read_bytes())
            os.chmod(self.stage / name, 0o755)
            self.add(name, "script", f"scripts/{name}")

    def finish(self, manifest: dict[str, Any]) -> dict[str, Any]:
        stage = self.stage
        manifest["files"] = sorted(self.files, key=lambda f: str(f["path"]))
        (stage / sbom.SBOM_NAME).write_text(sbom.sbom_for(stage, manifest))
        self.add(sbom.SBOM_NAME, "sbom", "generated")
        manifest["files"] = sorted(self.files, key=lambda f: str(f["path"]))
        (stage / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        sums = [(f["path"], f["sha256"]) for f in self.files]
        sums.append(("manifest.json", sha256_file(stage / "manifest.json")))
        (stage / "SHA256SUMS").write_text("".join(f"{h}  {p}\n" for p, h in sorted(sums)))
        return manifest


def _built_at() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def assemble(
    cell: Cell,
    wheels: Iterable[Wheel],
    lock: Lock | None,
    stage: Path,
    root: Path,
    tools_archive: tools.Archive | None = None,
    images: Sequence[images_.ExportedImage] = (),
    inputs: Sequence[Path] = (),
    start_modules: Sequence[str] = (),
) -> dict[str, Any]:
    """Write the bundle's files into `stage` (the images folder, if any, is already there);
    return the manifest."""
    wheels = list(wheels)
    listing = _Listing(stage)
    add = listing.add
    for w in wheels:
        link_or_copy(w.path, stage / "wheels" / w.filename)
        add(f"wheels/{w.filename}", "built-wheel" if w.built else "wheel", w.origin)
    for rel, text in simple_index(wheels).items():
        (stage / "wheels/simple" / rel).parent.mkdir(parents=True, exist_ok=True)
        (stage / "wheels/simple" / rel).write_text(text)
        add(f"wheels/simple/{rel}", "index", "generated")
    if tools_archive:
        link_or_copy(tools_archive.path, stage / tools.BUNDLE_PATH)
        add(tools.BUNDLE_PATH, "tools", f"gpustack {cell.version} download-tools")
    if images:
        _add_images(stage, add)
    installer = lock.installer_names() if lock else set()
    installer_wheel = next(
        (f"wheels/{w.filename}" for w in wheels if canonicalize_name(w.name) in installer), ""
    )
    modules_file = START_MODULES if start_modules else ""
    env = bundle_env(
        cell, tools.BUNDLE_PATH if tools_archive else "", images, installer_wheel, modules_file
    )
    texts = {"bundle.env": "".join(f"{k}={v}\n" for k, v in env.items())}
    if start_modules:
        texts[START_MODULES] = "".join(f"{name}\n" for name in start_modules)
    if env["WORKER_OPTIONS"]:
        texts[WORKER_OPTIONS] = "".join(f"{option}\n" for option in cell.worker_options())
    if images:
        texts[images_.PUSH_LIST] = images_.push_list(stage / IMAGE_ARCHIVE)
    if lock is not None:
        texts["requirements.txt"] = requirements_txt(cell, wheels, installer)
        texts["lock/pylock.toml"] = lock.path.read_text()
    listing.texts(texts)
    listing.scripts(root, _scripts(cell))
    for name in README_TEMPLATES:
        (stage / name).write_text(render((root / "scripts" / name).read_text(), env))
        add(name, "doc", f"scripts/{name}")

    commit = provenance.tool_commit(root)  # once: git runs once, the manifest names it twice
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "cell": cell.as_dict(),
        "gpustack_version": cell.version,
        "tool": {"name": "gpustack-offline", "version": __version__, "commit": commit},
        "built_at": _built_at(),
        "lock": (
            {"path": provenance.shown_path(lock.path, root), "sha256": lock.digest()}
            if lock
            else None
        ),
        "tools": tools_archive.manifest() if tools_archive else None,
        "images": [i._asdict() for i in images],
        "files": [],
    }
    manifest["provenance"] = provenance.provenance(
        root, inputs, tools_archive.manifest() if tools_archive else None,
        [i._asdict() for i in images], commit,
    )  # fmt: skip
    return listing.finish(manifest)


def model_env(model: Model, lock: ModelLock) -> dict[str, str]:
    """A model bundle's `bundle.env`, read by install-model.sh (bash alone: values are quoted
    for it; a path from the hub may hold a space)."""
    folder = f"{MODELS_DIR}/{model.name}"
    entries = catalog.fragments(model, lock)
    return {
        "BUNDLE_KIND": "model",
        "BUNDLE_ID": model.bundle_id,
        "MODEL_NAME": model.name,
        "MODEL_SOURCE": model.source,
        "MODEL_REPOSITORY": model.repository,
        "MODEL_REVISION": model.revision,
        "MODEL_COMMIT": lock.commit,
        "MODEL_BACKEND": model.backend,
        "MODEL_DIR": folder,
        # what the catalog's local_path names inside the folder; empty: the folder itself
        "MODEL_ENTRY": model.entry(f.path for f in lock.files),
        **{
            f"CATALOG_GPUSTACK_{s}": catalog.fragment_path(s)
            if catalog.fragment_path(s) in entries
            else ""
            for s in catalog.SERIES
        },
        "CATALOG_DEFAULT": catalog.default_series(model),
    }


def assemble_model(
    model: Model,
    lock: ModelLock,
    blobs: dict[str, Path],
    stage: Path,
    root: Path,
    inputs: Sequence[Path] = (),
) -> dict[str, Any]:
    """Write a model's bundle into `stage`: its files (hard links to the checked blobs),
    catalog entries, lock, installer; return the manifest. `blobs` maps each locked path to
    its blob, already checked against the lock's sha256 (so the sums do not read it again)."""
    listing = _Listing(stage)
    folder = f"{MODELS_DIR}/{model.name}"
    origin = f"{model.source} {model.repository}@{lock.commit}"
    for f in lock.files:
        link_or_copy(blobs[f.path], stage / folder / f.path)
        listing.add(f"{folder}/{f.path}", "model-file", origin, f.sha256)
    env = model_env(model, lock)
    texts = {
        "bundle.env": "".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items()),
        f"lock/{model.name}.toml": lock.path.read_text(),
        **catalog.fragments(model, lock),
    }
    listing.texts(texts)
    listing.scripts(root, MODEL_SCRIPTS)
    (stage / "README.md").write_text(render((root / "scripts" / MODEL_README).read_text(), env))
    listing.add("README.md", "doc", f"scripts/{MODEL_README}")
    commit = provenance.tool_commit(root)
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "bundle": {"id": model.bundle_id, "kind": "model"},
        "model": {
            "name": model.name,
            "source": model.source,
            "repository": model.repository,
            "revision": model.revision,
            "commit": lock.commit,
            "backend": model.backend,
            "entry": env["MODEL_ENTRY"],
            "size": lock.size,
        },
        "tool": {"name": "gpustack-offline", "version": __version__, "commit": commit},
        "built_at": _built_at(),
        "lock": {"path": provenance.shown_path(lock.path, root), "sha256": lock.digest()},
        "files": [],
    }
    manifest["provenance"] = provenance.provenance(root, inputs, None, [], commit)
    return listing.finish(manifest)


def _add_images(stage: Path, add: Callable[[str, str, str, str | None], None]) -> None:
    """Every file of the images folder, `index.json` as the one of kind `images` (the SBOM's
    entry point). A blob's sha256 is its name: `export_images` hashed each against it when it
    linked it, so the sums do not read the (large) blobs a second time."""
    folder = stage / IMAGE_ARCHIVE
    origin = "registry pull (see images)"
    for member in images_.layout_members(folder):
        rel = f"{IMAGE_ARCHIVE}/{member}"
        if (folder / member).is_dir():
            continue
        if member.startswith(f"{images_.BLOBS}/"):
            add(rel, "image-blob", origin, member.rsplit("/", 1)[-1])
        else:
            add(rel, "images" if member == "index.json" else "image-layout", origin, None)


def write_tar(directory: Path, final: Path) -> None:
    """A plain tar of the bundle folder (wheels are compressed already), files in sorted order,
    streamed from the folder (`bundle.tarball`): the one copy of the bundle's bytes beyond the
    cache, written under a temporary name and renamed when whole."""
    with atomic_path(final) as tmp, tmp.open("wb") as out:
        tarball.write(tarball.members(directory), out)


def clear_previous(final_dir: Path, tar: Path) -> None:
    """Before a rebuild: the old tar goes (it would not match the new folder if the build
    stopped between the two), and so does what killed builds of this cell left half-written.
    Only under the cell's lock (`recipes.base.build`): no other build of the cell is live then."""
    tar.unlink(missing_ok=True)
    remove_temps(final_dir)
    remove_temps(tar)


def result(
    bundle_id: str,
    final_dir: Path,
    manifest: dict[str, Any],
    started: float,
    lock_state: str,
    stages: str = "",
) -> Result:
    files = manifest["files"]
    return Result(
        id=bundle_id,
        directory=final_dir,
        tar=final_dir.with_name(f"{bundle_id}.tar"),
        files=len(files) + 2,  # with manifest.json and SHA256SUMS
        bytes=sum(int(f["size"]) for f in files),
        seconds=time.monotonic() - started,
        lock_state=lock_state,
        stages=stages,
    )
