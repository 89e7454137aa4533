#!/usr/bin/env bash
# install.sh: install GPUStack from this offline bundle on an air-gapped Linux host.
#
# Order matters: the bundle is verified and the host is checked before anything on the system
# changes. The install goes into a fresh release directory next to earlier ones, and the
# `current` link moves only after the new release works, so a failed run leaves the site as it
# was and a good run can be rolled back by re-pointing `current`.
#
# When bundle.env names a tools archive (TOOLS_ARCHIVE, the tar.gz of `gpustack download-tools
# --save-archive`), it is loaded into the new release before `current` moves, after
# check-tools-archive.py has found every entry safe to unpack: upstream's --load-archive unpacks
# with no filter, as root.
#
# Exit status: 0 installed (or already installed), 2 usage error, 3 damaged bundle or a tools
# archive refused by check-tools-archive.py, 4 preflight failed, 5 install step failed (pip,
# `gpustack version` or loading the tools; nothing switched), 6 could not switch `current`.
set -euo pipefail

PROG=install.sh

usage() {
  cat <<EOF
Usage: $PROG [--prefix DIR] [--python PATH] [--skip-preflight] [--help]

Installs GPUStack from this bundle into DIR/releases/<release>, loads the bundle's tools
archive (llama-box, gguf-parser, fastfetch) into it if it has one, then points DIR/current at it.

  --prefix DIR       install prefix (default: /opt/gpustack)
  --python PATH      Python interpreter for the virtual environment
                     (default: python<TARGET_PYTHON> from bundle.env, else python3)
  --skip-preflight   do not run preflight.sh before installing
  --help             show this help

Exit status: 0 installed, 2 usage error, 3 damaged bundle or unsafe tools archive,
4 preflight failed, 5 install failed (nothing switched), 6 could not switch the current link.
EOF
}

# die CODE MESSAGE: the one error line every failure ends with.
die() {
  local code=$1
  shift
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit "$code"
}

say() { printf '%s: %s\n' "$PROG" "$*"; }

# Absolute form of a path given relative to the caller's directory (we cd into the bundle later).
absolute() {
  case $1 in
    /*) printf '%s' "$1" ;;
    *) printf '%s/%s' "$PWD" "$1" ;;
  esac
}

parse_args() {
  PREFIX=/opt/gpustack PY="" SKIP_PREFLIGHT=0
  while (($# > 0)); do
    case $1 in
      --prefix) (($# >= 2)) || die 2 "--prefix needs a directory; see --help"; PREFIX=$2; shift 2 ;;
      --prefix=*) PREFIX=${1#*=}; shift ;;
      --python) (($# >= 2)) || die 2 "--python needs a path; see --help"; PY=$2; shift 2 ;;
      --python=*) PY=${1#*=}; shift ;;
      --skip-preflight) SKIP_PREFLIGHT=1; shift ;;
      -h | --help) usage; exit 0 ;;
      *) die 2 "unknown argument: $1; see --help" ;;
    esac
  done
  [[ -n $PREFIX ]] || die 2 "--prefix must not be empty; see --help"
  PREFIX=$(absolute "$PREFIX")
  PREFIX=${PREFIX%/}
  [[ -n $PREFIX ]] || die 2 "--prefix / is not allowed; pick a directory such as /opt/gpustack"
  # A bare name (python3.11) is looked up on PATH; a path with a slash is made absolute.
  [[ $PY != */* ]] || PY=$(absolute "$PY")
}

# ---------------------------------------------------------------------------------------------
# Step 2: integrity. Every file must be listed in SHA256SUMS and match it; nothing else may be
# there. A copy from removable media that lost or damaged a file must not half-install.

# Paths listed in SHA256SUMS, one per line ("<hash>  <path>" or "<hash> *<path>"), without "./".
listed_files() {
  sed -E -n 's/^[0-9a-fA-F]{64} [ *](\.\/)?//p' SHA256SUMS
}

# Paths present in the bundle, relative, except SHA256SUMS itself.
present_files() {
  find . \( -type f -o -type l \) ! -path ./SHA256SUMS -print | sed 's|^\./||'
}

