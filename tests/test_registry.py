"""The registry client: references, auth as Docker Hub does it, platforms, checked blobs.

Unit tests run without sockets; `integration` ones talk to loopback registries (distribution 2.8
with a token server in front, see registry_fixture.py).
"""

from __future__ import annotations

import base64
import json
import logging
import socket
from pathlib import Path

import pytest
import requests
from support.registry_fixture import (  # noqa: F401 - session fixtures by name
    AMD64,
    Pusher,
    basic_registry_fixture,
    hub_fixture,
    site_registry_fixture,
)

from gpustack_offline.core.downloads import BlobStore, session
from gpustack_offline.core.errors import IntegrityError
from gpustack_offline.core.files import sha256_file
from gpustack_offline.stages.registry import (
    AuthError,
    BadReference,
    Credentials,
    Descriptor,
    ImageNotFound,
    Platform,
    PlatformError,
    Reference,
    Registry,
    RegistryError,
    choose_platform,
    find_credentials,
    host_env_name,
    parse_challenges,
)

# No credentials from the environment or a Docker config of the host running the tests.
NO_CONFIG = {"DOCKER_CONFIG": "/nonexistent/gpustack-offline-tests"}

# -- references --------------------------------------------------------------------------------

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("gpustack/gpustack:v0.7.1-cpu", "docker.io", "gpustack/gpustack", "v0.7.1-cpu", None),
        ("ubuntu", "docker.io", "library/ubuntu", "latest", None),
        ("ubuntu:22.04", "docker.io", "library/ubuntu", "22.04", None),
        ("docker.io/gpustack/gpustack@" + DIGEST, "docker.io", "gpustack/gpustack", None, DIGEST),
        ("index.docker.io/library/ubuntu:22.04", "docker.io", "library/ubuntu", "22.04", None),
        ("registry-1.docker.io/x/y:1", "docker.io", "x/y", "1", None),
        ("127.0.0.1:5000/x/y:tag", "127.0.0.1:5000", "x/y", "tag", None),
        ("localhost/x", "localhost", "x", "latest", None),
        (
            "harbor.site/proxy/gpustack/gpustack:v1",
            "harbor.site",
            "proxy/gpustack/gpustack",
            "v1",
            None,
        ),
        ("gpustack/gpustack:v0.7.1@" + DIGEST, "docker.io", "gpustack/gpustack", "v0.7.1", DIGEST),
        ("127.0.0.1:5000/x", "127.0.0.1:5000", "x", "latest", None),
    ],
)
def test_references_are_normalised_like_docker(text, registry, repository, tag, digest):
    ref = Reference.parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        registry,
        repository,
        tag,
        digest,
    )
    assert Reference.parse(str(ref)) == ref


def test_familiar_names_drop_docker_io_and_library():
    assert Reference.parse("ubuntu:22.04").familiar_name == "ubuntu"
    assert Reference.parse("gpustack/gpustack:v1").familiar_name == "gpustack/gpustack"
    assert Reference.parse("127.0.0.1:5000/a/b:c").familiar_name == "127.0.0.1:5000/a/b"
    ref = Reference.parse("gpustack/gpustack:v1")
    assert str(ref) == "docker.io/gpustack/gpustack:v1"
    assert ref.with_digest(DIGEST).target == DIGEST and ref.target == "v1"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("GPUStack/gpustack:v1", "lowercase"),
        ("gpustack/gpustack@sha256:abc", "digest"),
        ("gpustack/gpustack@md5:" + "a" * 32, "digest"),
        ("gpustack/gpustack:-bad", "tag"),
        ("gpustack//gpustack", "repository"),
    ],
)
def test_bad_references_are_refused_with_the_reason(text, reason):
    with pytest.raises(BadReference, match=reason):
        Reference.parse(text)


# -- challenges, platforms, credentials --------------------------------------------------------


def test_bearer_challenge_parses_quoted_values_with_commas():
    header = (
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:gpustack/gpustack:pull,push",error="insufficient_scope"'
    )
    (challenge,) = parse_challenges(header)
    assert challenge.scheme == "bearer"
    assert challenge.params == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:gpustack/gpustack:pull,push",
        "error": "insufficient_scope",
    }


