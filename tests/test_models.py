"""Models across the gap (issue 17): models as data, locked from the hub's API, bundled through the
blob store, placed and registered on the site by install-model.sh.

The hub is a loopback stand-in (support/hf_hub.py) with the real hub's paths and JSON, asked by
the real `huggingface_hub` client; it serves a tiny GGUF written with the `gguf` package and a
small safetensors file. The tests' own models.toml names them; bundles/models.toml is only read
for its shape.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from support.fault_proxy import Drop, FaultProxy
from support.hf_hub import HubStandIn, git_blob_id, tiny_gguf, tiny_safetensors
from support.upstream import run_gpustack
from test_scripts import gpustack_wheel, make_bundle
from test_scripts import install as install_gpustack

from gpustack_offline.bundle import release
from gpustack_offline.bundle.signing import generate_key
from gpustack_offline.cli import commands
from gpustack_offline.core.errors import BundleError, LockError, ModelError
from gpustack_offline.core.files import CHUNK
from gpustack_offline.core.models import SOURCES, Models
from gpustack_offline.recipes import models as model_bundles
from gpustack_offline.stages.errors import HubError
from gpustack_offline.stages.model_locks import read_lock

pytestmark = pytest.mark.enable_socket  # the hub stand-in and the fault proxy, on loopback

GGUF = "tiny-Q4_K_M.gguf"
MODELS_TOML = """
schema = 1

[[model]]
name = "tiny-gguf"
source = "huggingface"
repository = "test-org/tiny-GGUF"
files = ["tiny-Q4_K_M.gguf"]
backend = "llama-box"

[[model]]
name = "tiny-gguf-copy"  # another repository with the same GGUF bytes
source = "huggingface"
repository = "other-org/tiny-GGUF-copy"
files = ["*.gguf", "config.json"]
backend = "llama-box"

[[model]]
name = "tiny-st"
source = "huggingface"
repository = "test-org/tiny-st"
files = ["*.json", "*.safetensors"]
backend = "vllm"
categories = ["llm"]