verify_bundle() {
  local out line problems=0
  [[ -f SHA256SUMS ]] || die 3 "SHA256SUMS not found in $BUNDLE: the bundle is incomplete; re-copy the whole bundle from the source media"
  command -v sha256sum >/dev/null || die 3 "sha256sum not found; install coreutils to verify the bundle"
  say "verifying the bundle against SHA256SUMS"

  # --quiet prints only problems: "path: FAILED" (altered), "path: FAILED open or read" (missing).
  # --strict fails on a malformed line but only counts them, so those are named below instead.
  if ! out=$(sha256sum -c --strict --quiet SHA256SUMS 2>&1); then
    while IFS= read -r line; do
      case $line in
        *': FAILED open or read') printf '%s: missing: %s\n' "$PROG" "${line%: FAILED open or read}" >&2 ;;
        *': FAILED') printf '%s: altered (checksum mismatch): %s\n' "$PROG" "${line%: FAILED}" >&2 ;;
        *) continue ;; # sha256sum's summary warnings repeat what the lines above say
      esac
      problems=$((problems + 1))
    done <<<"$out"
  fi

  while IFS= read -r line; do
    printf '%s: SHA256SUMS has a malformed line: %s\n' "$PROG" "$line" >&2
    problems=$((problems + 1))
  done < <(grep -nvE '^[0-9a-fA-F]{64} [ *].' SHA256SUMS)

  # A failure nothing above explains (an unreadable SHA256SUMS, say) still means: do not trust it.
  if [[ -n $out ]] && ((problems == 0)); then
    printf '%s\n' "$out" >&2
    problems=1
  fi

  while IFS= read -r line; do
    [[ -n $line ]] || continue
    printf '%s: unexpected file (not in SHA256SUMS): %s\n' "$PROG" "$line" >&2
    problems=$((problems + 1))
  done < <(LC_ALL=C comm -13 <(listed_files | LC_ALL=C sort -u) <(present_files | LC_ALL=C sort -u))

  ((problems == 0)) || die 3 "the bundle in $BUNDLE is damaged ($problems problem(s) listed above); re-copy the whole bundle from the source media and run $PROG again"
  say "bundle verified"
}

load_bundle_env() {
  local key
  [[ -f bundle.env ]] || die 3 "bundle.env not found in $BUNDLE; re-copy the whole bundle from the source media"
  # Optional key: a value from the caller's environment must not stand in for a missing one.
  TOOLS_ARCHIVE=""
  # shellcheck source=/dev/null
  . ./bundle.env
  for key in BUNDLE_CELL GPUSTACK_VERSION TARGET_PYTHON REQUIREMENT; do
    [[ -n ${!key:-} ]] || die 3 "bundle.env has no $key; re-copy the whole bundle from the source media"
  done
  check_tools_files
}

# The tools archive and its checker must be in the bundle before anything changes; what is
# inside the archive is checked once the release's Python exists (load_tools).
check_tools_files() {
  [[ -n $TOOLS_ARCHIVE ]] || return 0
  case /$TOOLS_ARCHIVE/ in
    //* | */../*) die 3 "bundle.env has TOOLS_ARCHIVE=$TOOLS_ARCHIVE, not a path inside the bundle; re-copy the whole bundle from the source media" ;;
  esac
  [[ -f $TOOLS_ARCHIVE ]] ||
    die 3 "the tools archive $TOOLS_ARCHIVE named in bundle.env is not in $BUNDLE; re-copy the whole bundle from the source media"
  [[ -f check-tools-archive.py ]] ||
    die 3 "check-tools-archive.py not found in $BUNDLE; re-copy the whole bundle from the source media"
}

default_python() {
  if [[ -z $PY ]]; then
    PY=python$TARGET_PYTHON
    command -v "$PY" >/dev/null 2>&1 || PY=python3
  fi
}

# ---------------------------------------------------------------------------------------------
# Step 3: preflight. Run through bash: copies from removable media often lose the exec bit.

run_preflight() {
  if ((SKIP_PREFLIGHT)); then
    say "skipping preflight (--skip-preflight)"
    return
  fi
  bash ./preflight.sh --python "$PY" --prefix "$PREFIX" ||
    die 4 "preflight failed; fix the items above or pass --skip-preflight"
}

