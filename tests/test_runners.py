"""GPUStack 2.x images chosen from upstream's own runner list (bundles/runners/*.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpustack_offline.core.errors import BundleError
from gpustack_offline.core.options import resolve
from gpustack_offline.stages import runner_data, runners
from gpustack_offline.stages.errors import NoRunnerError, RunnerDataError
from gpustack_offline.stages.runner_data import Runner

VERSIONS = ("2.2.3", "2.3.0")


@pytest.fixture(scope="module")
def data_dir(root: Path) -> Path:
    return root / "bundles" / "runners"


@pytest.fixture(scope="module")
def v23(data_dir: Path) -> runners.RunnerData:
    return runners.load(data_dir, "2.3.0")


def runner(version: str, deprecated: bool = False, backend_version: str = "12.9") -> Runner:
    return Runner(
        backend="cuda",
        backend_version=backend_version,
        original_backend_version=backend_version,
        backend_variant="",
        service="vllm",
        service_version=version,
        platform="linux/amd64",
        docker_image=f"gpustack/runner:cuda{backend_version}-vllm{version}",
        deprecated=deprecated,
    )


def synthetic(*rs: Runner) -> runners.RunnerData:
    return runners.RunnerData(
        version="9.9.9",
        packages=(),
        server="gpustack/gpustack:v9.9.9",
        images=(
            runners.ExtraImage("pause", "gpustack/runtime:pause", "test"),
            runners.ExtraImage("health", "gpustack/runtime:health", "test"),
        ),
        runners=rs,
    )


@pytest.mark.parametrize(
    ("version", "runner_pin", "runtime_pin"),
    [("2.2.3", "0.1.27.post4", "0.2.1"), ("2.3.0", "0.1.31.post4", "0.2.6")],
)
def test_committed_data_records_the_pinned_packages_and_helper_images(
    data_dir: Path, version: str, runner_pin: str, runtime_pin: str
) -> None:
    data = runners.load(data_dir, version)
    pins = {p.name: p.version for p in data.packages}
    assert pins == {
        "gpustack": version,
        "gpustack-runner": runner_pin,
        "gpustack-runtime": runtime_pin,
    }
    assert all(len(p.sha256) == 64 for p in data.packages)
    assert data.server == f"gpustack/gpustack:v{version}"
    assert data.image("pause") == "gpustack/runtime:pause"
    assert data.image("health") == "gpustack/runtime:health"
    assert len(data.runners) > 300


@pytest.mark.parametrize("version", VERSIONS)
def test_committed_file_is_what_render_writes(data_dir: Path, version: str) -> None:
    data = runners.load(data_dir, version)
    assert runners.render(data) == runners.data_path(data_dir, version).read_text()


def test_default_service_is_the_newest_not_deprecated() -> None:
    data = synthetic(runner("0.11.0"), runner("0.12.0", deprecated=True), runner("0.9.2"))
    picked = runners.select(data, "amd64", "cuda", "12.9", ["vllm"])
    assert [r.name for r in picked.runners] == ["gpustack/runner:cuda12.9-vllm0.11.0"]


def test_default_cuda_selection_on_amd64_from_committed_data(v23: runners.RunnerData) -> None:
    picked = runners.select(v23, "amd64", "cuda", "12.9", ["vllm"])
    assert picked.references == [
        "docker.io/gpustack/gpustack:v2.3.0",
        "docker.io/gpustack/runner:cuda12.9-vllm0.32.0",
        "docker.io/gpustack/runtime:pause",
        "docker.io/gpustack/runtime:health",
        "docker.io/gpustack/benchmark-runner:v0.0.9",
    ]
    assert {i.platform for i in picked.images} == {"linux/amd64"}
    newest = runners.select(v23, "amd64", "cuda", None, ["vllm"])
    assert newest.runners[0].name == "gpustack/runner:cuda13.0-vllm0.32.0"


def test_explicit_service_version_may_be_deprecated(v23: runners.RunnerData) -> None:
    picked = runners.select(v23, "amd64", "cuda", "12.8", ["vllm==0.11.0", "voxbox"])
    assert [r.name for r in picked.runners] == [
        "gpustack/runner:cuda12.8-vllm0.11.0",
        "gpustack/runner:cuda12.8-voxbox0.0.21",
    ]
    with pytest.raises(NoRunnerError):  # a version upstream does not list
        runners.select(v23, "amd64", "cuda", "12.8", ["voxbox==0.0.19"])


@pytest.mark.parametrize("bad", ["vllm==", "==0.11.0", "vllm 0.11"])
def test_malformed_service_is_refused(v23: runners.RunnerData, bad: str) -> None:
    with pytest.raises(NoRunnerError, match="service"):
        runners.select(v23, "amd64", "cuda", "12.9", [bad])


def test_refusal_lists_the_nearest_runners(v23: runners.RunnerData) -> None:
    with pytest.raises(NoRunnerError) as info:
        runners.select(v23, "amd64", "cuda", "12.6", ["vllm"])
    message = str(info.value)
    assert isinstance(info.value, BundleError)
    assert "cuda12.6 vllm" in message and "linux/amd64" in message
    assert "gpustack/runner:cuda12.6-vllm0.15.1 (linux/amd64, deprecated)" in message
    assert "gpustack/runner:cuda12.9-vllm0.32.0 (linux/amd64)" in message


def test_arm64_has_cuda_but_no_rocm(v23: runners.RunnerData) -> None:
    arm = runners.select(v23, "arm64", "cuda", "12.9", ["vllm"])
    assert arm.runners[0].platform == "linux/arm64"
    assert arm.pause.platform == "linux/arm64"
    with pytest.raises(NoRunnerError) as info:
        runners.select(v23, "arm64", "rocm", "7.2", ["vllm"])
    assert "gpustack/runner:rocm7.2-vllm0.32.0 (linux/amd64)" in str(info.value)
    assert (
        runners.select(v23, "amd64", "rocm", "7.2", ["vllm"]).runners[0].name
        == "gpustack/runner:rocm7.2-vllm0.32.0"
    )
    with pytest.raises(NoRunnerError, match="arch"):
        runners.select(v23, "riscv64", "cuda", "12.9", ["vllm"])


def test_available_lists_the_matrix_axes_per_arch(v23: runners.RunnerData) -> None:
    amd = {
        (o.backend, o.backend_version, o.backend_variant, o.service): o
        for o in runners.available(v23, "amd64")
    }
    arm = {
        (o.backend, o.backend_version, o.backend_variant, o.service): o
        for o in runners.available(v23, "arm64")
    }
    assert amd["cuda", "12.9", "", "vllm"].default == "0.32.0"
    assert amd["cuda", "12.6", "", "vllm"].default is None  # deprecated only
    assert "0.15.1" in amd["cuda", "12.6", "", "vllm"].deprecated
    assert ("rocm", "7.2", "", "vllm") in amd
    assert not any(backend == "rocm" for backend, *_ in arm)


def test_worker_references_prefix_the_registry(v23: runners.RunnerData) -> None:
    picked = runners.select(v23, "amd64", "cuda", "12.9", ["vllm"])
    assert runners.worker_references(picked, "registry.local:5000") == [
        "registry.local:5000/gpustack/gpustack:v2.3.0",
        "registry.local:5000/gpustack/runner:cuda12.9-vllm0.32.0",
        "registry.local:5000/gpustack/runtime:pause",
        "registry.local:5000/gpustack/runtime:health",
        "registry.local:5000/gpustack/benchmark-runner:v0.0.9",
    ]
    with_path = runners.worker_references(picked, " mirror.site/team/ ")
    assert with_path[2] == "mirror.site/team/gpustack/runtime:pause"


def test_registry_override_keeps_an_image_that_names_its_registry() -> None:
    assert (
        runners.apply_registry_override("quay.io/gpustack/runtime:pause", "r:5000")
        == "quay.io/gpustack/runtime:pause"
    )
    assert (
        runners.apply_registry_override("localhost/gpustack/x:1", "r:5000")
        == "localhost/gpustack/x:1"
    )
    assert runners.apply_registry_override("gpustack/runtime:pause", "") == "gpustack/runtime:pause"


def test_a_docker_site_gets_the_benchmark_image_and_only_k8s_asks_for_the_rest(
    v23: runners.RunnerData,
) -> None:
    plain = runners.select(v23, "amd64", "cuda", "12.9", ["vllm"])
    k8s = runners.select(v23, "amd64", "cuda", "12.9", ["vllm"], k8s=True)
    assert [i.role for i in plain.images] == ["server", "runner", "pause", "health", "benchmark"]
    assert "docker.io/gpustack/benchmark-runner:v0.0.9" in plain.references
    extra = [i for i in k8s.images if i not in plain.images]
    assert {i.role for i in extra} == {"k8s"}
    assert "docker.io/gpustack/gpustack-operator:v0.9.2" in {i.reference for i in extra}
    assert {i.platform for i in extra} == {"linux/amd64"}
    assert v23.path is not None
    via_cell = runners.cell_selection(
        v23.path.parent, "2.3.0", "amd64", "cuda12.9", ["vllm", "k8s"]
    )
    assert via_cell == k8s


def test_a_namespace_moves_every_image_the_server_and_worker_name(
    v23: runners.RunnerData,
) -> None:
    selection = runners.select(v23, "amd64", "cuda", "12.9", ["vllm"])
    refs = runners.worker_references(selection, "r.example:5000/site", "gpustack-ai")
    assert refs == [
        "r.example:5000/site/gpustack-ai/gpustack:v2.3.0",
        "r.example:5000/site/gpustack-ai/runner:cuda12.9-vllm0.32.0",
        "r.example:5000/site/gpustack-ai/runtime:pause",
        "r.example:5000/site/gpustack-ai/runtime:health",
        "r.example:5000/site/gpustack-ai/benchmark-runner:v0.0.9",
    ]


@pytest.mark.parametrize(
    ("host", "want"),
    [
        ("12.8", "12.8"),
        ("12.9", "12.9"),
        ("12.6", "12.9"),
        ("13.1", "13.0"),
        (None, "13.0"),
        ("11.8", "12.8"),
    ],
)
def test_backend_version_the_worker_picks_for_a_driver(
    v23: runners.RunnerData, host: str | None, want: str
) -> None:
    assert runners.backend_version_for_host(v23, "amd64", "cuda", "vllm", host) == want


def test_missing_data_names_the_file_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(RunnerDataError, match=r"gpustack-2\.3\.0\.json is missing.*invoke lock"):
        runners.load(tmp_path, "2.3.0")


def test_malformed_or_mismatched_data_is_refused(tmp_path: Path, data_dir: Path) -> None:
    target = runners.data_path(tmp_path, "2.3.0")
    target.write_text("{not json")
    with pytest.raises(RunnerDataError, match="cannot be read.*invoke lock"):
        runners.load(tmp_path, "2.3.0")
    doc = json.loads(runners.data_path(data_dir, "2.2.3").read_text())
    target.write_text(json.dumps(doc))  # 2.2.3's data under 2.3.0's name
    with pytest.raises(RunnerDataError, match="malformed.*invoke lock"):
        runners.load(tmp_path, "2.3.0")
    del doc["runners"][0]["docker_image"]
    runners.data_path(tmp_path, "2.2.3").write_text(json.dumps(doc))
    with pytest.raises(RunnerDataError, match="malformed"):
        runners.load(tmp_path, "2.2.3")


@pytest.mark.integration
def test_refresh_from_the_index_reproduces_the_committed_file(
    root: Path, data_dir: Path, tmp_path: Path
) -> None:
    index_url = resolve(root).index_url
    written = runners.refresh("2.2.3", tmp_path / "out", tmp_path / "cache", index_url)
    assert written.read_text() == runners.data_path(data_dir, "2.2.3").read_text()


@pytest.mark.enable_socket
def test_wheel_from_an_html_index_is_hash_checked(tmp_path: Path) -> None:
    import hashlib
    import http.server
    import threading

    from gpustack_offline.core.downloads import BlobStore, session
    from gpustack_offline.core.errors import IntegrityError

    body = b"wheel bytes"
    name = "gpustack_runner-0.1.0-py3-none-any.whl"
    digests = {"good": hashlib.sha256(body).hexdigest(), "bad": "0" * 64}

    class Index(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            kind = self.path.split("/")[1]
            if self.path.endswith("/gpustack-runner/"):
                out = f'<a href="../../files/{name}#sha256={digests[kind]}">{name}</a>'.encode()
            else:
                out = body
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        store, client = BlobStore(tmp_path), session()
        package, path = runner_data._fetch_wheel(
            "gpustack-runner", "0.1.0", f"{base}/good/simple", store, client
        )
        assert (package.wheel, package.sha256, path.read_bytes()) == (name, digests["good"], body)
        with pytest.raises(IntegrityError, match="does not match"):
            runner_data._fetch_wheel(
                "gpustack-runner", "0.1.0", f"{base}/bad/simple", store, client
            )
        with pytest.raises(RunnerDataError, match="has no gpustack_runner-0.2.0"):
            runner_data._fetch_wheel(
                "gpustack-runner", "0.2.0", f"{base}/good/simple/", store, client
            )
    finally:
        server.shutdown()
