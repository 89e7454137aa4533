"""Interrupted builds: `invoke bundle` killed with SIGKILL at 20 points spread over a real build.

The cell is the amd64 cpu docker cell, pulled from a loopback distribution registry (the
`registry-mirror` option) that holds an image of six 2 MiB incompressible layers, so a build has
downloads, an export and a tar worth interrupting. The registry is reached through a link of
8 MiB/s a download (`Pace`), as Docker Hub is from a site: on loopback the six layers would
come in some 40 ms, too short a phase for kills to land in it run after run.

A traced build from an empty cache records when each file appears in the blob store and under
dist/, and how long it stays (temporary names are compared with their random part starred).
Half of the 20 kill points are spread evenly over the time between the first file and the end
of that build, half midway between files spread over the files; each is anchored to the last
file before it that stayed long enough to be seen by every run (kill when that file, or one the
trace saw after it, has appeared and the same time has passed since), so they land in the same
phase run after run on a loaded host, and none waits for a name that lives a few milliseconds.
Each kill starts from an empty cache; every other one rebuilds over an older bundle of the cell
(another image) in dist/, the others start from an empty dist/. After the kill nothing under a
final name may be damaged or half-finished, and dist/<cell>.tar, if there, must hold the files
of dist/<cell>/; the rerun must complete without asking the registry again for any blob that
was complete, keep those very files, produce a bundle whose sums check, and leave no temporary
entry of the cell in dist/.

Every build runs `invoke bundle` as the console script does, in a process of its own (its own
process group, which the kill takes whole), forked from a server that has imported the pipeline
once: importing it costs seconds per process here, which are no part of what is tested.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support.fault_proxy import FaultProxy, Pace
from support.registry_fixture import (
    AMD64,
    OCI_LAYER,
    Blob,
    DistributionRegistry,
    FixtureImage,
    Logged,
    Pusher,
    make_image,
    plain_registry,
    tar_layer,
)

from gpustack_offline.core.files import sha256_file
from gpustack_offline.stages.images import list_export

pytestmark = pytest.mark.integration

CELL = "v0.7.1-linux-amd64-cpu-py3.11-base-docker"
LAYERS, LAYER_SIZE = 6, 2 << 20
KILLS = 20
INVOKE = Path(sys.executable).with_name("invoke")
HEX = re.compile(r"[0-9a-f]{64}")
# the bundle's final names: present from the start in a rebuild, so not events of the trace
RECORD = f".{CELL}.build.json"  # what the finished bundle was built from (bundle/reuse.py)
FINAL = {CELL, f"{CELL}.tar", f".{CELL}.old", RECORD}
TAR_TEMP = re.compile(rf"/\.{re.escape(CELL)}\.tar\.\*\.part$")  # a key (see key())
# mkstemp/mkdtemp's eight random characters in a temporary name (core.files.atomic_path)
TEMP_TOKEN = re.compile(r"\.[a-z0-9_]{8}\.part(?=/|$)")
LINK_RATE = 8 << 20  # bytes a second of each download from the registry
SEEN_FOR_SURE = 0.25  # seconds a name must last in the trace to anchor a kill point


def random_image(layers: int, size: int) -> FixtureImage:
    found = [tar_layer({f"opt/kill/{i}": os.urandom(size)}) for i in range(layers)]
    return make_image(AMD64, [(Blob(OCI_LAYER, data), diff) for data, diff in found])


def clean_env() -> dict[str, str]:
    """This environment without GPUSTACK_OFFLINE_* settings of the caller's."""
    return {k: v for k, v in os.environ.items() if not k.startswith("GPUSTACK_OFFLINE_")}


@pytest.fixture(scope="module")
def builds(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Builds]:
    """The build server, started first: its imports overlap the registry's start."""
    server = Builds(root, tmp_path_factory.mktemp("kill-builds") / "build.log")
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DistributionRegistry]:
    """A registry standing in for Docker Hub, for gpustack/gpustack:v0.7.1-cpu (amd64)."""
    with plain_registry(tmp_path_factory.mktemp("kill-registry")) as registry:
        yield registry


