from __future__ import annotations

import pytest

from gpustack_offline.core.errors import CudaGateError, WheelError
from gpustack_offline.stages import targets
from gpustack_offline.stages.locks import Lock, LockedFile, LockedPackage
from gpustack_offline.stages.wheels import (
    Wheel,
    check_tags,
    cuda_gate,
    plan,
    requirements_txt,
    simple_index,
)

URL = "https://files.example/"


def pkg(name, version, *wheels, sdist=None, marker=None):
    files = tuple(LockedFile(URL + w, f"{i:064x}", 1) for i, w in enumerate(wheels))
    sd = LockedFile(URL + sdist, "f" * 64, 1) if sdist else None
    return LockedPackage(name, version, marker, files, sd)


def lock(*packages):
    return Lock(path=None, cell_id="", inputs_digest="", packages=packages)  # type: ignore[arg-type]


AARCH64 = "numpy-2.0.0-cp311-cp311-manylinux_2_17_aarch64.manylinux2014_aarch64.whl"
X86 = "numpy-2.0.0-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
NEW_GLIBC = "numpy-2.0.0-cp311-cp311-manylinux_2_39_aarch64.whl"
CP312 = "numpy-2.0.0-cp312-cp312-manylinux_2_17_aarch64.whl"
WIN = "numpy-2.0.0-cp311-cp311-win_amd64.whl"


def test_arm64_target_takes_aarch64_wheels_not_the_hosts(matrix):
    cell = matrix.cell("v0.7.1-linux-arm64-cpu-py3.11-base-pip")
    assert targets.wheel_rank(cell, AARCH64) is not None
    assert targets.wheel_rank(cell, X86) is None
    assert targets.wheel_rank(cell, CP312) is None
    assert targets.wheel_rank(cell, NEW_GLIBC) is None  # needs glibc 2.39 > the 2.35 floor


def test_manylinux_tags_newer_than_2_28_are_accepted_up_to_the_floor(matrix):
    cell = matrix.cell("v0.7.1-linux-arm64-cpu-py3.11-base-pip")
    assert targets.wheel_rank(cell, "x-1-cp311-cp311-manylinux_2_34_aarch64.whl") is not None
    assert "manylinux2014_aarch64" in targets.platforms(cell)


def test_windows_target_takes_win_amd64(matrix):
    cell = matrix.cell("v0.7.1-windows-amd64-cpu-py3.11-base-pip")
    assert targets.wheel_rank(cell, WIN) is not None
    assert targets.wheel_rank(cell, X86) is None


def test_plan_picks_the_target_wheel_and_builds_sdist_only_packages(matrix):
    cell = matrix.cell("v0.7.1-linux-arm64-cpu-py3.11-base-pip")
    fetch, build = plan(
        cell, lock(pkg("numpy", "2.0.0", X86, AARCH64), pkg("wget", "3.2", sdist="wget-3.2.zip"))
    )
    assert [w.filename for _, w in fetch] == [AARCH64]
    assert [p.name for p in build] == ["wget"]


def test_plan_evaluates_markers_for_the_target_not_the_host(matrix):
    linux = matrix.cell("v0.7.1-linux-amd64-cpu-py3.11-base-pip")
    windows = matrix.cell("v0.7.1-windows-amd64-cpu-py3.11-base-pip")
    pywin = pkg(
        "pywin32", "306", "pywin32-306-cp311-cp311-win_amd64.whl", marker="sys_platform == 'win32'"
    )
    old = pkg(
        "async-timeout",
        "5.0",
        "async_timeout-5.0-py3-none-any.whl",
        marker="python_version < '3.11'",
    )
    assert plan(linux, lock(pywin, old)) == ([], [])
    fetch, _ = plan(windows, lock(pywin, old))
    assert [p.name for p, _ in fetch] == ["pywin32"]


def test_package_with_no_wheel_and_no_sdist_is_refused_by_name(matrix):
    cell = matrix.cell("v0.7.1-linux-arm64-cpu-py3.11-base-pip")
    with pytest.raises(
        WheelError, match="bitsandbytes==0.45.0 has no wheel for v0.7.1-linux-arm64"
    ):
        plan(
            cell,
            lock(
                pkg(
                    "bitsandbytes",
                    "0.45.0",
                    "bitsandbytes-0.45.0-py3-none-manylinux_2_24_x86_64.whl",
                )
            ),
        )


def test_check_tags_refuses_a_wheel_the_target_cannot_install(matrix, tmp_path):
    cell = matrix.cell("v0.7.1-linux-arm64-cpu-py3.11-base-pip")
    bad = Wheel("numpy", "2.0.0", X86, "0" * 64, tmp_path / X86, "x")
    with pytest.raises(WheelError, match="cannot install on the target"):
        check_tags(cell, [bad])


