"""Credentials never appear in manifests, logs, child processes' argument lists or bundle files.

A unique secret is planted as a registry password (a Basic-auth distribution registry standing in
for Docker Hub through the `registry-mirror` option), once through
`GPUSTACK_OFFLINE_REGISTRY_AUTH_<HOST>` and once through a Docker `config.json`, and a docker
cell is pinned and bundled with `invoke` as a user runs it. A `sitecustomize` on the child's
PYTHONPATH records every process it starts (an audit hook on `subprocess.Popen`, `os.exec*`,
`os.posix_spawn`) and sends every log record, DEBUG included, to a file. Then every file under
dist/, the cache and the pins folder, the output and those records are searched for the secret,
for base64 of `user:secret` (what a Basic header carries) and for its URL-quoted form.

The same is done for an index password: `invoke lock`'s resolver (locks.make_lock, uv) against a
loopback PEP 503 index that wants Basic auth, given as `http://user:secret@…/simple`.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import json
import logging
import os
import secrets
import subprocess
import sys
import urllib.parse
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.loopback import serving
from support.registry_fixture import (
    AMD64,
    Pusher,
    bcrypt_htpasswd,
    plain_registry,
    single_image,
)

from gpustack_offline.stages.locks import Inputs, make_lock
from gpustack_offline.stages.registry import host_env_name

pytestmark = pytest.mark.integration

INVOKE = Path(sys.executable).with_name("invoke")
CELL = "v0.7.1-linux-amd64-cpu-py3.11-base-docker"
PIP_CELL = "v0.7.1-linux-amd64-cpu-py3.11-base-pip"
USER = "site-user"
SECRET = "planted-" + secrets.token_hex(12)

SITECUSTOMIZE = """
import json, logging, os, sys

_ARGV = os.environ["SECRETS_TEST_ARGV"]

def _record(event, args):
    if event in ("subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn"):
        with open(_ARGV, "a") as fh:
            fh.write(json.dumps([event, repr(args[:2])]) + "\\n")  # program, argv

