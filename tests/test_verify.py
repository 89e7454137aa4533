"""The judgements verification makes from what it collected: tools found, egress allowed."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any

import pytest
from support.upstream import run_gpustack

from gpustack_offline import payload
from gpustack_offline.core.errors import VerifyError
from gpustack_offline.core.matrix import Cell
from gpustack_offline.verify import common as verify
from gpustack_offline.verify import docker as docker_verify
from gpustack_offline.verify import egress, standins

CELL = "v0.7.1-linux-amd64-cpu-py3.11-base-pip"
SKIPS = "\n".join(
    f"01:00:0{i} DEBUG gpustack.worker.tools_manager {t} already exists, skipping download"
    for i, t in enumerate(("llama-box", "gguf-parser", "fastfetch"))
)


def test_a_worker_that_found_every_tool_passes(matrix) -> None:
    step = verify.offline_tools_step(matrix.cell(CELL), "INFO starting\n" + SKIPS)
    assert step.code == 0 and step.output.count("skipping download") == 3


def test_a_download_attempt_fails_the_cell_and_quotes_the_log(matrix) -> None:
    log = SKIPS + "\nINFO Downloading dl-llama-box-linux-amd64-cuda-12.4 'v0.0.171'\nERROR boom"
    with pytest.raises(VerifyError) as err:
        verify.offline_tools_step(matrix.cell(CELL), log)
    message = str(err.value)
    assert "tried to download tools at start" in message
    assert "Downloading dl-llama-box-linux-amd64-cuda-12.4" in message


def test_a_worker_that_confirmed_too_few_tools_fails(matrix) -> None:
    with pytest.raises(VerifyError, match="only 2 of 3"):
        verify.offline_tools_step(matrix.cell(CELL), "\n".join(SKIPS.splitlines()[:2]))


def events(*names: str) -> list[dict]:
    out: list[dict] = [{"kind": "ready", "time": "t0", "monotonic": 0.0, "address": "172.18.0.9"}]
    for i, name in enumerate(names, start=1):
        out.append({"kind": "dns", "time": f"t{i}", "monotonic": float(i), "client": "172.18.0.2",
                    "port": 53, "name": name, "qtype": "A"})  # fmt: skip
        out.append({"kind": "tls", "time": f"t{i}", "monotonic": i + 0.5, "client": "172.18.0.2",
                    "port": 443, "sni": name})  # fmt: skip
    return out


def audited_run(*names: str) -> verify.AuditedRun:
    calls = [
        {"host": name, "pid": 41, "process": "gpustack", "where": "gpustack/server/catalog.py:141"}
        for name in names
    ]
    log = "INFO serving\nWARNING Failed to access https://huggingface.co: timed out\n"
    return verify.AuditedRun("site", 20.0, 30.0, events(*names), calls, log)


def test_egress_outside_the_allowlist_names_host_process_and_log_line(matrix) -> None:
    run = audited_run("huggingface.co")
    with pytest.raises(VerifyError) as err:
        verify.egress_step(matrix.cell(CELL), egress.summarize(run.events), run, [])
    message = str(err.value)
    assert "the configured first start tried to reach huggingface.co" in message
    assert "gpustack (pid 41) at gpustack/server/catalog.py:141" in message
    assert "Failed to access https://huggingface.co" in message


def test_an_allowed_host_passes_and_is_listed(matrix) -> None:
    run = audited_run("ntp.site.internal")
    step = verify.egress_step(
        matrix.cell(CELL), egress.summarize(run.events), run, ["*.site.internal"]
    )
    assert step.code == 0 and "ntp.site.internal" in step.output


def test_no_egress_at_all_passes(matrix) -> None:
    run = audited_run()
    step = verify.egress_step(matrix.cell(CELL), egress.summarize(run.events), run, [])
    assert step.code == 0 and "none" in step.output
    assert run.summary()["hosts_attempted"] == 0


def test_the_upstream_summary_counts_hosts(matrix) -> None:
    run = audited_run("huggingface.co", "update-service.gpustack.ai")
    summary = run.summary()
    assert summary["hosts"] == ["huggingface.co", "update-service.gpustack.ai"]
    assert summary["hosts_attempted"] == 2 and summary["seconds_to_worker"] == 30.0


def test_the_report_file_leaves_the_egress_details_to_their_own_file(tmp_path: Path) -> None:
    report = verify.Report(cell=CELL, ok=True, egress={"hosts_attempted": 0, "hosts": []})
    report.egress_details = {"site": egress.summarize([])}
    path = tmp_path / f"{CELL}.verify.json"
    verify.write_report(report, path)
    saved = json.loads(path.read_text())
    assert "egress_details" not in saved and saved["egress"]["hosts_attempted"] == 0
    assert verify.egress_path(path).name == f"{CELL}.egress.json"


def test_the_allowlist_is_data_matched_by_cell(tmp_path: Path) -> None:
    path = tmp_path / "egress.toml"
    path.write_text(
        '[[allow]]\nselect = ["v0.7.1-linux-*"]\nhosts = ["ntp.site.internal"]\n'
        'reason = "the site clock"\n'
    )
    assert egress.load_allowlist(path, CELL) == ["ntp.site.internal"]
    assert egress.load_allowlist(path, "v0.6.2-linux-amd64-cpu-py3.11-base-pip") == []
    path.write_text('[[allow]]\nselect = ["*"]\nhosts = ["x"]\n')
    with pytest.raises(egress.EgressError, match="reason"):
        egress.load_allowlist(path, CELL)


def test_the_projects_allowlist_is_empty(root) -> None:
    """Empty by default: an air-gapped first start reaches for nothing."""
    assert tomllib.loads((root / "bundles" / "egress.toml").read_text()).get("allow", []) == []


def test_a_verification_that_stops_early_still_writes_its_egress_file(matrix, tmp_path) -> None:
    cell = matrix.cell("v0.7.1-linux-amd64-cpu-py3.11-base-pip")
    report_path = tmp_path / f"{cell.id}.verify.json"
    with pytest.raises(VerifyError, match="not a bundle"):
        verify.verify(cell, tmp_path / "missing", report_path, lambda report: report)
    audit = json.loads(verify.egress_path(report_path).read_text())
    assert audit["audited"] is False and "not a bundle (no manifest.json)" in audit["reason"]


def test_the_tool_check_calls_a_file_that_is_no_elf_by_its_name(tmp_path) -> None:
    """The check runs inside the target container; here it runs on a fake install's tools."""
    import subprocess
    import sys

    from gpustack_offline import payload

    package = tmp_path / "site" / "gpustack"
    tools = package / "third_party" / "bin"
    for rel in ("llama-box/llama-box", "gguf-parser/gguf-parser", "fastfetch/fastfetch"):
        (tools / rel).parent.mkdir(parents=True, exist_ok=True)
        (tools / rel).write_bytes(b"<!DOCTYPE html><html>rate limited</html>")
    (package / "__init__.py").write_text("")
    (tools / "versions.json").write_text("{}")
    proc = subprocess.run(
        [sys.executable, payload.path("check_tools.py"), "cpu"],
        env={"PYTHONPATH": str(package.parent)},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "FAIL gguf-parser/gguf-parser: not an ELF program (it starts with b'<!DOCTYPE" in (
        proc.stdout
    ), proc.stdout
    assert "machine None" not in proc.stdout


@pytest.mark.parametrize(
    "name",
    ["ui_visit.py", "health_probe.py", "isolation.py", "check_tools.py"],
)
def test_the_scripts_run_in_a_target_parse_as_python_3_8_with_the_standard_library(name) -> None:
    """They run with the target's python3 (a GPUStack image's may be older than the host's)."""
    import ast
    import sys

    from gpustack_offline import payload

    tree = ast.parse(payload.path(name).read_text(), feature_version=(3, 8))
    modules = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
               for a in n.names}  # fmt: skip
    modules |= {n.module.split(".")[0] for n in ast.walk(tree)
                if isinstance(n, ast.ImportFrom) and n.module}  # fmt: skip
    assert modules - set(sys.stdlib_module_names) - {"__future__", "gpustack"} == set()


