"""GPUStack's Docker images as data: which tag a cell needs, which digest that tag meant, and
one export folder that both `docker load` (streamed as a tar) and OCI tools read.

A tag can be pushed again upstream at any time, so a build never trusts a tag alone:
`bundles/images/gpustack-<version>.toml` records, per tag and platform, the index digest and the
platform manifest digest, written by `refresh_pins` on the online side and reviewed like code. A
build resolves a cell's image through that file and pulls by digest; a tag that moved upstream
is a diff in the pin file, never a silent change in a bundle.

The export is one folder that is at the same time an OCI image layout (`oci-layout`,
`index.json`, `blobs/sha256/<hex>`) and, tarred, a `docker load` archive (`manifest.json` whose
`Config` and `Layers` name the same blob files). Layers stay exactly as the registry served them
(compressed, same digests), each blob is there once however many images share it, and each is a
hard link into the blob store, so the images take no disk beyond the cache until the bundle's
own tar is written (the one copy).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from gpustack_offline.core.downloads import BlobStore
from gpustack_offline.core.errors import IntegrityError
from gpustack_offline.core.files import (
    atomic_dir,
    atomic_path,
    link_or_copy,
    sha256_file,
    write_text,
)
from gpustack_offline.core.tomlfile import read_toml
from gpustack_offline.stages.errors import ImageError
from gpustack_offline.stages.registry import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Image,
    Platform,
    Reference,
    Registry,
)

IMAGE_REPOSITORY = "docker.io/gpustack/gpustack"
PIN_SCHEMA = 1

# GPUStack 0.6/0.7 publish one image per device, named by a tag suffix (`v0.7.1-npu-310p`; the
# plain tag is CUDA 12.4): which device has which suffix, on which platforms, is matrix data read
# from upstream's docker-ci.yaml of the version (`[versions.X.images]`, `Cell.image`).
_VERSION = re.compile(r"v?(\d+)\.(\d+)\.(\d+)(?:rc\d+)?")

# Layer types `docker load` (20.10) and OCI tools both read.
_LOADABLE_LAYERS = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
    }
)
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
# On the OCI twin of a Docker schema 2 manifest: the digest of upstream's manifest.
UPSTREAM_DIGEST = "gpustack-offline.upstream-manifest-digest"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_GZIP_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
BLOBS = "blobs/sha256"  # where an export keeps its blobs, each named by its sha256
_SMALL = ("oci-layout", "index.json", "manifest.json")
_OCI_LAYER = {DOCKER_GZIP_LAYER: OCI_GZIP_LAYER}

log = logging.getLogger(__name__)


# --- tags ---------------------------------------------------------------------------------------


def _series(version: str) -> tuple[int, int, str]:
    match = _VERSION.fullmatch(version.strip())
    if not match:
        raise ImageError(f"{version!r} is not a GPUStack version like 0.7.1")
    major, minor, _ = match.groups()
    return int(major), int(minor), version.strip().removeprefix("v")


def _plain(version: str) -> str:
    major, minor, plain = _series(version)
    if major != 0 or minor not in (6, 7):
        raise ImageError(
            f"image tags of GPUStack {plain} are not described here; only 0.6 and 0.7 use the "
            "one-image-per-device scheme"
        )
    return plain


def image_tag(version: str, suffix: str) -> str:
    """`image_tag("0.7.1", "-cpu")` → `v0.7.1-cpu`; the suffix is the device's (`Cell.image`),
    "" for the plain tag, the CUDA 12.4 image."""
    if suffix and not re.fullmatch(r"-[a-z0-9.-]+", suffix):
        raise ImageError(f"{suffix!r} is no image tag suffix like -cpu or -npu-310p")
    return f"v{_plain(version)}{suffix}"


def image_reference(version: str, suffix: str, repository: str = IMAGE_REPOSITORY) -> Reference:
    return Reference.parse(f"{repository}:{image_tag(version, suffix)}")


# --- pin files ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TagPin:
    index: str  # the digest the tag pointed at (index, or the manifest of a one-platform image)
    platforms: Mapping[str, str]  # "linux/amd64" → that platform's manifest digest


@dataclass(frozen=True)
class Pins:
    path: Path
    version: str
    repository: str
    tags: Mapping[str, TagPin]


@dataclass(frozen=True)
class PinChange:
    tag: str
    platform: str  # "" for the tag's index digest
    old: str | None
    new: str | None

    def __str__(self) -> str:
        what = f"{self.tag} {self.platform or 'index'}"
        return f"{what}: {self.old or '(none)'} -> {self.new or '(none)'}"


@dataclass(frozen=True)
class PinnedImage:
    """A cell's image by digest: `reference` carries tag and platform manifest digest."""

    reference: Reference
    platform: Platform
    index: str

    @property
    def manifest(self) -> str:
        assert self.reference.digest is not None
        return self.reference.digest


