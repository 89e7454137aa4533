"""`invoke inspect --cell ID`: what a cell will carry, read from the committed data alone. The
packages are the committed lock's (read here again with tomllib), the 2.x images the worker's
choice, the tools assets and image digests what the sums and pins record; a missing file is
named with the command that writes it, and nothing touches the network (sockets are blocked,
in this process and in the `invoke` runs below) or takes more than a few seconds."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from gpustack_offline.cli import commands
from gpustack_offline.core.context import Context
from gpustack_offline.core.errors import CellError
from gpustack_offline.core.matrix import Cell
from gpustack_offline.recipes import docker0, inspection
from gpustack_offline.recipes.inspection import JSON_KEYS
from gpustack_offline.stages import images, runners, targets, tools
from gpustack_offline.stages.registry import Reference

ROOT = Path(__file__).resolve().parents[1]
PIP = "v0.7.1-linux-amd64-cpu-py3.11-base-pip"  # its lock is committed under bundles/locks/
DOCKER0 = "v0.7.1-linux-amd64-cpu-py3.11-base-docker"
DOCKER2 = "v2.3.0-linux-amd64-cuda12.8-py3.11-vllm-docker"
LIMIT_S = 5.0  # what the issue asks of one inspect

# `invoke` itself, in a child whose sockets are blocked as this process's are (pytest-socket)
OFFLINE_INVOKE = (
    "import sys, pytest_socket\n"
    "pytest_socket.disable_socket(allow_unix_socket=True)\n"
    "from invoke.main import program\n"
    "program.run(['invoke', *sys.argv[1:]])\n"
)


def _ctx(**cli: str) -> Context:
    return Context.load(ROOT, cli=cli, env={})


def _invoke(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GPUSTACK_OFFLINE_")}
    return subprocess.run(
        [sys.executable, "-c", OFFLINE_INVOKE, *args], cwd=ROOT, env={**clean, **(env or {})},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def _lock_packages(cell: Cell) -> list[dict[str, Any]]:
    """The committed lock's packages for the target, read without the project's reader."""
    data = tomllib.loads((ROOT / "bundles" / "locks" / cell.id / "pylock.toml").read_text())
    return [p for p in data["packages"] if targets.marker_applies(cell, p.get("marker"))]


def _file_name(entry: dict[str, Any]) -> str:
    return str(entry["url"]).rsplit("/", 1)[-1]


# --- pip cells ----------------------------------------------------------------------------------


def test_a_pip_cells_packages_are_its_committed_locks_packages() -> None:
    ctx = _ctx()
    cell = ctx.matrix.cell(PIP)
    found = commands._recipes().contents(ctx, cell)
    locked = _lock_packages(cell)
    assert locked, "the committed lock lists no packages"
    assert sorted((p.name, p.version) for p in (*found.packages, *found.installer)) == sorted(
        (p["name"], p["version"]) for p in locked
    )
    assert [(p.name, p.version) for p in found.installer] == [("uv", "0.13.9")]  # the matrix's
    sums = "bundles/tools/gpustack-0.7.1.toml"
    command = f"invoke lock --tools --cell {PIP}"
    if not (ROOT / sums).is_file():  # no tools sums committed yet: the one missing file
        assert found.missing == (inspection.Missing("tools sums", sums, command),)
    else:
        assert found.missing == ()


def test_each_package_carries_a_locked_wheel_for_the_target_and_the_total_is_their_sizes() -> None:
    ctx = _ctx()
    cell = ctx.matrix.cell(PIP)
    found = commands._recipes().contents(ctx, cell)
    by_name = {p["name"]: p for p in _lock_packages(cell)}
    total = 0
    for item in (*found.packages, *found.installer):
        wheels = {_file_name(w): w for w in by_name[item.name].get("wheels", [])}
        assert item.source == "wheel" and item.file in wheels, item
        entry = wheels[item.file]
        assert (item.sha256, item.size) == (entry["hashes"]["sha256"], entry["size"])
        if len(wheels) == 1:
            assert item.file == next(iter(wheels))
        total += entry["size"]
    # a package with a wheel for the target's CPython and one for any Python: the target's
    aiohttp = next(p for p in found.packages if p.name == "aiohttp")
    assert aiohttp.file and "cp311" in aiohttp.file and "x86_64" in aiohttp.file
    tools_bytes = sum(t.size or 0 for t in found.tools)
    assert found.bytes_known == total + tools_bytes
    assert found.to_json()["totals"]["bytes_known"] == total + tools_bytes


def test_a_pip_cell_without_tools_sums_says_so_per_program(tmp_path: Path) -> None:
    ctx = _ctx(tools_locks_dir=str(tmp_path / "tools"))
    found = commands._recipes().contents(ctx, ctx.matrix.cell(PIP))
    command = f"invoke lock --tools --cell {PIP}"
    assert [(t.program, t.path, t.note) for t in found.tools] == [
        (program, None, f"not pinned: run `{command}`") for program in tools.PROGRAMS
    ]
    assert [(m.what, m.command) for m in found.missing] == [("tools sums", command)]
    assert found.unknown_sizes == len(tools.PROGRAMS)


def test_the_tools_assets_are_those_the_sums_record_for_the_target(tmp_path: Path) -> None:
    ctx = _ctx(tools_locks_dir=str(tmp_path / "tools"))
    sums = tools.ToolsLock(tools.lock_path(ctx.layout.tools_locks, "0.7.1"), frozen=False)
    box = "gpustack/llama-box/releases/download/v0.0.171"
    recorded = {
        f"{box}/dl-llama-box-linux-amd64-cpu.zip": 11,  # the target's
        f"{box}/dl-llama-box-linux-amd64-cuda-12.4.zip": 12,  # another device
        f"{box}/dl-llama-box-linux-arm64-cpu.zip": 13,  # another arch
        "gpustack/gguf-parser-go/releases/download/v0.22.1/gguf-parser-linux-amd64": 14,
        "gpustack/gguf-parser-go/releases/download/v0.22.1/gguf-parser-windows-amd64.exe": 15,
    }
    for path, size in recorded.items():
        sums.record(tools.Asset(path, f"{size:064x}", size))
    sums.save("0.7.1")
    found = commands._recipes().contents(ctx, ctx.matrix.cell(PIP))
    assert [(t.program, t.path, t.size) for t in found.tools] == [
        ("llama-box", f"{box}/dl-llama-box-linux-amd64-cpu.zip", 11),
        ("gguf-parser", "gpustack/gguf-parser-go/releases/download/v0.22.1/gguf-parser-linux-amd64",
         14),
        ("fastfetch", None, None),
    ]  # fmt: skip
    assert found.tools[0].sha256 == f"{11:064x}"
    assert found.missing == ()
    wheels = sum(p.size or 0 for p in (*found.packages, *found.installer))
    assert found.bytes_known == wheels + 11 + 14


@pytest.mark.parametrize(
    ("asset", "cell_id", "carried"),
    [
        ("llama-box/releases/download/v0.0.154/llama-box-linux-amd64-avx2.zip",
         "v0.6.2-linux-amd64-cpu-py3.11-base-pip", True),
        ("llama-box/releases/download/v0.0.171/dl-llama-box-linux-amd64-cuda-12.8.zip",
         "v0.7.1-linux-amd64-cuda12.8-py3.11-base-pip", True),
        ("llama-box/releases/download/v0.0.171/dl-llama-box-linux-amd64-cuda-12.8.zip",
         "v0.7.1-linux-amd64-cuda12.4-py3.11-base-pip", False),
        ("llama-box/releases/download/v0.0.171/dl-llama-box-linux-amd64-cuda-12.8.zip",
         "v0.7.1-linux-amd64-cpu-py3.11-base-pip", False),
        ("fastfetch/releases/download/2.25.0.1/fastfetch-linux-aarch64.zip",
         "v0.7.1-linux-arm64-cpu-py3.11-base-pip", True),
        ("fastfetch/releases/download/2.25.0.1/fastfetch-linux-aarch64.zip",
         "v0.7.1-linux-amd64-cpu-py3.11-base-pip", False),
        ("gguf-parser-go/releases/download/v0.22.1/gguf-parser-windows-amd64.exe",
         "v0.7.1-windows-amd64-cuda12.4-py3.11-base-pip", True),
        ("gguf-parser-go/releases/download/v0.22.1/gguf-parser-windows-amd64.exe",
         "v0.7.1-linux-amd64-cpu-py3.11-base-pip", False),
        # the CANN version and the chip choose the build
        ("llama-box/releases/download/v0.0.171/dl-llama-box-linux-arm64-cann-8.2.rc1.zip",
         "v0.7.1-linux-arm64-cann8.2.rc1-910b-py3.11-base-pip", True),
        ("llama-box/releases/download/v0.0.171/dl-llama-box-linux-arm64-cann-8.2.rc1-310p.zip",
         "v0.7.1-linux-arm64-cann8.2.rc1-910b-py3.11-base-pip", False),
        ("llama-box/releases/download/v0.0.171/dl-llama-box-linux-arm64-cann-8.2.rc1-310p.zip",
         "v0.7.1-linux-arm64-cann8.2.rc1-310p-py3.11-base-pip", True),
        ("llama-box/releases/download/v0.0.171/dl-llama-box-linux-arm64-cann-8.1.rc1.zip",
         "v0.7.1-linux-arm64-cann8.2.rc1-910b-py3.11-base-pip", False),
        ("llama-box/releases/download/v0.0.171/dl-llama-box-linux-amd64-hip-6.2.zip",
         "v0.7.1-linux-amd64-rocm6.2-py3.11-base-pip", True),
        ("llama-box/releases/download/v0.0.171/dl-llama-box-linux-amd64-hip-6.2.zip",
         "v0.7.1-linux-amd64-cpu-py3.11-base-pip", False),
    ],
)  # fmt: skip
def test_a_tools_asset_is_the_targets_by_its_os_arch_and_toolkit(
    asset: str, cell_id: str, carried: bool
) -> None:
    cell = _ctx().matrix.cell(cell_id)
    assert tools.for_target(f"gpustack/{asset}", cell) is carried


def test_a_pip_cell_without_a_lock_names_the_file_and_the_command(tmp_path: Path) -> None:
    ctx = _ctx(locks_dir=str(tmp_path / "locks"))
    found = commands._recipes().contents(ctx, ctx.matrix.cell(PIP))
    lock = tmp_path / "locks" / PIP / "pylock.toml"
    assert inspection.Missing("lock", str(lock), f"invoke lock --cell {PIP}") in found.missing
    assert found.packages == found.installer == ()


def test_a_stale_lock_is_listed_with_a_warning(tmp_path: Path) -> None:
    ctx = _ctx(locks_dir=str(tmp_path / "locks"))
    committed = ROOT / "bundles" / "locks" / PIP / "pylock.toml"
    copy = tmp_path / "locks" / PIP / "pylock.toml"
    copy.parent.mkdir(parents=True)
    copy.write_text(re.sub(r'inputs-digest = "\w+"', 'inputs-digest = "0"', committed.read_text()))
    found = commands._recipes().contents(ctx, ctx.matrix.cell(PIP))
    assert found.packages
    (warning,) = found.warnings
    assert "is stale" in warning and f"invoke lock --cell {PIP}" in warning


# --- docker cells ---------------------------------------------------------------------------------


def test_a_gpustack2_cells_images_are_the_workers_choice() -> None:
    ctx = _ctx()
    cell = ctx.matrix.cell(DOCKER2)
    found = commands._recipes().contents(ctx, cell)
    chosen = runners.cell_selection(
        ctx.layout.runners, cell.version, cell.arch, cell.device, cell.extra_names
    )
    assert [(Reference.parse(i.reference), i.platform, i.role) for i in found.images] == [
        (Reference.parse(i.reference), i.platform, i.role) for i in chosen.images
    ]
    assert {"server", "runner", "pause"} <= {i.role for i in found.images}
    assert found.packages == found.tools == ()


def test_unpinned_images_are_named_with_their_pin_files(tmp_path: Path) -> None:
    ctx = _ctx(images_pins_dir=str(tmp_path / "images"))
    found = commands._recipes().contents(ctx, ctx.matrix.cell(DOCKER2))
    assert all(not i.pinned and i.size is None for i in found.images)
    assert found.unknown_sizes == len(found.images) and found.bytes_known == 0
    files = sorted(m.file for m in found.missing)
    names = {images.pin_path(ctx.layout.image_pins, "2.3.0", r).as_posix()
             for r in {Reference.parse(i.reference).name for i in found.images}}  # fmt: skip
    assert files == sorted(names)  # one entry per pin file, however many images it pins
    assert {m.command for m in found.missing} == {f"invoke lock --cell {DOCKER2}"}


def test_a_pinned_image_shows_its_digest_and_no_size(tmp_path: Path) -> None:
    ctx = _ctx(images_pins_dir=str(tmp_path / "images"))
    cell = ctx.matrix.cell(DOCKER0)
    ((ref, platforms),) = docker0.references(cell).items()
    path = images.pin_path(ctx.layout.image_pins, cell.version, ref.name)
    path.parent.mkdir(parents=True)
    pin = images.TagPin("sha256:" + "1" * 64, {"linux/arm64": "sha256:" + "2" * 64})
    images.write_pins(images.Pins(path, cell.version, ref.name, {ref.tag or "": pin}))
    (unpinned,) = commands._recipes().contents(ctx, cell).images  # amd64: not in the pins
    assert (unpinned.pinned, unpinned.platform) == (False, "linux/amd64")
    assert unpinned.note.startswith("unpinned: not in ")
    arm = ctx.matrix.cell(DOCKER0.replace("amd64", "arm64"))
    (image,) = commands._recipes().contents(ctx, arm).images
    assert (image.reference, image.role) == (str(ref), "server")
    assert (image.digest, image.index_digest) == ("sha256:" + "2" * 64, "sha256:" + "1" * 64)
    assert image.size is None  # the pins record no sizes, and nothing is fetched


# --- the command ---------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:A test tried to use socket")
@pytest.mark.parametrize("cell_id", [PIP, DOCKER2])
def test_inspect_runs_with_sockets_blocked_in_well_under_five_seconds(cell_id: str) -> None:
    with pytest.raises(Exception, match="socket"):  # pytest-socket's block is on
        socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    started = time.perf_counter()
    out = commands.inspect(_ctx(), cell_id, as_json=True)
    seconds = time.perf_counter() - started
    assert json.loads(out)["cell"] == cell_id
    assert seconds < LIMIT_S, f"inspect of {cell_id} took {seconds:.2f}s"


@pytest.mark.parametrize("cell_id", [PIP, DOCKER0, DOCKER2])
def test_invoke_inspect_json_has_the_documented_keys(cell_id: str) -> None:
    started = time.perf_counter()
    proc = _invoke("inspect", "--cell", cell_id, "--json")
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(proc.stdout)
    assert tuple(data) == JSON_KEYS
    assert set(data["totals"]) == {"items", "bytes_known", "unknown_size"}
    assert data["totals"]["items"] == sum(
        len(data[k]) for k in ("packages", "installer", "tools", "images")
    )
    for key, fields in (
        ("packages", {"name", "version", "file", "sha256", "size", "source", "note"}),
        ("installer", {"name", "version", "file", "sha256", "size", "source", "note"}),
        ("tools", {"program", "path", "sha256", "size", "note"}),
        ("images", {"reference", "platform", "role", "digest", "index_digest", "size", "note",
                    "pinned"}),
        ("missing", {"what", "file", "command"}),
    ):  # fmt: skip
        assert all(set(entry) == fields for entry in data[key]), key
    assert seconds < LIMIT_S, f"invoke inspect --json took {seconds:.2f}s"


def test_invoke_inspect_prints_tables_and_the_totals() -> None:
    proc = _invoke("inspect", "--cell", PIP)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for title in ("packages (", "installer (1)", "tools assets (", "total: "):
        assert title in proc.stdout
    assert "uv-0.13.9-" in proc.stdout


def test_a_cell_without_its_lock_is_reported_not_refused(tmp_path: Path) -> None:
    locks = tmp_path / "locks"
    shutil.copytree(ROOT / "bundles" / "locks" / PIP, locks / "another-cell")
    env = {"GPUSTACK_OFFLINE_LOCKS_DIR": str(locks)}
    proc = _invoke("inspect", "--cell", PIP, "--json", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    missing = json.loads(proc.stdout)["missing"]
    assert {"what": "lock", "file": str(locks / PIP / "pylock.toml"),
            "command": f"invoke lock --cell {PIP}"} in missing  # fmt: skip
    text = _invoke("inspect", "--cell", PIP, env=env)
    assert text.returncode == 0
    flat = re.sub(r"\s*\n\s*", " ", text.stdout)
    lock = locks / PIP / "pylock.toml"
    assert f"missing: lock ({lock}): write it with `invoke lock --cell {PIP}`" in flat


def test_an_unknown_cell_is_one_error_line() -> None:
    proc = _invoke("inspect", "--cell", PIP.replace("base", "bass"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out
    (line,) = re.findall(r"^error: .*$", out, re.M)
    assert "unknown extras 'bass'" in line and "invoke matrix" in line


def test_inspect_without_a_cell_asks_for_one() -> None:
    with pytest.raises(CellError, match="invoke inspect --cell ID"):
        commands.inspect(_ctx(), None, as_json=False)