def test_several_challenges_and_unquoted_and_escaped_values():
    challenges = parse_challenges('Basic realm="a \\"b\\"", Bearer realm=https://x/token, scope=s')
    assert [c.scheme for c in challenges] == ["basic", "bearer"]
    assert challenges[0].params == {"realm": 'a "b"'}
    assert challenges[1].params == {"realm": "https://x/token", "scope": "s"}
    assert parse_challenges("") == []


def test_arm64_matches_with_or_without_the_v8_variant():
    assert Platform.parse("linux/arm64").matches(Platform.parse("linux/arm64/v8"))
    assert Platform.parse("linux/arm64/v8").matches(Platform("linux", "arm64"))
    assert Platform.parse("linux/aarch64") == Platform("linux", "arm64")
    assert not Platform.parse("linux/amd64").matches(Platform.parse("linux/amd64/v3"))
    assert not Platform.parse("linux/arm64").matches(Platform.parse("linux/amd64"))
    with pytest.raises(RegistryError, match="os/arch"):
        Platform.parse("amd64")


def test_a_missing_platform_is_an_error_listing_the_index_platforms():
    entries = [
        Descriptor("m", DIGEST, 1, Platform("linux", "amd64")),
        Descriptor("m", DIGEST, 1, Platform("linux", "arm64", "v8")),
        Descriptor("m", DIGEST, 1, Platform("unknown", "unknown")),  # an attestation
    ]
    assert (
        choose_platform(entries, Platform.parse("linux/arm64"), "x").platform == entries[1].platform
    )
    with pytest.raises(PlatformError) as caught:
        choose_platform(entries, Platform.parse("linux/ppc64le"), "gpustack/gpustack:v1")
    assert "linux/amd64, linux/arm64/v8" in str(caught.value)
    assert "unknown" not in str(caught.value)
    assert [str(p) for p in caught.value.available] == ["linux/amd64", "linux/arm64/v8"]


def _docker_config(tmp_path: Path, config: dict) -> dict[str, str]:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return {"DOCKER_CONFIG": str(tmp_path), "HOME": str(tmp_path / "home")}


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_credentials_come_from_the_docker_config_auths(tmp_path):
    env = _docker_config(
        tmp_path,
        {
            "auths": {
                "https://index.docker.io/v1/": {"auth": _b64("hubuser:hub:pass")},
                "http://127.0.0.1:5000": {"username": "site", "password": "s3cret"},
            }
        },
    )
    hub_creds = find_credentials("docker.io", env)
    assert hub_creds and (hub_creds.username, hub_creds.password) == ("hubuser", "hub:pass")
    assert hub_creds.source == str(tmp_path / "config.json")
    assert find_credentials("registry-1.docker.io", env) == hub_creds
    site = find_credentials("127.0.0.1:5000", env)
    assert site and (site.username, site.password) == ("site", "s3cret")
    assert find_credentials("other.example", env) is None


def test_the_environment_variable_wins_over_the_docker_config(tmp_path):
    env = _docker_config(tmp_path, {"auths": {"harbor.site:5000": {"auth": _b64("a:b")}}})
    assert host_env_name("harbor.site:5000") == "GPUSTACK_OFFLINE_REGISTRY_AUTH_HARBOR_SITE_5000"
    env["GPUSTACK_OFFLINE_REGISTRY_AUTH_HARBOR_SITE_5000"] = "ci:token:with:colons"
    creds = find_credentials("harbor.site:5000", env)
    assert creds and (creds.username, creds.password) == ("ci", "token:with:colons")
    assert creds.source == "environment variable GPUSTACK_OFFLINE_REGISTRY_AUTH_HARBOR_SITE_5000"
    env["GPUSTACK_OFFLINE_REGISTRY_AUTH_HARBOR_SITE_5000"] = "no-colon"
    with pytest.raises(AuthError, match="user:password"):
        find_credentials("harbor.site:5000", env)


def test_credential_helpers_are_not_run_and_say_so(tmp_path, caplog):
    env = _docker_config(
        tmp_path, {"credHelpers": {"gcr.io": "gcloud"}, "credsStore": "desktop", "auths": {}}
    )
    with caplog.at_level(logging.WARNING, logger="gpustack_offline"):
        assert find_credentials("gcr.io", env) is None
    assert "credential helper 'gcloud' for gcr.io" in caplog.text
    assert "GPUSTACK_OFFLINE_REGISTRY_AUTH_GCR_IO" in caplog.text


