"""What every kind of cell shares: a recipe gathers the cell's parts into the cache (lock, wheels,
tools archive, images), and `build` stages them into one bundle folder and tar the same way for
every kind; `verify` runs the kind's own check with the common report around it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from gpustack_offline.bundle import assemble, reuse, volumes
from gpustack_offline.bundle.assemble import IMAGE_ARCHIVE, Result
from gpustack_offline.bundle.signing import sign
from gpustack_offline.core.cache import in_use
from gpustack_offline.core.context import Context
from gpustack_offline.core.downloads import BlobStore
from gpustack_offline.core.errors import BundleError, Busy
from gpustack_offline.core.files import atomic_dir, ensure_writable, held
from gpustack_offline.core.matrix import Cell
from gpustack_offline.recipes.inspection import Contents, Image, Missing, lock_command, shown
from gpustack_offline.stages import images
from gpustack_offline.stages.locks import Lock
from gpustack_offline.stages.registry import Reference, Registry
from gpustack_offline.stages.tools import Archive
from gpustack_offline.stages.wheels import Wheel
from gpustack_offline.verify import common as verifying
from gpustack_offline.verify.common import Report


@dataclass
class Parts:
    """What a recipe gathered for a cell before its bundle folder is staged."""

    lock_state: str  # what `build` did about the lock: used, created, refreshed, pinned
    lock: Lock | None = None
    wheels: Sequence[Wheel] = ()
    tools: Archive | None = None
    images: Sequence[images.Image] = ()
    store: BlobStore | None = None  # where the images' blobs are
    start_modules: Sequence[str] = ()  # what `gpustack start` loads, for the site to compile


@dataclass(frozen=True)
class Locked:
    path: Path  # the lock or pin file written
    moved: Sequence[str] = ()  # what changed since the last lock, for the user


class Recipe(Protocol):
    """One kind of cell: how it is locked, gathered and verified."""

    kind: str  # as the docs name it: "pip 0.x"

    def lock(self, ctx: Context, cell: Cell) -> Locked:
        """Resolve or pin what the cell carries, online."""
        ...

    def inputs(self, ctx: Context, cell: Cell) -> list[Path]:
        """The data files a build of the cell reads, for its provenance (those that exist)."""
        ...

    def unpinned(self, ctx: Context, cell: Cell) -> list[str]:
        """What a frozen build of the cell would refuse for want of a committed, current pin
        (lock, tools sums, image digests), one line each; offline, nothing is written."""
        ...

    def contents(self, ctx: Context, cell: Cell) -> Contents:
        """What the cell's bundle will carry, from the committed data alone (lock, tools sums,
        runner list, image pins), offline; a missing file is named in `Contents.missing` with
        the command that writes it, not raised."""
        ...

    def gather(self, ctx: Context, cell: Cell) -> Parts:
        """Fetch and build every part of the bundle into the cache."""
        ...

    def verify(self, ctx: Context, cell: Cell, report: Report) -> Report:
        """Check the finished bundle the way a site uses it; fill and return `report`."""
        ...

    def verified(self, cell: Cell, report: Report) -> str:
        """One line for the user on what the verification proved."""
        ...


Gathered = TypeVar("Gathered")


def build(ctx: Context, cell: Cell, recipe: Recipe) -> Result:
    """One cell's bundle: its recipe gathers the parts, `assemble` stages them."""

    def gather() -> tuple[Parts, str]:
        parts = recipe.gather(ctx, cell)
        return parts, parts.lock_state

    def fill(stage: Path, parts: Parts) -> dict[str, Any]:
        exported = (
            images.export_images(parts.images, parts.store, stage / IMAGE_ARCHIVE)
            if parts.images and parts.store
            else []
        )
        return assemble.assemble(
            cell, parts.wheels, parts.lock, stage, ctx.root, parts.tools,
            images=exported, inputs=recipe.inputs(ctx, cell), start_modules=parts.start_modules,
        )  # fmt: skip

    return build_bundle(ctx, cell.id, lambda: recipe.inputs(ctx, cell), gather, fill)


def build_bundle(
    ctx: Context,
    bundle_id: str,
    inputs: Callable[[], Sequence[Path]],
    gather: Callable[[], tuple[Gathered, str]],
    fill: Callable[[Path, Gathered], dict[str, Any]],
) -> Result:
    """One bundle (a cell's or a model's), built by one process at a time into one dist folder:
    a second build of it into the same folder is refused at once, naming the first, so neither
    deletes the other's work in progress. The cache is shared: its leftovers are swept only
    when no other build uses it.

    `inputs` names the data files the build reads (asked before, for the reuse check, and
    after, as a gather may write a lock); `gather` fetches into the cache and says what it did
    about the lock; `fill` writes the bundle's files into the staging folder and returns the
    manifest. The folder is signed (with a key), renamed into place, and tarred."""
    layout = ctx.layout
    ensure_writable(layout.dist, "dist-dir")
    ensure_writable(layout.cache, "cache-dir")
    try:
        with (
            held(layout.dist / f".{bundle_id}.lock", f"the bundle {layout.bundle(bundle_id)}",
                 False),
            in_use(layout.cache),
        ):  # fmt: skip
            return _build(ctx, bundle_id, inputs, gather, fill)
    except Busy as exc:
        raise BundleError(
            f"another build of {bundle_id} is writing into {layout.dist}: {exc}. Fix: wait for "
            "it to finish, or build into another dist-dir (--dist)"
        ) from None


