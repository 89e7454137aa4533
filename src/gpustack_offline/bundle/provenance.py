"""Where a bundle came from: the project's commit, the digest of every input file, every image
and tool it carries, and the machine that built it.

Two builds from the same commit and the same locks should differ only in when and where they
ran; this record (merged into `manifest.json` as `provenance`) is what `compare` checks that
against. The host's facts are kept under one key, `host`, so a comparison can set them apart.
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gpustack_offline import __version__
from gpustack_offline.core.errors import BundleError
from gpustack_offline.core.files import sha256_file
from gpustack_offline.core.processes import run
from gpustack_offline.stages import tools

# Where upstream's download-tools fetches from when no base URL is set (the first of
# tools.UPSTREAM_BASES); a bundle names this URL for an asset taken from the cache.
CANONICAL_TOOLS_BASE = tools.UPSTREAM_BASES[0]


def tool_url(base_url: str, path: str) -> str:
    """The download URL of a tools asset: the site mirror's if the build used one, else upstream's.

    Whether this build fetched the asset or found it in the cache does not change the answer,
    so two builds of the same inputs name the same URL."""
    base = base_url if base_url.startswith(("http://", "https://")) else CANONICAL_TOOLS_BASE
    return f"{base.rstrip('/')}/{path.lstrip('/')}"


def tool_commit(root: Path) -> str:
    try:
        head = run(["git", "-C", root, "rev-parse", "HEAD"], what="git rev-parse").stdout.strip()
        # without the index lock git status takes to refresh: a build killed meanwhile must not
        # leave .git/index.lock behind in the checkout
        status: list[str | Path] = ["git", "--no-optional-locks", "-C", root, "status"]
        dirty = run([*status, "--porcelain"], what="git status").stdout.strip()
    except Exception:  # noqa: BLE001 - a bundle built outside a checkout has no commit
        return "unknown"
    return head + ("-dirty" if dirty else "")


def shown_path(path: Path, root: Path) -> str:
    """A path as the manifest shows it: relative to the project, absolute when outside it."""
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path.resolve())


def _docker_version() -> str | None:
    try:
        proc = run(
            ["docker", "version", "--format", "{{.Server.Version}}"],
            what="docker version",
            timeout=15,
        )
    except (BundleError, OSError, subprocess.TimeoutExpired):
        return None  # no Docker here: a pip cell builds without it
    return proc.stdout.strip() or None


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def build_host() -> dict[str, str | None]:
    """Facts of the machine that built the bundle; expected to differ between two builds."""
    return {
        "system": platform.system(),
        "machine": platform.machine(),
        "release": platform.release(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "docker_server": _docker_version(),
        "uv": _package_version("uv"),
    }


def provenance(
    root: Path,
    lock_paths: Sequence[Path],
    tools_manifest: Mapping[str, Any] | None,
    images: Sequence[Mapping[str, Any]],
    commit: str | None = None,
) -> dict[str, Any]:
    """The `provenance` section of a bundle's manifest.

    `lock_paths` are the input files to fingerprint (the recipe's `inputs`); `tools_manifest` is
    `tools.Archive.manifest()` or None; `images` the manifest's image entries."""

    tools_section = None
    if tools_manifest is not None:
        base = str(tools_manifest.get("base_url", ""))
        tools_section = {
            "archive_sha256": tools_manifest["sha256"],
            "assets": [
                {"url": tool_url(base, a["path"]), "sha256": a["sha256"]}
                for a in sorted(tools_manifest.get("assets", []), key=lambda a: str(a["path"]))
            ],
        }
    return {
        "project": {
            "name": "gpustack-offline",
            "version": __version__,
            "commit": commit or tool_commit(root),
        },
        "inputs": sorted(
            ({"path": shown_path(p, root), "sha256": sha256_file(p)} for p in lock_paths),
            key=lambda entry: entry["path"],
        ),
        "images": sorted(
            (
                {"reference": i["reference"], "digest": i["digest"], "platform": i["platform"]}
                for i in images
            ),
            key=lambda entry: (entry["reference"], entry["platform"]),
        ),
        "tools": tools_section,
        "host": build_host(),
    }
