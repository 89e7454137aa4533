"""Pull one platform of an image through the distribution HTTP API, without a Docker daemon.

A bundle for one architecture needs that architecture's layers, nothing else, and it needs them
as the registry serves them (compressed, digests unchanged) so that every byte can be checked
against the digest upstream published. `docker pull` gives neither: it pulls into the daemon's
store, decompressed. So this module speaks the registry API itself (the same requests Docker
makes): the tag resolves to an index (OCI image index or Docker manifest list, or a single
manifest), the index to the platform's manifest, the manifest to a config and layers, and every
one of those is stored by digest in the shared `BlobStore` (`<cache>/blobs/sha256/<hex>`) only
after its sha256 matched while it streamed. Whatever the store already holds is not asked for
again; a reference pinned by digest whose blobs are stored needs no request at all.

Authentication (credentials, Bearer tokens, Basic) is `registry_auth`'s; see its docstring.

A site mirror of Docker Hub (`mirror="harbor.site/dockerhub-proxy"` or `"127.0.0.1:5001"`) takes
every `docker.io` request; the prefix, if any, goes before the repository. References keep
their `docker.io` name: the mirror is transport, and digests are the same through it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import requests

from gpustack_offline.core.downloads import BlobStore, Opener, download, session, short_reason
from gpustack_offline.core.errors import IntegrityError
from gpustack_offline.core.files import atomic_path

# `X as X`: names callers import from here (tests, the secrets and bad-input checks)
from gpustack_offline.stages.errors import AuthError as AuthError
from gpustack_offline.stages.errors import BadReference, ImageNotFound, PlatformError, RegistryError
from gpustack_offline.stages.registry_auth import (
    DOCKER_HUB,
    HUB_ALIASES,
    TIMEOUT,
    Endpoint,
    RegistryAuth,
    is_loopback,
)
from gpustack_offline.stages.registry_auth import Credentials as Credentials
from gpustack_offline.stages.registry_auth import find_credentials as find_credentials
from gpustack_offline.stages.registry_auth import host_env_name as host_env_name
from gpustack_offline.stages.registry_auth import parse_challenges as parse_challenges

log = logging.getLogger("gpustack_offline")

DOCKER_HUB_API = "registry-1.docker.io"

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
_ACCEPT = ", ".join((OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST))
MAX_MANIFEST = 4 << 20  # distribution refuses bigger manifests too


# --- references -------------------------------------------------------------------------------

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"(?:localhost|{_LABEL}(?:\.{_LABEL})*)(?::[0-9]+)?")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class Reference:
    """`registry/repository[:tag][@digest]`, normalised as Docker does."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        """Parse like `docker pull`: docker.io by default, `library/` for single names, `latest`
        when neither tag nor digest is given."""
        rest = text.strip()
        digest = None
        if "@" in rest:
            rest, digest = rest.split("@", 1)
            if not _DIGEST.fullmatch(digest):
                raise BadReference(
                    f"{text!r}: the digest must be sha256:<64 lowercase hex digits>, not {digest!r}"
                )
        tag = None
        if ":" in rest.rsplit("/", 1)[-1]:
            rest, tag = rest.rsplit(":", 1)
            if not _TAG.fullmatch(tag):
                raise BadReference(f"{text!r}: {tag!r} is not a valid tag")
        first, sep, remainder = rest.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost"):
            registry, repository = first, remainder
            if not _DOMAIN.fullmatch(registry):
                raise BadReference(f"{text!r}: {registry!r} is not a valid registry host")
        else:
            registry, repository = DOCKER_HUB, rest
        if registry.lower() in HUB_ALIASES:
            registry = DOCKER_HUB
        if registry == DOCKER_HUB and "/" not in repository:
            repository = f"library/{repository}"
        if not _REPOSITORY.fullmatch(repository):
            hint = " (repository names are lowercase)" if repository != repository.lower() else ""
            raise BadReference(f"{text!r}: {repository!r} is not a valid repository name{hint}")
        if tag is None and digest is None:
            tag = "latest"
        return cls(registry, repository, tag, digest)

    @property
    def name(self) -> str:
        """`registry/repository`, e.g. `docker.io/gpustack/gpustack`."""
        return f"{self.registry}/{self.repository}"

    @property
    def familiar_name(self) -> str:
        """The short name Docker shows: `gpustack/gpustack`, `ubuntu`, `127.0.0.1:5000/x/y`."""
        if self.registry != DOCKER_HUB:
            return self.name
        return self.repository.removeprefix("library/")

    @property
    def target(self) -> str:
        """What goes after `/manifests/` in the API: the digest if known, else the tag."""
        return self.digest or self.tag or "latest"

    def with_digest(self, digest: str) -> Reference:
        return replace(self, digest=digest)

    def without_digest(self) -> Reference:
        return replace(self, digest=None)

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


# --- platforms and descriptors ----------------------------------------------------------------

_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64"}
_DEFAULT_VARIANT = {"arm64": "v8"}


@dataclass(frozen=True, order=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        """`linux/amd64`, `linux/arm64/v8`."""
        parts = text.strip().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise RegistryError(f"{text!r} is not a platform; write os/arch[/variant]")
        arch = _ARCH_ALIASES.get(parts[1], parts[1])
        return cls(parts[0], arch, parts[2] if len(parts) == 3 else "")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Platform:
        return cls(
            str(data.get("os", "")),
            str(data.get("architecture", "")),
            str(data.get("variant", "") or ""),
        )

    def matches(self, other: Platform) -> bool:
        """Same OS and architecture, and the same variant once the default is filled in
        (`linux/arm64` is `linux/arm64/v8`)."""
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        default = _DEFAULT_VARIANT.get(self.architecture, "")
        return (self.variant or default) == (other.variant or default)

    def to_json(self) -> dict[str, str]:
        data = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            data["variant"] = self.variant
        return data

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True)
class Descriptor:
    """A pointer to a blob: its media type, digest and size (and, in an index, its platform)."""

    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: tuple[tuple[str, str], ...] = ()

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]

    @classmethod
    def from_json(cls, data: Any, where: str) -> Descriptor:
        if not isinstance(data, Mapping):
            raise RegistryError(f"{where}: a descriptor is not an object")
        digest, size = data.get("digest"), data.get("size")
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise RegistryError(f"{where}: unsupported or malformed digest {digest!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise RegistryError(f"{where}: descriptor {digest} has no valid size")
        platform = data.get("platform")
        annotations = data.get("annotations") or {}
        return cls(
            str(data.get("mediaType", "")),
            digest,
            size,
            Platform.from_json(platform) if isinstance(platform, Mapping) else None,
            tuple(sorted((str(k), str(v)) for k, v in annotations.items())),
        )

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.platform is not None:
            data["platform"] = self.platform.to_json()
        if self.annotations:
            data["annotations"] = dict(self.annotations)
        return data


@dataclass(frozen=True)
class Image:
    """One platform of an image, resolved: every descriptor needed to export it."""

    reference: Reference  # as asked for, e.g. docker.io/gpustack/gpustack:v0.7.1-cpu
    platform: Platform  # the platform's own (from the index entry, else from the config)
    index_digest: str  # what the reference pointed at: the index, or the manifest itself
    manifest: Descriptor
    config: Descriptor
    layers: tuple[Descriptor, ...]

    @property
    def blobs(self) -> tuple[Descriptor, ...]:
        return (self.manifest, self.config, *self.layers)

    @property
    def size(self) -> int:
        return sum(d.size for d in self.blobs)


def choose_platform(entries: Sequence[Descriptor], want: Platform, where: str) -> Descriptor:
    """The index entry for `want`; a PlatformError naming every platform the index has."""
    for entry in entries:
        if entry.platform is not None and want.matches(entry.platform):
            return entry
    available = sorted(
        {e.platform for e in entries if e.platform is not None and e.platform.os != "unknown"}
    )
    names = ", ".join(str(p) for p in available) or "none"
    raise PlatformError(
        f"{where} is not published for {want}; it has: {names}. "
        "Choose a cell for one of those platforms",
        available,
    )


# --- the client -------------------------------------------------------------------------------


def _error_text(resp: requests.Response) -> str:
    """The registry's own error codes and messages (never our request's headers)."""
    try:
        errors = resp.json().get("errors") or []
        text = "; ".join(f"{e.get('code', '')}: {e.get('message', '')}".strip() for e in errors)
    except (ValueError, AttributeError):
        text = ""
    return text or resp.reason or ""


class Registry:
    """A pull-only registry client that stores what it fetches in a `BlobStore`.

    `mirror` redirects docker.io (see the module docstring); `insecure` names hosts spoken to
    over plain HTTP (loopback hosts always are); `env` is where credentials and the Docker config
    location are looked up (the process environment by default); `jobs` layers download at once.
    """

    def __init__(
        self,
        store: BlobStore,
        *,
        mirror: str | None = None,
        insecure: Collection[str] = (),
        env: Mapping[str, str] | None = None,
        http: requests.Session | None = None,
        jobs: int = 4,
    ) -> None:
        self.store = store
        self.env: Mapping[str, str] = dict(os.environ if env is None else env)
        self.http = http or session()
        self.jobs = max(1, jobs)
        self.insecure = frozenset(h.lower() for h in insecure)
        self.mirror = self._parse_mirror(mirror) if mirror else None
        self.auth = RegistryAuth(self.http, self.env, self.insecure)

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    # -- public API --------------------------------------------------------------------------

    def resolve(self, reference: Reference | str, platform: Platform | str) -> Image:
        """Find `platform`'s manifest and config; store the index, manifest and config blobs.

        No layer is fetched: this is what refreshing a pin needs."""
        ref = Reference.parse(reference) if isinstance(reference, str) else reference
        want = Platform.parse(platform) if isinstance(platform, str) else platform
        ep = self._endpoint(ref)
        top_digest, top_type, top = self._manifest(ep, ref, ref.digest)
        if top_type in INDEX_TYPES:
            entries = [Descriptor.from_json(m, f"{ref} index") for m in top.get("manifests") or []]
            entry = choose_platform(entries, want, str(ref))
            digest, media_type, body = self._manifest(ep, ref, entry.digest)
            if media_type not in MANIFEST_TYPES:
                raise RegistryError(f"{ref}: the {want} entry is a {media_type}, not a manifest")
            manifest = Descriptor(media_type, digest, entry.size, entry.platform)
        else:
            manifest = Descriptor(top_type, top_digest, self._stored_size(top_digest))
            body = top
        config = Descriptor.from_json(body.get("config"), f"{ref} manifest")
        layers = tuple(
            Descriptor.from_json(layer, f"{ref} manifest") for layer in body.get("layers") or []
        )
        self._blob(ep, config, f"{ref} config")
        try:
            found = Platform.from_json(json.loads(self.store.path(config.hex).read_bytes()))
        except ValueError:
            raise RegistryError(f"{ref}: the image config {config.digest} is not JSON") from None
        if manifest.platform is None:
            if not want.matches(found):
                raise PlatformError(
                    f"{ref} is a single-platform image for {found}, not {want}; "
                    "choose a cell for that platform or another tag",
                    [found],
                )
        elif (manifest.platform.os, manifest.platform.architecture) != (
            found.os,
            found.architecture,
        ):  # variants are left out: configs often omit them
            raise RegistryError(
                f"{ref}: the index lists {manifest.digest} as {manifest.platform} but its "
                f"config says {found}; the image is inconsistent, ask its publisher"
            )
        platform_found = manifest.platform or found
        return Image(
            ref, platform_found, top_digest, replace(manifest, platform=platform_found),
            config, layers,
        )  # fmt: skip

    def pull(self, reference: Reference | str, platform: Platform | str) -> Image:
        """Resolve, then store every layer (in parallel); stored layers are not fetched."""
        image = self.resolve(reference, platform)
        ep = self._endpoint(image.reference)
        missing = [d for d in image.layers if not self.store.has(d.hex)]
        log.info(
            "%s (%s): %d layers, %d to fetch (%.1f MB)",
            image.reference,
            image.platform,
            len(image.layers),
            len(missing),
            sum(d.size for d in missing) / 1e6,
        )
        if missing:
            with ThreadPoolExecutor(max_workers=self.jobs) as pool:
                for _ in pool.map(lambda d: self._blob(ep, d, f"{image.reference} layer"), missing):
                    pass
        return image

    # -- endpoints ------------------------------------------------------------------

    def _scheme(self, host: str) -> str:
        return "http" if host.lower() in self.insecure or is_loopback(host) else "https"

    def _parse_mirror(self, mirror: str) -> tuple[str, str, str]:
        """(base URL, host, path prefix) of a mirror given as `[scheme://]host[:port][/prefix]`."""
        scheme, sep, rest = mirror.strip().partition("://")
        if not sep:
            scheme, rest = "", mirror.strip()
        host, _, prefix = rest.partition("/")
        if not host or not _DOMAIN.fullmatch(host) or scheme not in ("", "http", "https"):
            raise RegistryError(f"mirror {mirror!r}: write host[:port][/prefix]")
        prefix = prefix.strip("/")
        if prefix and not _REPOSITORY.fullmatch(prefix):
            raise RegistryError(f"mirror {mirror!r}: {prefix!r} is not a valid path prefix")
        return f"{scheme or self._scheme(host)}://{host}", host.lower(), prefix

    def _endpoint(self, ref: Reference) -> Endpoint:
        if ref.registry == DOCKER_HUB and self.mirror:
            base, host, prefix = self.mirror
            repository = f"{prefix}/{ref.repository}" if prefix else ref.repository
        elif ref.registry == DOCKER_HUB:
            base, host, repository = f"https://{DOCKER_HUB_API}", DOCKER_HUB, ref.repository
        else:
            host = ref.registry.lower()
            base, repository = f"{self._scheme(host)}://{host}", ref.repository
        plain_ok = host in self.insecure or is_loopback(host)
        return Endpoint(base, host, repository, plain_ok)

    @contextlib.contextmanager
    def _request(
        self,
        ep: Endpoint,
        method: str,
        path: str,
        *,
        accept: str | None = None,
        extra: Mapping[str, str] | None = None,
        timeout: tuple[float, float] = TIMEOUT,
        retried: bool = False,
    ) -> Iterator[requests.Response]:
        """A request to `/v2/<repository>/<path>`, authenticated as the registry asks: a 401
        (no token yet, or one that expired mid-pull) gets a new token and the request again.

        `retried`: the caller is `fetch.download`, which retries connection errors itself, so
        they pass through. Redirects (Docker Hub sends blobs to a CDN) are followed; requests
        drops the Authorization header when the redirect leaves the host."""
        url = f"{ep.base}/v2/{ep.repository}/{path}"
        fresh = False  # a credential obtained for this very request was already refused
        for attempt in range(3):
            headers = {"Accept": accept} if accept else {}
            headers.update(extra or {})
            auth = self.auth.header(ep)
            if auth:
                headers["Authorization"] = auth
            try:
                resp = self.http.request(method, url, headers=headers, stream=True, timeout=timeout)
            except requests.RequestException as exc:
                if retried:
                    raise
                raise RegistryError(
                    f"cannot reach {ep.host}: {short_reason(exc)}. Check the network, the proxy "
                    "settings or the mirror option, then rerun; stored blobs are kept"
                ) from None
            if resp.status_code != 401 or fresh or attempt == 2:
                break
            challenges = resp.headers.get("WWW-Authenticate", "")
            detail = _error_text(resp)
            resp.close()
            fresh = self.auth.answer(ep, challenges, stale=auth, detail=detail)
        try:
            if resp.status_code == 401:
                raise self.auth.refused(ep, _error_text(resp))
            yield resp
        finally:
            resp.close()

    # -- manifests and blobs -----------------------------------------------------------------

    def _stored_size(self, digest: str) -> int:
        return self.store.path(digest.split(":", 1)[1]).stat().st_size

    def _manifest(
        self, ep: Endpoint, ref: Reference, digest: str | None
    ) -> tuple[str, str, dict[str, Any]]:
        """(digest, media type, parsed JSON) of a manifest or index, stored in the BlobStore.

        By digest: from the store when it is there. By tag: a HEAD learns the digest (HEADs do
        not count against Docker Hub's pull limit), and only a manifest not stored is fetched.
        """
        where = f"{ref}" if digest is None else f"{ref.name}@{digest}"
        if digest is None:
            with self._request(ep, "HEAD", f"manifests/{ref.target}", accept=_ACCEPT) as resp:
                if resp.status_code == 404:
                    self._check(resp, ep, where)
                # a registry that answers HEAD badly gets the GET below
                said = resp.headers.get("Docker-Content-Digest") if resp.ok else None
            if said and _DIGEST.fullmatch(said) and self.store.has(said.split(":", 1)[1]):
                digest = said
        if digest is not None and self.store.has(digest.split(":", 1)[1]):
            body = self.store.path(digest.split(":", 1)[1]).read_bytes()
            content_type = ""
        else:
            target = digest or ref.target
            buffer = io.BytesIO()
            fetched = download(
                f"{ep.base}/v2/{ep.repository}/manifests/{target}",
                buffer,
                opener=self._opener(ep, f"manifests/{target}", accept=_ACCEPT),
                max_size=MAX_MANIFEST,
                what=f"{where} manifest",
                check=lambda resp: self._check(resp, ep, where),
                policy=self.store.policy,
            )
            body = buffer.getvalue()
            content_type = fetched.headers.get("Content-Type", "").split(";", 1)[0].strip()
            said = fetched.headers.get("Docker-Content-Digest")
            got = "sha256:" + hashlib.sha256(body).hexdigest()
            expect = digest or (said if said and _DIGEST.fullmatch(said) else None)
            if expect and got != expect:
                raise IntegrityError(
                    f"{where}: the manifest {ep.host} sent has {got}, not {expect}; it was not "
                    "kept. The registry or a proxy on the way altered it"
                )
            with atomic_path(self.store.path(got.split(":", 1)[1])) as tmp:
                tmp.write_bytes(body)
            digest = got
        try:
            data = json.loads(body)
        except ValueError:
            raise RegistryError(f"{where}: the manifest is not JSON") from None
        if not isinstance(data, dict):
            raise RegistryError(f"{where}: the manifest is not a JSON object")
        return digest, self._media_type(data, content_type, where), data

    @staticmethod
    def _media_type(data: Mapping[str, Any], content_type: str, where: str) -> str:
        if data.get("schemaVersion") == 1:
            raise RegistryError(
                f"{where} is a schema 1 manifest, which is deprecated and not supported"
            )
        media_type = str(data.get("mediaType") or "")
        if not media_type:
            if "manifests" in data:
                media_type = OCI_INDEX
            elif "layers" in data:
                media_type = OCI_MANIFEST
            else:
                media_type = content_type
        if media_type not in INDEX_TYPES | MANIFEST_TYPES:
            raise RegistryError(f"{where}: unsupported manifest type {media_type!r}")
        return media_type

    def _check(self, resp: requests.Response, ep: Endpoint, where: str) -> None:
        if resp.status_code == 200:
            return
        if resp.status_code == 404:
            raise ImageNotFound(
                f"{where}: not found on {ep.host} ({_error_text(resp)}); check the name and tag"
            )
        raise RegistryError(
            f"{where}: {ep.host} answered HTTP {resp.status_code} ({_error_text(resp)})"
        )

    def _opener(self, ep: Endpoint, path: str, *, accept: str | None = None) -> Opener:
        """How `fetch.download` asks this registry for `path`, authenticating as needed."""

        def opener(
            extra: Mapping[str, str], timeout: tuple[float, float]
        ) -> contextlib.AbstractContextManager[requests.Response]:
            return self._request(
                ep, "GET", path, accept=accept, extra=extra, timeout=timeout, retried=True
            )

        return opener

    def _blob(self, ep: Endpoint, desc: Descriptor, what: str) -> Path:
        """Store one blob, its sha256 and size checked while it streams; a bad one is not kept.
        Failures are retried and broken bodies resumed by `fetch.download`."""
        if self.store.has(desc.hex):
            return self.store.path(desc.hex)
        path = f"blobs/{desc.digest}"
        self.store.download(
            f"{ep.base}/v2/{ep.repository}/{path}",
            opener=self._opener(ep, path),
            sha256=desc.hex,
            size=desc.size,
            what=f"{what} {desc.digest} from {ep.host}",
            check=lambda resp: self._check(resp, ep, f"{what} {desc.digest}"),
        )
        return self.store.path(desc.hex)
