"""Registry authentication: whose credentials, and which Authorization header a request carries.

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

The `Registry` (registry.py) uses one `RegistryAuth`: `header(ep)` is the Authorization to send
(None before any 401), `answer(ep, www_authenticate, stale, detail)` obtains a new one after a
401 (a token from the realm, renewed when the one sent was refused), and `refused(ep, detail)`
is the error for a 401 that stays.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import logging
import os
import re
import threading
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import requests

from gpustack_offline.core.downloads import short_reason
from gpustack_offline.stages.errors import AuthError

log = logging.getLogger("gpustack_offline")

DOCKER_HUB = "docker.io"
HUB_ALIASES = frozenset(
    {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
)
AUTH_ENV_PREFIX = "GPUSTACK_OFFLINE_REGISTRY_AUTH_"
TIMEOUT = (15, 120)

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
    return DOCKER_HUB if host in HUB_ALIASES else host


def docker_config_path(env: Mapping[str, str]) -> Path:
    configured = env.get("DOCKER_CONFIG")
    base = Path(configured).expanduser() if configured else Path(env.get("HOME", "~")) / ".docker"
    return base.expanduser() / "config.json"


def find_credentials(host: str, env: Mapping[str, str] | None = None) -> Credentials | None:
    """Credentials for a registry host from the environment or the Docker config, or None."""
    env = os.environ if env is None else env
    host = DOCKER_HUB if host.lower() in HUB_ALIASES else host.lower()
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


# --- the client's side -------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
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
class Endpoint:
    """Where one repository's requests go, and what may be sent there."""

    base: str  # https://registry-1.docker.io
    host: str  # the host credentials are looked up for
    repository: str  # the repository's path on that registry (a mirror's prefix included)
    plain_ok: bool  # credentials may go over plain HTTP (loopback or declared insecure)


def no_credentials_hint(host: str) -> str:
    return (
        f"set {host_env_name(host)}=user:password, or `docker login {host}` "
        "(an `auths` entry; credential helpers are not used)"
    )


class RegistryAuth:
    """Credentials per host (looked up once) and the Authorization per repository, shared by the
    threads of one `Registry`. `env` is where credentials and the Docker config location are
    looked up; `insecure` names hosts that may get credentials over plain HTTP."""

    def __init__(
        self, http: requests.Session, env: Mapping[str, str], insecure: Collection[str] = ()
    ) -> None:
        self.http = http
        self.env = env
        self.insecure = frozenset(h.lower() for h in insecure)
        self._lock = threading.Lock()
        self._tokens: dict[tuple[str, str, str, str], str] = {}
        self._auth: dict[tuple[str, str], str] = {}
        self._creds: dict[str, Credentials | None] = {}

    def credentials(self, host: str) -> Credentials | None:
        with self._lock:
            if host not in self._creds:
                self._creds[host] = find_credentials(host, self.env)
            return self._creds[host]

    def header(self, ep: Endpoint) -> str | None:
        """The Authorization to send to ep's repository, None while none is needed."""
        with self._lock:
            return self._auth.get((ep.base, ep.repository))

    def refused(self, ep: Endpoint, detail: str) -> AuthError:
        """The error for a 401 that another credential would not change."""
        creds = self.credentials(ep.host)
        return AuthError(
            f"{ep.host} refused access to {ep.repository} ({detail}) "
            + (
                f"with the credentials from {creds.source}: check them and that the "
                "account may pull this repository"
                if creds
                else "without credentials: the repository is private or does not "
                f"exist; {no_credentials_hint(ep.host)}"
            )
        )

    def answer(
        self, ep: Endpoint, challenges: Sequence[Challenge] | str, stale: str | None, detail: str
    ) -> bool:
        """Set the Authorization for ep's repository as the challenges of a 401 ask (`stale`:
        the Authorization that was refused, `detail`: the registry's words). True when it is
        newly obtained (a token just issued, credentials just read), False when another
        thread's newer token was taken from the cache."""
        if isinstance(challenges, str):  # the WWW-Authenticate value itself
            challenges = parse_challenges(challenges)
        by_scheme = {c.scheme: c for c in challenges}
        creds = self.credentials(ep.host)
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
                    + no_credentials_hint(ep.host)
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
        ep: Endpoint,
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
                is_loopback(realm_host) or realm_host.lower() in self.insecure
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
                        + no_credentials_hint(ep.host)
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
