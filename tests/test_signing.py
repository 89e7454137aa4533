"""Signed bundles: SHA256SUMS signed with real GnuPG, checked with real gpgv through
scripts/verify-signature.sh, on this host and inside a clean Debian 12 container with no network
(which has gpgv, as apt depends on it, and no gpg).

The bundle is a tiny stand-in (two files and their SHA256SUMS): only the signature is checked.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpustack_offline.bundle import signing
from gpustack_offline.bundle.signing import SignatureError

SCRIPT = signing.VERIFY_SCRIPT
UNSIGNED = (
    "this bundle is not signed; ask the release pipeline for the signed bundle or run without "
    "--verify-key"
)
# What the script needs besides a verifier (the gpg fallback and the no-verifier cases).
SCRIPT_TOOLS = (
    "bash", "od", "tr", "wc", "sha1sum", "cut", "tail", "head", "grep", "sed", "base64", "cp",
    "mktemp", "chmod", "rm", "cat",
)  # fmt: skip


@contextlib.contextmanager
def gnupg_home() -> Iterator[dict[str, str]]:
    with tempfile.TemporaryDirectory(prefix="test-signing-gpg-") as home:
        # The fewest S2K rounds for passphrase-protected test keys: seconds saved on 2 busy cores.
        Path(home, "gpg-agent.conf").write_text("s2k-count 65536\n")
        env = {**os.environ, "GNUPGHOME": home}
        try:
            yield env
        finally:
            subprocess.run(["gpgconf", "--kill", "all"], env=env, check=False)


def gpg(env: dict[str, str], *args: str | Path, stdin: bytes | None = None) -> bytes:
    proc = subprocess.run(
        ["gpg", "--batch", "--no-tty", *map(str, args)],
        env=env, input=stdin, capture_output=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout


def fingerprint(public: Path) -> str:
    """The primary key's fingerprint as gpg itself reads it from the file."""
    with gnupg_home() as env:
        out = gpg(env, "--with-colons", "--import-options", "show-only", "--import", public)
    return next(ln.split(":")[9] for ln in out.decode().splitlines() if ln.startswith("fpr:"))


def armored(public: Path, dest: Path) -> Path:
    """The same public key as `gpg --export --armor` writes it."""
    with gnupg_home() as env:
        gpg(env, "--import", public)
        dest.write_bytes(gpg(env, "--export", "--armor"))
    assert dest.read_text().startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----")
    return dest


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("keys")
    secret, public = signing.generate_key(d, "Release Pipeline <release@example.invalid>")
    other_secret, other = signing.generate_key(d, "Someone Else <else@example.invalid>")
    return {
        "secret": secret,
        "public": public,
        "armored": armored(public, d / "release.asc"),
        "other": other,
        "other_secret": other_secret,
    }


def make_bundle(root: Path) -> Path:
    bundle = root / "bundle"
    (bundle / "wheels").mkdir(parents=True)
    (bundle / "manifest.json").write_text('{"schema_version": 1}\n')
    (bundle / "wheels" / "demo-1.0-py3-none-any.whl").write_bytes(b"not really a wheel\n")
    sums = "".join(
        f"{hashlib.sha256((bundle / rel).read_bytes()).hexdigest()}  {rel}\n"
        for rel in ("manifest.json", "wheels/demo-1.0-py3-none-any.whl")
    )
    (bundle / "SHA256SUMS").write_text(sums)
    return bundle


@pytest.fixture
def signed(tmp_path: Path, keys: dict[str, Path]) -> Path:
    bundle = make_bundle(tmp_path)
    assert signing.sign(bundle, keys["secret"]) == bundle / "SHA256SUMS.sig"
    return bundle


