"""The target-host scripts (scripts/preflight.sh, scripts/install.sh,
scripts/check-tools-archive.py), run for real with bash and Python.

Each test builds a small bundle in tmp_path around a real wheel: a tiny package that provides a
`gpustack` console script, built offline with `pip wheel` through a dependency-free in-tree
PEP 517 backend. Its `download-tools --load-archive` unpacks the way upstream's does
(shutil.unpack_archive, no filter), so a hostile tools archive that got past the check would
really write where it points. The only fake is `nvidia-smi`, because this host has no NVIDIA
driver.

Tests that run install.sh through to its pip install (seconds each) are in the `target` tier,
out of `nox -s unit`; the argument, preflight and checker tests stay in the unit tier.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from gpustack_offline.bundle import signing

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"

HOST_PY = f"{sys.version_info.major}.{sys.version_info.minor}"
OTHER_PY = "3.12" if HOST_PY != "3.12" else "3.10"
HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
OTHER_ARCH = "arm64" if HOST_ARCH == "amd64" else "amd64"
GPUSTACK_VERSION = "0.7.1"

README_KEYS = {
    "BUNDLE_CELL", "GPUSTACK_VERSION", "TARGET_OS", "TARGET_ARCH", "TARGET_DEVICE",
    "TARGET_PYTHON", "TARGET_EXTRAS", "GLIBC_FLOOR", "CUDA_FLOOR", "ROCM_FLOOR", "REQUIREMENT",
    "TOOLS_ARCHIVE", "IMAGE_ARCHIVE", "IMAGES", "INSTALLER_WHEEL", "START_MODULES",
}  # fmt: skip
TOOLS_ARCHIVE = "tools/gpustack-tools.tar.gz"
CHECKER = "check-tools-archive.py"

# ---------------------------------------------------------------------------------------------
# Fixture package: a stand-in `gpustack` distribution with a console script.

BACKEND_SOURCE = '''\
"""PEP 517 backend with no build requirements, so `pip wheel` works with no index at all."""
import base64
import hashlib
import zipfile
from pathlib import Path

NAME, VERSION = "gpustack", "{version}"
DIST_INFO = f"{{NAME}}-{{VERSION}}.dist-info"


def _record_line(name, data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{{name}},sha256={{digest}},{{len(data)}}"


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    metadata = f"Metadata-Version: 2.1\\nName: {{NAME}}\\nVersion: {{VERSION}}\\n"
    wheel = "Wheel-Version: 1.0\\nGenerator: tiny\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n"
    files = {{
        "gpustack/__init__.py": Path("gpustack/__init__.py").read_bytes(),
        "gpustack/cmd/__init__.py": b"",
        "gpustack/cmd/start.py": b"from gpustack import main  # imports, as upstream's does\\n",
        "gpustack/assets/model-catalog.yaml": b"[]\\n",
        f"{{DIST_INFO}}/METADATA": metadata.encode(),
        f"{{DIST_INFO}}/WHEEL": wheel.encode(),
        f"{{DIST_INFO}}/entry_points.txt": b"[console_scripts]\\ngpustack = gpustack:main\\n",
    }}
    record = [_record_line(name, data) for name, data in files.items()]
    record.append(f"{{DIST_INFO}}/RECORD,,")
    files[f"{{DIST_INFO}}/RECORD"] = ("\\n".join(record) + "\\n").encode()
    wheel_name = f"{{NAME}}-{{VERSION}}-py3-none-any.whl"
    with zipfile.ZipFile(Path(wheel_directory) / wheel_name, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return wheel_name
'''

PACKAGE_SOURCE = """\
import os
import shutil
import sys


def main():
    args = sys.argv[1:]
    if args == ["version"]:
        print("gpustack {version} (test fixture)")
        return 0
    if len(args) == 3 and args[:2] == ["download-tools", "--load-archive"]:
        # As upstream 0.6/0.7: download-tools refuses a base URL with --load-archive, and
        # ToolsManager.load_archive unpacks into the package's third_party/bin with no filter.
        if os.environ.get("GPUSTACK_TOOLS_DOWNLOAD_BASE_URL"):
            print("Cannot specify both load-archive and tools-download-base-url.", file=sys.stderr)
            return 1
        bin_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "third_party", "bin")
        os.makedirs(bin_path, exist_ok=True)
        shutil.unpack_archive(args[2], bin_path)
        return 0
    print("test fixture: only 'version' and 'download-tools --load-archive' work", file=sys.stderr)
    return 2
