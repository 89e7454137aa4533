#!/usr/bin/env bash
# verify-signature.sh BUNDLE_DIR KEY_FILE: check the OpenPGP signature of a bundle's SHA256SUMS.
#
# The release pipeline signs SHA256SUMS (which lists every file's sha256, manifest.json included)
# with its key; the detached signature is BUNDLE_DIR/SHA256SUMS.sig. KEY_FILE is the pipeline's
# PUBLIC key as `gpg --export` (binary) or `gpg --export --armor` writes it. This checks the
# signature only: `sha256sum -c SHA256SUMS` (install.sh does it next) checks the files.
#
# It needs nothing but bash, coreutils, sed and gpgv (every Debian/Ubuntu host has gpgv: apt
# depends on it; RHEL: the gnupg2 package), or gpg when gpgv is absent. The site's ~/.gnupg is
# never read or written: the keyring lives in a temporary directory, removed on exit. The key's
# fingerprint is computed here from the key file itself (SHA-1 over the v4 key packet, as
# RFC 4880 12.2 says), so a wrong key is named even where only gpgv exists.
#
# A script inside a bundle cannot vouch for that bundle (whoever alters the bundle can alter the
# script): install.sh carries the same function inline, and a site that wants its own check
# keeps a copy of this file beside its key, or runs gpgv by hand (see the bundle's README).
#
# On success it prints the fingerprint of the key that made the signature and exits 0.
# Exit status: 2 usage, 3 bundle not signed (or no SHA256SUMS), 4 key file missing, unreadable
# or not an OpenPGP public key, 5 signed by another key, 6 BAD signature (SHA256SUMS or the
# signature changed after signing), 7 neither gpgv nor gpg installed, 8 the signature file is
# damaged or the verifier failed for another reason.

