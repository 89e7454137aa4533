"""GPUStack 0.x devices are upstream's data, not a hand list: each version's devices and their
platforms are the builds of the llama-box release its worker runs, as llama-box's own release
workflow makes them; each version's images are the tags GPUStack's docker-ci.yaml publishes; and
what the matrix says a target's worker answers to the machine questions (device kind, toolkit
version, chip) makes upstream's own code pick exactly the build the cell names.

The first two read copies of upstream's files (tests/fixtures/upstream/, each checked against
its git blob id); the last runs each release's code in its tool venv (integration tier).
"""

from __future__ import annotations

import json
import os
import re

import pytest
from support import upstream
from support.release_mirror import GPUSTACK_TOOLS

from gpustack_offline.core.devices import Device, run_needs
from gpustack_offline.core.errors import CellError
from gpustack_offline.core.options import resolve
from gpustack_offline.core.processes import run
from gpustack_offline.stages import tools
from gpustack_offline.stages.locks import load_overrides

VERSIONS = ("0.6.2", "0.7.1")


def test_the_copies_of_upstreams_files_are_upstreams_bytes():
    for copy in upstream.copies():
        assert upstream.git_blob(copy.file.read_bytes()) == copy.blob, (
            f"{copy.copy} is not {copy.repository} {copy.tag}:{copy.path} (blob {copy.blob})"
        )


@pytest.mark.parametrize("version", VERSIONS)
def test_a_versions_devices_are_the_builds_of_its_llama_box_release(matrix, version):
    """Every build a worker of the version can pick, on every platform llama-box builds it
    for, is a device of the matrix, and nothing else is."""
    pinned = GPUSTACK_TOOLS[version]
    release = matrix._versions[version]["llama-box"]
    assert release == pinned.llama_box  # BUILTIN_LLAMA_BOX_VERSION of the version
    dynamic = pinned.llama_box_prefix == "dl-llama-box"
    words = {v.line0.worker0.llama_box: b for b, v in matrix.vendors.items() if v.line0}
    expected: dict[str, set[str]] = {}
    for build in upstream.llama_box_builds(release):
        if build.dynamic != dynamic:
            continue
        word, _, rest = build.toolkit.partition("-")
        if build.toolkit == pinned.cpu_toolkit.get(build.arch):
            name = "cpu"
        elif word in words:
            backend = words[word]
            worker = matrix.vendors[backend].line0.worker0  # type: ignore[union-attr]
            version_, _, variant = rest.partition("-")
            if worker.variant_env and not variant:  # the plain build of a chip family
                variant = "910b"
            name = Device(backend, version_, variant).name
        else:
            continue  # avx512, oneapi, vulkan: no 0.x worker picks them
        expected.setdefault(name, set()).add(f"{build.os}/{build.arch}")
    assert {d: set(p) for d, p in matrix._builds[version].items()} == expected


@pytest.mark.parametrize("version", VERSIONS)
def test_a_versions_images_are_the_tags_its_docker_ci_publishes(matrix, version):
    cann = upstream.dockerfile_arg(version, "Dockerfile.npu", "CANN_VERSION").removesuffix(".beta1")
    devices = matrix._builds[version]
    expected = {}
    for image in upstream.docker_images(version):
        if image.device == "cuda":
            cuda = ".".join(image.build_args["CUDA_VERSION"].split(".")[:2])
            device = f"cuda{cuda}"
        elif image.device == "cpu":
            device = "cpu"
        elif image.device == "npu":
            device = f"cann{cann}-{image.build_args['CANN_CHIP']}"
        elif image.device == "corex":
            # upstream's 0.x worker picks no accelerator build for corex (tools_manager.py):
            # its image carries the cpu build, and there is no corex device here
            continue
        else:  # one build of the backend in the version: its image carries that one
            (device,) = [
                d
                for d in devices
                if (t := matrix._toolkit(d)) is not None and t.worker.device == image.device
            ]
        expected[device] = (image.tag, image.platforms)
    images = matrix._images[version]
    assert {d: (i.tag, i.platforms) for d, i in images.items()} == expected


@pytest.mark.parametrize("version", VERSIONS)
def test_a_0x_images_run_options_are_upstreams_docker_line_for_its_device(matrix, version):
    """What install.sh prints and preflight.sh checks for a vendor's 0.x image is the docker
    line upstream's installation docs start that image with: the doc the matrix names as the
    options' source, at the version's tag, for the image of the cell's tag; the runtime the
    line relies on is the one that doc checks `docker info` for (none where it checks none)."""
    backends = set()
    for cell in matrix.select(version=version, method="docker"):
        if cell.vendor is None:
            continue
        assert cell.image is not None and cell.toolkit is not None
        doc = re.search(r"docs/installation/\S+\.md", dict(cell.vendor.sources)["run"])
        assert doc, cell.vendor.sources
        lines = upstream.docker_run_options(version, doc[0])
        assert cell.worker_options() == lines[f"gpustack/gpustack:latest{cell.image.tag}"], cell.id
        checked = re.search(
            r"docker info \| grep Runtimes \| grep (\w+)",
            upstream.read("gpustack/gpustack", f"v{version}", doc[0]),
        )
        assert cell.vendor.runtime == (checked[1] if checked else ""), cell.id
        backends.add(cell.toolkit.device.backend)
    assert backends == {"cann", "rocm", "dtk", "musa"}


def test_a_0x_images_host_needs_the_nodes_and_paths_its_run_line_names(matrix):
    """preflight.sh checks, for an image, what its run line passes in; for a pip install, the
    toolkit's folders and the devices upstream's detection reads."""
    image = matrix.cell("v0.7.1-linux-amd64-dtk25.04-py3.11-base-docker")
    assert image.vendor is not None
    assert image.vendor.devices == ("/dev/kfd", "/dev/mkfd", "/dev/dri")
    assert image.vendor.paths == ("/opt/hyhal",)
    pip = matrix.cell("v0.7.1-linux-amd64-dtk25.04-py3.11-base-pip")
    assert pip.vendor is not None and pip.worker_options() == ()
    assert pip.vendor.paths == ("/opt/hyhal", "/opt/dtk")
    assert run_needs(["--device /dev/davinci0", "-v /usr/local/dcmi:/usr/local/dcmi",
                      "--volume=gpustack-data:/var/lib/gpustack", "--device=/dev/dri:/dev/dri",
                      "--group-add video"]) == (("/dev/davinci0", "/dev/dri"),
                                                ("/usr/local/dcmi",))  # fmt: skip


def test_0x_accelerator_cells_know_their_build_and_how_the_worker_picks_it(matrix):
    cell = matrix.cell("v0.7.1-linux-arm64-cann8.2.rc1-310p-py3.11-base-pip")
    assert cell.toolkit is not None and cell.vendor is not None
    assert cell.toolkit.build == "cann-8.2.rc1-310p"
    assert cell.toolkit.env() == {"CANN_VERSION": "8.2.rc1", "CANN_CHIP": "310p"}
    assert tools.target_identity(cell) == {"system": "linux", "arch": "arm64", "device": "npu"}
    assert (cell.vendor.tool, cell.vendor.runtime, cell.floor) == (
        ("npu-smi", "info"), "", "CANN 8.2.rc1"
    )  # fmt: skip
    plain = matrix.cell("v0.7.1-linux-arm64-cann8.2.rc1-910b-py3.11-base-pip")
    assert plain.toolkit is not None and plain.toolkit.build == "cann-8.2.rc1"
    rocm = matrix.cell("v0.7.1-linux-amd64-rocm6.2-py3.11-base-pip")
    assert rocm.toolkit is not None and rocm.vendor is not None
    assert (rocm.toolkit.build, rocm.toolkit.env(), rocm.vendor.tool) == (
        "hip-6.2",
        {},
        ("rocm-smi",),
    )
    cuda = matrix.cell("v0.7.1-linux-amd64-cuda12.8-py3.11-base-pip")
    assert cuda.toolkit is not None and cuda.vendor is None  # CUDA keeps its own checks
    assert (cuda.toolkit.build, cuda.toolkit.env()) == ("cuda-12.8", {"CUDA_VERSION": "12.8"})


REFUSED = {
    "v0.7.1-linux-arm64-rocm6.2-py3.11-base-pip":
        r"built for rocm6.2 \(hip-6.2\) on linux/amd64, windows/amd64 only",
    "v0.7.1-linux-amd64-cann8.0-910b-py3.11-base-pip":
        r"builds of llama-box v0.0.171.*cann8.0-910b is none of them",
    "v0.6.2-linux-amd64-cann8.2.rc1-910b-py3.11-base-pip": r"builds of llama-box v0.0.154",
    "v0.7.1-linux-amd64-cann8.1.rc1-910b-py3.11-base-docker":
        r"publishes no image for cann8.1.rc1-910b",
    "v0.7.1-windows-amd64-rocm6.2-py3.11-base-pip": r"desktop installer",
    "v0.7.1-linux-amd64-dtk25.04-py3.12-base-pip": r"Python 3.11",
    "v0.7.1-linux-amd64-musarc4.2-py3.11-vllm-pip": r"vllm extra .* needs a cuda device",
    "v0.6.2-linux-arm64-musarc4.0-py3.11-base-docker":
        r"built for musarc4.0 \(musa-rc4.0\) on linux/amd64 only",
}  # fmt: skip


