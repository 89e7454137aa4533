"""GPUStack 2.x bundles for every accelerator backend of upstream's runner data, on the target:
scripts/preflight.sh per vendor and the worker line scripts/install.sh prints, run for real with
bash.

Each bundle is written from a real cell of the matrix (its bundle.env and worker options are the
build's own, `bundle.assemble`). What this host lacks stands in for the real thing: the vendor's
device tool (`gpustack_offline/payload/fakes/`: the real tools' output formats, reporting the
version a test asks for), Docker (a stand-in `docker` that answers what the scripts ask; this
host's engine cannot register a vendor's container runtime), and the host's device nodes,
driver folders and version files (a host root, PREFLIGHT_HOST_ROOT). The real Docker Engine
path is tested in test_scripts_docker.py.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_scripts import HOST_ARCH, check, run_script, write_sha256sums
from test_scripts_docker import make_docker_bundle, run_line

from gpustack_offline import payload
from gpustack_offline.bundle.assemble import WORKER_OPTIONS, bundle_env
from gpustack_offline.core.matrix import Cell, Matrix
from gpustack_offline.verify.standins import write_host

FAKES = payload.path("fakes")
SERVER = "gpustack/gpustack:v2.3.0"

STAND_IN_DOCKER = """\
#!/bin/sh
# Stand-in for the docker CLI: the calls preflight.sh and install.sh make, a daemon that answers.
case "$1" in
  version) echo "28.2.2" ;;
  info) printf '%s\\n%s\\n%s\\n%s\\n' "$FAKE_DOCKER_ROOT" cgroupfs "$FAKE_DOCKER_RUNTIMES" \\
    "${{FAKE_DOCKER_DEFAULT_RUNTIME:-runc}}" ;;
  load) cat >/dev/null; echo "Loaded image: {server}" ;;
  image) echo "sha256:0123456789abcdef linux/{arch}" ;;
  run) exit 1 ;;
  *) echo "stand-in docker: $*" >&2; exit 2 ;;
esac
"""


@dataclass(frozen=True)
class Host:
    """A backend's cell and how this test's host reports its version: the device tool's
    environment, or the version file upstream's detector reads."""

    cell: str
    floor_env: dict[str, str]  # FAKE_* for the stand-in tool, at the floor
    version_file: tuple[str, str] | None = None  # (path, content with {v}: the version)


# One cell per backend (2.3.0, on this host's arch where upstream has runners for it).
HOSTS = {
    "cuda": Host(f"v2.3.0-linux-{HOST_ARCH}-cuda12.8-py3.11-vllm-docker", {}),
    "cann": Host(
        f"v2.3.0-linux-{HOST_ARCH}-cann8.2-910b-py3.11-vllm-docker",
        {"FAKE_NPU_NAME": "910B3"},
        ("/usr/local/Ascend/ascend-toolkit/latest/runtime/version.info", "Version={v}.RC1\n"),
    ),
    "rocm": Host(
        "v2.3.0-linux-amd64-rocm7.0-py3.11-vllm-docker",
        {},
        ("/opt/rocm/.info/version", "{v}.2-56\n"),
    ),
    "dtk": Host(
        "v2.3.0-linux-amd64-dtk25.04-py3.11-vllm-docker", {}, ("/opt/dtk/.info/version", "{v}.3\n")
    ),
    "maca": Host("v2.3.0-linux-amd64-maca3.0-py3.11-vllm-docker", {}),
    "musa": Host("v2.3.0-linux-amd64-musa4.1-py3.11-vllm-docker", {}),
    "corex": Host("v2.3.0-linux-amd64-corex4.2-py3.11-vllm-docker", {}),
    "hggc": Host("v2.3.0-linux-amd64-hggc12.3-py3.11-vllm-docker", {}),
}
TOOL_VERSION = {"maca": "{v}.1.18", "corex": "{v}.0", "hggc": "{v}"}  # FAKE_DEVICE_VERSION


def native(backend: str) -> bool:
    return f"-linux-{HOST_ARCH}-" in HOSTS[backend].cell


@pytest.fixture(scope="module")
def cells(root: Path) -> dict[str, Cell]:
    matrix = Matrix.load(root / "bundles" / "matrix.toml")
    return {b: matrix.cell(h.cell) for b, h in HOSTS.items() if native(b)}


