"""Invoke tasks: flags in, `commands` called, errors printed as one line each.

`tasks.py` at the project root only composes the collections defined here. Each task imports
what it calls when it runs: the SBOM library alone takes a quarter of a second to import, which
`invoke --list`, `--help` and a mistyped flag should not pay.
"""

from __future__ import annotations

import functools
import inspect
import logging
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from invoke import Collection, Exit, task

from gpustack_offline.core.errors import debugging, describe
from gpustack_offline.core.matrix import AXES

MATRIX = "bundles/matrix.toml"


def _axis_help() -> dict[str, str]:
    """Each axis flag's help, with its values from the matrix data (not a list kept here)."""
    values: dict[str, list[str]] = {}
    try:
        data = tomllib.loads((Path(__file__).resolve().parents[3] / MATRIX).read_text())
        values = {a: [str(v) for v in data["axes"][a]] for a in AXES}
    except (OSError, KeyError, TypeError, tomllib.TOMLDecodeError):
        pass  # an installed package without the checkout's data: help without the values

    def among(axis: str) -> str:
        return f": {', '.join(values[axis])}" if values.get(axis) else ""

    return {
        "cell": "cell id or glob pattern, e.g. 'v0.7.1-linux-amd64-cpu-*' (repeatable)",
        "version": f"GPUStack version(s), comma-separated{among('version')} "
        "(default: the matrix default)",
        "os": f"target OS{among('os')}",
        "arch": f"target architecture{among('arch')}",
        "device": f"accelerator and its toolkit{among('device')}",
        "python": f"target Python X.Y{among('python')} (default: the matrix default)",
        "extras": f"pip extras (0.x) or inference services (2.x){among('extras')}",
        "method": f"install method{among('method')}",
    }


_AXIS_HELP = _axis_help()


def _root(c: Any) -> Path:
    return Path(c.cwd).resolve() if getattr(c, "cwd", None) else Path.cwd()


def _wired(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The one top-level handler: whatever stops a task is one `error:` line naming the thing
    and the fix, exit 2, never a traceback (unless GPUSTACK_OFFLINE_DEBUG=1 asks for it)."""

    @functools.wraps(fn)
    def wrapper(c: Any, *args: Any, **kwargs: Any) -> Any:
        debug = debugging()
        logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(message)s")
        try:
            return fn(c, *args, **kwargs)
        except Exit:
            raise
        except (Exception, KeyboardInterrupt) as exc:
            if debug:
                raise
            raise Exit(f"error: {describe(exc)}", code=2) from None

    return wrapper


def _selecting(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Give a task the selection flags, declared once here: `--cell` (repeatable) and one flag
    per matrix axis. The body gets them as one mapping, `selection`, after the context."""
    own = list(inspect.signature(fn).parameters.values())  # c, selection, the task's own flags
    flags = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)
             for n in ("cell", *AXES)]  # fmt: skip

    @functools.wraps(fn)
    def wrapper(c: Any, **kwargs: Any) -> Any:
        selection = {name: kwargs.pop(name, None) for name in ("cell", *AXES)}
        return fn(c, selection, **kwargs)

    wrapper.__signature__ = inspect.Signature([own[0], *flags, *own[2:]])  # type: ignore[attr-defined]
    return wrapper


def _select(ctx: Any, selection: dict[str, Any], patterns: list[str] | None = None) -> list[Any]:
    """The cells a task's selection flags name (`patterns` when no --cell is given)."""
    axes = {a: v for a, v in selection.items() if a != "cell"}
    return ctx.select(selection["cell"] or patterns or [], **axes)  # type: ignore[no-any-return]


_MODEL_HELP = (
    "a model of bundles/models.toml, by name or glob (repeatable); with --model alone, no "
    "cells are selected"
)


def _select_with_models(
    ctx: Any, selection: dict[str, Any], model: list[str] | None
) -> tuple[list[Any], list[Any]]:
    """(cells, models): `--model` alone selects models only; with a cell or axis flag, both."""
    models = ctx.models(model or [])
    chose_cells = any(v for v in selection.values())
    cells = _select(ctx, selection) if chose_cells or not models else []
    return cells, models


@task(
    iterable=["cell"],
    help={**_AXIS_HELP, "json": "print a CI job matrix ({'include': [...]}) instead of a table",
          "all": "every cell of every version and Python, ignoring the defaults"},
)  # fmt: skip
@_wired
@_selecting
def matrix(c, selection, json=False, all=False):  # type: ignore[no-untyped-def]  # noqa: A002
    """List the cells of the build matrix (table, or --json for CI)."""
    from gpustack_offline.cli import commands

    ctx = commands.Context.load(_root(c))
    cells = _select(ctx, selection, ["*"] if all else [])
    print(commands.matrix_table(ctx, cells, json))


@task(
    name="inspect",
    help={"cell": "the cell id, e.g. v0.7.1-linux-amd64-cpu-py3.11-base-pip",
          "json": "print JSON (cell, kind, packages, installer, tools, images, totals, "
                  "missing, warnings) instead of tables"},
)  # fmt: skip
@_wired
def inspect_(c, cell=None, json=False):  # type: ignore[no-untyped-def]
    """Show what a cell will carry (packages, tools, images, sizes) from committed data alone.

    Nothing is downloaded: the lock, tools sums, runner list and image pins are read."""
    from gpustack_offline.cli import commands

    ctx = commands.Context.load(_root(c))
    print(commands.inspect(ctx, cell, json))


