"""What the invoke tasks and nox sessions do, as plain functions over options and a selection.

`tasks.py` and `noxfile.py` only parse flags and call these; errors are `BundleError`s whose
messages the wiring prints without a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import bundle, containers, egress, images, runners, signing, verify, volumes
from .errors import BundleError, debugging, describe
from .fetch import BlobStore
from .locks import inputs_for, load_overrides, make_lock
from .matrix import AXES, Cell, Matrix
from .options import Options, resolve
from .registry import Registry

console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
log = logging.getLogger("gpustack_offline")


@dataclass(frozen=True)
class Context:
    root: Path
    opts: Options
    matrix: Matrix

    @classmethod
    def load(
        cls,
        root: Path,
        cli: Mapping[str, object] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Context:
        for noisy in ("urllib3", "docker"):  # nox turns on DEBUG for every logger
            logging.getLogger(noisy).setLevel(logging.WARNING)
        opts = resolve(root, env=env, cli=cli)
        return cls(root, opts, Matrix.load(opts.path("matrix", root)))

    def select(self, cells: Sequence[str] = (), **axes: str | None) -> list[Cell]:
        return self.matrix.select(list(cells), **{a: v for a, v in axes.items() if a in AXES})

    @property
    def dist(self) -> Path:
        return self.opts.path("dist_dir", self.root)

    @property
    def cache(self) -> Path:
        return self.opts.path("cache_dir", self.root)


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


def lock(ctx: Context, cells: Sequence[Cell]) -> list[Path]:
    """Resolve pip cells into their locks; pin docker cells' image tags to today's digests."""
    overrides = load_overrides(ctx.opts.path("overrides", ctx.root))
    paths = []
    for cell in cells:
        if cell.method == "docker":
            paths.append(pin(ctx, cell))
            continue
        console.print(f"locking {cell.id}")
        inputs = inputs_for(cell, overrides, ctx.opts.index_url)
        paths.append(make_lock(cell, inputs, ctx.opts.path("locks_dir", ctx.root), ctx.cache))
    return paths


def pin(ctx: Context, cell: Cell) -> Path:
    """Record what the cell's image tags point at now, for its platform; print what moved.

    For GPUStack 2.x, upstream's runner list is read again first (from the gpustack-runner
    package that version pins), since it decides which images the cell needs."""
    console.print(f"pinning {cell.id}")
    if cell.series == 2:
        runners.refresh(
            cell.version, ctx.opts.path("runners_dir", ctx.root), ctx.cache, ctx.opts.index_url
        )
    pins_dir = ctx.opts.path("images_pins_dir", ctx.root)
    client = Registry(BlobStore(ctx.cache), mirror=ctx.opts.registry_mirror or None)
    wanted = bundle.image_references(cell, ctx.opts, ctx.root)
    for change in images.refresh_references(client, pins_dir, cell.version, wanted):
        console.print(f"  moved: {change}")
    return images.pin_path(pins_dir, cell.version)


def build(ctx: Context, cells: Sequence[Cell]) -> list[bundle.Result]:
    """Build every selected cell; report each failure and go on, then fail if any failed.

    With the `split` option, each tar is also cut into volumes for transfer media."""
    size = volumes.parse_size(ctx.opts.split) if ctx.opts.split else None  # a bad size fails first
    results: list[bundle.Result] = []
    failures: list[tuple[str, BundleError]] = []
    for cell in cells:
        console.print(f"building {cell.id}", style="bold", markup=False)
        try:
            result = bundle.build(cell, ctx.opts, ctx.root)
            if size:
                written = volumes.split(result.tar, size)
                console.print(f"  {len(written) - 2} volumes, joined by {_shown(written[-1])}")
            results.append(result)
        except BundleError as exc:
            # markup off: messages quote things like [tool.gpustack-offline]
            console.print(f"{cell.id}: {exc}", style="red", markup=False, soft_wrap=True)
            failures.append((cell.id, exc))
    if results:
        console.print(summary(results))
    if len(failures) == 1 and len(cells) == 1:
        raise failures[0][1]  # the one error line carries its own reason
    if failures:
        failed = ", ".join(cell_id for cell_id, _ in failures)
        raise BundleError(f"{len(failures)} of {len(cells)} cells failed: {failed}")
    return results


def summary(results: Sequence[bundle.Result]) -> Table:
    table = Table(title="bundles")
    numeric = ("files", "MB", "seconds")
    for column in ("cell", *numeric, "lock", "bundle"):
        table.add_column(column, justify="right" if column in numeric else "left")
    for r in results:
        table.add_row(
            r.cell.id,
            str(r.files),
            f"{r.bytes / 1e6:.1f}",
            f"{r.seconds:.1f}",
            r.lock_state,
            _shown(r.tar),
        )
    return table


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def built_cell_ids(root: Path) -> list[str]:
    """Ids of the finished bundles in the dist-dir option's folder, for nox to list; none when
    the options cannot be read (the session then says why)."""
    try:
        dist = resolve(root).path("dist_dir", root)
    except BundleError:
        return []
    return sorted(p.parent.name for p in dist.glob("*/manifest.json")) if dist.is_dir() else []


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
    except verify.Unverifiable as exc:
        return Outcome(skipped=True, message=f"NOT VERIFIED: {exc}")
    except (Exception, KeyboardInterrupt) as exc:
        if debugging():
            raise
        return Outcome(failed=True, message=describe(exc))
    return Outcome()


def verify_cell(ctx: Context, cell: Cell) -> verify.Report:
    bundle_dir = ctx.dist / cell.id
    if ctx.opts.verify_key:  # first, as `install.sh --verify-key` does on the site
        signer = signing.verify(bundle_dir, ctx.opts.path("verify_key", ctx.root))
        console.print(f"{cell.id}: signature good, SHA256SUMS signed by key {signer}")
    report = verify.verify(
        cell,
        bundle_dir,
        ctx.cache,
        ctx.opts.verify_timeout,
        ctx.opts.debian_mirror,
        report_path=ctx.dist / f"{cell.id}.verify.json",
        allowlist=egress.load_allowlist(ctx.opts.path("egress_allowlist", ctx.root), cell.id),
        runners_dir=ctx.opts.path("runners_dir", ctx.root),
    )
    if cell.series == 2:
        console.print(
            f"[green]{cell.id}: verified[/green] — loaded, pushed into a site registry where "
            "every image the worker will ask for resolves for its platform; the server from "
            f"that registry answered /healthz after {report.steps[-1].seconds}s"
        )
        return report
    upstream = report.upstream or {}
    console.print(
        f"[green]{cell.id}: verified[/green] — installed offline; the configured start answered "
        f"/healthz after {report.seconds_to_healthz}s, its worker after "
        f"{report.seconds_to_worker}s, reaching for {(report.egress or {}).get('hosts_attempted')}"
        f" outside hosts (upstream's plain start: {upstream.get('seconds_to_healthz')}s, "
        f"{upstream.get('seconds_to_worker')}s, {upstream.get('hosts_attempted')} hosts)"
    )
    return report


def base_images(ctx: Context, arches: Sequence[str]) -> list[str]:
    return [containers.base_image(a, ctx.cache, ctx.opts.debian_mirror) for a in arches]
