"""The target side of the Docker install method: scripts/install.sh and scripts/preflight.sh on a
docker bundle, run for real with bash against this host's Docker Engine.

The bundle carries a real `images/` export folder, written by `images.export_images` from an image
pulled off the loopback hub: the runnable Debian fixture image with a label of its own, so its
image ID is this module's alone and removing it never disturbs another test's copy. It is named
in Docker Hub short form, as upstream's `gpustack/gpustack:v0.7.1-cpu` is. The site registry is
the plain loopback one. The only fake is `nvidia-smi` (this host has no NVIDIA driver); a host
without the `docker` CLI is a PATH of links to everything on this one but docker.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from support.registry_fixture import (
    DOCKER_MANIFEST,
    OCI_MANIFEST,
    DistributionRegistry,
    Hub,
    runnable,
)
from support.upstream import run_gpustack
from test_scripts import (
    HOST_ARCH,
    SCRIPTS,
    build_gpustack_wheel,
    bundle_env,
    check,
    fake_nvidia_smi,
    make_bundle,
    render_readme,
    run_script,
    sha256_file,
    write_sha256sums,
)

from gpustack_offline.bundle.assemble import bundle_env as bundle_env_of
from gpustack_offline.core.downloads import BlobStore
from gpustack_offline.core.matrix import Cell, Matrix
from gpustack_offline.stages.images import PUSH_LIST, export_images, push_list, write_layout_tar
from gpustack_offline.stages.registry import Reference, Registry

# The loaded name: Docker Hub short form, unique to this module.
IMAGE = "gpustack-offline-test/runnable:docker-bundle"
IMAGE_ARCHIVE = "images"
OLD_IMAGE_ARCHIVE = "images/images.tar"  # what bundles held before the folder
HELLO = "hello from the gpustack-offline fixture image"
NO_CONFIG = {"DOCKER_CONFIG": "/nonexistent/gpustack-offline-tests"}

# ---------------------------------------------------------------------------------------------
# The archive and the bundle


@dataclasses.dataclass(frozen=True)
class Archive:
    path: Path
    image_id: str  # what `docker image inspect` says after loading: the config digest


@pytest.fixture(scope="module")
def archive(hub: Hub, runnable_image, tmp_path_factory: pytest.TempPathFactory) -> Archive:
    """The export folder holding IMAGE for linux/amd64, made the way a build makes it."""
    variant = runnable("gpustack-offline-test/runnable")  # same layers, its own config
    hub.push("fixture/runnable", "docker-bundle", [variant], index=False)
    root = tmp_path_factory.mktemp("docker-archive")
    store = BlobStore(root / "cache")
    pulled = Registry(store, env=NO_CONFIG).pull(
        hub.ref("fixture/runnable:docker-bundle"), "linux/amd64"
    )
    image = dataclasses.replace(pulled, reference=Reference.parse(IMAGE))
    export_images([image], store, root / "images")
    return Archive(root / "images", f"sha256:{image.config.hex}")


SERVER_2X = "gpustack/gpustack:v2.3.0"
BENCHMARK_2X = "gpustack/benchmark-runner:v0.0.9"


@pytest.fixture(scope="module")
def archive_2x(archive: Archive, tmp_path_factory: pytest.TempPathFactory) -> Archive:
    """The same image under two of upstream's 2.x names, the server and the benchmark runner,
    in one export folder, so a namespace change shows on both."""
    root = tmp_path_factory.mktemp("docker-archive-2x")
    manifest = json.loads((archive.path / "manifest.json").read_text())
    manifest.append({**manifest[0], "RepoTags": [BENCHMARK_2X]})
    manifest[0] = {**manifest[0], "RepoTags": [SERVER_2X]}
    index = json.loads((archive.path / "index.json").read_text())
    entry = index["manifests"][0]
    index["manifests"] = [
        {**entry, "annotations": {"io.containerd.image.name": f"docker.io/{name}",
                                  "org.opencontainers.image.ref.name": name.split(":")[1]}}
        for name in (SERVER_2X, BENCHMARK_2X)
    ]  # fmt: skip
    for path in sorted(archive.path.rglob("*")):
        if path.is_file() and path.name not in ("manifest.json", "index.json"):
            _link(path, root / "images" / path.relative_to(archive.path))
    (root / "images" / "manifest.json").write_text(json.dumps(manifest))
    (root / "images" / "index.json").write_text(json.dumps(index))
    return Archive(root / "images", archive.image_id)


def _link(src: Path, dst: Path) -> None:
    """Same bytes, no copy; never written to (a test that alters a file replaces it)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def make_docker_bundle(
    where: Path, archive: Path, images: str = IMAGE, name: str = IMAGE_ARCHIVE, **overrides: str
) -> Path:
    """A docker bundle as the build lays it out: the export folder (or, with `name` =
    OLD_IMAGE_ARCHIVE, an older bundle's tar), bundle.env with INSTALL_METHOD, IMAGE_ARCHIVE and
    IMAGES, the scripts, the READMEs and SHA256SUMS; no wheels."""
    env = bundle_env(**{"INSTALL_METHOD": "docker", **overrides})
    env.update(IMAGE_ARCHIVE=name, IMAGES=images)
    bundle = where / "bundle"
    if archive.is_dir():
        for path in sorted(archive.rglob("*")):
            if path.is_file():
                _link(path, bundle / name / path.relative_to(archive))
    else:
        _link(archive, bundle / name)
    if (bundle / name / "index.json").is_file():  # the build's upload list, as it writes it
        (bundle / PUSH_LIST).write_text(push_list(bundle / name))
        env["IMAGE_PUSH"] = PUSH_LIST
    # As the build writes it: plain KEY=value lines (IMAGES is comma-separated).
    (bundle / "bundle.env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    (bundle / "manifest.json").write_text(json.dumps({"cell": env["BUNDLE_CELL"]}) + "\n")
    for name in ("install.sh", "check-sums.sh", "preflight.sh", "check-tools-archive.py"):
        shutil.copy2(SCRIPTS / name, bundle / name)
    for name in ("README.md", "README.zh-CN.md"):
        (bundle / name).write_text(render_readme(SCRIPTS / name, env), encoding="utf-8")
    write_sha256sums(bundle)
    return bundle


def make_2x_bundle(
    where: Path, archive: Path, cell: Cell, images: str = IMAGE, **overrides: str
) -> Path:
    """A GPUStack 2.x bundle of `cell` as the build writes it: bundle.env with the device's
    facts (`assemble.bundle_env`), the worker's options file, the archive and scripts."""
    env = {**bundle_env_of(cell), "TARGET_ARCH": HOST_ARCH, **overrides}
    bundle = make_docker_bundle(where, archive, images, **env)
    if env["WORKER_OPTIONS"]:
        options = "".join(f"{o}\n" for o in cell.worker_options())
        (bundle / env["WORKER_OPTIONS"]).write_text(options)
        write_sha256sums(bundle)
    return bundle


@pytest.fixture()
def dummy_archive(tmp_path: Path) -> Path:
    """For tests that never reach `docker load`."""
    path = tmp_path / "dummy"
    path.mkdir()
    (path / "manifest.json").write_bytes(b"not loaded by these tests\n")
    return path


# ---------------------------------------------------------------------------------------------
# Docker


def docker(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=300, check=check
    )


def image_id(name: str) -> str | None:
    proc = docker("image", "inspect", "--format", "{{.Id}}", name, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def remove_image(name_or_id: str) -> None:
    docker("rmi", "--force", name_or_id, check=False)


@pytest.fixture()
def engine(archive: Archive) -> Iterator[Archive]:
    """IMAGE is not in the engine before the test, and neither it nor any tag the test gave its
    ID is there after: removing the ID with --force drops every name it has."""
    remove_image(archive.image_id)  # left by an interrupted run: the ID is fixed
    remove_image(IMAGE)
    assert image_id(IMAGE) is None
    yield archive
    remove_image(archive.image_id)
    assert image_id(archive.image_id) is None


def install(bundle: Path, *args: str, **kw) -> subprocess.CompletedProcess[str]:
    """install.sh with the prefix (where docker.env goes) beside the bundle, not /opt/gpustack."""
    return run_script(bundle, "install.sh", "--prefix", str(prefix_of(bundle)), *args, **kw)


def prefix_of(bundle: Path) -> Path:
    return bundle.parent / "prefix"


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("install.sh: error:")]
    return line


def run_line(stdout: str) -> list[str]:
    """The `docker run` line install.sh prints, as its argument list."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("docker run "))
    words: list[str] = []
    for line in lines[start:]:
        words += line.strip().removesuffix("\\").split()
        if not line.endswith("\\"):
            return words
    raise AssertionError(stdout)


def preflight(bundle: Path, **kw) -> tuple[int, dict]:
    proc = run_script(bundle, "preflight.sh", "--json", **kw)
    assert proc.stdout.count("\n") == 1, proc.stdout + proc.stderr
    return proc.returncode, json.loads(proc.stdout)


# ---------------------------------------------------------------------------------------------
# install.sh: load, run, push


@pytest.mark.integration
def test_install_loads_the_image_and_it_runs_with_no_network(
    tmp_path: Path, engine: Archive
) -> None:
    bundle = make_docker_bundle(tmp_path, engine.path)

    proc = install(bundle)

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "preflight: passed" in proc.stdout
    assert f"Loaded image: {IMAGE}" in proc.stdout
    assert re.search(rf"^  {re.escape(IMAGE)}  {engine.image_id}  linux/amd64$", proc.stdout, re.M)
    assert image_id(IMAGE) == engine.image_id
    # upstream's CPU line for 0.6/0.7, plus --pull never
    env_file = prefix_of(bundle) / "docker.env"
    assert run_line(proc.stdout) == [
        "docker", "run", "-d", "--name", "gpustack", "--restart=unless-stopped",
        "--network=host", "-v", "gpustack-data:/var/lib/gpustack",
        "--env-file", str(env_file), "--pull", "never", IMAGE,
    ]  # fmt: skip
    # the air-gapped settings; this fixture image has no GPUStack, so no catalog path
    settings = env_file.read_text()
    assert "GPUSTACK_UPDATE_CHECK_URL=http://127.0.0.1:1/\n" in settings
    assert "HF_HUB_OFFLINE=1\n" in settings
    assert "# GPUSTACK_MODEL_CATALOG_FILE=" in settings

    said = docker("run", "--rm", "--network", "none", "--pull", "never", IMAGE)
    assert HELLO in said.stdout
    docker("run", "--rm", "--network", "none", "--pull", "never", IMAGE, "true")

    again = install(bundle)  # re-running over the loaded image is fine
    assert again.returncode == 0, again.stdout + again.stderr
    assert image_id(IMAGE) == engine.image_id


@pytest.mark.integration
def test_install_streams_the_folder_into_docker_load_and_writes_no_tar(
    tmp_path: Path, engine: Archive
) -> None:
    bundle = make_docker_bundle(tmp_path, engine.path)
    before = {p.relative_to(tmp_path) for p in tmp_path.rglob("*")}

    proc = install(bundle, "--skip-preflight")

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"Loaded image: {IMAGE}" in proc.stdout
    assert image_id(IMAGE) == engine.image_id
    made = {p.relative_to(tmp_path) for p in tmp_path.rglob("*")} - before
    assert not [p for p in made if p.suffix == ".tar"], made  # streamed, never on disk


@pytest.mark.integration
def test_an_older_bundle_with_one_image_tar_still_installs(tmp_path: Path, engine: Archive) -> None:
    tar = tmp_path / "old" / "images.tar"
    tar.parent.mkdir()
    write_layout_tar(engine.path, tar)
    bundle = make_docker_bundle(tmp_path, tar, name=OLD_IMAGE_ARCHIVE)

    proc = install(bundle, "--skip-preflight")

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"loading {OLD_IMAGE_ARCHIVE} into Docker" in proc.stdout
    assert image_id(IMAGE) == engine.image_id


@pytest.mark.integration
def test_install_pushes_to_the_site_registry_and_the_image_pulls_back_the_same(
    tmp_path: Path, engine: Archive, site_registry: DistributionRegistry
) -> None:
    bundle = make_docker_bundle(tmp_path, engine.path)
    # under a prefix, then plain: the pull below is from the plain name
    for registry in (f"{site_registry.host}/site/mirror", site_registry.host):
        target = f"{registry}/{IMAGE}"  # upstream's repository name under the registry

        proc = install(bundle, "--registry", registry)

        assert proc.returncode == 0, proc.stdout + proc.stderr
        pushed = re.search(rf"^install\.sh: pushed {re.escape(target)}@(sha256:[0-9a-f]{{64}})$",
                           proc.stdout, re.M)  # fmt: skip
        assert pushed, proc.stdout
        repository, tag = target.removeprefix(f"{site_registry.host}/").split(":")
        head = requests.head(
            f"{site_registry.url}/v2/{repository}/manifests/{tag}",
            headers={"Accept": f"{OCI_MANIFEST}, {DOCKER_MANIFEST}"},
            timeout=30,
        )
        assert head.status_code == 200
        assert head.headers["Docker-Content-Digest"] == pushed.group(1)
        # the bundle's own manifest and blobs, not docker push's recompressed layers
        (line,) = (bundle / PUSH_LIST).read_text().splitlines()
        assert pushed.group(1) == f"sha256:{line.split()[2]}"
        for blob in line.split()[3:]:
            answer = requests.head(
                f"{site_registry.url}/v2/{repository}/blobs/sha256:{blob}", timeout=30
            )
            assert answer.status_code == 200, blob
        assert run_line(proc.stdout)[-1] == target
        assert f"docker pull {target}" in proc.stdout

    remove_image(engine.image_id)  # every local name of it: the pull must come from the site
    assert image_id(target) is None and image_id(IMAGE) is None
    docker("pull", target)
    assert image_id(target) == engine.image_id
    docker("run", "--rm", "--network", "none", "--pull", "never", target, "true")


@pytest.mark.integration
def test_the_cuda_run_line_is_upstreams_nvidia_line(tmp_path: Path, engine: Archive) -> None:
    bundle = make_docker_bundle(tmp_path, engine.path, TARGET_DEVICE="cuda12.8")

    proc = install(bundle, "--skip-preflight")  # this host has no NVIDIA runtime

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "skipping preflight" in proc.stdout
    assert run_line(proc.stdout) == [
        "docker", "run", "-d", "--name", "gpustack", "--restart=unless-stopped",
        "--gpus", "all", "--network=host", "--ipc=host",
        "-v", "gpustack-data:/var/lib/gpustack",
        "--env-file", str(prefix_of(bundle) / "docker.env"), "--pull", "never", IMAGE,
    ]  # fmt: skip


@pytest.mark.integration
def test_a_damaged_image_archive_is_refused_before_anything_is_loaded(
    tmp_path: Path, engine: Archive
) -> None:
    bundle = make_docker_bundle(tmp_path, engine.path)
    manifest = json.loads((bundle / IMAGE_ARCHIVE / "manifest.json").read_text())
    layer = bundle / IMAGE_ARCHIVE / manifest[0]["Layers"][-1]
    data = bytearray(layer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    layer.unlink()  # a hard link to the module's export: replace, never write through it
    layer.write_bytes(bytes(data))

    proc = install(bundle)

    assert proc.returncode == 3, proc.stdout + proc.stderr
    altered = layer.relative_to(bundle)
    assert f"install.sh: altered (checksum mismatch): {altered}" in proc.stderr
    assert "re-copy the whole bundle" in error_line(proc)
    assert "loading" not in proc.stdout and "preflight" not in proc.stdout
    assert image_id(IMAGE) is None


@pytest.mark.integration
def test_an_image_the_archive_lacks_fails_the_install(tmp_path: Path, engine: Archive) -> None:
    bundle = make_docker_bundle(tmp_path, engine.path, images=f"{IMAGE},gpustack/gpustack:nope")

    proc = install(bundle)

    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert error_line(proc).startswith(
        "install.sh: error: gpustack/gpustack:nope is not in Docker after loading images"
    )
    assert "rebuild the bundle" in error_line(proc)


# ---------------------------------------------------------------------------------------------
# preflight.sh


@pytest.mark.integration
def test_preflight_checks_docker_and_not_python_for_a_docker_bundle(
    tmp_path: Path, archive: Archive
) -> None:
    bundle = make_docker_bundle(tmp_path, archive.path)

    code, report = preflight(bundle)

    assert code == 0, report
    assert report["cell"] == bundle_env(INSTALL_METHOD="docker")["BUNDLE_CELL"]
    assert report["cell"].startswith(f"v0.7.1-linux-{HOST_ARCH}-cpu-py")
    assert report["cell"].endswith("-base-docker")
    names = [c["name"] for c in report["checks"]]
    assert names == ["os", "arch", "cpu", "docker", "docker-daemon", "docker-version",
                     "nvidia-smi", "disk"]  # fmt: skip
    server = docker("version", "--format", "{{.Server.Version}}").stdout.strip()
    assert check(report, "docker-version") == {
        "name": "docker-version", "status": "ok", "detail": f"{server} (need >= 20.10)", "fix": "",
    }  # fmt: skip
    root = docker("info", "--format", "{{.DockerRootDir}}").stdout.strip()
    archive_kb = int(subprocess.check_output(["du", "-sk", archive.path]).split()[0])
    need_mb = (2 * archive_kb + 1023) // 1024
    assert check(report, "disk")["detail"].endswith(
        f"MiB free at {root} (need {need_mb} MiB for {IMAGE_ARCHIVE})"
    )


@pytest.mark.integration
def test_preflight_names_the_missing_nvidia_runtime_for_a_cuda_cell(
    tmp_path: Path, dummy_archive: Path
) -> None:
    bundle = make_docker_bundle(tmp_path, dummy_archive, TARGET_DEVICE="cuda12.4")
    smi = fake_nvidia_smi(tmp_path / "bin", cuda="12.4")  # the driver is fine

    code, report = preflight(bundle, path_prepend=smi)

    assert code == 1
    failed = [c for c in report["checks"] if c["status"] == "fail"]
    assert [c["name"] for c in failed] == ["nvidia-runtime"], failed
    assert failed[0]["detail"].startswith("the NVIDIA runtime is not registered with Docker")
    assert "NVIDIA Container Toolkit" in failed[0]["fix"]
    assert check(report, "cuda-driver")["status"] == "ok"
    cgroup = docker("info", "--format", "{{.CgroupDriver}}").stdout.strip()
    assert check(report, "cgroup-driver")["status"] == ("ok" if cgroup == "cgroupfs" else "fail")
    assert not {"python", "python-venv", "glibc", "nvcc", "cudnn"} & {
        c["name"] for c in report["checks"]
    }

    proc = install(bundle, path_prepend=smi)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "[fail] nvidia-runtime" in proc.stdout
    assert "preflight failed" in error_line(proc)


@pytest.mark.integration
def test_preflight_checks_rocm_for_a_2x_rocm_cell(
    tmp_path: Path, dummy_archive: Path, matrix: Matrix
) -> None:
    cell = matrix.cell("v2.3.0-linux-amd64-rocm7.0-py3.11-vllm-docker")
    bundle = make_2x_bundle(tmp_path, dummy_archive, cell)

    code, report = preflight(bundle)  # this host has no amd-smi, ROCm, /dev/kfd or amd runtime

    assert code == 1
    assert check(report, "amd-smi")["status"] == "fail"
    rocm = check(report, "rocm")
    assert rocm["status"] == "fail" and "ROCm 7.0 or newer, below 7.1" in rocm["fix"], rocm
    assert check(report, "rocm-devices")["status"] == "fail"
    assert check(report, "amd-runtime")["status"] == "fail"
    assert "nvidia-smi" not in {c["name"] for c in report["checks"]}


UPSTREAM_ENVS = """
from gpustack import envs
from gpustack.utils.envs import get_gpustack_env
print(envs.BOOTSTRAP_WITH_EMBEDDED_SOURCES)
print(get_gpustack_env("OTA_SERVER_URL"))
"""


def upstream_envs(root: Path, version: str, env_file: str) -> list[str]:
    """What upstream's `version` reads of the docker.env text `env_file` (as `--env-file`
    hands it over): the embedded-sources switch and the OTA server's URL."""
    env = {}
    for line in env_file.splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            env[key] = value
    return run_gpustack(root, version, UPSTREAM_ENVS, env=env).splitlines()[-2:]


