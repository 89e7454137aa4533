"""GPUStack 0.x installed with pip: a wheelhouse resolved for the target from the cell's lock,
the tools archive upstream's `download-tools` makes for the target, and install scripts; verified
by installing and starting it in a clean container of the target with no route out."""

from __future__ import annotations

from pathlib import Path

from packaging.utils import canonicalize_name

from gpustack_offline.core.context import Context
from gpustack_offline.core.errors import BundleError
from gpustack_offline.core.matrix import Cell
from gpustack_offline.recipes.base import Locked, Parts, existing
from gpustack_offline.recipes.inspection import (
    Contents,
    Missing,
    Package,
    ToolAsset,
    lock_command,
    shown,
)
from gpustack_offline.stages import targets, tools
from gpustack_offline.stages.locks import (
    LockedPackage,
    ensure_lock,
    inputs_for,
    load_overrides,
    make_lock,
    package_changes,
    read_lock,
)
from gpustack_offline.stages.locks import lock_path as pip_lock_path
from gpustack_offline.stages.wheels import choose, wheelhouse
from gpustack_offline.verify import egress
from gpustack_offline.verify.common import Report
from gpustack_offline.verify.pip import verify_pip
from gpustack_offline.verify.upgrade import verify_upgrade


class Pip0:
    kind = "pip 0.x"

    def lock(self, ctx: Context, cell: Cell) -> Locked:
        overrides = load_overrides(ctx.layout.overrides)
        inputs = inputs_for(cell, overrides, ctx.opts.index_url)
        path = pip_lock_path(ctx.layout.locks, cell)
        old = read_lock(path) if path.is_file() else None
        made = make_lock(cell, inputs, ctx.layout.locks, ctx.layout.cache)
        return Locked(made, package_changes(old, read_lock(made)))

    def lock_tools(self, ctx: Context, cell: Cell) -> Locked:
        """Record the sums of every asset upstream's download-tools fetches for the cell's
        target in its version's tools lock (online: it makes the cell's tools archive, as a
        build does); what was recorded anew is what moved."""
        layout, opts = ctx.layout, ctx.opts
        path = tools.lock_path(layout.tools_locks, cell.version)
        before = tools.ToolsLock(path, frozen=False).entries
        tools.build(
            cell, layout.cache, layout.tools_locks, load_overrides(layout.overrides),
            opts.index_url, opts.tools_base_url, False, ctx.retry,
        )  # fmt: skip
        after = tools.ToolsLock(path, frozen=False).entries
        return Locked(path, [f"tools {c}" for c in tools.sum_changes(before, after)])

    def unpinned(self, ctx: Context, cell: Cell) -> list[str]:
        """No lock, a stale lock (as a frozen build finds them), or no tools sums at all for
        the version. Which assets download-tools asks for is known only by running it, so a
        version's sums file that lacks one of this target's assets passes here and the frozen
        build names the asset."""
        layout = ctx.layout
        problems = []
        inputs = inputs_for(cell, load_overrides(layout.overrides), ctx.opts.index_url)
        try:
            ensure_lock(cell, inputs, layout.locks, layout.cache, frozen=True)
        except BundleError as exc:
            problems.append(str(exc))
        sums = tools.lock_path(layout.tools_locks, cell.version)
        try:
            recorded = tools.ToolsLock(sums, frozen=True).entries
        except BundleError as exc:
            problems.append(str(exc))
        else:
            if not recorded:
                problems.append(
                    f"no tools sums for GPUStack {cell.version} at {sums}; record them with "
                    f"`invoke lock --tools --cell {cell.id}` and commit the file"
                )
        return problems

    def contents(self, ctx: Context, cell: Cell) -> Contents:
        """The lock's packages for the target (each with the wheel its pip would choose), the
        installer's wheel, and the tools assets the version's sums record for the target."""
        layout = ctx.layout
        missing: list[Missing] = []
        warnings: list[str] = []
        packages: list[Package] = []
        installer: list[Package] = []
        path = pip_lock_path(layout.locks, cell)
        if not path.is_file():
            missing.append(Missing("lock", shown(path, ctx.root), lock_command(cell)))
        else:
            lock = read_lock(path)
            inputs = inputs_for(cell, load_overrides(layout.overrides), ctx.opts.index_url)
            if lock.inputs_digest != inputs.digest():
                warnings.append(
                    f"lock {shown(path, ctx.root)} is stale: its inputs (requirement, overrides, "
                    f"platform) changed; run `{lock_command(cell)}` and commit it"
                )
            installs = lock.installer_names()
            for package in lock.packages:
                if targets.marker_applies(cell, package.marker):
                    chosen = installer if canonicalize_name(package.name) in installs else packages
                    chosen.append(_package(cell, package))
        assets = _tool_assets(ctx, cell, missing, warnings)
        return Contents(
            cell.id, self.kind, tuple(packages), tuple(installer), assets,
            missing=tuple(missing), warnings=tuple(warnings),
        )  # fmt: skip

    def inputs(self, ctx: Context, cell: Cell) -> list[Path]:
        """The matrix, the cell's lock, the overrides and the tools lock of its version."""
        layout = ctx.layout
        return existing([
            layout.matrix,
            pip_lock_path(layout.locks, cell),
            layout.overrides,
            tools.lock_path(layout.tools_locks, cell.version),
        ])  # fmt: skip

    def gather(self, ctx: Context, cell: Cell) -> Parts:
        layout, opts = ctx.layout, ctx.opts
        overrides = load_overrides(layout.overrides)
        inputs = inputs_for(cell, overrides, opts.index_url)
        lock, state = ensure_lock(cell, inputs, layout.locks, layout.cache, frozen=opts.frozen)
        wheels = wheelhouse(
            cell, lock, layout.cache, inputs.build_constraints, opts.index_url, opts.jobs,
            opts.progress, ctx.retry,
        )  # fmt: skip
        archive = tools.build(
            cell, layout.cache, layout.tools_locks, overrides, opts.index_url,
            opts.tools_base_url, opts.frozen, ctx.retry,
        )  # fmt: skip
        # the installer byte-compiles what the start loads; only the uv path uses the list
        modules = (
            tools.start_modules(cell, overrides, layout.cache, opts.index_url)
            if cell.installer
            else []
        )
        return Parts(state, lock, wheels, archive, start_modules=modules)

    def verify(self, ctx: Context, cell: Cell, report: Report) -> Report:
        allowlist = egress.load_allowlist(ctx.layout.egress_allowlist, cell.id)
        return verify_pip(
            cell, ctx.layout.bundle(cell.id), ctx.layout.cache, ctx.opts.verify_timeout,
            ctx.opts.debian_mirror, report, allowlist,
        )  # fmt: skip

    def verify_upgrade(
        self, ctx: Context, cell: Cell, old_dir: Path, delta_dir: Path, report: Report
    ) -> Report:
        """An install of `old_dir`, upgraded with the delta `delta_dir` of `cell` and rolled
        back, offline (`verify.upgrade`)."""
        allowlist = egress.load_allowlist(ctx.layout.egress_allowlist, cell.id)
        return verify_upgrade(
            cell, old_dir, delta_dir, ctx.layout.cache, ctx.opts.verify_timeout,
            ctx.opts.debian_mirror, report, allowlist,
        )  # fmt: skip

    def verified(self, cell: Cell, report: Report) -> str:
        upstream = report.upstream or {}
        return (
            f"[green]{cell.id}: verified[/green] — installed offline; the configured start "
            f"answered /healthz after {report.seconds_to_healthz}s, its worker after "
            f"{report.seconds_to_worker}s, reaching for "
            f"{(report.egress or {}).get('hosts_attempted')} outside hosts (upstream's plain "
            f"start: {upstream.get('seconds_to_healthz')}s, {upstream.get('seconds_to_worker')}s,"
            f" {upstream.get('hosts_attempted')} hosts)"
        )