# ---------------------------------------------------------------------------------------------
# Step 4: install into a new release directory.

# Remove the release directory of this run if it did not reach .complete (runs on any exit).
remove_partial_release() {
  if [[ -n ${PARTIAL:-} && -d $PARTIAL && ! -e $PARTIAL/.complete ]]; then
    rm -rf -- "$PARTIAL"
    printf '%s: removed the partial release %s\n' "$PROG" "$PARTIAL" >&2
  fi
}

install_release() {
  if [[ -e $REL/.complete ]]; then
    say "release $REL_NAME is already installed; not reinstalling"
    return
  fi
  command -v -- "$PY" >/dev/null 2>&1 ||
    die 5 "Python interpreter '$PY' not found; install Python $TARGET_PYTHON or pass --python PATH"
  mkdir -p -- "$PREFIX/releases" ||
    die 5 "cannot create $PREFIX/releases; run as root (sudo) or pass --prefix to a directory you can write"
  if [[ -e $REL ]]; then
    say "removing the incomplete release $REL_NAME left by an earlier run"
    rm -rf -- "$REL"
  fi

  PARTIAL=$REL
  trap remove_partial_release EXIT
  # Turn Ctrl-C and kill into a normal exit so the EXIT trap cleans up.
  trap 'exit 130' INT
  trap 'exit 143' TERM

  say "creating the virtual environment $REL"
  "$PY" -m venv -- "$REL" ||
    die 5 "could not create a virtual environment with $PY; install python$TARGET_PYTHON-venv (or pass --python PATH)"

  say "installing $REQUIREMENT from the bundled wheels"
  # The site's pip configuration (pip.conf constraints, find-links, user=true, PIP_* variables)
  # must not change what gets installed: PIP_CONFIG_FILE=/dev/null skips every config file and
  # --isolated ignores PIP_* variables. requirements.txt pins the whole closure with hashes, so
  # --no-deps installs exactly that set.
  PIP_CONFIG_FILE=/dev/null "$REL/bin/python" -m pip --isolated install --no-index \
    --find-links "$BUNDLE/wheels" --require-hashes --only-binary=:all: --no-deps \
    -r "$BUNDLE/requirements.txt" ||
    die 5 "pip could not install the bundled wheels into $REL (see pip's messages above); nothing was switched"

  "$REL/bin/gpustack" version ||
    die 5 "the installed '$REL/bin/gpustack version' failed (see above); nothing was switched"

  load_tools

  touch -- "$REL/.complete"
  PARTIAL=""
  trap - EXIT INT TERM
}

# ---------------------------------------------------------------------------------------------
# Step 4b: the tools archive, loaded into the new release before it is marked complete, so a
# failure here removes the release and leaves `current` where it was.

# The installed package's tools folder, where upstream's ToolsManager keeps llama-box & co.
# find_spec locates the package without running its __init__.
tools_dir() {
  "$REL/bin/python" -I -c 'import importlib.util, os, sys
spec = importlib.util.find_spec("gpustack")
if spec is None or not spec.submodule_search_locations:
    sys.exit("gpustack is not installed as a package")
print(os.path.join(list(spec.submodule_search_locations)[0], "third_party", "bin"))'
}

# Print versions.json (tool or folder -> version), one per line; fails unless it is an object.
print_tool_versions() {
  "$REL/bin/python" -I -c 'import json, sys
with open(sys.argv[1], encoding="utf-8") as f:
    versions = json.load(f)
if not isinstance(versions, dict):
    sys.exit(sys.argv[1] + " is not a JSON object")
for name, version in sorted(versions.items()):
    print("  %-40s %s" % (name, version))' "$1"
}

