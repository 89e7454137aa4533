"""Loopback registries for the Docker path: a Docker Hub look-alike and a plain site registry.

`hub` is distribution 2.8 (`docker-registry serve`) with token auth in front, as Docker Hub does
it: the registry answers 401 with `WWW-Authenticate: Bearer realm=…,service=…,scope=…`, and a
small token server here issues RS256 JWTs (signing certificate in `x5c`, trusted through the
registry's `rootcertbundle`). Public repositories get anonymous pull tokens; `gpustack/private`
needs the fixture user's password; a wrong password is a 401 from the token server. The hub is
seeded without the Docker daemon: layers are gzip tars built here, configs and manifests are
written here, and everything is pushed with the registry HTTP API. `gpustack/gpustack:v0.7.1`,
`:v0.7.1-cpu` and `:v0.7.1-cuda12.8` exist for linux/amd64 and linux/arm64/v8 and share a base
layer per architecture as the real tags do; `v0.7.1` is a Docker manifest list, the others OCI
indexes (`-cpu` also carries a BuildKit-style attestation manifest).

`site_registry` is a plain distribution with no auth (the air-gapped site's registry),
`basic_registry` one with htpasswd (Basic auth), and `runnable_image` pushes a runnable amd64
image (the cached debootstrap rootfs as a gzip layer plus a script layer) to the hub.

Every registry's access log is kept, so tests count what a client asked for.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import gzip
import hashlib
import http.server
import io
import json
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
import urllib.parse
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import requests

from gpustack_offline.core import docker as containers
from gpustack_offline.core.downloads import BlobStore
from gpustack_offline.core.files import atomic_path, sha256_file
from gpustack_offline.core.processes import run
from gpustack_offline.stages.registry import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Image,
    Platform,
    Reference,
    host_env_name,
)
from support.loopback import LoopbackServer, Served
from support.release_mirror import cache_root

log = logging.getLogger("gpustack_offline.registry_fixture")

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
AMD64 = Platform("linux", "amd64")
ARM64 = Platform("linux", "arm64", "v8")
CREATED = "2025-01-01T00:00:00Z"  # fixed, so fixture digests are the same every session

# -- images, made without a daemon -----------------------------------------------------------


@dataclass(frozen=True)
class Blob:
    media_type: str
    data: bytes = field(repr=False)

    @property
    def hex(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def digest(self) -> str:
        return "sha256:" + self.hex

    def descriptor(self, platform: Platform | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": len(self.data),
        }
        if platform is not None:
            out["platform"] = platform.to_json()
        return out


@dataclass(frozen=True)
class FileLayer:
    """A layer too big to hold in memory, stored in a file."""

    media_type: str
    path: Path
    hex: str
    size: int

    @property
    def digest(self) -> str:
        return "sha256:" + self.hex

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


Layer = Blob | FileLayer


@dataclass(frozen=True)
class FixtureImage:
    """One platform's manifest, config and layers, as pushed."""

    platform: Platform
    manifest: Blob
    config: Blob
    layers: tuple[Layer, ...]


@dataclass(frozen=True)
class FixtureTag:
    """What a tag points at: an index over platform images, or one image (index is None)."""

    repository: str
    tag: str
    index: Blob | None
    images: Mapping[str, FixtureImage]  # "linux/amd64" → image

    @property
    def top_digest(self) -> str:
        return self.index.digest if self.index else next(iter(self.images.values())).manifest.digest


def noise(seed: str, size: int) -> bytes:
    """Deterministic bytes that do not compress, so layer sizes mean something."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def tar_layer(files: Mapping[str, bytes], executable: Sequence[str] = ()) -> tuple[bytes, str]:
    """A deterministic gzip layer of `files`; returns (compressed bytes, diff_id)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            info.mode = 0o755 if name in executable else 0o644
            info.mtime = 0
            tf.addfile(info, io.BytesIO(files[name]))
    plain = raw.getvalue()
    packed = io.BytesIO()
    with gzip.GzipFile(filename="", fileobj=packed, mode="wb", mtime=0) as gz:
        gz.write(plain)
    return packed.getvalue(), "sha256:" + hashlib.sha256(plain).hexdigest()