def pin_path(pins_dir: Path, version: str, repository: str = IMAGE_REPOSITORY) -> Path:
    """`gpustack-0.7.1.toml` for the server image; `runner-2.3.0.toml`, `runtime-2.3.0.toml` for
    the other repositories a GPUStack version needs: one pin file per repository and version."""
    name = Reference.parse(repository).name.rsplit("/", 1)[-1]
    return pins_dir / f"{name}-{_series(version)[2]}.toml"


def read_pins(path: Path) -> Pins:
    if not path.is_file():
        raise ImageError(
            f"{path} does not exist; record the image digests on the online side with "
            "`invoke lock` for the cell (and commit the file)"
        )
    data = read_toml(path, ImageError, "fix or refresh it")
    if data.get("schema") != PIN_SCHEMA:
        raise ImageError(f"{path}: schema {data.get('schema')!r} is not {PIN_SCHEMA}")
    tags: dict[str, TagPin] = {}
    try:
        for tag, entry in (data.get("tags") or {}).items():
            platforms = {str(p): str(d) for p, d in (entry.get("platforms") or {}).items()}
            tags[str(tag)] = TagPin(str(entry["index"]), platforms)
        return Pins(path, str(data["version"]), str(data["repository"]), tags)
    except (KeyError, AttributeError, TypeError) as exc:
        raise ImageError(f"{path}: malformed pin file ({exc!r}); refresh it") from None


def format_pins(pins: Pins) -> str:
    lines = [
        f"# Digests of the {Reference.parse(pins.repository).familiar_name} images for GPUStack "
        f"{pins.version}, per tag and platform.\n"
        "# Written by refresh_pins; builds pull by these digests, so a tag that moved upstream\n"
        "# shows up here as a diff. Review changes like code.\n",
        f"schema = {PIN_SCHEMA}\n",
        f"version = {json.dumps(pins.version)}\n",
        f"repository = {json.dumps(pins.repository)}\n",
    ]
    for tag in sorted(pins.tags):
        pin = pins.tags[tag]
        lines.append(f"\n[tags.{json.dumps(tag)}]\nindex = {json.dumps(pin.index)}\n")
        lines.append(f"\n[tags.{json.dumps(tag)}.platforms]\n")
        lines.extend(
            f"{json.dumps(p)} = {json.dumps(pin.platforms[p])}\n" for p in sorted(pin.platforms)
        )
    return "".join(lines)


def write_pins(pins: Pins) -> bool:
    """Write atomically, and only if the text changes; True when it did."""
    text = format_pins(pins)
    if pins.path.is_file() and pins.path.read_text() == text:
        return False
    write_text(pins.path, text)
    return True


def _diff(old: Mapping[str, TagPin], new: Mapping[str, TagPin]) -> list[PinChange]:
    changes = []
    for tag in sorted(set(old) | set(new)):
        before, after = old.get(tag), new.get(tag)
        index_before = before.index if before else None
        index_after = after.index if after else None
        if index_before != index_after:
            changes.append(PinChange(tag, "", index_before, index_after))
        platforms = set(before.platforms if before else ()) | set(after.platforms if after else ())
        for platform in sorted(platforms):
            a = before.platforms.get(platform) if before else None
            b = after.platforms.get(platform) if after else None
            if a != b:
                changes.append(PinChange(tag, platform, a, b))
    return changes


def refresh_pins(
    registry: Registry,
    pins_dir: Path,
    version: str,
    tags: Mapping[str, Sequence[str]],
    repository: str = IMAGE_REPOSITORY,
) -> list[PinChange]:
    """Ask the registry what the tags (suffix → platforms, as `Cell.image` gives them) point at
    now; rewrite the pin file; return what changed (a moved tag is a change of its index digest
    and of its platforms' digests).

    Only manifests and configs are fetched. Tags not named keep their pins; so do platforms not
    named, while their tag still points at the same index (a moved tag's pins are all replaced)."""
    wanted = {
        image_reference(version, suffix, repository): list(platforms)
        for suffix, platforms in tags.items()
    }
    return refresh_references(registry, pins_dir, version, wanted)


