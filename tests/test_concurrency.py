"""Builds that run at the same time, and builds that are killed.

- Three `invoke bundle` processes build one pip cell at once into three dist folders from one
  cache whose tools part is cold (no tool venv in the first round, no tools archive and no tool
  assets in every round), three rounds in a row: the three manifests may differ only in the build
  time and the build host. Upstream's download-tools empties and refills the tool venv's
  `third_party/bin`, so unserialised builds failed or recorded an archive without an asset.
  The tools come from a loopback mirror that answers each request after a second, as a slow
  upstream does: the downloads overlap as they do on a real network.
- A process killed with SIGKILL while `runner.run` waits for a program takes the program with it;
  a run that is interrupted or times out ends the program's whole process group.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.prompt import as_at_a_prompt
from support.release_mirror import ReleaseMirror, write_fixture_locks

from gpustack_offline.bundle import compare
from gpustack_offline.core import cache
from gpustack_offline.core.errors import CommandError
from gpustack_offline.core.options import resolve
from gpustack_offline.core.processes import run
from gpustack_offline.stages import tools

CELL = "v0.7.1-linux-amd64-cpu-py3.11-base-pip"
INVOKE = Path(sys.executable).with_name("invoke")
BUILDS, ROUNDS = 3, 3
MIRROR_DELAY = 1.0  # seconds before each tools asset answer
SRC = Path(__file__).resolve().parent.parent / "src"


class SlowMirror(ReleaseMirror):
    """The release mirror, answering each request after MIRROR_DELAY seconds."""

    def _record(self, path: str) -> None:
        super()._record(path)
        time.sleep(MIRROR_DELAY)


@pytest.fixture(scope="module")
def slow_mirror(release_mirror: ReleaseMirror) -> Iterator[ReleaseMirror]:
    with SlowMirror(release_mirror.root) as mirror:
        yield mirror


def seed_blobs(root: Path, shared: Path) -> None:
    """Hard-link the wheels the default cache already has (same file system only): the tools
    part is what is tested cold, not the download of 250 MB of wheels."""
    source = resolve(root).path("cache_dir", root) / "blobs" / "sha256"
    target = shared / "blobs" / "sha256"
    target.mkdir(parents=True, exist_ok=True)
    if not source.is_dir() or source.stat().st_dev != target.stat().st_dev:
        return
    for blob in source.iterdir():
        if len(blob.name) == 64 and blob.is_file():
            os.link(blob, target / blob.name)


def cold_tools(shared: Path, locks: Path) -> None:
    """No tools archive and no tool asset in the cache (the tool venv stays)."""
    shutil.rmtree(shared / "tools" / "archives", ignore_errors=True)
    lock = tools.ToolsLock(tools.lock_path(locks, "0.7.1"), frozen=True)
    for sha, _ in lock.entries.values():
        (shared / "blobs" / "sha256" / sha).unlink(missing_ok=True)


@pytest.mark.integration
def test_three_concurrent_builds_from_a_cold_tools_cache_give_identical_manifests(
    root: Path, slow_mirror: ReleaseMirror, tmp_path: Path
) -> None:
    shared = tmp_path / "cache"
    locks = write_fixture_locks(slow_mirror.root, tmp_path / "tools-locks")
    seed_blobs(root, shared)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUSTACK_OFFLINE_")}
    env.update(
        GPUSTACK_OFFLINE_CACHE_DIR=str(shared),
        GPUSTACK_OFFLINE_TOOLS_BASE_URL=slow_mirror.base_url,
        GPUSTACK_OFFLINE_TOOLS_LOCKS_DIR=str(locks),
        GPUSTACK_OFFLINE_FROZEN="true",
        GPUSTACK_OFFLINE_PROGRESS="false",
    )
    for round_ in range(1, ROUNDS + 1):
        cold_tools(shared, locks)
        dists = [tmp_path / f"round{round_}" / f"dist{i}" for i in range(BUILDS)]
        procs = [
            subprocess.Popen(
                [INVOKE, "bundle", "--cell", CELL, "--dist", dist],
                cwd=root,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )  # fmt: skip
            for dist in dists
        ]
        outputs = [proc.communicate(timeout=600)[0] for proc in procs]
        for proc, output in zip(procs, outputs, strict=True):
            assert proc.returncode == 0, f"round {round_}: exit {proc.returncode}:\n{output}"
        manifests = [compare.read_manifest(dist / CELL) for dist in dists]
        for other in manifests[1:]:
            differences = compare.compare_manifests(manifests[0], other)
            unexpected = [
                str(d)
                for d in differences
                if not (d.what == "built_at" or d.what.startswith("provenance.host."))
                and d.what not in compare.EXPECTED_FILES  # the SBOM: its timestamp
            ]
            assert not unexpected, f"round {round_}: " + "\n".join(unexpected)
        programs = {tools.asset_program(a["path"]) for a in manifests[0]["tools"]["assets"]}
        assert programs == set(tools.PROGRAMS), manifests[0]["tools"]["assets"]
        (record,) = (shared / "tools" / "archives").glob("*/archive.json")
        assert len(json.loads(record.read_text())["assets"]) == len(tools.PROGRAMS)
        assert cache.leftovers(shared) == []


# -- programs that must not outlive the run that started them ---------------------------------


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for its reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return found


def wait_for(condition, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s: {what}")


def python_running(code: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, text=True, preexec_fn=as_at_a_prompt
    )


def test_a_process_killed_while_it_runs_a_program_takes_the_program_with_it() -> None:
    """SIGKILL, which no handler sees: the kernel's parent-death signal ends the programs that
    `runner.run` started, from the main thread and from a worker thread alike."""
    parent = python_running(
        """
        import threading
        from gpustack_offline.core.processes import run
        threading.Thread(target=run, args=(["sleep", "301"],), daemon=True).start()
        run(["sleep", "300"])
        """
    )
    try:
        sleeps = wait_for(
            lambda: len(kids := children(parent.pid)) == 2 and kids, 30, "two sleep children"
        )
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        wait_for(lambda: not any(alive(p) for p in sleeps), 5, f"sleeps {sleeps} gone")
    finally:
        parent.kill()
        for pid in children(parent.pid):
            os.kill(pid, signal.SIGKILL)


def test_an_interrupted_run_ends_the_programs_whole_process_group(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the build): the program and what it started end with the run."""
    pids = tmp_path / "pids"
    parent = python_running(
        f"""
        from gpustack_offline.core.processes import run
        try:
            run(["sh", "-c", "sleep 300 & echo $! > {pids}; sleep 301"])
        except KeyboardInterrupt:
            print("interrupted")
        """
    )
    try:
        grandchild = wait_for(
            lambda: pids.is_file() and pids.read_text().strip(), 30, "the background sleep"
        )
        (child,) = children(parent.pid)
        parent.send_signal(signal.SIGINT)
        assert parent.wait(10) == 0
        gone = [int(grandchild), child]
        wait_for(lambda: not any(alive(p) for p in gone), 5, f"{gone} gone")
    finally:
        parent.kill()


def test_a_run_that_times_out_ends_the_programs_whole_process_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    with pytest.raises(CommandError, match="did not finish within"):
        run(["sh", "-c", f"sleep 300 & echo $! > {pids}; wait"], timeout=1)
    grandchild = int(pids.read_text())
    wait_for(lambda: not alive(grandchild), 5, f"the background sleep {grandchild} gone")