def _package(cell: Cell, package: LockedPackage) -> Package:
    """The file of a locked package the target gets, as `wheels.plan` picks it."""
    wheel = choose(cell, package)
    if wheel is not None:
        return Package(
            package.name, package.version, wheel.filename, wheel.sha256, wheel.size, "wheel"
        )
    if package.sdist is not None:
        sdist = package.sdist
        return Package(
            package.name, package.version, sdist.filename, sdist.sha256, None, "sdist",
            "no wheel for the target: built from this sdist at bundle time, its size known then",
        )  # fmt: skip
    return Package(
        package.name, package.version, None, None, None, "none",
        "no wheel for the target and no sdist: a build refuses it; pin a version that has one "
        "in bundles/overrides.toml",
    )  # fmt: skip


def _tool_assets(
    ctx: Context, cell: Cell, missing: list[Missing], warnings: list[str]
) -> tuple[ToolAsset, ...]:
    """Per program, the assets the version's tools lock records for the cell's target; a program
    with none is `not pinned`, with the command that records it."""
    path = tools.lock_path(ctx.layout.tools_locks, cell.version)
    command = lock_command(cell, tools=True)
    entries: dict[str, tuple[str, int]] = {}
    if not path.is_file():
        missing.append(Missing("tools sums", shown(path, ctx.root), command))
    else:
        try:
            entries = tools.ToolsLock(path, frozen=True).entries
        except (BundleError, KeyError, TypeError, ValueError) as exc:
            warnings.append(f"{shown(path, ctx.root)} cannot be read ({exc}); fix or rewrite it")
    found: list[ToolAsset] = []
    for program in tools.PROGRAMS:
        recorded = sorted(
            p for p in entries if tools.asset_program(p) == program and tools.for_target(p, cell)
        )
        found += [ToolAsset(program, p, entries[p][0], entries[p][1]) for p in recorded]
        if not recorded:
            found.append(ToolAsset(program, None, None, None, f"not pinned: run `{command}`"))
    return tuple(found)


RECIPE = Pip0()
