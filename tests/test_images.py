"""Image choice as data (tag rules, pin files) and the export folder, checked with real tools:
`docker load` (20.10) of the folder streamed as a tar + `docker run`, `skopeo copy`/`skopeo
inspect` (1.9) of `oci-archive:` (the folder tarred) and `oci:` (the folder itself). Podman is not
installed on the build host, so it is not exercised.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import random
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest
from support.registry_fixture import (  # noqa: F401 - session fixtures by name
    AMD64,
    ARM64,
    Blob,
    gpustack_tags,
    hub_fixture,
    make_image,
    runnable_image_fixture,
    single_image,
    site_registry_fixture,
    store_image,
    tar_layer,
)

from gpustack_offline.core import docker as containers
from gpustack_offline.core.downloads import BlobStore
from gpustack_offline.core.errors import IntegrityError
from gpustack_offline.core.processes import run
from gpustack_offline.stages.images import (
    ExportedImage,
    ImageError,
    Pins,
    TagPin,
    export_images,
    format_pins,
    image_reference,
    image_tag,
    layout_members,
    list_export,
    pin_path,
    pinned_image,
    pull_pinned,
    read_pins,
    refresh_pins,
    write_layout_tar,
    write_pins,
)
from gpustack_offline.stages.registry import Registry

TAGS = ("v0.7.1", "v0.7.1-cpu", "v0.7.1-cuda12.8")
BOTH = ["linux/amd64", "linux/arm64"]
D1, D2, D3 = ("sha256:" + c * 64 for c in "123")
# No credentials from the environment or a Docker config of the host running the tests.
NO_CONFIG = {"DOCKER_CONFIG": "/nonexistent/gpustack-offline-tests"}

# -- tags --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cell_id", "tag"),
    [
        ("v0.7.1-linux-amd64-cuda12.4-py3.11-base-docker", "v0.7.1"),
        ("v0.7.1-linux-amd64-cpu-py3.11-base-docker", "v0.7.1-cpu"),
        ("v0.7.1-linux-amd64-cuda12.8-py3.11-base-docker", "v0.7.1-cuda12.8"),
        ("v0.6.2-linux-amd64-cuda12.4-py3.11-base-docker", "v0.6.2"),
        ("v0.6.2-linux-amd64-cpu-py3.11-base-docker", "v0.6.2-cpu"),
        ("v0.7.1-linux-arm64-cann8.2.rc1-310p-py3.11-base-docker", "v0.7.1-npu-310p"),
        ("v0.6.2-linux-arm64-cann8.1.rc1-910b-py3.11-base-docker", "v0.6.2-npu"),
        ("v0.7.1-linux-amd64-dtk25.04-py3.11-base-docker", "v0.7.1-dcu"),
    ],
)
def test_image_tags_carry_the_device_suffix_and_the_plain_tag_is_cuda_12_4(matrix, cell_id, tag):
    cell = matrix.cell(cell_id)
    assert cell.image is not None
    assert image_tag(cell.version, cell.image.tag) == tag
    assert (
        str(image_reference(cell.version, cell.image.tag)) == f"docker.io/gpustack/gpustack:{tag}"
    )


def test_image_platforms_follow_upstream(matrix):
    cpu = matrix.cell("v0.7.1-linux-amd64-cpu-py3.11-base-docker")
    musa = matrix.cell("v0.7.1-linux-amd64-musarc4.2-py3.11-base-docker")
    assert cpu.image is not None and musa.image is not None
    assert cpu.image.platforms == ("linux/amd64", "linux/arm64")
    assert musa.image.platforms == ("linux/amd64",)


@pytest.mark.parametrize(
    ("version", "suffix", "reason"),
    [
        ("0.7.1", "npu", "no image tag suffix"),
        ("2.0.0", "-cpu", "only 0.6 and 0.7"),
        ("latest", "-cpu", "not a GPUStack version"),
    ],
)
def test_unknown_suffixes_and_versions_are_refused(version, suffix, reason):
    with pytest.raises(ImageError, match=reason):
        image_tag(version, suffix)


# -- pin files -----------------------------------------------------------------------------------


def _pins(path: Path) -> Pins:
    return Pins(
        path,
        "0.7.1",
        "docker.io/gpustack/gpustack",
        {
            "v0.7.1-cpu": TagPin(D1, {"linux/arm64": D3, "linux/amd64": D2}),
            "v0.7.1": TagPin(D2, {"linux/amd64": D1}),
        },
    )


def test_pin_files_round_trip_sorted_and_unchanged_when_rewritten(tmp_path):
    path = pin_path(tmp_path, "v0.7.1")
    assert path == tmp_path / "gpustack-0.7.1.toml"
    pins = _pins(path)
    assert write_pins(pins)
    assert read_pins(path) == pins
    text = path.read_text()
    assert text.index('[tags."v0.7.1"]') < text.index('[tags."v0.7.1-cpu"]')
    assert text.index('"linux/amd64"', text.index("v0.7.1-cpu")) < text.index('"linux/arm64"')
    assert format_pins(read_pins(path)) == text
    assert not write_pins(pins)  # nothing changed: not rewritten


def test_a_cell_resolves_through_its_pin_or_is_told_how_to_pin(tmp_path):
    pins = _pins(tmp_path / "gpustack-0.7.1.toml")
    pinned = pinned_image(pins, "-cpu", "linux/arm64/v8")
    assert str(pinned.reference) == f"docker.io/gpustack/gpustack:v0.7.1-cpu@{D3}"
    assert (pinned.manifest, pinned.index) == (D3, D1)
    with pytest.raises(
        ImageError, match=r"v0\.7\.1-cuda12\.8 for linux/amd64 is not pinned.*invoke lock"
    ):
        pinned_image(pins, "-cuda12.8", "linux/amd64")
    with pytest.raises(ImageError, match="not pinned"):
        pinned_image(pins, "", "linux/arm64")
    with pytest.raises(ImageError, match="invoke lock"):
        read_pins(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("schema = 1\n[tags.x]\nplatforms = {}\n")
    with pytest.raises(ImageError, match="malformed"):
        read_pins(tmp_path / "bad.toml")


# -- the export tar (from a store filled directly) -----------------------------------------------


def _stored(store: BlobStore) -> list:
    tags = gpustack_tags()
    images = [store_image(store, f"gpustack/gpustack:{t}", tags[t]["linux/amd64"]) for t in TAGS]
    images.append(
        store_image(store, "gpustack/gpustack:v0.7.1-cpu", tags["v0.7.1-cpu"]["linux/arm64"])
    )
    return images


def _members(path: Path) -> dict[str, bytes]:
    """Every file of an export folder, or of a tar (its folders have no bytes), by name."""
    if path.is_dir():
        return {m: (path / m).read_bytes() for m in layout_members(path) if (path / m).is_file()}
    with tarfile.open(path) as tf:
        out = {}
        for member in tf.getmembers():
            assert (member.mtime, member.uid, member.gid, member.uname) == (0, 0, 0, "")
            data = tf.extractfile(member) if member.isfile() else None
            if data is not None:
                out[member.name] = data.read()
        return out


def test_the_export_is_an_oci_layout_and_a_docker_archive_of_the_same_blobs(tmp_path):
    store = BlobStore(tmp_path / "cache")
    images = _stored(store)
    dest = tmp_path / "images"
    exported = export_images(images, store, dest)

    assert exported == [
        ExportedImage(f"docker.io/gpustack/gpustack:{t}", i.manifest.digest, str(i.platform))
        for t, i in sorted(
            [(img.reference.tag, img) for img in images], key=lambda x: (x[0], str(x[1].platform))
        )
    ]
    write_layout_tar(dest, tmp_path / "images.tar")
    with tarfile.open(tmp_path / "images.tar") as tf:
        names = tf.getnames()
    assert names[:5] == ["oci-layout", "index.json", "manifest.json", "blobs", "blobs/sha256"]
    assert names[5:] == sorted(names[5:]) and len(names) == len(set(names))
    assert names == layout_members(dest)
    members = _members(dest)
    assert members == _members(tmp_path / "images.tar")  # the folder and its tar, same bytes
    blobs = {n.split("/")[-1]: d for n, d in members.items() if n.startswith("blobs/sha256/")}
    assert all(hashlib.sha256(d).hexdigest() == h for h, d in blobs.items())
    wanted = {d.hex for i in images for d in i.blobs}
    index = json.loads(members["index.json"])
    twin = next(
        m
        for m in index["manifests"]
        if m["annotations"]["org.opencontainers.image.ref.name"] == "v0.7.1"
    )
    assert set(blobs) == wanted | {twin["digest"].split(":")[1]}  # each blob once, nothing else

    assert json.loads(members["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    entry = next(
        m for m in index["manifests"] if m["digest"] == images[1].manifest.digest
    )  # v0.7.1-cpu amd64
    assert entry["annotations"] == {
        "io.containerd.image.name": "docker.io/gpustack/gpustack:v0.7.1-cpu",
        "org.opencontainers.image.ref.name": "v0.7.1-cpu",
    }
    assert entry["platform"] == {"architecture": "amd64", "os": "linux"}
    assert entry["mediaType"] == images[1].manifest.media_type

    docker = json.loads(members["manifest.json"])
    assert len(docker) == 4
    for item in docker:
        assert item["Config"] in members and all(layer in members for layer in item["Layers"])
    first = next(i for i in docker if i["RepoTags"] == ["gpustack/gpustack:v0.7.1-cpu"])
    assert first["Config"] == f"blobs/sha256/{images[1].config.hex}"
    assert first["Layers"] == [f"blobs/sha256/{layer.hex}" for layer in images[1].layers]
    assert list_export(dest) == exported


def test_a_docker_schema2_image_gets_an_oci_twin_over_the_same_blobs(tmp_path):
    store = BlobStore(tmp_path / "cache")
    image = _stored(store)[0]  # v0.7.1, from a Docker manifest list
    assert image.manifest.media_type == "application/vnd.docker.distribution.manifest.v2+json"
    (exported,) = export_images([image], store, tmp_path / "x")
    assert exported.digest == image.manifest.digest  # upstream's, as pinned
    members = _members(tmp_path / "x")
    (entry,) = json.loads(members["index.json"])["manifests"]
    assert entry["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert (
        entry["annotations"]["gpustack-offline.upstream-manifest-digest"] == image.manifest.digest
    )
    twin = json.loads(members[f"blobs/sha256/{entry['digest'].split(':')[1]}"])
    upstream = json.loads(members[f"blobs/sha256/{image.manifest.hex}"])  # kept, byte for byte
    assert [d["digest"] for d in twin["layers"]] == [d["digest"] for d in upstream["layers"]]
    assert twin["config"]["digest"] == upstream["config"]["digest"] == image.config.digest
    assert {d["mediaType"] for d in twin["layers"]} == {
        "application/vnd.oci.image.layer.v1.tar+gzip"
    }
    assert twin["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    assert list_export(tmp_path / "x") == [exported]


def test_the_export_is_byte_for_byte_reproducible(tmp_path):
    store = BlobStore(tmp_path / "cache")
    images = _stored(store)
    export_images(images, store, tmp_path / "a")
    shuffled = list(images)
    random.Random(7).shuffle(shuffled)
    export_images(shuffled + images[:1], store, tmp_path / "b")
    assert _members(tmp_path / "a") == _members(tmp_path / "b")
    write_layout_tar(tmp_path / "a", tmp_path / "a.tar")
    write_layout_tar(tmp_path / "b", tmp_path / "b.tar")
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


def test_every_exported_blob_is_a_hard_link_into_the_store(tmp_path):
    store = BlobStore(tmp_path / "cache")
    images = _stored(store)
    export_images(images, store, tmp_path / "images")
    blobs = sorted((tmp_path / "images" / "blobs" / "sha256").iterdir())
    stored = [b for b in blobs if store.path(b.name).is_file()]
    assert {d.hex for i in images for d in i.blobs} == {b.name for b in stored}
    for blob in stored:  # the same inode: no byte of it is on disk twice
        assert os.path.samefile(blob, store.path(blob.name))
    twins = [b for b in blobs if b not in stored]  # generated OCI manifests: small, written
    assert twins and all(b.stat().st_nlink == 1 and b.stat().st_size < 4096 for b in twins)


def test_a_store_on_another_file_system_is_copied_with_a_warning(tmp_path, caplog):
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.fail("this test needs /dev/shm on a file system of its own (tmpfs)")
    with tempfile.TemporaryDirectory(dir=shm) as elsewhere:
        store = BlobStore(Path(elsewhere) / "cache")
        images = _stored(store)
        with caplog.at_level("WARNING", logger="gpustack_offline.stages.images"):
            export_images(images, store, tmp_path / "images")
        for blob in (tmp_path / "images" / "blobs" / "sha256").iterdir():
            assert blob.stat().st_nlink == 1  # a copy, not a link
            if store.path(blob.name).is_file():
                assert blob.read_bytes() == store.path(blob.name).read_bytes()
    assert "copied, not hard-linked" in caplog.text and "one file system" in caplog.text


def test_a_damaged_cached_blob_stops_the_export_and_leaves_no_folder(tmp_path):
    store = BlobStore(tmp_path / "cache")
    images = _stored(store)
    layer = store.path(images[0].layers[-1].hex)
    data = bytearray(layer.read_bytes())
    data[-1] ^= 0x01
    layer.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="does not match its digest"):
        export_images(images, store, tmp_path / "images")
    assert not (tmp_path / "images").exists() and not list(tmp_path.glob(".images*"))


def test_layers_docker_20_10_cannot_load_are_refused(tmp_path):
    store = BlobStore(tmp_path / "cache")
    packed, diff_id = tar_layer({"a": b"a"})
    zstd = make_image(
        AMD64, [(Blob("application/vnd.oci.image.layer.v1.tar+zstd", packed), diff_id)]
    )
    image = store_image(store, "x/y:z", zstd)
    with pytest.raises(ImageError, match=r"\+zstd"):
        export_images([image], store, tmp_path / "x")


def test_a_digest_only_reference_loads_untagged(tmp_path):
    store = BlobStore(tmp_path / "cache")
    one = single_image("by-digest")
    image = store_image(store, f"x/y@{one.manifest.digest}", one)
    (exported,) = export_images([image], store, tmp_path / "x")
    assert exported.reference == f"docker.io/x/y@{one.manifest.digest}"
    members = _members(tmp_path / "x")
    assert json.loads(members["manifest.json"])[0]["RepoTags"] == []
    (entry,) = json.loads(members["index.json"])["manifests"]
    assert "org.opencontainers.image.ref.name" not in entry["annotations"]


# -- with a registry ---------------------------------------------------------------------------


@pytest.mark.integration
def test_refreshed_pins_record_every_tag_and_platform_and_resolve_by_digest(hub, tmp_path):
    store = BlobStore(tmp_path / "cache")
    registry = Registry(
        store, mirror=hub.host, env=NO_CONFIG
    )  # docker.io/gpustack/gpustack via a mirror
    both = {"": BOTH, "-cpu": BOTH, "-cuda12.8": BOTH}
    changes = refresh_pins(registry, tmp_path, "0.7.1", both)
    assert len(changes) == 3 * 3 and all(c.old is None for c in changes)
    pins = read_pins(tmp_path / "gpustack-0.7.1.toml")
    assert pins.repository == "docker.io/gpustack/gpustack"
    for tag in TAGS:
        seeded = hub.tags[f"gpustack/gpustack:{tag}"]
        assert pins.tags[tag].index == seeded.top_digest
        assert pins.tags[tag].platforms == {
            p: seeded.images[p].manifest.digest for p in ("linux/amd64", "linux/arm64")
        }
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    # no layer was fetched: pins need manifests and configs only
    layer_hexes = {
        layer.hex
        for t in TAGS
        for i in hub.tags[f"gpustack/gpustack:{t}"].images.values()
        for layer in i.layers
    }
    assert not layer_hexes & {p.name for p in store.root.iterdir()}

    text = (tmp_path / "gpustack-0.7.1.toml").read_text()
    mark = hub.registry.mark()
    assert refresh_pins(registry, tmp_path, "0.7.1", both) == []
    assert (tmp_path / "gpustack-0.7.1.toml").read_text() == text
    assert {e.method for e in hub.registry.log(mark)} == {"HEAD"}  # all else was stored
    # refreshing one platform of an unmoved tag keeps the other's pin
    assert refresh_pins(registry, tmp_path, "0.7.1", {"-cpu": ["linux/amd64"]}) == []
    assert (tmp_path / "gpustack-0.7.1.toml").read_text() == text

    pinned = pinned_image(pins, "-cuda12.8", "linux/arm64")
    image = pull_pinned(registry, pinned)
    assert (
        image.manifest.digest
        == hub.tags["gpustack/gpustack:v0.7.1-cuda12.8"].images["linux/arm64"].manifest.digest
    )
    assert image.platform == ARM64 and str(image.reference.without_digest()).endswith(
        ":v0.7.1-cuda12.8"
    )


@pytest.mark.integration
def test_a_moved_tag_is_a_pin_diff_and_pinned_pulls_keep_the_reviewed_image(hub, tmp_path):
    repository = f"{hub.host}/fixture/moving"
    first = gpustack_tags(build="1")["v0.7.1-cpu"]
    hub.push("fixture/moving", "v0.7.1-cpu", list(first.values()))
    store = BlobStore(tmp_path / "cache")
    registry = Registry(store, env=NO_CONFIG)
    refresh_pins(registry, tmp_path, "0.7.1", {"-cpu": BOTH}, repository=repository)
    pins = pin_path(tmp_path, "0.7.1", repository)
    assert pins.name == "moving-0.7.1.toml"  # one pin file per repository
    before = pins.read_text()
    reviewed = pinned_image(read_pins(pins), "-cpu", "linux/amd64")

    rebuilt = gpustack_tags(build="2")["v0.7.1-cpu"]
    moved = hub.push("fixture/moving", "v0.7.1-cpu", list(rebuilt.values()))
    changes = refresh_pins(registry, tmp_path, "0.7.1", {"-cpu": BOTH}, repository=repository)
    assert [(c.tag, c.platform) for c in changes] == [
        ("v0.7.1-cpu", ""),
        ("v0.7.1-cpu", "linux/amd64"),
        ("v0.7.1-cpu", "linux/arm64"),
    ]
    assert changes[0].new == moved.top_digest and changes[0].old != moved.top_digest
    assert "v0.7.1-cpu index: sha256:" in str(changes[0])
    after = pins.read_text()
    diff = [
        line
        for line in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="")
        if line[:1] in "+-" and line[:3] not in ("+++", "---")
    ]
    assert len(diff) == 6  # three digests out, three in

    # the reviewed pin still pulls the reviewed bytes, though the tag moved
    image = pull_pinned(registry, reviewed)
    assert image.manifest.digest == first["linux/amd64"].manifest.digest
    assert image.manifest.digest != rebuilt["linux/amd64"].manifest.digest


def _pull_tags(hub, store: BlobStore, platform: str = "linux/amd64"):
    registry = Registry(store, env=NO_CONFIG)
    return [registry.pull(hub.ref(f"gpustack/gpustack:{t}"), platform) for t in TAGS]


def _remove_images(engine, names) -> None:
    import docker.errors

    for name in names:
        with contextlib.suppress(docker.errors.ImageNotFound):
            engine.images.remove(name, force=True)


def _absent(engine, name: str) -> bool:
    import docker.errors

    try:
        engine.images.get(name)
    except docker.errors.ImageNotFound:
        return True
    return False


def _stream_load(folder: Path) -> str:
    """`tar -C FOLDER -cf - . | docker load`, install.sh's line; what docker load said."""
    tar = subprocess.Popen(["tar", "-C", folder, "-cf", "-", "."], stdout=subprocess.PIPE)
    assert tar.stdout is not None
    with tar:
        load = subprocess.run(
            ["docker", "load"], stdin=tar.stdout, capture_output=True, text=True, timeout=600
        )
        tar.stdout.close()
    assert tar.returncode == 0 and load.returncode == 0, load.stderr
    return load.stdout


