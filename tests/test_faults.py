"""Faulty upstreams: every download path survives transient faults with the right bytes, or
stops with one clear error, and wrong bytes are never kept.

A `FaultProxy` (fault_proxy.py) sits between the pipeline and a loopback upstream: a file server
for wheels (`BlobStore.fetch_all`, as wheels.py fetches them), the token-auth registry fixture
for image blobs (`Registry.pull`), and a release mirror for tool assets (`AssetProxy.asset`).
Retries are shortened through the `GPUSTACK_OFFLINE_DOWNLOAD_*` knobs so the suite stays fast.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest
import requests
from support.fault_proxy import (
    Drop,
    FaultProxy,
    Flip,
    IgnoreRange,
    Redirect,
    Stall,
    Status,
    Swap,
    Unauthorized,
    WrongStart,
)
from support.registry_fixture import (  # noqa: F401 - a session fixture by name
    AMD64,
    OCI_LAYER,
    Blob,
    Hub,
    hub_fixture,
    make_image,
    noise,
)
from support.release_mirror import ReleaseMirror

from gpustack_offline.core.downloads import (
    STALE_TEMP_AGE,
    BlobStore,
    Download,
    DownloadError,
    RetryPolicy,
    parse_retry_after,
    redact,
    short_reason,
)
from gpustack_offline.core.errors import BundleError, IntegrityError, OptionError
from gpustack_offline.core.files import atomic_dir, atomic_path, remove_temps, temp_names
from gpustack_offline.stages import tools
from gpustack_offline.stages.registry import Registry

NO_CONFIG = {"DOCKER_CONFIG": "/nonexistent/gpustack-offline-tests"}
SIZE = 3 << 20
WHEEL = "/packages/fault_demo-1.0-py3-none-any.whl"
ASSET = "gpustack/llama-box/releases/download/v0.0.0/fault-demo-linux-amd64.zip"
READ_TIMEOUT = 0.5


# -- the knobs, the Retry-After parser, redaction (no sockets) ---------------------------------


def test_retry_after_takes_seconds_and_http_dates():
    now = datetime(2025, 1, 1, tzinfo=UTC)
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(format_datetime(now + timedelta(seconds=30), usegmt=True), now) == 30
    assert parse_retry_after(format_datetime(now - timedelta(seconds=5), usegmt=True), now) == 0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_backoff_grows_is_jittered_and_capped_and_retry_after_is_capped():
    policy = RetryPolicy(backoff=1.0, max_sleep=5.0, max_retry_after=10.0)
    assert 0.5 <= policy.sleep_for(1, None) <= 1.0
    assert 2.0 <= policy.sleep_for(3, None) <= 4.0
    assert policy.sleep_for(10, None) <= 5.0
    assert policy.sleep_for(1, 3600.0) == 10.0


def test_policy_knobs_come_from_the_environment_and_bad_values_are_refused():
    policy = RetryPolicy.from_env(
        {"GPUSTACK_OFFLINE_DOWNLOAD_ATTEMPTS": "3", "GPUSTACK_OFFLINE_DOWNLOAD_READ_TIMEOUT": "2.5"}
    )
    assert (policy.attempts, policy.read_timeout, policy.backoff) == (3, 2.5, 1.0)
    with pytest.raises(OptionError, match="GPUSTACK_OFFLINE_DOWNLOAD_ATTEMPTS"):
        RetryPolicy.from_env({"GPUSTACK_OFFLINE_DOWNLOAD_ATTEMPTS": "many"})
    with pytest.raises(OptionError, match="too small"):
        RetryPolicy.from_env({"GPUSTACK_OFFLINE_DOWNLOAD_ATTEMPTS": "0"})


def test_urls_in_messages_carry_no_credentials_or_signed_queries():
    assert redact("https://user:s3cret@pypi.site/simple/x.whl?sig=abc") == (
        "https://pypi.site/simple/x.whl"
    )


def test_connection_errors_read_as_the_os_error_without_urllib3s_wrapping():
    refused = requests.ConnectionError(
        "HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded with url: /v2/ "
        "(Caused by NewConnectionError(\"HTTPConnection(host='127.0.0.1', port=5000): Failed to "
        'establish a new connection: [Errno 111] Connection refused"))'
    )
    assert short_reason(refused) == "connection refused"
    unknown = requests.ConnectionError(
        "HTTPConnectionPool(host='nowhere.invalid', port=80): Max retries exceeded with url: / "
        "(Caused by NameResolutionError(\"HTTPConnection(host='nowhere.invalid', port=80): "
        "Failed to resolve 'nowhere.invalid' ([Errno -2] Name or service not known)\"))"
    )
    assert short_reason(unknown) == "name or service not known"
    stalled = requests.ReadTimeout(
        "HTTPConnectionPool(host='127.0.0.1', port=5000): Read timed out. (read timeout=60)"
    )
    assert short_reason(stalled) == "Read timed out. (read timeout=60)"


def test_temporary_files_that_killed_builds_left_in_the_blob_store_go_after_a_day(tmp_path):
    """Opening the store removes temporary files untouched for a day (a killed build's), and
    keeps younger ones (a concurrent build may be writing them) and every finished blob."""
    store = BlobStore(tmp_path / "cache")
    store.root.mkdir(parents=True)
    blob = store.path(hashlib.sha256(b"kept").hexdigest())
    blob.write_bytes(b"kept")
    old = [store.root / ".new.k1ll3d_x.part", store.root / f".{blob.name}.abcdefgh.part"]
    young = store.root / ".new.writing.part"
    long_ago = time.time() - STALE_TEMP_AGE - 60
    for path in [*old, young]:
        path.write_bytes(b"half")
    for path in [*old, blob]:
        os.utime(path, (long_ago, long_ago))
    BlobStore(tmp_path / "cache")  # what the next build does
    assert sorted(p.name for p in store.root.iterdir()) == sorted([blob.name, young.name])
    assert store.has(blob.name)


def test_a_rebuild_removes_what_killed_writes_of_its_bundle_left_and_nothing_else(tmp_path):
    cell = "v0.7.1-linux-amd64-cpu-py3.11-base-pip"
    final, tar = tmp_path / cell, tmp_path / f"{cell}.tar"
    with atomic_dir(final) as stage, atomic_path(tar) as tmp:  # the names they really use
        assert temp_names(final).fullmatch(stage.name) and temp_names(tar).fullmatch(tmp.name)
        tmp.write_text("done")
    (tmp_path / f".{cell}.k1ll3d_0.part").mkdir()  # as killed runs leave them
    (tmp_path / f".{cell}.k1ll3d_0.part" / "half").write_text("written")
    (tmp_path / f".{cell}.tar.abcdefgh.part").write_bytes(b"half a tar")
    others = [f".{cell}-other.abcdefgh.part", f".{cell}.tar.notmine.part", "unrelated.part"]
    for name in others:
        (tmp_path / name).write_text("kept")
    remove_temps(final)
    remove_temps(tar)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([cell, tar.name, *others])


# -- the faults --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    faults: tuple[tuple[object, tuple[int, ...] | None], ...]  # (fault, attempts; None = always)
    fails: type[BaseException] | None = None  # None: the download must succeed
    resumed: bool = False  # a later request asked for a Range after a cut body


SCENARIOS = {
    "drop-mid-body": Scenario(((Drop(SIZE // 3), (1, 2)),), resumed=True),
    "drop-every-body": Scenario(((Drop(SIZE // 3), None),), resumed=True),
    "503-burst": Scenario(((Status(503), (1, 2, 3)),)),
    "429-retry-after": Scenario(((Status(429, "1"), (1,)),)),
    "stall": Scenario(((Stall(SIZE // 2, 1.0), (1,)),), resumed=True),
    "flipped-byte-once": Scenario(((Flip(), (1,)),)),
    "other-body-once": Scenario(((Swap(), (1,)),)),
    # A third fault (a flipped byte) uses up the wrong-bytes budget if the 200 or the bad 206
    # were taken as a continuation: only a client that restarts cleanly gets through.
    "range-ignored": Scenario(((Drop(SIZE // 3), (1,)), (IgnoreRange(), (2,)), (Flip(), (3,)))),
    "206-wrong-start": Scenario(
        ((Drop(SIZE // 3), (1,)), (WrongStart(1000), (2,)), (Flip(), (3,)))
    ),
    "flipped-byte-always": Scenario(((Flip(), None),), fails=IntegrityError),
    "503-always": Scenario(((Status(503), None),), fails=DownloadError),
}


@dataclass
class Tally:
    injected: int = 0
    survived: int = 0  # faults in downloads that ended with the right bytes
    refused: int = 0  # downloads that ended in one clear error, nothing kept
    by_path: dict[str, int] = field(default_factory=dict)

    def add(self, path: str, proxy: FaultProxy, ok: bool) -> None:
        self.injected += proxy.injected
        self.by_path[path] = self.by_path.get(path, 0) + proxy.injected
        if ok:
            self.survived += proxy.injected
        else:
            self.refused += 1


@pytest.fixture(scope="module")
def tally(request: pytest.FixtureRequest) -> Iterator[Tally]:
    """Counts faults over the module and prints one summary line at its end."""
    counts = Tally()
    yield counts
    line = (
        f"fault injection: {counts.injected} faults injected; {counts.survived} in downloads "
        f"that ended with the right bytes, {counts.injected - counts.survived} in "
        f"{counts.refused} downloads stopped with one clear error and nothing kept; by path: "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.by_path.items()))
    )
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("\n" + line)


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "ATTEMPTS": "6",
        "BACKOFF": "0.01",
        "MAX_SLEEP": "0.05",
        "MAX_RETRY_AFTER": "2",
        "READ_TIMEOUT": str(READ_TIMEOUT),
    }.items():
        monkeypatch.setenv(f"GPUSTACK_OFFLINE_DOWNLOAD_{name}", value)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReleaseMirror]:
    """A plain loopback file server (200, 206, Accept-Ranges) with a wheel and a tool asset."""
    root = tmp_path_factory.mktemp("fault-files")
    for path, seed in ((WHEEL, "wheel"), ("/" + ASSET, "asset")):
        (root / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (root / path.lstrip("/")).write_bytes(noise(seed, SIZE))
    with ReleaseMirror(root) as mirror:
        yield mirror


@pytest.fixture(scope="module")
def layer(hub: Hub) -> Blob:
    """fixture/faults:v1 on the hub: one image whose only layer is SIZE bytes."""
    blob = Blob(OCI_LAYER, noise("layer", SIZE))
    hub.push("fixture/faults", "v1", [make_image(AMD64, [(blob, blob.digest)])], index=False)
    return blob


def assert_nothing_kept(store: BlobStore, hex_digest: str) -> None:
    assert not store.path(hex_digest).exists()
    assert not [p.name for p in store.root.iterdir() if p.name.startswith(".")]


def assert_resumed(proxy: FaultProxy) -> None:
    ranged = [s for s in proxy.seen if s.range and s.range != "bytes=0-" and s.status == 206]
    assert ranged, f"no resumed request in {proxy.seen}"


def run_scenario(
    name: str,
    scenario: Scenario,
    proxy: FaultProxy,
    pattern: str,
    fetch: Callable[[], Path],
    store: BlobStore,
    expect: bytes,
    tally: Tally,
    path: str,
) -> BundleError | None:
    for fault, attempts in scenario.faults:
        proxy.on(pattern, fault, attempts)  # type: ignore[arg-type]
    hex_digest = hashlib.sha256(expect).hexdigest()
    if scenario.fails is None:
        got = fetch()
        assert got == store.path(hex_digest) and got.read_bytes() == expect
        assert not [p.name for p in store.root.iterdir() if p.name.startswith(".")]
        assert proxy.injected >= 1, f"{name}: no fault was injected"
        if scenario.resumed:
            assert_resumed(proxy)
        tally.add(path, proxy, ok=True)
        return None
    with pytest.raises(BundleError) as caught:
        fetch()
    assert_nothing_kept(store, hex_digest)
    tally.add(path, proxy, ok=False)
    return caught.value


def check_scenario_details(name: str, proxy: FaultProxy, pattern_hits: list) -> None:
    if name == "429-retry-after":
        first, second = pattern_hits[0], pattern_hits[1]
        assert first.status == 429 and second.at - first.at >= 0.9
    if name == "range-ignored":
        assert pattern_hits[1].range and pattern_hits[1].status == 200
    if name == "206-wrong-start":
        assert pattern_hits[1].status == 206 and pattern_hits[2].range is None


@pytest.mark.enable_socket
@pytest.mark.parametrize("name", SCENARIOS)
def test_wheel_downloads_survive_or_stop_cleanly(name, files, tally, tmp_path):
    scenario = SCENARIOS[name]
    data = (files.root / WHEEL.lstrip("/")).read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    store = BlobStore(tmp_path / "cache")
    with FaultProxy(files.base_url) as proxy:
        item = Download(proxy.url + WHEEL, sha, len(data), "fault_demo-1.0-py3-none-any.whl")
        error = run_scenario(
            name, scenario, proxy, r"\.whl$",
            lambda: store.fetch_all([item], jobs=1, show=False)[0],
            store, data, tally, "wheels",
        )  # fmt: skip
        hits = [s for s in proxy.seen if s.path.endswith(".whl")]
    check_scenario_details(name, proxy, hits)
    if error is not None:
        assert isinstance(error, scenario.fails)  # type: ignore[arg-type]
        message = str(error)
        assert WHEEL in message
        if scenario.fails is DownloadError:
            assert "failed 6 times" in message and "HTTP 503" in message and "rerun" in message
            assert len(hits) == 6
        else:
            assert sha in message and "it was not kept" in message


@pytest.mark.enable_socket
@pytest.mark.parametrize("name", SCENARIOS)
def test_tool_assets_survive_or_stop_cleanly(name, files, tally, tmp_path):
    scenario = SCENARIOS[name]
    data = (files.root / ASSET).read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    store = BlobStore(tmp_path / "cache")
    lock = tools.ToolsLock(tmp_path / "gpustack-0.0.0.toml", frozen=True)
    lock.entries[ASSET] = (sha, len(data))
    with FaultProxy(files.base_url) as proxy:
        assets = tools.AssetProxy(store, lock, proxy.url)
        error = run_scenario(
            name, scenario, proxy, r"fault-demo-linux-amd64\.zip$",
            lambda: assets.asset(ASSET), store, data, tally, "tools",
        )  # fmt: skip
        hits = [s for s in proxy.seen if s.path.endswith(".zip")]
    check_scenario_details(name, proxy, hits)
    if error is not None:
        assert ASSET in str(error)
        if scenario.fails is DownloadError:
            assert isinstance(error, tools.ToolsError) and "tools-base-url" in str(error)
        else:
            assert isinstance(error, IntegrityError) and sha in str(error)
    else:
        assert assets.fetched[ASSET].sha256 == sha


@pytest.mark.integration
@pytest.mark.parametrize("name", SCENARIOS)
def test_registry_blobs_survive_or_stop_cleanly(name, hub, layer, tally, tmp_path, caplog):
    scenario = SCENARIOS[name]
    store = BlobStore(tmp_path / "cache")
    with FaultProxy(hub.registry.url) as proxy, caplog.at_level(logging.DEBUG):
        registry = Registry(store, env=NO_CONFIG)
        error = run_scenario(
            name, scenario, proxy, f"/blobs/{layer.digest}$",
            lambda: store.path(
                registry.pull(f"{proxy.host}/fixture/faults:v1", "linux/amd64").layers[0].hex
            ),
            store, layer.data, tally, "registry",
        )  # fmt: skip
        hits = [s for s in proxy.seen if s.path.endswith(layer.digest) and s.status != 401]
        host = proxy.host
    check_scenario_details(name, proxy, hits)
    assert "Bearer " not in caplog.text  # tokens never reach a log
    if error is not None:
        assert layer.digest in str(error) and host in str(error)
        assert isinstance(error, scenario.fails)  # type: ignore[arg-type]


@pytest.mark.integration
def test_a_token_that_expires_mid_pull_is_renewed_once(hub, layer, tally, tmp_path):
    store = BlobStore(tmp_path / "cache")
    with FaultProxy(hub.registry.url) as proxy:
        proxy.on(f"/blobs/{layer.digest}$", Unauthorized(), (1,))
        before = len(hub.tokens.requests)
        image = Registry(store, env=NO_CONFIG).pull(
            f"{proxy.host}/fixture/faults:v1", "linux/amd64"
        )
        statuses = [s.status for s in proxy.seen if s.path.endswith(layer.digest)]
    assert store.path(image.layers[0].hex).read_bytes() == layer.data
    assert statuses == [401, 200]
    assert len(hub.tokens.requests) == before + 2  # the first token, then one renewal
    tally.add("registry", proxy, ok=True)


@pytest.mark.integration
def test_a_blob_redirected_to_a_cdn_host_resumes_there_without_credentials(
    hub, layer, tally, tmp_path
):
    cdn_root = tmp_path / "cdn-root"
    (cdn_root / "cdn").mkdir(parents=True)
    (cdn_root / "cdn" / layer.hex).write_bytes(layer.data)
    store = BlobStore(tmp_path / "cache")
    with (
        ReleaseMirror(cdn_root) as cdn_files,
        FaultProxy(cdn_files.base_url) as cdn,
        FaultProxy(hub.registry.url) as proxy,
    ):
        # another host name for the same loopback address, as a CDN is another host
        proxy.on(
            f"/blobs/{layer.digest}$", Redirect(f"http://localhost:{cdn.port}/cdn/{layer.hex}")
        )
        cdn.on(f"/cdn/{layer.hex}$", Drop(SIZE // 2), (1,))
        image = Registry(store, env=NO_CONFIG).pull(
            f"{proxy.host}/fixture/faults:v1", "linux/amd64"
        )
        at_registry = [s for s in proxy.seen if s.path.endswith(layer.digest)]
        at_cdn = cdn.seen
    assert store.path(image.layers[0].hex).read_bytes() == layer.data
    assert at_registry and all(s.authorized for s in at_registry if s.status == 307)
    assert at_cdn and not any(s.authorized for s in at_cdn)
    assert_resumed(cdn)
    tally.injected += cdn.injected
    tally.survived += cdn.injected
    tally.add("registry", proxy, ok=True)


# -- what killed builds leave in the cache (cache.in_use) ---------------------------------------


def killed_builds_leftovers(root: Path) -> tuple[list[Path], list[Path]]:
    """A cache as killed builds leave it: (the temporary entries, made as fsutil and the blob
    store make them; the real data, and what is not the cache's own)."""
    import tempfile

    store = BlobStore(root)
    store.root.mkdir(parents=True, exist_ok=True)
    blob = store.path(hashlib.sha256(b"kept").hexdigest())
    blob.write_bytes(b"kept")
    venv = root / "tools" / "venv" / "gpustack-0.7.1-0123456789abcdef"
    archive = root / "tools" / "archives" / "0.7.1-linux-amd64-cpu-0123456789abcdef"
    wheel = root / "built" / "0123456789abcdef" / "crcmod-1.7-cp311-cp311-linux_aarch64.whl"
    for folder in (venv / "bin", archive, wheel.parent):
        folder.mkdir(parents=True)

    def temp(final: Path, folder: bool = False, prefix: str = "") -> Path:
        start = prefix or f".{final.name}."
        if folder:
            path = Path(tempfile.mkdtemp(prefix=start, suffix=".part", dir=final.parent))
        else:
            path = Path(tempfile.mkstemp(prefix=start, suffix=".part", dir=final.parent)[1])
        assert prefix or temp_names(final).fullmatch(path.name)
        return path

    temps = [
        temp(blob, prefix=".new."),  # BlobStore.download
        temp(store.path("ab" * 32)),  # atomic_path of a registry blob
        temp(venv, folder=True),  # atomic_dir of a tool venv
        temp(archive, folder=True),  # atomic_dir of a tools archive
        temp(wheel),  # atomic_path of a built wheel
        Path(tempfile.mkdtemp(prefix="tools-", dir=archive.parent)),  # the old tools scratch
        archive.with_name(f".{archive.name}.old"),  # atomic_dir between its two renames
    ]
    temps[-1].mkdir()
    (temps[3] / "raw").mkdir()
    inside = venv / "lib" / ".x.abcdefgh.part"  # inside a finished entry: not looked at
    uv = root / "uv" / ".entry.abcdefgh.part"  # uv's cache is uv's
    for path in (inside, uv):
        path.parent.mkdir()
        path.write_text("not a leftover")
    lock = venv.with_name(f"{venv.name}.lock")
    lock.write_text("")
    others = [blob, venv, archive, wheel.parent, inside, uv, lock, root / "notes.part"]
    (root / "notes.part").write_text("kept")
    return temps, others


def test_the_first_build_on_a_cache_removes_every_leftover_of_killed_builds(tmp_path):
    from gpustack_offline.core import cache

    root = tmp_path / "cache"
    temps, others = killed_builds_leftovers(root)
    assert sorted(cache.leftovers(root)) == sorted(temps)
    with cache.in_use(root):
        assert [p for p in temps if p.exists()] == []
        assert [p for p in others if not p.exists()] == []
    assert cache.leftovers(root) == []


def test_a_build_leaves_the_temporary_entries_of_a_live_build_alone(tmp_path):
    from gpustack_offline.core import cache

    root = tmp_path / "cache"
    root.mkdir()
    with cache.in_use(root):  # a live build
        temps, _ = killed_builds_leftovers(root)
        with cache.in_use(root):  # a second build starts meanwhile
            assert [p for p in temps if not p.exists()] == []
    with cache.in_use(root):  # the next build, with none other live
        assert cache.leftovers(root) == []
