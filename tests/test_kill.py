"""Interrupted builds: `invoke bundle` killed with SIGKILL at 20 points spread over a real build.

The cell is the amd64 cpu docker cell, pulled from a loopback distribution registry (the
`registry-mirror` option) that holds an image of six 4 MiB incompressible layers, so a build has
downloads, an export and a tar worth interrupting and still takes about two seconds here.

A traced build from an empty cache records when each file appears in the blob store and under
dist/. Half of the 20 kill points are spread evenly over the time between the first file and
the end of that build, half midway between files spread over the files; each is anchored to the
last file seen before it (kill when that file has appeared and the same time has passed since),
so they land in the same phase run after run on a loaded host.
Each kill starts from an empty cache and dist/; after the kill nothing under a final name may be
damaged or half-finished, and the rerun must complete without asking the registry again for any
blob that was complete, keep those very files, and produce a bundle whose sums check.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from registry_fixture import (
    AMD64,
    OCI_LAYER,
    Blob,
    DistributionRegistry,
    Pusher,
    make_image,
    plain_registry,
    tar_layer,
)

from gpustack_offline.fsutil import sha256_file
from gpustack_offline.images import list_export

pytestmark = pytest.mark.integration

CELL = "v0.7.1-linux-amd64-cpu-py3.11-base-docker"
LAYERS, LAYER_SIZE = 6, 4 << 20
KILLS = 20
INVOKE = Path(sys.executable).with_name("invoke")
HEX = re.compile(r"[0-9a-f]{64}")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DistributionRegistry]:
    """A registry standing in for Docker Hub, with gpustack/gpustack:v0.7.1-cpu for amd64."""
    with plain_registry(tmp_path_factory.mktemp("kill-registry")) as registry:
        layers = [tar_layer({f"opt/kill/{i}": os.urandom(LAYER_SIZE)}) for i in range(LAYERS)]
        image = make_image(AMD64, [(Blob(OCI_LAYER, data), diff) for data, diff in layers])
        Pusher(registry.url).tag("gpustack/gpustack", "v0.7.1-cpu", [image])
        yield registry


@dataclass
class Build:
    """One working area (cache, dist/) and how `invoke bundle` is run in it."""

    root: Path
    base: Path
    env: dict[str, str]

    @property
    def cache(self) -> Path:
        return self.base / "cache"

    @property
    def blobs(self) -> Path:
        return self.cache / "blobs" / "sha256"

    @property
    def dist(self) -> Path:
        return self.base / "dist"

    def fresh(self) -> None:
        shutil.rmtree(self.cache, ignore_errors=True)
        shutil.rmtree(self.dist, ignore_errors=True)

    def start(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [INVOKE, "bundle", "--cell", CELL],
            cwd=self.root,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the kill takes any child too
        )

    def run(self) -> str:
        proc = subprocess.run(
            [INVOKE, "bundle", "--cell", CELL], cwd=self.root, env=self.env,
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout + proc.stderr

    def names(self) -> set[str]:
        """What is in the blob store, dist/, and the staged bundle's images/ right now."""
        found: set[str] = set()
        for folder in (self.blobs, self.dist, *self.dist.glob(f".{CELL}.*.part/images")):
            try:
                with os.scandir(folder) as entries:
                    found.update(f"{folder}/{e.name}" for e in entries)
            except FileNotFoundError:
                pass
        return found