@pytest.fixture(scope="module")
def link(upstream: DistributionRegistry) -> Iterator[FaultProxy]:
    """The registry behind a slow link: each blob comes at LINK_RATE."""
    with FaultProxy(upstream.url) as proxy:
        proxy.on(r"/blobs/", Pace(LINK_RATE))
        yield proxy


def serve_builds() -> None:
    """The build server (`python -c 'from test_kill import serve_builds; serve_builds()'`):
    import the pipeline once, then for each request line (JSON: args, cwd, env, log) fork a
    child that runs `invoke ARGS` as the console script does, in its own process group, with
    its output in `log`; answer the child's pid, then its exit status, one line each."""
    import invoke.main

    import gpustack_offline.cli.invoke_tasks  # noqa: F401 - the seconds of imports, done once

    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.setpgid(0, 0)
                os.chdir(request["cwd"])
                os.environ.clear()
                os.environ.update(request["env"])
                os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
                out = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(out, 1)
                os.dup2(out, 2)
                sys.argv = [str(INVOKE), *request["args"]]
                invoke.main.program.run()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            except BaseException:  # noqa: BLE001 - reported in the log, as a process would
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        with contextlib.suppress(OSError):  # the child may have done it first
            os.setpgid(pid, pid)
        print(pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), flush=True)


class Builds:
    """The client of `serve_builds`: one build at a time."""

    def __init__(self, root: Path, log: Path) -> None:
        self.root, self.log = root, log
        # the caller's PYTHONPATH kept after tests/: a checkout run against its own src/
        path = [str(Path(__file__).parent), *filter(None, [os.environ.get("PYTHONPATH")])]
        server_env = {**clean_env(), "PYTHONPATH": os.pathsep.join(path)}
        self.server = subprocess.Popen(
            [sys.executable, "-c", "from test_kill import serve_builds; serve_builds()"],
            cwd=root, env=server_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=log.with_suffix(".server").open("w"), bufsize=0,
        )  # fmt: skip
        self.pid: int | None = None  # the build running now

    def _answer(self, timeout: float | None) -> int | None:
        assert self.server.stdout is not None
        if not select.select([self.server.stdout], [], [], timeout)[0]:
            return None
        line = self.server.stdout.readline()
        assert line, f"the build server died: {self.log.with_suffix('.server').read_text()}"
        return int(line)

    def start(self, env: dict[str, str], *args: str) -> int:
        assert self.pid is None and self.server.stdin is not None
        request = {"args": list(args), "cwd": str(self.root), "env": env, "log": str(self.log)}
        self.server.stdin.write(json.dumps(request).encode() + b"\n")
        self.pid = self._answer(60)
        assert self.pid is not None, "the build server did not start the build"
        return self.pid

    def poll(self, timeout: float | None = 0) -> int | None:
        """The build's exit status once it has ended (-9: killed), else None."""
        code = self._answer(timeout)
        if code is not None:
            self.pid = None
        return code

    def kill(self) -> None:
        assert self.pid is not None
        os.killpg(self.pid, signal.SIGKILL)
        while self.poll(None) is None:
            pass

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        if self.pid is not None:
            self.kill()
        assert self.server.stdin is not None
        self.server.stdin.close()
        self.server.wait(timeout=30)


