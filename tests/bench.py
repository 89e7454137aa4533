"""How much smaller and faster the image stage is than upstream's recipe, measured on one registry.

Upstream's air-gap instructions for the Docker path are, per image, `docker pull --platform …`
then `docker save` into a tar of its own. That costs twice: the engine stores layers
decompressed, so `save` writes them uncompressed, and every tar carries the base layer again
however many images share it. This pipeline (`Registry.pull` into the `BlobStore`, then
`images.export_images`) keeps the layers as the registry served them and writes each blob once,
as hard links into the store; `measure_disk` compares the peak disk of a docker cell's build.

Both are run against the same registry, in one process, one after the other, so a result is a
comparison and not two numbers from two days. A *cold* run starts from nothing (an empty
`BlobStore`; the scenario's images removed from the engine, by image ID, so nothing else in the
engine is touched); a *warm* run is the same run again with what the cold one left (our cache;
the images in the engine). The floor is the sum of the distinct compressed blobs the images
need (manifests, configs, layers): what any bundle of them must at least carry.

The engine holds one platform per tag: pulling `--platform linux/arm64` of a tag moves the tag
off the amd64 image, which stays in the engine untagged with its layers. So a scenario's naive
run goes platform by platform (pull and save every image of one platform, then the next), and
its warm run finds both platforms' layers still there: the most favourable case for the recipe.

GPUStack 2.x moves images with `gpustack save-images` (gpustack_runner/cmds/images.py): per
image of the list (server, each runner, pause, health) one `skopeo copy docker://REF
oci-archive:OUT/REPOSITORY/TAG.tar:REF`, so each archive carries every layer of its image again,
even the base layer that all CUDA runners share. `measure_archives` runs that same skopeo
command per image and compares it with this pipeline's one tar and with the floor.

The registry and the images come from the caller (the `bench` nox session seeds a loopback
one); this module measures and writes the report.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform as host_platform
import re
import shutil
import tarfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpustack_offline.bundle.assemble import write_tar
from gpustack_offline.core.downloads import BlobStore
from gpustack_offline.core.errors import BundleError, CommandError
from gpustack_offline.core.files import write_text
from gpustack_offline.core.processes import run
from gpustack_offline.stages.images import export_images, write_layout_tar
from gpustack_offline.stages.registry import Image, Platform, Reference, Registry

log = logging.getLogger("gpustack_offline")

DOCKER_FIX = "start the Docker engine (as root: bash scripts/setup-build-host.sh) and rerun"
SKOPEO_FIX = "install skopeo (as root: bash scripts/setup-build-host.sh) and rerun"


class BenchError(BundleError):
    """The benchmark cannot run, or one side of it produced something other than asked for."""


# --- what is measured ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One image of a scenario: a reference on the registry under test and one platform."""

    reference: str  # 127.0.0.1:5000/gpustack/gpustack:v0.7.1-cpu
    platform: str  # linux/amd64


@dataclass(frozen=True)
class Scenario:
    name: str  # what the table's row says, e.g. "one image (v0.7.1, amd64)"
    targets: tuple[Target, ...]


def scenarios(
    registry: str,
    tags: Sequence[str],
    platforms: Sequence[str],
    repository: str = "gpustack/gpustack",
) -> list[Scenario]:
    """(a) the first tag for the first platform alone; (b) every tag for every platform, the set
    a multi-cell release needs, whose images share layers."""
    if not tags or not platforms:
        raise BenchError("a benchmark needs at least one tag and one platform")

    def target(tag: str, plat: str) -> Target:
        return Target(f"{registry}/{repository}:{tag}", plat)

    one = Scenario(
        f"one image ({tags[0]}, {Platform.parse(platforms[0]).architecture})",
        (target(tags[0], platforms[0]),),
    )
    arches = "+".join(Platform.parse(p).architecture for p in platforms)
    every = Scenario(
        f"{len(tags) * len(platforms)} images ({len(tags)} tags × {arches})",
        tuple(target(t, p) for p in platforms for t in tags),
    )
    return [one, every]