"""

PYPROJECT = """\
[build-system]
requires = []
build-backend = "tiny_backend"
backend-path = ["."]
"""


def build_gpustack_wheel(workdir: Path, version: str = GPUSTACK_VERSION) -> Path:
    """Build the fixture package into a real wheel with `pip wheel`, offline."""
    src = workdir / "src"
    (src / "gpustack").mkdir(parents=True)
    (src / "pyproject.toml").write_text(PYPROJECT)
    (src / "tiny_backend.py").write_text(BACKEND_SOURCE.format(version=version))
    (src / "gpustack" / "__init__.py").write_text(PACKAGE_SOURCE.format(version=version))
    out = workdir / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-index", "--no-deps",
         "--disable-pip-version-check", "-w", str(out), str(src)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    (wheel,) = out.glob("gpustack-*.whl")
    return wheel


@pytest.fixture(scope="session")
def gpustack_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_gpustack_wheel(tmp_path_factory.mktemp("wheel"))


# ---------------------------------------------------------------------------------------------
# Bundle building


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def bundle_env(**overrides: str) -> dict[str, str]:
    """bundle.env values for a cell this host satisfies, with overrides."""
    env = {
        "GPUSTACK_VERSION": GPUSTACK_VERSION,
        "TARGET_OS": "linux",
        "TARGET_ARCH": HOST_ARCH,
        "TARGET_DEVICE": "cpu",
        "TARGET_PYTHON": HOST_PY,
        "TARGET_EXTRAS": "base",
        "INSTALL_METHOD": "pip",
        "GLIBC_FLOOR": "2.29",
        "CUDA_FLOOR": "",
        "ROCM_FLOOR": "",
        "REQUIREMENT": f"gpustack=={GPUSTACK_VERSION}",
        "TOOLS_ARCHIVE": "",
        "INSTALLER_WHEEL": "",
        "START_MODULES": "",
    }
    env.update(overrides)
    if env["TARGET_DEVICE"].startswith("cuda") and "CUDA_FLOOR" not in overrides:
        env["CUDA_FLOOR"] = env["TARGET_DEVICE"].removeprefix("cuda")
    env.setdefault(
        "BUNDLE_CELL",
        "v{GPUSTACK_VERSION}-{TARGET_OS}-{TARGET_ARCH}-{TARGET_DEVICE}"
        "-py{TARGET_PYTHON}-{TARGET_EXTRAS}-{INSTALL_METHOD}".format(**env),
    )
    return env


def write_sha256sums(bundle: Path) -> None:
    """List every file but SHA256SUMS itself, in `sha256sum -c` format."""
    lines = [
        f"{sha256_file(p)}  {p.relative_to(bundle).as_posix()}\n"
        for p in sorted(bundle.rglob("*"))
        if p.is_file() and p.name != "SHA256SUMS"
    ]
    (bundle / "SHA256SUMS").write_text("".join(lines))


def render_readme(template: Path, env: dict[str, str]) -> str:
    """As the build renders it: an empty value shows as '-'."""
    return re.sub(r"\{\{([A-Z_]+)\}\}", lambda m: env[m.group(1)] or "-", template.read_text())


def make_bundle(
    where: Path,
    wheel: Path,
    *,
    tools_archive: Path | None = None,
    installer: Path | None = None,
    **overrides: str,
) -> Path:
    """A complete bundle folder, laid out as the build writes it, around `wheel`.

    With `tools_archive`, that file is carried as tools/gpustack-tools.tar.gz and named in
    bundle.env; check-tools-archive.py is in every bundle, as install.sh is. With `installer`,
    that uv wheel is carried in wheels/ and named as INSTALLER_WHEEL, outside requirements.txt.
    """
    if tools_archive is not None:
        overrides.setdefault("TOOLS_ARCHIVE", TOOLS_ARCHIVE)
    if installer is not None:
        overrides.setdefault("INSTALLER_WHEEL", f"wheels/{installer.name}")
        overrides.setdefault("START_MODULES", "start-modules.txt")
    env = bundle_env(**overrides)
    bundle = where / "bundle"
    wheels = bundle / "wheels"
    (wheels / "simple" / "gpustack").mkdir(parents=True)
    shutil.copy2(wheel, wheels / wheel.name)
    if installer is not None:
        shutil.copy2(installer, wheels / installer.name)
        # as the build lists what the start loads (here not cmd/__init__), and a file the
        # target's release lacks
        (bundle / "start-modules.txt").write_text(
            "gpustack/__init__.py\ngpustack/cmd/start.py\ngone/module.py\n"
        )
    digest = sha256_file(wheel)
    (wheels / "simple" / "index.html").write_text('<a href="gpustack/">gpustack</a>\n')
    (wheels / "simple" / "gpustack" / "index.html").write_text(
        f'<a href="../../{wheel.name}#sha256={digest}">{wheel.name}</a>\n'
    )
    (bundle / "requirements.txt").write_text(
        f"gpustack=={GPUSTACK_VERSION} --hash=sha256:{digest}\n"
    )
    (bundle / "bundle.env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    (bundle / "manifest.json").write_text(json.dumps({"cell": env["BUNDLE_CELL"]}) + "\n")
    for name in ("install.sh", "check-sums.sh", "preflight.sh", CHECKER, "verify-signature.sh"):
        shutil.copy2(SCRIPTS / name, bundle / name)
    if tools_archive is not None:
        (bundle / "tools").mkdir()
        shutil.copy2(tools_archive, bundle / TOOLS_ARCHIVE)
    for name in ("README.md", "README.zh-CN.md"):
        (bundle / name).write_text(render_readme(SCRIPTS / name, env), encoding="utf-8")
    write_sha256sums(bundle)
    return bundle


def release_name(bundle: Path) -> str:
    cell = re.search(r"^BUNDLE_CELL=(.*)$", (bundle / "bundle.env").read_text(), re.M)
    assert cell
    return f"{cell.group(1)}-{sha256_file(bundle / 'SHA256SUMS')[:12]}"


# ---------------------------------------------------------------------------------------------
# Running the scripts


def run_script(
    bundle: Path,
    script: str,
    *args: str,
    path_prepend: Path | None = None,
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **(extra_env or {})}
    if path_prepend is not None:
        env["PATH"] = f"{path_prepend}{os.pathsep}{env['PATH']}"
    return subprocess.run(
        ["bash", str(bundle / script), *args],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip


def preflight_json(bundle: Path, *args: str, path_prepend: Path | None = None) -> tuple[int, dict]:
    proc = run_script(
        bundle, "preflight.sh", "--json", "--python", sys.executable, *args,
        path_prepend=path_prepend,
    )  # fmt: skip
    assert proc.stdout.count("\n") == 1, proc.stdout  # exactly one JSON object, one line
    return proc.returncode, json.loads(proc.stdout)


def check(report: dict, name: str) -> dict:
    (found,) = [c for c in report["checks"] if c["name"] == name]
    return found


def install(
    bundle: Path, prefix: Path, *args: str, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run_script(
        bundle, "install.sh", "--prefix", str(prefix), "--python", sys.executable, *args,
        extra_env=extra_env,
    )  # fmt: skip


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root with what it is: link target, file digest or 'dir'."""
    if not root.exists():
        return {}
    state = {}
    for p in sorted(root.rglob("*")):
        key = p.relative_to(root).as_posix()
        if p.is_symlink():
            state[key] = "-> " + os.readlink(p)
        elif p.is_file():
            state[key] = sha256_file(p)
        else:
            state[key] = "dir"
    return state


FAKE_NVIDIA_SMI = """\
#!/bin/sh
# Stand-in for the driver's nvidia-smi: the header and CSV formats of a real one.
case "$*" in
  *--query-gpu=*)
    echo "0, NVIDIA A100-SXM4-80GB, 81920 MiB, 1 MiB, 0 %, 34"
    echo "1, NVIDIA A100-SXM4-80GB, 81920 MiB, 4021 MiB, 37 %, 41"
    exit 0 ;;
esac
cat <<'EOF'
Mon Nov 24 10:00:00 2025
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI {driver}              Driver Version: {driver}      CUDA Version: {cuda}     |
|-----------------------------------------+------------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
| Fan  Temp   Perf          Pwr:Usage/Cap |           Memory-Usage | GPU-Util  Compute M. |
|=========================================+========================+======================|
|   0  NVIDIA A100-SXM4-80GB          On  |   00000000:07:00.0 Off |                    0 |
| N/A   34C    P0             61W /  400W |       1MiB /  81920MiB |      0%      Default |
+-----------------------------------------+------------------------+----------------------+
EOF
"""


def fake_nvidia_smi(bindir: Path, cuda: str, driver: str = "550.54.15") -> Path:
    bindir.mkdir(parents=True, exist_ok=True)
    smi = bindir / "nvidia-smi"
    smi.write_text(FAKE_NVIDIA_SMI.format(cuda=cuda, driver=driver))
    smi.chmod(0o755)
    return bindir


# ---------------------------------------------------------------------------------------------
# Static checks


def test_shell_scripts_are_shellcheck_clean() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    scripts = sorted(str(p) for p in SCRIPTS.glob("*.sh"))
    assert scripts
    proc = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_readme_templates_use_only_bundle_env_placeholders() -> None:
    found = {}
    for name in ("README.md", "README.zh-CN.md"):
        found[name] = set(re.findall(r"\{\{([^}]*)\}\}", (SCRIPTS / name).read_text("utf-8")))
        assert found[name] <= README_KEYS, name
    assert found["README.md"] == found["README.zh-CN.md"]


def test_install_ps1_uses_the_same_pip_flags_as_install_sh() -> None:
    ps1 = (SCRIPTS / "install.ps1").read_text()
    for flag in ("--no-index", "--find-links", "--require-hashes", "--only-binary=:all:",
                 "--no-deps", "--disable-update-check"):  # fmt: skip
        assert flag in ps1, flag


def test_install_ps1_checks_and_loads_the_tools_archive_as_install_sh_does() -> None:
    ps1 = (SCRIPTS / "install.ps1").read_text()
    sh = (SCRIPTS / "install.sh").read_text()
    for needle in ("TOOLS_ARCHIVE", "check-tools-archive.py", "download-tools", "--load-archive",
                   "versions.json", "re-copy the bundle from the source media",
                   "GPUSTACK_TOOLS_DOWNLOAD_BASE_URL", "find_spec"):  # fmt: skip
        assert needle in ps1, needle
        assert needle in sh, needle


# ---------------------------------------------------------------------------------------------
# preflight.sh


def test_preflight_passes_for_a_cell_this_host_matches(
    tmp_path: Path, gpustack_wheel: Path
) -> None:
    bundle = make_bundle(tmp_path, gpustack_wheel)
    code, report = preflight_json(bundle, "--prefix", str(tmp_path / "prefix"))
    assert code == 0, report
    assert report["ok"] is True
    assert report["cell"] == f"v{GPUSTACK_VERSION}-linux-{HOST_ARCH}-cpu-py{HOST_PY}-base-pip"
    assert not [c for c in report["checks"] if c["status"] == "fail"]
    assert check(report, "python")["status"] == "ok"
    assert check(report, "nvidia-smi")["status"] == "skip"

    text = run_script(bundle, "preflight.sh", "--python", sys.executable)
    assert text.returncode == 0
    assert re.search(
        rf"^\[ ok \] python +{re.escape(platform.python_version())} at ", text.stdout, re.M
    )
    assert text.stdout.splitlines()[-1].startswith("preflight: passed")