def test_cuda_gate_refuses_a_newer_cuda_major_naming_package_and_fix(matrix):
    cell = matrix.cell("v0.7.1-linux-amd64-cuda12.4-py3.11-audio-pip")
    packages = [
        pkg("torch", "2.11.0", "torch-2.11.0-cp311-cp311-manylinux_2_28_x86_64.whl"),
        pkg(
            "nvidia-cuda-runtime",
            "13.0.96",
            "nvidia_cuda_runtime-13.0.96-py3-none-manylinux_2_28_x86_64.whl",
        ),
    ]
    with pytest.raises(CudaGateError) as err:
        cuda_gate(cell, packages)
    message = str(err.value)
    assert "CUDA 13" in message and "nvidia-cuda-runtime==13.0.96" in message
    assert "driver floor is CUDA 12.4" in message and "bundles/overrides.toml" in message


def test_cuda_gate_accepts_same_major_and_ignores_cpu_cells(matrix):
    cu12 = [
        pkg(
            "nvidia-cuda-runtime-cu12",
            "12.8.90",
            "nvidia_cuda_runtime_cu12-12.8.90-py3-none-manylinux2014_x86_64.whl",
        )
    ]
    cuda_gate(matrix.cell("v0.7.1-linux-amd64-cuda12.4-py3.11-audio-pip"), cu12)
    cu13 = [
        pkg(
            "nvidia-nccl-cu13",
            "2.30.7",
            "nvidia_nccl_cu13-2.30.7-py3-none-manylinux_2_18_x86_64.whl",
        )
    ]
    cuda_gate(matrix.cell("v0.7.1-linux-amd64-cpu-py3.11-audio-pip"), cu13)
    with pytest.raises(CudaGateError, match="nvidia-nccl-cu13"):
        cuda_gate(matrix.cell("v0.7.1-linux-amd64-cuda12.8-py3.11-audio-pip"), cu13)


def _wheels(tmp_path):
    return [
        Wheel("gpustack", "0.7.1", "gpustack-0.7.1-py3-none-any.whl", "a" * 64, tmp_path, "u"),
        Wheel(
            "PyYAML",
            "6.0",
            "PyYAML-6.0-cp311-cp311-manylinux_2_17_x86_64.whl",
            "b" * 64,
            tmp_path,
            "u",
        ),
    ]


def test_requirements_pin_every_file_with_its_hash_and_keep_extras(matrix, tmp_path):
    cell = matrix.cell("v0.7.1-linux-amd64-cpu-py3.11-audio-pip")
    text = requirements_txt(cell, _wheels(tmp_path))
    assert "gpustack[audio]==0.7.1 --hash=sha256:" + "a" * 64 in text
    assert "PyYAML==6.0 --hash=sha256:" + "b" * 64 in text


def test_simple_index_is_pep503_with_normalized_names_and_hashes(tmp_path):
    pages = simple_index(_wheels(tmp_path))
    assert set(pages) == {"index.html", "gpustack/index.html", "pyyaml/index.html"}
    assert 'href="pyyaml/"' in pages["index.html"]
    assert (
        'href="../../PyYAML-6.0-cp311-cp311-manylinux_2_17_x86_64.whl#sha256=' + "b" * 64
        in pages["pyyaml/index.html"]
    )


@pytest.fixture
def site_mirror(tmp_path):
    """A real pypiserver on loopback: the kind of PyPI mirror a site runs."""
    import socket
    import subprocess
    import sys
    import time
    import zipfile

    packages = tmp_path / "packages"
    packages.mkdir()
    wheel = packages / "demo_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("demo_pkg-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: demo-pkg\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable.replace("python", "pypi-server"), "run", "-i", "127.0.0.1", "-p",
         str(port), "-a", ".", "-P", ".", str(packages)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/simple"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    yield url, wheel
    server.terminate()
    server.wait(10)


@pytest.mark.enable_socket
def test_a_site_mirror_serves_the_locked_files_by_name(site_mirror, tmp_path):
    from gpustack_offline.core.downloads import BlobStore, Download
    from gpustack_offline.core.files import sha256_file
    from gpustack_offline.stages.wheels import on_index

    url, wheel = site_mirror
    found = on_index(url, [("Demo_Pkg", wheel.name)])
    assert found[wheel.name].startswith(url.removesuffix("/simple")), found
    sha = sha256_file(wheel)
    [path] = BlobStore(tmp_path / "cache").fetch_all(
        [Download(found[wheel.name], sha, wheel.stat().st_size, wheel.name)], show=False
    )
    assert sha256_file(path) == sha
    with pytest.raises(WheelError, match=r"does not serve 1 locked file\(s\): other-1.0.tar.gz"):
        on_index(url, [("demo-pkg", wheel.name), ("other", "other-1.0.tar.gz")])
    assert on_index("https://pypi.org/simple/", [("demo-pkg", wheel.name)]) == {}