@dataclass
class Build:
    """One working area (cache, dist/) and how `invoke bundle` is run in it."""

    builds: Builds
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

    @property
    def older(self) -> Path:
        """An older bundle of the cell (dist/<cell>/ and its tar) to rebuild over."""
        return self.base / "older"

    def fresh(self, *, over_older: bool = False) -> None:
        """An empty cache; an empty dist/, or one holding the older bundle (hard links)."""
        shutil.rmtree(self.cache, ignore_errors=True)
        shutil.rmtree(self.dist, ignore_errors=True)
        if over_older:
            shutil.copytree(self.older, self.dist, copy_function=os.link)

    def start(self) -> None:
        self.builds.start(self.env, "bundle", "--cell", CELL)

    def run(self, *args: str, env: dict[str, str] | None = None) -> str:
        self.builds.start(env or self.env, *(args or ("bundle", "--cell", CELL)))
        code = self.builds.poll(120)
        assert code == 0, f"exit {code}: {self.builds.output()}"
        return self.builds.output()

    def names(self) -> set[str]:
        """What is in the blob store, dist/ (but the bundle's final names), and the staged
        bundle folder right now (where the images' export folder is staged)."""
        found: set[str] = set()
        for folder in (self.blobs, self.dist, *self.dist.glob(f".{CELL}.*.part")):
            try:
                with os.scandir(folder) as entries:
                    found.update(f"{folder}/{e.name}" for e in entries if e.name not in FINAL)
            except (FileNotFoundError, NotADirectoryError):  # gone, or the tar's temp file
                pass
        return found


@pytest.fixture(scope="module")
def build(
    builds: Builds,
    upstream: DistributionRegistry,
    link: FaultProxy,
    tmp_path_factory: pytest.TempPathFactory,
) -> Build:
    """The area, pinned to the registry's image; `older` holds a bundle of another image that
    the tag named before."""
    base = tmp_path_factory.mktemp("kill")
    env = clean_env()
    env.update(
        GPUSTACK_OFFLINE_REGISTRY_MIRROR=link.host,
        GPUSTACK_OFFLINE_IMAGES_PINS_DIR=str(base / "pins"),
        GPUSTACK_OFFLINE_CACHE_DIR=str(base / "cache"),
        GPUSTACK_OFFLINE_DIST_DIR=str(base / "dist"),
        GPUSTACK_OFFLINE_PROGRESS="false",
        GPUSTACK_OFFLINE_JOBS="2",
    )
    area = Build(builds, base, env)
    older = {
        **env,
        "GPUSTACK_OFFLINE_IMAGES_PINS_DIR": str(base / "older-pins"),
        "GPUSTACK_OFFLINE_CACHE_DIR": str(base / "older-cache"),
        "GPUSTACK_OFFLINE_DIST_DIR": str(area.older),
    }
    pusher = Pusher(upstream.url)
    pusher.tag("gpustack/gpustack", "v0.7.1-cpu", [random_image(1, 1 << 20)])
    area.run("lock", "--cell", CELL, env=older)
    area.run(env=older)
    pusher.tag("gpustack/gpustack", "v0.7.1-cpu", [random_image(LAYERS, LAYER_SIZE)])
    area.run("lock", "--cell", CELL)
    return area


def key(name: str) -> str:
    """A name with the eight random characters of its temporary folder or file starred, so that
    the same step of two builds has the same key."""
    return TEMP_TOKEN.sub(".*.part", name)


@dataclass(frozen=True)
class Event:
    """A key's first appearance in the traced build, and how long it was there."""

    at: float
    key: str
    lasted: float


def trace(build: Build) -> tuple[list[Event], float]:
    """One build from an empty cache: each key's first appearance and how long it lasted (to
    the end for what is still there), in order, and when the build ended."""
    build.fresh()
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    started = time.monotonic()
    build.start()
    while (code := build.builds.poll()) is None:
        now = time.monotonic() - started
        for name in build.names():
            first.setdefault(key(name), now)
            last[key(name)] = now
        time.sleep(0.002)
    ended = time.monotonic() - started
    assert code == 0, build.builds.output()
    present = {key(name) for name in build.names()}
    events = [
        Event(at, k, (ended if k in present else last[k]) - at)
        for k, at in sorted(first.items(), key=lambda item: item[1])
    ]
    return events, ended


