"""OpenPGP signatures a site can check with no network.

The release pipeline signs a bundle's `SHA256SUMS` (every file's sha256, `manifest.json`
included) with its secret key; the detached, binary signature is `SHA256SUMS.sig` in the bundle
root. A site checks it with the pipeline's public key and `gpgv`, which every Debian/Ubuntu host
has (apt depends on it), through `scripts/verify-signature.sh`: `verify` runs that same script,
so the build host checks exactly what the site checks.

GnuPG always works in a throwaway home (`GNUPGHOME` in a private temporary directory, its agent
stopped and the directory removed afterwards): the build host's and the site's `~/.gnupg` are
never read or written, and the secret key never lands anywhere but that directory. A passphrase
is handed to gpg in a 0600 file in the same directory, never on a command line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from gpustack_offline.bundle.errors import SignatureError
from gpustack_offline.core.errors import CommandError
from gpustack_offline.core.files import atomic_path
from gpustack_offline.core.processes import run

log = logging.getLogger("gpustack_offline")

SUMS = "SHA256SUMS"
SIGNATURE = "SHA256SUMS.sig"
VERIFY_SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "verify-signature.sh"
GPG_FIX = "install GnuPG on the build host (apt-get install gnupg)"
TIMEOUT = 120


@contextlib.contextmanager
def _gnupg_home() -> Iterator[Path]:
    """A private, empty GNUPGHOME; its gpg-agent is stopped and the directory removed on exit."""
    if shutil.which("gpg") is None:
        raise SignatureError(f"gpg is not installed; {GPG_FIX}")
    home = Path(tempfile.mkdtemp(prefix="gpustack-offline-gpg-"))  # mode 0700
    try:
        yield home
    finally:
        with contextlib.suppress(CommandError):
            run(["gpgconf", "--kill", "all"], env=_env(home), what="stopping gpg-agent")
        shutil.rmtree(home, ignore_errors=True)


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GNUPG", "GPG_"))}
    env.update(GNUPGHOME=str(home), LC_ALL="C")
    return env


def _gpg(home: Path, args: Sequence[str | Path], what: str, fix: str = "") -> str:
    """Run gpg in batch mode in `home`; its failure becomes a SignatureError."""
    try:
        proc = run(
            ["gpg", "--batch", "--no-tty", "--no-options", *args],
            env=_env(home),
            what=what,
            fix=fix,
            timeout=TIMEOUT,
        )
    except CommandError as exc:
        raise SignatureError(str(exc)) from None
    return proc.stdout


def _secret_fingerprints(home: Path) -> list[str]:
    """Fingerprints of the primary keys in `home` that have secret parts."""
    out = _gpg(home, ["--with-colons", "--list-secret-keys"], "listing secret keys")
    fingerprints, in_sec = [], False
    for line in out.splitlines():
        fields = line.split(":")
        if fields[0] in ("sec", "ssb", "pub", "sub", "uid"):
            in_sec = fields[0] == "sec"
        elif fields[0] == "fpr" and in_sec:
            fingerprints.append(fields[9])
            in_sec = False
    return fingerprints


def _write_secret(final: Path, data: bytes) -> None:
    """Write secret key material 0600 from the first byte, renamed into place when complete."""
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    finally:
        Path(tmp).unlink(missing_ok=True)


def generate_key(dest_dir: Path, name: str) -> tuple[Path, Path]:
    """An ed25519 signing key with no passphrase, for tests and docs: (secret, public) files.

    The secret file is what `gpg --export-secret-keys` writes (0600), the public one what `gpg
    --export` writes; both binary. A release key should rather be made by hand, with a
    passphrase, and kept off the build host except while signing.
    """
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "key"
    dest_dir.mkdir(parents=True, exist_ok=True)
    secret, public = dest_dir / f"{slug}.secret.gpg", dest_dir / f"{slug}.gpg"
    with _gnupg_home() as home:
        nopass = ["--pinentry-mode", "loopback", "--passphrase", ""]  # empty: nothing secret
        _gpg(
            home,
            [*nopass, "--quick-generate-key", name, "ed25519", "sign", "never"],
            f"generating an ed25519 key for {name!r}",
            GPG_FIX,
        )
        [fingerprint] = _secret_fingerprints(home)
        _gpg(home, [*nopass, "--output", home / "secret", "--export-secret-keys", fingerprint],
             "exporting the secret key")  # fmt: skip
        _gpg(home, ["--output", home / "public", "--export", fingerprint], "exporting the key")
        _write_secret(secret, (home / "secret").read_bytes())
        with atomic_path(public) as part:
            part.write_bytes((home / "public").read_bytes())
    log.info("made key %s: %s (secret), %s (public)", fingerprint, secret, public)
    return secret, public


def sign(bundle_dir: Path, key_file: Path, passphrase_env: str | None = None) -> Path:
    """Sign `bundle_dir/SHA256SUMS` with the one secret key in `key_file`; return the signature.

    `key_file` is what `gpg --export-secret-keys KEYID` writes (binary or armored). When the key
    has a passphrase, `passphrase_env` names the environment variable that holds it. The new
    signature is checked with `verify` (gpgv, as on a site) before this returns; a signature
    that does not check out is removed.
    """
    sums, final = bundle_dir / SUMS, bundle_dir / SIGNATURE
    if not sums.is_file():
        raise SignatureError(f"{sums} not found: sign a bundle after SHA256SUMS is written")
    if not key_file.is_file() or not os.access(key_file, os.R_OK):
        raise SignatureError(
            f"signing key {key_file} is not a readable file; export it with "
            "`gpg --export-secret-keys KEYID > FILE` and give its path"
        )
    if key_file.resolve().is_relative_to(bundle_dir.resolve()):
        raise SignatureError(
            f"signing key {key_file} is inside the bundle {bundle_dir}; keep it outside, "
            "it must never ship"
        )
    passphrase = ""
    if passphrase_env is not None:
        passphrase = os.environ.get(passphrase_env, "")
        if not passphrase:
            raise SignatureError(
                f"${passphrase_env} is not set or empty; it must hold the passphrase of {key_file}"
            )
    with _gnupg_home() as home:
        _gpg(
            home,
            ["--import", key_file],
            f"importing the signing key {key_file}",
            "give a key file written by `gpg --export-secret-keys KEYID`",
        )
        found = _secret_fingerprints(home)
        if len(found) != 1:
            raise SignatureError(
                f"{key_file} holds {len(found)} secret keys; it must hold exactly one, the "
                "release key: `gpg --export-secret-keys KEYID > FILE` (a public key from "
                "`gpg --export` cannot sign)"
            )
        pass_file = home / "passphrase"
        fd = os.open(pass_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(passphrase)
        what = f"signing {sums} with key {found[0]}"
        with atomic_path(final) as part:
            _gpg(
                home,
                [
                    "--pinentry-mode", "loopback", "--passphrase-file", pass_file,
                    "--local-user", found[0], "--digest-algo", "SHA512",
                    "--yes", "--output", part, "--detach-sign", sums,
                ],
                what,
                f"if the key has a passphrase, put it in an environment variable and name that "
                f"variable (passphrase_env); now: {passphrase_env or 'none given'}",
            )  # fmt: skip
        _gpg(home, ["--output", home / "public.gpg", "--export", found[0]], "exporting the key")
        try:
            verify(bundle_dir, home / "public.gpg")
        except SignatureError:
            final.unlink(missing_ok=True)
            raise
    log.info("signed %s with key %s", sums, found[0])
    return final


def verify(bundle_dir: Path, public_key: Path) -> str:
    """Check `SHA256SUMS.sig` with scripts/verify-signature.sh; return the signer's fingerprint.

    `public_key` is what `gpg --export` (or `--export --armor`) writes. Only the signature is
    checked; the files are checked against SHA256SUMS elsewhere.
    """
    env = {k: v for k, v in os.environ.items() if k != "PROG"}
    try:
        proc = run(
            ["bash", VERIFY_SCRIPT, bundle_dir, public_key],
            env=env,
            what=f"checking the signature of {bundle_dir}",
            timeout=TIMEOUT,
        )
    except CommandError as exc:
        prefix = "verify-signature.sh: error: "
        lines = [ln[len(prefix) :] for ln in str(exc).splitlines() if ln.startswith(prefix)]
        raise SignatureError("\n".join(lines) or str(exc)) from None
    return proc.stdout.strip().splitlines()[-1]
