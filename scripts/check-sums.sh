#!/usr/bin/env bash
# check-sums.sh BUNDLE_DIR: check every file of a bundle against its SHA256SUMS, the step that
# install.sh and install-model.sh both take before anything on the host changes. A copy from
# removable media that lost or damaged a file must not half-install.
#
# Each problem is named on stderr, one a line, starting with $PROG when the caller sets it: a
# file missing, a file altered (checksum mismatch), a malformed line of SHA256SUMS, a file that
# SHA256SUMS does not list (SHA256SUMS.sig and a delta's base.json excepted). Prints the number
# of problems on stdout; exits 0 when there are none, 3 otherwise. The caller checks first that
# SHA256SUMS and sha256sum exist, and says what to do.
set -u -o pipefail
prog=${PROG:-check-sums.sh}
cd "$1" || exit 3

# Paths listed in SHA256SUMS, one per line ("<hash>  <path>" or "<hash> *<path>"), without "./".
listed_files() {
  sed -E -n 's/^[0-9a-fA-F]{64} [ *](\.\/)?//p' SHA256SUMS
}

# Paths present in the bundle, relative, except SHA256SUMS itself, its signature and base.json.
present_files() {
  find . \( -type f -o -type l \) ! -path ./SHA256SUMS ! -path ./SHA256SUMS.sig ! -path ./base.json -print | sed 's|^\./||'
}

problems=0
# --quiet prints only problems: "path: FAILED" (altered), "path: FAILED open or read" (missing).
# --strict fails on a malformed line but only counts them, so those are named below instead.
if ! out=$(sha256sum -c --strict --quiet SHA256SUMS 2>&1); then
  while IFS= read -r line; do
    case $line in
      *': FAILED open or read') printf '%s: missing: %s\n' "$prog" "${line%: FAILED open or read}" >&2 ;;
      *': FAILED') printf '%s: altered (checksum mismatch): %s\n' "$prog" "${line%: FAILED}" >&2 ;;
      *) continue ;; # sha256sum's summary warnings repeat what the lines above say
    esac
    problems=$((problems + 1))
  done <<<"$out"
fi

while IFS= read -r line; do
  printf '%s: SHA256SUMS has a malformed line: %s\n' "$prog" "$line" >&2
  problems=$((problems + 1))
done < <(grep -nvE '^[0-9a-fA-F]{64} [ *].' SHA256SUMS)

# A failure nothing above explains (an unreadable SHA256SUMS, say) still means: do not trust it.
if [[ -n $out ]] && ((problems == 0)); then
  printf '%s\n' "$out" >&2
  problems=1
fi

while IFS= read -r line; do
  [[ -n $line ]] || continue
  printf '%s: unexpected file (not in SHA256SUMS): %s\n' "$prog" "$line" >&2
  problems=$((problems + 1))
done < <(LC_ALL=C comm -13 <(listed_files | LC_ALL=C sort -u) <(present_files | LC_ALL=C sort -u))

echo "$problems"
((problems == 0)) || exit 3
