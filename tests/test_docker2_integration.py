"""GPUStack 2.x end to end: runner list → pins → one bundle → site registry → server offline.

Docker Hub is the loopback hub (token auth), seeded with stand-ins for exactly the images
upstream's runner list names for the cell (tests/gpustack2_images.py): the server image running
the real GPUStack 2.2.3 server (its whole dependency tree, an embedded PostgreSQL), two runners
sharing a base layer, pause and health. The build pins and pulls them through the
`registry-mirror` option; verification pushes them into a loopback site registry with
install.sh, checks every reference the worker will compute, and starts the server from there as
install.sh told the operator, audited for egress: its first start, an admin login and 30 s more.
A tiny model bundle is then verified beside the same bundle: catalog, deployment, the
scheduler reading its config at the placed path, and the server's embedded worker, with a
declared stand-in GPU, finding the file there (no GPU and no engine run here).

The bundle and the model run for 2.2.3 and 2.3.0 (whose server also reads a content index from
ota.gpustack.ai, which install.sh's docker.env keeps it from: tests/test_scripts_docker.py); the
refusals run for 2.2.3.
"""

from __future__ import annotations

import json
import shutil

import pytest
from support.gpustack2_images import push_images, runner_images, server_image
from support.registry_fixture import AMD64, Hub, hub_fixture  # noqa: F401 - the hub fixture

from gpustack_offline.cli import commands
from gpustack_offline.core.docker import client, pull, remove_images
from gpustack_offline.core.errors import VerifyError
from gpustack_offline.stages import runners
from gpustack_offline.stages.registry import PlatformError
from gpustack_offline.verify.common import Report, egress_path
from gpustack_offline.verify.docker import API_PORT_2X, UI_PAGES_2X, ImageStart, audit_server

pytestmark = pytest.mark.integration

VERSION = "2.2.3"  # of the tests that run for one version
VERSIONS = ("2.2.3", "2.3.0")
# The runners upstream's data names for the cell (gpustack-runner as each release pins it)
RUNNER_TAGS = {
    "2.2.3": ("cuda12.9-vllm0.25.1", "cuda12.9-sglang0.5.15.post1"),
    "2.3.0": ("cuda12.9-vllm0.32.0", "cuda12.9-sglang0.5.18"),
}


def cell_id(version: str = VERSION, arch: str = "amd64") -> str:
    return f"v{version}-linux-{arch}-cuda12.9-py3.11-vllm+sglang-docker"


CELL, ARM_CELL = cell_id(), cell_id(arch="arm64")
SERVER = f"gpustack/gpustack:v{VERSION}"


@pytest.fixture(scope="module")
def contexts(root, hub: Hub, tmp_path_factory):
    """A build context per version, made on first use: its own dist/, pins and runner data, the
    hub seeded with the version's server and runner stand-ins (amd64 only: an arm64 cell must
    be refused, naming what the hub has)."""
    made: dict[str, commands.Context] = {}

    def context(version: str):
        if version in made:
            return made[version]
        runners_dir = tmp_path_factory.mktemp(f"runners-{version}")
        shutil.copy(root / f"bundles/runners/gpustack-{version}.json", runners_dir)
        cli = {
            "dist_dir": str(tmp_path_factory.mktemp(f"dist-{version}")),
            "images_pins_dir": str(tmp_path_factory.mktemp(f"pins-{version}")),
            "runners_dir": str(runners_dir),
            "registry_mirror": hub.host,
            "progress": False,
        }
        ctx = commands.Context.load(root, cli=cli)
        cell = ctx.matrix.cell(cell_id(version))
        selection = runners.cell_selection(
            runners_dir, version, "amd64", "cuda12.9", cell.extra_names
        )
        names = [i.name for i in selection.images]
        push_images(hub, {names[0]: server_image(version, (AMD64,))})
        push_images(hub, runner_images(names[1:], (AMD64,)))
        made[version] = ctx
        return ctx

    return context


@pytest.fixture(scope="module")
def ctx(contexts):
    return contexts(VERSION)