@dataclass(frozen=True)
class Measurement:
    bytes: int  # the bundle's size on disk: every tar the recipe leaves
    seconds: float  # wall time of the recipe's own steps
    # of which fetching (docker pull / Registry.pull), the rest is writing; None where one step
    # does both at once (skopeo copy streams each blob from the registry into the archive)
    fetch_seconds: float | None
    fetched_layers: int  # layers taken from the registry (0 is what makes a warm run warm)


@dataclass(frozen=True)
class Row:
    scenario: str  # "… cold" / "… warm"
    naive: Measurement
    ours: Measurement
    floor: int

    @property
    def bytes_ratio(self) -> float | None:
        return ratio(self.naive.bytes, self.ours.bytes)

    @property
    def seconds_ratio(self) -> float | None:
        return ratio(self.naive.seconds, self.ours.seconds)

    @property
    def floor_ratio(self) -> float | None:
        """ours ÷ floor: how far our tar is above what any bundle must carry (1 is none)."""
        return ratio(self.ours.bytes, self.floor)


def ratio(naive: float, ours: float) -> float | None:
    """naive ÷ ours: above 1, ours is smaller or faster by that factor. None when ours is 0
    (nothing to divide by, shown as a dash rather than an infinity)."""
    if ours <= 0:
        return None
    return naive / ours


def unique_bytes(images: Iterable[Image]) -> int:
    """The sum of the distinct compressed blobs (manifests, configs, layers) the images need,
    each counted once however many images share it."""
    sizes: dict[str, int] = {}
    for image in images:
        for desc in image.blobs:
            sizes[desc.digest] = desc.size
    return sum(sizes.values())


def by_platform(targets: Sequence[Target]) -> list[tuple[str, list[Target]]]:
    """Targets grouped by platform, in first-seen order (the engine holds one platform per tag,
    so the naive recipe finishes one platform before it starts the next)."""
    groups: dict[tuple[str, str], tuple[str, list[Target]]] = {}
    for target in targets:
        plat = Platform.parse(target.platform)
        key = (plat.os, plat.architecture)  # linux/arm64 and linux/arm64/v8 are one platform
        groups.setdefault(key, (str(plat), []))[1].append(target)
    return list(groups.values())


def save_name(target: Target) -> str:
    """The file name the naive recipe saves one image to: tag and architecture, no port."""
    ref = Reference.parse(target.reference)
    name = f"{ref.repository}-{ref.tag or 'untagged'}-{Platform.parse(target.platform)}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) + ".tar"


# --- the two recipes ----------------------------------------------------------------------------


def _docker(*args: str | Path, what: str) -> str:
    return run(["docker", *args], what=what, fix=DOCKER_FIX).stdout


def engine_facts() -> str:
    """The engine's version, which is also the check that an engine answers at all."""
    return _docker("version", "--format", "{{.Server.Version}}", what="asking Docker").strip()


def engine_clear(image_ids: Iterable[str]) -> None:
    """Remove these images (by ID, with every tag they carry) from the engine, if present."""
    listed = _docker("image", "ls", "--all", "--quiet", "--no-trunc", what="listing images")
    present = sorted(set(listed.split()) & set(image_ids))
    if present:
        _docker("image", "rm", "--force", *present, what="removing the benchmark's images")


def naive_bundle(
    targets: Sequence[Target], out: Path, expected_ids: Mapping[Target, str]
) -> Measurement:
    """Upstream's recipe: per image `docker pull --platform P REF`, then `docker save -o` into a
    tar of its own. Only the pull and save are timed; after each pull the engine's image ID is
    checked against the config digest the registry serves, so the recipe saved the image asked
    for and not another platform's."""
    out.mkdir(parents=True, exist_ok=True)
    fetch = write = 0.0
    fetched = 0
    for plat, group in by_platform(targets):
        for target in group:
            start = time.perf_counter()
            said = _docker(
                "pull", "--platform", plat, target.reference, what=f"docker pull {target}"
            )
            fetch += time.perf_counter() - start
            fetched += pulled_layers(said)
            got = _docker(
                "image", "inspect", "--format", "{{.Id}}", target.reference,
                what=f"inspecting {target.reference}",
            ).strip()  # fmt: skip
            if got != expected_ids[target]:
                raise BenchError(
                    f"docker pull --platform {plat} {target.reference} gave image {got}, not "
                    f"{expected_ids[target]}; the naive bundle would hold the wrong image"
                )
            start = time.perf_counter()
            _docker(
                "save", "-o", out / save_name(target), target.reference,
                what=f"docker save {target.reference}",
            )  # fmt: skip
            write += time.perf_counter() - start
    size = sum(p.stat().st_size for p in out.glob("*.tar"))
    return Measurement(size, fetch + write, fetch, fetched)