def make_image(
    platform: Platform,
    layers: Sequence[tuple[Layer, str]],
    *,
    docker: bool = False,
    cmd: Sequence[str] = ("/bin/sh",),
    labels: Mapping[str, str] | None = None,
) -> FixtureImage:
    """An image of `layers` ((layer, diff_id) pairs), OCI or Docker schema 2 media types."""
    config = {
        "architecture": platform.architecture,
        "os": platform.os,
        "created": CREATED,
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": list(cmd),
            "Labels": dict(labels or {}),
        },
        "rootfs": {"type": "layers", "diff_ids": [d for _, d in layers]},
        "history": [{"created": CREATED, "created_by": "gpustack-offline fixture"}] * len(layers),
    }
    if platform.variant:
        config["variant"] = platform.variant
    config_blob = Blob(
        DOCKER_CONFIG if docker else OCI_CONFIG, json.dumps(config, sort_keys=True).encode()
    )
    manifest = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
        "config": config_blob.descriptor(),
        "layers": [layer.descriptor() for layer, _ in layers],
    }
    manifest_blob = Blob(str(manifest["mediaType"]), json.dumps(manifest, indent=3).encode())
    return FixtureImage(platform, manifest_blob, config_blob, tuple(layer for layer, _ in layers))


def attestation() -> tuple[Blob, tuple[Blob, ...]]:
    """A BuildKit-style attestation manifest (platform unknown/unknown) and its blobs."""
    config, statement = Blob(OCI_CONFIG, b"{}"), Blob("application/vnd.in-toto+json", b"{}")
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": [statement.descriptor()],
    }
    return Blob(OCI_MANIFEST, json.dumps(manifest).encode()), (config, statement)


def make_index(
    images: Sequence[FixtureImage], *, docker: bool = False, with_attestation: bool = False
) -> Blob:
    """An OCI index or Docker manifest list over `images` (plus an attestation manifest)."""
    entries = [img.manifest.descriptor(img.platform) for img in images]
    if with_attestation:
        entry = attestation()[0].descriptor(Platform("unknown", "unknown"))
        entry["annotations"] = {
            "vnd.docker.reference.digest": images[0].manifest.digest,
            "vnd.docker.reference.type": "attestation-manifest",
        }
        entries.append(entry)
    media_type = DOCKER_LIST if docker else OCI_INDEX
    index = {"schemaVersion": 2, "mediaType": media_type, "manifests": entries}
    return Blob(media_type, json.dumps(index, indent=2).encode())


def gpustack_tags(build: str = "1") -> dict[str, dict[str, FixtureImage]]:
    """The three 0.7.1 tags: per tag, per platform, an image over a base layer shared per arch.

    `build` changes the device layers only: a rebuilt tag (a moved tag) shares the base."""
    out: dict[str, dict[str, FixtureImage]] = {
        "v0.7.1": {},
        "v0.7.1-cpu": {},
        "v0.7.1-cuda12.8": {},
    }
    for platform in (AMD64, ARM64):
        arch = platform.architecture
        base = tar_layer({"opt/base/blob": noise(f"base-{arch}", 256 << 10)})
        for tag in out:
            device = tar_layer(
                {
                    "opt/gpustack/device": f"{tag} {arch} build {build}\n".encode(),
                    "opt/gpustack/blob": noise(f"{tag}-{arch}-{build}", 16 << 10),
                }
            )
            out[tag][str(Platform(platform.os, arch))] = make_image(
                platform,
                [(Blob(OCI_LAYER, base[0]), base[1]), (Blob(OCI_LAYER, device[0]), device[1])],
                docker=(tag == "v0.7.1"),
                labels={"org.opencontainers.image.version": tag},
            )
    return out


def single_image(name: str, platform: Platform = AMD64, *, docker: bool = False) -> FixtureImage:
    layer = tar_layer({f"opt/{name}/data": noise(name, 8 << 10)})
    layer_type = DOCKER_LAYER if docker else OCI_LAYER
    return make_image(platform, [(Blob(layer_type, layer[0]), layer[1])], docker=docker)


def store_image(store: BlobStore, reference: str, image: FixtureImage) -> Image:
    """Put a fixture image's blobs into a BlobStore as a pull would; return its Image (for tests
    of what comes after a pull, without sockets)."""
    store.root.mkdir(parents=True, exist_ok=True)
    for blob in (image.manifest, image.config, *image.layers):
        if isinstance(blob, Blob):
            store.path(blob.hex).write_bytes(blob.data)
        else:
            shutil.copyfile(blob.path, store.path(blob.hex))
    ref = Reference.parse(reference)
    return Image(
        ref,
        image.platform,
        ref.digest or image.manifest.digest,
        Descriptor(
            image.manifest.media_type,
            image.manifest.digest,
            len(image.manifest.data),
            image.platform,
        ),
        Descriptor(image.config.media_type, image.config.digest, len(image.config.data)),
        tuple(
            Descriptor(
                layer.media_type,
                layer.digest,
                len(layer.data) if isinstance(layer, Blob) else layer.size,
            )
            for layer in image.layers
        ),
    )