@pytest.mark.parametrize("version", VERSIONS)
def test_a_2x_bundle_carries_upstreams_images_and_its_configured_server_start_reaches_nothing(
    contexts, root, version
):
    ctx = contexts(version)
    cell = ctx.matrix.cell(cell_id(version))
    pins = commands.lock(ctx, [cell])
    # the runner list was read again from the gpustack-runner wheel the release pins: same data
    runner_data = ctx.opts.path("runners_dir", root) / f"gpustack-{version}.json"
    assert (
        runner_data.read_text() == (root / f"bundles/runners/gpustack-{version}.json").read_text()
    )
    pin_files = sorted(p.name for p in ctx.opts.path("images_pins_dir", root).iterdir())
    assert pin_files == [
        f"{kind}-{version}.toml" for kind in ("benchmark-runner", "gpustack", "runner", "runtime")
    ]
    assert pins

    (result,) = commands.build(ctx, [cell])
    manifest = json.loads((result.directory / "manifest.json").read_text())
    refs = sorted(i["reference"] for i in manifest["images"])
    assert refs == sorted(
        [
            f"docker.io/gpustack/gpustack:v{version}",
            *(f"docker.io/gpustack/runner:{tag}" for tag in RUNNER_TAGS[version]),
            "docker.io/gpustack/runtime:pause",
            "docker.io/gpustack/runtime:health",
            f"docker.io/{runners.load(root / 'bundles/runners', version).image('benchmark')}",
        ]
    )
    assert {i["platform"] for i in manifest["images"]} == {"linux/amd64"}
    # layers shared by the two runners are there once, in the one export folder
    docker_view = json.loads((result.directory / "images" / "manifest.json").read_text())
    layers = [layer for image in docker_view for layer in image["Layers"]]
    assert len(layers) > len(set(layers))  # shared ones...
    assert all((result.directory / "images" / layer).is_file() for layer in layers)  # ...once
    index = json.loads((result.directory / "images" / "index.json").read_text())
    assert len(index["manifests"]) == 6
    sbom = json.loads((result.directory / "sbom.cdx.json").read_text())
    assert {c["name"] for c in _walk(sbom["components"]) if c["type"] == "container"} >= {
        "docker.io/gpustack/runner",
        "docker.io/gpustack/runtime",
    }

    report = commands.verify_cell(ctx, cell)
    assert report.ok
    names = [s.name for s in report.steps]
    assert names == [
        "absent", "install", "registry-references", "pull",
        "healthz-server", "ui-server", "egress",
    ]  # fmt: skip
    resolved = report.steps[2].output.splitlines()
    assert len(resolved) == 6 and all("(linux/amd64)" in line for line in resolved)
    assert all("/site/mirror/gpustack/" in line for line in resolved)  # under the prefix
    assert any("/gpustack/runtime:pause -> sha256:" in line for line in resolved)
    install_output = report.steps[1].output
    assert "--system-default-container-registry 127.0.0.1:" in install_output
    assert f"/gpustack/runner:{RUNNER_TAGS[version][1]}" in install_output

    # the server from the site registry, started as install.sh told the operator: the real
    # first start answered, the admin logged in with the initial password, and in all that and
    # 30 s more it reached for no outside host
    healthz, visit, egress = report.steps[4:]
    assert f"/site/mirror/gpustack/gpustack:v{version}: /healthz 200 on 30080" in healthz.output
    assert visit.output.splitlines()[0] == "/auth/login 200"
    assert "/v2/model-sets?page=1&perPage=10 200" in visit.output
    assert (egress.code, egress.output) == (0, "outside hosts attempted: none")
    assert report.egress == {"hosts_attempted": 0, "hosts": []}
    assert report.seconds_to_healthz == healthz.seconds
    written = json.loads(egress_path(ctx.layout.report(cell.id)).read_text())
    assert list(written) == ["server"]
    assert written["server"]["hosts"] == [] and written["server"]["sinkhole"]
    assert written["server"]["errors"] == []
    saved = json.loads(ctx.layout.report(cell.id).read_text())
    assert saved["ok"] and saved["egress"] == {"hosts_attempted": 0, "hosts": []}


MODEL_STEPS = [
    "absent", "install", "registry-references", "pull", "install-model", "config-catalog",
    "healthz-server", "ui-server", "deploy", "catalog", "deployment", "scheduled", "file-resolved",
    "config-read", "no-download", "egress",
]  # fmt: skip