def test_preflight_fails_a_python_of_another_version(tmp_path: Path, gpustack_wheel: Path) -> None:
    bundle = make_bundle(tmp_path, gpustack_wheel, TARGET_PYTHON=OTHER_PY)
    code, report = preflight_json(bundle)
    assert code == 1
    assert report["ok"] is False
    python = check(report, "python")
    assert python["status"] == "fail"
    assert platform.python_version() in python["detail"]
    assert OTHER_PY in python["fix"]


def test_preflight_fails_a_missing_python(tmp_path: Path, gpustack_wheel: Path) -> None:
    bundle = make_bundle(tmp_path, gpustack_wheel)
    proc = run_script(bundle, "preflight.sh", "--json", "--python", str(tmp_path / "nope"))
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert check(report, "python")["status"] == "fail"
    assert "not found" in check(report, "python")["detail"]
    assert check(report, "python-venv")["status"] == "skip"


def test_preflight_fails_another_architecture(tmp_path: Path, gpustack_wheel: Path) -> None:
    bundle = make_bundle(tmp_path, gpustack_wheel, TARGET_ARCH=OTHER_ARCH)
    code, report = preflight_json(bundle)
    assert code == 1
    assert check(report, "arch")["status"] == "fail"
    assert OTHER_ARCH in check(report, "arch")["detail"]
    assert check(report, "cpu")["status"] == "skip"


def test_preflight_fails_a_glibc_older_than_the_bundle_floor(
    tmp_path: Path, gpustack_wheel: Path
) -> None:
    bundle = make_bundle(tmp_path, gpustack_wheel, GLIBC_FLOOR="99.1")
    code, report = preflight_json(bundle)
    assert code == 1
    glibc = check(report, "glibc")
    assert glibc["status"] == "fail"
    assert "99.1" in glibc["detail"] and glibc["fix"]


def test_preflight_fails_a_windows_bundle(tmp_path: Path, gpustack_wheel: Path) -> None:
    bundle = make_bundle(tmp_path, gpustack_wheel, TARGET_OS="windows")
    code, report = preflight_json(bundle)
    assert code == 1
    assert check(report, "os")["status"] == "fail"


@pytest.mark.parametrize(
    ("device", "driver_cuda", "expect"),
    [
        ("cuda12.8", "12.4", "fail"),
        ("cuda12.4", "12.4", "ok"),
        ("cuda12.8", "12.10", "ok"),  # numeric per component: 12.10 > 12.8
        ("cuda12.4", "13.0", "ok"),
    ],
)
def test_preflight_compares_the_driver_cuda_version_with_the_bundle_floor(
    tmp_path: Path, gpustack_wheel: Path, device: str, driver_cuda: str, expect: str
) -> None:
    bundle = make_bundle(tmp_path, gpustack_wheel, TARGET_DEVICE=device)
    bindir = fake_nvidia_smi(tmp_path / "bin", driver_cuda)
    code, report = preflight_json(bundle, path_prepend=bindir)
    assert code == (1 if expect == "fail" else 0), report
    driver = check(report, "cuda-driver")
    assert driver["status"] == expect
    assert f"CUDA {driver_cuda}" in driver["detail"]
    gpus = check(report, "nvidia-smi")
    assert gpus["status"] == "ok"
    assert gpus["detail"].startswith("2 GPU(s): 0 NVIDIA A100-SXM4-80GB")
    if expect == "fail":
        assert "upgrade the NVIDIA driver" in driver["fix"]
        assert "cuda12.4 bundle" in driver["fix"]
    # nvcc and cuDNN only ever warn on the pip path
    assert check(report, "nvcc")["status"] in {"ok", "warn"}
    assert check(report, "cudnn")["status"] == "skip"


def test_preflight_fails_a_cuda_bundle_without_nvidia_smi(
    tmp_path: Path, gpustack_wheel: Path
) -> None:
    if shutil.which("nvidia-smi"):
        pytest.skip("this host has a real nvidia-smi")
    bundle = make_bundle(tmp_path, gpustack_wheel, TARGET_DEVICE="cuda12.4")
    code, report = preflight_json(bundle)
    assert code == 1
    assert check(report, "nvidia-smi")["status"] == "fail"
    assert "NVIDIA driver" in check(report, "nvidia-smi")["fix"]


def test_preflight_only_warns_about_cudnn_for_audio(tmp_path: Path, gpustack_wheel: Path) -> None:
    bundle = make_bundle(tmp_path, gpustack_wheel, TARGET_DEVICE="cuda12.4", TARGET_EXTRAS="audio")
    bindir = fake_nvidia_smi(tmp_path / "bin", "12.4")
    code, report = preflight_json(bundle, path_prepend=bindir)
    assert code == 0
    assert check(report, "cudnn")["status"] in {"ok", "warn"}


def test_preflight_json_escapes_quotes_and_backslashes(
    tmp_path: Path, gpustack_wheel: Path
) -> None:
    bundle = make_bundle(tmp_path, gpustack_wheel)
    odd = tmp_path / 'odd "dir" \\ with\ttab'
    odd.mkdir()
    (odd / "python3").symlink_to(sys.executable)
    proc = run_script(bundle, "preflight.sh", "--json", "--python", str(odd / "python3"))
    report = json.loads(proc.stdout)
    assert check(report, "python")["detail"].endswith(f" at {odd / 'python3'}")


def test_preflight_usage(tmp_path: Path, gpustack_wheel: Path) -> None:
    bundle = make_bundle(tmp_path, gpustack_wheel)
    assert run_script(bundle, "preflight.sh", "--help").returncode == 0
    bad = run_script(bundle, "preflight.sh", "--frobnicate")
    assert bad.returncode == 2
    assert "unknown argument: --frobnicate" in bad.stderr


# ---------------------------------------------------------------------------------------------
# install.sh: bundle integrity


def damage(bundle: Path, how: str) -> list[str]:
    """Damage the bundle one way; return the names the refusal must mention."""
    wheel = next((bundle / "wheels").glob("*.whl")).relative_to(bundle).as_posix()
    if how == "altered":
        with (bundle / wheel).open("ab") as f:
            f.write(b"\0")
        return [f"altered (checksum mismatch): {wheel}"]
    if how == "missing":
        (bundle / "requirements.txt").unlink()
        return ["missing: requirements.txt"]
    if how == "unexpected":
        (bundle / "wheels" / "evil-1.0-py3-none-any.whl").write_bytes(b"PK")
        (bundle / "notes.txt").write_text("hi\n")
        return [
            "unexpected file (not in SHA256SUMS): notes.txt",
            "unexpected file (not in SHA256SUMS): wheels/evil-1.0-py3-none-any.whl",
        ]
    if how == "malformed":
        sums = bundle / "SHA256SUMS"
        number = len(sums.read_text().splitlines()) + 1
        with sums.open("a") as f:
            f.write("not a checksum line\n")
        return [f"SHA256SUMS has a malformed line: {number}:not a checksum line"]
    raise AssertionError(how)


@pytest.mark.parametrize(
    "hows",
    [["altered"], ["missing"], ["unexpected"], ["malformed"], ["altered", "missing", "unexpected"]],
)
def test_install_refuses_a_damaged_bundle_and_names_each_file(
    tmp_path: Path, gpustack_wheel: Path, hows: list[str]
) -> None:
    bundle = make_bundle(tmp_path, gpustack_wheel)
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    (prefix / "keep.txt").write_text("site file\n")
    before = snapshot(prefix)
    expected = [line for how in hows for line in damage(bundle, how)]

    proc = install(bundle, prefix)

    assert proc.returncode == 3, proc.stderr
    for line in expected:
        assert f"install.sh: {line}\n" in proc.stderr
    last = proc.stderr.splitlines()[-1]
    assert last.startswith("install.sh: error: the bundle in ")
    assert "re-copy the whole bundle from the source media" in last
    assert snapshot(prefix) == before