[[model]]
name = "both-quants"
source = "huggingface"
repository = "test-org/tiny-GGUF"
files = ["*.gguf"]
backend = "llama-box"
"""


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    return {
        GGUF: tiny_gguf(1, values=CHUNK // 2),  # 2 MB: a body that breaks after a chunk
        "tiny-Q8_0.gguf": tiny_gguf(2, values=1024),
        "model.safetensors": tiny_safetensors(),
        "config.json": b'{"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}\n',
        "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}\n',
        "README.md": b"# tiny\n",
    }


@pytest.fixture(scope="module")
def hub(files: dict[str, bytes]) -> Iterator[HubStandIn]:
    with HubStandIn() as stand_in:
        stand_in.add(
            "test-org/tiny-GGUF",
            {k: files[k] for k in (GGUF, "tiny-Q8_0.gguf", "README.md")},
        )
        stand_in.add(
            "other-org/tiny-GGUF-copy", {GGUF: files[GGUF], "config.json": files["config.json"]}
        )
        stand_in.add(
            "test-org/tiny-st",
            {k: files[k] for k in ("config.json", "tokenizer.json", "model.safetensors",
                                   "README.md")},
        )  # fmt: skip
        yield stand_in


def context(root: Path, area: Path, endpoint: str, **cli: object) -> commands.Context:
    (area / "models.toml").write_text(MODELS_TOML)
    options = {
        "models": str(area / "models.toml"),
        "model_locks_dir": str(area / "locks"),
        "dist_dir": str(area / "dist"),
        "cache_dir": str(area / "cache"),
        "hf_endpoint": endpoint,
        "progress": False,
        "download_backoff": 0.01,
        "download_max_sleep": 0.05,
        "download_read_timeout": 5.0,
        **cli,
    }
    return commands.Context.load(root, cli=options, env={})


def one(ctx: commands.Context, name: str) -> list:  # type: ignore[type-arg]
    return ctx.models([name])


# -- the data ----------------------------------------------------------------------------------


def test_the_committed_models_data_reads_and_names_real_small_models(root):
    models = Models.load(root / "bundles" / "models.toml")
    assert models.names, "bundles/models.toml declares no model"
    for model in models.models.values():
        assert model.source in SOURCES and "/" in model.repository and model.files


def test_an_unknown_model_name_is_one_clear_error_naming_the_nearest(root, tmp_path):
    ctx = context(root, tmp_path, "http://127.0.0.1:9")
    with pytest.raises(ModelError) as err:
        ctx.models(["tiny-guff"])
    message = str(err.value)
    assert "unknown model 'tiny-guff'" in message
    assert "did you mean 'tiny-gguf'?" in message and "tiny-st" in message


def test_an_unknown_model_through_invoke_is_one_error_line(root, tmp_path):
    (tmp_path / "models.toml").write_text(MODELS_TOML)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUSTACK_OFFLINE_")}
    env.update(GPUSTACK_OFFLINE_MODELS=str(tmp_path / "models.toml"),
               GPUSTACK_OFFLINE_DIST_DIR=str(tmp_path / "dist"))  # fmt: skip
    invoke = Path(os.sys.executable).with_name("invoke")
    proc = subprocess.run(
        [invoke, "bundle", "--model", "nope"], cwd=root, env=env, capture_output=True,
        text=True, timeout=60, check=False,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out
    [line] = [ln for ln in out.splitlines() if ln.startswith("error: ")]
    assert "unknown model 'nope'" in line and "known models: both-quants" in line


@pytest.mark.parametrize(
    ("text", "wanted"),
    [
        ('[[model]]\nname = "Bad Name"\nsource = "huggingface"\nrepository = "a/b"\n'
         'files = ["x"]\nbackend = "vllm"\n', "must be lowercase"),
        ('[[model]]\nname = "a"\nsource = "civitai"\nrepository = "a/b"\nfiles = ["x"]\n'
         'backend = "vllm"\n', "source 'civitai' is not one of huggingface, modelscope"),
        ('[[model]]\nname = "a"\nsource = "huggingface"\nrepository = "a/b"\nfiles = []\n'
         'backend = "vllm"\n', "files is empty"),
        ('[[model]]\nname = "a"\nsource = "huggingface"\nrepository = "a/b"\nfiles = ["x"]\n'
         'backend = "tgi"\n', "backend 'tgi' is not one of"),
        ('[[model]]\nname = "a"\nsource = "huggingface"\nrepository = "a/b"\nfiles = ["x"]\n'
         'backend = "vllm"\nrevison = "main"\n', "unknown keys ['revison']"),
    ],
)  # fmt: skip
def test_a_malformed_model_entry_is_refused_with_its_place(tmp_path, text, wanted):
    (tmp_path / "models.toml").write_text(text)
    with pytest.raises(ModelError, match=wanted.replace("[", r"\[").replace("]", r"\]")):
        Models.load(tmp_path / "models.toml")


# -- lock --------------------------------------------------------------------------------------


def test_lock_pins_the_commit_and_every_files_size_and_sha256_as_the_hub_serves_them(
    root, tmp_path, hub, files
):
    ctx = context(root, tmp_path, hub.url)
    [model] = ctx.models(["tiny-st"])
    locked = model_bundles.lock(ctx, model)
    lock = read_lock(locked.path)
    assert lock.commit == hub.commit_of("test-org/tiny-st", "main")
    assert [f.path for f in lock.files] == ["config.json", "model.safetensors", "tokenizer.json"]
    for f in lock.files:
        assert f.size == len(files[f.path])
        assert f.sha256 == hashlib.sha256(files[f.path]).hexdigest()
    by_path = {f.path: f for f in lock.files}
    assert by_path["model.safetensors"].lfs  # sha256 from the API's lfs block
    assert not by_path["config.json"].lfs  # hashed here, checked against the git blob id
    assert by_path["config.json"].blob_id == git_blob_id(files["config.json"])
    assert locked.moved[0].startswith("commit: (none) -> ")
    # the lock file: one [[files]] entry per file, sorted, nothing else moves on a relock
    text = locked.path.read_text()
    assert text.count("[[files]]") == 3
    assert model_bundles.lock(ctx, model).moved == []


def test_a_new_commit_upstream_shows_as_moved_lines(root, tmp_path, files):
    with HubStandIn() as own:
        own.add("test-org/tiny-GGUF", {GGUF: files[GGUF]})
        ctx = context(root, tmp_path, own.url)
        [model] = ctx.models(["tiny-gguf"])
        first = read_lock(model_bundles.lock(ctx, model).path)
        newer = tiny_gguf(3)
        commit = own.add("test-org/tiny-GGUF", {GGUF: newer})
        moved = model_bundles.lock(ctx, model).moved
    assert moved == [
        f"commit: {first.commit} -> {commit}",
        f"{GGUF}: sha256:{first.files[0].sha256} -> sha256:{hashlib.sha256(newer).hexdigest()}",
    ]


def test_lock_refuses_patterns_that_match_nothing_and_two_gguf_models(root, tmp_path, hub):
    ctx = context(root, tmp_path, hub.url)
    (tmp_path / "models.toml").write_text(
        MODELS_TOML.replace('files = ["tiny-Q4_K_M.gguf"]', 'files = ["tiny-Q5_K_M.gguf"]')
    )
    with pytest.raises(HubError, match=r"no file of test-org/tiny-GGUF@\w{12} matches "
                       r"'tiny-Q5_K_M.gguf'; it has README.md, tiny-Q4_K_M.gguf"):  # fmt: skip
        model_bundles.lock(ctx, ctx.models(["tiny-gguf"])[0])
    with pytest.raises(ModelError, match="match 2 GGUF models .* llama-box serves one"):
        model_bundles.lock(ctx, ctx.models(["both-quants"])[0])


def test_lock_names_a_missing_repository_and_revision(root, tmp_path, hub):
    ctx = context(root, tmp_path, hub.url)
    (tmp_path / "models.toml").write_text(
        MODELS_TOML.replace(
            'repository = "test-org/tiny-st"', 'repository = "test-org/nope"'
        ).replace('name = "tiny-gguf"\n', 'name = "tiny-gguf"\nrevision = "v9"\n', 1)
    )
    with pytest.raises(HubError, match="has no such repository"):
        model_bundles.lock(ctx, ctx.models(["tiny-st"])[0])
    with pytest.raises(HubError, match="has no revision 'v9'"):
        model_bundles.lock(ctx, ctx.models(["tiny-gguf"])[0])


def test_a_frozen_build_refuses_a_missing_or_stale_model_lock(root, tmp_path, hub):
    ctx = context(root, tmp_path, hub.url, frozen=True)
    [model] = ctx.models(["tiny-gguf"])
    with pytest.raises(LockError, match="no lock for model tiny-gguf .* `invoke lock --model"):
        model_bundles.build(ctx, model)
    model_bundles.lock(context(root, tmp_path, hub.url), model)
    (tmp_path / "models.toml").write_text(
        MODELS_TOML.replace(
            'files = ["tiny-Q4_K_M.gguf"]', 'files = ["tiny-Q4_K_M.gguf", "README.md"]'
        )  # fmt: skip
    )
    [changed] = ctx.models(["tiny-gguf"])
    assert (
        model_bundles.unpinned(ctx, changed)
        and "is stale" in model_bundles.unpinned(ctx, changed)[0]
    )
    with pytest.raises(LockError, match="is stale"):
        model_bundles.build(ctx, changed)


# -- bundle ------------------------------------------------------------------------------------


def test_a_model_bundle_is_the_model_files_plus_under_1_mb_with_manifest_sums_sbom_signature(
    root, tmp_path, hub, files
):
    secret, public = generate_key(tmp_path / "keys", "Model Release <release@example.invalid>")
    ctx = context(root, tmp_path, hub.url, signing_key=str(secret))
    [model] = ctx.models(["tiny-gguf"])
    [result] = commands.build(ctx, [], [model])
    folder, tar = result.directory, result.tar
    assert result.id == "model-tiny-gguf" and folder.name == "model-tiny-gguf"
    assert tar.is_file()
    model_bytes = len(files[GGUF])
    assert tar.stat().st_size <= model_bytes + 1_000_000, (tar.stat().st_size, model_bytes)
    placed = folder / "models" / "tiny-gguf" / GGUF
    assert placed.read_bytes() == files[GGUF]
    manifest = json.loads((folder / "manifest.json").read_text())
    commit = hub.commit_of("test-org/tiny-GGUF", "main")
    assert manifest["model"]["commit"] == commit and manifest["model"]["entry"] == GGUF
    assert manifest["bundle"] == {"id": "model-tiny-gguf", "kind": "model"}
    sums = release.read_sums(folder / "SHA256SUMS")
    assert sums[f"models/tiny-gguf/{GGUF}"] == hashlib.sha256(files[GGUF]).hexdigest()
    for name in (
        "manifest.json",
        "sbom.cdx.json",
        "install-model.sh",
        "check-sums.sh",
        "verify-signature.sh",
        "bundle.env",
        "catalog/gpustack-0.x.yaml",
        "lock/tiny-gguf.toml",
        "README.md",
    ):
        assert name in sums, name  # fmt: skip
    assert "catalog/gpustack-2.x.yaml" not in sums  # 2.x has no llama-box
    assert (folder / "SHA256SUMS.sig").is_file()
    from gpustack_offline.bundle.signing import verify

    assert verify(folder, public)

    sbom = json.loads((folder / "sbom.cdx.json").read_text())
    top = sbom["metadata"]["component"]
    assert top["type"] == "machine-learning-model"
    assert top["purl"] == f"pkg:huggingface/test-org/tiny-GGUF@{commit}"
    [weights] = [c for c in sbom["components"] if c["type"] == "machine-learning-model"]
    assert weights["name"] == GGUF
    assert weights["hashes"] == [
        {"alg": "SHA-256", "content": hashlib.sha256(files[GGUF]).hexdigest()}
    ]
    props = {p["name"]: p["value"] for p in weights["properties"]}
    assert props["gpustack-offline:model:source"] == "huggingface"
    assert props["gpustack-offline:model:repository"] == "test-org/tiny-GGUF"
    assert props["gpustack-offline:model:revision"] == "main"
    assert props["gpustack-offline:model:commit"] == commit


def test_a_second_model_sharing_a_file_downloads_nothing_twice(root, tmp_path, hub):
    ctx = context(root, tmp_path, hub.url)
    before = len(hub.downloads(GGUF))
    commands.build(ctx, [], ctx.models(["tiny-gguf"]))
    commands.build(ctx, [], ctx.models(["tiny-gguf-copy"]))
    assert len(hub.downloads(GGUF)) - before == 1  # one GET of the shared GGUF, both bundles
    copy = ctx.dist / "model-tiny-gguf-copy" / "models" / "tiny-gguf-copy" / GGUF
    assert copy.read_bytes() == (ctx.dist / "model-tiny-gguf/models/tiny-gguf" / GGUF).read_bytes()
    # an unchanged model is checked, not rebuilt: nothing asked of the hub at all
    seen = len(hub.requests())
    [again] = commands.build(ctx, [], ctx.models(["tiny-gguf"]))
    assert again.stages.startswith("unchanged:") and len(hub.requests()) == seen


def test_a_download_cut_mid_file_resumes_where_it_broke(root, tmp_path, hub, files):
    commands.lock(context(root, tmp_path, hub.url), [], models=context(
        root, tmp_path, hub.url).models(["tiny-gguf"]))  # fmt: skip
    with FaultProxy(hub.url) as proxy:
        proxy.on(rf"/resolve/\w+/{GGUF}$", Drop(after=CHUNK + CHUNK // 2), attempts=[1])
        ctx = context(root, tmp_path, proxy.url)
        [result] = commands.build(ctx, [], ctx.models(["tiny-gguf"]))
        gets = [s for s in proxy.seen if s.path.endswith(GGUF)]
    assert [g.fault for g in gets] == ["Drop", None]
    # the download reads a chunk at a time: what arrived whole is kept, the rest asked for
    assert gets[1].range == f"bytes={CHUNK}-"  # resumed, not started over
    assert (result.directory / "models/tiny-gguf" / GGUF).read_bytes() == files[GGUF]


def test_release_staging_takes_a_model_bundle_and_nox_lists_only_cells(root, tmp_path, hub):
    ctx = context(root, tmp_path, hub.url)
    commands.build(ctx, [], ctx.models(["tiny-st"]))
    (ctx.dist / "model-tiny-st" / "SHA256SUMS.sig").write_bytes(b"stand-in signature")
    entry = release.bundle_entry(ctx.dist, "model-tiny-st")
    assert entry["gpustack_version"] is None and entry["model"]["name"] == "tiny-st"
    index = release.index_of([entry])
    assert index["gpustack_versions"] == [] and "| - |" in release.render_markdown(index)


# -- the site: install-model.sh ----------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped(
    root: Path, tmp_path_factory: pytest.TempPathFactory, hub: HubStandIn
) -> dict[str, Path]:
    """Both model bundles built once and carried across as their tars, unpacked on the site."""
    area = tmp_path_factory.mktemp("built")
    ctx = context(root, area, hub.url)
    results = commands.build(ctx, [], ctx.models(["tiny-gguf", "tiny-st"]))
    site = tmp_path_factory.mktemp("site-media")
    out = {}
    for result in results:
        with tarfile.open(result.tar) as tf:
            tf.extractall(site, filter="data")
        out[result.id] = site / result.id
    return out


def install(
    bundle: Path, *args: str | Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["bash", bundle / "install-model.sh", *map(str, args)],
        capture_output=True, text=True, timeout=120, check=False, env=env,
    )  # fmt: skip
    print(proc.stdout, proc.stderr)
    return proc


def test_the_installer_places_the_files_and_writes_a_catalog_gpustack_reads(
    shipped, tmp_path, files
):
    dest = tmp_path / "models"
    proc = install(shipped["model-tiny-gguf"], "--dest", dest)
    assert proc.returncode == 0
    placed = dest / "tiny-gguf" / GGUF
    assert placed.read_bytes() == files[GGUF]
    assert not list(dest.rglob(".*.part"))
    catalog = dest / "model-catalog.yaml"
    data = yaml.safe_load(catalog.read_text())  # GPUStack 0.x: a list of model sets
    [entry] = data
    [template] = entry["templates"]
    assert entry["name"] == "tiny-gguf"
    assert template["source"] == "local_path" and template["backend"] == "llama-box"
    assert template["local_path"] == str(placed)
    assert f"--model-catalog-file {catalog}" in proc.stdout

    # a second model merges into the same catalog (its format: 0.x); installing again
    # replaces an entry instead of adding one
    assert install(shipped["model-tiny-st"], "--dest", dest).returncode == 0
    assert install(shipped["model-tiny-gguf"], "--dest", dest).returncode == 0
    data = yaml.safe_load(catalog.read_text())
    by_name = {e["name"]: e for e in data}
    assert sorted(by_name) == ["tiny-gguf", "tiny-st"]
    st = by_name["tiny-st"]["templates"][0]
    assert st["backend"] == "vllm" and st["local_path"] == str(dest / "tiny-st")
    assert (dest / "tiny-st" / "model.safetensors").read_bytes() == files["model.safetensors"]


def test_the_installer_writes_gpustack_2_catalogs_and_refuses_llama_box_there(shipped, tmp_path):
    dest = tmp_path / 'a "shared" mount \\ here'  # YAML-quoted in the catalog
    catalog = tmp_path / "etc" / "catalog-2.yaml"
    proc = install(shipped["model-tiny-st"], "--dest", dest, "--catalog", catalog)
    assert proc.returncode == 0  # vllm: 2.x by default
    data = yaml.safe_load(catalog.read_text())
    assert data["draft_models"] == []
    [model_set] = data["model_sets"]
    [spec] = model_set["specs"]
    assert spec["backend"] == "vLLM" and spec["local_path"] == str(dest / "tiny-st")
    refused = install(shipped["model-tiny-gguf"], "--dest", dest, "--catalog", catalog)
    assert refused.returncode == 2
    assert "GPUStack 2.x has no llama-box backend" in refused.stderr
    assert not (dest / "tiny-gguf").exists()  # refused before anything was placed


def test_a_flipped_byte_in_a_model_file_is_refused_naming_the_file(shipped, tmp_path):
    bundle = tmp_path / "model-tiny-gguf"
    subprocess.run(["cp", "-a", shipped["model-tiny-gguf"], bundle], check=True)
    target = bundle / "models" / "tiny-gguf" / GGUF
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    dest = tmp_path / "models"
    proc = install(bundle, "--dest", dest)
    assert proc.returncode == 3
    assert f"altered (checksum mismatch): models/tiny-gguf/{GGUF}" in proc.stderr
    assert not dest.exists()  # nothing placed, no catalog


def test_a_copy_that_breaks_off_leaves_no_file_under_its_final_name(shipped, tmp_path, files):
    """A copy cut short (a full disk, a pulled drive: here a `cp` that writes half and fails)
    leaves neither the partial file nor a catalog; the next run places the file whole."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "cp").write_text(
        '#!/bin/sh\n[ "$1" = -- ] && shift\nhead -c 1000000 "$1" > "$2"\n'
        'echo "cp: error writing $2: No space left on device" >&2\nexit 1\n'
    )
    (bindir / "cp").chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    dest = tmp_path / "models"
    proc = install(shipped["model-tiny-gguf"], "--dest", dest, env=env)
    assert proc.returncode == 5 and "No space left on device" in proc.stderr
    assert sorted(p.name for p in (dest / "tiny-gguf").iterdir()) == []  # no .part, no file
    assert not (dest / "model-catalog.yaml").exists()
    assert install(shipped["model-tiny-gguf"], "--dest", dest).returncode == 0
    assert (dest / "tiny-gguf" / GGUF).read_bytes() == files[GGUF]


