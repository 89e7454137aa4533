"""`invoke lock.check`, the release's early refusal: a cell whose committed lock, tools sums and
image pins are current passes; a cell missing any of them, or with a stale lock, is named with
the workflow that writes them. No network: the pins are written here as `invoke lock` writes them.
Also what `invoke lock` reports as moved (package versions, tool sums)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpustack_offline.cli import commands
from gpustack_offline.core.context import Context
from gpustack_offline.core.errors import BundleError
from gpustack_offline.core.matrix import Cell
from gpustack_offline.recipes import docker0, docker2, unpinned
from gpustack_offline.stages import images, tools
from gpustack_offline.stages.locks import (
    Lock,
    LockedPackage,
    inputs_for,
    load_overrides,
    lock_path,
    package_changes,
)

ROOT = Path(__file__).resolve().parents[1]
PIP = "v0.7.1-linux-amd64-cpu-py3.11-base-pip"
DOCKER0 = "v0.7.1-linux-amd64-cpu-py3.11-base-docker"
DOCKER2 = "v2.3.0-linux-amd64-cuda12.8-py3.11-vllm-docker"
WORKFLOW = ".github/workflows/refresh-pins.yml"


@pytest.fixture
def ctx(tmp_path: Path) -> Context:
    """The project's matrix, overrides and runner lists, with empty pin folders of its own."""
    cli = {
        "locks_dir": str(tmp_path / "locks"),
        "tools_locks_dir": str(tmp_path / "tools"),
        "images_pins_dir": str(tmp_path / "images"),
        "cache_dir": str(tmp_path / "cache"),
    }
    return Context.load(ROOT, cli=cli, env={})


def _write_lock(ctx: Context, cell: Cell, digest: str | None = None) -> Path:
    """A lock as `invoke lock` writes it, for the cell's current inputs unless `digest`."""
    inputs = inputs_for(cell, load_overrides(ctx.layout.overrides), ctx.opts.index_url)
    path = lock_path(ctx.layout.locks, cell)
    path.parent.mkdir(parents=True)
    path.write_text(
        'lock-version = "1.0"\n\n[tool.gpustack-offline]\n'
        f'cell = "{cell.id}"\ninputs-digest = "{digest or inputs.digest()}"\n'
    )
    return path


def _write_sums(ctx: Context, version: str) -> Path:
    sums = tools.ToolsLock(tools.lock_path(ctx.layout.tools_locks, version), frozen=False)
    asset = f"gpustack/llama-box/releases/download/v0.0.1/llama-box-linux-amd64-{version}.zip"
    sums.record(tools.Asset(asset, "a" * 64, 10))
    sums.save(version)
    return sums.path


def _pin(ctx: Context, cell: Cell) -> None:
    """Pin each of the cell's images for its platforms, as `invoke lock` does."""
    for ref, platforms in docker0.references(cell).items():
        path = images.pin_path(ctx.layout.image_pins, cell.version, ref.name)
        pin = images.TagPin("sha256:" + "1" * 64, {p: "sha256:" + "2" * 64 for p in platforms})
        path.parent.mkdir(parents=True, exist_ok=True)
        images.write_pins(images.Pins(path, cell.version, ref.name, {ref.tag or "": pin}))


def test_a_pip_cell_with_a_current_lock_and_tools_sums_passes(ctx: Context) -> None:
    cell = ctx.matrix.cell(PIP)
    _write_lock(ctx, cell)
    _write_sums(ctx, cell.version)
    assert unpinned(ctx, cell) == []
    commands.check_pins(ctx, [cell])  # no error


def test_a_pip_cell_without_a_lock_is_named_with_the_refresh_workflow(ctx: Context) -> None:
    cell = ctx.matrix.cell(PIP)
    _write_sums(ctx, cell.version)
    (problem,) = unpinned(ctx, cell)
    assert f"no lock for {PIP}" in problem
    with pytest.raises(BundleError) as caught:
        commands.check_pins(ctx, [cell])
    message = str(caught.value)
    assert "\n" not in message  # one error line
    assert PIP in message and WORKFLOW in message
    assert message.startswith("1 of 1 cells")


