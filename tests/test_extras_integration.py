"""Every extras kind of GPUStack 0.7.1 (base, audio, vllm, all), locked and built for real.

Locking only resolves (uv, no wheel is fetched), so all four kinds are locked in the default
integration run. One audio cell is built there through the whole pipeline from its committed
lock: audio is the kind whose sdists (openai-whisper, jieba, crcmod, ...) are compiled and whose
wheels carry the licence texts the SBOM has to read (matplotlib's non-ASCII License field once
stopped every audio build). Building every kind, vllm and all with several GB of CUDA wheels
each, is the on-demand tier: `pytest -m heavy`.
"""

from __future__ import annotations

import json
import subprocess
import tarfile
import tomllib
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name, parse_wheel_filename

from gpustack_offline.bundle import sbom
from gpustack_offline.cli import commands
from gpustack_offline.stages.locks import read_lock

pytestmark = pytest.mark.integration

AUDIO = "v0.7.1-linux-amd64-cpu-py3.11-audio-pip"
KINDS = {
    "base": "v0.7.1-linux-amd64-cpu-py3.11-base-pip",
    "audio": AUDIO,
    "vllm": "v0.7.1-linux-amd64-cuda12.8-py3.11-vllm-pip",
    "all": "v0.7.1-linux-amd64-cuda12.8-py3.11-all-pip",
}
# what each extra adds (gpustack 0.7.1's pyproject): audio is vox-box and the speech stack it
# pulls, vllm is vLLM with its kernels and the two extras upstream lists beside it
AUDIO_OWN = {"vox-box", "openai-whisper", "jieba"}
VLLM_OWN = {"vllm", "xformers", "bitsandbytes", "mistral-common"}
AUDIO_PACKAGES = AUDIO_OWN | {"torch", "torchaudio", "matplotlib"}
VLLM_PACKAGES = VLLM_OWN | {"torch", "triton"}
CORE_PACKAGES = {"gpustack", "cachetools", "ray"}
EXPECTED = {
    "base": CORE_PACKAGES,
    "audio": CORE_PACKAGES | AUDIO_PACKAGES,
    "vllm": CORE_PACKAGES | VLLM_PACKAGES,
    "all": CORE_PACKAGES | AUDIO_PACKAGES | VLLM_PACKAGES,
}
# packages only built from an sdist: on PyPI they publish no wheel at all
SDIST_ONLY = {"openai-whisper", "jieba", "crcmod", "wget"}


def locked_names(path: Path) -> dict[str, str]:
    return {canonicalize_name(p.name): p.version for p in read_lock(path).packages}


def check_lock(kind: str, path: Path) -> None:
    """The lock holds its kind's packages and none that only another kind brings, and a CUDA
    cell's torch stack is CUDA 12 (a CUDA 13 wheel would fail the cell's driver floor)."""
    names = locked_names(path)
    assert EXPECTED[kind] <= set(names), sorted(EXPECTED[kind] - set(names))
    absent = (AUDIO_OWN | VLLM_OWN) - EXPECTED[kind]
    assert not absent & set(names), sorted(absent & set(names))
    assert names["gpustack"] == "0.7.1"
    if "vllm" in names:
        assert names["vllm"] == "0.10.1.1"
    assert not [n for n in names if n.startswith("nvidia-") and n.endswith("-cu13")]
    meta = tomllib.loads(path.read_text())["tool"]["gpustack-offline"]
    assert meta["cell"] == KINDS[kind] and meta["platform"] == "x86_64-manylinux_2_35"


def check_bundle(bundle_dir: Path, lock_path: Path) -> dict[str, dict[str, object]]:
    """A finished bundle: a wheel for every locked package and nothing else, sha256sum and tar
    accept it, its SBOM validates and names every wheel. Returns the SBOM's libraries by name."""
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    wheels = [f for f in manifest["files"] if f["kind"] in ("wheel", "built-wheel")]
    shipped = {}
    for entry in wheels:
        name, version, _, _ = parse_wheel_filename(entry["path"].removeprefix("wheels/"))
        shipped[canonicalize_name(name)] = str(version)
    assert shipped == locked_names(lock_path)
    built = {
        canonicalize_name(parse_wheel_filename(f["path"].removeprefix("wheels/"))[0])
        for f in wheels
        if f["kind"] == "built-wheel"
    }
    if "openai-whisper" in shipped:
        assert built >= SDIST_ONLY, sorted(SDIST_ONLY - built)
    subprocess.run(
        ["sha256sum", "-c", "--strict", "--quiet", "SHA256SUMS"], cwd=bundle_dir, check=True
    )
    with tarfile.open(bundle_dir.parent / f"{bundle_dir.name}.tar") as tf:
        in_tar = {m.name for m in tf.getmembers() if m.isfile()}
    listed = {f"{bundle_dir.name}/{f['path']}" for f in manifest["files"]}
    assert listed | {f"{bundle_dir.name}/manifest.json", f"{bundle_dir.name}/SHA256SUMS"} <= in_tar
    doc = sbom.sbom(bundle_dir)  # validates against the CycloneDX schema
    assert (bundle_dir / sbom.SBOM_NAME).read_text() == sbom.sbom_for(bundle_dir, manifest)
    libraries = {c["name"]: c for c in doc["components"] if c["type"] == "library"}
    assert {canonicalize_name(n) for n in libraries} == set(shipped)
    return libraries