def run_script(bundle: Path, key: Path, path: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PROG"}
    if path is not None:
        env["PATH"] = path
    return subprocess.run(
        ["bash", str(SCRIPT), str(bundle), str(key)],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip


def tool_dir(root: Path, *extra: str) -> str:
    """A PATH of links to the script's tools and `extra`, and nothing else."""
    bindir = root / "bin"
    bindir.mkdir()
    for name in (*SCRIPT_TOOLS, *extra):
        found = shutil.which(name)
        assert found, f"{name} is not installed on this host"
        (bindir / name).symlink_to(found)
    return str(bindir)


# ---------------------------------------------------------------------------------------------
# Signing and a good signature


def test_signed_bundle_verifies_and_names_the_signer(signed: Path, keys: dict[str, Path]) -> None:
    expected = fingerprint(keys["public"])
    assert signing.verify(signed, keys["public"]) == expected
    proc = run_script(signed, keys["public"])
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, expected + "\n", "")


def test_armored_public_key_is_accepted(signed: Path, keys: dict[str, Path]) -> None:
    assert signing.verify(signed, keys["armored"]) == fingerprint(keys["public"])


def test_signing_adds_only_the_signature_and_leaves_no_gnupg_home(
    tmp_path: Path, keys: dict[str, Path], caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest,
) -> None:  # fmt: skip
    bundle = make_bundle(tmp_path)
    before = {p.relative_to(bundle) for p in bundle.rglob("*")}
    # a temporary folder of this test's own (other runs on the host make and remove gpg homes),
    # with a short path: gpg-agent's socket lives in the home
    private = Path(tempfile.mkdtemp(prefix="sign-"))
    request.addfinalizer(lambda: shutil.rmtree(private, ignore_errors=True))
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    caplog.set_level(logging.INFO, logger="gpustack_offline")
    signing.sign(bundle, keys["secret"])
    after = {p.relative_to(bundle) for p in bundle.rglob("*")}
    assert after - before == {Path("SHA256SUMS.sig")}
    assert list(private.iterdir()) == []
    # A binary OpenPGP signature packet (old format, tag 2), not armor and not key material.
    sig = (bundle / "SHA256SUMS.sig").read_bytes()
    assert sig[0] & 0xBC == 0x88, sig[:4]
    assert keys["secret"].read_bytes()[-40:] not in sig
    assert "--detach-sign" in caplog.text


def test_passphrase_key_signs_with_passphrase_from_env_never_on_argv(
    tmp_path: Path, keys: dict[str, Path], caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    passphrase = "correct horse battery staple 7141"
    pass_file = tmp_path / "pass"
    pass_file.write_text(passphrase)
    with gnupg_home() as env:
        loop = ["--pinentry-mode", "loopback", "--passphrase-file", str(pass_file)]
        gpg(env, *loop, "--quick-generate-key", "Locked <locked@example.invalid>", "ed25519",
            "sign", "never")  # fmt: skip
        (tmp_path / "locked.secret.gpg").write_bytes(gpg(env, *loop, "--export-secret-keys"))
        (tmp_path / "locked.gpg").write_bytes(gpg(env, "--export"))
    bundle = make_bundle(tmp_path)
    secret = tmp_path / "locked.secret.gpg"

    with pytest.raises(SignatureError, match=r"\$RELEASE_KEY_PASSPHRASE is not set or empty"):
        signing.sign(bundle, secret, passphrase_env="RELEASE_KEY_PASSPHRASE")
    monkeypatch.setenv("RELEASE_KEY_PASSPHRASE", "wrong")
    with pytest.raises(SignatureError, match="signing .*SHA256SUMS with key .* failed"):
        signing.sign(bundle, secret, passphrase_env="RELEASE_KEY_PASSPHRASE")
    with pytest.raises(SignatureError, match="failed"):  # a locked key and no passphrase
        signing.sign(bundle, secret)
    assert not (bundle / "SHA256SUMS.sig").exists()

    caplog.set_level(logging.INFO, logger="gpustack_offline")
    monkeypatch.setenv("RELEASE_KEY_PASSPHRASE", passphrase)
    signing.sign(bundle, secret, passphrase_env="RELEASE_KEY_PASSPHRASE")
    assert signing.verify(bundle, tmp_path / "locked.gpg") == fingerprint(tmp_path / "locked.gpg")
    assert "--passphrase-file" in caplog.text
    assert passphrase not in caplog.text


def test_sign_refuses_a_public_key_a_key_inside_the_bundle_and_an_unsummed_bundle(
    tmp_path: Path, keys: dict[str, Path]
) -> None:
    bundle = make_bundle(tmp_path)
    with pytest.raises(SignatureError, match="holds 0 secret keys; it must hold exactly one"):
        signing.sign(bundle, keys["public"])
    inside = bundle / "release.secret.gpg"
    shutil.copy(keys["secret"], inside)
    with pytest.raises(SignatureError, match="is inside the bundle .* it must never ship"):
        signing.sign(bundle, inside)
    inside.unlink()
    with pytest.raises(SignatureError, match="is not a readable file"):
        signing.sign(bundle, tmp_path / "missing.gpg")
    (bundle / "SHA256SUMS").unlink()
    with pytest.raises(SignatureError, match="SHA256SUMS not found"):
        signing.sign(bundle, keys["secret"])
    assert not (bundle / "SHA256SUMS.sig").exists()


# ---------------------------------------------------------------------------------------------
# Refusals, each with its own message and exit status


def test_wrong_key_is_refused_naming_both_keys(signed: Path, keys: dict[str, Path]) -> None:
    release, other = fingerprint(keys["public"]), fingerprint(keys["other"])
    with pytest.raises(SignatureError) as err:
        signing.verify(signed, keys["other"])
    assert str(err.value) == (
        f"SHA256SUMS.sig was not made by the key in {keys['other']} (fingerprint {other}) but by "
        f"key {release}: the bundle was signed by another key or altered; get the bundle and "
        "the key from the same release pipeline"
    )
    assert run_script(signed, keys["other"]).returncode == 5


def test_bundle_signed_by_another_key_is_refused(tmp_path: Path, keys: dict[str, Path]) -> None:
    bundle = make_bundle(tmp_path)
    signing.sign(bundle, keys["other_secret"])
    proc = run_script(bundle, keys["armored"])
    assert proc.returncode == 5
    assert "the bundle was signed by another key or altered" in proc.stderr
    assert fingerprint(keys["public"]) in proc.stderr


def test_altered_sha256sums_is_refused(signed: Path, keys: dict[str, Path]) -> None:
    sums = signed / "SHA256SUMS"
    text = sums.read_text()
    sums.write_text(("0" if text[0] != "0" else "1") + text[1:])  # one digest, one digit
    proc = run_script(signed, keys["public"])
    assert proc.returncode == 6
    assert proc.stderr == (
        f"verify-signature.sh: error: BAD signature: {sums} was changed after it was signed (or "
        "the signature was); the bundle was altered or damaged, do not install it; fetch the "
        "signed bundle again\n"
    )
    with pytest.raises(SignatureError, match="^BAD signature: "):
        signing.verify(signed, keys["armored"])


def test_missing_signature_is_refused(tmp_path: Path, keys: dict[str, Path]) -> None:
    bundle = make_bundle(tmp_path)
    proc = run_script(bundle, keys["public"])
    assert proc.returncode == 3
    assert proc.stderr == (
        f"verify-signature.sh: error: {UNSIGNED} ({bundle}/SHA256SUMS.sig is missing)\n"
    )
    with pytest.raises(SignatureError, match=f"^{UNSIGNED}"):
        signing.verify(bundle, keys["public"])


def test_damaged_signature_file_is_refused(signed: Path, keys: dict[str, Path]) -> None:
    (signed / "SHA256SUMS.sig").write_bytes(b"this is not a signature\n")
    proc = run_script(signed, keys["public"])
    assert proc.returncode == 8
    assert "SHA256SUMS.sig is not an OpenPGP signature (damaged?)" in proc.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            hashlib.sha512(b"not a key").digest() * 8,
            "is not an OpenPGP public key; give the release pipeline's public key",
        ),
        (b"release key: see the wiki\n", "is not an OpenPGP public key"),
        (b"", "is not an OpenPGP public key"),
        (
            b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n\n!!!!\n-----END PGP PUBLIC KEY BLOCK-----\n",
            "has a damaged armored block",
        ),  # fmt: skip
        ("secret", "holds a SECRET key; a site needs only the public key"),
    ],
    ids=["random-bytes", "text", "empty", "damaged-armor", "secret-key"],
)
def test_key_file_that_is_not_a_public_key_is_refused(
    signed: Path, keys: dict[str, Path], tmp_path: Path, content: bytes | str, message: str
) -> None:
    key = tmp_path / "key"
    key.write_bytes(keys["secret"].read_bytes() if content == "secret" else content)  # type: ignore[arg-type]
    proc = run_script(signed, key)
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr.startswith(f"verify-signature.sh: error: key file {key} ")
    assert message in proc.stderr