@pytest.mark.integration
def test_docker_loads_the_export_and_runs_the_image_offline(hub, runnable_image, tmp_path):
    store = BlobStore(tmp_path / "cache")
    runnable = Registry(store, env=NO_CONFIG).pull(hub.ref("fixture/runnable:v1"), "linux/amd64")
    images = [runnable, *_pull_tags(hub, store)]
    folder = tmp_path / "images"
    export_images(images, store, folder)

    engine = containers.client()
    names = [f"{i.reference.familiar_name}:{i.reference.tag}" for i in images]
    ids = [f"sha256:{i.config.hex}" for i in images]
    _remove_images(engine, ids)  # left by an interrupted run: fixture digests are fixed
    assert all(_absent(engine, n) for n in names + ids)
    try:
        loaded = _stream_load(folder)  # as install.sh does: the folder's tar is never written
        for name, image_id in zip(names, ids, strict=True):
            assert f"Loaded image: {name}" in loaded
            assert engine.images.get(name).id == image_id
        said = run(
            ["docker", "run", "--rm", "--network", "none", "--pull", "never", names[0]],
            what="running the loaded image",
        ).stdout
        assert "hello from the gpustack-offline fixture image" in said
        run(["docker", "run", "--rm", "--network", "none", "--pull", "never", names[0], "true"])
    finally:
        _remove_images(engine, ids)
    assert all(_absent(engine, n) for n in names)


