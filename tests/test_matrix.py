from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from gpustack_offline.core.devices import Device
from gpustack_offline.core.errors import CellError
from gpustack_offline.core.matrix import Matrix


def test_cell_id_round_trips_through_lookup(matrix):
    for cell in matrix.cells:
        assert matrix.cell(cell.id) == cell


def test_upstream_rules_hold_for_every_cell(matrix):
    for cell in matrix.cells:
        if cell.series == 0 and cell.extras in ("vllm", "all"):
            assert (cell.os, cell.arch) == ("linux", "amd64")
            assert cell.device.startswith("cuda")
        if cell.os == "windows":
            assert cell.method == "pip"
        if cell.series == 2:
            assert cell.method == "docker" and cell.os == "linux"
            assert cell.runner_device is not None and cell.vendor is not None
            assert cell.runner_device.name == cell.device
            if cell.cuda or cell.rocm:  # upstream deprecated cuda12.4/12.6 and rocm6.x
                assert float(cell.cuda or cell.rocm or 0) >= (12.8 if cell.cuda else 7.0)


def test_a_2x_cell_names_its_services_and_has_a_rocm_floor(matrix):
    cell = matrix.cell("v2.3.0-linux-amd64-rocm7.0-py3.11-vllm+sglang-docker")
    assert (cell.series, cell.rocm, cell.cuda, cell.extra_names) == (
        2, "7.0", None, ("vllm", "sglang")
    )  # fmt: skip
    with pytest.raises(CellError, match="Docker only"):
        matrix.cell("v2.3.0-linux-amd64-cuda12.9-py3.11-vllm-pip")
    with pytest.raises(CellError, match=r"rocm7.0 runners for linux/amd64 only \(upstream's"):
        matrix.cell("v2.3.0-linux-arm64-rocm7.0-py3.11-vllm-docker")


def test_both_required_versions_and_all_pythons_are_in_the_matrix(matrix):
    versions = {c.version for c in matrix.cells}
    assert {"0.6.2", "0.7.1"} <= versions
    assert {c.python for c in matrix.cells} == {"3.10", "3.11", "3.12"}


def test_arch_flag_selects_default_version_and_python(matrix):
    cells = matrix.select(arch="arm64")
    assert cells
    assert {(c.version, c.python, c.arch) for c in cells} == {("0.7.1", "3.11", "arm64")}
    assert {c.device for c in cells} == {
        "cpu", "cuda12.4", "cuda12.8",
        "cann8.1.rc1-910b", "cann8.1.rc1-310p", "cann8.2.rc1-910b", "cann8.2.rc1-310p",
    }  # fmt: skip


def test_glob_selects_every_matching_cell_without_defaults(matrix):
    cells = matrix.select(["v0.7.1-linux-amd64-cpu-*"])
    assert {c.python for c in cells} == {"3.10", "3.11", "3.12"}
    assert all(c.id.startswith("v0.7.1-linux-amd64-cpu-") for c in cells)


def test_glob_and_axis_flags_combine(matrix):
    cells = matrix.select(["v0.7.1-linux-*"], arch="arm64", extras="base,audio")
    assert cells and all(c.arch == "arm64" and c.extras in ("base", "audio") for c in cells)


def test_impossible_cell_is_refused_with_reason_and_nearest(matrix):
    with pytest.raises(CellError) as err:
        matrix.cell("v0.7.1-linux-arm64-cuda12.8-py3.11-vllm-pip")
    message = str(err.value)
    assert "impossible" in message and "x86_64" in message
    assert "v0.7.1-linux-amd64-cuda12.8-py3.11-vllm-pip" in message


def test_unknown_axis_value_names_the_axis_and_known_values(matrix):
    with pytest.raises(CellError, match=r"unknown device 'cuda11.8' \(known: cpu, cuda12.4"):
        matrix.cell("v0.7.1-linux-amd64-cuda11.8-py3.11-base-pip")


def test_typo_gets_nearest_valid_ids(matrix):
    with pytest.raises(CellError, match="nearest valid: v0.7.1-linux-amd64-cpu-py3.11-base-pip"):
        matrix.cell("v0.7.1-linux-amd64-cpu-py3.11-bsae-pip")


