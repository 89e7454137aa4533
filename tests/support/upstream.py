"""Upstream's own files, copied byte for byte under tests/fixtures/upstream/, read as upstream
reads them: the build matrix of llama-box's release workflow (which builds, hence which assets,
each llama-box release has), the publish matrix of GPUStack's docker-ci.yaml (which image tag
each device has) and the `docker run` lines of GPUStack's installation docs (which options each
device's image is started with). `SOURCES.toml` there names where each copy came from and its
git blob id.

The loopback release mirror serves the llama-box assets these workflows name, and the matrix's
0.x data is checked against them (tests/test_devices0.py).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import re
import subprocess
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

UPSTREAM = Path(__file__).resolve().parent.parent / "fixtures" / "upstream"
SOURCES = UPSTREAM / "SOURCES.toml"


@dataclass(frozen=True)
class Copy:
    copy: str  # the path under tests/fixtures/upstream/
    repository: str
    tag: str
    commit: str
    path: str  # in the repository
    blob: str  # git's blob id of the file at the tag

    @property
    def file(self) -> Path:
        return UPSTREAM / self.copy


@functools.cache
def copies() -> tuple[Copy, ...]:
    with SOURCES.open("rb") as fh:
        return tuple(Copy(**entry) for entry in tomllib.load(fh)["file"])


def git_blob(data: bytes) -> str:
    """The id git gives a file's content (`git hash-object`)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def read(repository: str, tag: str, path: str) -> str:
    """The copy of `path` of `repository` at `tag`."""
    for c in copies():
        if (c.repository, c.tag, c.path) == (repository, tag, path):
            return c.file.read_text()
    raise KeyError(f"no copy of {repository} {tag}:{path} under {UPSTREAM} (see {SOURCES})")


# -- llama-box's release workflow ---------------------------------------------------------------

# `zip -j …/out/NAME.zip` (Linux jobs), `-DestinationPath "…\out\NAME.zip"` (Windows jobs)
_ZIP = re.compile(r"out[/\\]((?:dl-)?llama-box-(?:\$\{\{.*?\}\}|[^\s\"$])*?\.zip)")
_MATRIX_VALUE = re.compile(r"\$\{\{\s*matrix\.(\w+)\s*\}\}")
# `${{ contains(matrix.distro_container_image, '310p') && '-310p' || '' }}`
_CONTAINS = re.compile(
    r"\$\{\{\s*contains\(matrix\.(\w+),\s*'([^']*)'\)\s*&&\s*'([^']*)'\s*\|\|\s*'([^']*)'\s*\}\}"
)


@dataclass(frozen=True)
class Build:
    """One asset a llama-box release publishes: `dl-llama-box-linux-arm64-cann-8.2.rc1-310p.zip`
    is (linux, arm64, cann-8.2.rc1-310p, dynamic)."""

    name: str
    os: str
    arch: str
    toolkit: str  # what follows <os>-<arch>- in the name: cpu, avx2, cuda-12.4, hip-6.2 …
    dynamic: bool  # dl-llama-box-… (0.7's default) or llama-box-… (static)


def _entries(job: Mapping[str, Any]) -> Iterator[dict[str, str]]:
    """A job's matrix entries: its `include` list, else the product of its axes."""
    matrix = (job.get("strategy") or {}).get("matrix") or {}
    if "include" in matrix:
        yield from ({k: str(v) for k, v in e.items()} for e in matrix["include"])
        return
    axes = {k: v for k, v in matrix.items() if isinstance(v, list)}
    for combo in itertools.product(*axes.values()):
        yield dict(zip(axes, map(str, combo), strict=True))


def _expand(template: str, entry: Mapping[str, str]) -> str:
    def contains(m: re.Match[str]) -> str:
        return m[3] if m[2] in entry.get(m[1], "") else m[4]

    text = _CONTAINS.sub(contains, template)
    return _MATRIX_VALUE.sub(lambda m: entry[m[1]], text)


