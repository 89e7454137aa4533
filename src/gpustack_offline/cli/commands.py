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

from gpustack_offline.bundle import delta, signing, volumes
from gpustack_offline.core import docker
from gpustack_offline.core.context import Context
from gpustack_offline.core.errors import BundleError, CellError, debugging, describe
from gpustack_offline.core.matrix import AXES, Cell
from gpustack_offline.core.models import Model, is_model_bundle
from gpustack_offline.core.options import resolve
from gpustack_offline.verify.common import Report, Unverifiable

if TYPE_CHECKING:
    from gpustack_offline.bundle.assemble import Result
    from gpustack_offline.recipes.inspection import Contents


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
__all__ = ["Context", "build", "check_pins", "inspect", "lock", "verify_cell"]

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
        table.add_row(c.id, *(getattr(c, a) for a in AXES), c.floor)
    out = Console(width=200, record=True)
    with out.capture() as captured:
        out.print(table)
    return captured.get()


def inspect(ctx: Context, cell_id: str | None, as_json: bool) -> str:
    """What one cell will carry, before anything is downloaded: read from the committed lock,
    tools sums, runner list and image pins only. A missing file is listed with the command that
    writes it (`missing` in the JSON), not an error."""
    if not cell_id:
        raise CellError(
            "name the cell: `invoke inspect --cell ID` (`invoke matrix --all` lists them)"
        )
    contents = _recipes().contents(ctx, ctx.matrix.cell(cell_id))
    if as_json:
        return json.dumps(contents.to_json(), indent=2)
    return _contents_text(contents)


def _size(size: int | None) -> str:
    if size is None:
        return "?"
    if size < 1000:
        return f"{size} B"
    return f"{size / 1e6:.1f} MB" if size >= 10**6 else f"{size / 1e3:.1f} kB"


def _short(digest: str | None) -> str:
    return digest.removeprefix("sha256:")[:16] if digest else "-"


def _contents_text(contents: Contents) -> str:
    """Tables of what `inspect` found, one per part the cell has, then the totals and what is
    missing (with the command that writes it)."""
    tables: list[Table] = []
    for title, found in (("packages", contents.packages), ("installer", contents.installer)):
        if found:
            table = Table(title=f"{title} ({len(found)})")
            for column in ("name", "version", "file", "size", "sha256"):
                table.add_column(column, justify="right" if column == "size" else "left")
            for p in found:
                file = p.file or "-"
                table.add_row(
                    p.name,
                    p.version,
                    file + (f" ({p.source})" if p.source != "wheel" else ""),
                    _size(p.size),
                    _short(p.sha256),
                )
            tables.append(table)
    if contents.tools:
        table = Table(title=f"tools assets ({len(contents.tools)})")
        for column in ("program", "asset", "size", "sha256"):
            table.add_column(column, justify="right" if column == "size" else "left")
        for t in contents.tools:
            table.add_row(t.program, t.path or t.note, _size(t.size), _short(t.sha256))
        tables.append(table)
    if contents.images:
        table = Table(title=f"images ({len(contents.images)})")
        for column in ("reference", "platform", "role", "digest", "size"):
            table.add_column(column, justify="right" if column == "size" else "left")
        for i in contents.images:
            table.add_row(i.reference, i.platform, i.role, i.digest or "unpinned", _size(i.size))
        tables.append(table)
    out = Console(width=200, record=True)
    with out.capture() as captured:
        out.print(f"{contents.cell} ({contents.kind})", markup=False, highlight=False)
        for table in tables:
            out.print(table)
        out.print(
            f"total: {len(contents.items)} item(s), {_size(contents.bytes_known)} known "
            f"({contents.bytes_known} bytes), {contents.unknown_sizes} of unknown size",
            markup=False, highlight=False,
        )  # fmt: skip
        for line in (*(f"missing: {m}" for m in contents.missing), *contents.warnings):
            out.print(line, markup=False, highlight=False, soft_wrap=True)
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


