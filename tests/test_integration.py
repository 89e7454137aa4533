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
from collections.abc import Callable
from pathlib import Path

import pytest
from support.disk import extra_disk

from gpustack_offline.cli import commands
from gpustack_offline.core import docker as containers
from gpustack_offline.core.errors import CudaGateError, VerifyError
from gpustack_offline.core.files import sha256_file
from gpustack_offline.core.safety import safe_extract_tar
from gpustack_offline.stages import tools
from gpustack_offline.stages.locks import Inputs, make_lock, read_lock
from gpustack_offline.stages.wheels import wheelhouse
from gpustack_offline.verify.common import Unverifiable

pytestmark = pytest.mark.integration

CELLS = [
    "v0.7.1-linux-amd64-cpu-py3.11-base-pip",
    "v0.7.1-linux-arm64-cpu-py3.11-base-pip",
    "v0.7.1-linux-amd64-cuda12.8-py3.11-base-pip",
    # Ascend 910B on arm64: its wheels are the arm64 cpu cell's (warm), its tools the CANN build
    "v0.7.1-linux-arm64-cann8.2.rc1-910b-py3.11-base-pip",
]
# One representative pip cell is verified end to end in the default run; the others' whole
# verification (arm64 under qemu takes ~17 min) is the on-demand tier, `nox -s heavy`. They
# are still built by default, so the arm64, CUDA and CANN selection stays checked in CI.
VERIFIED = [CELLS[0], *(pytest.param(c, marks=pytest.mark.heavy) for c in CELLS[1:])]
BUILD_ONLY = CELLS[1:]
VERIFY_STEPS = [
    "isolation", "sums", "preflight", "install", "cli", "start-upstream", "start-site",
    "healthz-upstream", "healthz-site", "worker-upstream", "worker-site", "ui-upstream", "ui-site",
    "tools-offline", "tools", "egress",
]  # fmt: skip


@pytest.fixture(scope="module")
def built(pip_ctx) -> Callable[[str], Path]:
    """Builds a cell's bundle on first use, once per module: a run that deselects the heavy
    cells does not build them."""
    done: dict[str, Path] = {}

    def build(cell_id: str) -> Path:
        if cell_id not in done:
            (result,) = commands.build(pip_ctx, [pip_ctx.matrix.cell(cell_id)])
            done[cell_id] = result.directory
        return done[cell_id]

    return build


def check_manifest(cell, bundle_dir: Path) -> None:
    assert (bundle_dir.parent / f"{cell.id}.tar").is_file()
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    wheels = [f for f in manifest["files"] if f["kind"] == "wheel"]
    assert any(f["path"].startswith("wheels/gpustack-0.7.1-") for f in wheels)
    # every native wheel is for the target's machine, never the host's by accident
    native = [f["path"] for f in wheels if not f["path"].endswith("-none-any.whl")]
    assert native and all(cell.machine in p for p in native), native

    # what upstream's start command loads, read from the release's own code, for install.sh
    loaded = (bundle_dir / "start-modules.txt").read_text().split()
    assert {"gpustack/cmd/start.py", "gpustack/server/server.py", "fastapi/routing.py"} <= set(
        loaded
    ), loaded[:20]
    tools_file = next(f for f in manifest["files"] if f["kind"] == "tools")
    assert tools_file["sha256"] == manifest["tools"]["sha256"]
    # the folder the target's worker looks for: named after its device kind (npu, cuda …)
    device = tools.target_identity(cell)["device"]
    assert manifest["tools"]["llama_box_dir"].endswith(
        f"-linux-{cell.arch}" + (f"-{device}" if device else "")
    )
    check_llama_box_build(cell, bundle_dir, manifest)


def check_llama_box_build(cell, bundle_dir: Path, manifest: dict) -> None:
    """The tools archive holds the llama-box build a worker of the target picks (its device,
    toolkit version and chip), read from the archive: the binary is the asset's."""
    picked = manifest["tools"]["llama_box_asset"]
    name = picked.rsplit("/", 1)[-1]
    toolkit = cell.toolkit.build if cell.toolkit else "cpu"
    assert name == f"dl-llama-box-{cell.os}-{cell.arch}-{toolkit}.zip", picked
    assert picked in [a["path"] for a in manifest["tools"]["assets"]]
    folder = manifest["tools"]["llama_box_dir"]
    with tarfile.open(bundle_dir / tools.BUNDLE_PATH) as tf:
        versions = json.loads(tf.extractfile("versions.json").read())  # type: ignore[union-attr]
        binary = tf.extractfile(f"llama-box/{folder}/llama-box").read()  # type: ignore[union-attr]
        default = tf.getmember("llama-box/llama-box-default")
    assert versions[folder] == "v0.0.171" and default.linkname == folder
    # each fixture program carries the path of the asset it came from
    assert picked.encode() in binary, picked


