"""Nox sessions: `nox -l` lists them. Logic lives in the gpustack_offline package.

`verify` is parametrised by the bundles under dist/, so one cell runs alone:
    nox -s "verify(v0.7.1-linux-arm64-cpu-py3.11-base-pip)"
`models` by each model bundle and cell bundle there:
    nox -s "models(model-qwen2.5-0.5b-instruct-q4km@v0.7.1-linux-amd64-cpu-py3.11-base-pip)"
"""

from __future__ import annotations

import sys
from pathlib import Path

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

ROOT = Path(__file__).parent


def _built_cells() -> list[str]:
    """Cell ids with a finished bundle in the dist-dir option's folder."""
    from gpustack_offline.cli import commands

    return commands.built_cell_ids(ROOT)


@nox.session(venv_backend="none")
@nox.parametrize("cell", [nox.param(c, id=c) for c in _built_cells() or ["none-built"]])
def verify(session: nox.Session, cell: str) -> None:
    """Verify a built bundle offline in a clean container of its target."""
    from gpustack_offline.cli import commands

    outcome = commands.verify_session(ROOT, None if cell == "none-built" else cell)
    if outcome.skipped:
        session.skip(outcome.message)
    if outcome.failed:
        session.error(outcome.message)


def _deltas() -> list[str]:
    """Delta bundles under dist whose base bundle is there too."""
    from gpustack_offline.cli import commands

    return commands.delta_names(ROOT)


@nox.session(venv_backend="none", default=False)
@nox.parametrize("delta", [nox.param(d, id=d) for d in _deltas() or ["none-built"]])
def upgrade(session: nox.Session, delta: str) -> None:
    """Install a base bundle offline, upgrade it with a delta, roll back (pip cells)."""
    from gpustack_offline.cli import commands

    outcome = commands.upgrade_session(ROOT, None if delta == "none-built" else delta)
    if outcome.skipped:
        session.skip(outcome.message)
    if outcome.failed:
        session.error(outcome.message)


def _model_pairs() -> list[str]:
    """`<model bundle>@<cell>` for each model bundle and cell bundle under dist."""
    from gpustack_offline.cli import commands

    return commands.model_pairs(ROOT)


@nox.session(venv_backend="none", default=False)
@nox.parametrize("pair", [nox.param(p, id=p) for p in _model_pairs() or ["none-built"]])
def models(session: nox.Session, pair: str) -> None:
    """Install a model bundle beside a GPUStack bundle offline, offer it from the site's catalog
    and deploy it (llama-box beside 0.x pip cells; vLLM/SGLang beside 2.x docker cells, up to
    the scheduler; inference is not run)."""
    from gpustack_offline.cli import commands

    outcome = commands.models_session(ROOT, None if pair == "none-built" else pair)
    if outcome.skipped:
        session.skip(outcome.message)
    if outcome.failed:
        session.error(outcome.message)


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """Run the test suite (unit, target and integration; needs Docker and PyPI); not the heavy
    tier."""
    session.run(sys.executable, "-m", "pytest", "-m", "not heavy", *session.posargs)


@nox.session(venv_backend="none", default=False)
def heavy(session: nox.Session) -> None:
    """Run the on-demand tier: whole bundles of every extras kind (GBs of CUDA wheels) and the
    end-to-end verification of the pip cells CI only builds (arm64 under qemu, CUDA)."""
    session.run(sys.executable, "-m", "pytest", "-m", "heavy", *session.posargs)


@nox.session(venv_backend="none")
def unit(session: nox.Session) -> None:
    """Run the unit tier: pure logic, no Docker, no network, no real installs (about a minute)."""
    tier = "not integration and not target and not heavy"
    session.run(sys.executable, "-m", "pytest", "-m", tier, *session.posargs)


@nox.session(venv_backend="none")
def lint(session: nox.Session) -> None:
    """Lint, format-check and type-check the package and the tests, and check the import
    direction between the package's stages. Needs the dev extra: `pip install -e '.[dev]'`
    (ruff, mypy, import-linter)."""
    paths = ("src", "tests", "noxfile.py", "tasks.py")
    session.run(sys.executable, "-m", "ruff", "check", *paths)
    session.run(sys.executable, "-m", "ruff", "format", "--check", *paths)
    session.run(sys.executable, "-m", "mypy", "src")
    session.run(sys.executable, "-m", "mypy", "tests")
    session.run(str(Path(sys.executable).with_name("lint-imports")))


@nox.session(venv_backend="none", default=False)
def bench(session: nox.Session) -> None:
    """Benchmark the image export against docker pull + save and gpustack save-images (Docker,
    skopeo; writes docs/bench.md)."""
    session.run(sys.executable, "tests/bench_seed.py", *session.posargs)
