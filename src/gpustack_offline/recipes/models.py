"""Model bundles: a model of `bundles/models.toml`, pinned by its lock, fetched into the blob
store, and staged as `dist/model-<name>/` and its tar, for the site's `install-model.sh` to
check, place and register in GPUStack's model catalog.

Not a `Recipe`. A recipe is chosen by a cell of the matrix and every step of the protocol takes
that `Cell` (GPUStack version, target OS, arch, device, Python, method): `lock` resolves for the
target, `gather` builds for it, and `verify` installs the bundle in a clean container of it. A
model has none of those axes: the same bytes serve every target and both GPUStack lines, and it
is named in `models.toml`, not the matrix. Making it a recipe would mean inventing a cell for
it. So models take the same shared steps by another door: `base.build_bundle` (the per-dist
build lock, the reuse record, the atomic folder, signature and tar) with
`assemble.assemble_model` (manifest, SHA256SUMS and SBOM written as for cells). Verifying a
model bundle against a running GPUStack server is not built yet (issue 17).
"""

from __future__ import annotations

from pathlib import Path

from gpustack_offline.bundle import assemble
from gpustack_offline.bundle.assemble import Result
from gpustack_offline.core.context import Context
from gpustack_offline.core.errors import LockError
from gpustack_offline.core.models import Model
from gpustack_offline.recipes.base import Locked, build_bundle, existing
from gpustack_offline.stages import hub
from gpustack_offline.stages.model_locks import (
    ModelLock,
    changes,
    lock_path,
    read_lock,
    stale,
    write_lock,
)


def endpoint(ctx: Context) -> str:
    return hub.endpoint(ctx.opts.hf_endpoint)


def lock(ctx: Context, model: Model) -> Locked:
    """Pin the model's revision to a commit and its files to size and sha256 (online), and
    say what moved since the committed lock."""
    hub.refuse_unsupported(model)
    path = lock_path(ctx.layout.model_locks, model.name)
    old = read_lock(path) if path.is_file() else None
    resolved = hub.resolve(model, endpoint(ctx), ctx.store(), old)
    made = write_lock(ctx.layout.model_locks, model, resolved.commit, resolved.files)
    return Locked(made, changes(old, read_lock(made)))


def unpinned(ctx: Context, model: Model) -> list[str]:
    """What a frozen build of the model would refuse: no lock, or a stale one (offline)."""
    try:
        _current(ctx, model, frozen=True)
    except LockError as exc:
        return [str(exc)]
    return []


def inputs(ctx: Context, model: Model) -> list[Path]:
    """The models data and the model's lock."""
    return existing([ctx.layout.models, lock_path(ctx.layout.model_locks, model.name)])


def _current(ctx: Context, model: Model, frozen: bool) -> tuple[ModelLock, str]:
    """The model's current lock, made or refreshed online unless `frozen`; and what happened."""
    hub.refuse_unsupported(model)
    path = lock_path(ctx.layout.model_locks, model.name)
    fix = f"run `invoke lock --model {model.name}` and commit it"
    if not path.is_file():
        if frozen:
            raise LockError(f"no lock for model {model.name} at {path}; {fix}")
        lock(ctx, model)
        return read_lock(path), "created"
    current = read_lock(path)
    if stale(current, model):
        if frozen:
            raise LockError(
                f"model lock {path} is stale: the model's source, repository, revision or "
                f"files in {ctx.layout.models} changed; {fix}"
            )
        lock(ctx, model)
        return read_lock(path), "refreshed"
    return current, "used"


def build(ctx: Context, model: Model) -> Result:
    """The model's bundle: every locked file fetched (or found) in the blob store, checked,
    and staged as hard links beside the catalog entries and the installer."""

    def gather() -> tuple[tuple[ModelLock, dict[str, Path]], str]:
        current, state = _current(ctx, model, ctx.opts.frozen)
        blobs = hub.fetch(ctx.store(), current, endpoint(ctx), ctx.opts.jobs, ctx.opts.progress)
        return (current, blobs), state

    def fill(stage: Path, gathered: tuple[ModelLock, dict[str, Path]]) -> dict[str, object]:
        current, blobs = gathered
        return assemble.assemble_model(model, current, blobs, stage, ctx.root, inputs(ctx, model))

    return build_bundle(ctx, model.bundle_id, lambda: inputs(ctx, model), gather, fill)
