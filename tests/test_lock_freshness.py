"""Every pip cell of the matrix has a committed lock, and it is fresh: the inputs digest it
records equals the digest of the cell's inputs now (requirement, installer, the overrides that
match it, platform, Python). A changed override, requirement or matrix entry makes this test
name the cells to lock again; `invoke bundle --frozen` would refuse them.

No network: the lock is compared with its inputs, not resolved again.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

from gpustack_offline.core.matrix import Cell, Matrix
from gpustack_offline.stages.locks import inputs_for, load_overrides, lock_path, read_lock

# The index is no input (the lock pins every file by sha256), so any URL gives the same digest.
INDEX = "https://pypi.org/simple"

# Pip cells of the matrix that cannot be locked, with the reason. Each one here is a cell the
# matrix should refuse (a [[rules]] entry) or an override should fix; it is listed, never
# skipped silently: the test below fails if such a cell gains a lock or leaves the matrix.
UNLOCKABLE: Mapping[str, str] = {}


def pip_cells(matrix: Matrix) -> list[Cell]:
    return [c for c in matrix.cells if c.method == "pip"]


def lock_problems(cells: Iterable[Cell], overrides_path: Path, locks_dir: Path) -> list[str]:
    """One line per cell whose committed lock is missing, stale or another cell's, naming the
    command that fixes it."""
    overrides = load_overrides(overrides_path)
    problems = []
    for cell in cells:
        if cell.id in UNLOCKABLE:
            continue
        path = lock_path(locks_dir, cell)
        fix = f"run `invoke lock --cell {cell.id}` and commit it"
        if not path.is_file():
            problems.append(f"{cell.id}: no lock at {path}; {fix}")
            continue
        lock = read_lock(path)
        if lock.cell_id != cell.id:
            problems.append(f"{cell.id}: {path} is the lock of {lock.cell_id!r}; {fix}")
        elif lock.inputs_digest != inputs_for(cell, overrides, INDEX).digest():
            problems.append(
                f"{cell.id}: lock {path} is stale (its inputs changed: requirement, "
                f"overrides, installer, platform or Python); {fix}"
            )
    return problems


def test_every_pip_cell_has_a_fresh_committed_lock(matrix, root):
    cells = pip_cells(matrix)
    assert cells, "the matrix has no pip cells"
    problems = lock_problems(cells, root / "bundles/overrides.toml", root / "bundles/locks")
    assert not problems, f"{len(problems)} of {len(cells)} pip cells:\n" + "\n".join(problems)


def test_no_committed_lock_belongs_to_no_cell(matrix, root):
    """A lock left behind by a cell the matrix dropped would be reviewed and never used."""
    wanted = {c.id for c in pip_cells(matrix)}
    committed = {p.parent.name for p in (root / "bundles/locks").glob("*/pylock.toml")}
    assert committed <= wanted, f"locks of no pip cell: {sorted(committed - wanted)}"


def test_unlockable_cells_are_pip_cells_without_a_lock(matrix, root):
    """The list of cells that cannot be locked stays true: each is a pip cell of the matrix and
    has no lock (a cell that now locks leaves the list)."""
    cells = {c.id: c for c in pip_cells(matrix)}
    for cell_id, reason in UNLOCKABLE.items():
        assert reason, cell_id
        assert cell_id in cells, f"{cell_id} is no pip cell of the matrix: drop it from UNLOCKABLE"
        path = lock_path(root / "bundles/locks", cells[cell_id])
        assert not path.exists(), f"{cell_id} has a lock now: drop it from UNLOCKABLE"


def test_a_changed_override_makes_a_lock_stale(matrix, root, tmp_path):
    """The check can fail: a committed lock under a changed override is reported stale, with
    the command that refreshes it; under the committed overrides the same copy is fresh."""
    cell = matrix.cell("v0.7.1-linux-amd64-cpu-py3.11-base-pip")
    locks = tmp_path / "locks"
    copy = lock_path(locks, cell)
    copy.parent.mkdir(parents=True)
    shutil.copyfile(lock_path(root / "bundles/locks", cell), copy)
    overrides = tmp_path / "overrides.toml"
    shutil.copyfile(root / "bundles/overrides.toml", overrides)
    assert lock_problems([cell], overrides, locks) == []

    with overrides.open("a") as f:
        f.write('\n[[override]]\nselect = "v0.7.1-linux-amd64-*"\nconstraints = ["torch<2.9"]\n')
    problems = lock_problems([cell], overrides, locks)
    assert len(problems) == 1
    assert "is stale" in problems[0] and f"`invoke lock --cell {cell.id}`" in problems[0]
    # the same override leaves a cell it does not select fresh
    other = matrix.cell("v0.7.1-linux-arm64-cpu-py3.11-base-pip")
    lock_path(locks, other).parent.mkdir()
    shutil.copyfile(lock_path(root / "bundles/locks", other), lock_path(locks, other))
    assert lock_problems([other], overrides, locks) == []


def test_a_missing_lock_is_named_with_its_fix(matrix, root, tmp_path):
    cell = matrix.cell("v0.6.2-windows-amd64-cpu-py3.12-audio-pip")
    problems = lock_problems([cell], root / "bundles/overrides.toml", tmp_path)
    assert problems == [
        f"{cell.id}: no lock at {lock_path(tmp_path, cell)}; "
        f"run `invoke lock --cell {cell.id}` and commit it"
    ]
