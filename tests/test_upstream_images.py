"""The 2.x image set against upstream's own code, run: each release's `gpustack list-images`
filters and the functions its server and worker name images with, in a venv holding that
release (the tool venv the build uses, installed from the package index).

- Docker-mode set: the images the Docker-mode code names, computed by upstream's functions
  (`get_image_name` for the server, the `benchmark_image_repo` default, gpustack_runtime's pause
  and health defaults) plus the runners upstream's `list_images` keeps for the cell's backend,
  backend version, service and service version on its platform.
- With the `k8s` extra: everything upstream's `list_images` prints for those filters.
- Registry and namespace: the references `worker_references` predicts, against upstream's
  `get_image_name`, `apply_registry_override_to_image` and `adjust_image_with_envs` with the flags
  and variable `install.sh --registry … --namespace …` gives.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from gpustack_offline.core.options import resolve
from gpustack_offline.stages import runners
from gpustack_offline.stages.tools import gpustack_venv

pytestmark = pytest.mark.integration

VERSIONS = ("2.2.3", "2.3.0")
CELLS = [  # arch, device, extras
    ("amd64", "cuda12.9", ["vllm"]),
    ("arm64", "cuda12.9", ["vllm", "sglang"]),
    ("amd64", "rocm7.0", ["vllm"]),
    ("amd64", "cuda12.8", ["vllm", "k8s"]),
    ("arm64", "cann8.2-310p", ["vllm"]),  # a variant: upstream filters by it too
]
REGISTRY = "registry.site.internal:5000/team"
NAMESPACE = "gpustack-ai"

# Runs in the release's venv: argv[1] is a JSON list of queries, each the keyword filters of
# `gpustack_runner.cmds.list_images` (what `gpustack list-images` calls); prints the answers and
# the names upstream's functions give.
UPSTREAM = r"""
import argparse, json, os, sys, types
from gpustack.cmd.images import setup_images_cmd
from gpustack_runner.cmds import list_images
from gpustack.config.config import get_image_name
from gpustack.schemas.config import PredefinedConfig
from gpustack.utils.config import apply_registry_override_to_image
from gpustack_runtime import envs
from gpustack_runtime.deployer.__utils__ import adjust_image_with_envs

setup_images_cmd(argparse.ArgumentParser().add_subparsers())  # appends self and plugin images
queries, registry, namespace = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
benchmark = PredefinedConfig.model_fields["benchmark_image_repo"].default
docker = [get_image_name(None), envs.GPUSTACK_RUNTIME_DOCKER_PAUSE_IMAGE,
          envs.GPUSTACK_RUNTIME_DOCKER_UNHEALTHY_RESTART_IMAGE, benchmark]
listed = [[i.name for i in list_images(**q)] for q in queries]
config = types.SimpleNamespace(system_default_container_registry=registry)
moved = lambda image: adjust_image_with_envs(apply_registry_override_to_image(config, image, ""))
site = {
    "server": get_image_name(None, registry, f"{namespace}/gpustack"),
    "benchmark": moved(f"{namespace}/{benchmark.removeprefix('gpustack/')}"),
    "runtime": [moved(i) for i in docker[1:3]],
    "runners": [moved(n) for names in listed for n in names if n.startswith("gpustack/runner:")],
}
print(json.dumps({"docker": docker, "listed": listed, "site": site}))
"""


@pytest.fixture(scope="module", params=VERSIONS)
def upstream(request: pytest.FixtureRequest, root: Path) -> tuple[str, dict]:
    version = request.param
    opts = resolve(root)
    python = gpustack_venv(version, [], Path(opts.cache_dir), opts.index_url)
    data = runners.load(root / "bundles" / "runners", version)
    assert data.path is not None
    queries = []
    for arch, device, extras in CELLS:
        selection = runners.cell_selection(data.path.parent, version, arch, device, extras)
        for ref in selection.runners:
            picked = next(
                r for r in data.runners if r.docker_image == ref.name and r.platform == ref.platform
            )
            queries.append(
                {
                    "platform": ref.platform,
                    "backend": picked.backend,
                    "backend_version": picked.backend_version,
                    "backend_variant": picked.backend_variant,
                    "service": picked.service,
                    "service_version": picked.service_version,
                }
            )
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUSTACK_")}
    env["GPUSTACK_RUNTIME_DEPLOY_DEFAULT_CONTAINER_NAMESPACE"] = NAMESPACE
    out = subprocess.run(
        [python, "-c", UPSTREAM, json.dumps(queries), REGISTRY, NAMESPACE],
        capture_output=True, text=True, env=env, timeout=300, check=True,
    ).stdout  # fmt: skip
    return version, json.loads(out.splitlines()[-1])


def _cells(version: str, root: Path) -> list[tuple[list[str], runners.Selection]]:
    """Each cell's selection, with its queries' position in `listed`."""
    out, at = [], 0
    for arch, device, extras in CELLS:
        selection = runners.cell_selection(
            root / "bundles" / "runners", version, arch, device, extras
        )
        out.append((list(range(at, at + len(selection.runners))), selection))
        at += len(selection.runners)
    return out  # type: ignore[return-value]


def test_the_docker_mode_set_is_what_upstreams_docker_code_names(upstream, root: Path) -> None:
    version, answer = upstream
    for positions, selection in _cells(version, root):
        if any(i.role == "k8s" for i in selection.images):
            continue
        listed = [n for p in positions for n in answer["listed"][p]]
        wanted = set(answer["docker"]) | {n for n in listed if n.startswith("gpustack/runner:")}
        assert {i.name for i in selection.images} == wanted, selection.arch
        assert set(answer["docker"]) <= set(listed)  # list-images names all of them too


def test_with_k8s_the_set_is_everything_upstreams_list_images_prints(upstream, root) -> None:
    version, answer = upstream
    k8s_cells = [c for c in _cells(version, root) if any(i.role == "k8s" for i in c[1].images)]
    assert k8s_cells
    for positions, selection in k8s_cells:
        listed = {n for p in positions for n in answer["listed"][p]}
        assert {i.name for i in selection.images} == listed
        assert any(n.startswith("gpustack/mirrored-csi-") for n in listed)


def test_the_site_references_are_upstreams_for_a_registry_and_namespace(upstream, root) -> None:
    version, answer = upstream
    positions, selection = _cells(version, root)[0]
    refs = runners.worker_references(selection, REGISTRY, NAMESPACE)
    site = answer["site"]
    runner_refs = [site["runners"][i] for i in range(len(positions))]
    assert refs == [site["server"], *runner_refs, *site["runtime"], site["benchmark"]]
    assert all(r.startswith(f"{REGISTRY}/{NAMESPACE}/") for r in refs)
