from __future__ import annotations

import pytest

from gpustack_offline.core.errors import LockError
from gpustack_offline.stages.locks import (
    Inputs,
    ensure_lock,
    inputs_for,
    load_overrides,
    lock_path,
    read_lock,
)


def test_overrides_apply_to_matching_cells_only(matrix, tmp_path):
    path = tmp_path / "overrides.toml"
    path.write_text(
        '[[override]]\nselect = "*-audio-*"\nconstraints = ["torch<2.11"]\n'
        'build-constraints = ["setuptools<81"]\n'
        '[[override]]\nselect = ["v0.7.*"]\nextra-requirements = ["cachetools"]\n'
    )
    overrides = load_overrides(path)
    audio = inputs_for(matrix.cell("v0.7.1-linux-amd64-cpu-py3.11-audio-pip"), overrides, "u")
    base = inputs_for(matrix.cell("v0.6.2-linux-amd64-cpu-py3.11-base-pip"), overrides, "u")
    assert audio.requirements == ("gpustack[audio]==0.7.1", "cachetools")
    assert audio.constraints == ("torch<2.11",) and audio.build_constraints == ("setuptools<81",)
    assert base.requirements == ("gpustack==0.6.2",) and base.constraints == ()


def test_unknown_override_key_is_an_error(tmp_path):
    path = tmp_path / "overrides.toml"
    path.write_text('[[override]]\nselect = "*"\nconstraint = ["x"]\n')
    with pytest.raises(LockError, match="unknown keys \\['constraint'\\]"):
        load_overrides(path)


def test_inputs_digest_changes_with_what_decides_the_wheel_set(matrix):
    cell = matrix.cell("v0.7.1-linux-amd64-cpu-py3.11-base-pip")
    a = inputs_for(cell, [], "https://pypi.org/simple")
    for changed in ({"constraints": ("torch<2",)}, {"platform": "aarch64-manylinux_2_35"},
                    {"python": "3.12"}, {"requirements": ("gpustack[audio]==0.7.1",)}):  # fmt: skip
        assert Inputs(**{**a.__dict__, **changed}).digest() != a.digest(), changed


def test_a_site_mirror_index_keeps_the_committed_lock_current(matrix, root, tmp_path):
    """The files are pinned by sha256: where they come from is no input, so a site that mirrors
    PyPI builds frozen from the committed lock."""
    cell = matrix.cell("v0.7.1-linux-amd64-cpu-py3.11-base-pip")
    overrides = load_overrides(root / "bundles/overrides.toml")
    mirror = inputs_for(cell, overrides, "https://user:token@pypi-mirror.site.internal/simple")
    assert mirror.digest() == inputs_for(cell, overrides, "https://pypi.org/simple").digest()
    lock, state = ensure_lock(cell, mirror, root / "bundles/locks", tmp_path, frozen=True)
    assert state == "used" and lock.cell_id == cell.id


def test_frozen_build_refuses_a_missing_lock(matrix, tmp_path):
    cell = matrix.cell("v0.7.1-linux-amd64-cpu-py3.11-base-pip")
    with pytest.raises(LockError, match="no lock for .*invoke lock --cell"):
        ensure_lock(cell, inputs_for(cell, [], "u"), tmp_path, tmp_path, frozen=True)


def test_frozen_build_refuses_a_stale_lock(matrix, root, tmp_path):
    cell = matrix.cell("v0.7.1-linux-amd64-cpu-py3.11-base-pip")
    committed = lock_path(root / "bundles/locks", cell)
    copy = lock_path(tmp_path, cell)
    copy.parent.mkdir(parents=True)
    copy.write_text(committed.read_text())
    inputs = inputs_for(
        cell, load_overrides(root / "bundles/overrides.toml"), "https://pypi.org/simple"
    )
    lock, state = ensure_lock(cell, inputs, tmp_path, tmp_path, frozen=True)
    assert state == "used" and lock.packages
    changed = inputs_for(cell, [], "https://pypi.org/simple")
    with pytest.raises(LockError, match="is stale"):
        ensure_lock(cell, changed, tmp_path, tmp_path, frozen=True)


def test_committed_locks_name_their_cell_and_pin_gpustack(matrix, root):
    paths = sorted((root / "bundles/locks").glob("*/pylock.toml"))
    assert paths, "no committed locks"
    for path in paths:
        lock = read_lock(path)
        cell = matrix.cell(lock.cell_id)
        assert path.parent.name == cell.id
        gpustack = [p for p in lock.packages if p.name == "gpustack"]
        assert gpustack and gpustack[0].version == cell.version
        assert all(f.sha256 for p in lock.packages for f in p.wheels)