# -- a pusher --------------------------------------------------------------------------------


class Pusher:
    """Pushes blobs and manifests with the registry API (monolithic uploads)."""

    def __init__(self, base_url: str, auth: Any = None) -> None:
        self.base_url = base_url
        self.auth = auth  # callable(repository) → Authorization header value, or None
        self.http = requests.Session()

    def _headers(self, repository: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = dict(extra or {})
        if self.auth is not None:
            headers["Authorization"] = self.auth(repository)
        return headers

    def blob(self, repository: str, blob: Layer) -> None:
        url = f"{self.base_url}/v2/{repository}/blobs/{blob.digest}"
        if self.http.head(url, headers=self._headers(repository), timeout=30).status_code == 200:
            return
        start = self.http.post(
            f"{self.base_url}/v2/{repository}/blobs/uploads/",
            headers=self._headers(repository),
            timeout=30,
        )
        start.raise_for_status()
        location = urllib.parse.urljoin(self.base_url, start.headers["Location"])
        sep = "&" if "?" in location else "?"
        headers = self._headers(repository, {"Content-Type": "application/octet-stream"})
        with contextlib.ExitStack() as stack:
            data: Any = (
                blob.data if isinstance(blob, Blob) else stack.enter_context(blob.path.open("rb"))
            )
            headers["Content-Length"] = str(len(blob.data) if isinstance(blob, Blob) else blob.size)
            put = self.http.put(
                f"{location}{sep}digest={blob.digest}", data=data, headers=headers, timeout=300
            )
        put.raise_for_status()

    def manifest(self, repository: str, reference: str, blob: Blob) -> None:
        headers = self._headers(repository, {"Content-Type": blob.media_type})
        put = self.http.put(
            f"{self.base_url}/v2/{repository}/manifests/{reference}",
            data=blob.data,
            headers=headers,
            timeout=30,
        )
        if put.status_code != 201:
            raise RuntimeError(
                f"manifest push {repository}:{reference}: {put.status_code} {put.text}"
            )

    def image(self, repository: str, image: FixtureImage) -> None:
        for layer in (*image.layers, image.config):
            self.blob(repository, layer)
        self.manifest(repository, image.manifest.digest, image.manifest)

    def tag(
        self,
        repository: str,
        tag: str,
        images: Sequence[FixtureImage],
        *,
        index: bool = True,
        docker: bool = False,
        with_attestation: bool = False,
    ) -> FixtureTag:
        """Push images and point `tag` at their index (or, index=False, at the one image)."""
        for image in images:
            self.image(repository, image)
        by_platform = {str(Platform(i.platform.os, i.platform.architecture)): i for i in images}
        if not index:
            (image,) = images
            self.manifest(repository, tag, image.manifest)
            return FixtureTag(repository, tag, None, by_platform)
        blob = make_index(images, docker=docker, with_attestation=with_attestation)
        if with_attestation:
            manifest, blobs = attestation()
            for extra in blobs:
                self.blob(repository, extra)
            self.manifest(repository, manifest.digest, manifest)
        self.manifest(repository, tag, blob)
        return FixtureTag(repository, tag, blob, by_platform)


# -- the token server ------------------------------------------------------------------------


class _Signer:
    """An RSA key and self-signed certificate; RS256 signatures. `cryptography` when installed
    (it is, with twine), else the openssl CLI."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.key_file = directory / "token-key.pem"
        self.cert_file = directory / "token-cert.pem"
        self._key: Any = None  # an RSA private key when the cryptography package is there
        try:
            self._with_cryptography()
        except ImportError:
            run(
                [
                    "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
                    "-subj", "/CN=gpustack-offline fixture token issuer",
                    "-keyout", self.key_file, "-out", self.cert_file,
                ],
                what="making the fixture token signing key",
            )  # fmt: skip
        pem = self.cert_file.read_text()
        body = "".join(pem.split("-----")[2].split())
        self.cert_der_b64 = body  # standard base64 of the DER certificate, as x5c wants

    def _with_cryptography(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, "gpustack-offline fixture token issuer")]
        )
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        self.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self._key = key

    def sign(self, data: bytes) -> bytes:
        if self._key is not None:
            from cryptography.hazmat.primitives import hashes
            from cryptography.hazmat.primitives.asymmetric import padding

            return cast(bytes, self._key.sign(data, padding.PKCS1v15(), hashes.SHA256()))
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "in").write_bytes(data)
            run(
                ["openssl", "dgst", "-sha256", "-sign", self.key_file, "-out", Path(tmp) / "sig",
                 Path(tmp) / "in"],
                what="signing a fixture token",
            )  # fmt: skip
            return (Path(tmp) / "sig").read_bytes()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class TokenRequest:
    scopes: tuple[str, ...]
    user: str | None  # the user name sent, if any
    status: int
    granted: tuple[tuple[str, tuple[str, ...]], ...]  # (repository, actions)


class TokenServer(Served):
    """Docker Hub's token endpoint, for one registry: GET /token?service=…&scope=…"""

    def __init__(
        self,
        directory: Path,
        *,
        service: str = "fixture-hub",
        issuer: str = "fixture-token-issuer",
        users: Mapping[str, str] | None = None,
        private: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.signer = _Signer(directory)
        self.service = service
        self.issuer = issuer
        self.users = dict(users or {})
        self.private = {repo: set(who) for repo, who in (private or {}).items()}
        self._lock = threading.Lock()
        self._requests: list[TokenRequest] = []

    @property
    def realm(self) -> str:
        return f"{self.served_url}/token"

    @property
    def requests(self) -> list[TokenRequest]:
        with self._lock:
            return list(self._requests)

    def mint(self, subject: str, access: Sequence[tuple[str, Sequence[str]]]) -> str:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.signer.cert_der_b64]}
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": [
                {"type": "repository", "name": name, "actions": list(actions)}
                for name, actions in access
            ],
        }
        signing_input = (
            _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        )
        return signing_input + "." + _b64url(self.signer.sign(signing_input.encode()))

    def answer(self, query: str, authorization: str | None) -> tuple[int, dict[str, Any]]:
        params = urllib.parse.parse_qs(query)
        scopes = tuple(params.get("scope", []))
        user = None
        if authorization:
            try:
                scheme, _, value = authorization.partition(" ")
                user, _, password = base64.b64decode(value).decode().partition(":")
                ok = scheme.lower() == "basic" and self.users.get(user) == password
            except ValueError:
                ok = False
            if not ok:
                self._record(TokenRequest(scopes, user, 401, ()))
                return 401, {"details": "incorrect username or password"}
        granted: list[tuple[str, tuple[str, ...]]] = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind != "repository":
                continue
            allowed = {"pull"}
            if name in self.private and user not in self.private[name]:
                allowed = set()
            granted.append((name, tuple(a for a in actions.split(",") if a in allowed)))
        self._record(TokenRequest(scopes, user, 200, tuple(granted)))
        token = self.mint(user or "", granted)
        return 200, {"token": token, "access_token": token, "expires_in": 300}

    def _record(self, request: TokenRequest) -> None:
        with self._lock:
            self._requests.append(request)

    server_name = "token-server"

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        return _TokenHandler


