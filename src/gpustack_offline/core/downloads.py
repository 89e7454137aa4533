"""Downloads into a content-addressed cache, every byte checked against its digest.

A file is stored under `<cache>/blobs/sha256/<hex>` only after its sha256 matched while it
streamed; a file already there is re-hashed before use and fetched again if it is damaged. So a
second build downloads nothing, and a bad byte never reaches a bundle.

Every body this project downloads (wheels, registry blobs and manifests, tool assets) goes through
one routine, `download`, because upstreams fail in the same few ways: 429 and 5xx bursts, a
connection reset or a stall in the middle of a body, a proxy that damages bytes. It retries
with exponential backoff and jitter (honouring Retry-After), resumes a broken body with
`Range: bytes=N-` where the server allows ranges, hashes the resumed stream as one, and checks
sha256 and size before anything gets a final name. The knobs are `RetryPolicy`'s fields, set by
the `download-*` options (pyproject, `GPUSTACK_OFFLINE_DOWNLOAD_*`, flags); a `BlobStore` made
without a policy reads the environment's once, when it is opened (tests shorten them so).
"""

from __future__ import annotations

import email.utils
import hashlib
import itertools
import logging
import os
import random
import re
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

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

from gpustack_offline.core import options
from gpustack_offline.core.errors import DownloadError, HTTPStatusError, IntegrityError
from gpustack_offline.core.files import CHUNK, publish, scratch_file, sha256_file
from gpustack_offline.core.options import Options

log = logging.getLogger("gpustack_offline")

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
# A body that broke off, a stall longer than the read timeout, a reset: worth another request.
TRANSIENT = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
)
ENV_PREFIX = "GPUSTACK_OFFLINE_DOWNLOAD_"
# A file whose bytes are wrong is fetched once more from zero (a damaging hop may be transient);
# wrong twice is an error, not a reason to download a large file six times.
WRONG_BYTES_TRIES = 2
# A temporary file in the blob store untouched this long belongs to a build that was killed.
STALE_TEMP_AGE = 24 * 3600.0