def refresh_references(
    registry: Registry,
    pins_dir: Path,
    version: str,
    wanted: Mapping[Reference, Sequence[str]],
) -> list[PinChange]:
    """Pin each tagged reference for its platforms, in the pin file of its repository."""
    by_repository: dict[str, dict[Reference, Sequence[str]]] = {}
    for ref, platforms in wanted.items():
        by_repository.setdefault(ref.name, {})[ref] = platforms
    changes = []
    for repository, refs in sorted(by_repository.items()):
        path = pin_path(pins_dir, version, repository)
        old = read_pins(path) if path.is_file() else Pins(path, _series(version)[2], repository, {})
        if Reference.parse(old.repository).name != repository:
            raise ImageError(f"{path} pins {old.repository}, not {repository}")
        tags = dict(old.tags)
        for ref, platforms in refs.items():
            tags[ref.tag or ""] = _pin_tag(registry, ref, platforms, tags.get(ref.tag or ""))
        new = Pins(path, old.version, old.repository, tags)
        changes += _diff(old.tags, new.tags)
        write_pins(new)
    return changes


def _pin_tag(
    registry: Registry, ref: Reference, platforms: Sequence[str], previous: TagPin | None
) -> TagPin:
    found: dict[str, str] = {}
    index = ""
    for platform in platforms:
        # The first platform resolves the tag; the others the very index it pointed at,
        # so a tag moved halfway through cannot mix two builds in one pin.
        image = registry.resolve(ref.with_digest(index) if index else ref, platform)
        index = image.index_digest
        found[str(Platform.parse(platform))] = image.manifest.digest
    if previous is not None and previous.index == index:
        found = {**previous.platforms, **found}  # same build: platforms not asked keep theirs
    return TagPin(index, found)


def pinned_image(pins: Pins, suffix: str, platform: str | Platform) -> PinnedImage:
    """The image of a tag suffix (a cell's `image.tag`) by digest, from the pin file; an error
    if it is not pinned."""
    return pinned_reference(pins, image_reference(pins.version, suffix, pins.repository), platform)


def pinned_reference(pins: Pins, ref: Reference, platform: str | Platform) -> PinnedImage:
    """A tagged reference by digest, from its repository's pin file; an error if not pinned."""
    want = Platform.parse(platform) if isinstance(platform, str) else platform
    pin = pins.tags.get(ref.tag or "")
    digest = None
    if pin is not None:
        digest = next(
            (d for p, d in pin.platforms.items() if Platform.parse(p).matches(want)), None
        )
    if pin is None or digest is None:
        raise ImageError(
            f"{ref} for {want} is not pinned in {pins.path}; pin it on the online side "
            "(`invoke lock` for the cell) and commit the change"
        )
    return PinnedImage(ref.with_digest(digest), want, pin.index)


def pull_pinned(registry: Registry, pinned: PinnedImage) -> Image:
    """Pull the pinned manifest by digest: the bytes are the ones reviewed, or an error."""
    return registry.pull(pinned.reference, pinned.platform)


# --- export -------------------------------------------------------------------------------------


class ExportedImage(NamedTuple):
    """One image in an export tar, for the bundle manifest."""

    reference: str  # docker.io/gpustack/gpustack:v0.7.1-cpu
    digest: str  # the platform manifest's digest
    platform: str  # linux/amd64


def _export_name(ref: Reference) -> Reference:
    """The name an image carries in the tar: with its tag, or by digest when it has none."""
    return ref.without_digest() if ref.tag else ref


def _repo_tag(ref: Reference) -> str | None:
    return f"{ref.familiar_name}:{ref.tag}" if ref.tag else None


def _check_exportable(image: Image) -> None:
    if image.manifest.media_type not in (OCI_MANIFEST, DOCKER_MANIFEST):
        raise ImageError(f"{image.reference}: {image.manifest.media_type} is not a manifest")
    for layer in image.layers:
        if layer.media_type not in _LOADABLE_LAYERS:
            raise ImageError(
                f"{image.reference}: layer {layer.digest} is {layer.media_type!r}; only tar and "
                "gzip layers can be loaded by docker 20.10 and exported here"
            )


