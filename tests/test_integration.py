"""Real bundles from PyPI, verified offline in clean containers (arm64 under qemu).

These need the Docker Engine, qemu binfmt for arm64, debootstrap and PyPI; `.ci/run` sets them
up. Without them the tests fail with the reason — they never skip.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpustack_offline import commands, containers
from gpustack_offline.errors import CudaGateError, VerifyError
from gpustack_offline.locks import Inputs, make_lock, read_lock
from gpustack_offline.verify import Unverifiable
from gpustack_offline.wheels import wheelhouse

pytestmark = pytest.mark.integration

CELLS = ["v0.7.1-linux-amd64-cpu-py3.11-base-pip", "v0.7.1-linux-arm64-cpu-py3.11-base-pip"]


@pytest.fixture(scope="module")
def ctx(root, tmp_path_factory) -> commands.Context:
    dist = tmp_path_factory.mktemp("dist")
    return commands.Context.load(
        root, cli={"dist_dir": str(dist), "frozen": True, "progress": False}
    )


@pytest.fixture(scope="module")
def built(ctx) -> dict[str, Path]:
    results = commands.build(ctx, [ctx.matrix.cell(c) for c in CELLS])
    return {r.cell.id: r.directory for r in results}


@pytest.mark.parametrize("cell_id", CELLS)
def test_bundle_from_pypi_installs_and_starts_offline(ctx, built, cell_id):
    cell = ctx.matrix.cell(cell_id)
    bundle_dir = built[cell_id]
    assert (bundle_dir.parent / f"{cell_id}.tar").is_file()
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    wheels = [f for f in manifest["files"] if f["kind"] == "wheel"]
    assert any(f["path"].startswith("wheels/gpustack-0.7.1-") for f in wheels)
    # every native wheel is for the target's machine, never the host's by accident
    native = [f["path"] for f in wheels if not f["path"].endswith("-none-any.whl")]
    assert native and all(cell.machine in p for p in native), native

    report = commands.verify_cell(ctx, cell)
    assert report.ok and report.seconds_to_healthz is not None
    assert [s.name for s in report.steps] == [
        "isolation",
        "sums",
        "preflight",
        "install",
        "cli",
        "start",
        "healthz",
    ]
    saved = json.loads((ctx.dist / f"{cell_id}.verify.json").read_text())
    assert saved["ok"] is True and saved["cell"] == cell_id


def test_verification_names_a_damaged_file_and_fails(ctx, built, tmp_path):
    cell_id = CELLS[0]
    damaged = tmp_path / "dist" / cell_id
    shutil.copytree(built[cell_id], damaged)
    victim = sorted((damaged / "wheels").glob("six-*.whl"))[0]
    victim.write_bytes(victim.read_bytes()[:-10])
    damaged_ctx = commands.Context.load(ctx.root, cli={"dist_dir": str(tmp_path / "dist")})
    with pytest.raises(VerifyError) as err:
        commands.verify_cell(damaged_ctx, damaged_ctx.matrix.cell(cell_id))
    assert "step 'sums'" in str(err.value) and victim.name in str(err.value)


def test_windows_and_other_python_cells_are_reported_unverifiable(ctx):
    for cell_id in (
        "v0.7.1-windows-amd64-cpu-py3.11-base-pip",
        "v0.7.1-linux-amd64-cpu-py3.12-base-pip",
    ):
        with pytest.raises(Unverifiable, match="cannot|no clean"):
            commands.verify_cell(ctx, ctx.matrix.cell(cell_id))


def test_sdists_build_pure_here_and_native_in_a_target_container(ctx, tmp_path):
    """wget is pure Python; crcmod has a C extension and must be compiled for aarch64."""
    cell = ctx.matrix.cell("v0.7.1-linux-arm64-cpu-py3.11-base-pip")
    inputs = Inputs(("wget==3.2", "crcmod==1.7"), platform=cell.uv_platform, python=cell.python,
                    index_url=ctx.opts.index_url)  # fmt: skip
    lock = read_lock(make_lock(cell, inputs, tmp_path, ctx.cache))
    wheels = {
        w.name: w
        for w in wheelhouse(cell, lock, ctx.cache, (), ctx.opts.index_url, show_progress=False)
    }
    assert wheels["wget"].built and wheels["wget"].filename.endswith("-py3-none-any.whl")
    assert wheels["crcmod"].built and wheels["crcmod"].filename.endswith("linux_aarch64.whl")
    assert "built from https://" in wheels["crcmod"].origin
    # the native wheel really is aarch64 code: import its extension in an arm64 container
    with containers.container(
        containers.base_image("arm64", ctx.cache), mounts={wheels["crcmod"].path.parent: "/w"}
    ) as box:
        code, out = containers.exec_in(box, ["sh", "-c",
            "python3 -m venv /v && /v/bin/pip install -q --no-index /w/*.whl && "
            "/v/bin/python -c 'import crcmod._crcfunext, platform; print(platform.machine())'",
        ])  # fmt: skip
    assert code == 0 and "aarch64" in out, out


def test_cuda_gate_refuses_torch_built_for_cuda13_on_a_cuda12_cell(ctx, tmp_path):
    cell = ctx.matrix.cell("v0.7.1-linux-amd64-cuda12.4-py3.11-audio-pip")
    inputs = Inputs(("torch==2.11.0",), platform=cell.uv_platform, python=cell.python,
                    index_url=ctx.opts.index_url)  # fmt: skip
    lock = read_lock(make_lock(cell, inputs, tmp_path, ctx.cache))
    with pytest.raises(CudaGateError) as err:
        wheelhouse(cell, lock, ctx.cache, (), ctx.opts.index_url, show_progress=False)
    assert "CUDA 13" in str(err.value) and "pulled in by torch==2.11.0" in str(err.value)


IMPOSSIBLE = "v0.7.1-linux-arm64-cuda12.8-py3.11-vllm-pip"


def test_invoke_refuses_an_unknown_cell_with_one_line(root):
    proc = subprocess.run(
        [sys.executable, "-m", "invoke", "bundle", "--cell", IMPOSSIBLE],
        cwd=root, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith(
        "error: cell 'v0.7.1-linux-arm64-cuda12.8-py3.11-vllm-pip': impossible"
    )
    assert "Traceback" not in proc.stderr