def test_an_engine_older_than_the_floor_is_refused_naming_both_versions() -> None:
    from gpustack_offline.core import docker as containers

    containers.check_engine_version("20.10.24+dfsg1")
    containers.check_engine_version("26.1.3")
    containers.check_engine_version("master-dockerproject-2024")  # unreadable: assumed recent
    with pytest.raises(containers.EngineTooOld) as err:
        containers.check_engine_version("19.03.15", "at unix:///var/run/docker.sock")
    assert err.value.found == "19.03.15" and err.value.floor == (20, 10)
    assert "version 19.03.15" in str(err.value) and "Docker Engine >= 20.10" in str(err.value)
    assert isinstance(err.value, containers.EngineError)


def test_a_failed_egress_step_is_recorded_in_the_report_before_it_fails_the_cell(matrix) -> None:
    run = audited_run("quay.io")
    report = verify.Report(cell=CELL)
    with pytest.raises(VerifyError, match="tried to reach quay.io"):
        verify.egress_step(matrix.cell(CELL), egress.summarize(run.events), run, [], report)
    (step,) = report.steps
    assert (step.name, step.code) == ("egress", 1) and step.output.startswith("quay.io: ")


def test_the_2x_server_starts_with_the_args_and_env_install_sh_wrote(tmp_path: Path) -> None:
    (tmp_path / "server.args").write_text(
        "--system-default-container-registry\nreg.site:5000/mirror\n\n--ota-server-url\n"
        "http://127.0.0.1:1\n"
    )
    (tmp_path / "docker.env").write_text(
        "# comment\nGPUSTACK_UPDATE_CHECK_URL=http://127.0.0.1:1/\n"
    )
    start = docker_verify.server_start(tmp_path, "ignored:5000/x")
    assert list(start.args) == [
        "--system-default-container-registry", "reg.site:5000/mirror",
        "--ota-server-url", "http://127.0.0.1:1",
    ]  # fmt: skip
    assert dict(start.env) == {"GPUSTACK_UPDATE_CHECK_URL": "http://127.0.0.1:1/"}
    assert (start.name, start.port, start.worker_port) == ("server", 30080, None)
    assert start.pages == docker_verify.UI_PAGES_2X


