"""Every user-facing error, driven through `invoke` as a user runs it: one clear message naming
the thing and the fix, exit status 2, no traceback, and nothing half-written under a final name.

The registry cases use loopback distribution registries (the `registry-mirror` option standing in
for Docker Hub) holding gpustack/gpustack:v0.7.1-cpu for linux/amd64 only; the disk-full cases
mount a 2 MB tmpfs as dist/ or as the cache.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from support.registry_fixture import (
    AMD64,
    OCI_LAYER,
    Blob,
    DistributionRegistry,
    Pusher,
    _free_port,
    bcrypt_htpasswd,
    make_image,
    plain_registry,
    tar_layer,
)

from gpustack_offline.core.files import sha256_file
from gpustack_offline.stages import tools
from gpustack_offline.stages.registry import host_env_name

INVOKE = Path(sys.executable).with_name("invoke")
PIP_CELL = "v0.7.1-linux-amd64-cpu-py3.11-base-pip"
DOCKER_CELL = "v0.7.1-linux-amd64-cpu-py3.11-base-docker"
ARM_DOCKER_CELL = "v0.7.1-linux-arm64-cpu-py3.11-base-docker"
HEX = re.compile(r"[0-9a-f]{64}")


@pytest.fixture
def area(tmp_path: Path) -> dict[str, str]:
    """An environment with its own dist/, cache and pins, and no GPUSTACK_OFFLINE_* of the
    caller's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUSTACK_OFFLINE_")}
    env.update(
        GPUSTACK_OFFLINE_DIST_DIR=str(tmp_path / "dist"),
        GPUSTACK_OFFLINE_CACHE_DIR=str(tmp_path / "cache"),
        GPUSTACK_OFFLINE_IMAGES_PINS_DIR=str(tmp_path / "pins"),
        GPUSTACK_OFFLINE_PROGRESS="false",
        DOCKER_CONFIG=str(tmp_path / "docker-config"),  # no credentials of the host's
    )
    return env