def pulled_layers(pull_output: str) -> int:
    """Layers `docker pull` downloaded and extracted: one `<id>: Pull complete` line each
    (a layer the engine has says `Already exists`, an image it has says nothing per layer)."""
    return len(re.findall(r"^[0-9a-f]{12}: Pull complete\s*$", pull_output, re.MULTILINE))


def our_bundle(
    targets: Sequence[Target], store: BlobStore, dest: Path, env: Mapping[str, str] | None = None
) -> Measurement:
    """This pipeline: pull each target into the store (stored blobs are not fetched again), then
    export the folder (hard links into the store) and write one tar of it with every blob once:
    the bytes a bundle's tar carries for the images."""
    stored = set(store.root.glob("*")) if store.root.is_dir() else set()
    folder = dest.with_name(f"{dest.name}.d")
    start = time.perf_counter()
    with Registry(store, env=env) as registry:
        images = [registry.pull(t.reference, t.platform) for t in targets]
    fetch = time.perf_counter() - start
    try:
        export_images(images, store, folder)
        write_layout_tar(folder, dest)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    seconds = time.perf_counter() - start
    layers = {d.hex for image in images for d in image.layers}
    fetched = sum(1 for p in set(store.root.glob("*")) - stored if p.name in layers)
    return Measurement(dest.stat().st_size, seconds, fetch, fetched)


def resolve(
    targets: Sequence[Target], work: Path, env: Mapping[str, str] | None = None
) -> list[Image]:
    """Every target's manifest, config and layer descriptors (no layer is fetched): the image
    IDs the engine will show, and what the floor is summed from."""
    with Registry(BlobStore(work), env=env) as registry:
        return [registry.resolve(t.reference, t.platform) for t in targets]


def measure(
    scenario: Scenario,
    work: Path,
    env: Mapping[str, str] | None = None,
    progress: Callable[[str], None] = log.info,
) -> list[Row]:
    """Cold and warm rows for one scenario. The engine is cleared of the scenario's images
    before the cold naive run and again at the end; every tar is deleted once measured."""
    work.mkdir(parents=True, exist_ok=True)
    images = resolve(scenario.targets, work / "resolve", env)
    ids = {t: image.config.digest for t, image in zip(scenario.targets, images, strict=True)}
    floor = unique_bytes(images)

    def timed_naive(run_name: str) -> Measurement:
        out = work / f"naive-{run_name}"
        try:
            result = naive_bundle(scenario.targets, out, ids)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        progress(f"{scenario.name}, {run_name}: naive {_describe(result)}")
        return result

    def timed_ours(run_name: str, store: BlobStore) -> Measurement:
        dest = work / f"ours-{run_name}.tar"
        try:
            result = our_bundle(scenario.targets, store, dest, env)
        finally:
            dest.unlink(missing_ok=True)
        progress(f"{scenario.name}, {run_name}: ours {_describe(result)}")
        return result

    try:
        engine_clear(ids.values())
        naive_cold = timed_naive("cold")
        naive_warm = timed_naive("warm")
    finally:
        engine_clear(ids.values())
    store = BlobStore(work / "cache")
    shutil.rmtree(work / "cache", ignore_errors=True)
    try:
        ours_cold = timed_ours("cold", store)
        ours_warm = timed_ours("warm", store)
    finally:
        shutil.rmtree(work / "cache", ignore_errors=True)
    for side, warm in (("docker pull", naive_warm), ("Registry.pull", ours_warm)):
        if warm.fetched_layers:
            raise BenchError(
                f"{scenario.name}: the warm run of {side} fetched {warm.fetched_layers} layers "
                "again, so it was not warm; is something else removing images or cache files?"
            )
    return [
        Row(f"{scenario.name}, cold", naive_cold, ours_cold, floor),
        Row(f"{scenario.name}, warm", naive_warm, ours_warm, floor),
    ]