@pytest.mark.integration
def test_a_2x_bundle_prints_the_server_and_worker_lines_with_the_site_registry(
    root: Path,
    tmp_path: Path,
    engine: Archive,
    site_registry: DistributionRegistry,
    matrix: Matrix,
) -> None:
    cell = matrix.cell("v2.3.0-linux-amd64-cuda12.9-py3.11-vllm-docker")
    bundle = make_2x_bundle(tmp_path, engine.path, cell)
    registry = f"{site_registry.host}/mirror"
    try:
        proc = install(bundle, "--skip-preflight", "--registry", registry)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out = proc.stdout
        assert f"pushed to {registry}; the server and workers will ask for exactly these" in out
        assert out.count(f"--system-default-container-registry {registry}") == 2  # server, worker
        assert "--runtime nvidia" in out and "/var/run/docker.sock:/var/run/docker.sock" in out
        # 2.3's content index asks ota.gpustack.ai unless its official sources start out of
        # service and its URL is a closed port: upstream's 2.3.0 reads both from docker.env
        env = (prefix_of(bundle) / "docker.env").read_text()
        assert "GPUSTACK_OTA_SERVER_URL=http://127.0.0.1:1/latest" in env.splitlines()
        assert upstream_envs(root, "2.3.0", env) == ["True", "http://127.0.0.1:1/latest"]
        assert f"{registry}/{IMAGE}" in out
    finally:
        remove_image(f"{registry}/{IMAGE}")