def test_a_stale_lock_is_named(ctx: Context) -> None:
    cell = ctx.matrix.cell(PIP)
    _write_lock(ctx, cell, digest="0" * 64)  # the inputs changed since it was resolved
    _write_sums(ctx, cell.version)
    (problem,) = unpinned(ctx, cell)
    assert "is stale" in problem and PIP in problem


def test_a_pip_cell_without_tools_sums_is_named(ctx: Context) -> None:
    cell = ctx.matrix.cell(PIP)
    _write_lock(ctx, cell)
    (problem,) = unpinned(ctx, cell)
    assert f"no tools sums for GPUStack {cell.version}" in problem
    assert "invoke lock --tools" in problem


def test_only_the_unpinned_cells_are_named(ctx: Context) -> None:
    pinned, bare = ctx.matrix.cell(PIP), ctx.matrix.cell(PIP.replace("base", "audio"))
    _write_lock(ctx, pinned)
    _write_sums(ctx, pinned.version)
    with pytest.raises(BundleError) as caught:
        commands.check_pins(ctx, [pinned, bare])
    message = str(caught.value)
    assert message.startswith(f"1 of 2 cells have no committed, current pins for a frozen build: "
                              f"{bare.id}. Fix: run the {WORKFLOW} workflow")  # fmt: skip
    assert pinned.id not in message


def test_a_docker_cell_is_named_until_its_images_are_pinned(ctx: Context) -> None:
    cell = ctx.matrix.cell(DOCKER0)
    (problem,) = unpinned(ctx, cell)
    assert "gpustack-0.7.1.toml does not exist" in problem
    _pin(ctx, cell)
    assert unpinned(ctx, cell) == []


def test_a_docker_cell_whose_platform_is_not_pinned_is_named(ctx: Context) -> None:
    cell = ctx.matrix.cell(DOCKER0)
    _pin(ctx, ctx.matrix.cell(DOCKER0.replace("amd64", "arm64")))  # the same tag, arm64 only
    (problem,) = unpinned(ctx, cell)
    assert "for linux/amd64 is not pinned" in problem


def test_a_gpustack2_cell_names_each_missing_pin_file_once(ctx: Context) -> None:
    cell = ctx.matrix.cell(DOCKER2)
    problems = unpinned(ctx, cell)
    wanted = {images.pin_path(ctx.layout.image_pins, cell.version, ref.name)
              for ref in docker2.references(ctx, cell)}  # fmt: skip
    assert len(problems) == len(wanted) > 1
    assert all(any(str(path) in p for p in problems) for path in wanted)


# ---- what `invoke lock` reports as moved ----------------------------------------------------


def _lock(*packages: tuple[str, str]) -> Lock:
    return Lock(Path("pylock.toml"), PIP, "d", tuple(LockedPackage(n, v, None, (), None)
                                                     for n, v in packages))  # fmt: skip


def test_package_changes_name_each_moved_added_and_dropped_package() -> None:
    old = _lock(("gpustack", "0.7.0"), ("Requests", "2.31.0"), ("same", "1"), ("gone", "1"))
    new = _lock(("gpustack", "0.7.1"), ("requests", "2.32.3"), ("same", "1"), ("torch", "2.6"),
                ("torch", "2.7"))  # fmt: skip
    assert package_changes(old, new) == [
        "gone: 1 -> (none)",
        "gpustack: 0.7.0 -> 0.7.1",
        "requests: 2.31.0 -> 2.32.3",
        "torch: (none) -> 2.6, 2.7",
    ]
    assert package_changes(None, _lock(("a", "1"))) == ["a: (none) -> 1"]
    assert package_changes(new, new) == []


def test_sum_changes_name_each_asset_recorded_anew() -> None:
    before = {"a": ("1" * 64, 1)}
    after = {"a": ("1" * 64, 1), "b": ("2" * 64, 2)}
    assert tools.sum_changes(before, after) == [f"b: (none) -> sha256:{'2' * 64}"]
    assert tools.sum_changes(after, after) == []
