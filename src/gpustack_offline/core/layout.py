"""Every path the pipeline reads or writes, resolved once from the options.

Stages get the few paths they need from here, never the options bag: a path option is turned
into a path in one place, against the project root."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gpustack_offline.core.options import Options


@dataclass(frozen=True)
class Layout:
    root: Path  # the project: scripts/ and the relative defaults of every option below
    matrix: Path
    overrides: Path
    locks: Path  # bundles/locks/<cell>/pylock.toml
    tools_locks: Path  # bundles/tools/gpustack-<version>.toml
    image_pins: Path  # bundles/images/<repository>-<version>.toml
    runners: Path  # bundles/runners/gpustack-<version>.json
    egress_allowlist: Path
    models: Path  # bundles/models.toml
    model_locks: Path  # bundles/locks/models/<name>.toml
    dist: Path
    cache: Path
    signing_key: Path | None  # None: bundles are not signed
    verify_key: Path | None  # None: `verify` does not check signatures

    @classmethod
    def resolve(cls, opts: Options, root: Path) -> Layout:
        def path(name: str) -> Path:
            return opts.path(name, root)

        return cls(
            root=root,
            matrix=path("matrix"),
            overrides=path("overrides"),
            locks=path("locks_dir"),
            tools_locks=path("tools_locks_dir"),
            image_pins=path("images_pins_dir"),
            runners=path("runners_dir"),
            egress_allowlist=path("egress_allowlist"),
            models=path("models"),
            model_locks=path("model_locks_dir"),
            dist=path("dist_dir"),
            cache=path("cache_dir"),
            signing_key=path("signing_key") if opts.signing_key else None,
            verify_key=path("verify_key") if opts.verify_key else None,
        )

    def bundle(self, cell_id: str) -> Path:
        return self.dist / cell_id

    def tar(self, cell_id: str) -> Path:
        return self.dist / f"{cell_id}.tar"

    def report(self, cell_id: str) -> Path:
        return self.dist / f"{cell_id}.verify.json"