@pytest.mark.parametrize("cell_id", BUILD_ONLY)
def test_bundle_from_pypi_is_built_for_its_target(pip_ctx, built, cell_id):
    """The cells whose whole verification is on demand are still built in the default run."""
    check_manifest(pip_ctx.matrix.cell(cell_id), built(cell_id))


@pytest.mark.parametrize("cell_id", VERIFIED)
def test_bundle_from_pypi_installs_and_starts_offline(pip_ctx, built, cell_id):
    cell = pip_ctx.matrix.cell(cell_id)
    check_manifest(cell, built(cell_id))

    report = commands.verify_cell(pip_ctx, cell)
    assert report.ok and report.seconds_to_healthz and report.seconds_to_worker
    assert [s.name for s in report.steps] == VERIFY_STEPS
    steps = {s.name: s.output for s in report.steps}
    # the worker said it found each tool; each bundled tool ran here, built for this machine
    assert steps["tools-offline"].count("already exists, skipping download") == 3
    machine = {"amd64": "x86_64", "arm64": "aarch64"}[cell.arch]
    assert f"fastfetch 2.25.0.1 ({machine})" in steps["tools"]
    assert f"linux-{cell.arch}-" in steps["tools"] and "FAIL" not in steps["tools"]
    if cell.vendor is not None and cell.toolkit is not None:  # the stand-in tool, at the floor
        tool, backend = cell.vendor.tool[0], cell.toolkit.device.backend
        assert f'"name": "{tool}", "status": "ok"' in steps["preflight"]
        assert f'"name": "{backend}", "status": "ok"' in steps["preflight"]
        assert f"for {cell.toolkit.build}" in steps["preflight"]
    # upstream's plain start reached for the catalog and update hosts; the configured one for none
    assert {"huggingface.co", "update-service.gpustack.ai"} <= set(report.upstream["hosts"])
    assert report.egress == {"hosts_attempted": 0, "hosts": []}
    audit = json.loads((pip_ctx.dist / f"{cell_id}.egress.json").read_text())
    assert "huggingface.co" in [h["host"] for h in audit["upstream"]["hosts"]]
    saved = json.loads((pip_ctx.dist / f"{cell_id}.verify.json").read_text())
    assert saved["ok"] is True and saved["cell"] == cell_id


MODEL_STEPS = [
    "isolation", "install", "install-model", "config", "config-catalog", "start-site",
    "healthz-site", "worker-site", "ui-site", "deploy", "catalog", "deployment", "scheduled",
    "file-resolved", "model-logs", "no-download", "egress",
]  # fmt: skip