sys.addaudithook(_record)
_handler = logging.FileHandler(os.environ["SECRETS_TEST_LOG"])
_handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
logging.getLogger().addHandler(_handler)
logging.getLogger().setLevel(logging.DEBUG)
"""


def needles(user: str, secret: str) -> dict[str, bytes]:
    return {
        "the secret": secret.encode(),
        "base64 of user:secret": base64.b64encode(f"{user}:{secret}".encode()),
        "base64 of the secret": base64.b64encode(secret.encode()).rstrip(b"="),
        "the URL-quoted secret": urllib.parse.quote(secret, safe="").encode(),
    }


def leaks(paths: list[Path], user: str, secret: str) -> list[str]:
    """'<file>: <what>' for every file under `paths` holding any form of the secret."""
    found = []
    for top in paths:
        for path in [top] if top.is_file() else sorted(top.rglob("*")):
            if not path.is_file() or path.is_symlink():
                continue
            data = path.read_bytes()
            found += [f"{path}: {what}" for what, n in needles(user, secret).items() if n in data]
    return found


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Iterator[str]:
    """A Basic-auth registry whose only user's password is SECRET, holding
    gpustack/gpustack:v0.7.1-cpu for linux/amd64; yields its host."""
    root = tmp_path_factory.mktemp("secrets-registry")
    (root / "htpasswd").write_text(bcrypt_htpasswd(USER, SECRET))
    auth = {"htpasswd": {"realm": "fixture", "path": str(root / "htpasswd")}}
    with plain_registry(root / "registry", auth) as started:
        basic = "Basic " + base64.b64encode(f"{USER}:{SECRET}".encode()).decode()
        Pusher(started.url, lambda _repo: basic).tag(
            "gpustack/gpustack", "v0.7.1-cpu", [single_image("secrets", AMD64)]
        )
        yield started.host


def build_with(root: Path, base: Path, host: str, extra_env: dict[str, str]) -> list[Path]:
    """`invoke lock` and `invoke bundle` for CELL under `base`; returns what to search."""
    (base / "hook").mkdir(parents=True)
    (base / "hook" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUSTACK_OFFLINE_")}
    env.update(
        GPUSTACK_OFFLINE_DIST_DIR=str(base / "dist"),
        GPUSTACK_OFFLINE_CACHE_DIR=str(base / "cache"),
        GPUSTACK_OFFLINE_IMAGES_PINS_DIR=str(base / "pins"),
        GPUSTACK_OFFLINE_PROGRESS="false",
        GPUSTACK_OFFLINE_REGISTRY_MIRROR=host,
        DOCKER_CONFIG=str(base / "no-docker-config"),
        PYTHONPATH=str(base / "hook"),
        SECRETS_TEST_ARGV=str(base / "argv.jsonl"),
        SECRETS_TEST_LOG=str(base / "log.txt"),
    )
    env.update(extra_env)
    for args in (["lock", "--cell", CELL], ["bundle", "--cell", CELL]):
        proc = subprocess.run([INVOKE, *args], cwd=root, env=env, capture_output=True,
                              check=False)  # fmt: skip
        (base / f"{args[0]}.out").write_bytes(proc.stdout + proc.stderr)
        assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()
    assert (base / "dist" / CELL / "manifest.json").is_file()
    assert "git" in (base / "argv.jsonl").read_text()  # the hook did see the children
    assert "gpustack_offline" in (base / "log.txt").read_text()  # and the log records
    return [base / "dist", base / "cache", base / "pins", base / "argv.jsonl", base / "log.txt",
            base / "lock.out", base / "bundle.out"]  # fmt: skip


def test_a_registry_password_from_the_environment_is_nowhere_in_output(root, registry, tmp_path):
    env = {host_env_name(registry): f"{USER}:{SECRET}"}
    searched = build_with(root, tmp_path, registry, env)
    assert leaks(searched, USER, SECRET) == []


def test_a_registry_password_from_a_docker_config_is_nowhere_in_output(root, registry, tmp_path):
    config = tmp_path / "docker-config"
    config.mkdir()
    auth = base64.b64encode(f"{USER}:{SECRET}".encode()).decode()
    (config / "config.json").write_text(json.dumps({"auths": {registry: {"auth": auth}}}))
    searched = build_with(root, tmp_path / "build", registry, {"DOCKER_CONFIG": str(config)})
    assert leaks(searched, USER, SECRET) == []


def test_the_leak_search_finds_a_planted_secret(tmp_path):
    """The search above can fail: each form of the secret in a file is found."""
    for needle in needles(USER, SECRET).values():
        (tmp_path / f"{hashlib.sha256(needle).hexdigest()}.bin").write_bytes(b"x" + needle)
    assert len(leaks([tmp_path], USER, SECRET)) >= len(needles(USER, SECRET))


# -- an index password ------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def tiny_wheel() -> tuple[str, bytes]:
    name = "secret_probe-1.0-py3-none-any.whl"
    files = {
        "secret_probe/__init__.py": b"",
        "secret_probe-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: secret-probe\n"
        b"Version: 1.0\n",
        "secret_probe-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\n"
        b"Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{path},sha256={_b64(data)},{len(data)}\n" for path, data in files.items())
    record += "secret_probe-1.0.dist-info/RECORD,,\n"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
        zf.writestr("secret_probe-1.0.dist-info/RECORD", record)
    return name, buffer.getvalue()


@pytest.fixture(scope="module")
def private_index() -> Iterator[tuple[str, list[str]]]:
    """A PEP 503 index on 127.0.0.1 that answers 401 without USER:SECRET; yields its base URL
    (no credentials) and the Authorization headers it was sent."""
    name, wheel = tiny_wheel()
    digest = hashlib.sha256(wheel).hexdigest()
    expected = "Basic " + base64.b64encode(f"{USER}:{SECRET}".encode()).decode()
    seen: list[str] = []

    class Index(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self.do_GET(head=True)

        def do_GET(self, head: bool = False) -> None:
            seen.append(self.headers.get("Authorization") or "")
            if self.headers.get("Authorization") != expected:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="index"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if self.path.rstrip("/") == "/simple/secret-probe":
                body = f'<a href="/files/{name}#sha256={digest}">{name}</a>'.encode()
            elif self.path == f"/files/{name}":
                body = wheel
            else:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            kind = "text/html" if self.path.startswith("/simple") else "application/octet-stream"
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    with serving(Index, name="secrets-index") as url:
        yield url.removeprefix("http://"), seen


_CHILDREN: list[str] = []


def _record_children(event: str, args: tuple[object, ...]) -> None:
    if event in ("subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn"):
        _CHILDREN.append(repr(args[:2]))  # program and argv; the environment is private


def test_an_index_password_is_not_in_the_resolvers_argv_logs_or_lock(
    root, matrix, private_index, tmp_path, caplog
):
    host, seen = private_index
    sys.addaudithook(_record_children)  # audit hooks cannot be removed; it only appends
    _CHILDREN.clear()
    cell = matrix.cell(PIP_CELL)
    inputs = Inputs(
        requirements=("secret-probe==1.0",),
        platform=cell.uv_platform,
        python=cell.python,
        index_url=f"http://{USER}:{SECRET}@{host}/simple",
    )
    caplog.set_level(logging.DEBUG)
    lock = make_lock(cell, inputs, tmp_path / "locks", tmp_path / "cache")
    assert "secret-probe" in lock.read_text()  # it resolved through the index
    assert any(h for h in seen)  # with the credentials
    (tmp_path / "children.txt").write_text("\n".join(_CHILDREN))
    (tmp_path / "log.txt").write_text(caplog.text)
    found = leaks([tmp_path / "locks", tmp_path / "children.txt", tmp_path / "log.txt"],
                  USER, SECRET)  # fmt: skip
    assert found == []
    # a new password is not a new input: the lock stays current
    rotated = Inputs(**{**inputs.__dict__, "index_url": f"http://{USER}:other@{host}/simple"})
    assert rotated.digest() == inputs.digest()
