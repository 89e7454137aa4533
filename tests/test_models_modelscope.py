"""Models from ModelScope (issue 17): locked from ModelScope's API (the revision pinned to the
commit its listing names, every file's size and sha256 from that listing), fetched by commit
through the project's one download routine into the blob store every model shares, bundled and
installed as a Hugging Face model is.

ModelScope is a loopback stand-in (support/modelscope_hub.py) with the paths and JSON shapes of
ModelScope's own client; it serves the tiny GGUF and safetensors files of support/hf_hub.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from support.fault_proxy import Drop, FaultProxy, Flip
from support.hf_hub import HubStandIn, tiny_gguf, tiny_safetensors
from support.modelscope_hub import ModelScopeStandIn
from test_models import install

from gpustack_offline.bundle import release
from gpustack_offline.cli import commands
from gpustack_offline.core.errors import IntegrityError, ModelError
from gpustack_offline.core.files import CHUNK
from gpustack_offline.core.models import Models
from gpustack_offline.recipes import models as model_bundles
from gpustack_offline.stages import modelscope
from gpustack_offline.stages.errors import HubError
from gpustack_offline.stages.model_locks import read_lock

pytestmark = pytest.mark.enable_socket  # the stand-ins and the fault proxy, on loopback

GGUF = "tiny-Q4_K_M.gguf"
MODELS_TOML = """
schema = 1

[[model]]
name = "ms-gguf"
source = "modelscope"
repository = "test-org/tiny-GGUF"
files = ["tiny-Q4_K_M.gguf"]
backend = "llama-box"

[[model]]
name = "ms-st"
source = "modelscope"
repository = "test-org/tiny-st"
revision = "v1.0"
files = ["*.json", "*.safetensors"]
backend = "vllm"