def test_install_refuses_a_bundle_without_sha256sums(tmp_path: Path, gpustack_wheel: Path) -> None:
    bundle = make_bundle(tmp_path, gpustack_wheel)
    (bundle / "SHA256SUMS").unlink()
    prefix = tmp_path / "prefix"
    proc = install(bundle, prefix)
    assert proc.returncode == 3
    assert proc.stderr.startswith("install.sh: error: SHA256SUMS not found")
    assert not prefix.exists()


# ---------------------------------------------------------------------------------------------
# install.sh: installing


def assert_installed(prefix: Path, bundle: Path) -> None:
    name = release_name(bundle)
    assert os.readlink(prefix / "current") == f"releases/{name}"
    assert os.readlink(prefix / "bin" / "gpustack") == "../current/bin/gpustack"
    assert (prefix / "releases" / name / ".complete").is_file()
    version = subprocess.run(
        [str(prefix / "bin" / "gpustack"), "version"], capture_output=True, text=True, check=True
    )
    assert version.stdout.strip() == f"gpustack {GPUSTACK_VERSION} (test fixture)"


@pytest.mark.target
def test_install_puts_a_release_behind_current(tmp_path: Path, gpustack_wheel: Path) -> None:
    bundle = make_bundle(tmp_path, gpustack_wheel)
    prefix = tmp_path / "prefix"

    proc = install(bundle, prefix)

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_installed(prefix, bundle)
    assert "preflight: passed" in proc.stdout  # preflight ran first
    assert f"gpustack {GPUSTACK_VERSION} (test fixture)" in proc.stdout
    assert f"{prefix}/bin/gpustack start --config-file {prefix}/gpustack.yaml" in proc.stdout
    assert sorted(p.name for p in (prefix / "releases").iterdir()) == [release_name(bundle)]
    assert not list(prefix.glob(".current.tmp.*"))


@pytest.fixture(scope="module")
def release_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """The release's secret and public key, and another party's public key."""
    keys = tmp_path_factory.mktemp("keys")
    secret, public = signing.generate_key(keys, "release")
    _, other = signing.generate_key(keys, "someone else")
    return secret, public, other


@pytest.mark.target
def test_install_checks_the_signature_before_anything_else(
    tmp_path: Path, gpustack_wheel: Path, release_keys: tuple[Path, Path, Path]
) -> None:
    secret, public, other = release_keys
    bundle = make_bundle(tmp_path, gpustack_wheel)
    signing.sign(bundle, secret)
    prefix = tmp_path / "prefix"

    # signed by another key, altered after signing, not signed: refused (7), nothing installed
    wrong = install(bundle, prefix, "--verify-key", str(other))
    assert wrong.returncode == 7 and "signed by another key" in wrong.stderr, wrong.stderr
    assert "preflight" not in wrong.stdout and not prefix.exists()

    (bundle / "manifest.json").write_text('{"cell": "altered"}\n')
    write_sha256sums(bundle)  # the sums agree with the altered manifest; the signature does not
    altered = install(bundle, prefix, "--verify-key", str(public))
    assert altered.returncode == 7 and "BAD signature" in altered.stderr, altered.stderr
    assert not prefix.exists()

    (bundle / "SHA256SUMS.sig").unlink()
    unsigned = install(bundle, prefix, "--verify-key", str(public))
    assert unsigned.returncode == 7 and "this bundle is not signed" in unsigned.stderr
    assert not prefix.exists()

    # the good bundle with the right key installs; the signature is no "unexpected file"
    bundle = make_bundle(tmp_path / "good", gpustack_wheel)
    signing.sign(bundle, secret)
    good = install(bundle, prefix, "--verify-key", str(public))
    assert good.returncode == 0, good.stdout + good.stderr
    assert "signature good: SHA256SUMS signed by key" in good.stdout
    assert_installed(prefix, bundle)


@pytest.mark.target
def test_install_run_twice_is_idempotent(tmp_path: Path, gpustack_wheel: Path) -> None:
    bundle = make_bundle(tmp_path, gpustack_wheel)
    prefix = tmp_path / "prefix"
    assert install(bundle, prefix).returncode == 0
    before = snapshot(prefix)

    again = install(bundle, prefix)

    assert again.returncode == 0, again.stderr
    assert "is already installed; not reinstalling" in again.stdout
    assert snapshot(prefix) == before
    assert_installed(prefix, bundle)


@pytest.mark.target
def test_install_writes_the_air_gapped_configuration_once(
    tmp_path: Path, gpustack_wheel: Path
) -> None:
    bundle = make_bundle(tmp_path, gpustack_wheel)
    prefix = tmp_path / "prefix"
    first = install(bundle, prefix)
    assert first.returncode == 0, first.stderr
    config = (prefix / "gpustack.yaml").read_text()
    settings = dict(
        line.split(": ", 1) for line in config.splitlines() if line and not line.startswith("#")
    )
    assert set(settings) == {"model_catalog_file", "update_check_url", "tools_download_base_url"}
    catalog = Path(settings["model_catalog_file"])
    # through `current`, so the file stays right after the next release is installed
    assert str(catalog).startswith(f"{prefix}/current/") and catalog.read_text() == "[]\n"
    assert settings["update_check_url"] == "http://127.0.0.1:1/"
    env = (prefix / "gpustack.env").read_text()
    assert "HF_HUB_OFFLINE=1" in env and "DO_NOT_TRACK=1" in env
    assert f"--config-file {prefix}/gpustack.yaml" in first.stdout

    (prefix / "gpustack.yaml").write_text(config + "disable_update_check: true\n")
    again = install(make_bundle(tmp_path / "next", gpustack_wheel, REQUIREMENT="gpustack"), prefix)
    assert again.returncode == 0, again.stderr
    assert "kept the existing" in again.stdout
    assert (prefix / "gpustack.yaml").read_text().endswith("disable_update_check: true\n")


@pytest.mark.target
def test_install_redoes_a_release_an_earlier_run_left_incomplete(
    tmp_path: Path, gpustack_wheel: Path
) -> None:
    bundle = make_bundle(tmp_path, gpustack_wheel)
    prefix = tmp_path / "prefix"
    partial = prefix / "releases" / release_name(bundle)
    partial.mkdir(parents=True)
    (partial / "half-written").write_text("x")

    proc = install(bundle, prefix, "--skip-preflight")

    assert proc.returncode == 0, proc.stderr
    assert "removing the incomplete release" in proc.stdout
    assert "skipping preflight" in proc.stdout
    assert not (partial / "half-written").exists()
    assert_installed(prefix, bundle)


@pytest.mark.target
def test_a_new_release_switches_current_and_keeps_the_previous(
    tmp_path: Path, gpustack_wheel: Path
) -> None:
    old = make_bundle(tmp_path / "old", gpustack_wheel)
    new = make_bundle(tmp_path / "new", gpustack_wheel, TARGET_EXTRAS="audio")
    prefix = tmp_path / "prefix"
    assert install(old, prefix).returncode == 0

    proc = install(new, prefix)

    assert proc.returncode == 0, proc.stderr
    assert_installed(prefix, new)
    assert (prefix / "releases" / release_name(old) / ".complete").is_file()
    assert f"previous release kept: releases/{release_name(old)}" in proc.stdout