HAND_WRITTEN = {
    "0": "# our site's models\n- name: mine\n  templates: []  # kept as written\n",
    "2": "draft_models: []\nmodel_sets:\n  # ours\n  - name: mine\n    specs: []\n",
}


@pytest.mark.parametrize(("series", "bundle"), [("0", "model-tiny-gguf"), ("2", "model-tiny-st")])
def test_the_installer_merges_into_a_hand_written_catalog_keeping_its_lines(
    shipped, tmp_path, series, bundle
):
    """A site's own catalog (0.x: a list; 2.x: model_sets last, its sets indented): the entry is
    appended to its list, indented as its own; its lines stay as written, a copy is kept as
    .orig, and a second install replaces the entry, not adds one."""
    catalog, written = tmp_path / "catalog.yaml", HAND_WRITTEN[series]
    catalog.write_text(written)
    args = ("--dest", tmp_path / "m", "--catalog", catalog, "--gpustack", series)
    proc = install(shipped[bundle], *args)
    assert proc.returncode == 0, proc.stderr
    merged = catalog.read_text()
    assert merged.startswith(written) and (tmp_path / "catalog.yaml.orig").read_text() == written
    data = yaml.safe_load(merged)
    sets = data if series == "0" else data["model_sets"]
    name = bundle.removeprefix("model-")
    assert [s["name"] for s in sets] == ["mine", name]
    assert "kept the hand-written catalog as it was" in proc.stdout
    assert install(shipped[bundle], *args).returncode == 0
    assert catalog.read_text() == merged
    assert (tmp_path / "catalog.yaml.orig").read_text() == written


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("model_sets:\n- name: mine\n  specs: []\ndraft_models: []\n", "last block"),
        ("draft_models: []\nmodel_sets: [{name: mine, specs: []}]\n", "last block"),
        ("models: {}\n", "does not read as a GPUStack catalog"),
        ("- name: [unclosed\n", "does not read as a GPUStack catalog"),
    ],
)
def test_a_hand_written_catalog_it_cannot_append_to_is_left_alone(shipped, tmp_path, text, why):
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(text)
    proc = install(shipped["model-tiny-st"], "--dest", tmp_path / "m", "--catalog", catalog)
    assert proc.returncode == 5 and why in proc.stderr and "--catalog to a new file" in proc.stderr
    assert catalog.read_text() == text and not (tmp_path / "m").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["catalog.yaml"]


