"""What a cell's target machine accepts: wheel tags and environment markers.

pip decides both from the interpreter it runs in, which is the build host, not the target. Here
they are computed from the cell, so a wheel set can be resolved and checked on an amd64 host for an
arm64 or Windows target.
"""

from __future__ import annotations

from functools import cache

from packaging.markers import Marker
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import parse_wheel_filename

from gpustack_offline.core.matrix import Cell

# The oldest manylinux each architecture was published for (manylinux1 = glibc 2.5).
_OLDEST_GLIBC_MINOR = {"x86_64": 5, "aarch64": 17}
_LEGACY_MANYLINUX = {"manylinux2014": 17, "manylinux2010": 12, "manylinux1": 5}


def platforms(cell: Cell) -> list[str]:
    """Platform tags the target accepts, most specific first."""
    if cell.os == "windows":
        return {"amd64": ["win_amd64"], "arm64": ["win_arm64"]}[cell.arch]
    machine = cell.machine
    major, minor = (int(p) for p in (cell.glibc or "2.17").split("."))
    tags: list[str] = []
    for m in range(minor, _OLDEST_GLIBC_MINOR[machine] - 1, -1):
        tags.append(f"manylinux_{major}_{m}_{machine}")
        tags.extend(f"{legacy}_{machine}" for legacy, lm in _LEGACY_MANYLINUX.items() if lm == m)
    # Wheels built here from sdists carry the plain platform tag, as pip's own builds do.
    tags.append(f"linux_{machine}")
    return tags


@cache
def _tags(cell: Cell) -> tuple[Tag, ...]:
    version = tuple(int(p) for p in cell.python.split("."))
    plats = platforms(cell)
    abi = f"cp{version[0]}{version[1]}"
    return (
        *cpython_tags(version, abis=[abi], platforms=plats),
        *compatible_tags(version, interpreter=abi, platforms=plats),
    )


def tags(cell: Cell) -> tuple[Tag, ...]:
    """Every tag the target's pip accepts, in pip's order of preference."""
    return _tags(cell)


def wheel_rank(cell: Cell, filename: str) -> int | None:
    """Preference of a wheel on the target (lower is better), or None if it cannot install."""
    order = {tag: i for i, tag in enumerate(_tags(cell))}
    _, _, _, wheel_tags = parse_wheel_filename(filename)
    ranks = [order[t] for t in wheel_tags if t in order]
    return min(ranks) if ranks else None


def marker_environment(cell: Cell) -> dict[str, str]:
    """PEP 508 marker values of the target's interpreter."""
    windows = cell.os == "windows"
    return {
        "implementation_name": "cpython",
        "implementation_version": f"{cell.python}.0",
        "os_name": "nt" if windows else "posix",
        "platform_machine": {"amd64": "AMD64", "arm64": "ARM64"}[cell.arch]
        if windows
        else cell.machine,
        "platform_python_implementation": "CPython",
        "platform_release": "",
        "platform_system": "Windows" if windows else "Linux",
        "platform_version": "",
        "python_full_version": f"{cell.python}.0",
        "python_version": cell.python,
        "sys_platform": "win32" if windows else "linux",
    }


def marker_applies(cell: Cell, marker: str | None) -> bool:
    return marker is None or Marker(marker).evaluate(marker_environment(cell))