@pytest.mark.target
def test_a_failed_pip_install_leaves_no_release_and_current_untouched(
    tmp_path: Path, gpustack_wheel: Path
) -> None:
    good = make_bundle(tmp_path / "good", gpustack_wheel)
    prefix = tmp_path / "prefix"
    assert install(good, prefix).returncode == 0
    before = snapshot(prefix)

    bad = make_bundle(tmp_path / "bad", gpustack_wheel, TARGET_EXTRAS="audio")
    wrong_pin = f"gpustack=={GPUSTACK_VERSION} --hash=sha256:{'0' * 64}\n"
    (bad / "requirements.txt").write_text(wrong_pin)
    write_sha256sums(bad)  # the bundle is consistent; only the pin is wrong
    proc = install(bad, prefix)

    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert "install.sh: error: pip could not install the bundled wheels" in proc.stderr
    assert not (prefix / "releases" / release_name(bad)).exists()
    assert snapshot(prefix) == before
    assert_installed(prefix, good)


@pytest.mark.target
def test_install_ignores_the_hosts_pip_configuration(tmp_path: Path, gpustack_wheel: Path) -> None:
    bundle = make_bundle(tmp_path, gpustack_wheel)
    prefix = tmp_path / "prefix"
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("gpustack==0.0.1\n")
    pip_conf = tmp_path / "pip.conf"
    pip_conf.write_text("[install]\nuser = true\n")
    site_config = {"PIP_CONFIG_FILE": str(pip_conf), "PIP_CONSTRAINT": str(constraints)}

    proc = install(bundle, prefix, extra_env=site_config)

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_installed(prefix, bundle)


def test_install_stops_when_preflight_fails(tmp_path: Path, gpustack_wheel: Path) -> None:
    bundle = make_bundle(tmp_path, gpustack_wheel, TARGET_PYTHON=OTHER_PY)
    prefix = tmp_path / "prefix"
    proc = install(bundle, prefix)
    assert proc.returncode == 4
    assert "[fail] python" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == (
        "install.sh: error: preflight failed; fix the items above or pass --skip-preflight"
    )
    assert not prefix.exists()


def test_install_usage(tmp_path: Path, gpustack_wheel: Path) -> None:
    bundle = make_bundle(tmp_path, gpustack_wheel)
    assert run_script(bundle, "install.sh", "--help").returncode == 0
    bad = run_script(bundle, "install.sh", "--frobnicate")
    assert bad.returncode == 2
    assert bad.stderr.startswith("install.sh: error: unknown argument: --frobnicate")


# ---------------------------------------------------------------------------------------------
# The installer: the bundle's uv, pip where uv cannot run


def wheel_of_program(dest: Path, program: bytes, version: str) -> Path:
    """A wheel laid out as PyPI's uv wheels are: the program in uv-VERSION.data/scripts/."""
    tag = f"manylinux_2_17_{platform.machine()}"
    path = dest / f"uv-{version}-py3-none-{tag}.whl"
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        script = zipfile.ZipInfo(f"uv-{version}.data/scripts/uv")
        script.external_attr = 0o100755 << 16
        zf.writestr(script, program)
        meta = f"uv-{version}.dist-info"
        zf.writestr(f"{meta}/METADATA", f"Metadata-Version: 2.1\nName: uv\nVersion: {version}\n")
        zf.writestr(
            f"{meta}/WHEEL", f"Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: py3-none-{tag}\n"
        )
    return path


@pytest.fixture(scope="session")
def uv_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uv this project runs, in a wheel shaped like PyPI's (the build bundles PyPI's own)."""
    import uv

    binary = Path(uv.find_uv_bin())
    version = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, check=True
    ).stdout.split()[1]
    return wheel_of_program(tmp_path_factory.mktemp("uv"), binary.read_bytes(), version)


def compiled(prefix: Path) -> list[str]:
    """The package's modules with bytecode, as `gpustack/cmd/start`."""
    package = next((prefix / "current").glob("lib/python*/site-packages/gpustack"))
    return sorted(
        f"{p.parent.parent.relative_to(package.parent)}/{p.name.split('.')[0]}"
        for p in package.rglob("__pycache__/*.pyc")
    )


@pytest.mark.target
def test_install_installs_with_the_bundled_uv_and_byte_compiles(
    tmp_path: Path, gpustack_wheel: Path, uv_wheel: Path
) -> None:
    bundle = make_bundle(tmp_path, gpustack_wheel, installer=uv_wheel)
    prefix = tmp_path / "prefix"

    proc = install(bundle, prefix)

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_installed(prefix, bundle)
    assert f"install.sh: installer: uv {uv_wheel.name.split('-')[1]}" in proc.stdout
    assert re.search(r"^install\.sh: installed with uv in \d+\.\d s$", proc.stdout, re.M)
    assert "from the bundled wheels with uv" in proc.stdout
    # what the build listed as loaded by `gpustack start` was compiled, and only that
    assert compiled(prefix) == ["gpustack/__init__", "gpustack/cmd/start"]
    assert "byte-compiling what gpustack start loads (3 modules)" in proc.stdout
    # the unpacked uv and its cache are gone; the site's venv is a plain one, uv not in it
    assert sorted(p.name for p in (prefix / "releases").iterdir()) == [release_name(bundle)]
    assert not list((prefix / "current").glob("lib/python*/site-packages/uv*"))


@pytest.mark.target
def test_install_with_installer_pip_uses_pip(
    tmp_path: Path, gpustack_wheel: Path, uv_wheel: Path
) -> None:
    bundle = make_bundle(tmp_path, gpustack_wheel, installer=uv_wheel)
    prefix = tmp_path / "prefix"

    proc = install(bundle, prefix, "--installer", "pip")

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_installed(prefix, bundle)
    assert "from the bundled wheels with pip" in proc.stdout
    assert "installer: uv" not in proc.stdout
    assert re.search(r"^install\.sh: installed with pip in \d+\.\d s$", proc.stdout, re.M)


@pytest.mark.target
def test_a_uv_that_cannot_run_here_falls_back_to_pip_unless_uv_was_asked_for(
    tmp_path: Path, gpustack_wheel: Path
) -> None:
    # a program for no machine at all: exec fails as it would for another arch without qemu
    broken = wheel_of_program(tmp_path / "uv", b"\x7fELF\x02\x01\x01 not a program", "0.13.9")
    bundle = make_bundle(tmp_path, gpustack_wheel, installer=broken)
    prefix = tmp_path / "prefix"

    forced = install(bundle, prefix, "--installer", "uv")
    assert forced.returncode == 5, forced.stdout + forced.stderr
    assert "--installer uv: the bundled uv cannot run here" in forced.stderr
    assert "pass --installer pip" in forced.stderr
    assert not list((prefix / "releases").iterdir())  # no partial release, no unpacked uv

    proc = install(bundle, prefix)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "the bundled uv cannot run here" in proc.stdout
    assert "installing with pip instead" in proc.stdout
    assert_installed(prefix, bundle)


@pytest.mark.target
def test_a_failed_uv_install_leaves_no_release_and_current_untouched(
    tmp_path: Path, gpustack_wheel: Path, uv_wheel: Path
) -> None:
    good = make_bundle(tmp_path / "good", gpustack_wheel, installer=uv_wheel)
    prefix = tmp_path / "prefix"
    assert install(good, prefix).returncode == 0
    before = snapshot(prefix)

    bad = make_bundle(tmp_path / "bad", gpustack_wheel, installer=uv_wheel, TARGET_EXTRAS="audio")
    (bad / "requirements.txt").write_text(
        f"gpustack=={GPUSTACK_VERSION} --hash=sha256:{'0' * 64}\n"
    )
    write_sha256sums(bad)  # the bundle is consistent; only the pin is wrong
    proc = install(bad, prefix)

    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert "uv could not install the bundled wheels" in proc.stderr
    assert "--installer pip" in proc.stderr
    assert snapshot(prefix) == before
    assert_installed(prefix, good)