@pytest.mark.parametrize("version", VERSIONS)
def test_a_model_bundle_beside_the_2x_bundle_is_deployed_and_its_file_found_by_the_worker(
    contexts, root, tmp_path, version
):
    """A tiny safetensors model (vLLM), bundled from the loopback hub stand-in through the real
    `huggingface_hub`, placed with install-model.sh --prefix beside the 2.x bundle installed
    with install.sh --registry: the server from the site registry, started with install.sh's
    server.args, docker.env and docker.volumes and its embedded worker on, with one declared
    stand-in GPU of the cell's CUDA (resources.gpu_devices), lists the model with its local
    path, accepts its deployment (POST /v2/models), reads its config at the placed path through
    the mount and places the instance on the worker; the worker resolves the file at the placed
    path (its model file `ready`) and goes on to its engine, which cannot start here (no Docker
    socket, no GPU). Nothing outside is asked."""
    from support.hf_hub import HubStandIn, tiny_safetensors

    ctx = contexts(version)
    cell = ctx.matrix.cell(cell_id(version))
    commands.lock(ctx, [cell])
    commands.build(ctx, [cell])  # checked, not rebuilt, after the test above
    (tmp_path / "models.toml").write_text(
        '[[model]]\nname = "tiny-st"\nsource = "huggingface"\nrepository = "test-org/tiny-st"\n'
        'files = ["*.json", "*.safetensors"]\nbackend = "vllm"\ncategories = ["llm"]\n'
    )
    config = b'{"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}\n'
    with HubStandIn() as hf:
        hf.add("test-org/tiny-st", {"config.json": config, "model.safetensors": tiny_safetensors()})
        cli = {
            "models": str(tmp_path / "models.toml"),
            "model_locks_dir": str(tmp_path / "locks"),
            "dist_dir": str(ctx.dist),
            "runners_dir": str(ctx.layout.runners),
            "hf_endpoint": hf.url,
            "progress": False,
        }
        model_ctx = commands.Context.load(root, cli=cli)
        (model,) = commands.build(model_ctx, [], model_ctx.models(["tiny-st"]))

    report = commands.verify_model(model_ctx, cell, model.directory)
    assert report.ok and [s.name for s in report.steps] == MODEL_STEPS, report.steps
    steps = {s.name: s.output for s in report.steps}
    probe = json.loads(steps["deploy"].strip().splitlines()[-1])
    placed = probe["spec"]["local_path"]
    assert placed.endswith("/models/tiny-st") and probe["spec"]["source"] == "local_path"
    assert (
        f"GPUSTACK_MODEL_CATALOG_FILE={placed.removesuffix('/tiny-st')}/model-catalog.yaml"
        in (steps["config-catalog"])
    )
    assert probe["created"]["status"] == 200 and probe["created"]["body"]["local_path"] == placed
    assert probe["created"]["body"]["backend"] == "vLLM"
    # the scheduler read the config from the server's own copy, through the mount
    assert "Trying to get pretrained config from" in steps["config-read"]
    assert "does not exist in server node" not in steps["config-read"]
    instance = probe["instance"]
    assert instance["worker_id"] and instance["resolved_path"] == placed
    (file,) = [f for f in probe["model_files"] if f["local_path"] == placed]
    assert file["state"] == "ready" and file["resolved_paths"] == [placed], file
    assert file["worker_id"] == instance["worker_id"]
    # past the file: the engine's start, which fails for want of a container runtime here
    assert "starting" in probe["states"] or instance["state"] == "error", probe["states"]
    assert "file resolved there" in report.note and "declared" in report.note
    assert report.egress == {"hosts_attempted": 0, "hosts": []}
    saved = ctx.dist / f"model-tiny-st.{cell.id}.verify.json"
    assert json.loads(saved.read_text())["ok"] is True
    print(f"\n{report.note}\n{steps['config-read']}")


def test_the_audit_fails_a_server_start_that_reaches_for_docker_hub_and_quay(ctx, hub):
    """Upstream's plain `docker run` of the server, without --system-default-container-registry:
    at start the real server asks registry-1.docker.io and quay.io which one it can reach
    (`gpustack/config/registration.py`, determine_default_registry). The same audit that
    passed the configured start fails this one and names both hosts."""
    cell = ctx.matrix.cell(CELL)
    engine = client()
    ref = hub.ref(SERVER)
    code, output = pull(engine, ref)
    assert code == 0, output
    plain = ImageStart("server", API_PORT_2X, worker_port=None, pages=UI_PAGES_2X)
    report = Report(cell=cell.id)
    try:
        with pytest.raises(VerifyError) as failed:
            audit_server(cell, ref, plain, 300, report, sinkhole_image=ref, settle=5)
    finally:
        remove_images(engine, [ref])
    message = str(failed.value)
    assert "the configured first start tried to reach" in message
    assert "registry-1.docker.io" in message and "quay.io" in message
    assert report.egress is not None
    assert {"registry-1.docker.io", "quay.io"} <= set(report.egress["hosts"])
    assert [s.name for s in report.steps] == ["healthz-server", "ui-server", "egress"]
    assert report.steps[-1].code == 1
    # the audit hook names the process and upstream's code that asked
    assert "gpustack/utils/network.py" in report.steps[-1].output  # check_registry_reachable


def test_a_cell_whose_platform_the_upstream_images_lack_is_refused_with_what_they_have(ctx):
    cell = ctx.matrix.cell(ARM_CELL)
    with pytest.raises(PlatformError, match="linux/amd64"):
        commands.lock(ctx, [cell])


def _walk(components):
    for c in components:
        yield c
        yield from _walk(c.get("components", []))