def test_credentials_never_show_in_repr():
    creds = Credentials("someone", "hunter2", "environment variable X")
    assert "hunter2" not in repr(creds) and "someone" not in repr(creds)
    assert "environment variable X" in repr(creds)


def test_a_malformed_mirror_is_refused(tmp_path):
    with pytest.raises(RegistryError, match="host"):
        Registry(BlobStore(tmp_path), mirror="ftp://mirror/x")


# -- against loopback registries ---------------------------------------------------------------

CPU = "gpustack/gpustack:v0.7.1-cpu"


def _store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "cache")


def _stored(store: BlobStore) -> set[str]:
    return {p.name for p in store.root.iterdir()} if store.root.is_dir() else set()


@pytest.mark.integration
def test_anonymous_pull_gets_one_token_per_scope_and_stores_every_blob_checked(hub, tmp_path):
    store = _store(tmp_path)
    before = len(hub.tokens.requests)
    registry = Registry(store, env=NO_CONFIG)
    image = registry.pull(hub.ref(CPU), "linux/amd64")
    registry.pull(hub.ref("gpustack/gpustack:v0.7.1-cuda12.8"), "linux/amd64")

    tokens = hub.tokens.requests[before:]
    assert [(t.scopes, t.user, t.status) for t in tokens] == [
        (("repository:gpustack/gpustack:pull",), None, 200)
    ]
    seeded = hub.tags[CPU]
    assert image.index_digest == seeded.top_digest
    assert image.manifest.digest == seeded.images["linux/amd64"].manifest.digest
    assert image.platform == AMD64
    assert [d.digest for d in image.layers] == [
        layer.digest for layer in seeded.images["linux/amd64"].layers
    ]
    # index, manifest, config and layers are in the store, each under its own sha256
    for desc in image.blobs:
        assert sha256_file(store.path(desc.hex)) == desc.hex
    assert seeded.index is not None and store.has(seeded.index.hex)
    assert not [p for p in store.root.iterdir() if p.name.startswith(".")]


@pytest.mark.integration
def test_a_private_repository_needs_credentials(hub, tmp_path):
    with pytest.raises(AuthError) as caught:
        Registry(_store(tmp_path), env=NO_CONFIG).pull(
            hub.ref("gpustack/private:v1"), "linux/amd64"
        )
    message = str(caught.value)
    assert "without credentials" in message
    assert host_env_name(hub.host) in message and "docker login" in message

    image = Registry(_store(tmp_path), env=hub.credentials_env()).pull(
        hub.ref("gpustack/private:v1"), "linux/amd64"
    )
    assert image.manifest.digest == hub.tags["gpustack/private:v1"].top_digest
    assert hub.tokens.requests[-1].user == hub.username


@pytest.mark.integration
def test_credentials_from_a_docker_config_pull_a_private_image(hub, tmp_path):
    env = _docker_config(
        tmp_path, {"auths": {hub.host: {"auth": _b64(f"{hub.username}:{hub.password}")}}}
    )
    image = Registry(_store(tmp_path), env=env).pull(hub.ref("gpustack/private:v1"), "linux/amd64")
    assert image.manifest.digest == hub.tags["gpustack/private:v1"].top_digest


@pytest.mark.integration
def test_wrong_credentials_are_a_clear_error_without_the_secret(hub, tmp_path, caplog):
    wrong = "not-the-password-7f3a9c"
    env = hub.credentials_env(wrong)
    with caplog.at_level(logging.DEBUG), pytest.raises(AuthError) as caught:
        Registry(_store(tmp_path), env=env).pull(hub.ref("gpustack/private:v1"), "linux/amd64")
    message = str(caught.value)
    assert "refused the credentials" in message
    assert f"environment variable {host_env_name(hub.host)}" in message
    secret_forms = [wrong, _b64(f"{hub.username}:{wrong}"), hub.password]
    for text in (message, repr(caught.value), caplog.text):
        assert not any(s in text for s in secret_forms)
    assert hub.tokens.requests[-1].status == 401


