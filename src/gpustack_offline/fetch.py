"""Downloads into a content-addressed cache, every byte checked against its digest.

A file is stored under `<cache>/blobs/sha256/<hex>` only after its sha256 matched while it
streamed; a file already there is re-hashed before use and fetched again if it is damaged. So a
second build downloads nothing, and a bad byte never reaches a bundle.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import requests
from requests.adapters import HTTPAdapter
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from urllib3.util.retry import Retry

from .errors import IntegrityError
from .fsutil import CHUNK, FILE_MODE, atomic_path, sha256_file

log = logging.getLogger("gpustack_offline")


@dataclass(frozen=True)
class Download:
    url: str
    sha256: str
    size: int | None = None
    label: str = ""


def session() -> requests.Session:
    retry = Retry(
        total=5,
        backoff_factor=0.5,
        status_forcelist=(429, 500, 502, 503, 504),
        respect_retry_after_header=True,
        allowed_methods=("GET", "HEAD"),
    )
    http = requests.Session()
    http.mount("https://", HTTPAdapter(max_retries=retry, pool_maxsize=16))
    http.mount("http://", HTTPAdapter(max_retries=retry, pool_maxsize=16))
    http.headers["User-Agent"] = "gpustack-offline"
    return http


class BlobStore:
    """Files by sha256 under one directory shared by every cell."""

    def __init__(self, root: Path) -> None:
        self.root = root / "blobs" / "sha256"

    def path(self, sha256: str) -> Path:
        return self.root / sha256

    def has(self, sha256: str) -> bool:
        """True if the blob is present and intact (a damaged one is removed)."""
        path = self.path(sha256)
        if not path.is_file():
            return False
        if sha256_file(path) == sha256:
            return True
        log.warning("cached %s is damaged; fetching it again", path)
        path.unlink()
        return False

    def fetch(
        self, item: Download, http: requests.Session, progress: Progress | None = None
    ) -> Path:
        if self.has(item.sha256):
            return self.path(item.sha256)
        final = self.path(item.sha256)
        digest = hashlib.sha256()
        task = progress.add_task(item.label or item.url, total=item.size) if progress else None
        with atomic_path(final) as tmp, tmp.open("wb") as out:
            try:
                with http.get(item.url, stream=True, timeout=(15, 120)) as resp:
                    resp.raise_for_status()
                    for chunk in resp.iter_content(CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        if progress and task is not None:
                            progress.advance(task, len(chunk))
            except requests.RequestException as exc:
                raise IntegrityError(
                    f"download of {item.label or item.url} failed: {exc}. "
                    "Check the network or the index URL option, then rerun; finished files are kept"
                ) from exc
            finally:
                if progress and task is not None:
                    progress.remove_task(task)
            out.flush()
            if digest.hexdigest() != item.sha256:
                raise IntegrityError(
                    f"{item.url}: sha256 {digest.hexdigest()} does not match the locked "
                    f"{item.sha256}; the file was not kept. If upstream replaced the file, "
                    "refresh the lock (`invoke lock`) and review the change"
                )
        return final

    def fetch_new(self, url: str, http: requests.Session, expect: str | None = None) -> str:
        """Store a file whose digest is learned while it streams; return its sha256.

        With `expect`, a file already stored under that digest is not fetched again, and other
        bytes are refused (and not kept) with an error that names both digests.
        """
        if expect and self.has(expect):
            return expect
        self.root.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with tempfile.NamedTemporaryFile(dir=self.root, prefix=".new.", delete=False) as out:
            tmp = Path(out.name)
            try:
                with http.get(url, stream=True, timeout=(15, 120)) as resp:
                    resp.raise_for_status()
                    for chunk in resp.iter_content(CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        got = digest.hexdigest()
        if expect and got != expect:
            tmp.unlink(missing_ok=True)
            raise IntegrityError(
                f"{url}: sha256 {got} does not match the locked {expect}; the file was not kept"
            )
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, self.path(got))
        return got

    def fetch_all(self, items: Sequence[Download], jobs: int = 4, show: bool = True) -> list[Path]:
        """Fetch many files in parallel, with one overall progress bar."""
        missing = [i for i in items if not self.has(i.sha256)]
        if missing:
            http = session()
            columns = (
                TextColumn("{task.description}", justify="left"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
            )
            with Progress(*columns, disable=not show, transient=True) as progress:
                total = progress.add_task(
                    f"downloading {len(missing)} files",
                    total=sum(i.size or 0 for i in missing) or None,
                )

                def one(item: Download) -> Path:
                    path = self.fetch(item, http, None)
                    progress.advance(total, path.stat().st_size)
                    return path

                with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
                    list(pool.map(one, missing))
        return [self.path(i.sha256) for i in items]
