"""The pip benchmark: upstream's recipe for a pip install against this pipeline, in one run.

For each cell (linux-amd64 and linux-arm64 base, arm64 under qemu):

- **build**: upstream's `pip download --only-binary=:all:` with the target's platform tags and
  Python into an empty folder with an empty pip cache, against `invoke bundle` of the cell from
  an empty cache (its lock, wheels, tools and bundle), then again with the cache and the bundle
  kept: the warm rebuild, with every download address dead so that one byte fetched would fail
  it.
- **install**: in one clean container of the target, upstream's `pip install --no-index
  --require-hashes` of the bundle's wheelhouse into a fresh venv, against `install.sh` (uv, the
  default) and `install.sh --installer pip` of the same bundle, each into a prefix of its own.
  install.sh's figures are whole runs: sums, venv, install, bytecode of what the start loads,
  `gpustack version`, the tools archive; upstream's is the pip command alone.

The tools come from the loopback release mirror of the tests (github.com is not reachable here),
so the cold build downloads its wheels and the tool venv from PyPI and its tools from loopback.

    python tests/bench_seed.py --pip-only      # just this table
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import _mb, tree_bytes
from support.release_mirror import ReleaseMirror, build_assets, write_fixture_locks

from gpustack_offline.cli import commands
from gpustack_offline.core.docker import base_image, container, exec_in
from gpustack_offline.core.errors import BundleError
from gpustack_offline.core.matrix import Cell

CELLS = ("v0.7.1-linux-amd64-cpu-py3.11-base-pip", "v0.7.1-linux-arm64-cpu-py3.11-base-pip")
DEAD = "http://127.0.0.1:9"
# manylinux tags pip download accepts for a glibc 2.35 target, newest first
MANYLINUX = (
    "manylinux_2_35",
    "manylinux_2_34",
    "manylinux_2_28",
    "manylinux_2_17",
    "manylinux2014",
)


@dataclasses.dataclass
class PipRow:
    cell: str
    naive_download_s: float
    naive_bytes: int
    cold_s: float
    warm_s: float
    warm_stages: str
    bundle_bytes: int
    pip_install_s: float
    uv_install_s: float
    uv_step_s: float  # install.sh's own figure for its install step (venv, uv, bytecode)
    pip_script_s: float | None  # install.sh --installer pip; None where not measured

    @property
    def warm_ratio(self) -> float:
        return self.warm_s / self.cold_s

    @property
    def uv_ratio(self) -> float:
        return self.uv_install_s / self.pip_install_s

    @property
    def step_ratio(self) -> float:
        return self.uv_step_s / self.pip_install_s


STEP = re.compile(r"^install\.sh: installed with uv in (\d+\.\d) s$", re.M)


def _timed(action: Callable[[], object]) -> float:
    started = time.monotonic()
    action()
    return round(time.monotonic() - started, 1)


def naive_download(cell: Cell, dest: Path) -> float:
    """Upstream's online half: pip download of the requirement for the target's tags."""
    machine = cell.machine
    platforms = [a for tag in MANYLINUX for a in ("--platform", f"{tag}_{machine}")]
    argv = [
        sys.executable, "-m", "pip", "download", "--no-cache-dir", "--disable-pip-version-check",
        "--only-binary=:all:", "--python-version", cell.python, "--implementation", "cp",
        *platforms, "-d", str(dest), cell.requirement,
    ]  # fmt: skip
    return _timed(lambda: subprocess.run(argv, check=True, capture_output=True))


def _context(root: Path, work: Path, mirror: ReleaseMirror, locks: Path, dead: bool = False):
    cli = {
        "dist_dir": str(work / "dist"),
        "cache_dir": str(work / "cache"),
        "frozen": True,
        "progress": False,
        "tools_base_url": DEAD if dead else mirror.base_url,
        "tools_locks_dir": str(locks),
    }
    if dead:
        cli["index_url"] = f"{DEAD}/simple"
    return commands.Context.load(root, cli=cli)


def install_times(
    cell: Cell, bundle: Path, cache: Path, with_pip_script: bool
) -> tuple[list[float], float]:
    """In one clean container of the target, with no network: pip alone, install.sh with uv,
    install.sh with pip (if asked); and install.sh's own figure for its uv install step."""
    pip = (
        "python3 -m venv /tmp/plain && PIP_CONFIG_FILE=/dev/null /tmp/plain/bin/python -m pip "
        "--isolated install -q --no-index --find-links /bundle/wheels --require-hashes "
        "--only-binary=:all: --no-deps -r /bundle/requirements.txt"
    )
    runs = [
        ["sh", "-c", pip],
        ["/bundle/install.sh", "--prefix", "/opt/uv", "--skip-preflight"],
    ]
    if with_pip_script:
        runs.append(
            ["/bundle/install.sh", "--prefix", "/opt/pip", "--installer", "pip", "--skip-preflight"]
        )
    image = base_image(cell.arch, cache)
    times, outputs = [], []
    with container(image, mounts={bundle.resolve(): "/bundle"}, read_only=["/bundle"]) as box:
        for argv in runs:
            started = time.monotonic()
            code, output = exec_in(box, argv)
            if code != 0:
                raise BundleError(f"{' '.join(argv)} failed in {image}:\n{output[-2000:]}")
            times.append(round(time.monotonic() - started, 1))
            outputs.append(output)
    step = STEP.search(outputs[1])
    if step is None:
        raise BundleError(f"install.sh did not say how long its uv install took:\n{outputs[1]}")
    return times, float(step.group(1))