@dataclass
class Site:
    bundle: Path
    host: Path  # PREFLIGHT_HOST_ROOT
    bin: Path  # the stand-ins, first on PATH
    env: dict[str, str]

    def run(self, script: str, *args: str) -> subprocess.CompletedProcess[str]:
        return run_script(self.bundle, script, *args, path_prepend=self.bin, extra_env=self.env)

    def preflight(self) -> tuple[int, dict]:
        proc = self.run("preflight.sh", "--json")
        assert proc.stdout.count("\n") == 1, proc.stdout + proc.stderr
        return proc.returncode, json.loads(proc.stdout)


def make_site(tmp_path: Path, cell: Cell, version: str | None = None) -> Site:
    """A bundle of `cell` as the build writes its bundle.env and worker options, on a host that
    has the cell's device tool, runtime, device nodes and folders, with `version` of its backend
    (the cell's floor by default)."""
    assert cell.runner_device is not None and cell.vendor is not None
    backend, vendor = cell.runner_device.backend, cell.vendor
    version = version or cell.runner_device.version
    archive = tmp_path / "archive"
    archive.mkdir(parents=True)
    (archive / "manifest.json").write_text("[]\n")
    env = {**bundle_env(cell), "IMAGE_ARCHIVE": "images", "IMAGES": SERVER}
    bundle = make_docker_bundle(tmp_path, archive, images=SERVER, **env)
    if env["WORKER_OPTIONS"]:
        (bundle / WORKER_OPTIONS).write_text("".join(f"{o}\n" for o in cell.worker_options()))
        write_sha256sums(bundle)
    host = tmp_path / "host"
    write_host(host, vendor)
    where = HOSTS[backend].version_file
    if where:
        (host / where[0].lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (host / where[0].lstrip("/")).write_text(where[1].format(v=version))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / vendor.tool[0]).symlink_to(FAKES / vendor.tool[0])
    docker_root = tmp_path / "docker-root"
    docker_root.mkdir()
    (bindir / "docker").write_text(STAND_IN_DOCKER.format(server=SERVER, arch=cell.arch))
    (bindir / "docker").chmod(0o755)
    fake = {
        "PREFLIGHT_HOST_ROOT": str(host),
        "FAKE_DOCKER_ROOT": str(docker_root),
        "FAKE_DOCKER_RUNTIMES": f"io.containerd.runc.v2 runc {vendor.runtime}".strip(),
        "FAKE_NVIDIA_CUDA": version,
        "FAKE_DEVICE_VERSION": TOOL_VERSION.get(backend, "{v}").format(v=version),
        **HOSTS[backend].floor_env,
    }
    return Site(bundle, host, bindir, fake)


def failed(report: dict) -> list[dict]:
    return [c for c in report["checks"] if c["status"] == "fail"]


def version_check(backend: str) -> str:
    return "cuda-driver" if backend == "cuda" else backend


BACKENDS = [b for b in HOSTS if native(b)]


# ---------------------------------------------------------------------------------------------
# preflight.sh


@pytest.mark.parametrize("backend", BACKENDS)
def test_preflight_passes_a_host_at_the_floor_with_the_vendors_tool_runtime_and_devices(
    tmp_path: Path, cells: dict[str, Cell], backend: str
) -> None:
    cell = cells[backend]
    site = make_site(tmp_path, cell)

    code, report = site.preflight()

    assert code == 0, failed(report)
    names = [c["name"] for c in report["checks"]]
    assert version_check(backend) in names
    assert {"python", "glibc", "nvcc"}.isdisjoint(names)
    assert cell.vendor is not None
    if cell.vendor.runtime:
        assert check(report, f"{cell.vendor.runtime}-runtime")["status"] == "ok"
    if cell.vendor.devices:
        assert check(report, f"{backend}-devices")["status"] == "ok"
    if cell.vendor.version and cell.runner_device is not None:
        detail = check(report, version_check(backend))["detail"]
        assert f"need >= {cell.runner_device.version}" in detail


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "musa"])
def test_preflight_refuses_a_version_below_the_floor_in_one_line_naming_it(
    tmp_path: Path, cells: dict[str, Cell], backend: str
) -> None:
    cell = cells[backend]
    assert cell.runner_device is not None
    floor = cell.runner_device.version
    major, minor = floor.split(".")
    below = f"{major}.{int(minor) - 1}" if int(minor) else f"{int(major) - 1}.9"
    site = make_site(tmp_path, cell, below)

    code, report = site.preflight()

    assert code == 1
    (fail,) = failed(report)
    assert fail["name"] == version_check(backend)
    assert below in fail["detail"] and floor in fail["detail"] and "older than" in fail["detail"]
    assert "\n" not in fail["detail"] and fail["fix"]
    assert cell.vendor is not None
    if cell.vendor.version in ("mx-smi", "ixsmi", "ppu-smi"):  # read from the tool's header
        assert f"({cell.vendor.tool[0]}'s " in fail["detail"], fail
    proc = site.run("preflight.sh")
    assert [line for line in proc.stdout.splitlines() if line.startswith("[fail]")] == [
        f"[fail] {fail['name']:<{len(max((c['name'] for c in report['checks']), key=len))}}  "
        f"{fail['detail']}"
    ]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b not in ("musa", "corex")])
