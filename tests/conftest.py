"""Shared fixtures. Unit tests run with sockets disabled (pytest-socket, see pyproject addopts);
integration tests enable them and need Docker and PyPI — they fail, never skip, without them."""

from __future__ import annotations

from pathlib import Path

import pytest
from release_mirror import release_mirror  # noqa: F401 - a session fixture for every test

from gpustack_offline.core.matrix import Matrix

ROOT = Path(__file__).resolve().parent.parent


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
