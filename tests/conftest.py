"""Shared fixtures. Unit tests run with sockets disabled (pytest-socket, see pyproject addopts);
integration tests enable them and need Docker and PyPI — they fail, never skip, without them."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpustack_offline.core.matrix import Matrix

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
