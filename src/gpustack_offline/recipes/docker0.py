"""GPUStack 0.x as upstream's image for the cell's device and platform, pinned by digest; verified
by loading it into a Docker Engine where it was absent, starting it with no route out (audited),
pushing it into a site registry and starting it again from there."""

from __future__ import annotations

from pathlib import Path

from gpustack_offline.core.context import Context
from gpustack_offline.core.docker import base_image
from gpustack_offline.core.errors import CellError
from gpustack_offline.core.matrix import Cell
from gpustack_offline.recipes import pip0
from gpustack_offline.recipes.base import (
    Locked,
    Parts,
    gather_images,
    image_contents,
    image_inputs,
    pin_images,
    unpinned_images,
)
from gpustack_offline.recipes.inspection import Contents
from gpustack_offline.stages import images
from gpustack_offline.stages.registry import Reference
from gpustack_offline.verify import egress
from gpustack_offline.verify.common import HOST_ARCH, Report
from gpustack_offline.verify.docker import verify_docker
from gpustack_offline.verify.upgrade import verify_docker_upgrade


def references(cell: Cell) -> dict[Reference, list[str]]:
    """GPUStack's own image for the cell's device (its tag from upstream's docker-ci.yaml, as the
    matrix has it), for the cell's platform."""
    if cell.image is None:
        raise CellError(f"{cell.id}: the matrix names no image of GPUStack {cell.version} for it")
    return {images.image_reference(cell.version, cell.image.tag): [f"linux/{cell.arch}"]}


class Docker0:
    kind = "docker 0.x"

    def lock(self, ctx: Context, cell: Cell) -> Locked:
        return pin_images(ctx, cell, references(cell))

    def inputs(self, ctx: Context, cell: Cell) -> list[Path]:
        return image_inputs(ctx, cell)

    def unpinned(self, ctx: Context, cell: Cell) -> list[str]:
        return unpinned_images(ctx, cell, references(cell))

    def contents(self, ctx: Context, cell: Cell) -> Contents:
        wanted = references(cell)
        return image_contents(ctx, cell, self.kind, wanted, dict.fromkeys(wanted, "server"))

    def gather(self, ctx: Context, cell: Cell) -> Parts:
        return gather_images(ctx, cell, references(cell))

    def verify(self, ctx: Context, cell: Cell, report: Report) -> Report:
        sinkhole = base_image(HOST_ARCH, ctx.cache, ctx.opts.debian_mirror)
        allowlist = egress.load_allowlist(ctx.layout.egress_allowlist, cell.id)
        return verify_docker(
            cell, ctx.layout.bundle(cell.id), ctx.layout.cache, ctx.opts.verify_timeout, report,
            sinkhole, allowlist,
        )  # fmt: skip

    def verify_upgrade(
        self, ctx: Context, cell: Cell, old_dir: Path, delta_dir: Path, report: Report
    ) -> Report:
        """The old image on a data volume, upgraded with the delta of `cell` and rolled back,
        offline (`verify.upgrade.verify_docker_upgrade`)."""
        sinkhole = base_image(HOST_ARCH, ctx.cache, ctx.opts.debian_mirror)
        allowlist = egress.load_allowlist(ctx.layout.egress_allowlist, cell.id)
        return verify_docker_upgrade(
            cell, old_dir, delta_dir, ctx.opts.verify_timeout, report, sinkhole, allowlist
        )

    def verified(self, cell: Cell, report: Report) -> str:
        return pip0.RECIPE.verified(cell, report)  # the same audited starts, the same numbers


RECIPE = Docker0()