class _TokenHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        tokens = cast("LoopbackServer[TokenServer]", self.server).owner
        url = urllib.parse.urlsplit(self.path)
        if url.path != "/token":
            status, body = 404, {"details": "not found"}
        else:
            status, body = tokens.answer(url.query, self.headers.get("Authorization"))
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 401:
            self.send_header("WWW-Authenticate", 'Basic realm="fixture"')
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        log.debug("token server: " + format, *args)


# -- distribution ----------------------------------------------------------------------------

_ACCESS = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3})')


@dataclass(frozen=True)
class Logged:
    method: str
    path: str
    status: int


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class DistributionRegistry:
    """A `docker-registry serve` process on 127.0.0.1 with its storage in `root`."""

    root: Path
    auth: Mapping[str, Any] | None = None
    port: int = 0
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self) -> DistributionRegistry:
        self.root.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            self.port = _free_port()
            config = {
                "version": 0.1,
                "log": {"level": "error", "accesslog": {"disabled": False}},
                "storage": {
                    "filesystem": {"rootdirectory": str(self.root / "storage")},
                    "delete": {"enabled": True},
                    "maintenance": {"uploadpurging": {"enabled": False}},
                },
                "http": {"addr": self.host, "secret": secrets.token_hex(16)},
            }
            if self.auth:
                config["auth"] = dict(self.auth)
            config_file = self.root / "config.yml"  # YAML is a superset of JSON
            config_file.write_text(json.dumps(config, indent=2))
            env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
            with (
                (self.root / "access.log").open("ab") as out,
                (self.root / "registry.log").open("ab") as err,
            ):
                self._proc = subprocess.Popen(
                    ["docker-registry", "serve", str(config_file)], stdout=out, stderr=err, env=env
                )
            if self._wait():
                return self
            self.stop()
        tail = (self.root / "registry.log").read_text()[-2000:]
        raise RuntimeError(f"docker-registry did not start:\n{tail}")

    def _wait(self) -> bool:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                return False
            try:
                if requests.get(f"{self.url}/v2/", timeout=2).status_code in (200, 401):
                    return True
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def log(self, since: int = 0) -> list[Logged]:
        """Access log entries from the `since`-th on. Distribution writes a line after the
        response, so wait until the log has been still for a moment."""
        path = self.root / "access.log"
        size, still = -1, 0.0
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            now = path.stat().st_size
            if now == size:
                still += 0.05
                if still >= 0.25:
                    break
            else:
                size, still = now, 0.0
            time.sleep(0.05)
        lines = path.read_text().splitlines()
        entries = [
            Logged(m["method"], m["path"], int(m["status"]))
            for m in (_ACCESS.search(line) for line in lines)
            if m and m["path"] != "/v2/"
        ]
        return entries[since:]

    def mark(self) -> int:
        return len(self.log())

    def blob_file(self, digest: str) -> Path:
        hex_digest = digest.split(":", 1)[1]
        return (
            self.root
            / "storage/docker/registry/v2/blobs/sha256"
            / hex_digest[:2]
            / hex_digest
            / "data"
        )