@pytest.mark.integration
def test_basic_auth_registry_wants_and_takes_credentials(basic_registry, tmp_path):
    ref = f"{basic_registry.host}/private/app:v1"
    with pytest.raises(AuthError, match="asks for a user name and password"):
        Registry(_store(tmp_path), env=NO_CONFIG).pull(ref, "linux/amd64")
    env = {host_env_name(basic_registry.host): f"{basic_registry.username}:wrong-one"}
    with pytest.raises(
        AuthError, match="refused access .* with the credentials from env"
    ) as caught:
        Registry(_store(tmp_path), env=env).pull(ref, "linux/amd64")
    assert "wrong-one" not in str(caught.value)
    env = {
        host_env_name(basic_registry.host): f"{basic_registry.username}:{basic_registry.password}"
    }
    image = Registry(_store(tmp_path), env=env).pull(ref, "linux/amd64")
    assert image.manifest.digest == basic_registry.tag.top_digest


@pytest.mark.integration
@pytest.mark.parametrize("tag", ["v0.7.1", "v0.7.1-cpu", "v0.7.1-cuda12.8"])
def test_platform_is_chosen_from_manifest_lists_and_oci_indexes(hub, tmp_path, tag):
    registry = Registry(_store(tmp_path), env=NO_CONFIG)
    seeded = hub.tags[f"gpustack/gpustack:{tag}"]
    arm = registry.resolve(hub.ref(f"gpustack/gpustack:{tag}"), "linux/arm64")
    assert arm.platform == Platform("linux", "arm64", "v8")
    assert arm.manifest.digest == seeded.images["linux/arm64"].manifest.digest
    assert arm.index_digest == seeded.top_digest
    with pytest.raises(PlatformError, match=r"it has: linux/amd64, linux/arm64/v8\."):
        registry.resolve(hub.ref(f"gpustack/gpustack:{tag}"), "linux/riscv64")


@pytest.mark.integration
def test_a_single_platform_image_names_its_platform_when_another_is_asked(hub, tmp_path):
    registry = Registry(_store(tmp_path), env=NO_CONFIG)
    image = registry.resolve(hub.ref("fixture/single:amd64"), "linux/amd64")
    assert image.index_digest == image.manifest.digest
    assert image.manifest.media_type == "application/vnd.docker.distribution.manifest.v2+json"
    with pytest.raises(PlatformError, match="single-platform image for linux/amd64") as caught:
        registry.resolve(hub.ref("fixture/single:amd64"), "linux/arm64")
    assert caught.value.available == (AMD64,)


@pytest.mark.integration
def test_an_unknown_tag_is_not_found(hub, tmp_path):
    with pytest.raises(ImageNotFound, match="v9.9.9"):
        Registry(_store(tmp_path), env=NO_CONFIG).resolve(
            hub.ref("gpustack/gpustack:v9.9.9"), "linux/amd64"
        )


@pytest.mark.integration
def test_a_blob_changed_on_the_registry_is_refused_and_not_kept(hub, tmp_path):
    seeded = hub.tags["fixture/damaged:v1"].images["linux/amd64"]
    (layer,) = seeded.layers
    data = hub.registry.blob_file(layer.digest)
    original = data.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0xFF
    store = _store(tmp_path)
    try:
        data.write_bytes(bytes(flipped))
        with pytest.raises(IntegrityError, match="it was not kept"):
            Registry(store, env=NO_CONFIG).pull(hub.ref("fixture/damaged:v1"), "linux/amd64")
    finally:
        data.write_bytes(original)
    assert not store.path(layer.hex).exists()
    assert not [p for p in store.root.iterdir() if p.name.startswith(".")]  # no temp left behind
    # the config and manifest were fine and are kept; a retry fetches only the layer
    assert store.has(seeded.config.hex) and store.has(seeded.manifest.hex)
    mark = hub.registry.mark()
    Registry(store, env=NO_CONFIG).pull(hub.ref("fixture/damaged:v1"), "linux/amd64")
    gets = [e.path for e in hub.registry.log(mark) if e.method == "GET"]
    assert gets == [f"/v2/fixture/damaged/blobs/{layer.digest}"]