@pytest.mark.integration
@pytest.mark.parametrize(
    ("given", "registry", "namespace"),
    [
        ("{host}/team/gpustack", "{host}/team", "gpustack"),  # gpustack is the last level
        ("{host}/mirror --namespace gpustack-ai", "{host}/mirror", "gpustack-ai"),
    ],
)
def test_a_2x_registry_path_gets_the_flags_its_namespace_needs(
    tmp_path: Path,
    archive_2x: Archive,
    site_registry: DistributionRegistry,
    matrix: Matrix,
    given: str,
    registry: str,
    namespace: str,
) -> None:
    """GPUStack 2.x's namespace rule (docs/cli-reference/start.md): images stay under a last
    namespace level `gpustack`, and --system-default-container-registry names the path above;
    under another namespace, --image-repo, --benchmark-image-repo and the runtime's namespace
    variable name it. Each pushed image answers at the name those flags make."""
    host = site_registry.host
    given, registry = given.format(host=host), registry.format(host=host)
    cell = matrix.cell("v2.3.0-linux-amd64-cuda12.9-py3.11-vllm-docker")
    bundle = make_2x_bundle(tmp_path, archive_2x.path, cell, images=f"{SERVER_2X},{BENCHMARK_2X}")
    remove_image(archive_2x.image_id)
    pushed = [
        f"{registry}/{namespace}/{name.removeprefix('gpustack/')}"
        for name in (SERVER_2X, BENCHMARK_2X)
    ]
    try:
        proc = install(bundle, "--skip-preflight", "--registry", *given.split())
        assert proc.returncode == 0, proc.stdout + proc.stderr
        for ref in pushed:
            repository, tag = ref.removeprefix(f"{host}/").split(":")
            answer = requests.head(
                f"{site_registry.url}/v2/{repository}/manifests/{tag}",
                headers={"Accept": f"{OCI_MANIFEST}, {DOCKER_MANIFEST}"},
                timeout=10,
            )
            assert answer.status_code == 200, ref
        args = (prefix_of(bundle) / "server.args").read_text().splitlines()
        want = ["--system-default-container-registry", registry]
        if namespace != "gpustack":
            want += ["--image-repo", f"{namespace}/gpustack"]
            want += ["--benchmark-image-repo", f"{namespace}/benchmark-runner:v0.0.9"]
        assert args == want
        renv = prefix_of(bundle) / "registry.env"
        if namespace == "gpustack":
            assert not renv.exists()
        else:
            assert renv.read_text() == (
                f"GPUSTACK_RUNTIME_DEPLOY_DEFAULT_CONTAINER_NAMESPACE={namespace}\n"
            )
        server_line = run_line(proc.stdout)
        assert server_line[server_line.index(pushed[0]) + 1 :] == want
        if namespace != "gpustack":
            assert f"--env-file {renv}" in " ".join(server_line)
    finally:
        for ref in pushed:
            remove_image(ref)
        remove_image(archive_2x.image_id)