@dataclass
class Hub:
    """Token auth in front of a registry, seeded like gpustack/gpustack on Docker Hub."""

    registry: DistributionRegistry
    tokens: TokenServer = field(repr=False)
    username: str
    password: str = field(repr=False)
    pusher: Pusher = field(repr=False)
    tags: dict[str, FixtureTag] = field(default_factory=dict, repr=False)

    @property
    def host(self) -> str:
        return self.registry.host

    def ref(self, name: str) -> str:
        """`gpustack/gpustack:v0.7.1` → `127.0.0.1:PORT/gpustack/gpustack:v0.7.1`."""
        return f"{self.host}/{name}"

    def credentials_env(self, password: str | None = None) -> dict[str, str]:
        return {host_env_name(self.host): f"{self.username}:{password or self.password}"}

    def push(
        self, repository: str, tag: str, images: Sequence[FixtureImage], **kw: Any
    ) -> FixtureTag:
        pushed = self.pusher.tag(repository, tag, images, **kw)
        self.tags[f"{repository}:{tag}"] = pushed
        return pushed


@contextlib.contextmanager
def hub_registry(root: Path) -> Iterator[Hub]:
    username, password = "fixture-user", secrets.token_urlsafe(18)
    tokens = TokenServer(
        root,
        users={username: password, "fixture-admin": secrets.token_urlsafe(18)},
        private={"gpustack/private": [username]},
    ).start()
    registry = DistributionRegistry(
        root / "hub",
        auth={
            "token": {
                "realm": tokens.realm,
                "service": tokens.service,
                "issuer": tokens.issuer,
                "rootcertbundle": str(tokens.signer.cert_file),
            }
        },
    )
    try:
        registry.start()

        def push_auth(repository: str) -> str:
            return "Bearer " + tokens.mint("fixture-admin", [(repository, ("pull", "push"))])

        hub = Hub(registry, tokens, username, password, Pusher(registry.url, push_auth))
        seed_hub(hub)
        yield hub
    finally:
        registry.stop()
        tokens.stop()


def seed_hub(hub: Hub) -> None:
    for tag, images in gpustack_tags().items():
        hub.push(
            "gpustack/gpustack",
            tag,
            list(images.values()),
            docker=(tag == "v0.7.1"),
            with_attestation=(tag == "v0.7.1-cpu"),
        )
    hub.push("gpustack/private", "v1", [single_image("private")], index=False)
    hub.push("fixture/damaged", "v1", [single_image("damaged")], index=False)
    hub.push("fixture/single", "amd64", [single_image("single", docker=True)], index=False)


@contextlib.contextmanager
def plain_registry(
    root: Path, auth: Mapping[str, Any] | None = None
) -> Iterator[DistributionRegistry]:
    registry = DistributionRegistry(root, auth).start()
    try:
        yield registry
    finally:
        registry.stop()