def test_preflight_refuses_a_host_whose_worker_would_ask_for_another_runner(
    tmp_path: Path, cells: dict[str, Cell], backend: str
) -> None:
    cell = cells[backend]
    assert cell.ceiling is not None, cell.id  # these cells are not their backend's newest
    site = make_site(tmp_path, cell, cell.ceiling)

    code, report = site.preflight()

    assert code == 1
    (fail,) = failed(report)
    assert fail["name"] == version_check(backend)
    assert f"{backend}{cell.ceiling} or newer" in fail["detail"], fail


def test_preflight_names_the_missing_device_tool(tmp_path: Path, cells: dict[str, Cell]) -> None:
    site = make_site(tmp_path, cells["maca"] if "maca" in cells else cells["cann"])
    tool = next(site.bin.glob("*-smi"))
    tool.unlink()

    code, report = site.preflight()

    assert code == 1
    fail = check(report, tool.name)
    assert fail["status"] == "fail" and f"{tool.name} not found" in fail["detail"]


@pytest.mark.parametrize("backend", [b for b in ("cann", "rocm", "musa", "corex") if native(b)])
def test_preflight_names_the_vendors_container_runtime_docker_lacks(
    tmp_path: Path, cells: dict[str, Cell], backend: str
) -> None:
    site = make_site(tmp_path, cells[backend])
    site.env["FAKE_DOCKER_RUNTIMES"] = "io.containerd.runc.v2 runc"
    runtime = cells[backend].vendor.runtime  # type: ignore[union-attr]

    code, report = site.preflight()

    assert code == 1
    (fail,) = failed(report)
    assert fail["name"] == f"{runtime}-runtime"
    assert f"--runtime {runtime}" in fail["detail"] and "runc" in fail["detail"]


def test_preflight_names_missing_ascend_device_nodes_and_driver(
    tmp_path: Path, cells: dict[str, Cell]
) -> None:
    site = make_site(tmp_path, cells["cann"])
    (site.host / "dev/hisi_hdc").unlink()
    (site.host / "dev/davinci0").unlink()
    (site.host / "usr/local/Ascend/driver").rmdir()

    code, report = site.preflight()

    assert code == 1
    assert [c["name"] for c in failed(report)] == ["cann-devices", "cann-paths"]
    assert "/dev/hisi_hdc, /dev/davinci[0-9]*" in check(report, "cann-devices")["detail"]
    assert "/usr/local/Ascend/driver" in check(report, "cann-paths")["detail"]


def test_preflight_refuses_npus_of_another_variant_naming_the_bundle_to_use(
    tmp_path: Path, cells: dict[str, Cell]
) -> None:
    site = make_site(tmp_path, cells["cann"])
    site.env["FAKE_NPU_NAME"] = "310P3"

    code, report = site.preflight()

    assert code == 1
    (fail,) = failed(report)
    assert fail["name"] == "npu-variant" and "310P3 (310p)" in fail["detail"]
    assert "cann8.2-310p" in fail["fix"]


