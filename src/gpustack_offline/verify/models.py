"""Verification of a model bundle beside a GPUStack bundle, offline: a 0.x pip bundle in one
clean container (`verify_model`), or a 2.x docker bundle on the Docker Engine
(`verify_model_docker2`, the second part below).

The container is the one `verify.pip` uses (Debian of the cell's arch, an internal network, the
sinkhole as its only resolver, the audit hook on the start's PYTHONPATH); both bundles are
mounted read-only. What a site does, in order:

1. `install.sh --prefix /opt/gpustack` installs GPUStack from the cell's bundle;
2. `install-model.sh --prefix /opt/gpustack` places the model under its default folder
   (`/var/lib/gpustack/models/<name>/`), writes the catalog there and points the install's
   `gpustack.yaml` at it (`model_catalog_file`);
3. GPUStack starts as `install.sh` configures it (`verify.pip.SITE_START`, `launch`, `observe`:
   `/healthz`, the worker, the admin's login);
4. `payload/model_probe.py` finds the model in the catalog with its `local_path`, deploys that
   spec through `POST /v1/models` as the UI's catalog page does, and follows its instance: the
   scheduler places it, the worker resolves the file (its model file `ready` with the placed path
   as `resolved_paths`) and the instance moves on to its engine;
5. the egress audit of the whole run (installs, start, deployment) must show no outside host.

Inference is not run. The instance's engine is the bundle's llama-box; with a real one a real
model would serve, but no inference engine can be fetched on the host this project is built on,
so its bundles in the tests carry stand-in tools that only answer `--version` (and, for
gguf-parser, a fixed estimate so that upstream's scheduler runs): the instance then ends in
`error` with the engine's message. What is asserted is what comes before the engine: the catalog
entry, the accepted deployment, the instance scheduled to the worker, the file resolved there at
the placed path, and nothing fetched.

Beside a GPUStack 2.x docker bundle, as a site does it:

1. `install.sh --prefix P --registry SITE` loads the bundle and pushes it into a loopback site
   registry, where every image the server and worker will ask for must resolve (`docker2_site`);
2. `install-model.sh --prefix P --dest DIR` places the model in DIR (a folder the server and
   workers mount at the same path), writes the 2.x catalog there, and records
   `GPUSTACK_MODEL_CATALOG_FILE` in `P/docker.env` and `DIR:DIR:ro` in `P/docker.volumes`;
3. the server pulled from the site registry starts as install.sh prints its run line
   (`server_start`: server.args, docker.env, docker.volumes), audited (`audit_server`): `/healthz`
   on 30080 and the admin's login. Its embedded worker is on (`GPUSTACK_ENABLE_WORKER`), and
   its config file (`GPUSTACK_CONFIG_FILE`) declares one stand-in GPU of the cell's device
   (`resources.gpu_devices`, upstream's way to declare GPUs it cannot detect; `vendor` named by
   the image's own gpustack_runtime): a worker a GPU host would run, with the same mounts;
4. `payload/model_probe.py` (with `/v2`, 2.x's `versioned_prefix`) finds the model in the catalog
   with its `local_path`, deploys that spec (`POST /v2/models`) and follows its instance: the
   scheduler analyzes it, reading the model's config at the placed path through the mount
   (2.2.3 `scheduler/calculator.py`, `get_pretrained_config_with_workers`: the server's own copy
   first, a worker's only when the path is not there), and places it on the worker's GPU; the
   worker resolves the file (its model file `ready` with the placed path as `resolved_paths`,
   2.2.3 `worker/model_file_manager.py`) and goes on to start the engine;
5. the log must name no hub and no missing path, and the egress audit of the start, login and
   deployment must show no outside host.

What is not checked for 2.x: GPU detection (the GPU is declared) and the engine. The worker
starts the model in a vLLM or SGLang runner container through the Docker socket; none is given
here (it would pull and start runner containers on the test host), so the instance ends in
`error` ("No available deployer") after its file was found. Inference is not run.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpustack_offline import payload
from gpustack_offline.core.docker import container, exec_in
from gpustack_offline.core.errors import VerifyError
from gpustack_offline.core.matrix import Cell
from gpustack_offline.verify import egress, standins
from gpustack_offline.verify.common import (
    SETTLE,
    Report,
    Step,
    audit_hook,
    egress_step,
    egress_summary,
    failure,
)
from gpustack_offline.verify.docker import (
    API_PORT_2X,
    PASSWORD_FILE,
    audit_server,
    docker2_site,
    host_step,
    server_start,
)
from gpustack_offline.verify.pip import (
    ISOLATION,
    PORT,
    PREFIX,
    SITE_START,
    Start,
    exec_step,
    finish,
    launch,
    observe,
    target_container,
)

if TYPE_CHECKING:
    from docker.models.containers import Container

Judge = Callable[[str, bool, str, str], None]
MODEL_PROBE = payload.path("model_probe.py").read_text()
MODELS_DIR = "/var/lib/gpustack/models"  # install-model.sh's default --dest
DATA_DIR = "/var/lib/gpustack-site"  # `launch`'s data dir for a start named "site"
# Seconds the probe follows the deployed instance: scheduling, the worker's model file, the
# engine's start (a few seconds on the development host).
DEPLOY_SECONDS = 240
# What a hub download leaves in GPUStack's logs (0.7 worker/downloaders.py, huggingface_hub).
HUB_SIGNS = ("huggingface.co", "hf_hub_download", "modelscope.cn", "snapshot_download")
DOWNLOAD_SIGN = "Downloading model file:"  # worker/model_file_manager.py, then the source
# GPUStack 2.x's scheduler reading a local_path model's config (2.2.3 scheduler/calculator.py):
# from the server's own copy, or, when the path is not there, from the workers
READ_HERE = "Trying to get pretrained config from"
NOT_HERE = "does not exist in server node"
# The 2.x server's embedded worker, on (2.2.3 config/config.py: a fresh server runs none), and
# where its config file declaring the stand-in GPU is mounted.
WORKER_2X = {"GPUSTACK_ENABLE_WORKER": "true"}
GPU_CONFIG = "/etc/gpustack-verify/stand-in-gpu.yaml"


def verify_model(
    cell: Cell,
    bundle_dir: Path,
    model_dir: Path,
    cache: Path,
    timeout: int,
    mirror: str,
    report: Report,
    allowlist: Sequence[str],
) -> Report:
    """The model bundle `model_dir` installed beside the pip bundle `bundle_dir` (of `cell`),
    served from the site's catalog, as the module's doc says."""
    env = model_bundle_env(model_dir)
    name, entry = env["MODEL_NAME"], env.get("MODEL_ENTRY", "")
    placed = f"{MODELS_DIR}/{name}" + (f"/{entry}" if entry else "")
    catalog = f"{MODELS_DIR}/model-catalog.yaml"
    mounts = {
        bundle_dir.resolve(): "/bundle",
        model_dir.resolve(): "/model",
        audit_hook(): "/opt/egress-audit",
    }
    with target_container(cell, cache, mirror, mounts, f"models-{cell.arch}") as audit:
        box = audit.box

        def step(name: str, argv: list[str]) -> Step:
            return exec_step(cell, report, box, name, argv)

        judge = _judge(cell, report)
        step("isolation", ["python3", "-c", ISOLATION, audit.sinkhole.address])
        mark = len(egress.read_events(audit.sinkhole))
        step("install", ["/bundle/install.sh", "--prefix", PREFIX])
        step("install-model", ["/model/install-model.sh", "--prefix", PREFIX])
        config = step("config", ["grep", "^model_catalog_file:", f"{PREFIX}/gpustack.yaml"])
        named = config.output.strip().split(":", 1)[-1].strip().strip('"')
        judge("config-catalog", named == catalog, config.output,
              f"{PREFIX}/gpustack.yaml does not name {catalog}")  # fmt: skip

        run = Start(box, "site", SITE_START, egress.address_of(box, audit.sinkhole.network))
        launch(cell, report, run, {})
        observe(cell, report, [run], timeout)
        worker_up = time.monotonic()
        url = f"http://127.0.0.1:{PORT}"
        password = f"{DATA_DIR}/initial_admin_password"
        probe = step("deploy", ["python3", "-c", MODEL_PROBE, url, password, name,
                                str(DEPLOY_SECONDS)])  # fmt: skip
        found: dict[str, Any] = json.loads(probe.output.strip().splitlines()[-1])
        report.note = _judge_deployment(found, name, placed, judge)

        serve_logs = f"cat {DATA_DIR}/log/serve/*.log 2>/dev/null || true"
        logs = step("model-logs", ["sh", "-c", serve_logs])
        # upstream's worker logs its resolution of a local path as a "download" of that path;
        # any other source named there, or a hub, is a fetch
        reached = [
            line
            for line in logs.output.splitlines()
            if any(s in line for s in HUB_SIGNS)
            or (DOWNLOAD_SIGN in line and not line.rstrip().endswith(f"{DOWNLOAD_SIGN} {placed}"))
        ]
        judge("no-download", not reached, "\n".join(reached) or "no hub named in the serve logs",
              "the worker reached for a hub for a local_path model")  # fmt: skip

        time.sleep(max(0.0, SETTLE - (time.monotonic() - worker_up)))
        events = egress.collect(audit.sinkhole)[mark:]
        site = finish(run, events)
        report.seconds_to_healthz = site.seconds_to_healthz
        report.seconds_to_worker = site.seconds_to_worker
        judged = egress.summarize(events)
        report.egress = egress_summary(judged)
        report.egress_details = {"install+model+site": judged}
        report.steps.append(egress_step(cell, judged, site, allowlist))
    report.ok = True
    return report


def _judge(cell: Cell, report: Report) -> Judge:
    """One step per thing judged; the cell fails, saying `why`, on the first that is not ok."""

    def judge(name: str, ok: bool, output: str, why: str) -> None:
        report.steps.append(Step(name, 0 if ok else 1, 0.0, output))
        if not ok:
            raise VerifyError(failure(cell, report.steps[-1], why))

    return judge


def _judge_offer(found: dict[str, Any], name: str, placed: str, judge: Judge, api: str) -> str:
    """The catalog lists the model with its placed path and its deployment was accepted; the
    probe's answers as text, for the steps."""
    text = json.dumps(found, indent=1, sort_keys=True)
    spec = found.get("spec") or {}
    judge("catalog", spec.get("local_path") == placed and spec.get("source") == "local_path",
          text, f"the catalog does not list {name} with local_path {placed}")  # fmt: skip
    created = found.get("created") or {}
    body = created.get("body") or {}
    judge("deployment", created.get("status") == 200 and body.get("local_path") == placed,
          text, f"POST {api}/models of {name}'s catalog entry was not accepted")  # fmt: skip
    return text