def _build(
    ctx: Context,
    bundle_id: str,
    inputs: Callable[[], Sequence[Path]],
    gather: Callable[[], tuple[Gathered, str]],
    fill: Callable[[Path, Gathered], dict[str, Any]],
) -> Result:
    started = time.monotonic()
    final, tar = ctx.layout.bundle(bundle_id), ctx.layout.tar(bundle_id)
    record = reuse.record_path(ctx.layout.dist, bundle_id)
    key = _key(ctx, inputs())
    checked = reuse.unchanged(record, key, final, tar)
    if checked is not None:
        manifest = json.loads((final / "manifest.json").read_text())
        stages = f"unchanged: {checked} files checked, nothing written"
        return assemble.result(bundle_id, final, manifest, started, "used", stages)
    moved = reuse.changed(record, key)
    reuse.forget(record)
    gathered, lock_state = gather()
    assemble.clear_previous(final, tar)
    with atomic_dir(final) as stage:
        manifest = fill(stage, gathered)
        if ctx.layout.signing_key:
            sign(stage, ctx.layout.signing_key, ctx.opts.signing_passphrase_env or None)
    if volumes.outputs(ctx.opts.write, ctx.opts.split).tar:  # else volumes only: no whole tar
        assemble.write_tar(final, tar)
    # the key again: a lock the gather made or refreshed is an input of what was built
    reuse.write_record(record, _key(ctx, inputs()), tar)
    stages = "rebuilt: " + ", ".join(moved)
    return assemble.result(bundle_id, final, manifest, started, lock_state, stages)


def _key(ctx: Context, inputs: Sequence[Path]) -> dict[str, str]:
    return reuse.inputs_key(ctx.root, inputs, ctx.layout.signing_key)


def verify(ctx: Context, cell: Cell, recipe: Recipe) -> Report:
    """The kind's verification of the bundle in dist, with its report written beside it."""
    return verifying.verify(
        cell,
        ctx.layout.bundle(cell.id),
        ctx.layout.report(cell.id),
        lambda report: recipe.verify(ctx, cell, report),
    )


def existing(paths: Sequence[Path]) -> list[Path]:
    return [p for p in paths if p.is_file()]


def pin_images(ctx: Context, cell: Cell, wanted: dict[Reference, list[str]]) -> Locked:
    """Record what the cell's image tags point at now, for its platforms, and what moved."""
    client = Registry(ctx.store(), mirror=ctx.opts.registry_mirror or None)
    moved = images.refresh_references(client, ctx.layout.image_pins, cell.version, wanted)
    return Locked(images.pin_path(ctx.layout.image_pins, cell.version), [str(m) for m in moved])


def unpinned_images(ctx: Context, cell: Cell, wanted: dict[Reference, list[str]]) -> list[str]:
    """Each image reference and platform of the cell that its pin files do not pin, as
    `gather_images` would refuse it (a missing pin file once, however many images it holds)."""
    problems: dict[str, None] = {}
    for ref, platforms in wanted.items():
        try:
            pins = images.read_pins(images.pin_path(ctx.layout.image_pins, cell.version, ref.name))
            for platform in platforms:
                images.pinned_reference(pins, ref, platform)
        except BundleError as exc:
            problems[str(exc)] = None
    return list(problems)


def image_contents(
    ctx: Context,
    cell: Cell,
    kind: str,
    wanted: dict[Reference, list[str]],
    roles: Mapping[Reference, str],
) -> Contents:
    """The cell's images for their platforms with the digests their pin files record, or
    unpinned; the pin files hold no sizes, so each size is None (nothing is asked online)."""
    found: list[Image] = []
    missing: list[Missing] = []
    warnings: dict[str, None] = {}
    for ref, platforms in wanted.items():
        path = images.pin_path(ctx.layout.image_pins, cell.version, ref.name)
        pins, why = None, f"unpinned: {shown(path, ctx.root)} does not exist"
        if not path.is_file():
            missing.append(Missing("image pins", shown(path, ctx.root), lock_command(cell)))
        else:
            try:
                pins = images.read_pins(path)
            except BundleError as exc:
                warnings[str(exc)] = None
                why = f"unpinned: {shown(path, ctx.root)} cannot be read"
        for platform in platforms:
            role = roles.get(ref, "image")
            pinned = _pinned(pins, ref, platform)
            if pinned is None:
                note = why if pins is None else f"unpinned: not in {shown(path, ctx.root)}"
                found.append(Image(str(ref), platform, role, None, None, None, note))
            else:
                found.append(Image(str(ref), platform, role, pinned.manifest, pinned.index, None))
    return Contents(
        cell.id, kind, images=tuple(found), missing=tuple(dict.fromkeys(missing)),
        warnings=tuple(warnings),
    )  # fmt: skip


def _pinned(pins: images.Pins | None, ref: Reference, platform: str) -> images.PinnedImage | None:
    if pins is None:
        return None
    try:
        return images.pinned_reference(pins, ref, platform)
    except BundleError:
        return None


def gather_images(ctx: Context, cell: Cell, wanted: dict[Reference, list[str]]) -> Parts:
    """Pull the cell's pinned images for their platforms into the blob store; the bundle then
    exports them as one archive, each layer once however many images share it."""
    store = ctx.store()
    registry = Registry(store, mirror=ctx.opts.registry_mirror or None, jobs=ctx.opts.jobs)
    pulled = []
    for ref, platforms in wanted.items():
        pins = images.read_pins(images.pin_path(ctx.layout.image_pins, cell.version, ref.name))
        for platform in platforms:
            pinned = images.pinned_reference(pins, ref, platform)
            pulled.append(images.pull_pinned(registry, pinned))
    return Parts("pinned", images=pulled, store=store)


def image_inputs(ctx: Context, cell: Cell) -> list[Path]:
    """The matrix and the pin file of every repository the version's images come from (server,
    runner, runtime)."""
    return existing(
        [ctx.layout.matrix, *sorted(ctx.layout.image_pins.glob(f"*-{cell.version}.toml"))]
    )