@dataclass(frozen=True)
class RetryPolicy:
    """How hard `download` tries: `attempts` requests in all, sleeping `backoff`·2ⁿ⁻¹ seconds
    (jittered to 50-100 %, at most `max_sleep`) between them, or what a Retry-After asks, at
    most `max_retry_after`. `read_timeout` is the longest silence in a body (a stall)."""

    # the defaults are the download-* options' (declared once, in core/options.py)
    attempts: int = Options.download_attempts
    backoff: float = Options.download_backoff
    max_sleep: float = Options.download_max_sleep
    max_retry_after: float = Options.download_max_retry_after
    connect_timeout: float = Options.download_connect_timeout
    read_timeout: float = Options.download_read_timeout

    @classmethod
    def from_options(cls, opts: Options) -> RetryPolicy:
        """The policy the options set (`download-attempts`, `download-backoff`, ...)."""
        return cls(
            attempts=opts.download_attempts,
            backoff=opts.download_backoff,
            max_sleep=opts.download_max_sleep,
            max_retry_after=opts.download_max_retry_after,
            connect_timeout=opts.download_connect_timeout,
            read_timeout=opts.download_read_timeout,
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RetryPolicy:
        """Defaults, each overridden by its option's environment variable
        `GPUSTACK_OFFLINE_DOWNLOAD_<FIELD>` (e.g. `_ATTEMPTS=3`, `_READ_TIMEOUT=1.5`): the
        option cascade without a project, for code that has no `Options`."""
        env = os.environ if env is None else env
        own = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
        return cls.from_options(Options(**options.from_env(own)))

    def sleep_for(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait after the `attempt`-th (1-based) request failed."""
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        return min(self.max_sleep, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


# The policy of the options' defaults: for a `download` called without one.
DEFAULT_POLICY = RetryPolicy.from_options(Options())


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a Retry-After value: delay-seconds or an HTTP-date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def redact(url: str) -> str:
    """A URL fit for logs and messages: no user name, password or query (signed CDN URLs)."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclass(frozen=True)
class Fetched:
    sha256: str
    size: int
    headers: Mapping[str, str]  # of the response that completed the body


# headers to send, (connect, read) timeout → a response (as a context manager, body streamed)
Opener = Callable[
    [Mapping[str, str], tuple[float, float]], AbstractContextManager[requests.Response]
]


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True)
class _Outcome:
    """How one request ended: `cause` set, a failure worth another request (after `retry_after`
    seconds if the server said so); else the body is in, as far as the server has it, and its
    bytes are to be judged (`declared`: the whole file's length, as the server states it)."""

    cause: str | None = None
    retry_after: float | None = None
    declared: int | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


class _Transfer:
    """The bytes of one file arriving in `out` over one or more requests: each `attempt` asks
    for what is still missing (`Range: bytes=N-` where the server allows ranges), checks where a
    partial answer starts and streams the body on; `judge` then says what the bytes are."""

    def __init__(
        self,
        opener: Opener,
        out: BinaryIO,
        *,
        name: str,
        shown: str,
        limit: int | None,
        check: Callable[[requests.Response], None] | None,
        progress: Callable[[int], None] | None,
    ) -> None:
        self.opener, self.out, self.name, self.shown = opener, out, name, shown
        self.limit, self.check, self.progress = limit, check, progress
        self.digest, self.written, self.ranges = hashlib.sha256(), 0, False
        out.seek(0)
        out.truncate()

    def restart(self) -> None:
        """Forget what arrived: the next bytes are the file's first."""
        if self.progress and self.written:
            self.progress(-self.written)
        self.digest, self.written = hashlib.sha256(), 0
        self.out.seek(0)
        self.out.truncate()

    def attempt(self, timeout: tuple[float, float]) -> _Outcome:
        """One request: what is missing, streamed on; a transient fault is an outcome too."""
        headers = {"Accept-Encoding": "identity"}
        if self.written and self.ranges:
            headers["Range"] = f"bytes={self.written}-"
        elif self.written:
            self.restart()
        try:
            with self.opener(headers, timeout) as resp:
                return self._receive(resp, ranged="Range" in headers)
        except TRANSIENT as exc:
            return _Outcome(f"{type(exc).__name__}: {short_reason(exc)}")

    def _receive(self, resp: requests.Response, ranged: bool) -> _Outcome:
        status = resp.status_code
        if status == 416 and ranged:
            # nothing from byte `written` on: the server's file is no longer than that (a
            # replaced, shorter file); what we have is judged, not retried
            log.info("%s: the server has no bytes past %d", self.name, self.written)
            return _Outcome(declared=self.written, headers=resp.headers)
        if status in RETRY_STATUSES:
            return _Outcome(
                f"HTTP {status} {resp.reason or ''}".strip(),
                parse_retry_after(resp.headers.get("Retry-After")),
            )
        if status not in (200, 206):
            if self.check is not None:
                self.check(resp)
            raise HTTPStatusError(
                f"{self.name}: {self.shown} answered HTTP {status} {resp.reason or ''}".rstrip()
                + ". Check the URL and the mirror or index option",
                status,
            )
        self.ranges = (
            self.ranges or status == 206 or "bytes" in resp.headers.get("Accept-Ranges", "")
        )
        if status == 206:
            match = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
            start = int(match.group(1)) if match else -1
            if not ranged or start != self.written:
                self.ranges = False  # next time the whole file, from zero
                return _Outcome(f"a partial answer from byte {start}, not {self.written}")
            declared = int(match.group(3)) if match and match.group(3).isdigit() else None
            log.info("%s: resuming at byte %d", self.name, self.written)
        else:
            if self.written:
                log.info("%s: the server ignored the range; starting from zero", self.name)
                self.restart()
            length = resp.headers.get("Content-Length", "")
            declared = int(length) if length.isdigit() else None
        self._stream(resp)
        return _Outcome(declared=declared, headers=resp.headers)

    def _stream(self, resp: requests.Response) -> None:
        limit = self.limit
        for chunk in resp.iter_content(CHUNK):
            if limit is not None and self.written + len(chunk) > limit:
                chunk = chunk[: limit - self.written + 1]  # one byte over: enough to tell
            self.written += len(chunk)
            self.digest.update(chunk)
            self.out.write(chunk)
            if self.progress:
                self.progress(len(chunk))
            if limit is not None and self.written > limit:
                break

    def shortfall(self, declared: int | None, size: int | None, max_size: int | None) -> str | None:
        """Why a received body is not the whole file yet (worth another request), or None.

        A body shorter than the locked size is cut off, unless the server said that was the
        whole file: then it is another file (judged as wrong bytes, not retried). More than
        `max_size` is refused outright."""
        written = self.written
        if size is not None and written < size and (declared is None or written < declared):
            return f"the body ended after {written} of {size} bytes"
        if max_size is not None and size is None and written > max_size:
            raise DownloadError(
                f"{self.name}: {self.shown} sent more than {max_size} bytes; refused"
            )
        return None

    def matches(self, sha256: str | None, size: int | None) -> bool:
        return (sha256 is None or self.digest.hexdigest() == sha256) and (
            size is None or self.written == size
        )


def download(
    url: str,
    out: BinaryIO,
    *,
    http: requests.Session | None = None,
    opener: Opener | None = None,
    sha256: str | None = None,
    size: int | None = None,
    max_size: int | None = None,
    what: str = "",
    check: Callable[[requests.Response], None] | None = None,
    progress: Callable[[int], None] | None = None,
    policy: RetryPolicy | None = None,
) -> Fetched:
    """Stream `url` into `out` (a seekable file, emptied first), retrying and resuming.

    `opener` makes the request (the registry authenticates in it); by default it is a plain
    `http.get`. With `sha256` and/or `size` the bytes are checked, and an `IntegrityError` is
    raised when they are wrong twice; the caller must then discard `out`. `check` sees an answer
    that is neither a success nor worth retrying and may raise its own error; otherwise that is
    an `HTTPStatusError`. After `policy.attempts` failed requests (`DEFAULT_POLICY` when none is
    given): a `DownloadError` naming the URL, the last cause and the fix. Headers (credentials)
    are never logged.
    """
    policy = policy or DEFAULT_POLICY
    shown = redact(url)
    name = what or shown
    transfer = _Transfer(
        opener or _plain_opener(url, http), out, name=name, shown=shown,
        limit=size if size is not None else max_size, check=check, progress=progress,
    )  # fmt: skip
    timeout = (policy.connect_timeout, policy.read_timeout)
    wrong = 0
    for attempt in itertools.count(1):
        outcome = transfer.attempt(timeout)
        cause = outcome.cause or transfer.shortfall(outcome.declared, size, max_size)
        if cause is None:
            if transfer.matches(sha256, size):
                out.flush()
                return Fetched(transfer.digest.hexdigest(), transfer.written, outcome.headers)
            wrong += 1
            got = transfer.digest.hexdigest()
            if wrong >= WRONG_BYTES_TRIES or attempt >= policy.attempts:
                times = "twice" if wrong > 1 else "on the last attempt"
                raise IntegrityError(
                    _wrong_bytes(name, shown, got, transfer.written, sha256, size, times)
                )
            log.warning("%s: the bytes were wrong (sha256 %s); fetching it again", name, got)
            transfer.restart()
            continue
        if attempt >= policy.attempts:
            raise DownloadError(
                f"{name}: {shown} failed {attempt} times; the last time: {cause}. Check the "
                "network, the proxy settings and the mirror or index option, then rerun: "
                "completed files are kept"
            )
        retry_after = outcome.retry_after if outcome.cause else None
        pause = policy.sleep_for(attempt, retry_after)
        log.warning(
            "%s: %s; retrying in %.1fs (attempt %d of %d)",
            name, cause, pause, attempt + 1, policy.attempts,
        )  # fmt: skip
        time.sleep(pause)
    raise AssertionError("unreachable: the loop above returns or raises")


def _plain_opener(url: str, http: requests.Session | None) -> Opener:
    if http is None:
        raise TypeError("download() needs http or opener")
    session_ = http

    def opener(headers: Mapping[str, str], timeout: tuple[float, float]) -> requests.Response:
        return session_.get(url, headers=dict(headers), stream=True, timeout=timeout)

    return opener


_POOL_PREAMBLE = re.compile(r"^\W*\w*ConnectionPool\([^)]*\): ")
_OS_ERROR = re.compile(r"\[Errno -?\d+\] ([^)'\"]+)")


def short_reason(exc: Exception) -> str:
    """The cause without urllib3's wrapping: `connection refused`, `name or service not known`
    (the OS error inside a connection error), or `Read timed out. (read timeout=60)`."""
    text = str(exc)
    if match := _OS_ERROR.search(text):
        text = match.group(1).strip()
        return text[:1].lower() + text[1:200]
    text = _POOL_PREAMBLE.sub("", text)
    return text[:200] or type(exc).__name__


def _wrong_bytes(
    name: str, url: str, got: str, written: int, sha256: str | None, size: int | None, times: str
) -> str:
    wanted = (f"{size} bytes" if size is not None else "", f"sha256 {sha256}" if sha256 else "")
    expected = " with ".join(p for p in wanted if p)
    return (
        f"{name}: {url} sent {written} bytes with sha256 {got}, which does not match the locked "
        f"{expected} ({times}); it was not kept. A proxy or mirror on the way alters downloads "
        "(check it), or upstream replaced the file: then refresh the lock (`invoke lock`) and "
        "review the change"
    )


def session() -> requests.Session:
    """A session without urllib3 retries: bodies are retried by `download` alone, which can
    resume them; one retry layer keeps the total wait bounded and the backoff in one place."""
    http = requests.Session()
    http.mount("https://", HTTPAdapter(pool_maxsize=16))
    http.mount("http://", HTTPAdapter(pool_maxsize=16))
    http.headers["User-Agent"] = "gpustack-offline"
    return http


@dataclass(frozen=True)
class Download:
    url: str
    sha256: str
    size: int | None = None
    label: str = ""


class BlobStore:
    """Files by sha256 under one directory shared by every cell.

    A file being written here has a temporary name (`.new.*.part`, or `.<sha256>.*.part` from
    `atomic_path`); a killed build leaves it behind. Opening the store removes such files that
    have not been written to for `STALE_TEMP_AGE` seconds: old enough that no live build, this
    one or a concurrent one, is still writing them."""

    def __init__(self, root: Path, policy: RetryPolicy | None = None) -> None:
        self.root = root / "blobs" / "sha256"
        # every download into this store retries by one policy, read once
        self.policy = policy or RetryPolicy.from_env()
        self.remove_stale_temps()

    def path(self, sha256: str) -> Path:
        return self.root / sha256

    def remove_stale_temps(self, max_age: float | None = None) -> list[Path]:
        """Remove temporary files older than `max_age` seconds (a day by default); the removed."""
        cutoff = time.time() - (STALE_TEMP_AGE if max_age is None else max_age)
        removed: list[Path] = []
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return removed
        for entry in entries:
            if not (entry.name.startswith(".") and entry.name.endswith(".part")):
                continue
            try:
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
            except FileNotFoundError:  # a concurrent build removed or renamed it
                continue
        if removed:
            log.info("removed %d stale temporary files from %s", len(removed), self.root)
        return removed

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

    def download(
        self,
        url: str,
        *,
        http: requests.Session | None = None,
        opener: Opener | None = None,
        sha256: str | None = None,
        size: int | None = None,
        what: str = "",
        check: Callable[[requests.Response], None] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> str:
        """`download` into a temp file here, renamed to its sha256 only once checked; the
        sha256. Whatever goes wrong, the temp file is removed; a full disk is a
        `DiskFullError` naming the blob (or the store, when its digest is not known yet)."""
        final = self.path(sha256) if sha256 else self.root
        with scratch_file(final, self.root, ".new.") as tmp, tmp.open("w+b") as out:
            got = download(
                url, out, http=http, opener=opener, sha256=sha256, size=size, what=what,
                check=check, progress=progress, policy=self.policy,
            )  # fmt: skip
            publish(tmp, self.path(got.sha256))
        return got.sha256

    def fetch(
        self, item: Download, http: requests.Session, progress: Progress | None = None
    ) -> Path:
        if self.has(item.sha256):
            return self.path(item.sha256)
        task = progress.add_task(item.label or item.url, total=item.size) if progress else None

        def advance(n: int) -> None:
            if progress and task is not None:
                progress.advance(task, n)

        try:
            self.download(
                item.url, http=http, sha256=item.sha256, size=item.size,
                what=item.label or redact(item.url), progress=advance,
            )  # fmt: skip
        finally:
            if progress and task is not None:
                progress.remove_task(task)
        return self.path(item.sha256)

    def fetch_new(
        self, url: str, http: requests.Session, expect: str | None = None, size: int | None = None
    ) -> str:
        """Store a file whose digest is learned while it streams; return its sha256.

        With `expect`, a file already stored under that digest is not fetched again, and other
        bytes are refused (and not kept) with an error that names both digests.
        """
        if expect and self.has(expect):
            return expect
        return self.download(url, http=http, sha256=expect, size=size)

    def fetch_all(
        self,
        items: Sequence[Download],
        jobs: int = 4,
        show: bool = True,
        http: requests.Session | None = None,
    ) -> list[Path]:
        """Fetch many files in parallel, with one overall progress bar; a sha256 listed twice
        is fetched once. `http` carries headers the server wants (a token); a plain session by
        default."""
        missing = list({i.sha256: i for i in items if not self.has(i.sha256)}.values())
        if missing:
            http = http or session()
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
