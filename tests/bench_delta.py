"""The delta benchmark: what an upgrade carries across the gap.

For each pair (old → new):
- **full**: the new bundle's bytes, what upstream's recipe (and a full bundle) carries again;
- **delta**: `invoke bundle --cell NEW --since dist/OLD`: the new bundle less every wheel, tool
  and image blob whose sha256 the old one holds;
- **floor**: the bytes of the new bundle's files whose sha256 the old one lacks, which no delta
  can skip;
- **whole-image skip**: what Zarf's `--differential` would leave out, whole images already in
  the reference package (the same manifest digest), and nothing for pip files.

Rows: GPUStack 0.6.2 → 0.7.1 pip, linux-amd64 cpu (wheels from PyPI, tools from the loopback
release mirror); GPUStack 2.2.3 → 2.3.0 docker, linux-amd64 cuda12.9 vllm, through the loopback
hub seeded with stand-ins that share layers as real runners do (tests/support/gpustack2_images.py).

    python tests/bench_seed.py --delta-only      # just this table
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import _mb, tree_bytes
from support.gpustack2_images import push_images, runner_images, server_image
from support.registry_fixture import AMD64, hub_registry
from support.release_mirror import ReleaseMirror, build_assets, write_fixture_locks

from gpustack_offline.bundle import delta
from gpustack_offline.cli import commands
from gpustack_offline.stages import runners

PIP = ("v0.6.2-linux-amd64-cpu-py3.11-base-pip", "v0.7.1-linux-amd64-cpu-py3.11-base-pip")
DOCKER = (
    "v2.2.3-linux-amd64-cuda12.9-py3.11-vllm-docker",
    "v2.3.0-linux-amd64-cuda12.9-py3.11-vllm-docker",
)
HEADING = "\n## Upgrades: delta bundles against carrying everything again\n"


@dataclasses.dataclass
class DeltaRow:
    old: str
    new: str
    full: int
    delta: int
    floor: int
    zarf: int  # what a whole-image differential would carry

    @property
    def ratio(self) -> float:
        return self.delta / self.full

    @property
    def over_floor(self) -> float:
        return self.delta / self.floor if self.floor else float("inf")


def _whole_image_skip(old: Path, new: Path) -> int:
    """The new bundle's bytes less the blobs of images whose manifest digest the old one holds
    too (blobs another image of the new bundle needs stay)."""
    old_images = {i["digest"] for i in json.loads((old / "manifest.json").read_text())["images"]}
    images = json.loads((new / "manifest.json").read_text())["images"]
    if not images:
        return tree_bytes(new)
    docker_view = json.loads((new / "images" / "manifest.json").read_text())
    blobs_of = {
        tag: {b.rsplit("/", 1)[-1] for b in [entry["Config"], *entry["Layers"]]}
        for entry in docker_view
        for tag in entry["RepoTags"]
    }
    skipped: set[str] = set()
    kept: set[str] = set()
    for image in images:
        tag = image["reference"].removeprefix("docker.io/").removeprefix("library/")
        (skipped if image["digest"] in old_images else kept).update(blobs_of.get(tag, set()))
    blob_dir = new / "images" / "blobs" / "sha256"
    return tree_bytes(new) - sum((blob_dir / b).stat().st_size for b in skipped - kept)


def _row(ctx: commands.Context, old_id: str, new_id: str) -> DeltaRow:
    (old,) = commands.build(ctx, [ctx.matrix.cell(old_id)])
    (new,) = commands.build(ctx, [ctx.matrix.cell(new_id)], since=old.directory)
    base = delta.read_base(old.directory)
    made = ctx.layout.dist / delta.delta_name(new_id, base)
    return DeltaRow(
        old=old_id,
        new=new_id,
        full=tree_bytes(new.directory),
        delta=tree_bytes(made),
        floor=delta.floor(new.directory, base),
        zarf=_whole_image_skip(old.directory, new.directory),
    )


def measure(root: Path, work: Path, progress: Callable[[str], None]) -> list[DeltaRow]:
    assets = work / "release-mirror"
    build_assets(assets)
    locks = write_fixture_locks(assets, work / "tools-locks")
    rows = []
    with ReleaseMirror(assets) as mirror:
        progress(f"{PIP[0]} → {PIP[1]}: both bundles and the delta")
        ctx = commands.Context.load(root, cli={
            "dist_dir": str(work / "pip-dist"), "frozen": True, "progress": False,
            "tools_base_url": mirror.base_url, "tools_locks_dir": str(locks),
        })  # fmt: skip
        rows.append(_row(ctx, *PIP))
    with hub_registry(work / "hub") as hub:
        progress(f"{DOCKER[0]} → {DOCKER[1]}: stand-in images, both bundles and the delta")
        runners_dir = work / "runners"
        runners_dir.mkdir()
        for cell_id in DOCKER:
            version = cell_id.split("-")[0].removeprefix("v")
            shutil.copy(root / f"bundles/runners/gpustack-{version}.json", runners_dir)
            selection = runners.cell_selection(runners_dir, version, "amd64", "cuda12.9", ["vllm"])
            names = [i.name for i in selection.images]
            push_images(hub, {names[0]: server_image(version, (AMD64,))})
            push_images(hub, runner_images(names[1:], (AMD64,)))
        ctx = commands.Context.load(root, cli={
            "dist_dir": str(work / "docker-dist"), "images_pins_dir": str(work / "pins"),
            "runners_dir": str(runners_dir), "registry_mirror": hub.host, "progress": False,
        })  # fmt: skip
        for cell_id in DOCKER:
            commands.lock(ctx, [ctx.matrix.cell(cell_id)])
        rows.append(_row(ctx, *DOCKER))
    return rows


def table(rows: Sequence[DeltaRow]) -> str:
    lines = [
        "| old → new | full (carry all again) | whole-image skip (Zarf-like) | delta "
        "| delta ÷ full | floor | delta ÷ floor |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.old} → {r.new} | {_mb(r.full)} | {_mb(r.zarf)} | {_mb(r.delta)} "
            f"| {r.ratio:.3f}× | {_mb(r.floor)} | {r.over_floor:.3f}× |"
        )
    return "\n".join(lines) + "\n"


def section(rows: Sequence[DeltaRow]) -> str:
    return f"""{HEADING}
{table(rows)}
- **full**: every file of the new bundle (folder bytes), what carrying the new release again
  costs: upstream's recipe has no delta.
- **whole-image skip**: the new bundle less the blobs of images whose manifest digest the old
  bundle holds too (Zarf's `--differential` skips whole images found in the reference
  package); pip files are never skipped that way.
- **delta**: `invoke bundle --cell NEW --since dist/OLD` (bytes of `dist/NEW.since-<base>/`):
  the new bundle less every wheel, tool and image blob whose sha256 the old one holds, with
  the new bundle's manifest, SBOM, sums and signature, and `base.json`.
- **floor**: the bytes of the new bundle's files whose sha256 the old one lacks.
- The 2.x images are stand-ins shaped like upstream's (runners sharing one base layer, the
  server image sharing the Debian layer); real runner images share CUDA layers of gigabytes.
"""


def run(root: Path, progress: Callable[[str], None]) -> str:
    with tempfile.TemporaryDirectory(prefix="bench-delta-") as tmp:
        return section(measure(root, Path(tmp), progress))
