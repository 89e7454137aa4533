from __future__ import annotations

import json

import pytest

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
            assert (cell.cuda or cell.rocm) and float(cell.cuda or cell.rocm) >= (
                12.8 if cell.cuda else 7.0
            )


def test_a_2x_cell_names_its_services_and_has_a_rocm_floor(matrix):
    cell = matrix.cell("v2.3.0-linux-amd64-rocm7.0-py3.11-vllm+sglang-docker")
    assert (cell.series, cell.rocm, cell.cuda, cell.extra_names) == (
        2, "7.0", None, ("vllm", "sglang")
    )  # fmt: skip
    with pytest.raises(CellError, match="Docker only"):
        matrix.cell("v2.3.0-linux-amd64-cuda12.9-py3.11-vllm-pip")
    with pytest.raises(CellError, match="ROCm runners for linux/amd64 only"):
        matrix.cell("v2.3.0-linux-arm64-rocm7.0-py3.11-vllm-docker")


def test_both_required_versions_and_all_pythons_are_in_the_matrix(matrix):
    versions = {c.version for c in matrix.cells}
    assert {"0.6.2", "0.7.1"} <= versions
    assert {c.python for c in matrix.cells} == {"3.10", "3.11", "3.12"}


def test_arch_flag_selects_default_version_and_python(matrix):
    cells = matrix.select(arch="arm64")
    assert cells
    assert {(c.version, c.python, c.arch) for c in cells} == {("0.7.1", "3.11", "arm64")}
    assert {c.device for c in cells} == {"cpu", "cuda12.4", "cuda12.8"}


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
    import tomllib

    data = tomllib.loads((root / "bundles/matrix.toml").read_text())
    data["rules"].append({"when": {"os": ["macos"]}, "require": {}, "reason": "x"})
    with pytest.raises(CellError, match="unknown os values"):
        Matrix(data)


def test_a_scalar_axis_value_is_named_as_such_not_blamed_on_a_rule(root):
    import tomllib

    data = tomllib.loads((root / "bundles/matrix.toml").read_text())
    data["axes"]["arch"] = "amd64"
    with pytest.raises(CellError, match=r"\[axes\] arch must be a list of strings") as err:
        Matrix(data)
    assert "rule" not in str(err.value) and '["amd64"]' in str(err.value)


def test_a_scalar_rule_value_is_named_with_the_rule(root):
    import tomllib

    data = tomllib.loads((root / "bundles/matrix.toml").read_text())
    data["rules"].append({"when": {"os": "linux"}, "require": {"arch": ["amd64"]}, "reason": "x"})
    with pytest.raises(CellError, match=r"rule \d+ \(\[\[rules\]\]\) when\.os must be a list"):
        Matrix(data)


@pytest.mark.parametrize("schema", [2, 0, "1"])
def test_an_unknown_matrix_schema_is_refused(root, schema):
    import tomllib

    data = tomllib.loads((root / "bundles/matrix.toml").read_text())
    data["schema"] = schema
    with pytest.raises(CellError, match=f"unknown schema {schema!r}; this gpustack-offline"):
        Matrix(data)