def _judge_deployment(
    found: dict[str, Any], name: str, placed: str, judge: Judge, api: str = "/v1"
) -> str:
    """Each thing the probe saw, judged in the order it happens; the report's note."""
    text = _judge_offer(found, name, placed, judge, api)
    body = (found.get("created") or {}).get("body") or {}
    instance = found.get("instance") or {}
    judge("scheduled", bool(instance.get("worker_id")), text,
          f"{name}'s instance was not scheduled to a worker (state {instance.get('state')!r}: "
          f"{instance.get('state_message')!r})")  # fmt: skip
    files = [f for f in found.get("model_files") or [] if f.get("local_path") == placed]
    resolved = [f for f in files if f.get("state") == "ready" and f.get("resolved_paths")]
    judge("file-resolved", bool(resolved) and resolved[0]["resolved_paths"] == [placed]
          and instance.get("resolved_path") == placed, text,
          f"the worker did not resolve {name}'s file at {placed}")  # fmt: skip
    state, message = instance.get("state"), (instance.get("state_message") or "").strip()
    engine = f"{state}" + (f" ({message.splitlines()[0]})" if message else "")
    return (
        f"{name}: listed in the catalog with local_path {placed}; deployment accepted (model "
        f"{body.get('id')}); instance {instance.get('name')} scheduled to worker "
        f"{instance.get('worker_name')}; file resolved there at {placed} with nothing fetched; "
        f"instance states {' -> '.join(found.get('states') or [])}; the engine: {engine} "
        "(inference is not run here)"
    )