def bcrypt_htpasswd(user: str, password: str) -> str:
    """One htpasswd line with a bcrypt hash (the only kind distribution accepts), from libcrypt."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # Python 3.11/3.12; libxcrypt does bcrypt

    hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=1 << 5))
    if not hashed or not hashed.startswith("$2"):
        raise RuntimeError("this libcrypt cannot make bcrypt hashes")
    return f"{user}:{hashed}\n"


@dataclass
class BasicRegistry:
    registry: DistributionRegistry
    username: str
    password: str = field(repr=False)
    tag: FixtureTag = field(repr=False)

    @property
    def host(self) -> str:
        return self.registry.host


# -- a runnable image ------------------------------------------------------------------------

DEBIAN_MIRROR = "http://deb.debian.org/debian"
HELLO = b"#!/bin/sh\necho 'hello from the gpustack-offline fixture image'\n"


def file_layer(plain: Path, final: Path) -> tuple[FileLayer, str]:
    """The uncompressed layer tar `plain` as a gzip layer at `final` (made once, with its digests
    beside it in `final`.json). Returns (layer, diff_id)."""
    meta = final.with_suffix(".json")
    if not (final.is_file() and meta.is_file()):
        with (
            atomic_path(final) as tmp,
            plain.open("rb") as src,
            tmp.open("wb") as out,
            gzip.GzipFile(filename="", fileobj=out, mode="wb", mtime=0, compresslevel=1) as gz,
        ):
            shutil.copyfileobj(src, gz, 1 << 20)
        diff_id = "sha256:" + sha256_file(plain)
        with atomic_path(meta) as tmp:
            tmp.write_text(json.dumps({"diff_id": diff_id, "sha256": sha256_file(final)}))
    info = json.loads(meta.read_text())
    layer = FileLayer(OCI_LAYER, final, info["sha256"], final.stat().st_size)
    return layer, info["diff_id"]


def debian_layer(arch: str = "amd64") -> tuple[FileLayer, str]:
    """The cached debootstrap rootfs (what containers.base_image loads) as a gzip layer, made
    once per rootfs and kept beside it in the cache. Returns (layer, diff_id)."""
    rootfs = containers.rootfs_tar(arch, cache_root(), DEBIAN_MIRROR)
    return file_layer(rootfs, cache_root() / "fixtures" / "registry" / f"{rootfs.stem}.tar.gz")


def runnable(repository: str = "fixture/runnable") -> FixtureImage:
    base, base_diff = debian_layer("amd64")
    script, script_diff = tar_layer(
        {"usr/local/bin/fixture-hello": HELLO}, ["usr/local/bin/fixture-hello"]
    )
    return make_image(
        AMD64,
        [(base, base_diff), (Blob(OCI_LAYER, script), script_diff)],
        cmd=("/usr/local/bin/fixture-hello",),
        labels={"org.opencontainers.image.title": repository},
    )


# -- pytest fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="session", name="hub")
def hub_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    """Docker Hub look-alike (token auth), seeded with the gpustack/gpustack 0.7.1 tags."""
    with hub_registry(tmp_path_factory.mktemp("hub")) as started:
        yield started


@pytest.fixture(scope="session", name="site_registry")
def site_registry_fixture(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[DistributionRegistry]:
    """A plain registry without auth, as at an air-gapped site."""
    with plain_registry(tmp_path_factory.mktemp("site")) as registry:
        yield registry


@pytest.fixture(scope="session", name="basic_registry")
def basic_registry_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BasicRegistry]:
    """A registry with Basic auth (htpasswd), holding private/app:v1."""
    root = tmp_path_factory.mktemp("basic")
    user, password = "site-user", secrets.token_urlsafe(18)
    (root / "htpasswd").write_text(bcrypt_htpasswd(user, password))
    auth = {"htpasswd": {"realm": "fixture", "path": str(root / "htpasswd")}}
    with plain_registry(root / "registry", auth) as registry:
        basic = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        tag = Pusher(registry.url, lambda _repo: basic).tag(
            "private/app", "v1", [single_image("basic")], index=False
        )
        yield BasicRegistry(registry, user, password, tag)


@pytest.fixture(scope="session", name="runnable_image")
def runnable_image_fixture(hub: Hub) -> FixtureTag:
    """fixture/runnable:v1 on the hub: Debian bookworm (the cached rootfs) + a script layer."""
    return hub.push("fixture/runnable", "v1", [runnable()], index=False)