load_tools() {
  local archive=$BUNDLE/$TOOLS_ARCHIVE dir rc=0
  if [[ -z $TOOLS_ARCHIVE ]]; then
    say "this bundle has no tools archive (TOOLS_ARCHIVE in bundle.env); not loading tools"
    return
  fi

  say "checking the tools archive $TOOLS_ARCHIVE"
  # -I: the bundle folder and PYTHON* variables must not change which modules the check imports.
  "$REL/bin/python" -I "$BUNDLE/check-tools-archive.py" "$archive" || rc=$?
  case $rc in
    0) ;;
    3) die 3 "the tools archive $archive is not safe to unpack (entries listed above); nothing was switched; re-copy the bundle from the source media, or rebuild the bundle if the copy there is the same" ;;
    *) die 5 "check-tools-archive.py could not check $archive (exit $rc, see above); nothing was switched" ;;
  esac

  say "loading the tools from $TOOLS_ARCHIVE"
  # GPUSTACK_* variables of the host would change what download-tools does (a download base URL
  # even makes it refuse --load-archive), so they are cleared for this one command.
  env -u GPUSTACK_TOOLS_DOWNLOAD_BASE_URL -u GPUSTACK_SAVE_ARCHIVE -u GPUSTACK_LOAD_ARCHIVE \
    -u GPUSTACK_SYSTEM -u GPUSTACK_ARCH -u GPUSTACK_DEVICE \
    "$REL/bin/gpustack" download-tools --load-archive "$archive" ||
    die 5 "'$REL/bin/gpustack download-tools --load-archive $archive' failed (see above); nothing was switched"

  dir=$(tools_dir) || die 5 "cannot find the gpustack package in $REL (see above); nothing was switched"
  [[ -f $dir/versions.json ]] ||
    die 5 "the tools archive $TOOLS_ARCHIVE has no versions.json; $dir is not a GPUStack tools folder; nothing was switched"
  # The archive's owners and group-write bits come from the build host; the tools are run by
  # the GPUStack service, so they must be no more writable than the rest of the release.
  if ((EUID == 0)); then
    chown -R -h 0:0 -- "$dir" || die 5 "cannot give $dir to root; nothing was switched"
  fi
  chmod -R go-w -- "$dir" || die 5 "cannot remove group and other write access in $dir; nothing was switched"

  say "tools loaded into $dir (from versions.json):"
  print_tool_versions "$dir/versions.json" ||
    die 5 "$dir/versions.json is not readable (see above); nothing was switched"
}

# ---------------------------------------------------------------------------------------------
# Step 5: switch. A symlink renamed over the old one (rename(2)) is atomic: readers see the old
# or the new release, never a missing link.

# atomic_symlink TARGET LINK
atomic_symlink() {
  local tmp
  tmp=$(dirname -- "$2")/.$(basename -- "$2").tmp.$$
  ln -sfn -- "$1" "$tmp" && mv -T -- "$tmp" "$2"
}

check_current_is_link() {
  if [[ -e $PREFIX/current && ! -L $PREFIX/current ]]; then
    die 6 "$PREFIX/current exists and is not a symlink; move it out of the way and run $PROG again"
  fi
}

switch_current() {
  local previous=""
  [[ -L $PREFIX/current ]] && previous=$(readlink -- "$PREFIX/current")
  atomic_symlink "releases/$REL_NAME" "$PREFIX/current" ||
    die 6 "could not point $PREFIX/current at releases/$REL_NAME; check permissions on $PREFIX"
  { mkdir -p -- "$PREFIX/bin" && atomic_symlink ../current/bin/gpustack "$PREFIX/bin/gpustack"; } ||
    die 6 "could not create the link $PREFIX/bin/gpustack; check permissions on $PREFIX/bin"

  say "current -> releases/$REL_NAME"
  if [[ -n $previous && $previous != "releases/$REL_NAME" ]]; then
    say "previous release kept: $previous"
    say "roll back with: ln -sfn $previous $PREFIX/.current.tmp && mv -T $PREFIX/.current.tmp $PREFIX/current"
  fi
}