def test_missing_or_unreadable_key_file_is_refused(signed: Path, tmp_path: Path) -> None:
    proc = run_script(signed, tmp_path / "nokey.gpg")
    assert proc.returncode == 4
    assert f"key file {tmp_path / 'nokey.gpg'} does not exist" in proc.stderr
    proc = run_script(signed, tmp_path)
    assert proc.returncode == 4
    assert f"key file {tmp_path} is not a readable file" in proc.stderr


def test_falls_back_to_gpg_without_gpgv(
    signed: Path, keys: dict[str, Path], tmp_path: Path
) -> None:
    path = tool_dir(tmp_path, "gpg")
    expected = fingerprint(keys["public"])
    for key in (keys["public"], keys["armored"]):
        proc = run_script(signed, key, path)
        assert (proc.returncode, proc.stdout.strip()) == (0, expected), proc.stderr
    proc = run_script(signed, keys["other"], path)
    assert proc.returncode == 5
    assert "the bundle was signed by another key or altered" in proc.stderr
    (signed / "SHA256SUMS").write_text("0" * 64 + "  manifest.json\n")
    proc = run_script(signed, keys["public"], path)
    assert proc.returncode == 6
    assert "BAD signature" in proc.stderr


def test_no_verifier_names_the_package(signed: Path, keys: dict[str, Path], tmp_path: Path) -> None:
    proc = run_script(signed, keys["public"], tool_dir(tmp_path))
    assert proc.returncode == 7
    assert proc.stderr == (
        "verify-signature.sh: error: neither gpgv nor gpg is installed; install the gpgv package "
        "(Debian/Ubuntu: apt-get install gpgv; RHEL/Fedora: dnf install gnupg2) and retry\n"
    )