@dataclass(frozen=True)
class KillPoint:
    """Kill `delay` seconds after `anchor` (a key) or any later key of the trace has been seen;
    right after the start when there is no anchor."""

    anchor: str | None
    delay: float
    anchor_at: float  # when the anchor appeared in the trace


def kill_points(events: list[Event], ended: float) -> list[KillPoint]:
    """KILLS moments: half spread evenly over the time between the first file and the end of
    the traced build (where the time goes: the export and the tar), half midway between files
    spread evenly over the files (where the events are: the downloads). Each is anchored to the
    last event before it that lasted long enough to be seen in every run (a temporary file of a
    few milliseconds may come and go between two looks), so no point waits for a name that a
    run never shows."""
    first, half = events[0].at, KILLS // 2
    moments = [first + (ended - first) * i / (half + 1) for i in range(1, half + 1)]
    ends = [e.at for e in events[1:]] + [ended]
    for i in range(KILLS - half):
        k = round(i * (len(events) - 1) / (KILLS - half - 1))
        moments.append((events[k].at + ends[k]) / 2)
    lasting = [e for e in events if e.lasted >= SEEN_FOR_SURE]
    points = []
    for moment in sorted(moments):
        before = [e for e in lasting if e.at <= moment]
        anchor = before[-1] if before else None
        if anchor is None:
            points.append(KillPoint(None, moment, 0.0))
        else:
            points.append(KillPoint(anchor.key, moment - anchor.at, anchor.at))
    return points


def kill_at(
    build: Build, reached: Callable[[set[str]], bool], delay: float, anchor_at: float = 0.0
) -> bool:
    """Start a build, SIGKILL it `delay` seconds after the keys seen so far are `reached`;
    False if it finished first. The delay is scaled by how fast this run reached the anchor
    compared with the trace (`anchor_at` seconds there): a run on a less loaded host than the
    trace's still lands in the same phase instead of after the end."""
    started = time.monotonic()
    build.start()
    seen: set[str] = set()
    since: float | None = None
    while build.builds.poll() is None:
        if since is None:
            seen |= {key(name) for name in build.names()}
            if reached(seen):
                since = time.monotonic()
                if anchor_at > 0.1:
                    delay *= min(max((since - started) / anchor_at, 0.25), 4.0)
        if since is not None and time.monotonic() - since >= delay:
            build.builds.kill()
            return True
        time.sleep(0.002)
    return False


def anchor_seen(events: list[Event], anchor: str | None) -> Callable[[set[str]], bool]:
    """The anchor, or a key the trace saw after it (the anchor came and went unseen)."""
    order = {e.key: i for i, e in enumerate(events)}
    if anchor is None:
        return lambda seen: True
    return lambda seen: any(order.get(k, -1) >= order[anchor] for k in seen)


def tar_begun(seen: set[str]) -> bool:
    return any(TAR_TEMP.search(k) for k in seen)


def phase(build: Build) -> str:
    """Where a killed build was, from the temporary files it left (a fresh area each time)."""
    if any(p.name.endswith(".part") or p.name.startswith(".new.") for p in build.blobs.glob(".*")):
        return "mid-download"
    stages = list(build.dist.glob(f".{CELL}.*.part"))
    if any(s.is_dir() and list(s.glob(".images.*.part")) for s in stages):
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
    assert [i.platform for i in list_export(folder / "images")] == ["linux/amd64"]
    if not tar.exists():
        return
    packed = {}
    with tarfile.open(tar) as tf:
        for member in tf:
            if member.isfile():
                data = tf.extractfile(member)
                assert data is not None
                rel = member.name.removeprefix(f"{CELL}/")
                packed[rel] = hashlib.sha256(data.read()).hexdigest()
    assert packed == listed, f"{tar} does not hold the files of {folder}"


def gets(entries: list[Logged]) -> Counter[str]:
    """How often each blob or manifest was fetched, by digest."""
    return Counter(
        e.path.rsplit("sha256:", 1)[-1]
        for e in entries
        if e.method == "GET" and re.search(r"/(blobs|manifests)/sha256:", e.path)
    )