def build(
    ctx: Context, cells: Sequence[Cell], models: Sequence[Model] = (), *, since: Path | None = None
) -> list[Result]:
    """Build every selected cell and model; report each failure and go on, then fail if any
    failed.

    With the `split` option, each bundle is also cut into volumes for transfer media; with
    `write=volumes`, only into volumes, streamed from the folder (no whole tar). With `since`
    (an inventory, an earlier bundle or its manifest), each bundle's delta against it is
    written beside it too (`bundle.delta`)."""
    out = volumes.outputs(ctx.opts.write, ctx.opts.split)  # a bad size or choice fails first
    size = out.volume_size
    base = delta.read_base(since) if since is not None else None  # a bad base fails first
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
            if base is not None:
                _write_delta(ctx, result, base)
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


def _write_delta(ctx: Context, result: Result, base: delta.Base) -> delta.Delta:
    name = delta.delta_name(result.id, base)
    made = delta.make(
        result.directory, base, ctx.layout.dist / name, ctx.layout.dist / f"{name}.tar"
    )
    console.print(
        f"  delta since {base.kind} {Path(base.source).name}: {_shown(made.tar)}, "
        f"{made.carried / 1e6:.1f} MB of {made.full / 1e6:.1f} MB "
        f"({made.left_out} files the site holds left out; floor {made.floor / 1e6:.1f} MB)",
        markup=False,
    )
    return made


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
    if not dist.is_dir():
        return []
    return sorted(
        p.parent.name
        for p in dist.glob("*/manifest.json")
        # a delta is verified by `upgrade`; a model bundle has no cell
        if not (p.parent / delta.BASE_FILE).exists() and not is_model_bundle(p.parent.name)
    )


def delta_names(root: Path) -> list[str]:
    """The delta bundles under dist whose base bundle is there too: `nox -s upgrade` pairs."""
    try:
        dist = resolve(root).path("dist_dir", root)
    except BundleError:
        return []
    found = []
    for record in sorted(dist.glob(f"*/{delta.BASE_FILE}")) if dist.is_dir() else []:
        try:
            cells = json.loads(record.read_text())["base"]["cells"]
        except (OSError, ValueError, KeyError):
            continue
        if cells and (dist / cells[0] / "manifest.json").is_file():
            found.append(record.parent.name)
    return found


def upgrade_session(root: Path, delta_name: str | None) -> Outcome:
    """`nox -s upgrade(<delta>)`: the base bundle installed, upgraded with the delta, rolled
    back, offline; any failure is one message for the session."""

    def run(ctx: Context) -> Outcome | None:
        if delta_name is None:
            return Outcome(
                failed=True,
                message=f"no delta bundle with its base under {ctx.dist}; make one with "
                "`invoke bundle --cell NEW --since dist/OLD`",
            )
        report = _recipes().verify_upgrade(ctx, ctx.dist / delta_name)
        console.print(
            f"[green]{delta_name}: upgrade verified[/green] — installed the base offline, "
            f"upgraded with the delta (state kept, /healthz after {report.seconds_to_healthz}s, "
            f"{(report.egress or {}).get('hosts_attempted', 0)} outside hosts), rolled back "
            f"({report.note})"
        )
        return None

    return _session(root, run)


@dataclass(frozen=True)
class Outcome:
    failed: bool = False
    skipped: bool = False
    message: str = ""


def verify_session(root: Path, cell_id: str | None) -> Outcome:
    """`nox -s verify(<cell>)`: verify one bundle; any failure is one message for the session
    (the traceback only with GPUSTACK_OFFLINE_DEBUG=1)."""

    def run(ctx: Context) -> Outcome | None:
        if cell_id is None:
            return Outcome(
                failed=True,
                message=f"no bundles under {ctx.dist} (the dist-dir option); build some first, "
                "e.g. `invoke bundle --arch arm64`",
            )
        verify_cell(ctx, ctx.matrix.cell(cell_id))
        return None

    return _session(root, run)


def _session(root: Path, run: Callable[[Context], Outcome | None]) -> Outcome:
    """A nox session's body: an unverifiable bundle is a skip, any failure one message (the
    traceback only with GPUSTACK_OFFLINE_DEBUG=1)."""
    try:
        return run(Context.load(root)) or Outcome()
    except Unverifiable as exc:
        return Outcome(skipped=True, message=f"NOT VERIFIED: {exc}")
    except (Exception, KeyboardInterrupt) as exc:
        if debugging():
            raise
        return Outcome(failed=True, message=describe(exc))


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