@functools.cache
def llama_box_builds(tag: str) -> tuple[Build, ...]:
    """Every Linux and Windows asset the release workflow of llama-box `tag` builds."""
    workflow = yaml.safe_load(read("gpustack/llama-box", tag, ".github/workflows/ci.yml"))
    found: dict[str, Build] = {}
    for name, job in workflow["jobs"].items():
        if not name.startswith(("linux", "windows")):
            continue
        templates = [t for step in job.get("steps", []) for t in _ZIP.findall(step.get("run", ""))]
        for entry, template in itertools.product(list(_entries(job)), templates):
            asset = _expand(template, entry)
            dynamic = asset.startswith("dl-")
            stem = asset.removeprefix("dl-").removeprefix("llama-box-").removesuffix(".zip")
            os_name, arch, toolkit = stem.split("-", 2)
            found[asset] = Build(asset, os_name, arch, toolkit, dynamic)
    return tuple(found[n] for n in sorted(found))


# -- GPUStack's image workflow ------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    """One entry of docker-ci.yaml's publish-docker matrix."""

    device: str  # upstream's device kind: cuda, npu, rocm, musa, dcu, cpu, corex
    dockerfile: str
    tag: str  # the tag suffix
    platforms: tuple[str, ...]
    build_args: Mapping[str, str]


def _tag(version: str) -> str:
    return f"v{version.removeprefix('v')}"


def docker_images(version: str) -> tuple[Image, ...]:
    """The images GPUStack `version` publishes, as its docker-ci.yaml builds them."""
    text = read("gpustack/gpustack", _tag(version), ".github/workflows/docker-ci.yaml")
    matrix = yaml.safe_load(text)["jobs"]["publish-docker"]["strategy"]["matrix"]["include"]
    return tuple(
        Image(
            device=e["device"],
            dockerfile=e["dockerfile"],
            tag=e["tag_suffix"],
            platforms=tuple(e["platforms"].split(",")),
            build_args=dict(a.split("=", 1) for a in e.get("build_args") or []),
        )
        for e in matrix
    )


def dockerfile_arg(version: str, dockerfile: str, name: str) -> str:
    """The default of `ARG name=…` in the version's Dockerfile (0.6: at the root; 0.7: pack/)."""
    for path in (f"pack/{dockerfile}", dockerfile):
        try:
            text = read("gpustack/gpustack", _tag(version), path)
        except KeyError:
            continue
        match = re.search(rf"^ARG {re.escape(name)}=(\S+)", text, re.MULTILINE)
        if match:
            return match[1]
        raise KeyError(f"{path} of GPUStack {version} has no default for ARG {name}")
    raise KeyError(f"no copy of {dockerfile} of GPUStack {version} under {UPSTREAM}")


# -- GPUStack's installation docs -----------------------------------------------------------------

_RUN = "docker run -d --name gpustack"
_DATA = "-v gpustack-data:/var/lib/gpustack"


def docker_run_options(version: str, doc: str) -> dict[str, tuple[str, ...]]:
    """Per image the `docker run` lines of the doc start (`gpustack/gpustack:latest-npu`), the
    option lines between `--restart=unless-stopped` and the data volume, as the doc writes them;
    every line of the doc that starts the same image must give the same options."""
    lines = read("gpustack/gpustack", _tag(version), doc).splitlines()
    found: dict[str, tuple[str, ...]] = {}
    for start, line in enumerate(lines):
        if line.strip() != f"{_RUN} \\":
            continue
        block = []
        for text in lines[start + 1 :]:
            block.append(text.strip().removesuffix("\\").strip())
            if not text.rstrip().endswith("\\"):
                break
        assert block[0] == "--restart=unless-stopped", block
        end = block.index(_DATA)
        image = block[end + 1].split()[0]
        options = tuple(block[1:end])
        assert found.setdefault(image, options) == options, (doc, image)
    return found


def run_gpustack(
    root: Path, version: str, script: str, *args: str | Path, env: Mapping[str, str] = {}
) -> str:
    """`script` run by the Python of upstream's GPUStack `version` (the tools stage's venv, made
    once and cached; PyPI the first time), in this environment less GPUSTACK_* settings plus
    `env`; its stdout. A failed run fails the test with the end of its stderr."""
    from gpustack_offline.core.options import resolve
    from gpustack_offline.stages.tools import gpustack_venv

    opts = resolve(root)
    python = gpustack_venv(version, [], Path(opts.cache_dir), opts.index_url)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GPUSTACK_")}
    out = subprocess.run(
        [python, "-c", script, *map(str, args)], capture_output=True, text=True,
        env={**environ, **env}, timeout=300, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout
