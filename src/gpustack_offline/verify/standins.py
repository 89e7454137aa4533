"""What stands in for a cell's accelerator in a verification container, which has none.

The vendor's device tool of payload/fakes/ (the real tool's output format) is mounted where the
vendor installs it, so preflight finds it and GPUStack's own detection sees the device (0.x:
`gpustack.utils.platform.device()` looks for `nvidia-smi`, `npu-smi`, `rocm-smi`, `hy-smi`,
`mthreads-gmi`), and reports exactly the cell's floor: the driver's CUDA version, the Ascend
chip of the cell's build. Where preflight reads the host's toolkit version, device nodes and
driver folders, a stand-in host root holds them at the floor (`PREFLIGHT_HOST_ROOT`, the same
hook the tests of preflight.sh use): nothing of it is in the container's own folders, so the
installed GPUStack still runs on a machine with no accelerator libraries.

A 0.x docker bundle of a vendor's device is installed on this host itself: `install.sh` runs its
preflight with the stand-in tool first on PATH and the host root (`host_env`), which holds the
device nodes and paths upstream's line for the image names; the image is then started with that
line's options (`image_options`), each device node being /dev/null under the node's name and
each mounted host path the host root's.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from gpustack_offline import payload
from gpustack_offline.core.devices import Vendor, run_option
from gpustack_offline.core.errors import VerifyError
from gpustack_offline.core.files import atomic_dir
from gpustack_offline.core.matrix import Cell

HOST_ROOT = "/opt/stand-in-host"  # where the stand-in host root is mounted in the container
# The host's toolkit version file of each version reader of preflight.sh, as the vendor writes
# it ({v}: the toolkit version); preflight reads it the way upstream's detector does.
VERSION_FILES = {
    "cann": ("usr/local/Ascend/ascend-toolkit/latest/runtime/version.info", "Version={v}\n"),
    "rocm": ("opt/rocm/.info/version", "{v}\n"),
    "dtk": ("opt/dtk/.info/version", "{v}\n"),
}
# An npu-smi chip name of each Ascend variant a build is for (npu-smi's Name column).
NPU_NAMES = {"310p": "310P3", "910b": "910B3"}


def stand_ins(cell: Cell, cache: Path) -> tuple[dict[Path, str], dict[str, str]]:
    """Host paths to mount read-only (path -> container path) and the environment of every
    step, standing in for the cell's accelerator; nothing for a cpu cell."""
    if cell.cuda:
        # No GPU here: a stand-in nvidia-smi reports a driver of exactly the cell's floor.
        tool = payload.path("fakes/nvidia-smi")
        return {tool: "/usr/local/bin/nvidia-smi"}, {"FAKE_NVIDIA_CUDA": cell.cuda}
    vendor, toolkit = cell.vendor, cell.toolkit
    if vendor is None or toolkit is None:  # a cpu cell (2.x cells are verified as images)
        return {}, {}
    name = vendor.tool[0]
    mounts = {payload.path(f"fakes/{name}"): f"/usr/local/bin/{name}"}
    env = {"PREFLIGHT_HOST_ROOT": HOST_ROOT}
    if toolkit.device.backend == "cann":
        env["FAKE_NPU_NAME"] = NPU_NAMES.get(toolkit.device.variant, NPU_NAMES["910b"])
    mounts[host_root(cell, cache)] = HOST_ROOT
    return mounts, env


def host_root(cell: Cell, cache: Path) -> Path:
    """A host root with the cell's device nodes (empty files), driver and toolkit folders and
    toolkit version at the floor; made once per device and kept in the cache."""
    assert cell.vendor is not None and cell.toolkit is not None
    vendor, device = cell.vendor, cell.toolkit.device
    # a pip cell's nodes and folders differ from an image's of the same device (its run line's)
    what = hashlib.sha256(repr((vendor.devices, vendor.paths)).encode()).hexdigest()[:8]
    name = f"{device.name}-{vendor.version or 'none'}-{what}"
    final = cache / "verify" / "stand-in-hosts" / name
    if final.is_dir():
        return final
    with atomic_dir(final) as root:
        write_host(root, vendor)
        if vendor.version in VERSION_FILES:
            path, text = VERSION_FILES[vendor.version]
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_text(text.format(v=device.version.replace(".rc", ".RC")))
    return final