[[model]]
name = "hf-gguf"  # the same GGUF bytes, from the Hugging Face hub
source = "huggingface"
repository = "hf-org/tiny-GGUF"
files = ["*.gguf"]
backend = "llama-box"
"""


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    return {
        GGUF: tiny_gguf(1, values=CHUNK // 2),  # 2 MB: a body that breaks after a chunk
        "model.safetensors": tiny_safetensors(),
        "config.json": b'{"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}\n',
        "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}\n',
        "README.md": b"# tiny\n",
    }


@pytest.fixture(scope="module")
def ms(files: dict[str, bytes]) -> Iterator[ModelScopeStandIn]:
    with ModelScopeStandIn() as stand_in:
        stand_in.add("test-org/tiny-GGUF", {GGUF: files[GGUF], "README.md": files["README.md"]})
        st = {k: files[k] for k in ("config.json", "tokenizer.json", "model.safetensors")}
        stand_in.add("test-org/tiny-st", st, revision="v1.0", tag=True)
        stand_in.add("test-org/tiny-st", {**st, "README.md": files["README.md"]})  # master
        yield stand_in


@pytest.fixture(scope="module")
def hf(files: dict[str, bytes]) -> Iterator[HubStandIn]:
    with HubStandIn() as stand_in:
        stand_in.add("hf-org/tiny-GGUF", {GGUF: files[GGUF]})
        yield stand_in


def context(
    root: Path, area: Path, ms_url: str, hf_url: str = "http://127.0.0.1:9", **cli: object
) -> commands.Context:
    (area / "models.toml").write_text(MODELS_TOML)
    options = {
        "models": str(area / "models.toml"),
        "model_locks_dir": str(area / "locks"),
        "dist_dir": str(area / "dist"),
        "cache_dir": str(area / "cache"),
        "modelscope_endpoint": ms_url,
        "hf_endpoint": hf_url,
        "progress": False,
        "download_backoff": 0.01,
        "download_max_sleep": 0.05,
        "download_read_timeout": 5.0,
        **cli,
    }
    return commands.Context.load(root, cli=options, env={})


# -- the endpoint ------------------------------------------------------------------------------


def test_the_endpoint_is_the_option_then_the_clients_variables_then_modelscope_cn():
    assert modelscope.endpoint("", {}) == "https://www.modelscope.cn"
    assert modelscope.endpoint("", {"MODELSCOPE_DOMAIN": "ms.example.internal"}) == (
        "https://ms.example.internal"  # the older variable: a bare host
    )
    env = {"MODELSCOPE_ENDPOINT": "http://mirror:8080/", "MODELSCOPE_DOMAIN": "ms.example"}
    assert modelscope.endpoint("", env) == "http://mirror:8080"
    assert modelscope.endpoint("https://opt.example/", env) == "https://opt.example"


def test_a_file_is_fetched_from_the_clients_download_path_by_commit():
    url = modelscope.file_url("https://www.modelscope.cn", "Qwen/Q-GGUF", "a" * 40, "d/x+y.gguf")
    assert url == (
        "https://www.modelscope.cn/api/v1/models/Qwen/Q-GGUF/repo?"
        f"Revision={'a' * 40}&FilePath=d%2Fx%2By.gguf"
    )


def test_a_modelscope_model_defaults_to_its_master_branch(tmp_path):
    (tmp_path / "models.toml").write_text(MODELS_TOML)
    models = Models.load(tmp_path / "models.toml")
    assert models.get("ms-gguf").revision == "master"
    assert models.get("hf-gguf").revision == "main"


# -- lock --------------------------------------------------------------------------------------


def test_lock_pins_the_commit_and_every_files_size_and_sha256_from_the_listing(
    root, tmp_path, ms, files
):
    ctx = context(root, tmp_path, ms.url)
    [model] = ctx.models(["ms-st"])
    before = len(ms.requests())
    locked = model_bundles.lock(ctx, model)
    lock = read_lock(locked.path)
    commit = ms.commit_of("test-org/tiny-st", "v1.0")
    assert lock.commit == commit and lock.source == "modelscope" and lock.revision == "v1.0"
    assert commit != ms.commit_of("test-org/tiny-st", "master")  # the tag, not the branch
    assert [f.path for f in lock.files] == ["config.json", "model.safetensors", "tokenizer.json"]
    for f in lock.files:
        assert (f.size, f.sha256) == (len(files[f.path]), hashlib.sha256(files[f.path]).hexdigest())
    assert {f.path: f.lfs for f in lock.files}["model.safetensors"]
    text = locked.path.read_text()
    assert "ModelScope's file listing" in text and text.count("[[files]]") == 3
    # the revisions, the listing at the tag, the listing at its commit; no file downloaded
    asked = ms.requests()[before:]
    assert [(s.path.rsplit("/", 2)[-2:], s.query.get("Revision")) for s in asked] == [
        (["tiny-st", "revisions"], None),
        (["repo", "files"], "v1.0"),
        (["repo", "files"], commit),
    ]
    assert locked.moved[0] == f"commit: (none) -> {commit}"
    assert model_bundles.lock(ctx, model).moved == []


def test_a_new_commit_on_the_branch_shows_as_moved_lines(root, tmp_path, files):
    with ModelScopeStandIn() as own:
        own.add("test-org/tiny-GGUF", {GGUF: files[GGUF]})
        ctx = context(root, tmp_path, own.url)
        [model] = ctx.models(["ms-gguf"])
        first = read_lock(model_bundles.lock(ctx, model).path)
        newer = tiny_gguf(3)
        commit = own.add("test-org/tiny-GGUF", {GGUF: newer})
        moved = model_bundles.lock(ctx, model).moved
    assert moved == [
        f"commit: {first.commit} -> {commit}",
        f"{GGUF}: sha256:{first.files[0].sha256} -> sha256:{hashlib.sha256(newer).hexdigest()}",
    ]


def test_a_file_listed_without_a_sha256_is_fetched_and_hashed_at_lock_time(root, tmp_path, files):
    with ModelScopeStandIn() as own:
        own.add("test-org/tiny-st", {k: files[k] for k in ("config.json", "model.safetensors")},
                revision="v1.0", tag=True)  # fmt: skip
        own.without_sha256.add("config.json")
        ctx = context(root, tmp_path, own.url)
        lock = read_lock(model_bundles.lock(ctx, ctx.models(["ms-st"])[0]).path)
        assert [s.query["FilePath"] for s in own.requests("/repo") if "FilePath" in s.query] == [
            "config.json"
        ]
    by_path = {f.path: f for f in lock.files}
    assert by_path["config.json"].sha256 == hashlib.sha256(files["config.json"]).hexdigest()


def test_a_wrong_repository_or_revision_is_one_clear_error_naming_it_and_the_fix(
    root, tmp_path, ms
):
    ctx = context(root, tmp_path, ms.url)
    (tmp_path / "models.toml").write_text(
        MODELS_TOML.replace('repository = "test-org/tiny-st"', 'repository = "test-org/nope"')
        .replace('name = "ms-gguf"\n', 'name = "ms-gguf"\nrevision = "v9"\n', 1)
    )  # fmt: skip
    with pytest.raises(HubError) as err:
        model_bundles.lock(ctx, ctx.models(["ms-st"])[0])
    message = str(err.value)
    assert f"model ms-st: test-org/nope: {ms.url} has no such repository" in message
    assert "Fix: check repository in models.toml" in message and "MODELSCOPE_ENDPOINT" in message
    with pytest.raises(HubError) as err:
        model_bundles.lock(ctx, ctx.models(["ms-gguf"])[0])
    message = str(err.value)
    assert f"test-org/tiny-GGUF: {ms.url} has no revision 'v9' (branches: master; tags: none)" in (
        message
    )
    assert "Fix: give a branch, tag or commit" in message
    # an unknown commit: the listing at it is the miss
    (tmp_path / "models.toml").write_text(
        MODELS_TOML.replace('name = "ms-gguf"\n', f'name = "ms-gguf"\nrevision = "{"0" * 40}"\n')
    )
    with pytest.raises(HubError, match=f"has no revision '{'0' * 40}' \\(its file listing: HTTP"):
        model_bundles.lock(ctx, ctx.models(["ms-gguf"])[0])
    assert not (tmp_path / "locks").exists() or not list((tmp_path / "locks").iterdir())


def test_a_commit_as_revision_is_locked_as_it_is(root, tmp_path, ms):
    commit = ms.commit_of("test-org/tiny-GGUF", "master")
    ctx = context(root, tmp_path, ms.url)
    (tmp_path / "models.toml").write_text(
        MODELS_TOML.replace('name = "ms-gguf"\n', f'name = "ms-gguf"\nrevision = "{commit}"\n')
    )
    assert read_lock(model_bundles.lock(ctx, ctx.models(["ms-gguf"])[0]).path).commit == commit


def test_lock_refuses_patterns_that_match_nothing_naming_the_files(root, tmp_path, ms):
    ctx = context(root, tmp_path, ms.url)
    (tmp_path / "models.toml").write_text(MODELS_TOML.replace('["tiny-Q4_K_M.gguf"]', '["x.gguf"]'))
    with pytest.raises(HubError, match=r"no file of test-org/tiny-GGUF@\w{12} matches 'x.gguf'; "
                       r"it has .gitattributes, README.md, tiny-Q4_K_M.gguf"):  # fmt: skip
        model_bundles.lock(ctx, ctx.models(["ms-gguf"])[0])


def test_a_modelscope_token_reaches_modelscope_and_nothing_written(root, tmp_path, ms, monkeypatch):
    secret = "ms-plantedSecretToken0123456789"
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", secret)
    ctx = context(root, tmp_path, ms.url)
    before = len(ms.requests())
    commands.build(ctx, [], ctx.models(["ms-gguf"]))
    seen = ms.requests()[before:]
    assert seen and all(s.authorization == f"Bearer {secret}" for s in seen)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


# -- bundle ------------------------------------------------------------------------------------


def test_a_modelscope_bundle_is_its_files_plus_under_1_mb_and_names_its_source(
    root, tmp_path, ms, files
):
    ctx = context(root, tmp_path, ms.url)
    [result] = commands.build(ctx, [], ctx.models(["ms-gguf"]))
    folder = result.directory
    assert result.tar.stat().st_size <= len(files[GGUF]) + 1_000_000
    assert (folder / "models/ms-gguf" / GGUF).read_bytes() == files[GGUF]
    commit = ms.commit_of("test-org/tiny-GGUF", "master")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["model"]["source"] == "modelscope" and manifest["model"]["commit"] == commit
    # GPUStack's catalog: a local path, whatever the source; home is the ModelScope page
    [entry] = yaml.safe_load((folder / "catalog/gpustack-0.x.yaml").read_text())
    assert entry["templates"][0]["source"] == "local_path"
    assert entry["home"] == "https://www.modelscope.cn/models/test-org/tiny-GGUF"
    sums = release.read_sums(folder / "SHA256SUMS")
    assert sums[f"models/ms-gguf/{GGUF}"] == hashlib.sha256(files[GGUF]).hexdigest()

    sbom = json.loads((folder / "sbom.cdx.json").read_text())
    top = sbom["metadata"]["component"]
    assert top["type"] == "machine-learning-model"
    assert top["purl"] == (
        f"pkg:generic/test-org/tiny-GGUF@{commit}?repository_url=https://www.modelscope.cn"
    )
    assert top["externalReferences"][0]["url"] == (
        "https://www.modelscope.cn/models/test-org/tiny-GGUF/files"
    )
    [weights] = [c for c in sbom["components"] if c["type"] == "machine-learning-model"]
    assert weights["externalReferences"][0]["url"] == (
        "https://www.modelscope.cn/api/v1/models/test-org/tiny-GGUF/repo?"
        f"Revision={commit}&FilePath={GGUF}"
    )
    props = {p["name"]: p["value"] for p in weights["properties"]}
    assert props["gpustack-offline:model:source"] == "modelscope"
    assert props["gpustack-offline:model:repository"] == "test-org/tiny-GGUF"
    assert props["gpustack-offline:model:revision"] == "master"
    assert props["gpustack-offline:model:commit"] == commit


def test_the_same_file_from_modelscope_and_the_hub_is_downloaded_once(root, tmp_path, ms, hf):
    ctx = context(root, tmp_path, ms.url, hf.url)
    before_ms, before_hf = len(ms.downloads(GGUF)), len(hf.downloads(GGUF))
    commands.build(ctx, [], ctx.models(["ms-gguf"]))
    commands.build(ctx, [], ctx.models(["hf-gguf"]))
    assert len(ms.downloads(GGUF)) - before_ms == 1
    assert len(hf.downloads(GGUF)) - before_hf == 0  # the one blob store had it
    ms_file = ctx.dist / "model-ms-gguf/models/ms-gguf" / GGUF
    assert (ctx.dist / "model-hf-gguf/models/hf-gguf" / GGUF).read_bytes() == ms_file.read_bytes()


def test_a_download_cut_mid_file_resumes_where_it_broke(root, tmp_path, ms, files):
    ctx = context(root, tmp_path, ms.url)
    model_bundles.lock(ctx, ctx.models(["ms-gguf"])[0])
    with FaultProxy(ms.url) as proxy:
        proxy.on(r"^/oss/", Drop(after=CHUNK + CHUNK // 2), attempts=[1])
        ctx = context(root, tmp_path, proxy.url)
        [result] = commands.build(ctx, [], ctx.models(["ms-gguf"]))
        gets = [s for s in proxy.seen if s.path.startswith("/oss/")]
    assert [g.fault for g in gets] == ["Drop", None]
    assert gets[1].range == f"bytes={CHUNK}-"  # resumed, not started over
    assert (result.directory / "models/ms-gguf" / GGUF).read_bytes() == files[GGUF]


def test_a_flipped_byte_is_refused_on_the_way_and_by_the_installer(root, tmp_path, ms, files):
    ctx = context(root, tmp_path, ms.url)
    model_bundles.lock(ctx, ctx.models(["ms-gguf"])[0])
    with FaultProxy(ms.url) as proxy:
        proxy.on(r"^/oss/", Flip())
        with pytest.raises(IntegrityError, match=f"ms-gguf: {GGUF}"):
            commands.build(context(root, tmp_path, proxy.url), [], ctx.models(["ms-gguf"]))
    assert not (ctx.dist / "model-ms-gguf").exists()
    assert not list((tmp_path / "cache").rglob(hashlib.sha256(files[GGUF]).hexdigest()))

    [result] = commands.build(ctx, [], ctx.models(["ms-gguf"]))
    site = tmp_path / "site"
    with tarfile.open(result.tar) as tf:
        tf.extractall(site, filter="data")
    target = site / "model-ms-gguf/models/ms-gguf" / GGUF
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    proc = install(site / "model-ms-gguf", "--dest", tmp_path / "models")
    assert proc.returncode == 3
    assert f"altered (checksum mismatch): models/ms-gguf/{GGUF}" in proc.stderr
    assert not (tmp_path / "models").exists()


def test_the_installer_places_a_modelscope_model_as_any_other(root, tmp_path, ms, files):
    ctx = context(root, tmp_path, ms.url)
    [result] = commands.build(ctx, [], ctx.models(["ms-st"]))
    dest = tmp_path / "models"
    proc = install(result.directory, "--dest", dest, "--gpustack", "0")
    assert proc.returncode == 0
    [entry] = yaml.safe_load((dest / "model-catalog.yaml").read_text())
    template = entry["templates"][0]
    assert (template["source"], template["local_path"]) == ("local_path", str(dest / "ms-st"))
    assert (dest / "ms-st/model.safetensors").read_bytes() == files["model.safetensors"]


def test_an_unknown_source_is_refused_when_read(tmp_path):
    (tmp_path / "models.toml").write_text(MODELS_TOML.replace('"modelscope"', '"civitai"', 1))
    with pytest.raises(ModelError, match="source 'civitai' is not one of huggingface, modelscope"):
        Models.load(tmp_path / "models.toml")


def test_invoke_lock_asks_the_endpoint_of_modelscopes_own_variable(root, tmp_path, ms):
    """Through the command line: `MODELSCOPE_ENDPOINT` (the client's variable) points the lock
    at a mirror; a wrong repository is one `error:` line with the fix, exit 2."""
    (tmp_path / "models.toml").write_text(
        MODELS_TOML + '\n[[model]]\nname = "bad-gguf"\nsource = "modelscope"\n'
        'repository = "test-org/missing"\nfiles = ["*.gguf"]\nbackend = "llama-box"\n'
    )
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GPUSTACK_OFFLINE_", "MODELSCOPE_"))}  # fmt: skip
    env.update(
        GPUSTACK_OFFLINE_MODELS=str(tmp_path / "models.toml"),
        GPUSTACK_OFFLINE_MODEL_LOCKS_DIR=str(tmp_path / "locks"),
        GPUSTACK_OFFLINE_CACHE_DIR=str(tmp_path / "cache"),
        MODELSCOPE_ENDPOINT=ms.url,
    )
    invoke = Path(sys.executable).with_name("invoke")

    def run(name: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [invoke, "lock", "--model", name], cwd=root, env=env, capture_output=True,
            text=True, timeout=120, check=False,
        )  # fmt: skip

    done = run("ms-gguf")
    assert done.returncode == 0, done.stdout + done.stderr
    lock = read_lock(tmp_path / "locks" / "ms-gguf.toml")
    assert lock.commit == ms.commit_of("test-org/tiny-GGUF", "master")
    failed = run("bad-gguf")
    out = failed.stdout + failed.stderr
    assert failed.returncode == 2 and "Traceback" not in out
    [line] = [ln for ln in out.splitlines() if ln.startswith("error: ")]
    assert f"test-org/missing: {ms.url} has no such repository" in line and "Fix: " in line


def test_every_source_has_its_module_and_its_endpoint_option():
    from dataclasses import fields

    from gpustack_offline.core.models import SOURCES
    from gpustack_offline.core.options import Options
    from gpustack_offline.stages.model_sources import MODEL_SOURCES

    assert sorted(MODEL_SOURCES) == sorted(SOURCES)
    names = {f.name for f in fields(Options)}
    assert {source.OPTION for source in MODEL_SOURCES.values()} <= names


def test_a_listing_at_modelscopes_cap_is_refused_as_maybe_incomplete(
    root, tmp_path, ms, monkeypatch
):
    monkeypatch.setattr(modelscope, "LISTING_CAP", 3)  # the stand-in's repository has 3 files
    ctx = context(root, tmp_path, ms.url)
    with pytest.raises(HubError, match="listed 3 entries at 'master', ModelScope's cap"):
        model_bundles.lock(ctx, ctx.models(["ms-gguf"])[0])