def test_python_outside_the_matrix_is_refused(matrix):
    with pytest.raises(CellError, match="unknown python 3.9"):
        matrix.select(python="3.9")


def test_windows_docker_or_arm64_is_refused_with_its_reason(matrix):
    with pytest.raises(CellError, match="amd64 only"):
        matrix.select(os="windows", arch="arm64")


def test_empty_glob_is_an_error(matrix):
    with pytest.raises(CellError, match="matches no cell"):
        matrix.select(["v9.9.9-*"])


def test_ci_matrix_is_json_with_one_include_per_cell(matrix):
    cells = matrix.select(arch="arm64")
    data = json.loads(json.dumps(matrix.ci_matrix(cells)))
    assert [job["id"] for job in data["include"]] == [c.id for c in cells]
    assert data["include"][0]["requirement"].startswith("gpustack")


def test_cuda_floor_comes_from_the_device(matrix):
    assert matrix.cell("v0.7.1-linux-amd64-cuda12.4-py3.11-base-pip").cuda == "12.4"
    assert matrix.cell("v0.7.1-linux-amd64-cpu-py3.11-base-pip").cuda is None


def test_malformed_matrix_data_names_the_file(tmp_path):
    bad = tmp_path / "matrix.toml"
    bad.write_text("[axes]\nos = [\n")
    with pytest.raises(CellError, match=str(bad)):
        Matrix.load(bad)


def test_rule_naming_an_unknown_value_is_rejected(root):
    data = tomllib.loads((root / "bundles/matrix.toml").read_text())
    data["rules"].append({"when": {"os": ["macos"]}, "require": {}, "reason": "x"})
    with pytest.raises(CellError, match="unknown os values"):
        Matrix(data)


def test_a_scalar_axis_value_is_named_as_such_not_blamed_on_a_rule(root):
    data = tomllib.loads((root / "bundles/matrix.toml").read_text())
    data["axes"]["arch"] = "amd64"
    with pytest.raises(CellError, match=r"\[axes\] arch must be a list of strings") as err:
        Matrix(data)
    assert "rule" not in str(err.value) and '["amd64"]' in str(err.value)


def test_a_scalar_rule_value_is_named_with_the_rule(root):
    data = tomllib.loads((root / "bundles/matrix.toml").read_text())
    data["rules"].append({"when": {"os": "linux"}, "require": {"arch": ["amd64"]}, "reason": "x"})
    with pytest.raises(CellError, match=r"rule \d+ \(\[\[rules\]\]\) when\.os must be a list"):
        Matrix(data)


@pytest.mark.parametrize("schema", [2, 0, "1"])
def test_an_unknown_matrix_schema_is_refused(root, schema):
    data = tomllib.loads((root / "bundles/matrix.toml").read_text())
    data["schema"] = schema
    with pytest.raises(CellError, match=f"unknown schema {schema!r}; this gpustack-offline"):
        Matrix(data)


# ---- GPUStack 2.x devices: upstream's runner data, read, not listed ----------------------------


def _runner_offers(root: Path, version: str) -> dict[tuple[str, str], set[str]]:
    """(device, arch) -> services, computed here from the committed JSON on its own: every
    non-deprecated runner, its device spelled as the runner tag spells it."""
    doc = json.loads((root / f"bundles/runners/gpustack-{version}.json").read_text())
    offers: dict[tuple[str, str], set[str]] = {}
    for r in doc["runners"]:
        if r["deprecated"]:
            continue
        variant = f"-{r['backend_variant']}" if r["backend_variant"] else ""
        device = f"{r['backend']}{r['backend_version']}{variant}"
        assert r["docker_image"].startswith(f"gpustack/runner:{device}-"), r
        offers.setdefault((device, r["platform"].removeprefix("linux/")), set()).add(r["service"])
    return offers