@pytest.mark.integration
def test_skopeo_copies_the_export_into_the_site_registry_with_blob_digests_unchanged(
    hub, site_registry, tmp_path
):
    store = BlobStore(tmp_path / "cache")
    images = _pull_tags(hub, store)
    folder = tmp_path / "images"
    export_images(images, store, folder)
    tar = tmp_path / "images.tar"  # the folder tarred by hand, as a site might carry it
    run(["tar", "-C", folder, "-cf", tar, "."], what="tar of the export folder")
    oci_view = {
        m["annotations"]["org.opencontainers.image.ref.name"]: m["digest"]
        for m in json.loads(_members(folder)["index.json"])["manifests"]
    }
    for image in images:
        tag = image.reference.tag
        assert tag is not None
        if image.manifest.media_type == "application/vnd.oci.image.manifest.v1+json":
            assert oci_view[tag] == image.manifest.digest  # upstream's manifest, unchanged
        local = json.loads(
            run(["skopeo", "inspect", f"oci-archive:{tar}:{tag}"], what="skopeo inspect").stdout
        )
        assert local["Digest"] == oci_view[tag]
        in_place = json.loads(
            run(["skopeo", "inspect", f"oci:{folder}:{tag}"], what="skopeo inspect").stdout
        )
        assert in_place["Digest"] == oci_view[tag]  # the folder itself is a layout too
        dest = f"docker://{site_registry.host}/mirror/gpustack:{tag}"
        run(
            ["skopeo", "copy", "--dest-tls-verify=false", f"oci-archive:{tar}:{tag}", dest],
            what="skopeo copy of the export",
        )
        remote = json.loads(
            run(["skopeo", "inspect", "--tls-verify=false", dest], what="skopeo inspect").stdout
        )
        assert remote["Digest"] == oci_view[tag]
        assert (remote["Os"], remote["Architecture"]) == ("linux", "amd64")
        assert remote["Layers"] == [layer.digest for layer in image.layers]

        # what arrived is what was exported, byte for byte, through our own client
        again = Registry(BlobStore(tmp_path / "again"), env=NO_CONFIG).pull(
            dest[len("docker://") :], "linux/amd64"
        )
        assert again.manifest.digest == oci_view[tag]
        assert again.config.digest == image.config.digest and [d.digest for d in again.layers] == [
            d.digest for d in image.layers
        ]


@pytest.mark.integration
def test_images_exported_together_store_each_shared_layer_once(hub, tmp_path):
    store = BlobStore(tmp_path / "cache")
    images = _pull_tags(hub, store)
    together = tmp_path / "together"
    export_images(images, store, together)
    singles = []
    for n, image in enumerate(images):
        singles.append(tmp_path / f"single-{n}")
        export_images([image], store, singles[-1])

    def size(folder: Path) -> int:
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())

    size_together = size(together)
    size_singles = sum(size(p) for p in singles)
    base = images[0].layers[0]
    assert all(i.layers[0] == base for i in images)
    assert size_together < size_singles - 2 * base.size
    names = layout_members(together)
    assert names.count(f"blobs/sha256/{base.hex}") == 1
    print(f"3 tags in one export: {size_together} bytes; 3 single ones: {size_singles} bytes")
