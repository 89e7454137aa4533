"""The Hugging Face hub: a model's revision resolved to a commit and its files' sizes and sha256,
and the files fetched by commit into the blob store.

The question goes through the hub's own client (`huggingface_hub.HfApi.model_info` with
`files_metadata=True`: the commit, and per file its size and, for Git LFS files, the sha256),
pointed at an endpoint: the `hf-endpoint` option, else `HF_ENDPOINT` (the variable the client
itself reads), else huggingface.co, so a site mirror or a test stand-in answers instead. A file
outside Git LFS (config, tokenizer: small) has no sha256 in that answer: it is fetched at lock
time, hashed, and its bytes checked against the git blob id the hub names.

The bytes come through the project's one download routine (`core/downloads.py`), by commit,
from `<endpoint>/<repository>/resolve/<commit>/<path>` (the path the client downloads from):
resumable, checked against the lock before a file gets its name, each sha256 stored once for
every model and build. A token (`HF_TOKEN`, or the client's login) is sent to the endpoint for
gated models; requests drops it when the hub redirects to its CDN on another host.
"""

from __future__ import annotations

import hashlib
import os
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import requests

from gpustack_offline.core.downloads import BlobStore, Download, session
from gpustack_offline.core.errors import IntegrityError
from gpustack_offline.core.models import Model
from gpustack_offline.stages.errors import HubError
from gpustack_offline.stages.model_locks import (
    HF_NOTE,
    ModelFile,
    ModelLock,
    Resolved,
    check_patterns,
    safe_path,
)

DEFAULT_ENDPOINT = "https://huggingface.co"
ENDPOINT_ENV = "HF_ENDPOINT"
OPTION = "hf_endpoint"  # the option naming the endpoint (`hf-endpoint`)
LOCK_NOTE = HF_NOTE


def endpoint(option: str, env: Mapping[str, str] | None = None) -> str:
    """The hub to ask: the option, else `$HF_ENDPOINT`, else huggingface.co (no trailing /)."""
    env = os.environ if env is None else env
    return (option or env.get(ENDPOINT_ENV, "") or DEFAULT_ENDPOINT).rstrip("/")


def file_url(base: str, repository: str, commit: str, path: str) -> str:
    return f"{base.rstrip('/')}/{repository}/resolve/{commit}/{urllib.parse.quote(path)}"


def home(repository: str) -> str:
    """The repository's public page (the catalog's `home`)."""
    return f"{DEFAULT_ENDPOINT}/{repository}"


def web_url(repository: str, commit: str) -> str:
    """The repository's files at the commit, on the public hub (the SBOM's website)."""
    return f"{DEFAULT_ENDPOINT}/{repository}/tree/{commit}"


def hub_session() -> requests.Session:
    """The download session, with the hub token when one is configured (gated models)."""
    from huggingface_hub import get_token

    http = session()
    token = get_token()
    if token:
        http.headers["Authorization"] = f"Bearer {token}"
    return http


