"""GPUStack 2.x: the server image, the runner images of the cell's services for its backend, and
the pause and health images every workload gets, as upstream's runner list for that version
names them; verified by pushing them into a site registry where every reference the server and
worker will compute must resolve for the platform, and starting the server from there."""

from __future__ import annotations

from pathlib import Path

from gpustack_offline.core.context import Context
from gpustack_offline.core.docker import base_image
from gpustack_offline.core.errors import BundleError
from gpustack_offline.core.matrix import Cell
from gpustack_offline.recipes.base import (
    Locked,
    Parts,
    existing,
    gather_images,
    image_contents,
    image_inputs,
    pin_images,
    unpinned_images,
)
from gpustack_offline.recipes.inspection import Contents, Missing, lock_command, shown
from gpustack_offline.stages import runners
from gpustack_offline.stages.registry import Reference
from gpustack_offline.verify import egress
from gpustack_offline.verify.common import HOST_ARCH, Report
from gpustack_offline.verify.docker import verify_docker2


def references(ctx: Context, cell: Cell) -> dict[Reference, list[str]]:
    selection = runners.cell_selection(
        ctx.layout.runners, cell.version, cell.arch, cell.device, cell.extra_names
    )
    return {Reference.parse(i.reference): [i.platform] for i in selection.images}


class Docker2:
    kind = "docker 2.x"

    def lock(self, ctx: Context, cell: Cell) -> Locked:
        # upstream's runner list first (from the gpustack-runner package the version pins): it
        # decides which images the cell needs
        runners.refresh(cell.version, ctx.layout.runners, ctx.cache, ctx.opts.index_url, ctx.retry)
        return pin_images(ctx, cell, references(ctx, cell))

    def inputs(self, ctx: Context, cell: Cell) -> list[Path]:
        """The image pins, and upstream's runner list, which chose the images."""
        data = runners.data_path(ctx.layout.runners, cell.version)
        return [*image_inputs(ctx, cell), *existing([data])]

    def unpinned(self, ctx: Context, cell: Cell) -> list[str]:
        try:  # upstream's runner list, written by `invoke lock`, names the images
            wanted = references(ctx, cell)
        except BundleError as exc:
            return [str(exc)]
        return unpinned_images(ctx, cell, wanted)

    def contents(self, ctx: Context, cell: Cell) -> Contents:
        """`references` chooses the images; upstream's runner list names each one's role."""
        data = runners.data_path(ctx.layout.runners, cell.version)
        if not data.is_file():
            missing = Missing("runner list", shown(data, ctx.root), lock_command(cell))
            return Contents(cell.id, self.kind, missing=(missing,))
        wanted = references(ctx, cell)
        listed = runners.load(ctx.layout.runners, cell.version)
        roles = {
            **{Reference.parse(r.docker_image): "runner" for r in listed.runners},
            **{Reference.parse(i.image): i.role for i in listed.images},
            Reference.parse(listed.server): "server",
        }
        return image_contents(ctx, cell, self.kind, wanted, roles)

    def gather(self, ctx: Context, cell: Cell) -> Parts:
        return gather_images(ctx, cell, references(ctx, cell))

    def verify(self, ctx: Context, cell: Cell, report: Report) -> Report:
        sinkhole = base_image(HOST_ARCH, ctx.cache, ctx.opts.debian_mirror)
        allowlist = egress.load_allowlist(ctx.layout.egress_allowlist, cell.id)
        return verify_docker2(
            cell, ctx.layout.bundle(cell.id), ctx.opts.verify_timeout, report,
            ctx.layout.runners, sinkhole, allowlist,
        )  # fmt: skip

    def verified(self, cell: Cell, report: Report) -> str:
        hosts = (report.egress or {}).get("hosts_attempted", 0)
        return (
            f"[green]{cell.id}: verified[/green] — loaded, pushed into a site registry where "
            "every image the worker will ask for resolves for its platform; the server from "
            f"that registry, started as install.sh configures it, answered /healthz after "
            f"{report.seconds_to_healthz}s and tried {hosts} outside host(s)"
        )


RECIPE = Docker2()
