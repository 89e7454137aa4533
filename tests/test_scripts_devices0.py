"""GPUStack 0.x bundles of an Ascend, AMD, Moore Threads or Hygon device, on the target:
scripts/preflight.sh checks the vendor's device tool (as GPUStack 0.x's docs and detection run
it), the host's toolkit against the llama-box build the bundle carries (pip), the Ascend chip
that build is for, device nodes and toolkit folders, run for real with bash.

Each bundle.env holds the device keys the build writes for a real cell of the matrix
(`bundle.assemble.device_env`); the vendor's tool is the stand-in of payload/fakes/ (its real
output format), and the host's device nodes, folders and version files are a host root
(PREFLIGHT_HOST_ROOT), as in test_scripts_devices.py for 2.x.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_scripts import HOST_ARCH, build_gpustack_wheel, check, make_bundle, run_script
from test_scripts_devices import FAKES, STAND_IN_DOCKER, failed
from test_scripts_docker import make_2x_bundle, run_line

from gpustack_offline.bundle.assemble import DEVICE_KEYS, device_env
from gpustack_offline.core.matrix import Cell, Matrix

# The host's toolkit version file of each backend, where upstream's detector reads it ({v}: the
# version as the vendor writes it there).
VERSION_FILES = {
    "cann": ("/usr/local/Ascend/ascend-toolkit/latest/runtime/version.info", "Version={v}\n"),
    "rocm": ("/opt/rocm/.info/version", "{v}.4-100\n"),
    "dtk": ("/opt/dtk/.info/version", "{v}.1\n"),
}
# One 0.7.1 pip cell per backend, on this host's arch where llama-box builds it.
CELLS = {
    "cann": f"v0.7.1-linux-{HOST_ARCH}-cann8.2.rc1-910b-py3.11-base-pip",
    "rocm": "v0.7.1-linux-amd64-rocm6.2-py3.11-base-pip",
    "dtk": "v0.7.1-linux-amd64-dtk25.04-py3.11-base-pip",
    "musa": "v0.7.1-linux-amd64-musarc4.2-py3.11-base-pip",
}
BACKENDS = [b for b, c in CELLS.items() if f"-linux-{HOST_ARCH}-" in c]


@pytest.fixture(scope="module")
def matrix(root: Path) -> Matrix:
    return Matrix.load(root / "bundles" / "matrix.toml")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_gpustack_wheel(tmp_path_factory.mktemp("wheel"))


@dataclass
class Site:
    bundle: Path
    host: Path  # PREFLIGHT_HOST_ROOT
    bin: Path  # the stand-ins, first on PATH
    env: dict[str, str]

    def preflight(self) -> tuple[int, dict]:
        proc = run_script(
            self.bundle, "preflight.sh", "--json", "--prefix", str(self.host / "prefix"),
            path_prepend=self.bin, extra_env=self.env,
        )  # fmt: skip
        assert proc.stdout.count("\n") == 1, proc.stdout + proc.stderr
        return proc.returncode, json.loads(proc.stdout)


def toolkit_version(cell: Cell) -> str:
    """The cell's toolkit version as the vendor writes it (CANN: 8.2.RC1)."""
    assert cell.toolkit is not None
    return cell.toolkit.device.version.replace(".rc", ".RC")


def make_site(
    tmp_path: Path, wheel: Path, cell: Cell, version: str | None = None, chip: str = ""
) -> Site:
    """A pip bundle of `cell` as the build writes its device keys, on a host with the vendor's
    tool, device nodes and folders, and `version` of its toolkit (the cell's by default)."""
    assert cell.vendor is not None and cell.toolkit is not None
    vendor, backend = cell.vendor, cell.toolkit.device.backend
    env = {k: v for k, v in device_env(cell).items() if k in DEVICE_KEYS}
    env.update(TARGET_DEVICE=cell.device, BUNDLE_CELL=cell.id)
    bundle = make_bundle(tmp_path, wheel, **env)  # type: ignore[arg-type]  # all str values
    host = tmp_path / "host"
    for pattern in vendor.devices:
        node = host / re.sub(r"\[0-9\]\*", "0", pattern).replace("*", "128").lstrip("/")
        node.parent.mkdir(parents=True, exist_ok=True)
        node.write_text("")
    for folder in vendor.paths:
        (host / folder.lstrip("/")).mkdir(parents=True, exist_ok=True)
    if backend in VERSION_FILES:
        path, text = VERSION_FILES[backend]
        (host / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (host / path.lstrip("/")).write_text(text.format(v=version or toolkit_version(cell)))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / vendor.tool[0]).symlink_to(FAKES / vendor.tool[0])
    names = {"310p": "310P3", "910b": "910B3"}
    fake = {"PREFLIGHT_HOST_ROOT": str(host)}
    fake["FAKE_NPU_NAME"] = chip or names.get(cell.toolkit.device.variant, "910B3")
    return Site(bundle, host, bindir, fake)


