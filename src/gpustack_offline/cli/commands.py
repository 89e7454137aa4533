"""What the invoke tasks and nox sessions do, as plain functions over options and a selection.

`tasks.py` and `noxfile.py` only parse flags and call these; errors are `BundleError`s whose
messages the wiring prints without a traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from gpustack_offline.bundle import signing, volumes
from gpustack_offline.core import docker
from gpustack_offline.core.context import Context
from gpustack_offline.core.errors import BundleError, debugging, describe
from gpustack_offline.core.matrix import AXES, Cell
from gpustack_offline.core.models import Model, is_model_bundle
from gpustack_offline.core.options import resolve
from gpustack_offline.verify.common import Report, Unverifiable

if TYPE_CHECKING:
    from gpustack_offline.bundle.assemble import Result


def _recipes() -> ModuleType:
    """The recipes, imported when a cell is locked, built or verified: with them comes the SBOM
    library, a quarter of a second that listing cells or refusing a bad flag need not pay."""
    from gpustack_offline import recipes

    return recipes


def _models() -> ModuleType:
    """The model bundles' steps, imported when a model is locked or built (as `_recipes`)."""
    from gpustack_offline.recipes import models

    return models


# Context: where the wiring takes it
__all__ = ["Context", "build", "check_pins", "lock", "verify_cell"]

console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
log = logging.getLogger("gpustack_offline")
# The workflow that runs `invoke lock --tools` online and proposes the result as a pull request;
# what a release refused for want of a pin names it.
REFRESH_WORKFLOW = ".github/workflows/refresh-pins.yml"


def matrix_table(ctx: Context, cells: Sequence[Cell], as_json: bool) -> str:
    if as_json:
        return json.dumps(ctx.matrix.ci_matrix(cells))
    table = Table(title=f"{len(cells)} cells", show_lines=False)
    for column in ("id", *AXES, "driver floor"):
        table.add_column(column)
    for c in cells:
        floor = f"CUDA {c.cuda}" if c.cuda else f"ROCm {c.rocm}" if c.rocm else "-"
        table.add_row(c.id, *(getattr(c, a) for a in AXES), floor)
    out = Console(width=200, record=True)
    with out.capture() as captured:
        out.print(table)
    return captured.get()


def lock(
    ctx: Context, cells: Sequence[Cell], tools: bool = False, models: Sequence[Model] = ()
) -> list[Path]:
    """Resolve pip cells into their locks (with `tools`, also record the sums of the assets
    upstream's download-tools fetches for them); pin docker cells' image tags to today's digests
    (for GPUStack 2.x after reading upstream's runner list again); pin models' revisions to
    commits and their files to sha256. Prints what moved, one unwrapped `  moved: ` line each,
    which the refresh workflow collects for its pull request."""
    jobs: list[tuple[str, Callable[[], Any]]] = [
        (c.id, functools.partial(_recipes().lock, ctx, c, tools)) for c in cells
    ]
    jobs += [(m.bundle_id, functools.partial(_models().lock, ctx, m)) for m in models]
    paths = []
    for name, locking in jobs:
        console.print(f"locking {name}", markup=False, soft_wrap=True)
        locked = locking()
        for change in locked.moved:
            console.print(f"  moved: {change}", markup=False, soft_wrap=True)
        paths.append(locked.path)
    return paths


def check_pins(ctx: Context, cells: Sequence[Cell], models: Sequence[Model] = ()) -> None:
    """Refuse, before anything is built, cells (and models) that a frozen build would refuse
    for want of a committed, current lock, tools sums or image pins: each one's reasons, then
    one error naming them and the workflow that writes the pins."""
    missing = {}
    checks: list[tuple[str, Callable[[], list[str]]]] = [
        (c.id, functools.partial(_recipes().unpinned, ctx, c)) for c in cells
    ]
    checks += [(m.bundle_id, functools.partial(_models().unpinned, ctx, m)) for m in models]
    for name, unpinned in checks:
        problems = unpinned()
        if problems:
            missing[name] = problems
            for problem in problems:
                console.print(f"{name}: {problem}", style="red", markup=False, soft_wrap=True)
    kind = "cells" if not models else "bundles"
    if missing:
        unpinned_models = [m.name for m in models if m.bundle_id in missing]
        fix = (
            f"run the {REFRESH_WORKFLOW} workflow (Actions → refresh-pins → Run workflow; it runs "
            "`invoke lock --tools` online), merge its pull request, then release again"
        )
        if unpinned_models:  # the workflow locks cells only
            fix = (
                f"{fix if len(unpinned_models) < len(missing) else ''}"
                f"{'; for the models, ' if len(unpinned_models) < len(missing) else ''}run "
                f"`invoke lock --model {' --model '.join(unpinned_models)}` online, review and "
                "commit bundles/locks/models/"
            )
        raise BundleError(
            f"{len(missing)} of {len(checks)} {kind} have no committed, current pins for a frozen "
            f"build: {', '.join(missing)}. Fix: {fix}"
        )
    if not cells:
        console.print(f"{len(checks)} model(s): locks committed and current")
    else:
        console.print(
            f"{len(checks)} {kind}: lock, tools sums and image pins committed and current"
        )


