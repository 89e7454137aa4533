"""ModelScope: a model's revision resolved to a commit and its files' sizes and sha256, and the
files fetched by commit into the blob store.

Asked with the project's own requests code, on the paths and JSON shapes ModelScope's own client
uses (read from `modelscope_hub` 0.5.1, which `modelscope` 1.40's `HubApi` now delegates to:
`_legacy_api.py`, `_download.py`, `constants.py`):

- `GET <endpoint>/api/v1/models/<owner>/<name>/revisions`: `Data.RevisionMap.Branches` and
  `.Tags`, each `{"Revision": <name>, "CreatedAt": ...}`; a missing repository is a 404 (the
  client's `NotExistError`) or a body with `Success: false`.
- `GET <endpoint>/api/v1/models/<owner>/<name>/repo/files?Revision=<rev>&Recursive=True`:
  `Data.Files`, each with `Path`, `Type` (`blob`, or `tree` for a folder), `Size`, `Sha256`
  (of every file, LFS or not) and `IsLFS`; and `Data.LatestCommitter.Id`, the commit the revision
  points at. The client drops that commit (`list_repo_files` returns the files alone, and
  `get_valid_revision` a branch or tag name), and pinning the commit is the point of a lock: so
  the listing is read here, asked again at the commit, and the files recorded are that answer.
- `GET <endpoint>/api/v1/models/<owner>/<name>/repo?Revision=<commit>&FilePath=<path>`: the
  file's bytes (the client's `get_download_url`; ModelScope redirects LFS files to its object
  store), fetched through the project's one download routine (`core/downloads.py`): resumable,
  checked against the lock before a file gets its name, each sha256 stored once.

The endpoint is the `modelscope-endpoint` option, else the client's own variables
(`MODELSCOPE_ENDPOINT`, then the older `MODELSCOPE_DOMAIN`, a host name or URL), else
https://www.modelscope.cn. A token for a private model comes from `MODELSCOPE_API_TOKEN` (the
client's variable), sent as the client sends it (a Bearer header and the `m_session_id` cookie,
to the endpoint's host only).
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import requests

from gpustack_offline.core.downloads import BlobStore, Download, session
from gpustack_offline.core.models import Model
from gpustack_offline.stages.errors import HubError
from gpustack_offline.stages.model_locks import (
    ModelFile,
    ModelLock,
    Resolved,
    check_patterns,
    safe_path,
)

DEFAULT_ENDPOINT = "https://www.modelscope.cn"
ENDPOINT_ENVS = ("MODELSCOPE_ENDPOINT", "MODELSCOPE_DOMAIN")  # the client's, newest first
TOKEN_ENV = "MODELSCOPE_API_TOKEN"
OPTION = "modelscope_endpoint"  # the option naming the endpoint (`modelscope-endpoint`)
LOCK_NOTE = (
    "size and sha256: from ModelScope's file listing at that commit (it gives every file's",
    "sha256), checked again on every download. Review a change like code.",
)
# ModelScope's listing stops at this many entries, saying nothing (its client's
# REPO_FILES_TRUNCATION_LIMIT; the client then walks the tree folder by folder): a listing this
# long may be short of files, so it is refused rather than locked.
LISTING_CAP = 3000
_COMMIT = re.compile(r"[0-9a-f]{40}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TIMEOUT = (10.0, 60.0)
_FIX = "the modelscope-endpoint option / MODELSCOPE_ENDPOINT"


def endpoint(option: str, env: Mapping[str, str] | None = None) -> str:
    """ModelScope to ask: the option, else `$MODELSCOPE_ENDPOINT`, else `$MODELSCOPE_DOMAIN`
    (a bare host is https), else www.modelscope.cn (no trailing /)."""
    env = os.environ if env is None else env
    value = (option or next((env[k] for k in ENDPOINT_ENVS if env.get(k, "").strip()), "")).strip()
    if not value:
        return DEFAULT_ENDPOINT
    if not value.startswith(("http://", "https://")):
        value = f"https://{value}"
    return value.rstrip("/")


def api_url(base: str, repository: str, tail: str) -> str:
    return f"{base.rstrip('/')}/api/v1/models/{repository}/{tail}"


def file_url(base: str, repository: str, commit: str, path: str) -> str:
    """Where ModelScope serves a file of the repository at a commit (quoted as its client
    quotes it)."""
    query = urllib.parse.urlencode({"Revision": commit, "FilePath": path})
    return f"{api_url(base, repository, 'repo')}?{query}"


def home(repository: str) -> str:
    """The repository's public page (the catalog's `home`)."""
    return f"{DEFAULT_ENDPOINT}/models/{repository}"


def web_url(repository: str, commit: str) -> str:
    """The repository's files on the public site (the SBOM's website; its pages take no
    commit, the SBOM's purl and properties name it)."""
    return f"{DEFAULT_ENDPOINT}/models/{repository}/files"