def test_a_namespace_without_a_registry_is_a_usage_error(
    tmp_path: Path, dummy_archive: Path
) -> None:
    bundle = make_docker_bundle(tmp_path, dummy_archive, GPUSTACK_VERSION="2.3.0")
    proc = install(bundle, "--namespace", "gpustack-ai")
    assert proc.returncode == 2
    assert error_line(proc) == (
        "install.sh: error: --namespace applies with --registry only; give --registry "
        "HOST[:PORT][/PREFIX] too"
    )


def path_without_docker(where: Path) -> Path:
    """A folder of links to every program on PATH except docker*, in PATH order."""
    where.mkdir()
    for folder in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(folder):
            continue
        for entry in os.scandir(folder):
            target = where / entry.name
            if entry.name.startswith("docker") or target.exists():
                continue
            if entry.is_file() and os.access(entry.path, os.X_OK):
                target.symlink_to(entry.path)
    return where


def test_preflight_and_install_say_so_when_docker_is_not_installed(
    tmp_path: Path, dummy_archive: Path
) -> None:
    bundle = make_docker_bundle(tmp_path, dummy_archive)
    env = {"PATH": str(path_without_docker(tmp_path / "bin"))}
    assert shutil.which("docker", path=env["PATH"]) is None

    code, report = preflight(bundle, extra_env=env)

    assert code == 1
    cli = check(report, "docker")
    assert cli["status"] == "fail"
    assert cli["detail"] == "docker CLI not found on PATH; this is a docker bundle"
    assert "install Docker Engine" in cli["fix"]
    assert check(report, "docker-daemon")["status"] == "skip"
    assert check(report, "disk")["status"] == "skip"

    proc = install(bundle, extra_env=env)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "[fail] docker" in proc.stdout

    proc = install(bundle, "--skip-preflight", extra_env=env)
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert "docker not found on PATH; install Docker Engine" in error_line(proc)


