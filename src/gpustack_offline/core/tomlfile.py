"""Reading the project's TOML files (matrix, overrides, locks, pins, tools locks, pyproject):
one reader, so every such file that is missing or malformed is named the same way, with the
place of the mistake (tomllib's line and column) and the fix."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from gpustack_offline.core.errors import BundleError


def read_toml_text(
    path: Path, error: type[BundleError], fix: str = "", *, missing: str | None = None
) -> tuple[dict[str, Any], str]:
    """The parsed table of the file at `path` and its text.

    A file that is not there raises `error(missing)` (by default `<path> does not exist`, then
    the fix); one that does not parse raises `error("<path>: not valid TOML: <what, line,
    column>; <fix>")`."""
    tail = f"; {fix}" if fix else ""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise error(missing or f"{path} does not exist{tail}") from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: not valid TOML: {exc}{tail}") from exc


def read_toml(
    path: Path, error: type[BundleError], fix: str = "", *, missing: str | None = None
) -> dict[str, Any]:
    """`read_toml_text` without the text."""
    return read_toml_text(path, error, fix, missing=missing)[0]
