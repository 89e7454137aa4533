from __future__ import annotations

import pytest

from gpustack_offline.core.errors import OptionError
from gpustack_offline.core.options import Options, resolve


def _project(tmp_path, table: str = ""):
    (tmp_path / "pyproject.toml").write_text(f"[tool.gpustack-offline]\n{table}")
    return tmp_path


def test_defaults_apply_when_nothing_is_set(tmp_path):
    opts = resolve(_project(tmp_path), env={}, cli={})
    assert opts.jobs == Options().jobs and opts.index_url == "https://pypi.org/simple"


def test_cascade_pyproject_then_env_then_cli(tmp_path):
    root = _project(tmp_path, 'jobs = 2\ndist-dir = "out"\nindex-url = "http://a/simple"\n')
    assert resolve(root, env={}, cli={}).jobs == 2
    env = {"GPUSTACK_OFFLINE_JOBS": "3", "GPUSTACK_OFFLINE_DIST_DIR": "envdist"}
    opts = resolve(root, env=env, cli={})
    assert (opts.jobs, opts.dist_dir, opts.index_url) == (3, "envdist", "http://a/simple")
    opts = resolve(root, env=env, cli={"jobs": 7, "dist_dir": None})
    assert (opts.jobs, opts.dist_dir) == (7, "envdist")


def test_unknown_pyproject_key_is_an_error(tmp_path):
    with pytest.raises(OptionError, match="unknown option 'job'.*known options:.*jobs"):
        resolve(_project(tmp_path, "job = 2\n"), env={}, cli={})


def test_unknown_env_variable_with_our_prefix_is_an_error(tmp_path):
    with pytest.raises(OptionError, match="GPUSTACK_OFFLINE_CACHEDIR"):
        resolve(_project(tmp_path), env={"GPUSTACK_OFFLINE_CACHEDIR": "/x"}, cli={})


def test_bad_values_are_errors(tmp_path):
    with pytest.raises(OptionError, match="whole number"):
        resolve(_project(tmp_path), env={"GPUSTACK_OFFLINE_JOBS": "many"}, cli={})
    with pytest.raises(OptionError, match="true or false"):
        resolve(_project(tmp_path), env={"GPUSTACK_OFFLINE_FROZEN": "maybe"}, cli={})


def test_bool_env_values(tmp_path):
    assert resolve(_project(tmp_path), env={"GPUSTACK_OFFLINE_FROZEN": "yes"}, cli={}).frozen


def test_relative_paths_resolve_against_the_project(tmp_path):
    opts = resolve(_project(tmp_path, 'dist-dir = "out"\n'), env={}, cli={})
    assert opts.path("dist_dir", tmp_path) == tmp_path / "out"


def test_download_retry_settings_are_options_in_the_cascade(tmp_path):
    from gpustack_offline.core.downloads import RetryPolicy

    _project(tmp_path, "download-attempts = 2\ndownload-read-timeout = 7.5\n")
    opts = resolve(tmp_path, env={"GPUSTACK_OFFLINE_DOWNLOAD_ATTEMPTS": "4"})
    policy = RetryPolicy.from_options(opts)
    assert (policy.attempts, policy.read_timeout, policy.backoff) == (4, 7.5, 1.0)
    with pytest.raises(OptionError, match="download-attempts.*too small"):
        resolve(tmp_path, env={"GPUSTACK_OFFLINE_DOWNLOAD_ATTEMPTS": "0"})
    with pytest.raises(OptionError, match="GPUSTACK_OFFLINE_DOWNLOAD_BACKOFF.*a number"):
        resolve(tmp_path, env={"GPUSTACK_OFFLINE_DOWNLOAD_BACKOFF": "soon"})
    with pytest.raises(OptionError, match="unknown option 'GPUSTACK_OFFLINE_DOWNLOAD_ATTEMTPS'"):
        resolve(tmp_path, env={"GPUSTACK_OFFLINE_DOWNLOAD_ATTEMTPS": "3"})