@pytest.mark.integration
def test_preflight_says_so_when_the_daemon_does_not_answer(
    tmp_path: Path, dummy_archive: Path
) -> None:
    bundle = make_docker_bundle(tmp_path, dummy_archive)
    env = {"DOCKER_HOST": "unix:///nonexistent.sock"}

    code, report = preflight(bundle, extra_env=env)

    assert code == 1
    daemon = check(report, "docker-daemon")
    assert daemon["status"] == "fail"
    assert daemon["detail"].startswith("the Docker daemon does not answer: ")
    assert "unix:///nonexistent.sock" in daemon["detail"]
    assert "DOCKER_HOST=unix:///nonexistent.sock is set" in daemon["fix"]
    assert [check(report, n)["status"] for n in ("docker", "docker-version", "disk")] == [
        "ok", "skip", "skip",
    ]  # fmt: skip

    text = run_script(bundle, "preflight.sh", extra_env=env)
    assert text.returncode == 1
    failed = r"^\[fail\] docker-daemon +the Docker daemon does not answer"
    assert re.search(failed, text.stdout, re.M)


# ---------------------------------------------------------------------------------------------
# Options


def test_registry_is_refused_for_a_pip_bundle(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, build_gpustack_wheel(tmp_path / "wheel"))

    proc = install(bundle, "--registry", "127.0.0.1:5000")

    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert error_line(proc) == (
        "install.sh: error: --registry applies to docker bundles only; this is a pip bundle "
        "(omit --registry; see --help)"
    )
    assert "verifying" not in proc.stdout  # refused before the bundle is even read through


