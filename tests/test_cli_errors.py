"""No traceback reaches a user: bad inputs and environment faults driven through the real `invoke`
(and `nox`), each ending in exactly one `error:` line that names the thing and the fix, exit 2.

Every case here fails before anything is downloaded, so the table runs in seconds; the cases that
need a registry or a full disk live in test_bad_inputs.py.
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.loopback import serving
from support.prompt import as_at_a_prompt
from support.registry_fixture import _free_port

from gpustack_offline.core.files import held

INVOKE = Path(sys.executable).with_name("invoke")
NOX = Path(sys.executable).with_name("nox")
PIP_CELL = "v0.7.1-linux-amd64-cpu-py3.11-base-pip"
DOCKER_CELL = "v0.7.1-linux-amd64-cpu-py3.11-base-docker"
ROOT = Path(__file__).resolve().parent.parent
MATRIX = (ROOT / "bundles" / "matrix.toml").read_text()


@pytest.fixture
def area(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUSTACK_OFFLINE_")}
    env.update(
        GPUSTACK_OFFLINE_DIST_DIR=str(tmp_path / "dist"),
        GPUSTACK_OFFLINE_CACHE_DIR=str(tmp_path / "cache"),
        GPUSTACK_OFFLINE_IMAGES_PINS_DIR=str(tmp_path / "pins"),
        GPUSTACK_OFFLINE_LOCKS_DIR=str(tmp_path / "locks"),
        GPUSTACK_OFFLINE_PROGRESS="false",
        DOCKER_CONFIG=str(tmp_path / "docker-config"),
    )
    return env


def one_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The run failed with status 2, no traceback and exactly one `error:` line; its text with
    line wrapping undone."""
    out = proc.stdout + proc.stderr
    print(out)
    assert proc.returncode == 2, out
    assert "Traceback" not in out, out
    errors = re.findall(r"^error: ", out, re.M)
    assert len(errors) == 1, out
    return re.sub(r"\s*\n\s*", " ", out)


def invoke(env: Mapping[str, str], *args: str, **kwargs: object) -> str:
    proc: subprocess.CompletedProcess[str] = subprocess.run(  # type: ignore[call-overload]
        [INVOKE, *args], cwd=ROOT, env=dict(env), capture_output=True, text=True, timeout=240,
        check=False, **kwargs,
    )  # fmt: skip
    return one_error(proc)


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    expect: tuple[str, ...]  # each must appear in the output ({tmp} is the test's folder)
    env: Mapping[str, str] = None  # type: ignore[assignment]  # extra environment ({tmp} too)
    files: Mapping[str, str] = None  # type: ignore[assignment]  # files to write first


def matrix_with(old: str, new: str) -> str:
    assert old in MATRIX
    return MATRIX.replace(old, new, 1)


