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

Authentication is Docker Hub's: a 401 with
`WWW-Authenticate: Bearer realm=…,service=…,scope=…` sends the client to the realm for a token
(anonymous, or with the user's name and password), which is cached per scope; a `Basic`
challenge (a private registry) gets the credentials directly. Credentials, first match wins:

1. `GPUSTACK_OFFLINE_REGISTRY_AUTH_<HOST>=user:password`, HOST upper-cased with every character
   other than A-Z and 0-9 written `_` (`docker.io` → `DOCKER_IO`, `harbor.site:5000` →
   `HARBOR_SITE_5000`). Meant for CI secrets.
2. The `auths` table of the Docker config, `$DOCKER_CONFIG/config.json` or
   `~/.docker/config.json` (what `docker login` writes without a credential store: base64
   `auth`, or `username` and `password`). Credential helpers (`credsStore`, `credHelpers`) are not
   run; a host that only has one gets a message saying so.

Credentials are only ever sent in headers: they are never written, logged, put in an argument
list or in an error message, and never sent over plain HTTP except to a loopback address or a
host the caller declared insecure.

A site mirror of Docker Hub (`mirror="harbor.site/dockerhub-proxy"` or `"127.0.0.1:5001"`) takes
every `docker.io` request; the prefix, if any, goes before the repository. References keep
their `docker.io` name: the mirror is transport, and digests are the same through it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import io
import ipaddress
import json
import logging
import os
import re
import threading
from collections.abc import Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import requests

from gpustack_offline.core.downloads import BlobStore, Opener, download, session, short_reason
from gpustack_offline.core.errors import BundleError, IntegrityError
from gpustack_offline.core.files import atomic_path

log = logging.getLogger("gpustack_offline")

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
AUTH_ENV_PREFIX = "GPUSTACK_OFFLINE_REGISTRY_AUTH_"

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
_ACCEPT = ", ".join((OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST))
MAX_MANIFEST = 4 << 20  # distribution refuses bigger manifests too
TIMEOUT = (15, 120)


class RegistryError(BundleError):
    """A registry that cannot be reached, or answered something this client cannot use."""


class BadReference(RegistryError):
    """An image reference that does not parse."""


class AuthError(RegistryError):
    """A registry or its token service refused us, or wants credentials we do not have."""


class ImageNotFound(RegistryError):
    """The registry has no such tag, digest or repository."""


class PlatformError(RegistryError):
    """The image is not published for the platform asked for."""

    def __init__(self, message: str, available: Sequence[Platform]) -> None:
        super().__init__(message)
        self.available = tuple(available)


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
        if registry.lower() in _HUB_ALIASES:
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


# --- credentials ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """A user name and password for one registry host; `repr` shows only where they came from."""

    username: str = field(repr=False)
    password: str = field(repr=False)
    source: str = ""

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def host_env_name(host: str) -> str:
    """The environment variable that holds credentials for `host`."""
    return AUTH_ENV_PREFIX + re.sub(r"[^A-Z0-9]", "_", host.upper())


def _config_key_host(key: str) -> str:
    """`https://index.docker.io/v1/` → `docker.io`; `http://h:5000/x` → `h:5000`."""
    host = re.sub(r"^[a-z]+://", "", key.strip()).split("/", 1)[0].lower()
    return DOCKER_HUB if host in _HUB_ALIASES else host


def docker_config_path(env: Mapping[str, str]) -> Path:
    configured = env.get("DOCKER_CONFIG")
    base = Path(configured).expanduser() if configured else Path(env.get("HOME", "~")) / ".docker"
    return base.expanduser() / "config.json"


def find_credentials(host: str, env: Mapping[str, str] | None = None) -> Credentials | None:
    """Credentials for a registry host from the environment or the Docker config, or None."""
    env = os.environ if env is None else env
    host = DOCKER_HUB if host.lower() in _HUB_ALIASES else host.lower()
    name = host_env_name(host)
    value = env.get(name)
    if value is not None:
        user, sep, password = value.partition(":")
        if not sep or not user:
            raise AuthError(f"environment variable {name} must be user:password")
        return Credentials(user, password, f"environment variable {name}")
    path = docker_config_path(env)
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AuthError(f"{path}: not readable as JSON ({type(exc).__name__})") from None
    for key, entry in (config.get("auths") or {}).items():
        if _config_key_host(key) != host or not isinstance(entry, Mapping):
            continue
        if entry.get("auth"):
            try:
                raw = base64.b64decode(str(entry["auth"]), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise AuthError(f"{path}: the `auth` entry for {key} is not base64") from None
            user, sep, password = raw.partition(":")
            if sep and user:
                return Credentials(user, password, str(path))
            raise AuthError(f"{path}: the `auth` entry for {key} is not base64 of user:password")
        if entry.get("username") and "password" in entry:
            return Credentials(str(entry["username"]), str(entry["password"]), str(path))
        if entry.get("identitytoken"):
            log.warning(
                "%s: the entry for %s holds an identity token, which is not used; "
                "set %s=user:password instead",
                path,
                key,
                name,
            )
    helpers = config.get("credHelpers") or {}
    helper = next((v for k, v in helpers.items() if _config_key_host(k) == host), None)
    helper = helper or config.get("credsStore")
    if helper:
        log.warning(
            "%s names the credential helper %r for %s; helpers are not run here. "
            "Set %s=user:password, or log in with an `auths` entry (no credsStore)",
            path,
            helper,
            host,
            name,
        )
    return None


# --- WWW-Authenticate ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower case: "bearer", "basic"
    params: Mapping[str, str]


_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def parse_challenges(header: str) -> list[Challenge]:
    """Every challenge in a WWW-Authenticate value (RFC 9110 §11.6.1), params lower-cased."""
    challenges: list[Challenge] = []
    params: dict[str, str] = {}
    pos, end = 0, len(header)
    while pos < end:
        while pos < end and header[pos] in " \t,":
            pos += 1
        match = _TOKEN_RE.match(header, pos)
        if not match:
            break
        word, pos = match.group(), match.end()
        look = pos
        while look < end and header[look] in " \t":
            look += 1
        if look < end and header[look] == "=" and challenges:
            pos = look + 1
            while pos < end and header[pos] in " \t":
                pos += 1
            if pos < end and header[pos] == '"':
                pos += 1
                value = []
                while pos < end and header[pos] != '"':
                    if header[pos] == "\\" and pos + 1 < end:
                        pos += 1
                    value.append(header[pos])
                    pos += 1
                pos += 1
                params[word.lower()] = "".join(value)
            else:  # a token; servers in the wild also leave URLs unquoted
                value_end = pos
                while value_end < end and header[value_end] not in " \t,":
                    value_end += 1
                params[word.lower()] = header[pos:value_end]
                pos = value_end
        else:
            params = {}
            challenges.append(Challenge(word.lower(), params))
    return challenges


# --- the client -------------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host.startswith("["):
        name = host[1 : host.find("]")]
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class _Endpoint:
    base: str  # https://registry-1.docker.io
    host: str  # the host credentials are looked up for
    repository: str  # the repository's path on that registry (a mirror's prefix included)
    plain_ok: bool  # credentials may go over plain HTTP (loopback or declared insecure)


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
        self._lock = threading.Lock()
        self._tokens: dict[tuple[str, str, str, str], str] = {}
        self._auth: dict[tuple[str, str], str] = {}
        self._creds: dict[str, Credentials | None] = {}

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

    # -- endpoints and auth ------------------------------------------------------------------

    def _scheme(self, host: str) -> str:
        return "http" if host.lower() in self.insecure or _is_loopback(host) else "https"

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

    def _endpoint(self, ref: Reference) -> _Endpoint:
        if ref.registry == DOCKER_HUB and self.mirror:
            base, host, prefix = self.mirror
            repository = f"{prefix}/{ref.repository}" if prefix else ref.repository
        elif ref.registry == DOCKER_HUB:
            base, host, repository = f"https://{DOCKER_HUB_API}", DOCKER_HUB, ref.repository
        else:
            host = ref.registry.lower()
            base, repository = f"{self._scheme(host)}://{host}", ref.repository
        plain_ok = host in self.insecure or _is_loopback(host)
        return _Endpoint(base, host, repository, plain_ok)

    def _credentials(self, host: str) -> Credentials | None:
        with self._lock:
            if host not in self._creds:
                self._creds[host] = find_credentials(host, self.env)
            return self._creds[host]

    def _no_credentials_hint(self, host: str) -> str:
        return (
            f"set {host_env_name(host)}=user:password, or `docker login {host}` "
            "(an `auths` entry; credential helpers are not used)"
        )

    @contextlib.contextmanager
    def _request(
        self,
        ep: _Endpoint,
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
        key = (ep.base, ep.repository)
        fresh = False  # a credential obtained for this very request was already refused
        for attempt in range(3):
            headers = {"Accept": accept} if accept else {}
            headers.update(extra or {})
            with self._lock:
                auth = self._auth.get(key)
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
            challenges = parse_challenges(resp.headers.get("WWW-Authenticate", ""))
            detail = _error_text(resp)
            resp.close()
            fresh = self._authenticate(ep, challenges, stale=auth, detail=detail)
        try:
            if resp.status_code == 401:
                creds = self._credentials(ep.host)
                raise AuthError(
                    f"{ep.host} refused access to {ep.repository} ({_error_text(resp)}) "
                    + (
                        f"with the credentials from {creds.source}: check them and that the "
                        "account may pull this repository"
                        if creds
                        else "without credentials: the repository is private or does not "
                        f"exist; {self._no_credentials_hint(ep.host)}"
                    )
                )
            yield resp
        finally:
            resp.close()

    def _authenticate(
        self, ep: _Endpoint, challenges: Sequence[Challenge], stale: str | None, detail: str
    ) -> bool:
        """Set the Authorization for ep's repository as the challenge asks. True when it is
        newly obtained (a token just issued, credentials just read), False when another
        thread's newer token was taken from the cache."""
        by_scheme = {c.scheme: c for c in challenges}
        creds = self._credentials(ep.host)
        fresh = True
        if "bearer" in by_scheme:
            params = by_scheme["bearer"].params
            realm = params.get("realm", "")
            if not realm.startswith(("https://", "http://")):
                raise AuthError(f"{ep.host} sent a Bearer challenge without a usable realm")
            scope = params.get("scope") or f"repository:{ep.repository}:pull"
            token_key = (realm, params.get("service", ""), scope, creds.source if creds else "")
            with self._lock:
                cached = self._tokens.get(token_key)
            if cached and f"Bearer {cached}" != stale:
                header, fresh = f"Bearer {cached}", False
            else:
                token = self._token(ep, realm, params.get("service"), scope, creds)
                header = f"Bearer {token}"
                with self._lock:
                    self._tokens[token_key] = token
        elif "basic" in by_scheme:
            if creds is None:
                raise AuthError(
                    f"{ep.host} asks for a user name and password ({detail}); "
                    + self._no_credentials_hint(ep.host)
                )
            if ep.base.startswith("http://") and not ep.plain_ok:
                raise AuthError(
                    f"{ep.host} asks for a password over plain HTTP; it is not sent. "
                    "Use HTTPS, or declare the host insecure if it is on a trusted network"
                )
            header = creds.basic()
            if header == stale:
                raise AuthError(
                    f"{ep.host} refused the credentials from {creds.source} ({detail}); check them"
                )
        else:
            schemes = ", ".join(c.scheme for c in challenges) or "none"
            raise AuthError(
                f"{ep.host} answered 401 with authentication scheme(s) {schemes}; "
                "only Bearer (token) and Basic are supported"
            )
        with self._lock:
            self._auth[(ep.base, ep.repository)] = header
        return fresh

    def _token(
        self,
        ep: _Endpoint,
        realm: str,
        service: str | None,
        scope: str,
        creds: Credentials | None,
    ) -> str:
        params: list[tuple[str, str]] = []
        if service:
            params.append(("service", service))
        params.extend(("scope", s) for s in scope.split(" ") if s)
        headers = {}
        if creds is not None:
            realm_host = realm.split("://", 1)[1].split("/", 1)[0]
            if realm.startswith("http://") and not (
                _is_loopback(realm_host) or realm_host.lower() in self.insecure
            ):
                raise AuthError(
                    f"the token service of {ep.host} is at {realm}, plain HTTP; credentials "
                    "are not sent there. Ask the registry's operator for HTTPS"
                )
            headers["Authorization"] = creds.basic()
        try:
            resp = self.http.get(realm, params=params, headers=headers, timeout=TIMEOUT)
        except requests.RequestException as exc:
            raise AuthError(
                f"cannot reach the token service of {ep.host} at {realm}: "
                f"{short_reason(exc)}; check the network and proxy settings"
            ) from None
        with resp:
            if resp.status_code in (401, 403):
                if creds is None:
                    raise AuthError(
                        f"the token service of {ep.host} wants credentials for {scope}; "
                        + self._no_credentials_hint(ep.host)
                    )
                raise AuthError(
                    f"the token service of {ep.host} refused the credentials from "
                    f"{creds.source} (HTTP {resp.status_code}); check the user name and password"
                )
            if resp.status_code != 200:
                raise AuthError(
                    f"the token service of {ep.host} at {realm} answered HTTP {resp.status_code}"
                )
            try:
                data = resp.json()
            except ValueError:
                raise AuthError(f"the token service at {realm} did not answer JSON") from None
        token = data.get("token") or data.get("access_token")
        if not isinstance(token, str) or not token:
            raise AuthError(f"the token service at {realm} answered without a token")
        return token

    # -- manifests and blobs -----------------------------------------------------------------

    def _stored_size(self, digest: str) -> int:
        return self.store.path(digest.split(":", 1)[1]).stat().st_size

    def _manifest(
        self, ep: _Endpoint, ref: Reference, digest: str | None
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

    def _check(self, resp: requests.Response, ep: _Endpoint, where: str) -> None:
        if resp.status_code == 200:
            return
        if resp.status_code == 404:
            raise ImageNotFound(
                f"{where}: not found on {ep.host} ({_error_text(resp)}); check the name and tag"
            )
        raise RegistryError(
            f"{where}: {ep.host} answered HTTP {resp.status_code} ({_error_text(resp)})"
        )

    def _opener(self, ep: _Endpoint, path: str, *, accept: str | None = None) -> Opener:
        """How `fetch.download` asks this registry for `path`, authenticating as needed."""

        def opener(
            extra: Mapping[str, str], timeout: tuple[float, float]
        ) -> contextlib.AbstractContextManager[requests.Response]:
            return self._request(
                ep, "GET", path, accept=accept, extra=extra, timeout=timeout, retried=True
            )

        return opener

    def _blob(self, ep: _Endpoint, desc: Descriptor, what: str) -> Path:
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
