"""What every command works from: the options, the paths they resolve to, and the matrix."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from gpustack_offline.core.downloads import BlobStore, RetryPolicy
from gpustack_offline.core.layout import Layout
from gpustack_offline.core.matrix import AXES, Cell, Matrix
from gpustack_offline.core.models import Model, Models
from gpustack_offline.core.options import Options, resolve


@dataclass(frozen=True)
class Context:
    opts: Options
    layout: Layout
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
        layout = Layout.resolve(opts, root)
        return cls(opts, layout, Matrix.load(layout.matrix, layout.runners))

    def select(self, cells: Sequence[str] = (), **axes: str | None) -> list[Cell]:
        return self.matrix.select(list(cells), **{a: v for a, v in axes.items() if a in AXES})

    def models(self, names: Sequence[str]) -> list[Model]:
        """The models `names` (names or globs) name in the models data; none for no names."""
        return Models.load(self.layout.models).select(names) if names else []

    @property
    def root(self) -> Path:
        return self.layout.root

    @property
    def dist(self) -> Path:
        return self.layout.dist

    @property
    def cache(self) -> Path:
        return self.layout.cache

    @property
    def retry(self) -> RetryPolicy:
        """How hard downloads try (the download-* options)."""
        return RetryPolicy.from_options(self.opts)

    def store(self) -> BlobStore:
        """The shared blob store, downloading with the options' retry policy."""
        return BlobStore(self.cache, self.retry)