@task(
    iterable=["cell", "model"],
    help={**_AXIS_HELP, "model": _MODEL_HELP,
          "frozen": "refuse to build a cell or model whose lock is missing or stale",
          "jobs": "parallel downloads", "dist": "output folder (default dist/)",
          "split": "also cut dist/<cell>.tar into volumes of SIZE for transfer media: 4G "
                   "(decimal, fits FAT32), 4GiB (binary), fat32 (4 GiB-1)",
          "write": "what to write beside dist/<cell>/: tar, volumes (needs --split; streamed "
                   "from the folder, no whole tar) or both (default: the tar, and volumes "
                   "when --split is given)",
          "since": "also write a delta: leave out what this base holds (an inventory from "
                   "`install.sh --inventory`, an earlier bundle folder or .tar, or its "
                   "manifest.json): dist/<cell>.since-<base>/ and .tar"},
)  # fmt: skip
@_wired
@_selecting
def bundle(
    c, selection, frozen=False, jobs=None, dist=None, split=None, write=None, since=None, model=None
):  # type: ignore[no-untyped-def]
    """Build the bundle of every selected cell (dist/<cell-id>/, .tar) and model
    (dist/model-<name>/, .tar); with --since, each one's delta too."""
    from gpustack_offline.cli import commands

    # a flag that is not given leaves the option to pyproject and the environment
    cli = {"frozen": frozen or None, "jobs": jobs, "dist_dir": dist, "split": split,
           "write": write}  # fmt: skip
    ctx = commands.Context.load(_root(c), cli=cli)
    cells, models = _select_with_models(ctx, selection, model)
    commands.build(ctx, cells, models, since=Path(since) if since else None)


@task(
    iterable=["cell", "model"],
    help={**_AXIS_HELP, "tools": "pip cells: also run upstream's download-tools for the target "
          "and record its assets' sums in bundles/tools/ (downloads the tools)",
          "model": _MODEL_HELP + "; pins its revision to a commit and its files to sha256 in "
          "bundles/locks/models/<name>.toml (a mirror: the hf-endpoint option or HF_ENDPOINT, "
          "modelscope-endpoint or MODELSCOPE_ENDPOINT)"},
)  # fmt: skip
@_wired
@_selecting
def refresh(c, selection, tools=False, model=None):  # type: ignore[no-untyped-def]
    """Resolve the selected cells (and models) again and rewrite their locks under
    bundles/locks/."""
    from gpustack_offline.cli import commands

    ctx = commands.Context.load(_root(c))
    cells, models = _select_with_models(ctx, selection, model)
    for path in dict.fromkeys(commands.lock(ctx, cells, tools=tools, models=models)):
        print(path)


@task(iterable=["cell", "model"], help={**_AXIS_HELP, "model": _MODEL_HELP})
@_wired
@_selecting
def check(c, selection, model=None):  # type: ignore[no-untyped-def]
    """Refuse the selected cells (and models) whose lock, tools sums or image pins are missing
    or stale."""
    from gpustack_offline.cli import commands

    ctx = commands.Context.load(_root(c))
    cells, models = _select_with_models(ctx, selection, model)
    commands.check_pins(ctx, cells, models)


@task(iterable=["arch"], help={"arch": "amd64 and/or arm64 (default: both)"})
@_wired
def base(c, arch=None):  # type: ignore[no-untyped-def]
    """Make the clean Debian base images that verification and native builds use."""
    from gpustack_offline.cli import commands

    ctx = commands.Context.load(_root(c))
    for tag in commands.base_images(ctx, arch or ["amd64", "arm64"]):
        print(tag)


@task(help={"dist": "bundle folder (default: the dist-dir option)",
            "out": "folder for the release assets and index (replaced whole)",
            "merge": "merge the <cell>.release.json entries under this folder instead "
                     "(the release job)"})  # fmt: skip
@_wired
def release_index(c, dist=None, out="release", merge=None):  # type: ignore[no-untyped-def]
    """Stage the finished bundles as release assets with an index (cells, sizes, digests)."""
    from gpustack_offline.bundle import release
    from gpustack_offline.cli import commands

    if merge:
        index = release.merge_release_entries(Path(merge), Path(out))
    else:
        ctx = commands.Context.load(_root(c), cli={"dist_dir": dist})
        index = release.stage_release(ctx.dist, Path(out))
    print(release.render_markdown(index))


@task(help={"a": "bundle folder or .tar", "b": "bundle folder or .tar"})
@_wired
def compare(c, a, b):  # type: ignore[no-untyped-def]
    """List what differs between two bundles (exit 1 on any unexpected difference)."""
    from gpustack_offline.bundle import compare as compare_

    code = compare_.main(Path(a), Path(b))
    if code:
        raise Exit(code=code)


def namespace() -> Collection:
    """`invoke matrix`, `invoke inspect --cell …`, `invoke bundle`, `invoke lock [--cell …]`,
    `invoke lock.check`, `invoke images.base`."""
    locks = Collection("lock")
    locks.add_task(refresh, default=True)
    locks.add_task(check)
    ns = Collection(matrix, inspect_, bundle, release_index, compare)
    ns.add_collection(locks)
    ns.add_collection(Collection("images", base))
    return ns
