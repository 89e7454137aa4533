"""What a cell will carry, read from the committed data alone (`invoke inspect`): before a build,
a release engineer sees the packages, installer, tools assets and images of a cell, with the
sha256 and size each pin records, and what is not pinned yet and which command pins it.

Nothing here downloads: a size the lock or pins do not record is `None`, never asked for.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gpustack_offline.core.matrix import Cell

# The top-level keys of `Contents.to_json()`, in order (documented in docs/building.md).
JSON_KEYS = (
    "cell", "kind", "packages", "installer", "tools", "images", "totals", "missing", "warnings",
)  # fmt: skip


@dataclass(frozen=True)
class Package:
    """A locked package and the file of it the target gets."""

    name: str
    version: str
    file: str | None  # the wheel chosen for the target, or the sdist it is built from
    sha256: str | None  # of that file, as the lock records it
    size: int | None  # bytes, as the lock records them; None for a wheel built from its sdist
    source: str  # "wheel", "sdist" (built at bundle time) or "none" (a build refuses it)
    note: str = ""


@dataclass(frozen=True)
class ToolAsset:
    """An upstream release asset of the tools archive (by program: its asset group)."""

    program: str  # llama-box, gguf-parser, fastfetch
    path: str | None  # upstream's URL path; None when nothing is pinned for the program
    sha256: str | None
    size: int | None
    note: str = ""


@dataclass(frozen=True)
class Image:
    """An image of the cell for one platform, with its pin if the pin files have one."""

    reference: str  # docker.io/gpustack/gpustack:v0.7.1-cpu
    platform: str
    role: str  # server, runner, pause, health, benchmark, ... (as upstream's list names it)
    digest: str | None  # the platform manifest's digest; None: unpinned
    index_digest: str | None  # what the tag pointed at when pinned
    size: int | None  # the pin files record no sizes: None unless they do
    note: str = ""

    @property
    def pinned(self) -> bool:
        return self.digest is not None


@dataclass(frozen=True)
class Missing:
    """A committed file the cell needs that is not there, and the command that writes it."""

    what: str  # "lock", "tools sums", "image pins", "runner list"
    file: str  # relative to the project root where it is under it
    command: str

    def __str__(self) -> str:
        return f"{self.what} ({self.file}): write it with `{self.command}` and commit it"


@dataclass(frozen=True)
class Contents:
    """Everything a cell's bundle will hold that the committed data names."""

    cell: str
    kind: str
    packages: tuple[Package, ...] = ()
    installer: tuple[Package, ...] = ()
    tools: tuple[ToolAsset, ...] = ()
    images: tuple[Image, ...] = ()
    missing: tuple[Missing, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def items(self) -> tuple[Package | ToolAsset | Image, ...]:
        return (*self.packages, *self.installer, *self.tools, *self.images)

    @property
    def bytes_known(self) -> int:
        """The sum of every size the committed data records."""
        return sum(i.size for i in self.items if i.size is not None)

    @property
    def unknown_sizes(self) -> int:
        """How many items have no recorded size (so `bytes_known` is a lower bound)."""
        return sum(1 for i in self.items if i.size is None)

    def to_json(self) -> dict[str, Any]:
        """A plain mapping with the keys of `JSON_KEYS`, for `json.dumps`."""
        return {
            "cell": self.cell,
            "kind": self.kind,
            "packages": [asdict(p) for p in self.packages],
            "installer": [asdict(p) for p in self.installer],
            "tools": [asdict(t) for t in self.tools],
            "images": [{**asdict(i), "pinned": i.pinned} for i in self.images],
            "totals": {
                "items": len(self.items),
                "bytes_known": self.bytes_known,
                "unknown_size": self.unknown_sizes,
            },
            "missing": [asdict(m) for m in self.missing],
            "warnings": list(self.warnings),
        }


def shown(path: Path, root: Path) -> str:
    """A path as the user knows it: relative to the project when it is under it."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def lock_command(cell: Cell, tools: bool = False) -> str:
    return f"invoke lock {'--tools ' if tools else ''}--cell {cell.id}"