@pytest.mark.integration
def test_nothing_in_the_store_is_fetched_again(hub, tmp_path):
    store = _store(tmp_path)
    image = Registry(store, env=NO_CONFIG).pull(hub.ref(CPU), "linux/arm64")

    # by tag: one HEAD learns the digest (after the 401 and a token); no GET at all
    mark, tokens = hub.registry.mark(), len(hub.tokens.requests)
    again = Registry(store, env=NO_CONFIG).pull(hub.ref(CPU), "linux/arm64")
    assert again == image
    assert [(e.method, e.status) for e in hub.registry.log(mark)] == [("HEAD", 401), ("HEAD", 200)]
    assert len(hub.tokens.requests) == tokens + 1

    # by digest (what a pin gives): not one request, not even for a token
    mark, tokens = hub.registry.mark(), len(hub.tokens.requests)
    pinned = Registry(store, env=NO_CONFIG).pull(
        hub.ref(CPU) + "@" + image.manifest.digest, "linux/arm64"
    )
    assert pinned.manifest == image.manifest and pinned.layers == image.layers
    assert hub.registry.log(mark) == [] and len(hub.tokens.requests) == tokens


@pytest.mark.integration
def test_a_base_layer_shared_by_tags_is_fetched_once(hub, tmp_path):
    store = _store(tmp_path)
    registry = Registry(store, env=NO_CONFIG)
    mark = hub.registry.mark()
    images = [
        registry.pull(hub.ref(f"gpustack/gpustack:{t}"), "linux/amd64")
        for t in ("v0.7.1", "v0.7.1-cpu", "v0.7.1-cuda12.8")
    ]
    base = images[0].layers[0]
    assert all(i.layers[0] == base for i in images)
    blob_gets = [
        e.path for e in hub.registry.log(mark) if e.method == "GET" and "/blobs/" in e.path
    ]
    assert blob_gets.count(f"/v2/gpustack/gpustack/blobs/{base.digest}") == 1
    assert len(blob_gets) == len(set(blob_gets)) == 1 + 3 * 2  # base, then config + layer per tag


@pytest.mark.integration
def test_a_mirror_takes_docker_io_requests(hub, tmp_path):
    urls: list[str] = []
    http = session()
    http.hooks["response"].append(lambda resp, *a, **k: urls.append(resp.url))
    mark = hub.registry.mark()
    registry = Registry(_store(tmp_path), mirror=hub.host, env=NO_CONFIG, http=http)
    image = registry.pull(CPU, "linux/amd64")  # docker.io/gpustack/gpustack:v0.7.1-cpu
    assert str(image.reference) == "docker.io/gpustack/gpustack:v0.7.1-cpu"
    assert image.manifest.digest == hub.tags[CPU].images["linux/amd64"].manifest.digest
    assert urls and all(u.startswith(("http://127.0.0.1:", hub.tokens.realm)) for u in urls)
    assert any(
        e.path == "/v2/gpustack/gpustack/manifests/v0.7.1-cpu" for e in hub.registry.log(mark)
    )


@pytest.mark.integration
def test_a_mirror_with_a_path_prefix_like_a_harbor_proxy_project(hub, site_registry, tmp_path):
    seeded = hub.tags[CPU]
    Pusher(site_registry.url).tag(
        "dockerhub-proxy/gpustack/gpustack", "v0.7.1-cpu", list(seeded.images.values())
    )
    registry = Registry(
        _store(tmp_path), mirror=f"{site_registry.host}/dockerhub-proxy", env=NO_CONFIG
    )
    image = registry.resolve("gpustack/gpustack:v0.7.1-cpu", "linux/arm64")
    assert image.manifest.digest == seeded.images["linux/arm64"].manifest.digest
    # a reference that names its registry is never redirected
    mark = hub.registry.mark()
    registry.resolve(hub.ref(CPU), "linux/arm64")
    assert hub.registry.log(mark)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.integration
def test_a_registry_that_cannot_be_reached_is_a_registry_error(tmp_path):
    port = _closed_port()
    http = requests.Session()  # no retries: nothing listens there
    with pytest.raises(RegistryError, match=f"cannot reach 127.0.0.1:{port}"):
        Registry(_store(tmp_path), env=NO_CONFIG, http=http).resolve(
            f"127.0.0.1:{port}/x/y:1", "linux/amd64"
        )