def test_a_model_bundle_beside_the_pip_bundle_is_offered_and_deployed_offline(
    pip_ctx, built, tmp_path
):
    """A tiny GGUF model (the `gguf` package's writer), bundled from the loopback hub stand-in
    through the real `huggingface_hub`, installed with install-model.sh --prefix beside the
    0.7.1 pip bundle in one clean container: GPUStack, started as install.sh configures it, lists
    the model with its local path, accepts its deployment, schedules it and resolves the file on
    its worker; nothing outside is asked. The bundle's llama-box is a stand-in, so the instance
    then ends in error: inference is not run."""
    from support.hf_hub import HubStandIn, tiny_gguf

    cell = pip_ctx.matrix.cell(CELLS[0])
    built(CELLS[0])
    (tmp_path / "models.toml").write_text(
        '[[model]]\nname = "tiny-gguf"\nsource = "huggingface"\n'
        'repository = "test-org/tiny-GGUF"\nfiles = ["tiny-Q4_K_M.gguf"]\nbackend = "llama-box"\n'
    )
    with HubStandIn() as hub:
        hub.add("test-org/tiny-GGUF", {"tiny-Q4_K_M.gguf": tiny_gguf(1, values=1024)})
        cli = {
            "models": str(tmp_path / "models.toml"),
            "model_locks_dir": str(tmp_path / "locks"),
            "dist_dir": str(pip_ctx.dist),
            "hf_endpoint": hub.url,
            "progress": False,
        }
        ctx = commands.Context.load(pip_ctx.root, cli=cli)
        (model,) = commands.build(ctx, [], ctx.models(["tiny-gguf"]))

    report = commands.verify_model(ctx, cell, model.directory)
    assert report.ok and [s.name for s in report.steps] == MODEL_STEPS
    placed = "/var/lib/gpustack/models/tiny-gguf/tiny-Q4_K_M.gguf"
    steps = {s.name: s.output for s in report.steps}
    assert "model_catalog_file:" in steps["config"]
    assert "/var/lib/gpustack/models/model-catalog.yaml" in steps["config"]
    probe = json.loads(steps["deploy"].strip().splitlines()[-1])
    assert probe["spec"]["source"] == "local_path" and probe["spec"]["local_path"] == placed
    assert probe["created"]["status"] == 200 and probe["created"]["body"]["local_path"] == placed
    assert probe["instance"]["resolved_path"] == placed and probe["instance"]["worker_id"]
    # the stand-in llama-box only answers --version: the engine fails, as expected here
    assert probe["states"][-1] == probe["instance"]["state"] == "error", probe["states"]
    assert "Inference server exited" in probe["instance"]["state_message"]
    [file] = [f for f in probe["model_files"] if f["local_path"] == placed]
    assert file["state"] == "ready" and file["resolved_paths"] == [placed]
    assert f"file resolved there at {placed} with nothing fetched" in report.note
    assert report.egress == {"hosts_attempted": 0, "hosts": []}
    saved = pip_ctx.dist / f"model-tiny-gguf.{CELLS[0]}.verify.json"
    assert json.loads(saved.read_text())["ok"] is True
    audit = json.loads(saved.with_name(saved.name.replace(".verify.", ".egress.")).read_text())
    assert audit["install+model+site"]["hosts"] == []
    print(f"\n{report.note}")


def offline_ctx(pip_ctx) -> commands.Context:
    """The same dist and cache, with every download address dead: a build that fetched one
    byte would fail."""
    dead = "http://127.0.0.1:9"
    cli = {
        "dist_dir": str(pip_ctx.dist),
        "cache_dir": str(pip_ctx.cache),
        "frozen": True,
        "progress": False,
        "index_url": f"{dead}/simple",
        "tools_base_url": dead,
        "tools_locks_dir": str(pip_ctx.layout.tools_locks),
    }
    return commands.Context.load(pip_ctx.root, cli=cli)


def test_an_unchanged_cell_is_checked_not_rebuilt_and_a_damaged_one_is_rebuilt(pip_ctx, built):
    cell_id = CELLS[0]
    folder = built(cell_id)
    tar = folder.parent / f"{cell_id}.tar"
    before = (tar.stat().st_ino, tar.stat().st_mtime_ns, (folder / "manifest.json").read_text())
    ctx = offline_ctx(pip_ctx)
    cell = ctx.matrix.cell(cell_id)

    (again,) = commands.build(ctx, [cell])
    assert again.stages.startswith("unchanged:") and "files checked" in again.stages
    assert (
        tar.stat().st_ino,
        tar.stat().st_mtime_ns,
        (folder / "manifest.json").read_text(),
    ) == before

    # a file of the finished bundle changed behind the build's back: checked, found, rebuilt
    readme = folder / "README.md"
    readme.write_text(readme.read_text() + "edited\n")
    (rebuilt,) = commands.build(pip_ctx, [cell])
    assert rebuilt.stages.startswith("rebuilt")
    assert "edited" not in (folder / "README.md").read_text()
    assert tar.stat().st_mtime_ns != before[1]
    # a changed input is named as the reason
    (folder.parent / f".{cell_id}.build.json").write_text(
        (folder.parent / f".{cell_id}.build.json").read_text().replace('"tool": "', '"tool": "0')
    )
    (third,) = commands.build(pip_ctx, [cell])
    assert third.stages == "rebuilt: tool"


def test_a_pip_bundle_is_on_disk_once_beyond_the_cache(pip_ctx, built):
    """Peak extra disk of a build (its end: nothing is deleted after the tar): the wheels and
    the tools archive are hard links into the cache, the tar the one copy."""
    folder = built(CELLS[0])
    tar = folder.with_name(f"{CELLS[0]}.tar")
    extra = extra_disk([folder, tar], pip_ctx.cache)
    ratio = extra / tar.stat().st_size
    print(f"\npeak extra disk {extra} bytes, bundle tar {tar.stat().st_size}: {ratio:.3f}x")
    assert ratio <= 1.1