@pytest.mark.parametrize("backend", BACKENDS)
def test_preflight_passes_a_0x_host_with_the_toolkit_of_the_bundles_llama_box_build(
    tmp_path: Path, wheel: Path, matrix: Matrix, backend: str
) -> None:
    cell = matrix.cell(CELLS[backend])
    site = make_site(tmp_path, wheel, cell)

    code, report = site.preflight()

    assert code == 0, failed(report)
    assert cell.vendor is not None and cell.toolkit is not None
    assert check(report, cell.vendor.tool[0])["status"] == "ok"
    detail = check(report, backend)["detail"]
    if backend == "musa":  # upstream reads no MUSA version: said, not compared
        assert check(report, backend)["status"] == "warn" and "musa-rc4.2" in detail
    else:
        assert f"need >= {cell.toolkit.device.version} for {cell.toolkit.build}" in detail
    names = [c["name"] for c in report["checks"]]
    assert "python" in names and "nvidia-smi" not in names
    assert not [n for n in names if n.endswith("-runtime")]  # a pip install runs no container


@pytest.mark.parametrize(
    ("backend", "older"), [("cann", "8.1.RC1"), ("rocm", "6.1"), ("dtk", "24.04")]
)
def test_preflight_refuses_a_toolkit_older_than_the_build_in_one_line_naming_it(
    tmp_path: Path, wheel: Path, matrix: Matrix, backend: str, older: str
) -> None:
    if backend not in BACKENDS:
        pytest.skip(f"llama-box builds {backend} for linux/amd64 only")
    cell = matrix.cell(CELLS[backend])
    assert cell.vendor is not None and cell.toolkit is not None
    site = make_site(tmp_path, wheel, cell, older)

    code, report = site.preflight()

    assert code == 1
    (fail,) = failed(report)
    tk = cell.vendor.toolkit
    brief = ".".join(older.split(".")[:2])
    assert fail["name"] == backend
    assert fail["detail"].startswith(f"{tk} {brief} (")
    assert f"older than {tk} {cell.toolkit.device.version}" in fail["detail"]
    assert cell.toolkit.build in fail["detail"] and "\n" not in fail["detail"]
    proc = run_script(
        site.bundle, "preflight.sh", "--prefix", str(site.host / "prefix"),
        path_prepend=site.bin, extra_env=site.env,
    )  # fmt: skip
    assert [line for line in proc.stdout.splitlines() if line.startswith("[fail]")] == [
        f"[fail] {fail['name']:<{max(len(c['name']) for c in report['checks'])}}  {fail['detail']}"
    ]


def test_preflight_refuses_a_0x_host_without_the_cann_toolkit(
    tmp_path: Path, wheel: Path, matrix: Matrix
) -> None:
    site = make_site(tmp_path, wheel, matrix.cell(CELLS["cann"]))
    (site.host / VERSION_FILES["cann"][0].lstrip("/")).unlink()

    code, report = site.preflight()

    assert code == 1
    (fail,) = failed(report)
    assert fail["name"] == "cann" and fail["detail"].startswith("no CANN found")
    assert "cann-8.2.rc1" in fail["detail"]


@pytest.mark.parametrize(
    ("cell_id", "chip", "other"),
    [
        (CELLS["cann"], "310P3", "cann8.2.rc1-310p"),
        (f"v0.7.1-linux-{HOST_ARCH}-cann8.2.rc1-310p-py3.11-base-pip", "910B4", "cann8.2.rc1-910b"),
    ],
)
def test_preflight_refuses_npus_the_llama_box_build_is_not_for(
    tmp_path: Path, wheel: Path, matrix: Matrix, cell_id: str, chip: str, other: str
) -> None:
    site = make_site(tmp_path, wheel, matrix.cell(cell_id), chip=chip)

    code, report = site.preflight()

    assert code == 1
    (fail,) = failed(report)
    assert fail["name"] == "npu-variant" and chip in fail["detail"]
    assert "llama-box build" in fail["detail"] and other in fail["fix"]