def measure(root: Path, work: Path, progress: Callable[[str], None]) -> list[PipRow]:
    rows = []
    assets = work / "release-mirror"
    build_assets(assets)
    locks = write_fixture_locks(assets, work / "tools-locks")
    images_cache = commands.Context.load(root).cache  # the clean base images are not measured
    with ReleaseMirror(assets) as mirror:
        for index, cell_id in enumerate(CELLS):
            area = work / cell_id
            shutil.rmtree(area, ignore_errors=True)
            ctx = _context(root, area, mirror, locks)
            cell = ctx.matrix.cell(cell_id)
            progress(f"{cell_id}: upstream's pip download")
            naive_s = naive_download(cell, area / "naive")
            progress(f"{cell_id}: our cold build")
            started = time.monotonic()
            commands.build(ctx, [cell])
            cold_s = round(time.monotonic() - started, 1)
            progress(f"{cell_id}: our warm rebuild, every download address dead")
            warm_ctx = _context(root, area, mirror, locks, dead=True)
            started = time.monotonic()
            (warm,) = commands.build(warm_ctx, [cell])
            warm_s = round(time.monotonic() - started, 2)
            bundle = ctx.layout.bundle(cell_id)
            progress(f"{cell_id}: installs in a clean {cell.arch} container")
            times, step = install_times(cell, bundle, images_cache, with_pip_script=index == 0)
            rows.append(
                PipRow(
                    cell=cell_id,
                    naive_download_s=naive_s,
                    naive_bytes=tree_bytes(area / "naive"),
                    cold_s=cold_s,
                    warm_s=warm_s,
                    warm_stages=warm.stages,
                    bundle_bytes=ctx.layout.tar(cell_id).stat().st_size,
                    pip_install_s=times[0],
                    uv_install_s=times[1],
                    uv_step_s=step,
                    pip_script_s=times[2] if len(times) > 2 else None,
                )
            )
    return rows


def table(rows: Sequence[PipRow]) -> str:
    lines = [
        "| cell | upstream pip download | ours cold | ours warm | warm ÷ cold | pip install "
        "| uv install step | step ÷ pip | install.sh (uv) | ÷ pip | install.sh --installer pip |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        script = f"{r.pip_script_s:.1f} s" if r.pip_script_s is not None else "not measured"
        lines.append(
            f"| {r.cell} | {r.naive_download_s:.1f} s ({_mb(r.naive_bytes)}) "
            f"| {r.cold_s:.1f} s | {r.warm_s:.2f} s | {r.warm_ratio:.3f}× "
            f"| {r.pip_install_s:.1f} s | {r.uv_step_s:.1f} s | {r.step_ratio:.2f}× "
            f"| {r.uv_install_s:.1f} s | {r.uv_ratio:.2f}× | {script} |"
        )
    return "\n".join(lines) + "\n"


HEADING = "\n## Pip cells: upstream's recipe against this pipeline\n"


def section(rows: Sequence[PipRow]) -> str:
    warm = "; ".join(f"{r.cell}: {r.warm_stages}" for r in rows)
    return f"""{HEADING}
{table(rows)}
- **upstream pip download**: `pip download --only-binary=:all: --python-version 3.11
  --implementation cp --platform manylinux_2_35_ARCH …` of the cell's requirement with no pip
  cache: upstream's online half (the wheels only; no tools archive, no checks).
- **ours cold**: `invoke bundle` of the cell from an empty cache: wheels from PyPI, the tool
  venv, the tools archive through upstream's `download-tools` (from the loopback release
  mirror), the bundle folder and its tar. **warm**: the same build again with every download
  address (index, tools) dead: what the build table said: {warm}.
- **pip install**: `pip install --no-index --find-links wheels --require-hashes --no-deps -r
  requirements.txt` into a fresh venv, in the same clean container of the target as the next
  columns (arm64 under qemu); it byte-compiles every module, as pip does by default.
- **uv install step**: install.sh's own figure for the step that replaces that pip command
  (`installed with uv in S s`): the venv, uv installing the same wheels, and the bytecode of what
  `gpustack start` loads (the rest compiles on first import; pip compiles everything up front).
  **step ÷ pip** divides it by the pip column.
- **install.sh (uv)**: the whole site install with its defaults: sums, preflight skipped, the
  step above, `gpustack version`, the tools archive loaded and `current` switched, as a wall
  time; **÷ pip** divides it by the pip column.
- **install.sh --installer pip**: the same with pip (amd64 only: under qemu it would add the
  pip column's time again).
- Bundle tars: {", ".join(f"{r.cell} {_mb(r.bundle_bytes)}" for r in rows)}.
"""


def run(root: Path, progress: Callable[[str], None]) -> str:
    with tempfile.TemporaryDirectory(prefix="bench-pip-") as tmp:
        return section(measure(root, Path(tmp), progress))
