"""A loopback stand-in for ModelScope's API, as its own client and a download see it.

The paths and JSON shapes are those of ModelScope's client (`modelscope_hub` 0.5.1, which the
`modelscope` package's `HubApi` delegates to: `_legacy_api.py` `list_revisions`,
`list_repo_files`, `get_download_url`; `_download.py` reads `Path`, `Type`, `Size`, `Sha256`):

- `GET /api/v1/models/{owner}/{name}/revisions`: `{"Code": 200, "Data": {"RevisionMap":
  {"Branches": [...], "Tags": [...]}}, "Message": "success", "RequestId": ..., "Success":
  true}`, each revision `{"Revision": <name>, "CreatedAt": <epoch seconds>, ...}`.
- `GET /api/v1/models/{owner}/{name}/repo/files?Revision=<rev>&Recursive=True`: `Data.Files`,
  one entry per file and folder (`Type` `blob` or `tree`) with `Name`, `Path`, `Size`, `Sha256`,
  `IsLFS`, `Mode`, `Revision`, `CommitMessage`, `CommittedDate`, `CommitterName`, `InCheck`; and
  `Data.LatestCommitter` (`Id`: the commit the revision points at, `ShortId`, `Title`, ...).
  A repository carries a `.gitattributes`, as every ModelScope repository does.
- `GET|HEAD /api/v1/models/{owner}/{name}/repo?Revision=<rev>&FilePath=<path>`: the file's
  bytes; an LFS file is redirected (302) to `/oss/<sha256>` on the same server, as ModelScope
  redirects to its object store. Both answer single ranges (`bytes=N-`, `bytes=N-M`) with 206.

A missing repository or revision is a 404 with a JSON body `{"Code": 404, "Message": ...,
"Success": false}` (the client maps a 404 to its `NotExistError` by the status alone; the real
API's business codes for a miss were not observed from this host, which cannot reach
modelscope.cn). Every request is recorded (method, path, query, Range, Authorization). The
files are the tests' own (support/hf_hub.py makes a tiny GGUF and a small safetensors file).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import cast

from support.hf_hub import default_lfs
from support.loopback import FileHandler, LoopbackServer, Served

_MODEL = re.compile(r"/api/v1/models/(?P<repo>[^/]+/[^/]+)/(?P<tail>revisions|repo/files|repo)")
_OSS = re.compile(r"/oss/(?P<sha>[0-9a-f]{64})")
GITATTRIBUTES = b"*.gguf filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"  # noqa: E501
EPOCH = 1735689600  # 2025-01-01, every commit's date


@dataclass
class MsRepo:
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit
    tags: dict[str, str] = field(default_factory=dict)  # tag -> commit
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    lfs: Callable[[str], bool] = default_lfs


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    query: dict[str, str]
    range: str | None
    authorization: str | None = None


class ModelScopeStandIn(Served):
    """`with ModelScopeStandIn() as ms:`; `ms.add(...)` publishes files, `ms.url` is the
    endpoint. Paths in `without_sha256` are listed with an empty `Sha256`."""

    def __init__(self) -> None:
        self.repos: dict[str, MsRepo] = {}
        self.without_sha256: set[str] = set()
        self._seen: list[Seen] = []
        self._lock = threading.Lock()
        self._blobs: dict[str, bytes] = {}

    def add(
        self,
        repository: str,
        files: Mapping[str, bytes],
        revision: str = "master",
        tag: bool = False,
        lfs: Callable[[str], bool] = default_lfs,
    ) -> str:
        """Publish `files` (and a `.gitattributes`) as a new commit of `repository`, pointed at
        by the branch (or tag) `revision`; the commit id (40 hex, from the contents)."""
        repo = self.repos.setdefault(repository, MsRepo(lfs=lfs))
        content = {".gitattributes": GITATTRIBUTES, **files}
        listing = json.dumps(
            ["modelscope", repository,
             sorted((p, hashlib.sha256(d).hexdigest()) for p, d in content.items())]
        )  # fmt: skip
        commit = hashlib.sha1(listing.encode(), usedforsecurity=False).hexdigest()
        repo.commits[commit] = content
        (repo.tags if tag else repo.branches)[revision] = commit
        for data in content.values():
            self._blobs[hashlib.sha256(data).hexdigest()] = data
        return commit

    def commit_of(self, repository: str, rev: str) -> str | None:
        repo = self.repos.get(repository)
        if repo is None:
            return None
        if rev in repo.commits:
            return rev
        return repo.branches.get(rev) or repo.tags.get(rev)

    def requests(self, fragment: str = "", method: str = "GET") -> list[Seen]:
        with self._lock:
            return [s for s in self._seen if fragment in s.path and s.method == method]

    def downloads(self, file_path: str) -> list[Seen]:
        """GETs of the download path for `file_path`."""
        return [s for s in self.requests("/repo") if s.query.get("FilePath") == file_path
                and s.path.endswith("/repo")]  # fmt: skip

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self._seen.append(seen)

    server_name = "modelscope"

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        return _Handler

    @property
    def url(self) -> str:
        return self.served_url

    # -- answers -------------------------------------------------------------------------------

    def revisions_json(self, repository: str) -> dict[str, object]:
        repo = self.repos[repository]

        def one(name: str, commit: str) -> dict[str, object]:
            return {"Revision": name, "CreatedAt": EPOCH, "CreatorId": 1, "Message": "",
                    "Id": 0, "ShortId": commit[:8]}  # fmt: skip

        return {
            "RevisionMap": {
                "Branches": [one(n, c) for n, c in sorted(repo.branches.items())],
                "Tags": [one(n, c) for n, c in sorted(repo.tags.items())],
            }
        }

    def files_json(self, repository: str, commit: str, recursive: bool) -> dict[str, object]:
        repo = self.repos[repository]
        content = repo.commits[commit]
        folders = {"/".join(p.split("/")[:i]) for p in content for i in range(1, p.count("/") + 1)}
        entries: list[dict[str, object]] = []
        for path in sorted(folders):
            if recursive or "/" not in path:
                entries.append(self._entry(path, commit, tree=True))
        for path, data in sorted(content.items()):
            if recursive or "/" not in path:
                entry = self._entry(path, commit)
                sha = "" if path in self.without_sha256 else hashlib.sha256(data).hexdigest()
                entry.update(Size=len(data), Sha256=sha, IsLFS=repo.lfs(path))
                entries.append(entry)
        latest = {
            "AuthorEmail": "tests@example.invalid", "AuthorName": "tests",
            "AuthoredDate": EPOCH, "CommittedDate": EPOCH,
            "CommitterEmail": "tests@example.invalid", "CommitterName": "tests",
            "CreatedAt": EPOCH, "Id": commit, "Message": "upload", "ShortId": commit[:8],
            "Title": "upload",
        }  # fmt: skip
        return {"Files": entries, "IsVisual": 0, "LatestCommitter": latest}

    @staticmethod
    def _entry(path: str, commit: str, tree: bool = False) -> dict[str, object]:
        return {
            "CommitMessage": "upload", "CommittedDate": EPOCH, "CommitterName": "tests",
            "InCheck": False, "IsLFS": False, "Mode": "16384" if tree else "33188",
            "Name": path.rsplit("/", 1)[-1], "Path": path, "Revision": commit,
            "Sha256": "", "Size": 0, "Type": "tree" if tree else "blob",
        }  # fmt: skip


class _Handler(FileHandler):
    def handle_request(self) -> None:
        ms = cast("LoopbackServer[ModelScopeStandIn]", self.server).owner
        url = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(url.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        ms._record(Seen(self.command, path, query, self.headers.get("Range"),
                        self.headers.get("Authorization")))  # fmt: skip
        if match := _OSS.fullmatch(path):
            data = ms._blobs.get(match["sha"])
            if data is None:
                self.send(404, {"Content-Type": "application/xml"}, b"<Error>NoSuchKey</Error>")
            else:
                self._bytes(data, match["sha"])
            return
        match = _MODEL.fullmatch(path)
        if match is None:
            self._miss(f"no such path: {path}")
            return
        repository, tail = match["repo"], match["tail"]
        if repository not in ms.repos:
            self._miss(f"model {repository} not found")
            return
        if tail == "revisions":
            self._ok(ms.revisions_json(repository))
            return
        rev = query.get("Revision", "master")
        commit = ms.commit_of(repository, rev)
        if commit is None:
            self._miss(f"revision {rev} not found")
            return
        if tail == "repo/files":
            recursive = query.get("Recursive", "False").lower() == "true"
            self._ok(ms.files_json(repository, commit, recursive))
            return
        file_path = query.get("FilePath", "")
        data = ms.repos[repository].commits[commit].get(file_path)
        if data is None:
            self._miss(f"file {file_path} not found")
            return
        sha = hashlib.sha256(data).hexdigest()
        if ms.repos[repository].lfs(file_path):  # the object store, as ModelScope redirects
            self.send(302, {"Location": f"/oss/{sha}?Expires=9999999999&Signature=x"}, b"")
            return
        self._bytes(data, sha)

    def _ok(self, data: object) -> None:
        body = {"Code": 200, "Data": data, "Message": "success",
                "RequestId": "00000000-0000-0000-0000-000000000000", "Success": True}  # fmt: skip
        self.send(200, {"Content-Type": "application/json"}, json.dumps(body).encode())

    def _miss(self, message: str) -> None:
        body = {"Code": 404, "Message": message,
                "RequestId": "00000000-0000-0000-0000-000000000000", "Success": False}  # fmt: skip
        self.send(404, {"Content-Type": "application/json"}, json.dumps(body).encode())

    def _bytes(self, data: bytes, sha: str) -> None:
        self.send_file(data, {"ETag": f'"{sha}"'})