def left_in_dist(build: Build) -> str:
    """What a killed rebuild left: the older bundle, the new one (with its tar or not yet), or
    none (killed between atomic_dir's two renames)."""
    folder = build.dist / CELL
    if not folder.exists():
        return "no bundle"
    older = (build.older / CELL / "SHA256SUMS").read_bytes()
    if (folder / "SHA256SUMS").read_bytes() == older:
        return "the older bundle"
    return "the new bundle" + ("" if (build.dist / f"{CELL}.tar").exists() else ", no tar yet")


@dataclass
class Tally:
    landed: Counter[str] = field(default_factory=Counter)  # where the kills landed
    rebuilds: Counter[str] = field(default_factory=Counter)  # what killed rebuilds left
    reused: int = 0  # complete blobs the reruns kept
    mark: int = 0  # registry log entries seen so far


def kill_and_rerun(
    build: Build,
    upstream: DistributionRegistry,
    tally: Tally,
    reached: Callable[[set[str]], bool],
    delay: float = 0.0,
    anchor_at: float = 0.0,
    *,
    over_older: bool,
) -> None:
    build.fresh(over_older=over_older)
    # a point that a faster run passes before its kill is tried again earlier, twice at most
    for retry in range(3):
        if kill_at(build, reached, delay / 2**retry, anchor_at):
            break
        tally.mark = len(upstream.log())
        if retry < 2:
            build.fresh(over_older=over_older)
    else:
        tally.landed["after the build finished"] += 1
        return
    tally.landed[phase(build)] += 1
    if over_older:
        tally.rebuilds[left_in_dist(build)] += 1
    complete = complete_blobs(build)  # (a)
    check_dist(build, finished=False)  # (b)

    build.run()  # (c)
    # the killed build's requests and the rerun's: each complete blob was fetched once
    entries = upstream.log(tally.mark)
    tally.mark += len(entries)
    fetched = gets(entries)
    again = sorted(h for h in complete if fetched[h] != 1)
    assert not again, f"complete blobs fetched again after the kill: {again}"
    after = complete_blobs(build)
    assert all(after[h] == inode for h, inode in complete.items()), "complete blobs replaced"
    tally.reused += len(complete)
    check_dist(build, finished=True)
    left = sorted(p.name for p in build.dist.iterdir())
    assert left == sorted([CELL, f"{CELL}.tar", RECORD]), f"left in dist/ after the rerun: {left}"


def test_a_build_killed_at_20_points_never_leaves_a_damaged_file_and_resumes(
    build: Build, upstream: DistributionRegistry
) -> None:
    events, ended = trace(build)
    check_dist(build, finished=True)
    tally = Tally(mark=len(upstream.log()))
    for i, point in enumerate(kill_points(events, ended)):
        # every other kill rebuilds over the older bundle, the last one (the tar) among them
        reached = anchor_seen(events, point.anchor)
        older = (KILLS - i) % 2 == 1
        kill_and_rerun(
            build, upstream, tally, reached, point.delay, point.anchor_at, over_older=older
        )
    # and one rebuild killed as its tar is written: the new folder is in place, the older
    # bundle's tar must not stand beside it
    kill_and_rerun(build, upstream, tally, tar_begun, over_older=True)
    print(f"\nkill points: {dict(tally.landed)}; rebuilds left: {dict(tally.rebuilds)}; "
          f"complete blobs reused: {tally.reused}")  # fmt: skip
    landed = tally.landed
    assert landed["after the build finished"] <= 2, landed
    assert landed["mid-download"] >= 3 and landed["mid-tar"] >= 1, landed
    assert landed["mid-export"] + landed["mid-assemble"] >= 1, landed
    assert tally.rebuilds["the new bundle, no tar yet"] >= 1, tally.rebuilds