# --- GPUStack 2.x: one archive per image ---------------------------------------------------------


def archive_path(target: Target) -> Path:
    """Where `gpustack save-images` puts one image, under its output folder: REPOSITORY/TAG.tar
    (upstream also keeps the registry's name in the folder; here that would be the port)."""
    ref = Reference.parse(target.reference)
    return Path(ref.repository) / f"{ref.tag or 'latest'}.tar"


def save_images_command(target: Target, dest: Path) -> list[str]:
    """The command `gpustack save-images --archive-format oci` (the default) runs for one image:
    a copy of the platform's manifest, its config and every layer into an OCI archive of its
    own, named by the source reference."""
    plat = Platform.parse(target.platform)
    return [
        "skopeo", "copy", "--src-tls-verify=false", "--retry-times", "1",
        "--override-os", plat.os, "--override-arch", plat.architecture,
        f"docker://{target.reference}", f"oci-archive:{dest}:{target.reference}",
    ]  # fmt: skip


def archive_contents(path: Path) -> tuple[str, int]:
    """The config digest and layer count of the one image an OCI archive holds."""

    def member(tf: tarfile.TarFile, name: str) -> Any:
        fh = tf.extractfile(name)
        if fh is None:
            raise KeyError(name)
        return json.load(fh)

    try:
        with tarfile.open(path) as tf:
            (entry,) = member(tf, "index.json")["manifests"]
            manifest = member(tf, "blobs/" + entry["digest"].replace(":", "/"))
        return str(manifest["config"]["digest"]), len(manifest["layers"])
    except (OSError, KeyError, ValueError, TypeError, AttributeError, tarfile.TarError) as exc:
        raise BenchError(f"{path} is not an OCI archive of one image: {exc!r}") from None


def per_image_archives(
    targets: Sequence[Target], out: Path, expected_configs: Mapping[Target, str]
) -> Measurement:
    """Upstream 2.x's `gpustack save-images`: one skopeo copy per image into an OCI archive of
    its own, nothing shared between archives. Only the copies are timed; each archive must hold
    the image asked for (its config digest), and its layers all came from the registry."""
    if shutil.which("skopeo") is None:
        raise BenchError(f"the 2.x benchmark needs skopeo on PATH; {SKOPEO_FIX}")
    seconds = 0.0
    layers = 0
    size = 0
    for target in targets:
        dest = out / archive_path(target)
        dest.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        run(save_images_command(target, dest), what=f"skopeo copy {target.reference}",
            fix=SKOPEO_FIX)  # fmt: skip
        seconds += time.perf_counter() - start
        config, count = archive_contents(dest)
        if config != expected_configs[target]:
            raise BenchError(
                f"skopeo copied {target.reference} for {target.platform} as config {config}, "
                f"not {expected_configs[target]}; the archive holds the wrong image"
            )
        layers += count
        size += dest.stat().st_size
    return Measurement(size, seconds, None, layers)


def measure_archives(
    scenario: Scenario,
    work: Path,
    env: Mapping[str, str] | None = None,
    progress: Callable[[str], None] = log.info,
) -> Row:
    """One cold row: upstream's one archive per image (skopeo has no cache: every run is cold)
    against our one tar from an empty `BlobStore`, and the floor. Every archive and tar is
    deleted once measured."""
    work.mkdir(parents=True, exist_ok=True)
    images = resolve(scenario.targets, work / "resolve", env)
    configs = {t: image.config.digest for t, image in zip(scenario.targets, images, strict=True)}
    out = work / "save-images"
    try:
        upstream = per_image_archives(scenario.targets, out, configs)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    progress(f"{scenario.name}: save-images {_describe(upstream)}")
    dest = work / "ours.tar"
    shutil.rmtree(work / "cache", ignore_errors=True)
    try:
        ours = our_bundle(scenario.targets, BlobStore(work / "cache"), dest, env)
    finally:
        dest.unlink(missing_ok=True)
        shutil.rmtree(work / "cache", ignore_errors=True)
    progress(f"{scenario.name}: ours {_describe(ours)}")
    return Row(f"{scenario.name}, cold", upstream, ours, unique_bytes(images))