def invoke(root: Path, env: Mapping[str, str], *args: str) -> str:
    """Run `invoke ARGS`; it must fail with status 2 and no traceback. Returns the output with
    rich's line wrapping undone."""
    proc = subprocess.run(
        [INVOKE, *args], cwd=root, env=dict(env), capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    print(out)  # what the user sees (pytest -s)
    assert proc.returncode == 2, out
    assert "Traceback" not in out, out
    assert re.search(r"^error: ", out, re.M), out
    return re.sub(r"\s*\n\s*", " ", out)


def nothing_left(env: Mapping[str, str]) -> None:
    """No bundle under dist/ (finished or not), and every blob under a final name is whole."""
    dist = Path(env["GPUSTACK_OFFLINE_DIST_DIR"])
    if dist.is_dir():
        assert not list(dist.iterdir()), f"left in dist/: {list(dist.iterdir())}"
    blobs = Path(env["GPUSTACK_OFFLINE_CACHE_DIR"]) / "blobs" / "sha256"
    for path in blobs.glob("*") if blobs.is_dir() else []:
        assert HEX.fullmatch(path.name), f"a temporary file left in the blob store: {path}"
        assert sha256_file(path) == path.name, f"{path} is damaged"


# -- no registry needed -----------------------------------------------------------------------


def test_an_unknown_cell_names_the_axis_value_and_the_nearest_cells(root, area):
    out = invoke(root, area, "bundle", "--cell", "v0.7.1-linux-amd64-tpu-py3.11-base-pip")
    assert "'tpu'" in out and "nearest valid: v0.7.1-linux-amd64-c" in out
    nothing_left(area)


def test_an_impossible_cell_names_the_rule_and_the_nearest_cells(root, area):
    out = invoke(root, area, "bundle", "--cell", "v0.7.1-windows-arm64-cpu-py3.11-base-pip")
    assert "impossible: GPUStack's Windows tools" in out
    assert "nearest valid: v0.7.1-windows-amd64-cpu-py3.11-base-pip" in out
    nothing_left(area)


def test_an_unsupported_target_python_lists_the_supported_ones(root, area):
    out = invoke(root, area, "bundle", "--python", "3.9")
    assert "unknown python 3.9 (known: 3.10, 3.11, 3.12)" in out
    out = invoke(root, area, "bundle", "--cell", "v0.7.1-linux-amd64-cpu-py3.13-base-pip")
    assert "unknown python '3.13'" in out and "v0.7.1-linux-amd64-cpu-py3.12-base-pip" in out
    nothing_left(area)


def test_a_misspelt_option_variable_is_named_with_the_right_spelling(root, area):
    out = invoke(root, {**area, "GPUSTACK_OFFLINE_JOB": "3"}, "matrix")
    assert "unknown option 'GPUSTACK_OFFLINE_JOB'; did you mean 'GPUSTACK_OFFLINE_JOBS'?" in out
    assert "GPUSTACK_OFFLINE_CACHE_DIR" in out  # the list is spelt as the variables are
    out = invoke(root, {**area, "GPUSTACK_OFFLINE_JOBS": "many"}, "matrix")
    assert "GPUSTACK_OFFLINE_JOBS: option jobs must be a whole number, not 'many'" in out


def test_a_malformed_matrix_names_the_file_and_line(root, area, tmp_path):
    broken = tmp_path / "matrix.toml"
    text = (root / "bundles" / "matrix.toml").read_text()
    line = text.splitlines().index('arch = ["amd64", "arm64"]') + 1
    broken.write_text(text.replace('arch = ["amd64", "arm64"]', 'arch = ["amd64" "arm64"]'))
    out = invoke(root, {**area, "GPUSTACK_OFFLINE_MATRIX": str(broken)}, "matrix")
    assert f"{broken}: not valid TOML" in out
    assert f"(at line {line}, column" in out, out
    # valid TOML, wrong data: the file, the line of the rule, and the key
    lines = text.splitlines()
    rule = lines.index(
        'reason = "the vllm extra installs CUDA builds of vLLM and torch; it needs a cuda device"'
    )
    header = max(i for i in range(rule) if lines[i] == "[[rules]]") + 1
    broken.write_text(text.replace('reason = "the vllm extra', 'rason = "the vllm extra'))
    out = invoke(root, {**area, "GPUSTACK_OFFLINE_MATRIX": str(broken)}, "matrix")
    assert f"{broken}, line {header}: rule " in out and "'reason'" in out, out


def test_a_malformed_or_missing_pin_file_names_the_file_line_and_fix(root, area):
    pins = Path(area["GPUSTACK_OFFLINE_IMAGES_PINS_DIR"])
    out = invoke(root, area, "bundle", "--cell", DOCKER_CELL)
    assert f"{pins}/gpustack-0.7.1.toml does not exist" in out and "`invoke lock`" in out
    pins.mkdir()
    (pins / "gpustack-0.7.1.toml").write_text('schema = 1\n\n[tags\nx = "y"\n')
    out = invoke(root, area, "bundle", "--cell", DOCKER_CELL)
    assert f"{pins}/gpustack-0.7.1.toml: not valid TOML" in out and "(at line 3, column" in out
    nothing_left(area)


def test_a_malformed_overrides_file_names_the_file_and_position(root, area, tmp_path):
    broken = tmp_path / "overrides.toml"
    broken.write_text('[[override]]\nselect = "*"\nconstraints = ["torch<2.11"\n')
    out = invoke(root, {**area, "GPUSTACK_OFFLINE_OVERRIDES": str(broken)}, "bundle",
                 "--cell", PIP_CELL)  # fmt: skip
    assert f"{broken}: not valid TOML" in out and "(at " in out
    nothing_left(area)


def test_a_missing_docker_daemon_names_the_socket_and_the_fix(root, area, tmp_path):
    socket = tmp_path / "no-docker.sock"
    env = {**area, "DOCKER_HOST": f"unix://{socket}"}
    out = invoke(root, env, "images.base", "--arch", "amd64")
    assert f"cannot reach the Docker Engine at unix://{socket} (DOCKER_HOST)" in out
    assert "No such file or directory" in out and "Fix: point DOCKER_HOST" in out


def test_the_tool_venv_index_password_stays_off_uv_argument_lists(matrix, monkeypatch, tmp_path):
    """The index URL goes to uv through UV_INDEX_URL (an environment is not world-readable in
    /proc, an argument list is, and the runner logs it); the venv's cache key has no password."""
    calls: list[tuple[list[str], dict[str, str]]] = []

    def runner(argv, *, env, **_kw):
        calls.append(([str(a) for a in argv], dict(env)))
        if "venv" in argv:  # what uv would leave: the venv's python
            (Path(argv[-1]) / "bin").mkdir(parents=True)
            (Path(argv[-1]) / "bin" / "python").touch()

    monkeypatch.setattr(tools, "run", runner)
    cell = matrix.cell(PIP_CELL)
    password = secrets.token_urlsafe(12)
    index = f"https://site-user:{password}@pypi.example/simple"
    python = tools.tool_venv(cell, [], tmp_path, index)
    assert [argv[3:5] for argv, _ in calls] == [["venv", "--quiet"], ["pip", "install"]]
    for argv, _ in calls:
        assert not any(password in a or "pypi.example" in a for a in argv), argv
    assert calls[1][1]["UV_INDEX_URL"] == index
    assert password not in str(python)
    # a new password is the same venv: nothing runs again
    again = tools.tool_venv(cell, [], tmp_path, "https://site-user:rotated@pypi.example/simple")
    assert again == python and len(calls) == 2
    # another index is another venv
    other = tools.tool_venv(cell, [], tmp_path, "https://other.example/simple")
    assert other != python and len(calls) == 4


# -- registries ---------------------------------------------------------------------------------

LAYER_SIZE = 3 << 20  # more than the 2 MB tmpfs


def _image() -> object:
    data, diff = tar_layer({"opt/bad-inputs/blob": os.urandom(LAYER_SIZE)})
    return make_image(AMD64, [(Blob(OCI_LAYER, data), diff)])


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Iterator[DistributionRegistry]:
    """Docker Hub's stand-in, with gpustack/gpustack:v0.7.1-cpu for linux/amd64 only."""
    with plain_registry(tmp_path_factory.mktemp("bad-inputs-registry")) as registry:
        Pusher(registry.url).tag("gpustack/gpustack", "v0.7.1-cpu", [_image()])  # type: ignore[list-item]
        yield registry


@pytest.fixture(scope="module")
def private(tmp_path_factory) -> Iterator[tuple[DistributionRegistry, str]]:
    """A registry with Basic auth; yields it and its user's password."""
    root = tmp_path_factory.mktemp("bad-inputs-basic")
    password = secrets.token_urlsafe(12)
    (root / "htpasswd").write_text(bcrypt_htpasswd("site-user", password))
    auth = {"htpasswd": {"realm": "fixture", "path": str(root / "htpasswd")}}
    with plain_registry(root / "registry", auth) as registry:
        yield registry, password


def pinned(root: Path, env: dict[str, str], registry: DistributionRegistry) -> dict[str, str]:
    env = {**env, "GPUSTACK_OFFLINE_REGISTRY_MIRROR": registry.host}
    proc = subprocess.run([INVOKE, "lock", "--cell", DOCKER_CELL], cwd=root, env=env,
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return env


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "2m") -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.integration
def test_an_image_without_the_platform_lists_the_platforms_it_has(root, area, upstream):
    env = {**area, "GPUSTACK_OFFLINE_REGISTRY_MIRROR": upstream.host}
    out = invoke(root, env, "lock", "--cell", ARM_DOCKER_CELL)
    assert "not published for linux/arm64" in out and "linux/amd64" in out
    assert not list(Path(area["GPUSTACK_OFFLINE_IMAGES_PINS_DIR"]).glob("*.toml"))
    nothing_left(area)


@pytest.mark.integration
def test_an_unreachable_upstream_names_the_host_and_what_to_check(root, area):
    host = f"127.0.0.1:{_free_port()}"
    out = invoke(root, {**area, "GPUSTACK_OFFLINE_REGISTRY_MIRROR": host},
                 "lock", "--cell", DOCKER_CELL)  # fmt: skip
    assert f"error: cannot reach {host}: connection refused. Check the network" in out, out
    assert "ConnectionPool" not in out and "Max retries" not in out, out
    nothing_left(area)


@pytest.mark.integration
def test_bad_registry_credentials_name_the_host_and_the_variable(root, area, private):
    registry, password = private
    env = {
        **area,
        "GPUSTACK_OFFLINE_REGISTRY_MIRROR": registry.host,
        host_env_name(registry.host): "site-user:not-the-password",
    }
    out = invoke(root, env, "lock", "--cell", DOCKER_CELL)
    assert registry.host in out and host_env_name(registry.host) in out, out
    assert "not-the-password" not in out and password not in out
    # the same through a Docker config
    config = Path(area["DOCKER_CONFIG"])
    config.mkdir()
    auth = base64.b64encode(b"site-user:wrong-again").decode()
    (config / "config.json").write_text(f'{{"auths": {{"{registry.host}": {{"auth": "{auth}"}}}}}}')
    from_config = {k: v for k, v in env.items() if k != host_env_name(registry.host)}
    out = invoke(root, from_config, "lock", "--cell", DOCKER_CELL)
    assert registry.host in out and "wrong-again" not in out and auth not in out, out
    nothing_left(area)


@pytest.mark.integration
def test_a_full_dist_disk_names_the_path_and_the_space(root, area, upstream, tmp_path):
    env = pinned(root, area, upstream)
    with tmpfs(Path(env["GPUSTACK_OFFLINE_DIST_DIR"])) as dist:
        out = invoke(root, env, "bundle", "--cell", DOCKER_CELL)
        assert f"no space left on {dist} for {dist}/{DOCKER_CELL}" in out, out
        assert re.search(
            r"\d+\.\d MB of it was written .* needs more than that; \d+\.\d MB is free", out
        ), out
        assert "dist-dir" in out
        nothing_left(env)  # the staged folder is gone too
    # the layer is in the cache, whole, and the next build with room uses it
    blobs = Path(env["GPUSTACK_OFFLINE_CACHE_DIR"]) / "blobs" / "sha256"
    assert any(p.stat().st_size > LAYER_SIZE for p in blobs.iterdir())


@pytest.mark.integration
def test_a_full_cache_disk_names_the_blob_and_the_space(root, area, upstream, tmp_path):
    env = pinned(root, area, upstream)
    with tmpfs(Path(env["GPUSTACK_OFFLINE_CACHE_DIR"])) as cache:
        out = invoke(root, env, "bundle", "--cell", DOCKER_CELL)
        assert f"no space left on {cache} for {cache}/blobs/sha256" in out, out
        assert re.search(
            r"\d+\.\d MB of it was written .* needs more than that; \d+\.\d MB is free", out
        ), out
        nothing_left(env)
    shutil.rmtree(env["GPUSTACK_OFFLINE_CACHE_DIR"], ignore_errors=True)