def test_without_a_cann_toolkit_only_the_newest_cann_bundle_passes(
    tmp_path: Path, root: Path
) -> None:
    matrix = Matrix.load(root / "bundles" / "matrix.toml")
    old = make_site(tmp_path / "old", matrix.cell(HOSTS["cann"].cell))
    newest = matrix.cell(f"v2.3.0-linux-{HOST_ARCH}-cann9.2-910b-py3.11-vllm-docker")
    new = make_site(tmp_path / "new", newest)
    for site in (old, new):
        toolkit = site.host / "usr/local/Ascend/ascend-toolkit/latest/runtime/version.info"
        toolkit.unlink()

    code, report = old.preflight()
    assert code == 1
    assert "asks for the newest CANN runner (cann9.2-910b)" in check(report, "cann")["detail"]
    code, report = new.preflight()
    assert code == 0 and check(report, "cann")["status"] == "warn"


def test_musas_version_is_not_compared_as_upstream_reads_none(
    tmp_path: Path, cells: dict[str, Cell]
) -> None:
    if "musa" not in cells:
        pytest.skip("upstream has MUSA runners for linux/amd64 only")
    code, report = make_site(tmp_path, cells["musa"]).preflight()
    assert code == 0
    assert check(report, "musa")["detail"].startswith("not compared: upstream's detector reads no")


# ---------------------------------------------------------------------------------------------
# install.sh: the worker line


@pytest.mark.parametrize("backend", BACKENDS)
def test_install_runs_preflight_and_prints_the_vendors_worker_line(
    tmp_path: Path, cells: dict[str, Cell], backend: str
) -> None:
    cell = cells[backend]
    site = make_site(tmp_path, cell)

    proc = site.run("install.sh", "--prefix", str(tmp_path / "prefix"))

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "preflight: passed" in proc.stdout
    worker = proc.stdout[proc.stdout.index("a worker (its token") :]
    line = " ".join(run_line(worker))
    assert line.startswith("docker run -d --name gpustack-worker")
    assert '-e "GPUSTACK_RUNTIME_DEPLOY_MIRRORED_NAME=gpustack-worker"' in line
    for option in cell.worker_options():
        assert option in line, option
    assert line.index(cell.worker_options()[-1]) < line.index(SERVER)
    if backend == "cann":
        assert "--volume /usr/local/Ascend/driver:/usr/local/Ascend/driver:ro" in line
        assert (
            "--runtime ascend" in line and "ASCEND_VISIBLE_DEVICES=$(sudo ls /dev/davinci*" in line
        )


# ---------------------------------------------------------------------------------------------
# The data and the scripts agree


def test_every_backend_has_its_version_reader_in_preflight_and_a_stand_in_tool(root: Path) -> None:
    matrix = Matrix.load(root / "bundles" / "matrix.toml")
    text = (root / "scripts" / "preflight.sh").read_text()
    lines = [v for v in matrix.vendors.values()]
    lines += [v.line0 for v in matrix.vendors.values() if v.line0]  # GPUStack 0.x's
    for vendor in lines:
        if vendor.version and vendor.backend != "cuda":  # cuda: check_nvidia_driver
            assert f"version_{vendor.version.replace('-', '_')}() {{" in text, vendor.backend
        assert (FAKES / vendor.tool[0]).is_file(), vendor.tool


def test_every_cells_bundle_env_is_one_word_per_value_and_names_its_device(root: Path) -> None:
    """bundle.env is read by sh (and PowerShell): no value may hold a space; what needs one (the
    worker's options) is in worker-options.txt."""
    matrix = Matrix.load(root / "bundles" / "matrix.toml")
    for cell in matrix.cells:
        env = bundle_env(cell)
        assert not [k for k, v in env.items() if " " in v], cell.id
        if cell.series == 2:
            assert env["DEVICE_BACKEND"] and env["DEVICE_FLOOR"] and env["WORKER_OPTIONS"]
            assert cell.device.startswith(env["DEVICE_BACKEND"] + env["DEVICE_FLOOR"])
        else:  # 0.x: vendor devices name their backend and build (test_scripts_devices0.py),
            # and a vendor's image the options of upstream's line for it
            assert bool(env["DEVICE_BACKEND"]) == (cell.vendor is not None), cell.id
            assert bool(env["WORKER_OPTIONS"]) == bool(cell.vendor and cell.image), cell.id