def ms_session(env: Mapping[str, str] | None = None, base: str = "") -> requests.Session:
    """The download session, with the token when one is configured (private models)."""
    env = os.environ if env is None else env
    http = session()
    token = env.get(TOKEN_ENV, "").strip()
    if token:
        http.headers["Authorization"] = f"Bearer {token}"
        host = urllib.parse.urlsplit(base).hostname
        if host:
            http.cookies.set("m_session_id", token, domain=host, path="/")
    return http


def resolve(
    model: Model,
    base: str,
    store: BlobStore,
    previous: ModelLock | None = None,
) -> Resolved:
    """The model's revision as a commit, and every file its patterns match with size and
    sha256 from ModelScope's listing at that commit. A file the listing gives no sha256 for is
    fetched into `store` and hashed. (`previous` is the lock being refreshed: unused, every
    sha256 comes from the listing.)"""
    del previous
    http = ms_session(base=base)
    what = f"model {model.name}: {model.repository}"
    try:
        revisions = _ask(http, api_url(base, model.repository, "revisions"), None, what, base)
    except _Missing as miss:
        raise HubError(
            f"{what}: {base} has no such repository ({miss}; or it is private: set "
            f"{TOKEN_ENV}). Fix: check repository in models.toml (ModelScope's OWNER/NAME), or "
            f"{_FIX}"
        ) from None
    branches, tags = _revision_names(revisions)
    if model.revision not in branches + tags and not _COMMIT.fullmatch(model.revision):
        raise HubError(
            f"{what}: {base} has no revision {model.revision!r} (branches: "
            f"{', '.join(branches) or 'none'}; tags: {', '.join(tags) or 'none'}). Fix: give a "
            "branch, tag or commit of the repository as revision in models.toml (ModelScope's "
            "default branch is master)"
        )
    commit, entries = _listing(http, model, base, model.revision, what)
    pinned = commit
    if commit != model.revision:  # the files at the commit, not at whatever the branch is now
        pinned, entries = _listing(http, model, base, commit, what)
    if pinned != commit:
        raise HubError(
            f"{what}: {base} named commit {commit} for {model.revision!r}, and {pinned or 'none'} "
            "when asked for the files at that commit; is it ModelScope or a mirror of it?"
        )
    blobs = [e for e in entries if (e.get("Type") or "blob") != "tree"]
    names = sorted(str(e.get("Path") or e.get("Name") or "") for e in blobs)
    where = f"{model.repository}@{commit}"
    check_patterns(model, names, f"{model.repository}@{commit[:12]}")
    files = []
    for entry in sorted(blobs, key=lambda e: str(e.get("Path") or e.get("Name") or "")):
        path = str(entry.get("Path") or entry.get("Name") or "")
        if not model.matches(path):
            continue
        safe_path(path, where)
        files.append(_file(model, base, commit, path, entry, store, http))
    model.entry(f.path for f in files)  # a llama-box model with no GGUF, or several: now
    return Resolved(commit, tuple(files))


def _file(
    model: Model,
    base: str,
    commit: str,
    path: str,
    entry: Mapping[str, Any],
    store: BlobStore,
    http: requests.Session,
) -> ModelFile:
    size = entry.get("Size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise HubError(
            f"model {model.name}: {base} gave no size for {path} ({size!r}); is it ModelScope "
            "or a mirror of it?"
        )
    lfs = bool(entry.get("IsLFS"))
    sha256 = str(entry.get("Sha256") or "").lower()
    if _HEX64.fullmatch(sha256):
        return ModelFile(path, size, sha256, lfs=lfs)
    url = file_url(base, model.repository, commit, path)
    sha256 = store.download(url, http=http, size=size, what=f"{model.repository}: {path}")
    return ModelFile(path, size, sha256, lfs=lfs)