def verify_model_docker2(
    cell: Cell,
    bundle_dir: Path,
    model_dir: Path,
    timeout: int,
    report: Report,
    runners_dir: Path,
    sinkhole_image: str,
    allowlist: Sequence[str],
) -> Report:
    """The model bundle `model_dir` installed beside the GPUStack 2.x docker bundle `bundle_dir`
    (of `cell`), offered by the server from the site's catalog and deployed, as the module's
    doc says (its second part)."""
    name = model_bundle_env(model_dir)["MODEL_NAME"]
    judge = _judge(cell, report)
    found: dict[str, Any] = {}
    with docker2_site(cell, bundle_dir, report, runners_dir) as site:
        dest = site.prefix / "models"  # a folder the server and every worker mount
        catalog, placed = dest / "model-catalog.yaml", dest / name
        installer = ["bash", str(model_dir / "install-model.sh")]
        host_step(cell, report, "install-model",
                  [*installer, "--prefix", str(site.prefix), "--dest", str(dest)])  # fmt: skip
        start = server_start(site.prefix, site.registry)
        configured = start.env.get("GPUSTACK_MODEL_CATALOG_FILE") == str(catalog)
        mounted = f"{dest}:{dest}:ro" in start.mounts
        seen = "\n".join([*(f"{k}={v}" for k, v in start.env.items()), *start.mounts])
        judge("config-catalog", configured and mounted, seen,
              f"docker.env does not name {catalog} or docker.volumes lacks {dest}")  # fmt: skip
        gpu = site.prefix / "stand-in-gpu.yaml"
        gpu.write_text(standins.declared_gpu(cell, manufacturer(cell, site.server)))
        note: list[str] = []

        def deploy(box: Container) -> None:
            url = f"http://127.0.0.1:{API_PORT_2X}"
            argv = ["python3", "-c", MODEL_PROBE, url, PASSWORD_FILE, name, str(DEPLOY_SECONDS),
                    "/v2", "worker"]  # fmt: skip
            probe = exec_step(cell, report, box, "deploy", argv)
            found.update(json.loads(probe.output.strip().splitlines()[-1]))
            note.append(_judge_deployment(found, name, str(placed), judge, "/v2"))
            log = bytes(box.logs()).decode(errors="replace").splitlines()
            read = [line for line in log if READ_HERE in line or NOT_HERE in line]
            judge("config-read", bool(read) and not any(NOT_HERE in line for line in read),
                  "\n".join(read) or "no line of the scheduler's evaluation in the log",
                  f"the server did not read {name}'s config at {placed}")  # fmt: skip
            reached = [line for line in log if any(sign in line for sign in HUB_SIGNS)]
            judge("no-download", not reached, "\n".join(reached) or "no hub named in the log",
                  "the server or its worker reached for a hub for a local_path model")  # fmt: skip

        audited = dataclasses.replace(
            start,
            env={**start.env, **WORKER_2X, "GPUSTACK_CONFIG_FILE": GPU_CONFIG},
            mounts=(*start.mounts, f"{gpu}:{GPU_CONFIG}:ro"),
            during=deploy,
        )
        audit_server(cell, site.server, audited, timeout, report, sinkhole_image, allowlist)
    report.note = (
        f"{note[0]}; the worker is the server's own (GPUSTACK_ENABLE_WORKER) with a declared "
        "stand-in GPU (resources.gpu_devices: no GPU is detected here)"
    )
    report.ok = True
    return report


def manufacturer(cell: Cell, image: str) -> str:
    """What GPUStack's runtime in `image` names the maker of the cell's devices (`vendor` of a
    declared GPU), asked of the image with no network."""
    with container(image, name_hint="gpustack-manufacturer") as box:
        code, out = exec_in(box, ["python3", "-c", standins.MANUFACTURER_PROBE, str(cell.backend)])
    if code != 0 or not out.strip():
        raise VerifyError(f"{cell.id}: {image} names no maker for {cell.backend} devices: {out}")
    return out.strip().splitlines()[-1]


def model_bundle_env(model_dir: Path) -> dict[str, str]:
    """The model bundle's bundle.env (KEY=value lines)."""
    values = {}
    for line in (model_dir / "bundle.env").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            values[key.strip()] = value.strip().strip("\"'")
    if values.get("BUNDLE_KIND") != "model" or not values.get("MODEL_NAME"):
        raise VerifyError(f"{model_dir} is not a model bundle (its bundle.env names no model)")
    return values