@pytest.mark.parametrize("option", ["--python"])
def test_pip_options_are_refused_for_a_docker_bundle(
    tmp_path: Path, dummy_archive: Path, option: str
) -> None:
    bundle = make_docker_bundle(tmp_path, dummy_archive)

    proc = install(bundle, option, "/opt/x")

    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{option} applies to pip bundles only" in error_line(proc)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("http://127.0.0.1:5000", "without a scheme: --registry 127.0.0.1:5000"),
        ("registry", "Docker would read 'registry' as part of a Docker Hub repository"),
        ("127.0.0.1:5000/", "no trailing slash"),
        ("127.0.0.1:5000/Mirror", "must be lowercase path components"),
        ("bad_host.example:5000", "is not a host name"),
        ("", "must not be empty"),
    ],
    ids=["scheme", "no-dot-or-port", "trailing-slash", "uppercase-prefix", "bad-host", "empty"],
)
def test_a_malformed_registry_is_a_usage_error(
    tmp_path: Path, dummy_archive: Path, value: str, message: str
) -> None:
    bundle = make_docker_bundle(tmp_path, dummy_archive)

    proc = install(bundle, f"--registry={value}")

    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in error_line(proc)


@pytest.mark.parametrize(
    ("images", "message"),
    [("", "bundle.env has no IMAGES"), ("gpustack/gpustack", "not an image name with a tag")],
    ids=["empty", "no-tag"],
)
def test_a_bundle_env_without_usable_images_is_a_damaged_bundle(
    tmp_path: Path, dummy_archive: Path, images: str, message: str
) -> None:
    bundle = make_docker_bundle(tmp_path, dummy_archive, images=images)

    proc = install(bundle)

    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert message in error_line(proc)
    assert "re-copy the whole bundle" in error_line(proc)