def _revision_names(data: Any) -> tuple[list[str], list[str]]:
    """The branch and tag names of a revisions answer (`Data.RevisionMap`; a bare list, which
    its client also accepts, is taken as branches)."""
    found: dict[str, list[str]] = {"Branches": [], "Tags": []}
    if isinstance(data, list):
        data = {"RevisionMap": {"Branches": data}}
    table = data.get("RevisionMap") if isinstance(data, dict) else None
    for kind in found:
        for item in (table or {}).get(kind) or []:
            if isinstance(item, dict) and item.get("Revision"):
                found[kind].append(str(item["Revision"]))
    return found["Branches"], found["Tags"]


def _listing(
    http: requests.Session, model: Model, base: str, revision: str, what: str
) -> tuple[str, list[dict[str, Any]]]:
    """The commit a revision points at (`LatestCommitter.Id`) and its files, recursively."""
    url = api_url(base, model.repository, "repo/files")
    try:
        data = _ask(http, url, {"Revision": revision, "Recursive": "True"}, what, base)
    except _Missing as miss:
        raise HubError(
            f"{what}: {base} has no revision {revision!r} (its file listing: {miss}). Fix: give "
            "a branch, tag or commit of the repository as revision in models.toml"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("Files"), list):
        raise HubError(
            f"{what}: {base} answered its file listing without Data.Files; is it ModelScope or "
            f"a mirror of it? Check {_FIX}"
        )
    latest = data.get("LatestCommitter")
    commit = str(latest.get("Id") or "") if isinstance(latest, dict) else ""
    if not _COMMIT.fullmatch(commit):
        raise HubError(
            f"{what}: {base} named no commit for {revision!r} (LatestCommitter.Id "
            f"{commit!r}); is it ModelScope or a mirror of it? Check {_FIX}"
        )
    entries = [e for e in data["Files"] if isinstance(e, dict)]
    if len(entries) >= LISTING_CAP:
        raise HubError(
            f"{what}: {base} listed {len(entries)} entries at {revision!r}, ModelScope's cap on "
            "one listing, so the list may be incomplete; a repository this large is not "
            "supported. Fix: lock a smaller repository (one quantisation's own), or the same "
            "model from huggingface"
        )
    return commit, entries


class _Missing(Exception):
    """ModelScope has no such thing: a 404, or a body with `Success: false` (the API answers
    some misses so); the message is its own."""


def _ask(
    http: requests.Session, url: str, params: Mapping[str, str] | None, what: str, base: str
) -> Any:
    """ModelScope's `Data` for a GET; `_Missing` when it has no such thing; any other failure
    is a `HubError`."""
    try:
        resp = http.get(url, params=params, timeout=_TIMEOUT)
    except requests.RequestException as exc:
        raise HubError(
            f"{what}: cannot ask {base} ({type(exc).__name__}: {str(exc)[:200]}). Check the "
            f"network, the proxy settings and {_FIX}, then rerun"
        ) from None
    if resp.status_code == 404:
        raise _Missing(f"HTTP 404: {_message(resp)}")
    if resp.status_code in (401, 403):
        raise HubError(
            f"{what}: {base} refused it (HTTP {resp.status_code}): a private model needs "
            f"{TOKEN_ENV} (an access token of an account that may read it); set it and rerun"
        )
    if resp.status_code >= 400:
        raise HubError(
            f"{what}: {base} answered HTTP {resp.status_code}. Check {_FIX} and the network, "
            "then rerun"
        )
    try:
        body = resp.json()
    except ValueError:
        raise HubError(
            f"{what}: {base} answered {urllib.parse.urlsplit(url).path} with something other "
            f"than JSON; is it ModelScope or a mirror of it? Check {_FIX}"
        ) from None
    if not isinstance(body, dict):
        raise HubError(f"{what}: {base} answered a JSON {type(body).__name__}, not an object")
    if body.get("Success") is False or body.get("Code") not in (None, 200):
        raise _Missing(f"Code {body.get('Code')}: {str(body.get('Message') or '')[:200]}")
    return body.get("Data", body)


def _message(resp: requests.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text.strip()[:200] or "no body"
    message = body.get("Message") if isinstance(body, dict) else None
    return str(message or body)[:200]


def fetch(
    store: BlobStore, lock: ModelLock, base: str, jobs: int = 4, show: bool = True
) -> dict[str, Path]:
    """Every file of the lock in the blob store, checked against its sha256: path -> blob."""
    items = [
        Download(file_url(base, lock.repository, lock.commit, f.path), f.sha256, f.size,
                 f"{lock.name}: {f.path}")
        for f in lock.files
    ]  # fmt: skip
    paths = store.fetch_all(items, jobs, show, http=ms_session(base=base))
    return {f.path: p for f, p in zip(lock.files, paths, strict=True)}