def write_host(root: Path, vendor: Vendor) -> None:
    """The vendor's device nodes (empty files; a pattern's `[0-9]*` as 0, `*` as 128) and its
    folders (or a run line's `-v` paths, files or folders: folders stand in for both) under
    `root`."""
    for pattern in vendor.devices:
        node = root / re.sub(r"\[0-9\]\*", "0", pattern).replace("*", "128").lstrip("/")
        node.parent.mkdir(parents=True, exist_ok=True)
        node.write_text("")
    for folder in vendor.paths:
        (root / folder.lstrip("/")).mkdir(parents=True, exist_ok=True)


def host_env(cell: Cell, cache: Path, path: str) -> dict[str, str]:
    """What to add to the environment of a 0.x vendor bundle's scripts run on this host as on
    the cell's: `path` (PATH) behind a folder with the stand-in tool alone, the host root
    (PREFLIGHT_HOST_ROOT) and the tool's answers. Nothing for other cells."""
    if cell.vendor is None or cell.toolkit is None:
        return {}
    name = cell.vendor.tool[0]
    # a copy, named by its content: a link into one checkout dangles once that checkout is gone
    tool = payload.path(f"fakes/{name}").read_bytes()
    tools = cache / "verify" / "stand-in-tools" / f"{name}-{hashlib.sha256(tool).hexdigest()[:12]}"
    if not tools.is_dir():
        with atomic_dir(tools) as folder:
            (folder / name).write_bytes(tool)
            (folder / name).chmod(0o755)
    _, env = stand_ins(cell, cache)
    root = str(host_root(cell, cache))
    return {**env, "PREFLIGHT_HOST_ROOT": root, "PATH": f"{tools}:{path}"}


def image_options(cell: Cell, root: Path) -> dict[str, Any]:
    """The cell's run options (upstream's line for its image) as Docker SDK arguments, with
    stand-ins: each device node /dev/null under its name, each host path the one under `root`
    (read-only). The host network is left out: the verification chooses the network."""
    out: dict[str, Any] = {}
    for option in cell.worker_options():
        flag, value = run_option(option)
        if flag == "--device":
            out.setdefault("devices", []).append(f"/dev/null:{value.split(':')[0]}:rwm")
        elif flag in ("-v", "--volume"):
            source, inside = value.split(":")[:2]
            # read-only whatever the line says: the stand-ins are kept in the cache
            volumes = out.setdefault("volumes", {})
            volumes[str(root / source.strip("/"))] = {"bind": inside, "mode": "ro"}
        elif flag == "--group-add":
            out.setdefault("group_add", []).append(value)
        elif flag == "--cap-add":
            out.setdefault("cap_add", []).append(value)
        elif flag == "--security-opt":
            out.setdefault("security_opt", []).append(value)
        elif flag == "--ipc":
            out["ipc_mode"] = value
        elif flag != "--network":
            raise VerifyError(
                f"{cell.id}: the verification has no stand-in for the run option {option!r}; "
                "teach verify/standins.py image_options it"
            )
    return out


# A GPUStack 2.x worker reports the GPUs its config file declares instead of detecting them
# (2.2.3 config/config.py get_gpu_devices): a stand-in of the cell's device, of this size.
DECLARED_MEMORY = 80 << 30
# What upstream names the maker of a runner backend's devices (gpustack_runtime.detector),
# asked of the server image itself: a declared GPU's `vendor` must be one of upstream's.
MANUFACTURER_PROBE = (
    "import sys; from gpustack_runtime.detector import backend_to_manufacturer as m; "
    "print(getattr(m(sys.argv[1]), 'value', m(sys.argv[1])))"
)


def declared_gpu(cell: Cell, manufacturer: str) -> str:
    """A 2.x config file (`GPUSTACK_CONFIG_FILE`; JSON is YAML) whose `resources.gpu_devices`
    declares one GPU of the cell's runner device: its backend and version (the runner the
    worker will ask for), DECLARED_MEMORY, and for CUDA a compute capability the runners
    support (9.0, Hopper)."""
    device = cell.runner_device
    if device is None or cell.backend is None:
        raise VerifyError(f"{cell.id}: no accelerator to declare (a cpu or 0.x cell)")
    gpu: dict[str, Any] = {
        "name": f"stand-in {device.name} GPU (no GPU on this host)",
        "vendor": manufacturer,
        "type": device.backend,
        "index": 0,
        "runtime_version": device.version,
        "memory": {"total": DECLARED_MEMORY},
    }
    if device.backend == "cuda":
        gpu["compute_capability"] = "9.0"
    return json.dumps({"resources": {"gpu_devices": [gpu]}}, indent=1) + "\n"