def test_without_server_args_the_2x_server_gets_the_registry_flag_install_sh_printed(
    tmp_path: Path,
) -> None:
    start = docker_verify.server_start(tmp_path, "127.0.0.1:5000/site/mirror")
    assert list(start.args) == ["--system-default-container-registry", "127.0.0.1:5000/site/mirror"]
    assert dict(start.env) == {} and start.mounts == ()


def test_the_2x_server_mounts_the_folders_install_model_sh_recorded(tmp_path: Path) -> None:
    (tmp_path / "docker.volumes").write_text(
        "# Folders the GPUStack containers must see, one HOST:CONTAINER[:ro] a line\n"
        "/srv/models:/srv/models:ro\n\n/etc/catalogs:/etc/catalogs:ro\n"
    )
    start = docker_verify.server_start(tmp_path, "127.0.0.1:5000/site/mirror")
    assert start.mounts == ("/srv/models:/srv/models:ro", "/etc/catalogs:/etc/catalogs:ro")


@pytest.mark.parametrize(
    ("cell_id", "tool", "env"),
    [
        ("v0.7.1-linux-amd64-cuda12.8-py3.11-base-pip", "nvidia-smi", {"FAKE_NVIDIA_CUDA": "12.8"}),
        ("v0.7.1-linux-arm64-cann8.2.rc1-310p-py3.11-base-pip", "npu-smi",
         {"FAKE_NPU_NAME": "310P3", "PREFLIGHT_HOST_ROOT": standins.HOST_ROOT}),
        ("v0.7.1-linux-amd64-rocm6.2-py3.11-base-pip", "rocm-smi",
         {"PREFLIGHT_HOST_ROOT": standins.HOST_ROOT}),
        ("v0.7.1-linux-amd64-cpu-py3.11-base-pip", None, {}),
    ],
)  # fmt: skip
def test_an_accelerator_is_stood_in_for_at_exactly_the_cells_floor(
    matrix, tmp_path, cell_id, tool, env
) -> None:
    cell = matrix.cell(cell_id)
    mounts, got = standins.stand_ins(cell, tmp_path)
    assert got == env
    if tool is None:
        assert mounts == {}
        return
    assert mounts[payload.path(f"fakes/{tool}")] == f"/usr/local/bin/{tool}"
    if cell.cuda:
        return
    (root,) = [p for p, where in mounts.items() if where == standins.HOST_ROOT]
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    if cell.device.startswith("cann"):
        version = root / "usr/local/Ascend/ascend-toolkit/latest/runtime/version.info"
        assert version.read_text() == "Version=8.2.RC1\n"
        assert {"dev/davinci0", "dev/davinci_manager"} <= files
        assert (root / "usr/local/Ascend/driver").is_dir()
    else:
        assert (root / "opt/rocm/.info/version").read_text() == "6.2\n"
        assert {"dev/kfd", "dev/dri/renderD128"} <= files