CASES = {
    "unknown cell": Case(("bundle", "--cell", "v0.7.1-linux-amd64-tpu-py3.11-base-pip"),
                         ("unknown device 'tpu'", "nearest valid")),
    "impossible cell": Case(("bundle", "--cell", "v0.7.1-windows-arm64-cpu-py3.11-base-pip"),
                            ("impossible: GPUStack's Windows tools",)),
    "not a cell id": Case(("bundle", "--cell", "gpustack-latest"), ("not a cell id",)),
    "pattern matches nothing": Case(("matrix", "--cell", "v9*"), ("matches no cell",)),
    "old python": Case(("bundle", "--python", "3.9"), ("unknown python 3.9 (known: 3.10",)),
    "new python cell": Case(("bundle", "--cell", "v0.7.1-linux-amd64-cpu-py3.13-base-pip"),
                            ("unknown python '3.13'",)),
    "unknown arch": Case(("matrix", "--arch", "riscv64"), ("unknown arch riscv64", "amd64")),
    "unknown version": Case(("matrix", "--version", "9.9.9"), ("unknown version 9.9.9",)),
    "empty selection": Case(("matrix", "--version", "2.3.0", "--device", "cpu"),
                            ("no cell matches", "and cpu is none of them")),
    "misspelt variable": Case(("matrix",), ("did you mean 'GPUSTACK_OFFLINE_JOBS'",),
                              env={"GPUSTACK_OFFLINE_JOB": "3"}),
    "jobs not a number": Case(("matrix",), ("option jobs must be a whole number",),
                              env={"GPUSTACK_OFFLINE_JOBS": "many"}),
    "jobs flag not a number": Case(("bundle", "--jobs", "many"),
                                   ("command line: option jobs must be a whole number",)),
    "frozen not a boolean": Case(("matrix",), ("option frozen must be true or false",),
                                 env={"GPUSTACK_OFFLINE_FROZEN": "maybe"}),
    "missing matrix": Case(("matrix",), ("matrix file {tmp}/none.toml not found",),
                           env={"GPUSTACK_OFFLINE_MATRIX": "{tmp}/none.toml"}),
    "matrix is a folder": Case(("matrix",), ("{tmp}: Is a directory", "Fix: check that path"),
                               env={"GPUSTACK_OFFLINE_MATRIX": "{tmp}"}),
    "matrix not toml": Case(("matrix",), ("{tmp}/m.toml: not valid TOML",),
                            env={"GPUSTACK_OFFLINE_MATRIX": "{tmp}/m.toml"},
                            files={"m.toml": matrix_with('arch = ["amd64", "arm64"]',
                                                         'arch = ["amd64" "arm64"]')}),
    "matrix scalar axis": Case(("matrix",), ("[axes] arch must be a list of strings",),
                               env={"GPUSTACK_OFFLINE_MATRIX": "{tmp}/m.toml"},
                               files={"m.toml": matrix_with('arch = ["amd64", "arm64"]',
                                                            'arch = "amd64"')}),
    "matrix unknown schema": Case(("matrix",), ("unknown schema 7",),
                                  env={"GPUSTACK_OFFLINE_MATRIX": "{tmp}/m.toml"},
                                  files={"m.toml": matrix_with("schema = 1", "schema = 7")}),
    "matrix rule without reason": Case(("matrix",), ("each rule needs when, require and reason",),
                                       env={"GPUSTACK_OFFLINE_MATRIX": "{tmp}/m.toml"},
                                       files={"m.toml": matrix_with('reason = "GPUStack 0.6/',
                                                                    'rason = "GPUStack 0.6/')}),
    "overrides not toml": Case(("bundle", "--cell", PIP_CELL), ("{tmp}/o.toml: not valid TOML",),
                               env={"GPUSTACK_OFFLINE_OVERRIDES": "{tmp}/o.toml"},
                               files={"o.toml": '[[override]]\nselect = "*"\nconstraints = [\n'}),
    "overrides unknown key": Case(("bundle", "--cell", PIP_CELL), ("unknown keys ['pins']",),
                                  env={"GPUSTACK_OFFLINE_OVERRIDES": "{tmp}/o.toml"},
                                  files={"o.toml": '[[override]]\nselect = "*"\npins = []\n'}),
    "frozen without a lock": Case(("bundle", "--cell", PIP_CELL, "--frozen"),
                                  (f"no lock for {PIP_CELL}", "invoke lock --cell")),
    "frozen with a stale lock": Case(
        ("bundle", "--cell", PIP_CELL, "--frozen"), ("is stale", "invoke lock --cell"),
        files={f"locks/{PIP_CELL}/pylock.toml":
               '[tool.gpustack-offline]\ncell = "x"\ninputs-digest = "0"\n'}),
    "lock not toml": Case(("bundle", "--cell", PIP_CELL, "--frozen"),
                          (f"{{tmp}}/locks/{PIP_CELL}/pylock.toml: not valid TOML",),
                          files={f"locks/{PIP_CELL}/pylock.toml": "[packages\n"}),
    "missing pins": Case(("bundle", "--cell", DOCKER_CELL),
                         ("{tmp}/pins/gpustack-0.7.1.toml does not exist", "invoke lock")),
    "pins not toml": Case(("bundle", "--cell", DOCKER_CELL),
                          ("{tmp}/pins/gpustack-0.7.1.toml: not valid TOML",),
                          files={"pins/gpustack-0.7.1.toml": "schema = 1\n[tags\n"}),
    "no docker daemon": Case(("images.base", "--arch", "amd64"),
                             ("cannot reach the Docker Engine", "DOCKER_HOST"),
                             env={"DOCKER_HOST": "unix://{tmp}/no.sock"}),
    "bad split size": Case(("bundle", "--cell", PIP_CELL, "--split", "4X"), ("4X",)),
    "volumes without a size": Case(("bundle", "--cell", PIP_CELL, "--write", "volumes"),
                                   ("write=volumes needs a volume size", "--split 4G")),
    "bad write choice": Case(("bundle", "--cell", PIP_CELL, "--write", "zip", "--split", "4G"),
                             ("write='zip' is not one of tar, volumes, both",)),
    "compare missing bundles": Case(("compare", "{tmp}/a", "{tmp}/b"), ("{tmp}/a",)),
    "release merge of nothing": Case(("release-index", "--merge", "{tmp}/none", "--out",
                                      "{tmp}/out"), ("{tmp}/none",)),
}  # fmt: skip