def licence_names(component: dict[str, object]) -> list[str]:
    out = []
    for entry in component.get("licenses", []):  # type: ignore[attr-defined]
        lic = entry.get("license", {})
        out.append(entry.get("expression") or lic.get("id") or lic.get("name"))
    return out


def test_every_extras_kind_locks_with_its_packages(root, tmp_path):
    """Resolution only: base and audio for a cpu cell, vllm and all for a CUDA 12.8 one."""
    locking = commands.Context.load(root, cli={"locks_dir": str(tmp_path), "progress": False})
    cells = [locking.matrix.cell(c) for c in KINDS.values()]
    paths = commands.lock(locking, cells)
    for kind, path in zip(KINDS, paths, strict=True):
        assert path == tmp_path / KINDS[kind] / "pylock.toml"
        check_lock(kind, path)


def test_an_audio_bundle_builds_with_its_sdists_and_licences_in_the_sbom(pip_ctx):
    """From the committed (frozen) lock: the sdist-only packages are built, matplotlib's
    non-ASCII multi-line License does not stop the SBOM, every wheel is in it."""
    lock = pip_ctx.opts.path("locks_dir", pip_ctx.root) / AUDIO / "pylock.toml"
    check_lock("audio", lock)
    (result,) = commands.build(pip_ctx, [pip_ctx.matrix.cell(AUDIO)])
    assert result.directory == pip_ctx.dist / AUDIO
    libraries = check_bundle(result.directory, lock)
    assert licence_names(libraries["matplotlib"]) == ["PSF-2.0"]
    assert licence_names(libraries["torch"]) == ["BSD-3-Clause"]
    assert licence_names(libraries["openai-whisper"]) == ["MIT"]  # built here from its sdist
    # matplotlib's own License field, the one that broke the SBOM, reads whole as text
    (wheel,) = (result.directory / "wheels").glob("matplotlib-*.whl")
    (text,) = sbom.wheel_metadata(wheel)["license"]
    assert text.startswith("License agreement for matplotlib") and "Copyright \u00a9" in text
    # every built wheel names the sdist it came from, with its hash
    built = [c for c in libraries.values() if c.get("externalReferences")]
    assert {c["name"] for c in built} >= SDIST_ONLY
    for component in built:
        (ref,) = component["externalReferences"]
        assert ref["type"] == "source-distribution" and len(ref["hashes"][0]["content"]) == 64


@pytest.fixture
def fresh_root(root: Path, tmp_path: Path) -> Path:
    """The project's data files with an empty locks folder of its own: the heavy tier locks
    afresh and must not write into bundles/locks (a lock outside the project root is not
    something a build records yet)."""
    fake = tmp_path / "root"
    (fake / "bundles/locks").mkdir(parents=True)
    (fake / "scripts").symlink_to(root / "scripts")
    for name in ("matrix.toml", "overrides.toml"):
        (fake / "bundles" / name).symlink_to(root / "bundles" / name)
    return fake


@pytest.mark.heavy
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_extras_kind_locks_and_assembles(pip_ctx, fresh_root, tmp_path, kind):
    """On demand (`pytest -m heavy`): a fresh lock and a whole bundle of each kind; vllm and all
    fetch several GB of CUDA wheels."""
    cli = {
        "dist_dir": str(tmp_path / "dist"),
        "progress": False,
        "tools_base_url": pip_ctx.opts.tools_base_url,
        "tools_locks_dir": pip_ctx.opts.tools_locks_dir,
        "cache_dir": str(pip_ctx.cache),
    }
    heavy = commands.Context.load(fresh_root, cli=cli)
    cell = heavy.matrix.cell(KINDS[kind])
    (lock_path,) = commands.lock(heavy, [cell])
    check_lock(kind, lock_path)
    (result,) = commands.build(heavy, [cell])
    assert result.lock_state == "used"
    libraries = check_bundle(result.directory, lock_path)
    assert EXPECTED[kind] <= {canonicalize_name(n) for n in libraries}
    if kind in ("audio", "all"):
        assert licence_names(libraries["matplotlib"]) == ["PSF-2.0"]
