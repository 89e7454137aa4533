"""The target-host scripts (scripts/preflight.sh, scripts/install.sh), run for real with bash.

Each test builds a small bundle in tmp_path around a real wheel: a tiny package that provides a
`gpustack` console script, built offline with `pip wheel` through a dependency-free in-tree
PEP 517 backend. The only fake is `nvidia-smi`, because this host has no NVIDIA driver.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"

HOST_PY = f"{sys.version_info.major}.{sys.version_info.minor}"
OTHER_PY = "3.12" if HOST_PY != "3.12" else "3.10"
HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
OTHER_ARCH = "arm64" if HOST_ARCH == "amd64" else "amd64"
GPUSTACK_VERSION = "0.7.1"

README_KEYS = {
    "BUNDLE_CELL", "GPUSTACK_VERSION", "TARGET_OS", "TARGET_ARCH", "TARGET_DEVICE",
    "TARGET_PYTHON", "TARGET_EXTRAS", "GLIBC_FLOOR", "CUDA_FLOOR", "REQUIREMENT",
}  # fmt: skip

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
import sys


def main():
    if sys.argv[1:] == ["version"]:
        print("gpustack {version} (test fixture)")
        return 0
    print("test fixture: only 'gpustack version' is supported", file=sys.stderr)
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
        "REQUIREMENT": f"gpustack=={GPUSTACK_VERSION}",
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
    return re.sub(r"\{\{([A-Z_]+)\}\}", lambda m: env[m.group(1)], template.read_text())


def make_bundle(where: Path, wheel: Path, **overrides: str) -> Path:
    """A complete bundle folder, laid out as the build writes it, around `wheel`."""
    env = bundle_env(**overrides)
    bundle = where / "bundle"
    wheels = bundle / "wheels"
    (wheels / "simple" / "gpustack").mkdir(parents=True)
    shutil.copy2(wheel, wheels / wheel.name)
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
    for name in ("install.sh", "preflight.sh"):
        shutil.copy2(SCRIPTS / name, bundle / name)
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


def test_install_puts_a_release_behind_current(tmp_path: Path, gpustack_wheel: Path) -> None:
    bundle = make_bundle(tmp_path, gpustack_wheel)
    prefix = tmp_path / "prefix"

    proc = install(bundle, prefix)

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_installed(prefix, bundle)
    assert "preflight: passed" in proc.stdout  # preflight ran first
    assert f"gpustack {GPUSTACK_VERSION} (test fixture)" in proc.stdout
    assert f"{prefix}/bin/gpustack start --disable-update-check" in proc.stdout
    assert sorted(p.name for p in (prefix / "releases").iterdir()) == [release_name(bundle)]
    assert not list(prefix.glob(".current.tmp.*"))


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