def git_blob_id(path: Path) -> str:
    """The git object id of a file's bytes (`git hash-object`): what the hub names it by."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode(), usedforsecurity=False)
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def resolve(
    model: Model,
    base: str,
    store: BlobStore,
    previous: ModelLock | None = None,
) -> Resolved:
    """The model's revision as a commit, and every file its patterns match with size and
    sha256. Files outside LFS are fetched into `store` to be hashed, unless `previous` (the
    lock being refreshed) already has the same git blob stored."""
    info = _model_info(model, base)
    commit = str(getattr(info, "sha", "") or "")
    if len(commit) != 40:
        raise HubError(
            f"model {model.name}: {base} named no commit for {model.repository} at "
            f"{model.revision!r} (sha {commit!r}); is it a Hugging Face hub or mirror?"
        )
    siblings = list(getattr(info, "siblings", None) or [])
    names = sorted(str(s.rfilename) for s in siblings)
    check_patterns(model, names, f"{model.repository}@{commit[:12]}")
    known = {f.blob_id: f for f in previous.files if f.blob_id} if previous else {}
    http = hub_session()
    files = []
    where = f"{model.repository}@{commit}"
    for sibling in sorted(siblings, key=lambda s: str(s.rfilename)):
        path = str(sibling.rfilename)
        if not model.matches(path):
            continue
        safe_path(path, where)
        files.append(_file(model, base, commit, sibling, store, http, known))
    model.entry(f.path for f in files)  # a llama-box model with no GGUF, or several: now
    return Resolved(commit, tuple(files))


def _file(
    model: Model,
    base: str,
    commit: str,
    sibling: Any,
    store: BlobStore,
    http: requests.Session,
    known: Mapping[str, ModelFile],
) -> ModelFile:
    path, blob_id = str(sibling.rfilename), str(sibling.blob_id or "")
    lfs = sibling.lfs
    if lfs is not None:
        return ModelFile(path, int(lfs.size), str(lfs.sha256), lfs=True, blob_id=blob_id)
    if sibling.size is None:
        raise HubError(
            f"model {model.name}: {base} gave no size for {path}: it answered without files "
            "metadata (blobs=true); is it a Hugging Face hub or mirror?"
        )
    size = int(sibling.size)
    before = known.get(blob_id)
    if before is not None and before.size == size and store.has(before.sha256):
        return ModelFile(path, size, before.sha256, lfs=False, blob_id=blob_id)
    url = file_url(base, model.repository, commit, path)
    sha256 = store.download(url, http=http, size=size, what=f"{model.repository}: {path}")
    if blob_id and git_blob_id(store.path(sha256)) != blob_id:
        raise IntegrityError(
            f"model {model.name}: {url} sent bytes whose git blob id is not the {blob_id} the "
            f"hub's API names for {path}; a mirror or proxy on the way altered it. Check it "
            "and rerun"
        )
    return ModelFile(path, size, sha256, lfs=False, blob_id=blob_id)


def _model_info(model: Model, base: str) -> Any:
    # imported here: the client costs an import that listing cells need not pay
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"model {model.name}: {model.repository}"
    try:
        return HfApi(endpoint=base).model_info(
            model.repository, revision=model.revision, files_metadata=True
        )
    except GatedRepoError:
        raise HubError(
            f"{what} is gated on {base}: accept its terms there with your account, then set "
            "HF_TOKEN (or `hf auth login`) and rerun"
        ) from None
    except RepositoryNotFoundError:
        raise HubError(
            f"{what}: {base} has no such repository (or it is private: set HF_TOKEN). Fix: "
            "check repository in models.toml, or the hf-endpoint option / HF_ENDPOINT"
        ) from None
    except RevisionNotFoundError:
        raise HubError(
            f"{what}: {base} has no revision {model.revision!r}. Fix: give a branch, tag or "
            "commit of the repository as revision in models.toml"
        ) from None
    except OfflineModeIsEnabled:
        raise HubError(
            f"{what}: HF_HUB_OFFLINE is set, and locking a model asks the hub; unset it"
        ) from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise HubError(
            f"{what}: {base} answered HTTP {status} for its model info. Check the "
            "hf-endpoint option / HF_ENDPOINT and the network, then rerun"
        ) from None
    except Exception as exc:  # the client's transport errors (its HTTP library's own types)
        raise HubError(
            f"{what}: cannot ask {base} ({type(exc).__name__}: {str(exc)[:200]}). Check the "
            "network, the proxy settings and the hf-endpoint option / HF_ENDPOINT, then rerun"
        ) from None


def fetch(
    store: BlobStore, lock: ModelLock, base: str, jobs: int = 4, show: bool = True
) -> dict[str, Path]:
    """Every file of the lock in the blob store, checked against its sha256: path -> blob."""
    items = [
        Download(file_url(base, lock.repository, lock.commit, f.path), f.sha256, f.size,
                 f"{lock.name}: {f.path}")
        for f in lock.files
    ]  # fmt: skip
    paths = store.fetch_all(items, jobs, show, http=hub_session())
    return {f.path: p for f, p in zip(lock.files, paths, strict=True)}