def test_a_0x_image_carries_its_toolkit_so_only_the_device_is_checked(
    tmp_path: Path, wheel: Path, matrix: Matrix
) -> None:
    """A docker bundle's bundle.env names the device too: the image brings CANN, so the host's
    toolkit is not compared, its chips and device nodes are."""
    cell = matrix.cell(f"v0.7.1-linux-{HOST_ARCH}-cann8.2.rc1-310p-py3.11-base-docker")
    env = device_env(cell)
    assert env["DEVICE_BUILD"] == "cann-8.2.rc1-310p" and env["DEVICE_RUNTIME"] == ""
    assert env["DEVICE_VERSION_READER"] == "cann" and env["DEVICE_FLOOR"] == "8.2.rc1"


def test_every_0x_vendor_cell_names_its_device_and_build_in_bundle_env(matrix: Matrix) -> None:
    for cell in matrix.cells:
        if cell.series != 0:
            continue
        env = device_env(cell)
        if cell.vendor is None:  # cpu and CUDA keep their own checks
            assert not any(env.values()), cell.id
            continue
        assert cell.toolkit is not None
        assert (env["DEVICE_BACKEND"], env["DEVICE_BUILD"]) == (
            cell.toolkit.device.backend, cell.toolkit.build
        )  # fmt: skip
        assert cell.device == cell.toolkit.device.name
        assert bool(env["WORKER_OPTIONS"]) == (cell.image is not None), cell.id
        assert (FAKES / cell.vendor.tool[0]).is_file(), cell.vendor.tool


# ---------------------------------------------------------------------------------------------
# Docker bundles: upstream's image, started with upstream's line for the device

# One 0.7.1 docker cell per backend, on this host's arch where upstream publishes the image.
DOCKER_CELLS = {
    "cann": f"v0.7.1-linux-{HOST_ARCH}-cann8.2.rc1-910b-py3.11-base-docker",
    "rocm": "v0.7.1-linux-amd64-rocm6.2-py3.11-base-docker",
    "dtk": "v0.7.1-linux-amd64-dtk25.04-py3.11-base-docker",
    "musa": "v0.7.1-linux-amd64-musarc4.2-py3.11-base-docker",
}
DOCKER_BACKENDS = [b for b, c in DOCKER_CELLS.items() if f"-linux-{HOST_ARCH}-" in c]


def image_of(cell: Cell) -> str:
    assert cell.image is not None
    return f"gpustack/gpustack:v{cell.version}{cell.image.tag}"


def make_docker_site(tmp_path: Path, cell: Cell) -> Site:
    """A docker bundle of `cell` as the build writes its bundle.env and run options, on a host
    with the vendor's tool, the device nodes and paths upstream's line names, and the vendor's
    runtime (where the line relies on one) as Docker's default; Docker is the stand-in of
    test_scripts_devices.py (this host's engine cannot register a vendor's runtime)."""
    assert cell.vendor is not None and cell.toolkit is not None
    vendor = cell.vendor
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "manifest.json").write_text("[]\n")
    bundle = make_2x_bundle(tmp_path, archive, cell, images=image_of(cell))
    host = tmp_path / "host"
    for path in (*vendor.devices, *vendor.paths):  # files; a folder where the line says so
        (host / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        if path.endswith("/"):
            (host / path.lstrip("/")).mkdir()
        else:
            (host / path.lstrip("/")).write_text("")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / vendor.tool[0]).symlink_to(FAKES / vendor.tool[0])
    (bindir / "docker").write_text(STAND_IN_DOCKER.format(server=image_of(cell), arch=HOST_ARCH))
    (bindir / "docker").chmod(0o755)
    (tmp_path / "docker-root").mkdir()
    env = {
        "PREFLIGHT_HOST_ROOT": str(host),
        "FAKE_DOCKER_ROOT": str(tmp_path / "docker-root"),
        "FAKE_DOCKER_RUNTIMES": f"io.containerd.runc.v2 runc {vendor.runtime}".strip(),
        "FAKE_DOCKER_DEFAULT_RUNTIME": vendor.runtime or "runc",
        "FAKE_NPU_NAME": "310P3" if cell.toolkit.device.variant == "310p" else "910B3",
    }
    return Site(bundle, host, bindir, env)