@pytest.mark.parametrize("version", ["2.2.3", "2.3.0"])
def test_a_2x_version_has_a_cell_for_every_runner_device_arch_and_service(matrix, root, version):
    offers = _runner_offers(root, version)
    services_of = {"vllm": {"vllm"}, "sglang": {"sglang"}, "vllm+sglang": {"vllm", "sglang"},
                   "vllm+k8s": {"vllm"}, "mindie": {"mindie"}}  # fmt: skip
    want = {
        (device, arch, extras)
        for (device, arch), services in offers.items()
        for extras, needs in services_of.items()
        if needs <= services
    }
    got = {(c.device, c.arch, c.extras) for c in matrix.cells if c.version == version}
    assert got == want
    # every non-deprecated backend, version and variant has cells, on exactly its arches
    assert {d for d, _ in offers} == {c.device for c in matrix.cells if c.version == version}
    for device, arch in offers:
        other = "arm64" if arch == "amd64" else "amd64"
        if (device, other) not in offers:
            with pytest.raises(CellError, match=f"runners for linux/{arch} only"):
                matrix.cell(f"v{version}-linux-{other}-{device}-py3.11-vllm-docker")


def test_every_2x_device_spells_its_runner_tag_and_parses_back(matrix):
    for cell in matrix.cells:
        if cell.series == 2:
            assert Device.parse(cell.device) == cell.runner_device
    device = matrix.cell("v2.3.0-linux-arm64-cann9.1-950-py3.11-vllm-docker").runner_device
    assert device == Device("cann", "9.1", "950")
    assert Device.parse("cuda12.9") == Device("cuda", "12.9", "")
    assert Device.parse("dtk25.04") == Device("dtk", "25.04", "")
    assert Device.parse("cann8.2") == Device("cann", "8.2", "")  # no such runner: no such cell
    assert Device.parse("cuda12.9-") is None and Device.parse("CUDA12.9") is None


def test_the_runner_datas_limits_refuse_with_a_reason_naming_its_file(matrix, root):
    data = str(root / "bundles/runners/gpustack-2.3.0.json")
    with pytest.raises(CellError, match="no vllm runner for cann8.3-310p on linux/amd64") as err:
        matrix.cell("v2.3.0-linux-amd64-cann8.3-310p-py3.11-vllm-docker")
    assert data in str(err.value) and "serve mindie" in str(err.value)
    with pytest.raises(CellError, match="cuda12.4 is none of them") as err:
        matrix.cell("v2.3.0-linux-amd64-cuda12.4-py3.11-vllm-docker")  # deprecated upstream
    assert data in str(err.value)
    with pytest.raises(CellError, match="unknown device 'cann8.2'"):
        matrix.cell("v2.3.0-linux-amd64-cann8.2-py3.11-vllm-docker")


def test_a_2x_cell_knows_its_floor_ceiling_and_the_newest_runner(matrix):
    cuda = matrix.cell("v2.3.0-linux-amd64-cuda12.8-py3.11-vllm-docker")
    assert (cuda.cuda, cuda.ceiling, cuda.newest) == ("12.8", "12.9", "13.0")
    assert matrix.cell("v2.3.0-linux-amd64-cuda13.0-py3.11-vllm-docker").ceiling is None
    npu = matrix.cell("v2.3.0-linux-arm64-cann8.2-310p-py3.11-vllm-docker")
    # cann8.3-310p serves mindie only: a 310P host with CANN 8.3 still gets cann8.2's vllm
    assert (npu.runner_device, npu.ceiling, npu.newest) == (Device("cann", "8.2", "310p"), "8.5",
                                                           "9.2")  # fmt: skip
    both = matrix.cell("v2.3.0-linux-arm64-cann8.3-910b-py3.11-vllm+sglang-docker")
    assert (both.ceiling, both.newest) == ("8.5", "9.2")  # the lowest next, the newest of any


def test_a_cells_floor_names_its_toolkit(matrix):
    assert matrix.cell("v2.3.0-linux-arm64-cann8.2-910b-py3.11-vllm-docker").floor == "CANN 8.2"
    assert matrix.cell("v2.3.0-linux-amd64-dtk25.04-py3.11-vllm-docker").floor == "DTK 25.04"
    assert matrix.cell("v0.7.1-linux-amd64-cuda12.4-py3.11-base-pip").floor == "CUDA 12.4"
    assert matrix.cell("v0.7.1-linux-amd64-cpu-py3.11-base-pip").floor == "-"