def test_the_readmes_describe_the_docker_method(tmp_path: Path, dummy_archive: Path) -> None:
    bundle = make_docker_bundle(tmp_path, dummy_archive)
    for name in ("README.md", "README.zh-CN.md"):
        text = (bundle / name).read_text("utf-8")
        assert "{{" not in text
        for needle in ("images/", "--registry", "docker load", "--pull never",
                       "gpustack-data:/var/lib/gpustack", "--gpus all"):  # fmt: skip
            assert needle in text, (name, needle)
    assert sha256_file(bundle / "README.md") != sha256_file(bundle / "README.zh-CN.md")


def test_an_unknown_install_method_is_a_damaged_bundle(tmp_path: Path, dummy_archive: Path) -> None:
    bundle = make_docker_bundle(tmp_path, dummy_archive, INSTALL_METHOD="conda")

    proc = install(bundle)

    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "bundle.env names the install method 'conda'" in error_line(proc)


# ---------------------------------------------------------------------------------------------
# Deltas of docker bundles: layers the site registry holds are left out and fetched back

NEWER = "gpustack-offline-test/runnable:newer"


@pytest.fixture(scope="module")
def newer_archive(hub: Hub, archive: Archive, tmp_path_factory: pytest.TempPathFactory) -> Archive:
    """A newer image of the same repository: the same layers as IMAGE, a config of its own."""
    variant = runnable("gpustack-offline-test/newer")
    hub.push("fixture/runnable", "newer", [variant], index=False)
    root = tmp_path_factory.mktemp("docker-archive-newer")
    store = BlobStore(root / "cache")
    pulled = Registry(store, env=NO_CONFIG).pull(hub.ref("fixture/runnable:newer"), "linux/amd64")
    image = dataclasses.replace(pulled, reference=Reference.parse(NEWER))
    export_images([image], store, root / "images")
    return Archive(root / "images", f"sha256:{image.config.hex}")