@pytest.mark.target
def test_install_with_uv_ignores_the_hosts_uv_configuration(
    tmp_path: Path, gpustack_wheel: Path, uv_wheel: Path
) -> None:
    bundle = make_bundle(tmp_path, gpustack_wheel, installer=uv_wheel)
    prefix = tmp_path / "prefix"
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("gpustack==0.0.1\n")
    config = tmp_path / "xdg" / "uv"
    config.mkdir(parents=True)
    (config / "uv.toml").write_text('[pip]\nno-binary = ["gpustack"]\n')
    site = {
        "UV_CONSTRAINT": str(constraints),
        "UV_NO_BINARY": "1",
        "UV_OFFLINE": "false",
        "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
    }

    proc = install(bundle, prefix, extra_env=site)

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "with uv" in proc.stdout
    assert_installed(prefix, bundle)


def test_install_refuses_installer_values_it_cannot_honour(
    tmp_path: Path, gpustack_wheel: Path
) -> None:
    bundle = make_bundle(tmp_path, gpustack_wheel)  # no uv in it
    prefix = tmp_path / "prefix"
    unknown = install(bundle, prefix, "--installer", "conda")
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == "install.sh: error: --installer conda: give uv or pip"
    absent = install(bundle, prefix, "--installer", "uv", "--skip-preflight")
    assert absent.returncode == 2
    assert "this bundle carries no uv (no INSTALLER_WHEEL in bundle.env)" in absent.stderr
    assert not prefix.exists()


# ---------------------------------------------------------------------------------------------
# The tools archive: check-tools-archive.py alone, then install.sh loading it

LLAMA_BOX_DIR = "llama-box-v0.0.171-linux-amd64"
TOOL_VERSIONS = {LLAMA_BOX_DIR: "v0.0.171", "gguf-parser": "v0.22.1", "fastfetch": "2.25.0.1"}


def tools_folder(where: Path) -> Path:
    """A tools folder laid out as GPUStack 0.7.1 leaves it, with stand-in binaries."""
    root = where / "bin"
    box = root / "llama-box" / LLAMA_BOX_DIR
    box.mkdir(parents=True)
    (box / "llama-box").write_text("#!/bin/sh\necho llama-box\n")
    (box / "llama-box").chmod(0o775)  # group-writable, as a build host with umask 002 leaves it
    (box / "libllama.so").write_bytes(b"\x7fELF stand-in\n")
    os.link(box / "libllama.so", box / "libllama.so.1")  # the archive stores it as a hard link
    (box / "llama-box-rpc-server").symlink_to("llama-box")
    (root / "llama-box" / "llama-box-default").symlink_to(LLAMA_BOX_DIR)
    for tool in ("gguf-parser", "fastfetch"):
        (root / tool).mkdir()
        (root / tool / tool).write_text(f"#!/bin/sh\necho {tool}\n")
        (root / tool / tool).chmod(0o755)
    (root / "versions.json").write_text(json.dumps(TOOL_VERSIONS, indent=4))
    return root