# --- disk: peak beyond the cache -----------------------------------------------------------------


@dataclass(frozen=True)
class DiskRow:
    """Peak extra disk beyond each recipe's cache while it makes a docker cell's bundle, and
    the bundle's size. The naive recipe's cache is the engine's image store, ours the blob
    store; neither deletes anything before its bundle tar is whole, so the end is the peak."""

    scenario: str
    naive_peak: int
    naive_bundle: int
    ours_peak: int
    ours_bundle: int

    @property
    def naive_ratio(self) -> float | None:
        return ratio(self.naive_peak, self.naive_bundle)

    @property
    def ours_ratio(self) -> float | None:
        return ratio(self.ours_peak, self.ours_bundle)


def allocated(paths: Iterable[Path], cache: Path | None = None) -> int:
    """Bytes allocated (`st_blocks`) to the files and folders under `paths`, each inode once,
    leaving out hard links to files under `cache`: they cost no byte more."""

    def inodes(root: Path) -> Iterable[tuple[tuple[int, int], int]]:
        for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
            st = os.lstat(path)
            yield (st.st_dev, st.st_ino), st.st_blocks * 512

    shared = {i for i, _ in inodes(cache)} if cache is not None and cache.exists() else set()
    seen: dict[tuple[int, int], int] = {}
    for path in paths:
        if path.exists():
            seen.update((i, size) for i, size in inodes(path) if i not in shared)
    return sum(seen.values())


def measure_disk(
    scenario: Scenario,
    work: Path,
    env: Mapping[str, str] | None = None,
    progress: Callable[[str], None] = log.info,
) -> DiskRow:
    """A docker cell's bundle both ways, cold, and what each left beyond its cache.

    Naive: `docker pull` + `docker save` per image into the bundle folder, then the bundle's
    tar of that folder (the archive twice, and the layers once more in the engine). Ours: pull
    into the blob store, the images folder of hard links, the bundle tar streamed from it
    (`assemble.write_tar`). Everything written is deleted once measured."""
    work.mkdir(parents=True, exist_ok=True)
    images = resolve(scenario.targets, work / "resolve", env)
    ids = {t: image.config.digest for t, image in zip(scenario.targets, images, strict=True)}
    naive_dir = work / "naive" / "cell"
    try:
        engine_clear(ids.values())
        naive_bundle(scenario.targets, naive_dir / "images", ids)
        write_tar(naive_dir, naive_dir.with_name("cell.tar"))
        naive_tar = naive_dir.with_name("cell.tar").stat().st_size
        naive_peak = allocated([naive_dir, naive_dir.with_name("cell.tar")])
    finally:
        engine_clear(ids.values())
        shutil.rmtree(work / "naive", ignore_errors=True)
    progress(f"{scenario.name}: naive peak {_mb(naive_peak)} for a {_mb(naive_tar)} bundle")
    ours_dir = work / "ours" / "cell"
    store = BlobStore(work / "cache")
    try:
        with Registry(store, env=env) as registry:
            pulled = [registry.pull(t.reference, t.platform) for t in scenario.targets]
        export_images(pulled, store, ours_dir / "images")
        write_tar(ours_dir, ours_dir.with_name("cell.tar"))
        ours_tar = ours_dir.with_name("cell.tar").stat().st_size
        ours_peak = allocated([ours_dir, ours_dir.with_name("cell.tar")], work / "cache")
    finally:
        shutil.rmtree(work / "ours", ignore_errors=True)
        shutil.rmtree(work / "cache", ignore_errors=True)
    progress(f"{scenario.name}: ours peak {_mb(ours_peak)} for a {_mb(ours_tar)} bundle")
    return DiskRow(scenario.name, naive_peak, naive_tar, ours_peak, ours_tar)