def test_a_vendors_image_is_started_with_upstreams_options_on_stand_ins(matrix, tmp_path) -> None:
    """The Hygon image's line: every device node /dev/null under its name, every host path the
    stand-in host root's (read-only), the rest as upstream gives it; the host network is the
    verification's to choose. The host root holds what preflight checks for that line."""
    cell = matrix.cell("v0.7.1-linux-amd64-dtk25.04-py3.11-base-docker")
    env = standins.host_env(cell, tmp_path, "/usr/bin")
    root = Path(env["PREFLIGHT_HOST_ROOT"])
    assert (root / "dev/mkfd").is_file() and (root / "opt/hyhal").is_dir()
    tools = env["PATH"].split(":")
    tool = Path(tools[0]) / "hy-smi"
    assert tools[1:] == ["/usr/bin"] and os.access(tool, os.X_OK) and not tool.is_symlink()
    assert tool.read_bytes() == payload.path("fakes/hy-smi").read_bytes()

    assert standins.image_options(cell, root) == {
        "devices": ["/dev/null:/dev/kfd:rwm", "/dev/null:/dev/mkfd:rwm", "/dev/null:/dev/dri:rwm"],
        "volumes": {str(root / "opt/hyhal"): {"bind": "/opt/hyhal", "mode": "ro"}},
        "ipc_mode": "host",
        "group_add": ["video"],
        "cap_add": ["SYS_PTRACE"],
        "security_opt": ["seccomp=unconfined"],
    }
    pip = matrix.cell("v0.7.1-linux-amd64-dtk25.04-py3.11-base-pip")
    assert standins.image_options(pip, root) == {}
    assert standins.host_root(pip, tmp_path) != root  # its own nodes and folders


DECLARED_LOADER = """
import json, sys, tempfile, yaml
from gpustack.config.config import Config
probe, backends, files = sys.argv[1], sys.argv[2].split(","), sys.argv[3:]
if probe == "manufacturer":
    from gpustack_runtime.detector import backend_to_manufacturer as m
    print(json.dumps({b: str(getattr(m(b), "value", m(b))) for b in backends}))
else:
    out = {}
    for backend, path in zip(backends, files):
        with open(path) as fh:
            cfg = Config(data_dir=tempfile.mkdtemp(), **yaml.safe_load(fh))
        (gpu,) = cfg.get_gpu_devices()
        out[backend] = [gpu.vendor, gpu.type, gpu.runtime_version, gpu.memory.total]
    print(json.dumps(out))
"""


@pytest.mark.integration  # upstream's release in a venv (made once, cached: PyPI the first time)
@pytest.mark.parametrize("version", ["2.2.3", "2.3.0"])
def test_a_declared_stand_in_gpu_is_one_upstream_loads_for_every_2x_backend(
    root, matrix, tmp_path, version
) -> None:
    """For one cell of each backend of the version: the maker upstream's runtime names for the
    backend (`standins.MANUFACTURER_PROBE`, as the verification asks the server image), then the
    config file declaring the stand-in GPU, loaded by upstream's own Config: one GPU of the
    cell's backend and runner version, of that maker."""
    cells: dict[str, Cell] = {}
    for cell in matrix.cells:
        if cell.version == version and cell.runner_device is not None and cell.backend:
            cells.setdefault(cell.backend, cell)
    assert {"cuda", "rocm", "cann"} <= set(cells), sorted(cells)

    def upstream(*args: str) -> dict[str, Any]:
        out = run_gpustack(root, version, DECLARED_LOADER, *args)
        return dict(json.loads(out.splitlines()[-1]))

    backends = sorted(cells)
    makers = upstream("manufacturer", ",".join(backends))
    probed = run_gpustack(root, version, standins.MANUFACTURER_PROBE, "cuda").strip()
    assert probed == makers["cuda"] == "nvidia"
    made = {}
    for backend, maker in makers.items():
        assert maker != "unknown", (backend, maker)
        path = tmp_path / f"{backend}.yaml"
        path.write_text(standins.declared_gpu(cells[backend], maker))
        made[backend] = str(path)
    loaded = upstream("load", ",".join(backends), *(made[b] for b in backends))
    for backend, (vendor, kind, runtime, memory) in loaded.items():
        device = cells[backend].runner_device
        assert device is not None
        assert (kind, runtime, memory) == (backend, device.version, standins.DECLARED_MEMORY)
        assert vendor == makers[backend]