def _fill(text: str, tmp: Path) -> str:
    return text.replace("{tmp}", str(tmp))


@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_input_is_one_error_line_with_its_fix(name, area, tmp_path):
    case = CASES[name]
    for rel, text in (case.files or {}).items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    env = {**area, **{k: _fill(v, tmp_path) for k, v in (case.env or {}).items()}}
    out = invoke(env, *(_fill(a, tmp_path) for a in case.args))
    for expected in case.expect:
        assert _fill(expected, tmp_path) in out, out


def test_the_debug_switch_shows_the_traceback(area, tmp_path):
    env = {**area, "GPUSTACK_OFFLINE_MATRIX": str(tmp_path), "GPUSTACK_OFFLINE_DEBUG": "1"}
    proc = subprocess.run([INVOKE, "matrix"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" in proc.stderr and "IsADirectoryError" in proc.stderr


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Read-only tmpfs mounts (root ignores permissions, not a read-only file system)."""
    mounted: list[Path] = []

    def mount(name: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                       check=True)  # fmt: skip
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.parametrize("option", ["dist-dir", "cache-dir"])
def test_a_read_only_folder_names_the_option_and_the_fix(option, area, read_only):
    folder = read_only("ro")
    env = {**area, f"GPUSTACK_OFFLINE_{option.upper().replace('-', '_')}": str(folder)}
    out = invoke(env, "bundle", "--cell", PIP_CELL)
    assert f"cannot write to {folder} (the {option} option): read-only file system" in out
    assert f"point {option} at a writable folder" in out


def test_a_folder_this_user_may_not_write_is_named(area, tmp_path):
    """The suite runs as root, whom permissions do not stop: the build runs as root without
    the capability that overrides them, against a dist folder that belongs to someone else."""
    dist = tmp_path / "theirs"
    dist.mkdir()
    shutil.chown(dist, "nobody", "nogroup")
    os.chmod(dist, 0o755)
    env = {**area, "GPUSTACK_OFFLINE_DIST_DIR": str(dist)}
    argv = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", str(INVOKE), "bundle",
            "--cell", PIP_CELL]  # fmt: skip
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                          check=False)  # fmt: skip
    out = one_error(proc)
    assert f"cannot write to {dist} (the dist-dir option): permission denied" in out


def test_a_second_build_of_a_cell_into_the_same_dist_names_the_first(area):
    dist = Path(area["GPUSTACK_OFFLINE_DIST_DIR"])
    lock = dist / f".{PIP_CELL}.lock"
    with held(lock, "a build in this test"):
        out = invoke(area, "bundle", "--cell", PIP_CELL)
    assert f"another build of {PIP_CELL} is writing into {dist}: " in out, out
    assert f"pid {os.getpid()} (" in out and "build into another dist-dir" in out
    assert not lock.exists()  # the holder leaves no lock file behind


class _NotAnIndex(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        body = b"<html><body>Welcome to nginx</body></html>"
        self.send_response(404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def not_an_index() -> Iterator[str]:
    with serving(_NotAnIndex, name="not-an-index") as url:
        yield f"{url}/simple"


@pytest.mark.enable_socket
def test_an_unreachable_index_says_cannot_reach_not_pin_something(area):
    env = {**area, "GPUSTACK_OFFLINE_INDEX_URL": f"http://127.0.0.1:{_free_port()}/simple",
           "UV_HTTP_TIMEOUT": "5", "UV_HTTP_RETRIES": "0"}  # fmt: skip
    out = invoke(env, "lock", "--cell", PIP_CELL)
    assert "cannot reach 127.0.0.1: connection refused" in out and "index-url" in out, out
    assert "overrides.toml" not in out


@pytest.mark.enable_socket
def test_a_url_that_is_no_index_is_named_as_such(area, not_an_index):
    env = {**area, "GPUSTACK_OFFLINE_INDEX_URL": not_an_index, "UV_HTTP_RETRIES": "0"}
    out = invoke(env, "lock", "--cell", PIP_CELL)
    assert f"{not_an_index} is not a package index" in out and "answered 404" in out, out
    assert "overrides.toml" not in out


@pytest.mark.enable_socket
def test_an_interrupt_is_one_line_too(area, tmp_path):
    """Ctrl-C while uv waits on an index that never answers."""
    listener = __import__("socket").create_server(("127.0.0.1", 0))
    env = {**area, "GPUSTACK_OFFLINE_INDEX_URL":
           f"http://127.0.0.1:{listener.getsockname()[1]}/simple"}  # fmt: skip
    proc = subprocess.Popen([INVOKE, "lock", "--cell", PIP_CELL], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=as_at_a_prompt)  # fmt: skip
    listener.settimeout(60)
    waiting, _ = listener.accept()  # uv asked the index and waits on it: interrupt it now
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    waiting.close()
    listener.close()
    out = one_error(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    assert "interrupted" in out


def test_nox_verify_lists_bundles_of_the_dist_dir_option(area, tmp_path):
    dist = tmp_path / "elsewhere"
    (dist / PIP_CELL).mkdir(parents=True)
    (dist / PIP_CELL / "manifest.json").write_text("{}")
    env = {**area, "GPUSTACK_OFFLINE_DIST_DIR": str(dist)}
    listed = subprocess.run([NOX, "-l"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120, check=False)  # fmt: skip
    assert f"verify({PIP_CELL})" in listed.stdout, listed.stdout + listed.stderr
    empty = {**area, "GPUSTACK_OFFLINE_DIST_DIR": str(tmp_path / "none")}
    proc = subprocess.run([NOX, "-s", "verify"], cwd=ROOT, env=empty, capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out, out
    assert f"no bundles under {tmp_path / 'none'} (the dist-dir option)" in out, out


def test_axis_help_lists_the_matrix_values():
    import tomllib

    axes = tomllib.loads(MATRIX)["axes"]
    proc = subprocess.run([INVOKE, "--help", "bundle"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=True)  # fmt: skip
    shown = re.sub(r"\s+", " ", proc.stdout)
    for axis in ("device", "method", "extras", "version"):
        assert ", ".join(axes[axis]) in shown, (axis, shown)
    assert re.search(r"-f, --frozen\s", proc.stdout), proc.stdout  # a flag, no value
