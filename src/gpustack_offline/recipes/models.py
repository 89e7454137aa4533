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
`assemble.assemble_model` (manifest, SHA256SUMS and SBOM written as for cells). A model bundle
is verified beside a cell's bundle (`verify`): it takes a cell there, the GPUStack it is served by.
"""

from __future__ import annotations

from pathlib import Path

from gpustack_offline.bundle import assemble
from gpustack_offline.bundle.assemble import Result
from gpustack_offline.core.context import Context
from gpustack_offline.core.docker import base_image
from gpustack_offline.core.errors import LockError, VerifyError
from gpustack_offline.core.matrix import Cell
from gpustack_offline.core.models import FILE_BACKENDS, Model
from gpustack_offline.recipes import docker2, for_cell, pip0
from gpustack_offline.recipes.base import Locked, build_bundle, existing
from gpustack_offline.stages.model_locks import (
    ModelLock,
    changes,
    lock_path,
    read_lock,
    stale,
    write_lock,
)
from gpustack_offline.stages.model_sources import ModelSource, for_source
from gpustack_offline.verify import common as verifying
from gpustack_offline.verify import egress
from gpustack_offline.verify.common import HOST_ARCH, Report, Unverifiable
from gpustack_offline.verify.models import model_bundle_env, verify_model, verify_model_docker2


def source(ctx: Context, model: Model) -> tuple[ModelSource, str]:
    """The model's source (`stages/model_sources.py`) and the endpoint it is asked at: its
    option (`hf-endpoint`, `modelscope-endpoint`), else the source client's own variables."""
    chosen = for_source(model.source)
    return chosen, chosen.endpoint(str(getattr(ctx.opts, chosen.OPTION)))


def lock(ctx: Context, model: Model) -> Locked:
    """Pin the model's revision to a commit and its files to size and sha256 (online), and
    say what moved since the committed lock."""
    chosen, base = source(ctx, model)
    path = lock_path(ctx.layout.model_locks, model.name)
    old = read_lock(path) if path.is_file() else None
    resolved = chosen.resolve(model, base, ctx.store(), old)
    made = write_lock(
        ctx.layout.model_locks, model, resolved.commit, resolved.files, chosen.LOCK_NOTE
    )
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
        chosen, base = source(ctx, model)
        blobs = chosen.fetch(ctx.store(), current, base, ctx.opts.jobs, ctx.opts.progress)
        return (current, blobs), state

    def fill(stage: Path, gathered: tuple[ModelLock, dict[str, Path]]) -> dict[str, object]:
        current, blobs = gathered
        return assemble.assemble_model(model, current, blobs, stage, ctx.root, inputs(ctx, model))

    return build_bundle(ctx, model.bundle_id, lambda: inputs(ctx, model), gather, fill)


def report_path(ctx: Context, cell: Cell, model_dir: Path) -> Path:
    """Where the verification of a model bundle beside a cell's writes its report (and, as
    `.egress.json`, its audit): `dist/<model bundle>.<cell>.verify.json`."""
    return ctx.layout.dist / f"{model_dir.name}.{cell.id}.verify.json"


def unverifiable(cell: Cell, model_dir: Path) -> str | None:
    """Why the model bundle cannot be verified beside `cell`'s bundle here, if it cannot."""
    recipe = for_cell(cell)
    if not isinstance(recipe, pip0.Pip0 | docker2.Docker2):
        return (
            f"{cell.id}: a model bundle is verified beside a pip bundle of GPUStack 0.x or a "
            "docker bundle of 2.x so far"
        )
    env = model_bundle_env(model_dir)
    if not env.get(f"CATALOG_GPUSTACK_{cell.series}"):
        return (
            f"{model_dir.name}: GPUStack {cell.series}.x has no {env.get('MODEL_BACKEND')} "
            f"backend, so {cell.id} cannot serve it"
        )
    if isinstance(recipe, pip0.Pip0) and env.get("MODEL_BACKEND") not in FILE_BACKENDS:
        return (
            f"{model_dir.name}: a {env.get('MODEL_BACKEND')} model is scheduled only to a GPU "
            "with its engine installed; verification here covers llama-box (GGUF) models, "
            "which GPUStack schedules on a CPU worker"
        )
    return None


def verify(ctx: Context, cell: Cell, model_dir: Path) -> Report:
    """The model bundle `model_dir` installed beside the cell's bundle (both under dist),
    offered from the site's catalog and deployed (`verify.models`): with a 0.x pip bundle in
    one clean container, with a 2.x docker bundle on the Docker Engine, as far as its server
    goes without a GPU worker; the report beside them, whatever happens."""

    def body(report: Report) -> Report:
        if not (model_dir / "manifest.json").is_file():
            raise VerifyError(f"{model_dir} is not a bundle (no manifest.json); build it first")
        reason = unverifiable(cell, model_dir)
        if reason:
            raise Unverifiable(reason)
        allowlist = egress.load_allowlist(ctx.layout.egress_allowlist, cell.id)
        if isinstance(for_cell(cell), docker2.Docker2):
            sinkhole = base_image(HOST_ARCH, ctx.cache, ctx.opts.debian_mirror)
            return verify_model_docker2(
                cell, ctx.layout.bundle(cell.id), model_dir, ctx.opts.verify_timeout, report,
                ctx.layout.runners, sinkhole, allowlist,
            )  # fmt: skip
        return verify_model(
            cell, ctx.layout.bundle(cell.id), model_dir, ctx.layout.cache,
            ctx.opts.verify_timeout, ctx.opts.debian_mirror, report, allowlist,
        )  # fmt: skip

    bundle_dir = ctx.layout.bundle(cell.id)
    return verifying.verify(cell, bundle_dir, report_path(ctx, cell, model_dir), body)