@pytest.fixture(scope="module")
def build(root: Path, upstream: DistributionRegistry, tmp_path_factory) -> Build:
    base = tmp_path_factory.mktemp("kill")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUSTACK_OFFLINE_")}
    env.update(
        GPUSTACK_OFFLINE_REGISTRY_MIRROR=upstream.host,
        GPUSTACK_OFFLINE_IMAGES_PINS_DIR=str(base / "pins"),
        GPUSTACK_OFFLINE_CACHE_DIR=str(base / "cache"),
        GPUSTACK_OFFLINE_DIST_DIR=str(base / "dist"),
        GPUSTACK_OFFLINE_PROGRESS="false",
        GPUSTACK_OFFLINE_JOBS="2",
    )
    pinned = subprocess.run(
        [INVOKE, "lock", "--cell", CELL], cwd=root, env=env, capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    assert pinned.returncode == 0, pinned.stdout + pinned.stderr
    return Build(root, base, env)


def trace(build: Build) -> tuple[list[tuple[float, str]], float]:
    """One build from an empty cache: (seconds, name) for each new file, and when it ended."""
    build.fresh()
    events: list[tuple[float, str]] = []
    seen: set[str] = set()
    started = time.monotonic()
    proc = build.start()
    while proc.poll() is None:
        for name in sorted(build.names() - seen):
            events.append((time.monotonic() - started, name))
            seen.add(name)
        time.sleep(0.002)
    ended = time.monotonic() - started
    output = proc.stdout.read().decode() if proc.stdout else ""
    assert proc.returncode == 0, output
    return events, ended


def kill_points(events: list[tuple[float, str]], ended: float) -> list[tuple[int, float]]:
    """(files seen, seconds after the last of them) for KILLS moments: half spread evenly over
    the time between the first file and the end of the traced build (where the time goes: the
    export and the tar), half midway between files spread evenly over the files (where the
    events are: the downloads)."""
    first, half = events[0][0], KILLS // 2
    moments = [first + (ended - first) * i / (half + 1) for i in range(1, half + 1)]
    ends = [t for t, _ in events[1:]] + [ended]
    for i in range(KILLS - half):
        k = round(i * (len(events) - 1) / (KILLS - half - 1))
        moments.append((events[k][0] + ends[k]) / 2)
    points = []
    for moment in sorted(moments):
        seen = sum(1 for t, _ in events if t <= moment)
        points.append((seen, moment - events[seen - 1][0]))
    return points


def kill_at(build: Build, seen_wanted: int, delay: float) -> bool:
    """Start a build, SIGKILL it at the point; False if it finished first."""
    proc = build.start()
    seen: set[str] = set()
    reached: float | None = None
    while proc.poll() is None:
        if reached is None:
            seen |= build.names()
            if len(seen) >= seen_wanted:
                reached = time.monotonic()
        if reached is not None and time.monotonic() - reached >= delay:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    return False


def phase(build: Build) -> str:
    """Where a killed build was, from the temporary files it left (a fresh area each time)."""
    if any(p.name.endswith(".part") or p.name.startswith(".new.") for p in build.blobs.glob(".*")):
        return "mid-download"
    stages = list(build.dist.glob(f".{CELL}.*.part"))
    if any(s.is_dir() and list((s / "images").glob(".images.tar.*.part")) for s in stages):
        return "mid-export"
    if any(s.is_dir() for s in stages):
        return "mid-assemble"
    if list(build.dist.glob(f".{CELL}.tar.*.part")):
        return "mid-tar"
    return "between files"


def complete_blobs(build: Build) -> dict[str, int]:
    """Every file under a final name in the blob store hashes to its name; name → inode."""
    found = {}
    for path in build.blobs.glob("*") if build.blobs.is_dir() else []:
        if HEX.fullmatch(path.name):
            assert sha256_file(path) == path.name, f"{path} is under a final name but damaged"
            found[path.name] = path.stat().st_ino
    return found


def sums_check(folder: Path) -> dict[str, str]:
    """`sha256sum -c SHA256SUMS` passes and lists every file; returns path → sha256."""
    checked = subprocess.run(
        ["sha256sum", "--strict", "-c", "SHA256SUMS"], cwd=folder, capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    assert checked.returncode == 0, f"{folder}: {checked.stdout}{checked.stderr}"
    listed = {}
    for line in (folder / "SHA256SUMS").read_text().splitlines():
        digest, _, rel = line.partition("  ")
        listed[rel] = digest
    files = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    assert files == {*listed, "SHA256SUMS"}, f"{folder}: files not in SHA256SUMS or missing"
    listed["SHA256SUMS"] = sha256_file(folder / "SHA256SUMS")
    return listed


def check_dist(build: Build, *, finished: bool) -> None:
    """dist/<cell>/ is absent or complete; dist/<cell>.tar is absent or the same files."""
    folder, tar = build.dist / CELL, build.dist / f"{CELL}.tar"
    if finished:
        assert folder.is_dir() and tar.is_file()
    if not folder.exists():
        assert not tar.exists(), "a tar without its folder"
        return
    listed = sums_check(folder)
    assert [i.platform for i in list_export(folder / "images" / "images.tar")] == ["linux/amd64"]
    if not tar.exists():
        return
    packed = {}
    with tarfile.open(tar) as tf:
        for member in tf:
            if member.isfile():
                data = tf.extractfile(member)
                assert data is not None
                rel = member.name.removeprefix(f"{CELL}/")
                packed[rel] = hashlib.file_digest(data, "sha256").hexdigest()
    assert packed == listed, f"{tar} does not hold the files of {folder}"


def blob_gets(registry: DistributionRegistry, since: int) -> Counter[str]:
    return Counter(
        e.path.rsplit("sha256:", 1)[-1]
        for e in registry.log(since)
        if e.method == "GET" and "/blobs/sha256:" in e.path
    )


def test_a_build_killed_at_20_points_never_leaves_a_damaged_file_and_resumes(
    build: Build, upstream: DistributionRegistry
) -> None:
    events, ended = trace(build)
    check_dist(build, finished=True)
    landed: Counter[str] = Counter()
    reused = 0
    for seen_wanted, delay in kill_points(events, ended):
        build.fresh()
        if not kill_at(build, seen_wanted, delay):
            landed["after the build finished"] += 1
            continue
        landed[phase(build)] += 1
        complete = complete_blobs(build)  # (a)
        check_dist(build, finished=False)  # (b)

        mark = len(upstream.log())
        build.run()  # (c)
        fetched = blob_gets(upstream, mark)
        again = sorted(set(complete) & set(fetched))
        assert not again, f"complete blobs fetched again after the kill: {again}"
        after = complete_blobs(build)
        assert all(after[h] == inode for h, inode in complete.items()), "complete blobs replaced"
        reused += len(complete)
        check_dist(build, finished=True)
    print(f"\nkill points: {dict(landed)}; complete blobs reused: {reused}")
    assert landed["after the build finished"] <= 2, landed
    assert landed["mid-download"] >= 3 and landed["mid-tar"] >= 1, landed
    assert landed["mid-export"] + landed["mid-assemble"] >= 1, landed
