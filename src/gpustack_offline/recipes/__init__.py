"""One recipe per kind of cell, chosen once from the cell: how it is locked, gathered into the
cache, and verified. The stages below know nothing of kinds; `base.build` stages any kind's parts
into a bundle the same way. A new kind is a module here plus its matrix data (docs/design.md)."""

from __future__ import annotations

import json
from pathlib import Path

from gpustack_offline.bundle.assemble import Result
from gpustack_offline.bundle.delta import BASE_FILE
from gpustack_offline.core.context import Context
from gpustack_offline.core.errors import CellError, VerifyError
from gpustack_offline.core.matrix import Cell
from gpustack_offline.recipes import base, docker0, docker2, pip0
from gpustack_offline.recipes.base import Locked, Recipe
from gpustack_offline.recipes.inspection import Contents
from gpustack_offline.verify import common as verifying
from gpustack_offline.verify.common import Report, Unverifiable

# (install method, GPUStack major series) -> recipe
RECIPES: dict[tuple[str, int], Recipe] = {
    ("pip", 0): pip0.RECIPE,
    ("docker", 0): docker0.RECIPE,
    ("docker", 2): docker2.RECIPE,
}


def for_cell(cell: Cell) -> Recipe:
    try:
        return RECIPES[(cell.method, cell.series)]
    except KeyError:
        raise CellError(
            f"{cell.id}: no recipe builds {cell.method} cells of GPUStack {cell.series}.x; "
            "add one under src/gpustack_offline/recipes/ (see docs/design.md)"
        ) from None


def lock(ctx: Context, cell: Cell, tools: bool = False) -> Locked:
    """Lock or pin the cell as its kind does; with `tools`, a pip cell's tools sums too."""
    recipe = for_cell(cell)
    locked = recipe.lock(ctx, cell)
    if tools and isinstance(recipe, pip0.Pip0):
        sums = recipe.lock_tools(ctx, cell)
        locked = Locked(locked.path, [*locked.moved, *sums.moved])
    return locked


def unpinned(ctx: Context, cell: Cell) -> list[str]:
    """What a frozen build of the cell would refuse for want of a pin (empty: nothing)."""
    return for_cell(cell).unpinned(ctx, cell)


def contents(ctx: Context, cell: Cell) -> Contents:
    """What the cell will carry, from the committed data alone (no network)."""
    return for_cell(cell).contents(ctx, cell)


def build(ctx: Context, cell: Cell) -> Result:
    """The cell's bundle, made by its kind's recipe."""
    return base.build(ctx, cell, for_cell(cell))


def verify(ctx: Context, cell: Cell) -> Report:
    """The cell's bundle verified by its kind's recipe."""
    return base.verify(ctx, cell, for_cell(cell))


def verify_upgrade(ctx: Context, delta_dir: Path) -> Report:
    """The upgrade from the bundle a delta was made against (in the same dist folder) with that
    delta, verified offline and rolled back; the report is written beside the delta."""
    try:
        record = json.loads((delta_dir / BASE_FILE).read_text())
        cell = ctx.matrix.cell(record["cell"])
        (old_id,) = record["base"]["cells"][:1]
    except (OSError, ValueError, KeyError) as exc:
        raise VerifyError(
            f"{delta_dir} is not a delta bundle with a base cell ({exc}); make one with "
            "`invoke bundle --cell NEW --since dist/OLD`"
        ) from exc
    old_dir = ctx.layout.bundle(old_id)
    recipe = for_cell(cell)
    report_path = ctx.layout.dist / f"{delta_dir.name}.upgrade.verify.json"

    def body(report: Report) -> Report:
        if not isinstance(recipe, (pip0.Pip0, docker0.Docker0)):
            raise Unverifiable(
                f"{cell.id}: upgrade verification covers pip cells and 0.x docker cells so far"
            )
        if not (old_dir / "manifest.json").is_file():
            raise VerifyError(f"{old_dir}: the base bundle {old_id} is not under dist; build it")
        return recipe.verify_upgrade(ctx, cell, old_dir, delta_dir, report)

    return verifying.verify(cell, delta_dir, report_path, body)