def test_pasted_into_a_strict_script_it_reports_and_leaves_the_caller_running(
    signed: Path, keys: dict[str, Path]
) -> None:
    """install.sh runs with `set -euo pipefail` and its own EXIT trap and PROG."""
    caller = f"""
set -euo pipefail
PROG=install.sh
trap 'echo caller-trap' EXIT
source {SCRIPT}
verify_signature "$1" "$2" && echo "ok"
rc=0; verify_signature "$1" "$3" || rc=$?
echo "refused $rc"
"""
    proc = subprocess.run(
        ["bash", "-c", caller, "caller", str(signed), str(keys["public"]), str(keys["other"])],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        fingerprint(keys["public"]),
        "ok",
        "refused 5",
        "caller-trap",
    ]
    assert proc.stderr.startswith("install.sh: error: SHA256SUMS.sig was not made by the key")


# ---------------------------------------------------------------------------------------------
# On a minimal Debian host with no network


@pytest.mark.integration
def test_minimal_debian_host_checks_the_signature_offline(
    root: Path, signed: Path, keys: dict[str, Path], tmp_path: Path
) -> None:
    from gpustack_offline.cli import commands
    from gpustack_offline.core import docker as containers

    ctx = commands.Context.load(root)
    image = containers.base_image("amd64", ctx.cache, ctx.opts.debian_mirror)
    altered = make_bundle(tmp_path / "altered")
    shutil.copy(signed / "SHA256SUMS.sig", altered / "SHA256SUMS.sig")
    (altered / "SHA256SUMS").write_text((altered / "SHA256SUMS").read_text() + "\n")
    keydir = tmp_path / "keys"
    keydir.mkdir()
    for name in ("public", "armored", "other"):
        shutil.copy(keys[name], keydir / name)

    def in_debian(bundle: Path, key: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                "docker", "run", "--rm", "--network", "none", "--pull", "never",
                "-v", f"{bundle}:/bundle:ro", "-v", f"{keydir}:/keys:ro",
                "-v", f"{SCRIPT}:/opt/verify-signature.sh:ro", image,
                "bash", "-c", 'if command -v gpg; then exit 99; fi; '
                'exec bash /opt/verify-signature.sh /bundle "/keys/$0"', key,
            ],
            capture_output=True, text=True, check=False, timeout=120,
        )  # fmt: skip

    expected = fingerprint(keys["public"])
    for key in ("public", "armored"):
        proc = in_debian(signed, key)
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, expected + "\n", "")
    proc = in_debian(signed, "other")
    assert proc.returncode == 5
    assert "the bundle was signed by another key or altered" in proc.stderr
    proc = in_debian(altered, "public")
    assert proc.returncode == 6
    assert "BAD signature: /bundle/SHA256SUMS was changed after it was signed" in proc.stderr


# ---------------------------------------------------------------------------------------------
# `nox -s verify` with the verify-key option


def test_verify_checks_the_signature_before_anything_else(
    tmp_path: Path, keys: dict[str, Path], root: Path
) -> None:
    from gpustack_offline.cli import commands
    from gpustack_offline.core.errors import VerifyError

    cell_id = "v0.7.1-linux-amd64-cpu-py3.11-base-pip"
    dist = tmp_path / "dist"
    dist.mkdir()
    bundle = make_bundle(dist)
    bundle.rename(dist / cell_id)
    signing.sign(dist / cell_id, keys["secret"])

    def verify_with(key: Path) -> None:
        ctx = commands.Context.load(root, cli={"dist_dir": str(dist), "verify_key": str(key)})
        commands.verify_cell(ctx, ctx.matrix.cell(cell_id))

    with pytest.raises(SignatureError, match="was not made by the key"):
        verify_with(keys["other"])
    # the right key lets verification go on, to the first thing this stand-in bundle lacks
    (dist / cell_id / "manifest.json").unlink()
    with pytest.raises(VerifyError, match="is not a bundle"):
        verify_with(keys["public"])