def save_tools_archive(folder: Path, dest: Path) -> Path:
    """As upstream's ToolsManager.save_archive: shutil.make_archive(..., "gztar", folder).

    Owned by `nobody` inside the archive, as a build user's files would be.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    base = dest.parent / dest.name.removesuffix(".tar.gz")
    return Path(shutil.make_archive(str(base), "gztar", folder, owner="nobody", group="nogroup"))


@pytest.fixture
def good_tools_archive(tmp_path: Path) -> Path:
    return save_tools_archive(tools_folder(tmp_path / "tools-src"), tmp_path / "good.tar.gz")


Member = tuple[tarfile.TarInfo, bytes]


def entry(
    name: str,
    kind: bytes = tarfile.REGTYPE,
    link: str = "",
    data: bytes = b"x\n",
    mode: int = 0o644,
) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, mode
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    if kind == tarfile.CHRTYPE:
        info.devmajor, info.devminor = 1, 3  # /dev/null: harmless, should a check ever let it by
    return info, data if kind == tarfile.REGTYPE else b""


GOOD_ENTRIES = [
    entry(".", tarfile.DIRTYPE, mode=0o755),
    entry("./versions.json", data=json.dumps(TOOL_VERSIONS).encode()),
    entry("./gguf-parser", tarfile.DIRTYPE, mode=0o755),
    entry("./gguf-parser/gguf-parser", mode=0o755),
    entry("./fastfetch", tarfile.DIRTYPE, mode=0o755),
    entry("./fastfetch/fastfetch", mode=0o755),
]


def write_archive(path: Path, members: list[Member], gzip: bool = True) -> Path:
    """The good entries, then `members`, as a tar.gz (or a plain tar with gzip=False)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz" if gzip else "w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in [*GOOD_ENTRIES, *members]:
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def check_archive(archive: Path, *, python: str = sys.executable) -> subprocess.CompletedProcess:
    return subprocess.run(
        [python, str(SCRIPTS / CHECKER), str(archive)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


# From the stand-in's tools folder, PREFIX/releases/<name>/lib/pythonX.Y/site-packages/gpustack/
# third_party/bin, nine levels up is the folder that holds PREFIX (and `outside`).
UP_TO_TMP = "../" * 9


@dataclass(frozen=True)
class Hostile:
    """A hostile archive: its extra members and the entry names the refusal must give."""

    members: list[Member]
    names: list[str]
    why: str


def hostile_archives(outside: Path) -> dict[str, Hostile]:
    """Each way an archive can reach outside the tools folder; `outside` is a folder to protect."""
    secret = str(outside / "secret.txt")
    return {
        "absolute-path": Hostile(
            [entry(str(outside / "abs.txt"))], [str(outside / "abs.txt")], "absolute name"
        ),
        "dotdot": Hostile(
            [entry(UP_TO_TMP + "outside/dotdot.txt")], [UP_TO_TMP + "outside/dotdot.txt"],
            "'..' in the name",
        ),
        "symlink-absolute": Hostile(
            [entry("./fastfetch/out", tarfile.SYMTYPE, str(outside)),
             entry("./fastfetch/out/pwned.txt")],
            ["./fastfetch/out", "./fastfetch/out/pwned.txt"], "absolute symlink target",
        ),
        "symlink-dotdot": Hostile(
            [entry("./up", tarfile.SYMTYPE, UP_TO_TMP + "outside"), entry("./up/pwned.txt")],
            ["./up", "./up/pwned.txt"], "outside the tools folder",
        ),
        "symlink-chain": Hostile(  # "here/.." looks like ".", but here -> . makes it ".."
            [entry("./here", tarfile.SYMTYPE, "."),
             entry("./there", tarfile.SYMTYPE, "here/../" + UP_TO_TMP[3:] + "outside"),
             entry("./there/pwned.txt")],
            ["./there", "./there/pwned.txt"], "outside the tools folder",
        ),
        "hardlink-absolute": Hostile(
            [entry("./fastfetch/secret", tarfile.LNKTYPE, secret)], ["./fastfetch/secret"],
            "absolute hard link target",
        ),
        "hardlink-dotdot": Hostile(
            [entry("./fastfetch/secret", tarfile.LNKTYPE, UP_TO_TMP + "outside/secret.txt")],
            ["./fastfetch/secret"], "outside the tools folder",
        ),
        "hardlink-to-a-later-file": Hostile(
            [entry("./early", tarfile.LNKTYPE, "late"), entry("./late")],
            ["./early"], "not a file earlier in the archive",
        ),
        "char-device": Hostile(
            [entry("./fastfetch/null", tarfile.CHRTYPE)], ["./fastfetch/null"], "character device"
        ),
        "block-device": Hostile(
            [entry("./fastfetch/disk", tarfile.BLKTYPE)], ["./fastfetch/disk"], "block device"
        ),
        "fifo": Hostile(
            [entry("./fastfetch/pipe", tarfile.FIFOTYPE)], ["./fastfetch/pipe"], "FIFO"
        ),
    }  # fmt: skip


HOSTILE = sorted(hostile_archives(Path("/x")))


def test_checker_passes_an_archive_written_like_upstreams(good_tools_archive: Path) -> None:
    proc = check_archive(good_tools_archive)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.endswith("entries, all safe to unpack\n")


@pytest.mark.parametrize("case", HOSTILE)
def test_checker_refuses_each_hostile_entry_by_name(tmp_path: Path, case: str) -> None:
    hostile = hostile_archives(tmp_path / "outside")[case]
    archive = write_archive(tmp_path / "t.tar.gz", hostile.members)

    proc = check_archive(archive)

    assert proc.returncode == 3, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert [line.split(": ")[1] for line in lines] == hostile.names
    assert all(line.startswith("check-tools-archive.py: ") for line in lines)
    assert hostile.why in lines[0]
    assert proc.stdout == ""


@pytest.mark.parametrize(
    ("members", "why"),
    [
        ([entry("./a", tarfile.SYMTYPE, "b"), entry("./b", tarfile.SYMTYPE, "a")],
         "too many levels of symlinks"),
        ([entry("./fastfetch/fastfetch")], "appears more than once"),
        ([entry("./setuid", mode=0o4755)], "set-user-ID or set-group-ID"),
        ([entry("./a", tarfile.SYMTYPE, "b"), entry("./b", tarfile.SYMTYPE, "/etc")],
         "symlink to b: absolute symlink target (through b)"),
        ([entry("..\\..\\evil.exe")], "backslash"),
        ([entry("C:evil.exe")], "Windows drive"),
        ([entry("./d", tarfile.DIRTYPE), entry("./d/x", tarfile.LNKTYPE, "fastfetch/../x")],
         "outside the tools folder"),
        ([entry("./volume", b"V")], "unsupported entry type"),
        ([entry(".", tarfile.SYMTYPE, "fastfetch")], "the tools folder itself"),
        ([entry("./link", tarfile.SYMTYPE, "fastfetch"), entry("./LINK/x")],
         "unpacks through LINK, a symlink"),
        ([entry("./Versions.json")], "differs from versions.json only in letter case"),
        # On Windows "Here" is the symlink "here" -> ".", so "Here/.." is the parent of the root.
        ([entry("./here", tarfile.SYMTYPE, "."), entry("./there", tarfile.SYMTYPE, "Here/..")],
         "symlink to Here/..: leads outside the tools folder (through Here)"),
    ],
    ids=["symlink-loop", "duplicate", "setuid", "symlink-through-escaping-symlink", "backslash",
         "drive", "hardlink-dotdot-inside", "unknown-type", "root-replaced", "case-parent",
         "case-duplicate", "case-symlink-chain"],
)  # fmt: skip
def test_checker_refuses_other_unsafe_entries(
    tmp_path: Path, members: list[Member], why: str
) -> None:
    proc = check_archive(write_archive(tmp_path / "t.tar.gz", members))
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert why in proc.stderr


def test_checker_accepts_links_that_stay_inside(tmp_path: Path) -> None:
    members = [
        entry("./llama-box/v1", tarfile.DIRTYPE),
        entry("./llama-box/v1/llama-box", mode=0o755),
        entry("./llama-box/v1/rpc", tarfile.SYMTYPE, "llama-box"),
        entry("./llama-box/default", tarfile.SYMTYPE, "v1"),
        entry("./llama-box/versions", tarfile.SYMTYPE, "../versions.json"),
        entry("./llama-box/dangling", tarfile.SYMTYPE, "not-there-yet"),
        entry("./llama-box/v1/copy", tarfile.LNKTYPE, "llama-box/v1/llama-box"),
    ]
    proc = check_archive(write_archive(tmp_path / "t.tar.gz", members))
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("how", ["plain-tar", "garbage", "truncated", "empty", "missing"])
def test_checker_refuses_a_file_that_is_not_a_readable_gzip_tar(
    tmp_path: Path, good_tools_archive: Path, how: str
) -> None:
    archive = tmp_path / "t.tar.gz"
    if how == "plain-tar":
        write_archive(archive, [], gzip=False)
    elif how == "garbage":
        archive.write_text("not an archive\n")
    elif how == "truncated":
        archive.write_bytes(good_tools_archive.read_bytes()[:-40])
    elif how == "empty":
        archive.write_bytes(b"")

    proc = check_archive(archive)

    assert proc.returncode == 3
    assert proc.stderr.startswith(f"check-tools-archive.py: {archive}: not a readable gzip tar (")
    assert proc.stderr.count("\n") == 1


def test_checker_names_every_offending_entry_on_its_own_line(tmp_path: Path) -> None:
    members = [entry("/abs"), entry("./ok"), entry("./pipe", tarfile.FIFOTYPE),
               entry("./new\nline", tarfile.CHRTYPE)]  # fmt: skip
    proc = check_archive(write_archive(tmp_path / "t.tar.gz", members))
    assert proc.returncode == 3
    assert proc.stderr.splitlines() == [
        "check-tools-archive.py: /abs: absolute name",
        "check-tools-archive.py: ./pipe: FIFO (named pipe)",
        "check-tools-archive.py: './new\\nline': character device",
    ]


def test_checker_usage() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / CHECKER)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2
    assert "usage: check-tools-archive.py" in proc.stderr


def other_pythons() -> list[str]:
    """Interpreters of other versions that run here: on PATH, or installed by pyenv."""
    found = [shutil.which(f"python3.{minor}") for minor in range(8, 14)]
    found += sorted(str(p) for p in Path.home().glob(".pyenv/versions/3.*/bin/python3"))
    runs: dict[str, str] = {}
    for python in filter(None, found):
        probe = subprocess.run(
            [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        version = probe.stdout.strip()
        if probe.returncode == 0 and version != HOST_PY and int(version.split(".")[1]) >= 8:
            runs.setdefault(version, python)
    return sorted(runs.values())


def test_checker_runs_on_every_python_the_target_may_have(tmp_path: Path) -> None:
    """Stdlib only and 3.8 syntax: the target's interpreter runs it, not ours."""
    pythons = other_pythons()
    if not pythons:
        pytest.skip("no Python of another version here")
    good = write_archive(tmp_path / "good.tar.gz", [])
    bad = write_archive(tmp_path / "bad.tar.gz", [entry("./p", tarfile.FIFOTYPE)])
    for python in pythons:
        assert check_archive(good, python=python).returncode == 0, python
        assert check_archive(bad, python=python).returncode == 3, python


# install.sh with a tools archive


def tools_dir(prefix: Path, bundle: Path) -> Path:
    site = prefix / "releases" / release_name(bundle) / "lib" / f"python{HOST_PY}" / "site-packages"
    return site / "gpustack" / "third_party" / "bin"


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The `install.sh: error:` line (the EXIT trap may print after it)."""
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("install.sh: error:")]
    return line


@dataclass(frozen=True)
class Site:
    """A prefix with a release that loaded a good tools archive, next to a folder to protect.

    Shared by the tests that must leave it as it is, which saves a venv and a pip install each.
    """

    root: Path
    prefix: Path
    outside: Path
    bundle: Path
    proc: subprocess.CompletedProcess[str]

    def state(self) -> tuple[dict[str, str], dict[str, str], list[str]]:
        return snapshot(self.prefix), snapshot(self.outside), sorted(os.listdir(self.root))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, gpustack_wheel: Path) -> Site:
    root = tmp_path_factory.mktemp("site")
    archive = save_tools_archive(tools_folder(root / "tools-src"), root / "good.tar.gz")
    bundle = make_bundle(root / "old", gpustack_wheel, tools_archive=archive)
    outside = root / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("do not touch\n")
    # A host that sets a download base URL: download-tools would refuse --load-archive with it.
    proc = install(
        bundle, root / "prefix", extra_env={"GPUSTACK_TOOLS_DOWNLOAD_BASE_URL": "http://x"}
    )
    return Site(root, root / "prefix", outside, bundle, proc)


@pytest.mark.target
def test_install_loads_the_tools_archive_with_its_links(site: Site) -> None:
    proc, bundle = site.proc, site.bundle

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_installed(site.prefix, bundle)
    tools = tools_dir(site.prefix, bundle)
    assert snapshot(tools) == snapshot(site.root / "tools-src" / "bin")
    box = tools / "llama-box"
    assert os.readlink(box / "llama-box-default") == LLAMA_BOX_DIR
    assert os.readlink(box / LLAMA_BOX_DIR / "llama-box-rpc-server") == "llama-box"
    lib = box / LLAMA_BOX_DIR / "libllama.so"
    assert lib.stat().st_ino == (box / LLAMA_BOX_DIR / "libllama.so.1").stat().st_ino
    mode = stat.S_IMODE((box / "llama-box-default" / "llama-box").stat().st_mode)
    assert mode == 0o755  # executable, and no longer group-writable
    if os.geteuid() == 0:  # tarfile gave them to `nobody`; install.sh gives them back to root
        assert {p.lstat().st_uid for p in [tools, *tools.rglob("*")]} == {0}
    assert f"check-tools-archive.py: {bundle / TOOLS_ARCHIVE}: " in proc.stdout
    assert f"tools loaded into {tools}" in proc.stdout
    assert re.search(rf"^  {LLAMA_BOX_DIR} +v0\.0\.171$", proc.stdout, re.M)
    assert f"were loaded from {TOOLS_ARCHIVE}" in proc.stdout


@pytest.mark.target
@pytest.mark.parametrize("case", HOSTILE)
def test_install_refuses_a_hostile_tools_archive_and_switches_nothing(
    tmp_path: Path, gpustack_wheel: Path, site: Site, case: str
) -> None:
    before = site.state()
    hostile = hostile_archives(site.outside)[case]
    archive = write_archive(tmp_path / "hostile.tar.gz", hostile.members)
    new = make_bundle(tmp_path, gpustack_wheel, tools_archive=archive, TARGET_EXTRAS="audio")

    proc = install(new, site.prefix)

    assert proc.returncode == 3, proc.stdout + proc.stderr
    for name in hostile.names:
        assert f"check-tools-archive.py: {name}: " in proc.stderr
    error = error_line(proc)
    assert error.startswith(
        f"install.sh: error: the tools archive {new / TOOLS_ARCHIVE} is not safe"
    )
    assert "re-copy the bundle from the source media" in error
    assert "install.sh: removed the partial release" in proc.stderr
    assert site.state() == before
    assert_installed(site.prefix, site.bundle)


@pytest.mark.target
def test_install_refuses_a_tools_archive_that_is_not_gzip(
    tmp_path: Path, gpustack_wheel: Path, site: Site
) -> None:
    before = site.state()
    archive = write_archive(tmp_path / "plain.tar.gz", [], gzip=False)
    bundle = make_bundle(tmp_path, gpustack_wheel, tools_archive=archive, TARGET_EXTRAS="audio")

    proc = install(bundle, site.prefix)

    assert proc.returncode == 3, proc.stdout + proc.stderr
    expected = f"check-tools-archive.py: {bundle / TOOLS_ARCHIVE}: not a readable gzip tar ("
    assert expected in proc.stderr
    assert "re-copy the bundle from the source media" in error_line(proc)
    assert site.state() == before
    assert_installed(site.prefix, site.bundle)


@pytest.mark.target
@pytest.mark.parametrize(
    ("members", "message"),
    [
        # A file where the archive then needs a folder: tarfile fails half-way through.
        ([*GOOD_ENTRIES, entry("./fastfetch/fastfetch/x")], "download-tools --load-archive"),
        (GOOD_ENTRIES[2:4], "has no versions.json"),
    ],
    ids=["unpack-fails", "no-versions-json"],
)
def test_a_tools_archive_that_does_not_load_switches_nothing(
    tmp_path: Path, gpustack_wheel: Path, site: Site, members: list[Member], message: str
) -> None:
    before = site.state()
    archive = tmp_path / "t.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    bad = make_bundle(tmp_path, gpustack_wheel, tools_archive=archive, TARGET_EXTRAS="all")

    proc = install(bad, site.prefix)

    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert message in error_line(proc)
    assert error_line(proc).endswith("nothing was switched")
    assert site.state() == before
    assert_installed(site.prefix, site.bundle)


@pytest.mark.target
def test_install_without_tools_archive_key_loads_nothing(
    tmp_path: Path, gpustack_wheel: Path
) -> None:
    bundle = make_bundle(tmp_path, gpustack_wheel)
    env_file = bundle / "bundle.env"
    env_file.write_text(re.sub(r"^TOOLS_ARCHIVE=.*\n", "", env_file.read_text(), flags=re.M))
    write_sha256sums(bundle)  # an older bundle: no TOOLS_ARCHIVE line at all
    prefix = tmp_path / "prefix"

    # A value in the caller's environment must not stand in for the bundle's.
    proc = install(bundle, prefix, extra_env={"TOOLS_ARCHIVE": "/etc/passwd"})

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_installed(prefix, bundle)
    assert "this bundle has no tools archive" in proc.stdout
    assert "check-tools-archive.py" in proc.stdout  # the next steps say how to check one
    assert not tools_dir(prefix, bundle).exists()


@pytest.mark.parametrize(
    ("value", "remove", "message"),
    [
        ("tools/gpustack-tools.tar.gz", TOOLS_ARCHIVE, "not in"),
        ("tools/gpustack-tools.tar.gz", CHECKER, "check-tools-archive.py not found"),
        ("/etc/passwd", None, "not a path inside the bundle"),
        ("tools/../../x.tar.gz", None, "not a path inside the bundle"),
    ],
    ids=["archive-missing", "checker-missing", "absolute", "dotdot"],
)
def test_install_refuses_a_tools_archive_it_cannot_check_before_changing_anything(
    tmp_path: Path, gpustack_wheel: Path, good_tools_archive: Path, value: str,
    remove: str | None, message: str,
) -> None:  # fmt: skip
    bundle = make_bundle(tmp_path, gpustack_wheel, tools_archive=good_tools_archive,
                         TOOLS_ARCHIVE=value)  # fmt: skip
    if remove:
        (bundle / remove).unlink()
        write_sha256sums(bundle)  # consistent, yet without the file
    prefix = tmp_path / "prefix"

    proc = install(bundle, prefix)

    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert message in proc.stderr.splitlines()[-1]
    assert "re-copy the whole bundle from the source media" in proc.stderr.splitlines()[-1]
    assert not prefix.exists()


@pytest.fixture
def read_only_prefix(tmp_path: Path):
    """A read-only file system, which stops root too (permissions do not)."""
    mount = tmp_path / "ro"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], check=True)
    yield mount / "gpustack"
    subprocess.run(["umount", str(mount)], check=True)


def test_preflight_fails_a_prefix_that_cannot_be_written(
    tmp_path: Path, gpustack_wheel: Path, read_only_prefix: Path
) -> None:
    bundle = make_bundle(tmp_path, gpustack_wheel)
    code, report = preflight_json(bundle, "--prefix", str(read_only_prefix))
    assert code == 1, report
    prefix = check(report, "prefix")
    assert prefix["status"] == "fail" and str(read_only_prefix.parent) in prefix["detail"]
    assert "sudo" not in prefix["fix"] and "writable file system" in prefix["fix"]  # we are root
    code, report = preflight_json(bundle, "--prefix", str(tmp_path / "prefix"))
    assert check(report, "prefix")["status"] == "ok", report


def test_install_on_a_read_only_prefix_does_not_tell_root_to_use_sudo(
    tmp_path: Path, gpustack_wheel: Path, read_only_prefix: Path
) -> None:
    bundle = make_bundle(tmp_path, gpustack_wheel)
    proc = install(bundle, read_only_prefix, "--skip-preflight")
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert "Read-only file system" in proc.stderr and "sudo" not in proc.stderr, proc.stderr
    assert "writable file system" in proc.stderr
