"""Shared fixtures. Unit tests run with sockets disabled (pytest-socket, see pyproject addopts);
integration tests enable them and need Docker and PyPI — they fail, never skip, without them."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from gpustack_offline.core.matrix import Matrix
from gpustack_offline.core.options import Options

ROOT = Path(__file__).resolve().parent.parent

# The stand-ins' fixtures (release_mirror, hub, site_registry, basic_registry, runnable_image,
# pip_ctx): helpers live in tests/support/ and their fixtures are loaded here, once, by name.
pytest_plugins = [
    "support.release_mirror",
    "support.registry_fixture",
    "support.contexts",
]


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def matrix() -> Matrix:
    return Matrix.load(ROOT / "bundles" / "matrix.toml")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.enable_socket)


# Free disk an integration run needs where its folders and the cache are: a default-tier run
# took 14.5 GB more at its peak on a warm cache (measured twice, docs/design.md "Tests"), and a
# cold cache fills with some GBs more. A run short of it fails at once, naming the disk, instead
# of failing a hundred tests with "no space left" half way.
NEEDED_GB = 20


def pytest_collection_finish(session: pytest.Session) -> None:
    if not any(
        item.get_closest_marker("integration") or item.get_closest_marker("target")
        for item in session.items
    ):
        return
    folders = {Path(tempfile.gettempdir()), Path(Options().cache_dir)}
    for folder in folders:
        while not folder.exists():
            folder = folder.parent
        free = shutil.disk_usage(folder).free / 1e9
        if free < NEEDED_GB:
            pytest.exit(
                f"only {free:.1f} GB free on the disk of {folder}; the integration tests need "
                f"about {NEEDED_GB} GB there. Fix: free space (earlier runs' folders: rm -rf "
                f"{tempfile.gettempdir()}/pytest-of-*; an old cache: {Options().cache_dir}), or "
                "run the unit tier alone: nox -s unit",
                returncode=1,
            )