# --- begin verify_signature (install.sh holds an identical copy of this function) ---
# verify_signature BUNDLE_DIR KEY_FILE: the whole check, in a subshell so that its settings,
# trap and helpers stay inside; messages start with $PROG when the caller sets it.
verify_signature() (
  set -u +e -o pipefail
  prog=${PROG:-verify-signature.sh}
  fail() {
    code=$1
    shift
    printf '%s: error: %s\n' "$prog" "$*" >&2
    exit "$code"
  }
  byte() { od -An -tu1 -j "$2" -N 1 "$1" | tr -d ' \n'; } # byte FILE OFFSET, in decimal
  # Each primary public key's v4 fingerprint in a binary key file; fail unless it holds keys.
  key_fingerprints() {
    local file=$1 size off=0 b0 b1 tag len hdr found=0 i
    size=$(wc -c <"$file")
    while ((off < size)); do
      ((off + 6 <= size)) || return 1 # no key packet is shorter
      b0=$(byte "$file" "$off")
      b1=$(byte "$file" $((off + 1)))
      ((b0 & 0x80)) || return 1
      if ((b0 & 0x40)); then # new packet format
        tag=$((b0 & 0x3f))
        if ((b1 < 192)); then
          len=$b1 hdr=2
        elif ((b1 < 224)); then
          len=$((((b1 - 192) << 8) + $(byte "$file" $((off + 2))) + 192)) hdr=3
        elif ((b1 == 255)); then
          len=0 hdr=6
          for i in 2 3 4 5; do len=$(((len << 8) + $(byte "$file" $((off + i))))); done
        else
          return 1 # partial lengths never occur in a key
        fi
      else # old packet format
        tag=$(((b0 >> 2) & 0x0f))
        case $((b0 & 3)) in
          0) len=$b1 hdr=2 ;;
          1) len=$(((b1 << 8) + $(byte "$file" $((off + 2))))) hdr=3 ;;
          2)
            len=0 hdr=5
            for i in 1 2 3 4; do len=$(((len << 8) + $(byte "$file" $((off + i))))); done
            ;;
          *) return 1 ;;
        esac
      fi
      ((off + hdr + len <= size)) || return 1
      if ((found == 0 && tag != 6)); then
        ((tag == 5)) && return 2 # a secret key
        return 1
      fi
      if ((tag == 6)); then
        [[ $(byte "$file" $((off + hdr))) == 4 ]] || return 3
        {
          printf '\231'
          printf '%b' "\\0$(printf %03o $((len >> 8)))\\0$(printf %03o $((len & 255)))"
          tail -c +$((off + hdr + 1)) "$file" | head -c "$len"
        } | sha1sum | cut -c1-40 | tr a-f A-F
        found=$((found + 1))
      fi
      off=$((off + hdr + len))
    done
    ((found > 0)) || return 1
  }

  [[ $# -eq 2 ]] || fail 2 "usage: verify-signature.sh BUNDLE_DIR KEY_FILE"
  local bundle=$1 key=$2 tmp verifier expected status rc signer
  [[ -f $bundle/SHA256SUMS ]] ||
    fail 3 "no SHA256SUMS in $bundle: this is not a whole bundle; re-copy it from the source media"
  [[ -f $bundle/SHA256SUMS.sig ]] ||
    fail 3 "this bundle is not signed; ask the release pipeline for the signed bundle or run without --verify-key ($bundle/SHA256SUMS.sig is missing)"
  [[ -e $key ]] || fail 4 "key file $key does not exist; give the release pipeline's public key (gpg --export KEYID > release-key.gpg)"
  [[ -f $key && -r $key ]] || fail 4 "key file $key is not a readable file; check its path and permissions"
  if verifier=$(command -v gpgv); then
    :
  elif verifier=$(command -v gpg); then
    :
  else
    fail 7 "neither gpgv nor gpg is installed; install the gpgv package (Debian/Ubuntu: apt-get install gpgv; RHEL/Fedora: dnf install gnupg2) and retry"
  fi

  tmp=$(mktemp -d "${TMPDIR:-/tmp}/verify-signature.XXXXXX") || fail 8 "cannot make a temporary directory"
  trap 'rm -rf "$tmp"' EXIT
  chmod 700 "$tmp"
  # An armored key is turned into the binary keyring gpgv reads: the base64 between the armor
  # lines, without armor headers ("Name: value"), blank lines and the "=" checksum line.
  if grep -q -- '-----BEGIN PGP PRIVATE KEY BLOCK-----' "$key"; then
    fail 4 "key file $key holds a SECRET key; a site needs only the public key (gpg --export KEYID), and the secret key must not leave the release pipeline"
  elif grep -q -- '-----BEGIN PGP PUBLIC KEY BLOCK-----' "$key"; then
    sed -n '/^-----BEGIN PGP PUBLIC KEY BLOCK-----/,/^-----END PGP PUBLIC KEY BLOCK-----/p' "$key" |
      tr -d '\r' | sed '/^-----/d; /^[A-Za-z-]*: /d; /^$/d; /^=/d' |
      base64 -d >"$tmp/key.gpg" 2>/dev/null ||
      fail 4 "key file $key has a damaged armored block; export the public key again (gpg --export --armor KEYID)"
  else
    cp "$key" "$tmp/key.gpg"
  fi
  expected=$(key_fingerprints "$tmp/key.gpg")
  case $? in
    0) ;;
    2) fail 4 "key file $key holds a SECRET key; a site needs only the public key (gpg --export KEYID), and the secret key must not leave the release pipeline" ;;
    3) fail 4 "key file $key holds an OpenPGP key of a version other than 4, which gpgv cannot read; give a v4 public key (gpg --export KEYID)" ;;
    *) fail 4 "key file $key is not an OpenPGP public key; give the release pipeline's public key as written by gpg --export KEYID (binary) or gpg --export --armor KEYID" ;;
  esac
  expected=$(printf '%s' "$expected" | tr '\n' ' ')

  # gpgv reports through --status-fd; GNUPGHOME points at the empty temporary directory.
  if [[ ${verifier##*/} == gpgv ]]; then
    GNUPGHOME=$tmp "$verifier" --keyring "$tmp/key.gpg" --status-fd 3 \
      "$bundle/SHA256SUMS.sig" "$bundle/SHA256SUMS" 3>"$tmp/status" >"$tmp/log" 2>&1
  else
    GNUPGHOME=$tmp "$verifier" --batch --no-tty --no-options --no-default-keyring \
      --keyring "$tmp/key.gpg" --trust-model always --no-auto-key-retrieve --status-fd 3 \
      --verify "$bundle/SHA256SUMS.sig" "$bundle/SHA256SUMS" 3>"$tmp/status" >"$tmp/log" 2>&1
  fi
  rc=$?
  status=$(cat "$tmp/status")
  if grep -q '^\[GNUPG:\] BADSIG ' <<<"$status"; then
    fail 6 "BAD signature: $bundle/SHA256SUMS was changed after it was signed (or the signature was); the bundle was altered or damaged, do not install it; fetch the signed bundle again"
  fi
  if grep -q '^\[GNUPG:\] NO_PUBKEY ' <<<"$status"; then
    signer=$(sed -n 's/^\[GNUPG:\] ERRSIG \([^ ]*\) .* 9 \([0-9A-F]*\)$/\2/p; s/^\[GNUPG:\] ERRSIG \([^ ]*\) .* 9$/\1/p' <<<"$status" | head -n1)
    fail 5 "SHA256SUMS.sig was not made by the key in $key (fingerprint ${expected% }) but by key ${signer:-unknown}: the bundle was signed by another key or altered; get the bundle and the key from the same release pipeline"
  fi
  signer=$(sed -n 's/^\[GNUPG:\] VALIDSIG .* \([0-9A-F]\{40,64\}\)$/\1/p' <<<"$status" | head -n1)
  if ((rc == 0)) && [[ -n $signer ]]; then
    printf '%s\n' "$signer"
    exit 0
  fi
  if grep -q '^\[GNUPG:\] NODATA' <<<"$status"; then
    fail 8 "$bundle/SHA256SUMS.sig is not an OpenPGP signature (damaged?); fetch the signed bundle again"
  fi
  fail 8 "${verifier##*/} could not check $bundle/SHA256SUMS.sig (exit $rc): $(tail -n 3 "$tmp/log" | tr '\n' ' ')"
)
# --- end verify_signature ---

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  verify_signature "$@"
fi