def build(ctx: Context, cells: Sequence[Cell], models: Sequence[Model] = ()) -> list[Result]:
    """Build every selected cell and model; report each failure and go on, then fail if any
    failed.

    With the `split` option, each bundle is also cut into volumes for transfer media; with
    `write=volumes`, only into volumes, streamed from the folder (no whole tar)."""
    out = volumes.outputs(ctx.opts.write, ctx.opts.split)  # a bad size or choice fails first
    size = out.volume_size
    results: list[Result] = []
    failures: list[tuple[str, BundleError]] = []
    jobs: list[tuple[str, Callable[[], Result]]] = [
        (c.id, functools.partial(_recipes().build, ctx, c)) for c in cells
    ]
    jobs += [(m.bundle_id, functools.partial(_models().build, ctx, m)) for m in models]
    for name, building in jobs:
        console.print(f"building {name}", style="bold", markup=False)
        try:
            result = building()
            if size:
                written = (
                    volumes.split(result.tar, size)
                    if out.tar
                    else volumes.split_folder(result.directory, result.tar, size)
                )
                console.print(f"  {len(written) - 2} volumes, joined by {_shown(written[-1])}")
            results.append(result)
        except BundleError as exc:
            # markup off: messages quote things like [tool.gpustack-offline]
            console.print(f"{name}: {exc}", style="red", markup=False, soft_wrap=True)
            failures.append((name, exc))
    if results:
        console.print(summary(results))
    if len(failures) == 1 and len(jobs) == 1:
        raise failures[0][1]  # the one error line carries its own reason
    if failures:
        failed = ", ".join(name for name, _ in failures)
        kind = "cells" if not models else "bundles"
        raise BundleError(f"{len(failures)} of {len(jobs)} {kind} failed: {failed}")
    return results


def summary(results: Sequence[Result]) -> Table:
    table = Table(title="bundles")
    numeric = ("files", "MB", "seconds")
    for column in ("bundle", *numeric, "lock", "stages", "path"):
        table.add_column(column, justify="right" if column in numeric else "left")
    for r in results:
        table.add_row(
            r.id,
            str(r.files),
            f"{r.bytes / 1e6:.1f}",
            f"{r.seconds:.1f}",
            r.lock_state,
            r.stages,
            _shown(r.tar if r.tar.exists() else r.directory),
        )
    return table


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def built_cell_ids(root: Path) -> list[str]:
    """Ids of the finished cell bundles in the dist-dir option's folder, for nox to list (model
    bundles are not verified in a container yet); none when the options cannot be read (the
    session then says why)."""
    try:
        dist = resolve(root).path("dist_dir", root)
    except BundleError:
        return []
    found = sorted(p.parent.name for p in dist.glob("*/manifest.json")) if dist.is_dir() else []
    return [name for name in found if not is_model_bundle(name)]


@dataclass(frozen=True)
class Outcome:
    failed: bool = False
    skipped: bool = False
    message: str = ""


def verify_session(root: Path, cell_id: str | None) -> Outcome:
    """`nox -s verify(<cell>)`: verify one bundle; any failure is one message for the session
    (the traceback only with GPUSTACK_OFFLINE_DEBUG=1)."""
    try:
        ctx = Context.load(root)
        if cell_id is None:
            return Outcome(
                failed=True,
                message=f"no bundles under {ctx.dist} (the dist-dir option); build some first, "
                "e.g. `invoke bundle --arch arm64`",
            )
        verify_cell(ctx, ctx.matrix.cell(cell_id))
    except Unverifiable as exc:
        return Outcome(skipped=True, message=f"NOT VERIFIED: {exc}")
    except (Exception, KeyboardInterrupt) as exc:
        if debugging():
            raise
        return Outcome(failed=True, message=describe(exc))
    return Outcome()


def verify_cell(ctx: Context, cell: Cell) -> Report:
    if ctx.layout.verify_key:  # first, as `install.sh --verify-key` does on the site
        signer = signing.verify(ctx.layout.bundle(cell.id), ctx.layout.verify_key)
        console.print(f"{cell.id}: signature good, SHA256SUMS signed by key {signer}")
    recipe = _recipes().for_cell(cell)
    report = _recipes().verify(ctx, cell)
    console.print(recipe.verified(cell, report))
    return report


def base_images(ctx: Context, arches: Sequence[str]) -> list[str]:
    return [docker.base_image(a, ctx.cache, ctx.opts.debian_mirror) for a in arches]