# Step 6: the air-gapped configuration. GPUStack, started as upstream documents it, reaches at
# first start for huggingface.co and modelscope.cn (model catalog), update-service.gpustack.ai
# (update check, also asked by the UI's /update/ whatever --disable-update-check says) and the
# tools hosts. Written once: a site's own edits are kept on later installs.
find_catalog() {
  local package
  package=$("$REL/bin/python" -I -c \
    'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("gpustack").origin))') ||
    die 5 "could not locate the installed gpustack package in $REL; nothing was switched"
  [[ -f $package/assets/model-catalog.yaml ]] ||
    die 5 "the installed GPUStack has no assets/model-catalog.yaml in $package; nothing was switched"
  # Named through `current`, so the setting stays right when the next release is installed.
  CATALOG=$PREFIX/current/${package#"$REL"/}/assets/model-catalog.yaml
}

write_site_config() {
  local catalog=$CATALOG
  CONFIG=$PREFIX/gpustack.yaml ENV_FILE=$PREFIX/gpustack.env
  if [[ -e $CONFIG ]]; then
    say "kept the existing $CONFIG"
  else
    cat >"$CONFIG.tmp" <<EOF || die 6 "could not write $CONFIG; check permissions on $PREFIX"
# GPUStack configuration for an air-gapped site, written by install.sh ($BUNDLE_CELL).
# Each setting keeps the first start from reaching for the internet; delete one to turn
# upstream's behaviour back on. Start GPUStack with:
#   set -a; . $ENV_FILE; set +a; $PREFIX/bin/gpustack start --config-file $CONFIG

# --model-catalog-file: the catalog shipped in the installed wheel, instead of probing
# huggingface.co and modelscope.cn to choose one.
model_catalog_file: $catalog

# --update-check-url: a closed local port. The check fails at once, and its cached failure also
# answers the UI's /update/ request, which ignores --disable-update-check.
update_check_url: http://127.0.0.1:1/

# --tools-download-base-url: a tool found missing fails at once instead of probing github.com
# and GPUStack's COS mirror. This bundle's tools archive was loaded into the release.
tools_download_base_url: http://127.0.0.1:1
EOF
    mv -f -- "$CONFIG.tmp" "$CONFIG" || die 6 "could not write $CONFIG"
    say "wrote $CONFIG"
  fi
  if [[ -e $ENV_FILE ]]; then
    say "kept the existing $ENV_FILE"
  else
    cat >"$ENV_FILE.tmp" <<EOF || die 6 "could not write $ENV_FILE; check permissions on $PREFIX"
# Environment for GPUStack on an air-gapped site, written by install.sh ($BUNDLE_CELL): switches
# of libraries GPUStack runs that no GPUStack option covers. Delete a line to undo it.
HF_HUB_OFFLINE=1
HF_HUB_DISABLE_TELEMETRY=1
DO_NOT_TRACK=1
VLLM_NO_USAGE_STATS=1
RAY_USAGE_STATS_ENABLED=0
EOF
    mv -f -- "$ENV_FILE.tmp" "$ENV_FILE" || die 6 "could not write $ENV_FILE"
    say "wrote $ENV_FILE"
  fi
}

# ---------------------------------------------------------------------------------------------

print_next_steps() {
  cat <<EOF

GPUStack $GPUSTACK_VERSION is installed ($BUNDLE_CELL).
  gpustack binary: $PREFIX/bin/gpustack
  release:         $REL

Next steps:
EOF
  if [[ -n $TOOLS_ARCHIVE ]]; then
    printf '  1. The tools (llama-box, gguf-parser, fastfetch) were loaded from %s.\n' "$TOOLS_ARCHIVE"
  else
    cat <<EOF
  1. This bundle has no tools archive, so gpustack tries to download llama-box, gguf-parser and
     fastfetch when it starts. Check, then load, an archive of 'gpustack download-tools
     --save-archive' made for this host:
       $REL/bin/python -I $BUNDLE/check-tools-archive.py FILE.tar.gz &&
         $REL/bin/gpustack download-tools --load-archive FILE.tar.gz
EOF
  fi
  cat <<EOF
  2. Start GPUStack with the air-gapped configuration ($CONFIG, $ENV_FILE):
       set -a; . $ENV_FILE; set +a; $PREFIX/bin/gpustack start --config-file $CONFIG
EOF
}

main() {
  parse_args "$@"

  # Step 1: work from the bundle's own directory.
  BUNDLE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
  cd "$BUNDLE"

  # Step 2 before sourcing bundle.env: a damaged bundle.env must not be executed.
  verify_bundle
  load_bundle_env
  default_python

  run_preflight
  check_current_is_link

  REL_NAME=$BUNDLE_CELL-$(sha256sum SHA256SUMS | cut -c1-12)
  REL=$PREFIX/releases/$REL_NAME
  install_release
  find_catalog
  switch_current
  write_site_config
  print_next_steps
}

main "$@"