@pytest.mark.parametrize(("cell_id", "reason"), REFUSED.items())  # fmt: skip
def test_what_upstream_does_not_build_is_refused_with_its_reason(matrix, cell_id, reason):
    with pytest.raises(CellError, match=reason):
        matrix.cell(cell_id)


def test_invoke_matrix_lists_0x_cells_for_each_vendor(matrix):
    ids = {c.id for c in matrix.select(version="0.7.1", python="3.11")}
    for device in ("cann8.2.rc1-910b", "cann8.2.rc1-310p", "dtk25.04", "musarc4.2", "rocm6.2"):
        assert f"v0.7.1-linux-amd64-{device}-py3.11-base-pip" in ids
        assert f"v0.7.1-linux-amd64-{device}-py3.11-base-docker" in ids
    assert "v0.7.1-linux-arm64-cann8.2.rc1-910b-py3.11-base-pip" in ids


# -- upstream's code in each release's tool venv ---------------------------------------------

PICK = """
import json, os, sys
from gpustack.utils import platform
from gpustack.worker import tools_manager as tm
asked = json.loads(sys.argv[1])
out = {}
for key, (system, arch, device, env) in asked.items():
    os.environ.update(env)
    platform.device = lambda: device  # the target's answer, not this host's
    manager = tm.ToolsManager(system=system, arch=arch, device=device or None)
    version = tm.BUILTIN_LLAMA_BOX_VERSION
    static = getattr(tm, "is_disabled_dynamic_link", None)
    if static:  # 0.7: dl-llama-box-… unless the static build is asked for
        name = manager._get_llama_box_platform_name(version, static(version))
    else:  # 0.6: the name without its llama-box- prefix
        name = "llama-box-" + manager._get_llama_box_platform_name(version)
    for k in env:
        del os.environ[k]
    out[key] = name
kinds = {}
for kind in platform.DeviceTypeEnum:
    manager = tm.ToolsManager(system="linux", arch="amd64", device=kind.value)
    version = tm.BUILTIN_LLAMA_BOX_VERSION
    try:
        kinds[kind.value] = manager._get_llama_box_platform_name(version, False)
    except TypeError:
        kinds[kind.value] = manager._get_llama_box_platform_name(version)
print(json.dumps({"picks": out, "kinds": kinds}))
"""


@pytest.mark.integration
@pytest.mark.parametrize("version", VERSIONS)
def test_upstreams_worker_picks_the_build_each_0x_cell_names(matrix, root, version):
    """For every device and platform of the version, the answers the matrix gives (the device
    kind, CUDA_VERSION, CANN_VERSION, CANN_CHIP) make the release's own tools manager name the
    build the cell carries; and every device kind it builds an accelerator for is covered."""
    opts = resolve(root)
    cell = matrix.cell(f"v{version}-linux-amd64-cpu-py3.11-base-pip")
    python = tools.tool_venv(
        cell, load_overrides(opts.path("overrides", root)), opts.path("cache_dir", root),
        opts.index_url,
    )  # fmt: skip
    prefix = GPUSTACK_TOOLS[version].llama_box_prefix
    asked, wanted = {}, {}
    for c in matrix.cells:
        if c.version != version or c.method != "pip" or c.python != "3.11" or c.extras != "base":
            continue
        identity = tools.target_identity(c)
        env = tools.download_env(c, {})
        asked[c.id] = (c.os, c.arch, identity["device"], env)
        toolkit = c.toolkit.build if c.toolkit else GPUSTACK_TOOLS[version].cpu_toolkit[c.arch]
        wanted[c.id] = f"{prefix}-{c.os}-{c.arch}-{toolkit}"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(tools.HOST_ENV_LEAKS)}
    out = run([python, "-c", PICK, json.dumps(asked)], env=clean, what="asking upstream").stdout
    answer = json.loads(out.strip().splitlines()[-1])
    assert answer["picks"] == wanted
    accelerated = {
        kind
        for kind, name in answer["kinds"].items()
        if not name.endswith(("-cpu", "-avx2", "-neon")) and "metal" not in name
    }
    covered = {
        v.line0.worker0.device for v in matrix.vendors.values() if v.line0 and v.line0.worker0
    }
    assert accelerated == covered, "a device kind upstream builds for has no [backends] 0.x table"
