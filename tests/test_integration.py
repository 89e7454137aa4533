"""Real bundles from PyPI, verified offline in clean containers (arm64 under qemu).

These need the Docker Engine, qemu binfmt for arm64, debootstrap and PyPI; `.ci/run` sets them
up. Without them the tests fail with the reason — they never skip.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from release_mirror import write_fixture_locks

from gpustack_offline.cli import commands
from gpustack_offline.core import docker as containers
from gpustack_offline.core.errors import CudaGateError, VerifyError
from gpustack_offline.core.files import sha256_file
from gpustack_offline.core.safety import safe_extract_tar
from gpustack_offline.stages import tools
from gpustack_offline.stages.locks import Inputs, make_lock, read_lock
from gpustack_offline.stages.wheels import wheelhouse
from gpustack_offline.verify.pip import Unverifiable

pytestmark = pytest.mark.integration

CELLS = [
    "v0.7.1-linux-amd64-cpu-py3.11-base-pip",
    "v0.7.1-linux-arm64-cpu-py3.11-base-pip",
    "v0.7.1-linux-amd64-cuda12.8-py3.11-base-pip",
]
VERIFY_STEPS = [
    "isolation", "sums", "preflight", "install", "cli",
    "start-upstream", "healthz-upstream", "worker-upstream", "ui-upstream", "stop-upstream",
    "start-site", "healthz-site", "worker-site", "ui-site", "tools-offline", "tools", "egress",
]  # fmt: skip


@pytest.fixture(scope="module")
def ctx(root, tmp_path_factory, release_mirror) -> commands.Context:
    """Frozen locks from bundles/; tools from the loopback release mirror, locked like upstream."""
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

    tools_file = next(f for f in manifest["files"] if f["kind"] == "tools")
    assert tools_file["sha256"] == manifest["tools"]["sha256"]
    assert manifest["tools"]["llama_box_dir"].endswith(
        f"-linux-{cell.arch}" + ("-cuda" if cell.cuda else "")
    )

    report = commands.verify_cell(ctx, cell)
    assert report.ok and report.seconds_to_healthz and report.seconds_to_worker
    assert [s.name for s in report.steps] == VERIFY_STEPS
    steps = {s.name: s.output for s in report.steps}
    # the worker said it found each tool; each bundled tool ran here, built for this machine
    assert steps["tools-offline"].count("already exists, skipping download") == 3
    machine = {"amd64": "x86_64", "arm64": "aarch64"}[cell.arch]
    assert f"fastfetch 2.25.0.1 ({machine})" in steps["tools"]
    assert f"linux-{cell.arch}-" in steps["tools"] and "FAIL" not in steps["tools"]
    # upstream's plain start reached for the catalog and update hosts; the configured one for none
    assert {"huggingface.co", "update-service.gpustack.ai"} <= set(report.upstream["hosts"])
    assert report.egress == {"hosts_attempted": 0, "hosts": []}
    audit = json.loads((ctx.dist / f"{cell_id}.egress.json").read_text())
    assert "huggingface.co" in [h["host"] for h in audit["upstream"]["hosts"]]
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


def resum(bundle: Path) -> None:
    """Re-write SHA256SUMS after a deliberate change, so that only the change is tested."""
    lines = []
    for path in sorted(p for p in bundle.rglob("*") if p.is_file() and p.name != "SHA256SUMS"):
        lines.append(f"{sha256_file(path)}  {path.relative_to(bundle)}\n")
    (bundle / "SHA256SUMS").write_text("".join(lines))


def test_a_worker_that_reaches_for_a_tool_fails_verification(ctx, built, tmp_path):
    """Upstream's own archive, unfixed: llama-box under the build host's folder name."""
    cell_id = CELLS[0]
    bundle = tmp_path / "dist" / cell_id
    shutil.copytree(built[cell_id], bundle)
    archive = bundle / "tools" / "gpustack-tools.tar.gz"
    tree = tmp_path / "tree"
    with tarfile.open(archive) as tf:
        safe_extract_tar(tf, tree, "tools archive")
    box = tree / "llama-box"
    good = json.loads((bundle / "manifest.json").read_text())["tools"]["llama_box_dir"]
    tools.retarget(tree, good.replace("linux-amd64", "linux-amd64-build-host"))
    assert not (box / good).exists()
    tools.write_archive(tree, archive)
    resum(bundle)
    damaged_ctx = commands.Context.load(ctx.root, cli={"dist_dir": str(tmp_path / "dist")})
    with pytest.raises(VerifyError) as err:
        commands.verify_cell(damaged_ctx, damaged_ctx.matrix.cell(cell_id))
    assert "tried to download tools at start" in str(err.value)
    assert "Downloading" in str(err.value)


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
