"""GPUStack 0.x installed with pip: a wheelhouse resolved for the target from the cell's lock,
the tools archive upstream's `download-tools` makes for the target, and install scripts; verified
by installing and starting it in a clean container of the target with no route out."""

from __future__ import annotations

from pathlib import Path

from gpustack_offline.core.context import Context
from gpustack_offline.core.errors import BundleError
from gpustack_offline.core.matrix import Cell
from gpustack_offline.recipes.base import Locked, Parts, existing
from gpustack_offline.stages import tools
from gpustack_offline.stages.locks import (
    ensure_lock,
    inputs_for,
    load_overrides,
    make_lock,
    package_changes,
    read_lock,
)
from gpustack_offline.stages.locks import lock_path as pip_lock_path
from gpustack_offline.stages.wheels import wheelhouse
from gpustack_offline.verify import egress
from gpustack_offline.verify.common import Report
from gpustack_offline.verify.pip import verify_pip


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


RECIPE = Pip0()