@pytest.mark.parametrize("backend", DOCKER_BACKENDS)
def test_install_checks_and_prints_upstreams_docker_line_for_the_vendors_image(
    tmp_path: Path, matrix: Matrix, backend: str
) -> None:
    cell = matrix.cell(DOCKER_CELLS[backend])
    site = make_docker_site(tmp_path, cell)
    prefix = tmp_path / "prefix"

    proc = run_script(
        site.bundle, "install.sh", "--prefix", str(prefix), path_prepend=site.bin,
        extra_env=site.env,
    )  # fmt: skip

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "preflight: passed" in proc.stdout
    assert f"upstream's line for {cell.device}" in proc.stdout
    options = [w for o in cell.worker_options() for w in shlex.split(o)]
    assert run_line(proc.stdout) == [
        "docker", "run", "-d", "--name", "gpustack", "--restart=unless-stopped", *options,
        "-v", "gpustack-data:/var/lib/gpustack", "--env-file", str(prefix / "docker.env"),
        "--pull", "never", image_of(cell),
    ]  # fmt: skip
    assert run_line((prefix / "run-line.txt").read_text()) == run_line(proc.stdout)
    code, report = site.preflight()
    assert code == 0, failed(report)
    assert cell.vendor is not None
    if cell.vendor.devices:
        assert check(report, f"{backend}-devices")["detail"] == ", ".join(cell.vendor.devices)
    if cell.vendor.runtime:
        assert check(report, f"{cell.vendor.runtime}-runtime")["status"] == "ok"


@pytest.mark.parametrize(
    ("backend", "missing", "name"),
    [
        ("cann", "/dev/davinci0", "cann-devices"),
        ("cann", "/usr/local/bin/npu-smi", "cann-paths"),
        ("rocm", "/dev/kfd", "rocm-devices"),
        ("dtk", "/opt/hyhal", "dtk-paths"),
    ],
)
def test_preflight_names_what_upstreams_docker_line_passes_in_and_the_host_lacks(
    tmp_path: Path, matrix: Matrix, backend: str, missing: str, name: str
) -> None:
    if backend not in DOCKER_BACKENDS:
        pytest.skip(f"upstream publishes the {backend} image for linux/amd64 only")
    site = make_docker_site(tmp_path, matrix.cell(DOCKER_CELLS[backend]))
    (site.host / missing.lstrip("/")).unlink()

    code, report = site.preflight()

    assert code == 1
    (fail,) = failed(report)
    assert fail["name"] == name and f"missing: {missing};" in fail["detail"]
    assert "the run line" in fail["detail"] and "\n" not in fail["detail"] and fail["fix"]


@pytest.mark.parametrize(
    ("runtimes", "default", "says"),
    [
        ("io.containerd.runc.v2 runc mthreads", "runc", "its default runtime is runc"),
        ("io.containerd.runc.v2 runc", "runc", "the mthreads runtime is not registered"),
    ],
)
def test_a_0x_musa_image_needs_the_mthreads_runtime_as_dockers_default(
    tmp_path: Path, matrix: Matrix, runtimes: str, default: str, says: str
) -> None:
    """Upstream's line for the -musa image names no --runtime: the MT Container Toolkit must be
    Docker's default runtime, as upstream's docs say."""
    if "musa" not in DOCKER_BACKENDS:
        pytest.skip("upstream publishes the 0.7.1 musa image for linux/amd64 only")
    site = make_docker_site(tmp_path, matrix.cell(DOCKER_CELLS["musa"]))
    site.env.update(FAKE_DOCKER_RUNTIMES=runtimes, FAKE_DOCKER_DEFAULT_RUNTIME=default)

    code, report = site.preflight()

    assert code == 1
    (fail,) = failed(report)
    assert fail["name"] == "mthreads-runtime" and says in fail["detail"]
    assert '"default-runtime": "mthreads"' in fail["fix"]
    proc = run_script(
        site.bundle, "install.sh", "--prefix", str(tmp_path / "prefix"), path_prepend=site.bin,
        extra_env=site.env,
    )  # fmt: skip
    assert proc.returncode == 4 and "[fail] mthreads-runtime" in proc.stdout
