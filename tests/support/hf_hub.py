"""A loopback stand-in for the Hugging Face hub, as `huggingface_hub` and a download see it.

Two paths, with the real hub's shapes (huggingface_hub's `HfApi.model_info` and `hf_hub_url`):

- `GET /api/models/{owner}/{name}[/revision/{rev}]` (`?blobs=true` for files metadata): the
  model's JSON with `sha` (the commit the revision points at) and `siblings`, each with
  `rfilename`, and with blobs `blobId` (the git object id), `size` and, for Git LFS files, `lfs`
  (`sha256`, `size`, `pointerSize`). A missing repository or revision is a 404 with the hub's
  `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`), which the client turns into its errors.
- `GET|HEAD /{owner}/{name}/resolve/{rev}/{path}`: the file's bytes, with `X-Repo-Commit`, an
  `ETag` (the sha256 for LFS files, the git blob id otherwise), `Accept-Ranges: bytes`, and
  single ranges (`bytes=N-`, `bytes=N-M`) answered 206 with `Content-Range`.

Every request is recorded (method, path, Range), so tests can count what was fetched. Files are
bytes the tests make: a tiny GGUF written with the `gguf` package and a small safetensors file
(its format written by hand: an 8-byte header length, a JSON header, the data).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import struct
import tempfile
import threading
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from support.loopback import FileHandler, LoopbackServer, Served

_API = re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?")
_RESOLVE = re.compile(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data, usedforsecurity=False).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    sha = hashlib.sha256(data).hexdigest()
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()
    )


def default_lfs(path: str) -> bool:
    """What a hub repository keeps in Git LFS: its .gitattributes puts weights there."""
    return path.endswith((".gguf", ".safetensors", ".bin"))


@dataclass
class Repo:
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    lfs: Callable[[str], bool] = default_lfs


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    range: str | None
    authorization: str | None = None  # the header as sent (a gated model's token)


class HubStandIn(Served):
    """`with HubStandIn() as hub:`; `hub.add(...)` publishes files, `hub.url` is the endpoint."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self._seen: list[Seen] = []
        self._lock = threading.Lock()

    def add(
        self,
        repository: str,
        files: Mapping[str, bytes],
        revision: str = "main",
        lfs: Callable[[str], bool] = default_lfs,
    ) -> str:
        """Publish `files` as a new commit of `repository`, pointed at by `revision`; the
        commit id (40 hex, from the contents, so the same files give the same commit)."""
        repo = self.repos.setdefault(repository, Repo(lfs=lfs))
        listing = json.dumps(
            [repository, sorted((p, hashlib.sha256(d).hexdigest()) for p, d in files.items())]
        )
        commit = hashlib.sha1(listing.encode(), usedforsecurity=False).hexdigest()
        repo.commits[commit] = dict(files)
        repo.refs[revision] = commit
        return commit

    def requests(self, fragment: str = "", method: str = "GET") -> list[Seen]:
        with self._lock:
            return [s for s in self._seen if fragment in s.path and s.method == method]

    def downloads(self, path_end: str) -> list[Seen]:
        """GETs of a resolve URL whose file path ends with `path_end`."""
        return [s for s in self.requests("/resolve/") if s.path.endswith(path_end)]

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self._seen.append(seen)

    server_name = "hf-hub"

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        return _Handler

    @property
    def url(self) -> str:
        return self.served_url

    # -- answers -------------------------------------------------------------------------------

    def commit_of(self, repository: str, rev: str) -> str | None:
        repo = self.repos.get(repository)
        if repo is None:
            return None
        if rev in repo.commits:
            return rev
        return repo.refs.get(rev)

    def model_json(self, repository: str, commit: str, blobs: bool) -> dict[str, object]:
        repo = self.repos[repository]
        siblings: list[dict[str, object]] = []
        for path, data in sorted(repo.commits[commit].items()):
            sibling: dict[str, object] = {"rfilename": path}
            if blobs:
                if repo.lfs(path):
                    pointer = lfs_pointer(data)
                    sibling.update(
                        blobId=git_blob_id(pointer),
                        size=len(data),
                        lfs={"sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                             "pointerSize": len(pointer)},
                    )  # fmt: skip
                else:
                    sibling.update(blobId=git_blob_id(data), size=len(data))
            siblings.append(sibling)
        owner = repository.split("/", 1)[0]
        return {
            "_id": hashlib.md5(repository.encode(), usedforsecurity=False).hexdigest()[:24],
            "id": repository,
            "modelId": repository,
            "author": owner,
            "sha": commit,
            "lastModified": "2025-01-01T00:00:00.000Z",
            "createdAt": "2025-01-01T00:00:00.000Z",
            "private": False,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": ["gguf"] if any(p.endswith(".gguf") for p in repo.commits[commit]) else [],
            "siblings": siblings,
            "spaces": [],
            "usedStorage": sum(len(d) for d in repo.commits[commit].values()),
        }


class _Handler(FileHandler):
    def handle_request(self) -> None:
        hub = cast("LoopbackServer[HubStandIn]", self.server).owner
        url = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(url.path)
        hub._record(
            Seen(self.command, path, self.headers.get("Range"), self.headers.get("Authorization"))
        )
        if match := _API.fullmatch(path):
            self._api(hub, match["repo"], match["rev"] or "main", "blobs=true" in url.query)
        elif match := _RESOLVE.fullmatch(path):
            self._resolve(hub, match["repo"], match["rev"], match["path"])
        else:
            self.send(404, {"X-Error-Code": "EntryNotFound"}, b'{"error":"not found"}')

    def _api(self, hub: HubStandIn, repository: str, rev: str, blobs: bool) -> None:
        if repository not in hub.repos:
            self._error(404, "RepoNotFound", "Repository not found")
            return
        commit = hub.commit_of(repository, rev)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return
        body = json.dumps(hub.model_json(repository, commit, blobs)).encode()
        self.send(200, {"Content-Type": "application/json"}, body)

    def _resolve(self, hub: HubStandIn, repository: str, rev: str, path: str) -> None:
        commit = hub.commit_of(repository, rev)
        if commit is None:
            self._error(404, "RepoNotFound" if repository not in hub.repos else
                        "RevisionNotFound", "not found")  # fmt: skip
            return
        data = hub.repos[repository].commits[commit].get(path)
        if data is None:
            self._error(404, "EntryNotFound", f"{path} not found")
            return
        lfs = hub.repos[repository].lfs(path)
        etag = hashlib.sha256(data).hexdigest() if lfs else git_blob_id(data)
        self.send_file(data, {"X-Repo-Commit": commit, "ETag": f'"{etag}"'})

    def _error(self, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self.send(status, {"Content-Type": "application/json", "X-Error-Code": code}, body)


# -- tiny model files --------------------------------------------------------------------------


def tiny_gguf(seed: int = 0, values: int = 64 * 1024) -> bytes:
    """A real GGUF file (gguf's writer): a llama architecture header and one float32 tensor of
    `values` numbers derived from `seed`, so two seeds give two different files."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="tiny-gguf-") as tmp:
        path = Path(tmp) / "model.gguf"
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_name(f"tiny-{seed}")
        writer.add_block_count(1)
        writer.add_context_length(64)
        writer.add_tensor("token_embd.weight", rng.standard_normal(values).astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()


def tiny_safetensors(values: int = 16 * 1024) -> bytes:
    """A safetensors file with one float32 tensor: header length (u64 LE), JSON header padded
    to 8 bytes, data."""
    data = struct.pack(f"<{values}f", *(float(i % 97) for i in range(values)))
    header = json.dumps(
        {"__metadata__": {"format": "pt"},
         "weight": {"dtype": "F32", "shape": [values], "data_offsets": [0, len(data)]}},
        separators=(",", ":"),
    ).encode()  # fmt: skip
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + data