def test_merging_a_hand_written_catalog_without_pyyaml_is_refused_naming_it(shipped, tmp_path):
    catalog, bin_dir = tmp_path / "catalog.yaml", tmp_path / "bin"
    catalog.write_text(HAND_WRITTEN["0"])
    bin_dir.mkdir()
    for name in ("python3", "python"):  # a host whose Pythons have no PyYAML
        (bin_dir / name).write_text("#!/bin/sh\nexit 1\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = install(shipped["model-tiny-gguf"], "--dest", tmp_path / "m", "--catalog", catalog,
                   env=env)  # fmt: skip
    assert proc.returncode == 5 and "needs python3 with PyYAML" in proc.stderr
    assert catalog.read_text() == HAND_WRITTEN["0"]


def test_the_installer_script_is_shellcheck_clean(root):
    proc = subprocess.run(
        ["shellcheck", root / "scripts" / "install-model.sh"], capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout


def test_building_a_cell_and_a_model_error_names_the_bundle(root, tmp_path, hub):
    ctx = context(root, tmp_path, hub.url, frozen=True)
    with pytest.raises(BundleError, match="no lock for model tiny-st"):
        commands.build(ctx, [], ctx.models(["tiny-st"]))


# -- the catalogs against upstream's own loader ------------------------------------------------

# Reads a catalog as the GPUStack server does at start and prints each spec's (source,
# local_path, backend): 0.7 and 2.2 load it with `init_model_catalog` (pydantic models of
# `gpustack/schemas/model_sets.py`); 2.3 validates `--model-catalog-file` with
# `normalize_catalog_yaml` (strict: a key it would drop is an error).
UPSTREAM_LOADER = """
import json, sys
path = sys.argv[1]
try:
    from gpustack.schemas.catalog_source import normalize_catalog_yaml
except ImportError:
    from gpustack.server import catalog
    catalog.init_model_catalog(path)
    specs = [s for group in catalog.model_set_specs.values() for s in group]
    rows = [[getattr(s.source, "value", s.source), s.local_path, s.backend] for s in specs]
else:
    import yaml
    with open(path) as fh:
        data = yaml.safe_load(normalize_catalog_yaml(fh.read(), strict=True))
    rows = [[s["source"], s["local_path"], s["backend"]]
            for m in data["model_sets"] for s in m["specs"]]
print(json.dumps(rows))
"""


@pytest.mark.integration  # upstream's release in a venv (made once, cached: PyPI the first time)
@pytest.mark.parametrize(("version", "series"), [("0.7.1", "0"), ("2.2.3", "2"), ("2.3.0", "2")])
def test_upstream_gpustack_loads_the_catalog_with_the_placed_paths(
    root, shipped, tmp_path, version, series
):
    dest, catalog = tmp_path / "models", tmp_path / "catalog.yaml"
    names = ["model-tiny-st"] + (["model-tiny-gguf"] if series == "0" else [])
    for name in names:
        proc = install(shipped[name], "--dest", dest, "--catalog", catalog, "--gpustack", series)
        assert proc.returncode == 0
    out = run_gpustack(root, version, UPSTREAM_LOADER, catalog)
    rows = sorted(tuple(r) for r in json.loads(out.splitlines()[-1]))
    vllm = "vllm" if series == "0" else "vLLM"
    wanted = [("local_path", str(dest / "tiny-st"), vllm)]
    if series == "0":
        wanted.append(("local_path", str(dest / "tiny-gguf" / GGUF), "llama-box"))
    assert rows == sorted(wanted)


def test_the_pin_check_names_a_model_without_a_lock_and_its_lock_command(root, tmp_path, hub):
    ctx = context(root, tmp_path, hub.url)
    models = ctx.models(["tiny-gguf", "tiny-st"])
    model_bundles.lock(ctx, models[0])
    with pytest.raises(BundleError) as err:
        commands.check_pins(ctx, [], models)
    message = str(err.value)
    assert "1 of 2 bundles have no committed, current pins for a frozen build: model-tiny-st" in (
        message
    )
    assert "run `invoke lock --model tiny-st` online" in message
    assert "refresh-pins" not in message  # the workflow locks cells, not models
    commands.check_pins(ctx, [], models[:1])  # a current lock passes, offline


def test_a_hub_token_reaches_the_hub_and_nothing_written(root, tmp_path, hub, monkeypatch):
    """A gated model's HF_TOKEN is sent to the endpoint with the API question and every
    download, and lands in no lock, bundle or cache file."""
    secret = "hf_plantedSecretToken0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)
    ctx = context(root, tmp_path, hub.url)
    before = len(hub.requests())
    commands.build(ctx, [], ctx.models(["tiny-st"]))
    seen = hub.requests()[before:]
    assert seen and all(s.authorization == f"Bearer {secret}" for s in seen)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


# -- the site: install-model.sh --prefix, wired into what install.sh configured ----------------

# What install.sh writes (scripts/install.sh, write_site_config and write_docker_env), with an
# edit of the site's own below each.
PIP_CONFIG = """\
# GPUStack configuration for an air-gapped site, written by install.sh (CELL).

# --model-catalog-file: the catalog shipped in the installed wheel
model_catalog_file: {prefix}/current/lib/python3.11/site-packages/gpustack/assets/model-catalog.yaml

update_check_url: http://127.0.0.1:1/
tools_download_base_url: http://127.0.0.1:1
port: 9090
"""
DOCKER_ENV = """\
# Environment for GPUStack's container on an air-gapped site, written by install.sh
# --model-catalog-file: the catalog inside the image, not huggingface.co / modelscope.cn
# GPUSTACK_MODEL_CATALOG_FILE=(GPUStack's python package not found in IMAGE)
GPUSTACK_UPDATE_CHECK_URL=http://127.0.0.1:1/
HF_HUB_OFFLINE=1
SITE_OWN=kept
"""


def installed_prefix(where: Path, method: str, version: str) -> Path:
    """A prefix as install.sh leaves it: its configuration, and the bundle.env it keeps under
    bundles/ (a pip install's behind `current`)."""
    prefix = where / "prefix"
    release = f"v{version}-linux-amd64-cpu-py3.11-base-{method}-0123456789ab"
    (prefix / "bundles" / release).mkdir(parents=True)
    (prefix / "bundles" / release / "bundle.env").write_text(
        f"BUNDLE_CELL=v{version}-linux-amd64-cpu-py3.11-base-{method}\n"
        f"GPUSTACK_VERSION={version}\nINSTALL_METHOD={method}\n"
    )
    if method == "pip":
        (prefix / "releases" / release).mkdir(parents=True)
        (prefix / "current").symlink_to(f"releases/{release}")
        (prefix / "gpustack.yaml").write_text(PIP_CONFIG.format(prefix=prefix))
        (prefix / "gpustack.yaml").chmod(0o640)
    else:
        (prefix / "docker.env").write_text(DOCKER_ENV)
    return prefix


def test_prefix_of_a_pip_install_points_its_gpustack_yaml_at_the_catalog(shipped, tmp_path):
    prefix = installed_prefix(tmp_path, "pip", "0.7.1")
    before = (prefix / "gpustack.yaml").read_text().splitlines()
    dest = tmp_path / "shared models: 'a' #1"  # quoted in the YAML
    proc = install(shipped["model-tiny-st"], "--dest", dest, "--prefix", prefix)
    assert proc.returncode == 0
    catalog = dest / "model-catalog.yaml"
    # a vLLM model defaults to a 2.x catalog; GPUStack 0.7.1 installed there reads 0.x
    assert isinstance(yaml.safe_load(catalog.read_text()), list)
    config = prefix / "gpustack.yaml"
    after = config.read_text().splitlines()
    assert yaml.safe_load(config.read_text())["model_catalog_file"] == str(catalog)
    changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    assert [before[i].split(":")[0] for i in changed] == ["model_catalog_file"]  # the rest kept
    assert config.stat().st_mode & 0o777 == 0o640
    assert not list(prefix.glob(".gpustack.yaml.*"))
    assert f"{config}: model_catalog_file: {prefix}/current/" in proc.stdout
    assert f"gpustack start --config-file {config}" in proc.stdout

    again = install(shipped["model-tiny-gguf"], "--dest", dest, "--prefix", prefix)
    assert again.returncode == 0 and f"{config} already has model_catalog_file" in again.stdout
    assert config.read_text().splitlines() == after
    refused = install(shipped["model-tiny-st"], "--dest", tmp_path / "m2", "--prefix", prefix,
                      "--gpustack", "2")  # fmt: skip
    assert refused.returncode == 2 and "has GPUStack 0.7.1 installed" in refused.stderr
    assert not (tmp_path / "m2").exists()


def test_prefix_of_a_docker_install_sets_its_env_and_the_folders_to_mount(shipped, tmp_path):
    prefix = installed_prefix(tmp_path, "docker", "2.3.0")
    dest, catalog = tmp_path / "models", tmp_path / "etc" / "catalog.yaml"
    proc = install(shipped["model-tiny-st"], "--dest", dest, "--catalog", catalog,
                   "--prefix", prefix)  # fmt: skip
    assert proc.returncode == 0
    assert yaml.safe_load(catalog.read_text())["model_sets"][0]["name"] == "tiny-st"  # 2.x
    env = (prefix / "docker.env").read_text()
    assert env == DOCKER_ENV.replace(
        "# GPUSTACK_MODEL_CATALOG_FILE=(GPUStack's python package not found in IMAGE)",
        f"GPUSTACK_MODEL_CATALOG_FILE={catalog}",
    )
    volumes = (prefix / "docker.volumes").read_text().splitlines()
    wanted = [f"{dest}:{dest}:ro", f"{catalog.parent}:{catalog.parent}:ro"]
    assert [v for v in volumes if not v.startswith("#")] == wanted
    assert f"--volume {wanted[0]} --volume {wanted[1]}" in proc.stdout
    # a second model adds no volume twice; GGUF (llama-box) has no place in a 2.x catalog
    assert install(shipped["model-tiny-st"], "--dest", dest, "--catalog", catalog,
                   "--prefix", prefix).returncode == 0  # fmt: skip
    assert (prefix / "docker.volumes").read_text().splitlines() == volumes
    refused = install(shipped["model-tiny-gguf"], "--dest", dest, "--prefix", prefix)
    assert refused.returncode == 2 and "GPUStack 2.x has no llama-box backend" in refused.stderr


def test_prefix_without_a_gpustack_install_is_refused_before_anything_is_placed(shipped, tmp_path):
    (tmp_path / "empty").mkdir()
    proc = install(shipped["model-tiny-gguf"], "--dest", tmp_path / "m",
                   "--prefix", tmp_path / "empty")  # fmt: skip
    assert proc.returncode == 2
    assert "neither" in proc.stderr and "install.sh --prefix" in proc.stderr
    assert not (tmp_path / "m").exists()


@pytest.mark.target
def test_install_sh_and_install_model_sh_meet_in_either_order(shipped, tmp_path, gpustack_wheel):
    """GPUStack first, then the model with --prefix; or the model first, at its default place
    under the data directory, then GPUStack: both ways the pip install's gpustack.yaml names the
    site's catalog, and a later install.sh keeps it."""
    first = make_bundle(tmp_path / "a", gpustack_wheel)
    prefix, data = tmp_path / "prefix", tmp_path / "data"
    assert install_gpustack(first, prefix, "--data-dir", str(data)).returncode == 0
    catalog = data / "models" / "model-catalog.yaml"
    proc = install(shipped["model-tiny-gguf"], "--dest", data / "models", "--prefix", prefix)
    assert proc.returncode == 0
    config = prefix / "gpustack.yaml"
    assert yaml.safe_load(config.read_text())["model_catalog_file"] == str(catalog)
    again = install_gpustack(make_bundle(tmp_path / "b", gpustack_wheel, REQUIREMENT="gpustack"),
                             prefix, "--data-dir", str(data))  # fmt: skip
    assert again.returncode == 0 and "kept the existing" in again.stdout
    assert yaml.safe_load(config.read_text())["model_catalog_file"] == str(catalog)

    other = tmp_path / "other-prefix"
    fresh = install_gpustack(first, other, "--data-dir", str(data))
    assert fresh.returncode == 0
    assert f"model catalog: {catalog}, written by install-model.sh" in fresh.stdout
    assert yaml.safe_load((other / "gpustack.yaml").read_text())["model_catalog_file"] == str(
        catalog
    )


_ = gpustack_wheel  # the session fixture, imported for the test above


# -- verification beside a cell: what is paired, and what is said NOT VERIFIED ----------------


def test_nox_pairs_each_model_bundle_with_each_cell_bundle_and_skips_what_it_cannot_verify(
    root, tmp_path, hub, monkeypatch
):
    ctx = context(root, tmp_path, hub.url)
    commands.build(ctx, [], ctx.models(["tiny-gguf", "tiny-st"]))
    cells = ["v0.7.1-linux-amd64-cpu-py3.11-base-pip", "v0.7.1-linux-amd64-cpu-py3.11-base-docker"]
    for cell_id in cells:
        (ctx.dist / cell_id).mkdir(parents=True)
        (ctx.dist / cell_id / "manifest.json").write_text("{}\n")
    monkeypatch.setenv("GPUSTACK_OFFLINE_DIST_DIR", str(ctx.dist))
    pairs = commands.model_pairs(root)
    assert pairs == [
        f"{m}@{c}" for m in ("model-tiny-gguf", "model-tiny-st") for c in sorted(cells)
    ]

    pip, docker = (ctx.matrix.cell(c) for c in cells)
    assert model_bundles.unverifiable(pip, ctx.dist / "model-tiny-gguf") is None
    assert "beside a pip bundle" in str(
        model_bundles.unverifiable(docker, ctx.dist / "model-tiny-gguf")
    )
    assert "covers llama-box (GGUF) models" in str(
        model_bundles.unverifiable(pip, ctx.dist / "model-tiny-st")
    )
    # beside a 2.x docker cell: a vLLM model is verified (to the worker's file), GGUF is not
    docker2 = ctx.matrix.cell("v2.2.3-linux-amd64-cuda12.9-py3.11-vllm+sglang-docker")
    assert model_bundles.unverifiable(docker2, ctx.dist / "model-tiny-st") is None
    assert "GPUStack 2.x has no llama-box backend" in str(
        model_bundles.unverifiable(docker2, ctx.dist / "model-tiny-gguf")
    )
    # the session says NOT VERIFIED and why, before any container
    outcome = commands.models_session(root, f"model-tiny-st@{cells[0]}")
    assert outcome.skipped and "NOT VERIFIED" in outcome.message and "vllm" in outcome.message
