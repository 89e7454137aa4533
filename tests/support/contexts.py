"""The build context the pip end-to-end tests share: frozen locks from bundles/, tools from the
loopback release mirror, locked like upstream."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpustack_offline.cli import commands
from support.release_mirror import ReleaseMirror, write_fixture_locks


@pytest.fixture(scope="module")
def pip_ctx(
    root: Path, tmp_path_factory: pytest.TempPathFactory, release_mirror: ReleaseMirror
) -> commands.Context:
    """Frozen locks from bundles/; tools from the loopback release mirror, locked like upstream.
    One per module: each module builds into a dist folder of its own."""
    dist = tmp_path_factory.mktemp("dist")
    tools_locks = write_fixture_locks(release_mirror.root, tmp_path_factory.mktemp("tools-locks"))
    cli = {
        "dist_dir": str(dist),
        "frozen": True,
        "progress": False,
        "tools_base_url": release_mirror.base_url,
        "tools_locks_dir": str(tools_locks),
    }
    return commands.Context.load(root, cli=cli)