def disk_table(rows: Sequence[DiskRow]) -> str:
    lines = [
        "| docker cell | naive peak | naive bundle | naive peak ÷ bundle | ours peak | ours bundle "
        "| ours peak ÷ bundle |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.scenario} | {_mb(r.naive_peak)} | {_mb(r.naive_bundle)} | "
            f"{_times(r.naive_ratio, 3)} | {_mb(r.ours_peak)} | {_mb(r.ours_bundle)} | "
            f"{_times(r.ours_ratio, 3)} |"
        )
    return "\n".join(lines) + "\n"


# --- the report ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostFacts:
    date: str  # ISO date, UTC
    cpus: int
    docker: str  # the engine's version
    system: str  # kernel and machine, e.g. "Linux 6.1.0 x86_64"
    load: str  # the 1/5/15-minute load averages when the run began: other work skews timings


def host_facts(docker_version: str | None = None, load: str | None = None) -> HostFacts:
    return HostFacts(
        date=datetime.datetime.now(datetime.UTC).date().isoformat(),
        cpus=os.cpu_count() or 0,
        docker=docker_version if docker_version is not None else engine_facts(),
        system=f"{host_platform.system()} {host_platform.release()} {host_platform.machine()}",
        load=load if load is not None else load_average(),
    )


def load_average() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def _mb(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"


def tree_bytes(folder: Path) -> int:
    """Bytes of the files under `folder`, as a site's disk counts what it carries."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _describe(m: Measurement) -> str:
    fetching = "" if m.fetch_seconds is None else f"{m.fetch_seconds:.1f}s fetching, "
    return f"{_mb(m.bytes)} in {m.seconds:.1f}s ({fetching}{m.fetched_layers} layers fetched)"


def _times(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}×"


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def table(rows: Sequence[Row]) -> str:
    """The markdown table: sizes in MB (10^6 bytes), times in seconds, ratios naive ÷ ours, and
    ours ÷ floor to three places (ours is above the floor by kilobytes, not megabytes)."""
    lines = [
        "| scenario | naive bytes | ours bytes | ratio | naive s | ours s | ratio | floor bytes "
        "| ours ÷ floor |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        cells = (
            row.scenario,
            _mb(row.naive.bytes),
            _mb(row.ours.bytes),
            _times(row.bytes_ratio),
            f"{row.naive.seconds:.1f}",
            f"{row.ours.seconds:.1f}",
            _times(row.seconds_ratio),
            _mb(row.floor),
            _times(row.floor_ratio, 3),
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def split_table(rows: Sequence[Row]) -> str:
    """Where the time goes: fetching (pull) against writing the bundle (save / export), and how
    many layers came from the registry; a dash where one step does both (skopeo copy)."""
    lines = [
        "| scenario | naive pull s | naive save s | naive layers pulled "
        "| ours pull s | ours export s | ours layers pulled |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        cells = [row.scenario]
        for m in (row.naive, row.ours):
            write = None if m.fetch_seconds is None else m.seconds - m.fetch_seconds
            cells += [_seconds(m.fetch_seconds), _seconds(write), str(m.fetched_layers)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def archives_sentence(row: Row) -> str:
    """What a 2.x row says, in words: upstream's archives against ours, and ours against the
    floor."""
    if row.bytes_ratio is None or row.floor_ratio is None:
        return f"{row.scenario}: nothing was measured."
    return (
        f"For the 2.x cell, upstream's one archive per image comes to {_mb(row.naive.bytes)}, "
        f"{row.bytes_ratio:.2f}× our {_mb(row.ours.bytes)} tar, because every runner's archive "
        f"repeats the base layer the runners share; ours is {row.floor_ratio:.3f}× the "
        f"{_mb(row.floor)} floor ({(row.ours.bytes - row.floor) / 1e3:,.0f} kB of tar headers "
        "and index files)."
    )


def report(
    rows: Sequence[Row],
    facts: HostFacts,
    setup: str,
    rerun: str,
    archive_rows: Sequence[Row] = (),
    disk_rows: Sequence[DiskRow] = (),
) -> str:
    """The whole `docs/bench.md`: what was measured, where, the table, how to run it again.
    `rows` compare with `docker pull` + `docker save` (0.x), `archive_rows` with `gpustack
    save-images` (2.x, from `measure_archives`), `disk_rows` the peak disk of a docker cell's
    build (`measure_disk`)."""
    every = [*rows, *archive_rows]
    sentences = "".join(f"\n{archives_sentence(row)}\n" for row in archive_rows)
    disk = (
        f"""
## Peak extra disk beyond the cache

What a docker cell's build leaves on disk beyond each recipe's cache (the engine's image store
for the naive recipe, the blob store for ours), as a multiple of the bundle tar it makes; nothing
is deleted before the tar is whole, so this is the build's peak. Bytes are the blocks allocated
(`st_blocks`), each inode once; files that are hard links into the cache cost none.

{disk_table(disk_rows)}
- **naive**: `docker pull` + `docker save -o` per image into the bundle folder, then the bundle's
  tar of that folder: the archive is on disk twice, beside the layers in the engine (zarf's users
  report 2–3× the package size: zarf#4016).
- **ours**: the images folder is hard links into the blob store (only `index.json`, docker's
  `manifest.json` and the OCI twins of Docker-typed manifests are written), and the bundle tar
  is streamed from it (`assemble.write_tar`): the one copy. With `--write volumes` the volumes
  are streamed from the folder instead and no tar is written; with `--write both` (the default
  with `--split`) the volumes are a second copy.
"""
        if disk_rows
        else ""
    )
    return f"""# Image bundle benchmark: upstream's recipes against this pipeline

Measured {facts.date} on {facts.cpus} CPUs ({facts.system}), Docker Engine {facts.docker};
load average {facts.load} when the run began.

{table(every)}{sentences}
- **naive**: upstream's recipe. 0.x rows (the Docker path): per image `docker pull --platform
  linux/ARCH REF` then `docker save` into a tar of its own. 2.x rows: `gpustack save-images`,
  which per image runs `skopeo copy --src-tls-verify=false --retry-times 1 --override-os linux
  --override-arch ARCH docker://REF oci-archive:OUT/REPOSITORY/TAG.tar:REF` (the same command
  is run here, without its 5-second countdown): one OCI archive per image (server, each runner,
  pause, health), nothing shared between archives. The bytes are those tars together.
- **ours**: `registry.Registry(...).pull(...)` of every image into the content-addressed
  `BlobStore`, then `images.export_images` into one folder of hard links into the store (an
  OCI layout that `docker load` also reads, streamed as a tar) and the tar of that folder that
  a bundle's tar carries; the bytes are that tar.
- **ratio**: naive ÷ ours; 2.00× means ours is half the size, or takes half the time.
- **floor**: the distinct compressed blobs the images need (manifests, configs, layers), each
  counted once: what any bundle of them must carry. Ours is above it only by tar headers,
  `index.json`/`manifest.json` and the OCI twins of Docker-typed manifests; **ours ÷ floor**
  says by how much.
- **cold**: our cache empty; the scenario's images removed from the engine (by image ID).
  **warm**: the same run again, with our cache kept and the images still in the engine.
  skopeo keeps no cache, so a 2.x row is cold only.
- The engine holds one platform per tag, so the naive run pulls and saves one platform's
  images, then the next; the other platform's images stay in the engine untagged, which is what
  makes its warm run warm.
- Both run in one process against the same loopback registry (token auth as on Docker Hub),
  whose blobs are in the page cache for both; there is no network in the timings, so they show
  the local work (decompressing, storing, hashing, writing) and not a download.

Where the time goes (skopeo copy fetches and writes in one step: a dash):

{split_table(every)}{disk}
Images: {setup}

Rerun: {rerun}
"""


def write_report(path: Path, text: str) -> None:
    """Atomically: a reader never sees half a report."""
    write_text(path, text)


def run_all(
    scenario_list: Sequence[Scenario],
    work: Path,
    env: Mapping[str, str] | None = None,
    progress: Callable[[str], None] = log.info,
) -> list[Row]:
    """Every scenario's cold and warm rows; a missing Docker engine is one clear error first."""
    try:
        engine_facts()
    except CommandError as exc:
        raise BenchError(f"the benchmark needs a Docker engine: {exc}") from None
    rows: list[Row] = []
    for index, scenario in enumerate(scenario_list):
        rows.extend(measure(scenario, work / f"scenario-{index}", env, progress))
    return rows