def test_verification_names_a_damaged_file_and_fails(pip_ctx, built, tmp_path):
    cell_id = CELLS[0]
    damaged = tmp_path / "dist" / cell_id
    shutil.copytree(built(cell_id), damaged)
    victim = sorted((damaged / "wheels").glob("six-*.whl"))[0]
    victim.write_bytes(victim.read_bytes()[:-10])
    damaged_ctx = commands.Context.load(pip_ctx.root, cli={"dist_dir": str(tmp_path / "dist")})
    with pytest.raises(VerifyError) as err:
        commands.verify_cell(damaged_ctx, damaged_ctx.matrix.cell(cell_id))
    assert "step 'sums'" in str(err.value) and victim.name in str(err.value)


def resum(bundle: Path) -> None:
    """Re-write SHA256SUMS after a deliberate change, so that only the change is tested."""
    lines = []
    for path in sorted(p for p in bundle.rglob("*") if p.is_file() and p.name != "SHA256SUMS"):
        lines.append(f"{sha256_file(path)}  {path.relative_to(bundle)}\n")
    (bundle / "SHA256SUMS").write_text("".join(lines))


def test_a_worker_that_reaches_for_a_tool_fails_verification(pip_ctx, built, tmp_path):
    """Upstream's own archive, unfixed: llama-box under the build host's folder name."""
    cell_id = CELLS[0]
    bundle = tmp_path / "dist" / cell_id
    shutil.copytree(built(cell_id), bundle)
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
    damaged_ctx = commands.Context.load(pip_ctx.root, cli={"dist_dir": str(tmp_path / "dist")})
    with pytest.raises(VerifyError) as err:
        commands.verify_cell(damaged_ctx, damaged_ctx.matrix.cell(cell_id))
    assert "tried to download tools at start" in str(err.value)
    assert "Downloading" in str(err.value)


def test_windows_and_other_python_cells_are_reported_unverifiable(pip_ctx):
    for cell_id in (
        "v0.7.1-windows-amd64-cpu-py3.11-base-pip",
        "v0.7.1-linux-amd64-cpu-py3.12-base-pip",
    ):
        with pytest.raises(Unverifiable, match="cannot|no clean"):
            commands.verify_cell(pip_ctx, pip_ctx.matrix.cell(cell_id))


def test_sdists_build_pure_here_and_native_in_a_target_container(pip_ctx, tmp_path):
    """wget is pure Python; crcmod has a C extension and must be compiled for aarch64."""
    cell = pip_ctx.matrix.cell("v0.7.1-linux-arm64-cpu-py3.11-base-pip")
    inputs = Inputs(("wget==3.2", "crcmod==1.7"), platform=cell.uv_platform, python=cell.python,
                    index_url=pip_ctx.opts.index_url)  # fmt: skip
    lock = read_lock(make_lock(cell, inputs, tmp_path, pip_ctx.cache))
    wheels = {
        w.name: w
        for w in wheelhouse(
            cell, lock, pip_ctx.cache, (), pip_ctx.opts.index_url, show_progress=False
        )
    }
    assert wheels["wget"].built and wheels["wget"].filename.endswith("-py3-none-any.whl")
    assert wheels["crcmod"].built and wheels["crcmod"].filename.endswith("linux_aarch64.whl")
    assert "built from https://" in wheels["crcmod"].origin
    # the native wheel really is aarch64 code: import its extension in an arm64 container
    with containers.container(
        containers.base_image("arm64", pip_ctx.cache), mounts={wheels["crcmod"].path.parent: "/w"}
    ) as box:
        code, out = containers.exec_in(box, ["sh", "-c",
            "python3 -m venv /v && /v/bin/pip install -q --no-index /w/*.whl && "
            "/v/bin/python -c 'import crcmod._crcfunext, platform; print(platform.machine())'",
        ])  # fmt: skip
    assert code == 0 and "aarch64" in out, out


def test_cuda_gate_refuses_torch_built_for_cuda13_on_a_cuda12_cell(pip_ctx, tmp_path):
    cell = pip_ctx.matrix.cell("v0.7.1-linux-amd64-cuda12.4-py3.11-audio-pip")
    inputs = Inputs(("torch==2.11.0",), platform=cell.uv_platform, python=cell.python,
                    index_url=pip_ctx.opts.index_url)  # fmt: skip
    lock = read_lock(make_lock(cell, inputs, tmp_path, pip_ctx.cache))
    with pytest.raises(CudaGateError) as err:
        wheelhouse(cell, lock, pip_ctx.cache, (), pip_ctx.opts.index_url, show_progress=False)
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