def test_a_2x_cell_carries_its_vendors_facts_and_run_options(matrix):
    npu = matrix.cell("v2.3.0-linux-arm64-cann8.2-910b-py3.11-vllm-docker")
    assert npu.vendor is not None
    assert (npu.vendor.tool, npu.vendor.runtime, npu.vendor.toolkit) == (
        ("npu-smi", "info"), "ascend", "CANN"
    )  # fmt: skip
    assert "/dev/davinci_manager" in npu.vendor.devices
    assert "/usr/local/Ascend/driver" in npu.vendor.paths
    assert "--runtime ascend" in npu.worker_options()
    driver = "--volume /usr/local/Ascend/driver:/usr/local/Ascend/driver:ro"
    assert driver in npu.worker_options()  # 2.3.0's Add Worker command mounts the driver
    old = matrix.cell("v2.2.3-linux-arm64-cann8.2-910b-py3.11-vllm-docker")
    assert driver not in old.worker_options() and "--runtime ascend" in old.worker_options()
    dtk = matrix.cell("v2.3.0-linux-amd64-dtk26.04-py3.11-vllm-docker").worker_options()
    assert "--env ROCM_PATH=/opt/dtk/.hyhal" in dtk
    dtk = matrix.cell("v2.3.0-linux-amd64-dtk25.04-py3.11-vllm-docker").worker_options()
    assert "--env ROCM_PATH=/opt/dtk" in dtk
    assert matrix.cell("v0.7.1-linux-amd64-cuda12.8-py3.11-base-pip").worker_options() == ()
    for cell in matrix.cells:
        if cell.series == 2:
            assert cell.worker_options(), cell.id
            assert cell.vendor is not None and dict(cell.vendor.sources), cell.id


def test_every_backend_of_the_runner_data_has_a_vendor_table(matrix, root):
    found = {
        r["backend"]
        for version in ("2.2.3", "2.3.0")
        for r in json.loads((root / f"bundles/runners/gpustack-{version}.json").read_text())[
            "runners"
        ]
        if not r["deprecated"]
    }
    assert found and found <= set(matrix.vendors)


def test_a_backend_without_a_vendor_table_has_no_cells_and_says_why(root):
    data = tomllib.loads((root / "bundles/matrix.toml").read_text())
    del data["backends"]["corex"]
    matrix = Matrix(data, runners=root / "bundles/runners")
    assert not [c for c in matrix.cells if c.device.startswith("corex")]
    with pytest.raises(CellError, match=r"no \[backends.corex\] table"):
        matrix.cell("v2.3.0-linux-amd64-corex4.2-py3.11-vllm-docker")


def test_a_2x_version_without_runner_data_has_no_cells_and_names_the_file(root, tmp_path):
    data = tomllib.loads((root / "bundles/matrix.toml").read_text())
    (tmp_path / "gpustack-2.3.0.json").write_bytes(
        (root / "bundles/runners/gpustack-2.3.0.json").read_bytes()
    )
    matrix = Matrix(data, runners=tmp_path)
    assert {c.version for c in matrix.cells} == {"0.6.2", "0.7.1", "2.3.0"}
    with pytest.raises(CellError, match="gpustack-2.2.3.json does not exist yet") as err:
        matrix.cell("v2.2.3-linux-amd64-cuda12.9-py3.11-vllm-docker")
    assert "docs/building.md" in str(err.value)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("version", "npu-smi-table", "version 'npu-smi-table' is none of"),
        ("tool", "npu-smi", "list of strings"),
        ("typo", "x", "unknown keys"),
    ],
)
def test_a_malformed_vendor_table_is_refused(root, key, value, message):
    data = tomllib.loads((root / "bundles/matrix.toml").read_text())
    data["backends"]["cann"][key] = value
    with pytest.raises(CellError, match=r"\[backends.cann\] is malformed") as err:
        Matrix(data, runners=root / "bundles/runners")
    assert message in str(err.value)