@pytest.mark.integration
def test_a_docker_delta_takes_the_layers_the_site_registry_holds(
    tmp_path: Path,
    engine: Archive,
    newer_archive: Archive,
    site_registry: DistributionRegistry,
) -> None:
    from gpustack_offline.bundle import delta

    registry = f"{site_registry.host}/mirror"
    old = make_docker_bundle(tmp_path / "old", engine.path)
    new = make_docker_bundle(tmp_path / "new", newer_archive.path, images=NEWER)
    prefix = prefix_of(old)
    pushed = [f"{registry}/{IMAGE}", f"{registry}/{NEWER}"]
    volume = f"gpustack-offline-test-{os.getpid()}"  # never the site's gpustack-data
    try:
        proc = install(old, "--registry", registry, "--volume", volume)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        inventory = tmp_path / "inventory.json"
        proc = run_script(
            old, "install.sh", "--prefix", str(prefix), "--inventory", str(inventory),
            "--registry", registry,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        held = json.loads(inventory.read_text())
        layers = json.loads((engine.path / "manifest.json").read_text())[0]["Layers"]
        assert {f"sha256:{layer.rsplit('/', 1)[-1]}" for layer in layers} <= set(
            held["registry"]["blobs"]
        )

        made = delta.make(new, delta.read_base(inventory), tmp_path / "delta")
        left = json.loads((made.directory / delta.BASE_FILE).read_text())["left_out"]
        assert {e["path"] for e in left} == {f"images/{layer}" for layer in layers}
        assert all(e["repositories"] == ["gpustack-offline-test/runnable"] for e in left)
        assert made.carried <= 1.05 * made.floor + 1_000_000

        remove_image(engine.image_id)
        without = run_script(made.directory, "install.sh", "--prefix", str(prefix))
        assert without.returncode == 3
        assert f"install.sh: missing piece: images/{layers[0]} (sha256 " in without.stderr

        proc = run_script(
            made.directory, "install.sh", "--prefix", str(prefix), "--registry", registry,
            "--volume", volume,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"no Docker volume {volume} yet: nothing to copy before the upgrade" in proc.stdout
        assert image_id(NEWER) == newer_archive.image_id
        assert f"pushed {registry}/{NEWER}@sha256:" in proc.stdout
        assert run_line(proc.stdout)[-1] == f"{registry}/{NEWER}"

        # a docker rollback is the previous install's run line, the data volume the same
        back = run_script(
            made.directory, "install.sh", "--prefix", str(prefix), "--rollback", "--volume", volume
        )
        assert back.returncode == 0, back.stdout + back.stderr
        assert run_line(back.stdout)[-1] == f"{registry}/{IMAGE}"
        assert f"-v {volume}:/var/lib/gpustack" in " ".join(run_line(back.stdout))
    finally:
        for ref in [*pushed, NEWER]:
            remove_image(ref)
        remove_image(newer_archive.image_id)


# ---------------------------------------------------------------------------------------------
# Models: install-model.sh --prefix on a docker install, and the run lines install.sh prints


@pytest.fixture(scope="module")
def model_bundles(root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A GGUF (llama-box, GPUStack 0.x) and a safetensors (vLLM) model bundle, built from the
    loopback hub stand-in as `invoke bundle --model` builds them."""
    from support.hf_hub import HubStandIn, tiny_gguf, tiny_safetensors
    from test_models import GGUF, context

    from gpustack_offline.cli import commands

    area = tmp_path_factory.mktemp("docker-models")
    with HubStandIn() as hf:
        hf.add("test-org/tiny-GGUF", {GGUF: tiny_gguf(1, values=1024)})
        hf.add(
            "test-org/tiny-st", {"config.json": b"{}\n", "model.safetensors": tiny_safetensors()}
        )
        ctx = context(root, area, hf.url)
        results = commands.build(ctx, [], ctx.models(["tiny-gguf", "tiny-st"]))
    return {r.id: r.directory for r in results}


@pytest.mark.integration
@pytest.mark.parametrize(
    ("version", "device", "model", "flag"),
    [("2.3.0", "cuda12.9", "model-tiny-st", "--volume"), ("0.7.1", "cpu", "model-tiny-gguf", "-v")],
)
def test_a_model_installed_with_the_prefix_is_mounted_on_every_run_line(
    tmp_path: Path,
    engine: Archive,
    model_bundles: dict[str, Path],
    version: str,
    device: str,
    model: str,
    flag: str,
) -> None:
    """install-model.sh --prefix names its catalog in docker.env and its folder in
    docker.volumes; install.sh then mounts that folder read-only on the server's run line (2.x:
    and the worker's), where GPUStack reads GPUSTACK_MODEL_CATALOG_FILE from the env file."""
    extra = {"CUDA_FLOOR": "12.9", "TARGET_EXTRAS": "vllm"} if version.startswith("2") else {}
    bundle = make_docker_bundle(
        tmp_path, engine.path, GPUSTACK_VERSION=version, TARGET_DEVICE=device, **extra
    )
    prefix, dest = prefix_of(bundle), tmp_path / "models"
    assert install(bundle, "--skip-preflight").returncode == 0
    placed = subprocess.run(
        ["bash", model_bundles[model] / "install-model.sh", "--dest", dest, "--prefix", prefix],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert placed.returncode == 0, placed.stdout + placed.stderr
    catalog = dest / "model-catalog.yaml"
    assert f"GPUSTACK_MODEL_CATALOG_FILE={catalog}\n" in (prefix / "docker.env").read_text()
    assert f"--volume {dest}:{dest}:ro" in placed.stdout

    proc = install(bundle, "--skip-preflight")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    mount = f"{flag} {dest}:{dest}:ro"
    lines = proc.stdout.split("docker run ")[1:]
    assert len(lines) == (2 if version.startswith("2") else 1)  # 2.x: server and worker
    for line in lines:
        assert mount in " ".join(w.strip().removesuffix("\\").strip() for w in line.splitlines())
    words = run_line(proc.stdout)
    assert words.index(str(prefix / "docker.env")) > words.index(f"{dest}:{dest}:ro")