def _info(name: str, size: int = 0, directory: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if directory:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
    else:
        info.mode = 0o644
        info.size = size
    return info


def _oci_twin(image: Image, manifest: bytes) -> bytes:
    """The OCI form of a Docker schema 2 manifest: same config and layer blobs, OCI media types.

    skopeo 1.9 (containers/image 5.23) finds only OCI image manifests by `ref.name` in a layout,
    so a Docker-typed image gets this twin in `index.json`; its bytes differ from upstream's, so
    its digest does too (the annotation UPSTREAM_DIGEST names upstream's, whose bytes are in the
    tar as well). Deterministic: the same manifest always gives the same twin."""
    data = json.loads(manifest)
    data["mediaType"] = OCI_MANIFEST
    data["config"] = {**data["config"], "mediaType": OCI_CONFIG}
    data["layers"] = [
        {**layer, "mediaType": _OCI_LAYER.get(layer["mediaType"], layer["mediaType"])}
        for layer in data["layers"]
    ]
    if [d["digest"] for d in data["layers"]] != [d.digest for d in image.layers]:
        raise ImageError(f"{image.reference}: the stored manifest does not list the image's layers")
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def _read_checked(store: BlobStore, desc: Descriptor) -> bytes:
    data = store.path(desc.hex).read_bytes()
    if hashlib.sha256(data).hexdigest() != desc.hex:
        raise IntegrityError(
            f"cached blob {store.path(desc.hex)} does not match its digest; delete it and pull "
            "again (the tar was not written)"
        )
    return data


def export_images(images: Sequence[Image], store: BlobStore, dest: Path) -> list[ExportedImage]:
    """Write the folder `dest`: an OCI layout and a `docker load` archive, once tarred, of all
    `images`, whose blobs are hard links into the store (one copy on disk).

    Each blob is linked once, however many images share it, and re-hashed against its name on
    the way, so a damaged cache file stops the export (the bundle's sums then take the digest
    from the name instead of hashing the blob again). A store on another file system than
    `dest` makes copies instead, with a warning: the bundle then costs its size twice. The
    folder appears under its final name only when complete. `index.json` names each image by
    tag (`ref.name`, what `skopeo copy oci-archive:TAR:TAG` looks for) and full name
    (`io.containerd.image.name`); `manifest.json` gives `docker load` the same config and layer
    files. Returns (reference, upstream manifest digest, platform) per image."""
    unique: dict[tuple[str, str], Image] = {}
    for image in images:
        _check_exportable(image)
        unique.setdefault((str(_export_name(image.reference)), str(image.platform)), image)
    ordered = [unique[k] for k in sorted(unique)]
    blobs: dict[str, Descriptor] = {}
    for image in ordered:
        for desc in image.blobs:
            known = blobs.setdefault(desc.hex, desc)
            if known.size != desc.size:
                raise ImageError(f"blob {desc.digest} is listed with two sizes")
            if not store.path(desc.hex).is_file():
                raise ImageError(
                    f"{image.reference}: blob {desc.digest} is not in {store.root}; pull the "
                    "image first"
                )

    generated: dict[str, bytes] = {}  # OCI twins of Docker-typed manifests
    index_entries: list[dict[str, Any]] = []
    docker_manifest: list[dict[str, Any]] = []
    result: list[ExportedImage] = []
    for image in ordered:
        name = _export_name(image.reference)
        annotations = {CONTAINERD_NAME: str(name)}
        if name.tag:
            annotations[REF_NAME] = name.tag
        entry = image.manifest
        if entry.media_type == DOCKER_MANIFEST:
            twin = _oci_twin(image, _read_checked(store, image.manifest))
            twin_hex = hashlib.sha256(twin).hexdigest()
            generated[twin_hex] = twin
            annotations[UPSTREAM_DIGEST] = image.manifest.digest
            entry = Descriptor(OCI_MANIFEST, f"sha256:{twin_hex}", len(twin))
        index_entries.append(
            Descriptor(
                entry.media_type,
                entry.digest,
                entry.size,
                image.platform,
                tuple(sorted(annotations.items())),
            ).to_json()
        )
        tag = _repo_tag(name)
        docker_manifest.append(
            {
                "Config": f"{BLOBS}/{image.config.hex}",
                "RepoTags": [tag] if tag else [],
                "Layers": [f"{BLOBS}/{layer.hex}" for layer in image.layers],
            }
        )
        result.append(ExportedImage(str(name), image.manifest.digest, str(image.platform)))

    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": index_entries}
    small = {
        "oci-layout": {"imageLayoutVersion": "1.0.0"},
        "index.json": index,
        "manifest.json": docker_manifest,
    }
    copied = 0
    with atomic_dir(dest) as tmp:
        for member, content in small.items():
            (tmp / member).write_bytes(_json_bytes(content))
        (tmp / BLOBS).mkdir(parents=True)
        for hex_digest, data in generated.items():
            (tmp / BLOBS / hex_digest).write_bytes(data)
        for hex_digest, desc in sorted(blobs.items()):
            if hex_digest in generated:
                continue
            source, target = store.path(hex_digest), tmp / BLOBS / hex_digest
            copied += 0 if link_or_copy(source, target) else desc.size
            _check_blob(target, source, desc)
    if copied:
        log.warning(
            "%s: %d MB of image blobs were copied, not hard-linked, from %s (another file "
            "system): the bundle's images are on disk twice; put the cache-dir and dist-dir "
            "on one file system to keep one copy",
            dest, copied // 10**6, store.root,
        )  # fmt: skip
    return result


def _json_bytes(content: Any) -> bytes:
    return json.dumps(content, sort_keys=True, separators=(",", ":")).encode()


def _check_blob(target: Path, source: Path, desc: Descriptor) -> None:
    """The blob as linked into the export has the size and digest it is named by."""
    actual = target.stat().st_size
    if actual != desc.size:
        raise IntegrityError(
            f"cached blob {source} has {actual} bytes, not {desc.size}; delete it and pull "
            "again (the images were not exported)"
        )
    if sha256_file(target) != desc.hex:
        raise IntegrityError(
            f"cached blob {source} does not match its digest; delete it and pull again "
            "(the images were not exported)"
        )


PUSH_LIST = "registry-push.tsv"


def push_list(folder: Path) -> str:
    """What `install.sh --registry` uploads through the distribution API, so that the site
    registry holds the bundle's own bytes (a later delta can then leave out every blob it has):
    one line per tagged image, tab-separated: the reference as Docker shows it, the manifest's
    media type, the manifest blob's sha256, then the config's and each layer's, space-separated."""
    index = json.loads((folder / "index.json").read_text())
    lines = []
    for entry in index["manifests"]:
        name = entry.get("annotations", {}).get(CONTAINERD_NAME, "")
        if ":" not in name.rsplit("/", 1)[-1]:
            continue  # by digest only: nothing to tag
        manifest_hex = entry["digest"].removeprefix("sha256:")
        manifest = json.loads((folder / BLOBS / manifest_hex).read_bytes())
        blobs = [manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]
        familiar = name.removeprefix("docker.io/").removeprefix("library/")
        hexes = " ".join(b.removeprefix("sha256:") for b in blobs)
        lines.append(f"{familiar}\t{entry['mediaType']}\t{manifest_hex}\t{hexes}\n")
    return "".join(lines)


def layout_members(folder: Path) -> list[str]:
    """The paths of an export folder in the order its tar lists them: the three small files,
    the blob folders, then the blobs by digest (what `write_layout_tar` writes)."""
    blobs = sorted(p.name for p in (folder / BLOBS).iterdir())
    return [*_SMALL, "blobs", BLOBS, *(f"{BLOBS}/{b}" for b in blobs)]


def write_layout_tar(folder: Path, dest: Path) -> None:
    """One deterministic tar of an export folder (mtime 0, owner 0), for tools that want a
    single file: `docker load -i`, `skopeo copy oci-archive:`. A bundle never holds it."""
    with atomic_path(dest) as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
        for member in layout_members(folder):
            path = folder / member
            if path.is_dir():
                tf.addfile(_info(member, directory=True))
                continue
            with path.open("rb") as fh:
                tf.addfile(_info(member, path.stat().st_size), fh)


def read_layout_file(path: Path, member: str) -> bytes | None:
    """A file of an export: from the folder, or from an export tar (bundles before the folder)."""
    if path.is_dir():
        file = path / member
        return file.read_bytes() if file.is_file() else None
    with tarfile.open(path) as tf:
        try:
            fh = tf.extractfile(member)
        except KeyError:
            return None
        return fh.read() if fh is not None else None


def list_export(path: Path) -> list[ExportedImage]:
    """The images an export folder (or an older bundle's export tar) holds, from `index.json`."""
    data = read_layout_file(path, "index.json")
    if data is None:
        raise ImageError(f"{path} has no index.json; it is not an image export")
    index = json.loads(data)
    out = []
    for entry in index.get("manifests", []):
        annotations = entry.get("annotations") or {}
        platform = Platform.from_json(entry.get("platform") or {})
        digest = annotations.get(UPSTREAM_DIGEST) or entry["digest"]
        out.append(
            ExportedImage(str(annotations.get(CONTAINERD_NAME, "")), str(digest), str(platform))
        )
    return out
