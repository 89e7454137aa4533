#!/usr/bin/env bash
# install.sh: install GPUStack from this offline bundle on an air-gapped Linux host.
#
# Two kinds of bundle, by INSTALL_METHOD in bundle.env. A pip bundle installs GPUStack into a
# virtual environment (below). A docker bundle loads GPUStack's image(s) from IMAGE_ARCHIVE (a
# folder, streamed as a tar; older bundles: a tar) into the Docker engine with `docker load`, checks that every reference in IMAGES (comma-separated)
# arrived, and with --registry tags and pushes them to the site's registry; it then prints
# upstream's `docker run` line for the device. Nothing but that registry is contacted, and loading again is harmless.
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
# `gpustack version` or loading the tools, nothing switched; docker load, tag or push),
# 6 could not switch `current`, 7 signature refused or not checkable (--verify-key).
set -euo pipefail

PROG=install.sh
# Switches of libraries GPUStack runs (Hugging Face Hub, vLLM, Ray) that no GPUStack option
# covers: written into the air-gapped environment of pip and docker installs alike.
LIBRARY_SWITCHES='HF_HUB_OFFLINE=1
HF_HUB_DISABLE_TELEMETRY=1
DO_NOT_TRACK=1
VLLM_NO_USAGE_STATS=1
RAY_USAGE_STATS_ENABLED=0'

usage() {
  cat <<EOF
Usage: $PROG [--verify-key KEY] [--prefix DIR] [--python PATH] [--installer uv|pip] [--skip-preflight] [--help]  (pip bundles)
       $PROG [--verify-key KEY] [--prefix DIR] [--registry HOST[:PORT][/PREFIX] [--namespace NS]] [--skip-preflight] (docker bundles)
       $PROG --inventory FILE [--prefix DIR] [--registry HOST[:PORT][/PREFIX] [--namespace NS]]
       $PROG --rollback [--prefix DIR] [--data-dir DIR]

A pip bundle (INSTALL_METHOD=pip in bundle.env) installs GPUStack into DIR/releases/<release>
with the uv the bundle carries (INSTALLER_WHEEL; pip where uv cannot run), loads the bundle's tools
archive (llama-box, gguf-parser, fastfetch) into it if it has one, then points DIR/current at it.

A docker bundle (INSTALL_METHOD=docker) loads GPUStack's image(s) into Docker with docker load;
with --registry it also tags and pushes them to that registry, keeping upstream's repository
names (REGISTRY/gpustack/gpustack:TAG). It writes DIR/docker.env, the air-gapped settings for
the container, and prints the docker run line to start GPUStack with it. For GPUStack 2.x it
also writes DIR/server.args, the start flags that make the server and workers ask the site
registry for every image (one per line), and DIR/registry.env for a namespace other than gpustack.

  --prefix DIR       install prefix (default: /opt/gpustack); for docker bundles, where
                     docker.env goes
  --python PATH      Python interpreter for the virtual environment
                     (default: python<TARGET_PYTHON> from bundle.env, else python3); pip bundles only
  --installer NAME   uv (the default when the bundle carries it) or pip, which installs the same
                     hashed wheels, slower; without this option pip is used where uv cannot run;
                     pip bundles only
  --registry REG     the site's registry, HOST[:PORT][/PREFIX] without http://, such as
                     registry.example.internal:5000/mirror; docker bundles only. Images go to
                     REG/gpustack/NAME:TAG; a PREFIX whose last level is gpustack is that
                     namespace itself (REG host/team/gpustack: host/team/gpustack/NAME:TAG)
  --namespace NS     with --registry: push under REG/NS/NAME:TAG instead of the gpustack
                     namespace (GPUStack 2.x then needs --image-repo, --benchmark-image-repo
                     and GPUSTACK_RUNTIME_DEPLOY_DEFAULT_CONTAINER_NAMESPACE, which are printed
                     and written for you)
  --verify-key KEY   before anything else, check SHA256SUMS.sig against KEY, the release's
                     public key file (gpg --export, binary or armored), with gpgv
  --skip-preflight   do not run preflight.sh before installing
  --data-dir DIR     GPUStack's data directory, whose database.db an upgrade copies before the
                     new release's first start (default: data_dir in DIR/gpustack.yaml, else
                     /var/lib/gpustack); pip bundles only
  --base DIR         a delta bundle (base.json) takes the pieces it left out from DIR/store of
                     the prefix, this earlier bundle folder, and with --registry the registry
  --inventory FILE   write what this site holds (installed bundles, every kept wheel and tool
                     sha256, with --registry the registry's blobs of our images) as JSON for
                     'invoke bundle --since FILE'; installs nothing
  --rollback         point current back at the previous release and restore the database copy
                     taken when the release after it was installed (docker bundles: restore it
                     into the data volume and print the previous run line)
  --volume NAME      docker bundles: the data volume the run lines name and an upgrade backs
                     the database of up (default: gpustack-data)

Every install keeps the bundle's manifest under DIR/bundles/ and its wheels and tools archive
under DIR/store/sha256/ (hard links when on the same file system), so that a later delta bundle
needs to carry only what is new.
  --help             show this help

Exit status: 0 installed, 2 usage error, 3 damaged bundle or unsafe tools archive,
4 preflight failed, 5 install failed (pip: nothing switched; docker: load, tag or push failed),
6 could not switch the current link, 7 signature refused or not checkable (--verify-key).
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

# now_us: microseconds since the epoch (bash 5's EPOCHREALTIME), empty on an older bash;
# took START: " in S.s" since START, or nothing when either is unknown.
now_us() { local t=${EPOCHREALTIME:-}; printf '%s' "${t/./}"; }
took() {
  local now
  now=$(now_us)
  [[ -n $1 && -n $now ]] || return 0
  printf ' in %d.%d s' $(((now - $1) / 1000000)) $(((now - $1) / 100000 % 10))
}

# Absolute form of a path given relative to the caller's directory (we cd into the bundle later).
absolute() {
  case $1 in
    /*) printf '%s' "$1" ;;
    *) printf '%s/%s' "$PWD" "$1" ;;
  esac
}

parse_args() {
  PREFIX=/opt/gpustack PY="" SKIP_PREFLIGHT=0 REGISTRY="" HAS_REGISTRY=0 VERIFY_KEY="" INSTALLER=""
  NAMESPACE="" DATA_DIR="" BASE_DIR="" INVENTORY="" ROLLBACK=0 VOLUME=gpustack-data
  # Which pip-only options were given, to refuse them for a docker bundle.
  PIP_OPTIONS=()
  while (($# > 0)); do
    case $1 in
      --prefix) (($# >= 2)) || die 2 "--prefix needs a directory; see --help"; PREFIX=$2; shift 2 ;;
      --prefix=*) PREFIX=${1#*=}; shift ;;
      --python) (($# >= 2)) || die 2 "--python needs a path; see --help"; PY=$2; PIP_OPTIONS+=(--python); shift 2 ;;
      --python=*) PY=${1#*=}; PIP_OPTIONS+=(--python); shift ;;
      --installer) (($# >= 2)) || die 2 "--installer needs uv or pip; see --help"; INSTALLER=$2; PIP_OPTIONS+=(--installer); shift 2 ;;
      --installer=*) INSTALLER=${1#*=}; PIP_OPTIONS+=(--installer); shift ;;
      --registry) (($# >= 2)) || die 2 "--registry needs HOST[:PORT][/PREFIX]; see --help"; REGISTRY=$2; HAS_REGISTRY=1; shift 2 ;;
      --registry=*) REGISTRY=${1#*=}; HAS_REGISTRY=1; shift ;;
      --namespace) (($# >= 2)) || die 2 "--namespace needs a name such as gpustack-ai; see --help"; NAMESPACE=$2; shift 2 ;;
      --namespace=*) NAMESPACE=${1#*=}; shift ;;
      --verify-key) (($# >= 2)) || die 2 "--verify-key needs a public key file; see --help"; VERIFY_KEY=$(absolute "$2"); shift 2 ;;
      --verify-key=*) VERIFY_KEY=$(absolute "${1#*=}"); shift ;;
      --skip-preflight) SKIP_PREFLIGHT=1; shift ;;
      --data-dir) (($# >= 2)) || die 2 "--data-dir needs a directory; see --help"; DATA_DIR=$(absolute "$2"); shift 2 ;;
      --data-dir=*) DATA_DIR=$(absolute "${1#*=}"); shift ;;
      --base) (($# >= 2)) || die 2 "--base needs an earlier bundle folder; see --help"; BASE_DIR=$(absolute "$2"); shift 2 ;;
      --base=*) BASE_DIR=$(absolute "${1#*=}"); shift ;;
      --inventory) (($# >= 2)) || die 2 "--inventory needs a file to write; see --help"; INVENTORY=$(absolute "$2"); shift 2 ;;
      --inventory=*) INVENTORY=$(absolute "${1#*=}"); shift ;;
      --rollback) ROLLBACK=1; shift ;;
      --volume) (($# >= 2)) || die 2 "--volume needs a Docker volume name; see --help"; VOLUME=$2; shift 2 ;;
      --volume=*) VOLUME=${1#*=}; shift ;;
      -h | --help) usage; exit 0 ;;
      *) die 2 "unknown argument: $1; see --help" ;;
    esac
  done
  [[ -n $PREFIX ]] || die 2 "--prefix must not be empty; see --help"
  case $INSTALLER in
    "" | uv | pip) ;;
    *) die 2 "--installer $INSTALLER: give uv or pip" ;;
  esac
  PREFIX=$(absolute "$PREFIX")
  PREFIX=${PREFIX%/}
  [[ -n $PREFIX ]] || die 2 "--prefix / is not allowed; pick a directory such as /opt/gpustack"
  # A bare name (python3.11) is looked up on PATH; a path with a slash is made absolute.
  [[ $PY != */* ]] || PY=$(absolute "$PY")
  if ((HAS_REGISTRY)); then
    check_registry_syntax
  elif [[ -n $NAMESPACE ]]; then
    die 2 "--namespace applies with --registry only; give --registry HOST[:PORT][/PREFIX] too"
  fi
}

# HOST[:PORT][/PREFIX], as the first part of an image name: Docker reads the part before the
# first slash as a registry only when it has a dot or a colon, or is localhost.
check_registry_syntax() {
  local host=${REGISTRY%%/*} path='^[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*(/[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*)*$'
  case $REGISTRY in
    "") die 2 "--registry must not be empty; give HOST[:PORT][/PREFIX], such as registry.example.internal:5000" ;;
    *://*) die 2 "--registry takes HOST[:PORT][/PREFIX] without a scheme: --registry ${REGISTRY#*://}" ;;
    */ | *//* | *@* | *' '*) die 2 "--registry $REGISTRY is not HOST[:PORT][/PREFIX]; give it like registry.example.internal:5000/mirror (no trailing slash)" ;;
  esac
  [[ $host =~ ^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:[0-9]+)?$ ]] ||
    die 2 "--registry $REGISTRY: '$host' is not a host name or address with an optional :PORT"
  [[ $host == *.* || $host == *:* || $host == localhost ]] ||
    die 2 "--registry $REGISTRY: Docker would read '$host' as part of a Docker Hub repository, not a registry; give its full name (with a dot), its port (HOST:PORT), or localhost"
  if [[ $REGISTRY == */* ]]; then
    [[ ${REGISTRY#*/} =~ $path ]] ||
      die 2 "--registry $REGISTRY: the prefix '${REGISTRY#*/}' must be lowercase path components (letters, digits, . _ -) separated by /"
  fi
  if [[ -n $NAMESPACE ]]; then
    [[ $NAMESPACE =~ ^[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*$ ]] ||
      die 2 "--namespace $NAMESPACE: give one lowercase path component (letters, digits, . _ -), such as gpustack-ai"
  elif [[ $REGISTRY == */gpustack ]]; then
    # GPUStack 2.x's rule (docs/cli-reference/start.md): gpustack is the last namespace level,
    # and --system-default-container-registry names the path above it.
    REGISTRY=${REGISTRY%/gpustack}
    NAMESPACE=gpustack
  fi
  NAMESPACE=${NAMESPACE:-gpustack}
}

# ---------------------------------------------------------------------------------------------
# Step 2: integrity. Every file must be listed in SHA256SUMS and match it; nothing else may be
# there (check-sums.sh, shared with install-model.sh).

# The signature covers SHA256SUMS, which covers every file: checked first, with the site's key
# and the host's own gpgv. (Whoever can alter the bundle can alter this script too: README.md,
# "Signatures", gives the same check to run by hand before any script of the bundle.)
check_signature() {
  [[ -n $VERIFY_KEY ]] || return 0
  say "checking the bundle's signature with $VERIFY_KEY"
  local signer
  signer=$(PROG=$PROG bash "$BUNDLE/verify-signature.sh" "$BUNDLE" "$VERIFY_KEY") || exit 7
  say "signature good: SHA256SUMS signed by key $signer"
}

verify_bundle() {
  local problems
  [[ -f SHA256SUMS ]] || die 3 "SHA256SUMS not found in $BUNDLE: the bundle is incomplete; re-copy the whole bundle from the source media"
  command -v sha256sum >/dev/null || die 3 "sha256sum not found; install coreutils to verify the bundle"
  [[ -f check-sums.sh ]] || die 3 "check-sums.sh not found in $BUNDLE: the bundle is incomplete; re-copy the whole bundle from the source media"
  if [[ -f base.json ]]; then complete_delta; fi
  say "verifying the bundle against SHA256SUMS"
  problems=$(PROG=$PROG bash ./check-sums.sh "$BUNDLE") \
    || die 3 "the bundle in $BUNDLE is damaged (${problems:-?} problem(s) listed above); re-copy the whole bundle from the source media and run $PROG again"
  say "bundle verified"
}

# ---------------------------------------------------------------------------------------------
# Deltas: a bundle with base.json left out the pieces (wheels, tools, image blobs) that the site
# already holds. Each missing file SHA256SUMS lists is taken from the prefix's store, the --base
# bundle, or (image blobs, with --registry) the site registry, and checked with every other file
# below. One piece found nowhere stops the install before anything changes, naming each.

# The repositories base.json names for the image blob HEX, space-separated (one entry a line).
blob_repositories() {
  grep -F "\"sha256\": \"$1\"" base.json | sed -n 's/.*"repositories": \[\([^]]*\)\].*/\1/p' | tr -d '" ' | tr ',' ' '
}

# fetch_blob HEX DEST: from the site registry, under any repository that holds it.
fetch_blob() {
  local hex=$1 dest=$2 repo url
  ((HAS_REGISTRY)) && command -v curl >/dev/null 2>&1 || return 1
  for repo in $(blob_repositories "$hex"); do
    url=$(registry_ref "$repo:x")
    url=${url%:x}
    for scheme in $(registry_schemes); do
      if curl -fsSL --retry 2 -o "$dest.tmp" "$scheme://${url%%/*}/v2/${url#*/}/blobs/sha256:$hex" 2>/dev/null; then
        mv -f -- "$dest.tmp" "$dest"
        return 0
      fi
    done
  done
  rm -f -- "$dest.tmp"
  return 1
}

# https first, and plain http for a registry on this host or listed as insecure by the operator.
registry_schemes() {
  case ${REGISTRY%%/*} in
    127.0.0.1* | localhost*) printf 'http https' ;;
    *) printf 'https http' ;;
  esac
}

# place SRC DEST: a hard link when on the same file system, else a copy; never half-written.
place() {
  mkdir -p -- "$(dirname -- "$2")" || return 1
  ln -f -- "$1" "$2" 2>/dev/null && return 0
  cp -f -- "$1" "$2.tmp" && mv -f -- "$2.tmp" "$2"
}

complete_delta() {
  local hex path where found missing=() store=$PREFIX/store/sha256 looked
  looked="$store${BASE_DIR:+, $BASE_DIR}"
  if ((HAS_REGISTRY)); then looked+=", $REGISTRY"; fi
  say "delta bundle (base.json): taking the pieces it left out from $looked"
  while read -r hex path; do
    path=${path#\*}
    path=${path#./}
    [[ -e $path ]] && continue
    found=""
    if [[ -f $store/$hex ]]; then
      place "$store/$hex" "$path" && found=$store
    fi
    if [[ -z $found && -n $BASE_DIR ]]; then
      where=$(sed -n "s/^$hex [ *]\(\.\/\)\{0,1\}//p" "$BASE_DIR/SHA256SUMS" 2>/dev/null | head -n1)
      if [[ -n $where && -f $BASE_DIR/$where ]]; then place "$BASE_DIR/$where" "$path" && found=$BASE_DIR; fi
    fi
    if [[ -z $found && $path == images/blobs/* ]] && fetch_blob "$hex" "$path"; then
      found=$REGISTRY
    fi
    if [[ -n $found && $(sha256sum -- "$path" | cut -c1-64) != "$hex" ]]; then
      rm -f -- "$path"
      missing+=("$path (sha256 $hex): the copy in $found is altered")
      continue
    fi
    if [[ -z $found ]]; then missing+=("$path (sha256 $hex): not in the bundle, nor in $looked"); fi
  done < <(sed -E -n 's/^([0-9a-fA-F]{64}) (.*)$/\1 \2/p' SHA256SUMS)
  if ((${#missing[@]})); then
    for path in "${missing[@]}"; do printf '%s: missing piece: %s\n' "$PROG" "$path" >&2; done
    die 3 "this delta bundle needs ${#missing[@]} piece(s) the site does not hold (listed above); nothing was changed. Install the base it was made for (base.json names it), pass --base with that earlier bundle or --registry with the site registry, or carry the full bundle"
  fi
}

# Kept on the site for later deltas and the inventory: the bundle's manifest, sums and
# bundle.env under PREFIX/bundles/NAME/, and its wheels and tools archive by sha256.
keep_bundle() {
  local name=$1 hex path kept=$PREFIX/bundles/$1
  mkdir -p -- "$kept" "$PREFIX/store/sha256" || die 6 "could not create $kept; check permissions on $PREFIX"
  for path in manifest.json SHA256SUMS bundle.env; do
    [[ -f $path ]] && { cp -f -- "$path" "$kept/$path.tmp" && mv -f -- "$kept/$path.tmp" "$kept/$path"; }
  done
  while read -r hex path; do
    path=${path#\*}
    case $path in
      wheels/*.whl | tools/*) [[ -f $PREFIX/store/sha256/$hex ]] || place "$path" "$PREFIX/store/sha256/$hex" ||
        say "warning: could not keep $path in $PREFIX/store" ;;
    esac
  done < <(sed -E -n 's/^([0-9a-fA-F]{64}) (.*)$/\1 \2/p' SHA256SUMS)
  say "kept the manifest in $kept and the bundle's wheels and tools in $PREFIX/store"
}

json_string() {
  local v=${1//\\/\\\\}
  v=${v//\"/\\\"}
  printf '"%s"' "$v"
}

# The registry's blobs of every image the kept docker bundles name: the manifest, config and
# layers of each that the registry answers for (read with the distribution API; nothing pushed).
registry_blobs() {
  local env ref target scheme body digest
  command -v curl >/dev/null 2>&1 || die 5 "curl not found; install it to read the registry for --inventory"
  for env in "$PREFIX"/bundles/*/bundle.env; do
    [[ -f $env ]] || continue
    for ref in $(sed -n 's/^IMAGES=//p' "$env" | tr ',' ' '); do
      target=$(registry_ref "$ref")
      for scheme in $(registry_schemes); do
        if body=$(curl -fsS -D "$TMP_HEADERS" -H 'Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json' \
          "$scheme://${target%%/*}/v2/$(sed 's/:\([^:/]*\)$/\/manifests\/\1/' <<<"${target#*/}")" 2>/dev/null); then
          digest=$(sed -n 's/^[Dd]ocker-[Cc]ontent-[Dd]igest: *\(sha256:[0-9a-f]\{64\}\).*/\1/p' "$TMP_HEADERS")
          [[ -n $digest ]] && printf '%s\n' "$digest"
          grep -o 'sha256:[0-9a-f]\{64\}' <<<"$body"
          break
        fi
      done
    done
  done | sort -u
}

write_inventory() {
  local dir env first=1 name blobs=() hex
  TMP_HEADERS=$(mktemp) || die 6 "mktemp failed"
  {
    printf '{\n  "kind": "gpustack-offline-inventory",\n  "schema": 1,\n  "prefix": %s,\n' "$(json_string "$PREFIX")"
    printf '  "written_at": "%s",\n  "bundles": [' "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    for dir in "$PREFIX"/bundles/*/; do
      env=$dir/bundle.env
      [[ -f $env ]] || continue
      name=$(basename -- "$dir")
      ((first)) || printf ','
      first=0
      printf '\n    {"cell": %s, "release": %s, "gpustack_version": %s, "manifest_sha256": "%s"}' \
        "$(json_string "$(sed -n 's/^BUNDLE_CELL=//p' "$env")")" "$(json_string "$name")" \
        "$(json_string "$(sed -n 's/^GPUSTACK_VERSION=//p' "$env")")" \
        "$(sha256sum "$dir/manifest.json" 2>/dev/null | cut -c1-64)"
    done
    printf '\n  ],\n  "files": ['
    first=1
    for hex in "$PREFIX"/store/sha256/*; do
      [[ -f $hex ]] || continue
      ((first)) || printf ','
      first=0
      printf '\n    "%s"' "$(basename -- "$hex")"
    done
    printf '\n  ]'
    if ((HAS_REGISTRY)); then
      mapfile -t blobs < <(registry_blobs)
      printf ',\n  "registry": {"name": %s, "blobs": [' "$(json_string "$REGISTRY")"
      first=1
      for hex in "${blobs[@]}"; do
        ((first)) || printf ','
        first=0
        printf '\n    "%s"' "$hex"
      done
      printf '\n  ]}'
    fi
    printf '\n}\n'
  } >"$INVENTORY.tmp" || die 6 "could not write $INVENTORY"
  rm -f -- "$TMP_HEADERS"
  mv -f -- "$INVENTORY.tmp" "$INVENTORY" || die 6 "could not write $INVENTORY"
  say "wrote $INVENTORY: $(grep -c '"cell"' "$INVENTORY") bundle(s), $(find "$PREFIX/store/sha256" -type f 2>/dev/null | wc -l) kept file(s)${blobs:+, ${#blobs[@]} registry blob(s)}"
}

# GPUStack's data directory: --data-dir, else data_dir in the site's gpustack.yaml, else upstream's
# default for Linux.
data_dir() {
  local configured=""
  if [[ -n $DATA_DIR ]]; then printf '%s' "$DATA_DIR"; return; fi
  [[ -f $PREFIX/gpustack.yaml ]] &&
    configured=$(sed -n 's/^data_dir: *//p' "$PREFIX/gpustack.yaml" | tail -n1)
  printf '%s' "${configured:-/var/lib/gpustack}"
}

# SQLite's online backup of database $1 into $2 with the first of: the current release's Python,
# the sqlite3 program. A plain copy would miss what is still in the write-ahead log.
sqlite_backup() {
  local py=$PREFIX/current/bin/python
  if [[ -x $py ]]; then
    "$py" -I -c 'import sqlite3, sys
src, dst = sqlite3.connect(sys.argv[1]), sqlite3.connect(sys.argv[2])
src.backup(dst)
dst.close()
src.close()' "$1" "$2"
  elif command -v sqlite3 >/dev/null 2>&1; then
    sqlite3 "$1" ".backup '$2'"
  else
    return 1
  fi
}

# backup_database RELEASE: before the first start of a new release, which migrates the database
# forward, keep a whole copy for a rollback to RELEASE.
backup_database() {
  local db dest
  db=$(data_dir)/database.db
  [[ -f $db ]] || { say "no database at $db yet: nothing to copy before the upgrade"; return; }
  dest=$PREFIX/backups/$1/database.db
  mkdir -p -- "$(dirname -- "$dest")" || die 6 "could not create $(dirname -- "$dest")"
  rm -f -- "$dest.tmp"
  sqlite_backup "$db" "$dest.tmp" ||
    die 6 "could not copy $db (SQLite backup with $PREFIX/current/bin/python or sqlite3); stop GPUStack, check the free space, and run $PROG again"
  mv -f -- "$dest.tmp" "$dest" || die 6 "could not write $dest"
  say "copied $db to $dest before the new release's first start (it migrates the database forward; --rollback restores this copy)"
}

# The database of a GPUStack 0.x container lives in the data volume: it is copied with the
# image's own Python (SQLite's online backup) into PREFIX/backups/RELEASE/, and put back the same
# way. GPUStack 2.x keeps PostgreSQL's files there instead: back the volume up by hand.
VOLUME_DB=/var/lib/gpustack/database.db

# volume_python IMAGE PROGRAM [ARGS]: PROGRAM run by the image's python3 with the data volume and
# the prefix's backups mounted, no network.
volume_python() {
  local image=$1
  shift
  mkdir -p -- "$PREFIX/backups" || die 6 "could not create $PREFIX/backups"
  docker run --rm --network none --pull never --entrypoint python3 \
    -v "$VOLUME:/var/lib/gpustack" -v "$PREFIX/backups:/backups" "$image" -I -c "$@"
}

backup_volume_database() {
  local previous=$1 image
  docker volume inspect "$VOLUME" >/dev/null 2>&1 ||
    { say "no Docker volume $VOLUME yet: nothing to copy before the upgrade"; return; }
  image=$(server_image)
  volume_python "$image" 'import os, sqlite3, sys
db, dest = sys.argv[1], f"/backups/{sys.argv[2]}/database.db"
if not os.path.exists(db):
    print(f"no {db} in the volume: nothing copied (GPUStack 2.x: back the volume up by hand)")
    sys.exit(0)
os.makedirs(os.path.dirname(dest), exist_ok=True)
src, dst = sqlite3.connect(db), sqlite3.connect(dest + ".tmp")
src.backup(dst)
dst.close()
src.close()
os.replace(dest + ".tmp", dest)
print(f"copied {db} of the volume to {dest}")' "$VOLUME_DB" "$previous" ||
    die 6 "could not copy the database in the volume $VOLUME with $image; stop GPUStack and run $PROG again"
  say "the database in $VOLUME was copied to $PREFIX/backups/$previous before the new release's first start (--rollback restores it)"
}

rollback_docker() {
  local previous current image ref
  previous=$(<"$PREFIX/docker-previous")
  current=$(<"$PREFIX/docker-current")
  for ref in $(sed -n 's/^IMAGES=//p' "$PREFIX/bundles/$previous/bundle.env" 2>/dev/null | tr ',' ' '); do
    image=${image:-$ref}
    if [[ $(repository_path "$ref") == gpustack/gpustack:* ]]; then image=$ref; fi
  done
  [[ -n ${image:-} ]] || die 6 "the previous install $previous is not recorded in $PREFIX/bundles; reinstall its bundle instead"
  if [[ -f $PREFIX/backups/$previous/database.db ]]; then
    volume_python "$image" 'import os, shutil, sys, time
db, backup = sys.argv[1], f"/backups/{sys.argv[2]}/database.db"
stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
aside = f"{db}.before-rollback.{stamp}"
for part in ("", "-wal", "-shm", "-journal"):
    if os.path.exists(db + part):
        os.replace(db + part, aside + part)
shutil.copyfile(backup, db + ".tmp")
os.replace(db + ".tmp", db)
print(f"restored {db} from the copy taken at the upgrade; the newer one is {aside}")' \
      "$VOLUME_DB" "$previous" || die 6 "could not restore the database into $VOLUME with $image (is it still loaded? docker images)"
  else
    say "no database copy for $previous in $PREFIX/backups: the volume is left as it is"
  fi
  { printf '%s\n' "$previous" >"$PREFIX/docker-current" && printf '%s\n' "$current" >"$PREFIX/docker-previous"; } ||
    die 6 "could not record the rollback in $PREFIX"
  if [[ -f $PREFIX/run-line.previous.txt ]]; then
    mv -f -- "$PREFIX/run-line.txt" "$PREFIX/run-line.swap" 2>/dev/null
    mv -f -- "$PREFIX/run-line.previous.txt" "$PREFIX/run-line.txt"
    [[ -f $PREFIX/run-line.swap ]] && mv -f -- "$PREFIX/run-line.swap" "$PREFIX/run-line.previous.txt"
  fi
  say "rolled back to $previous (from $current); stop and remove the running container, then start the previous release with"
  cat -- "$PREFIX/run-line.txt"
}

rollback() {
  local previous current db backup aside part
  if [[ -f $PREFIX/docker-previous && ! -L $PREFIX/current ]]; then
    rollback_docker
    return
  fi
  [[ -L $PREFIX/previous ]] ||
    die 6 "no previous release is recorded in $PREFIX (no $PREFIX/previous): nothing to roll back to"
  previous=$(readlink -- "$PREFIX/previous")
  current=$(readlink -- "$PREFIX/current")
  [[ -e $PREFIX/$previous/.complete ]] ||
    die 6 "the previous release $PREFIX/$previous is missing or incomplete; reinstall its bundle instead"
  db=$(data_dir)/database.db
  backup=$PREFIX/backups/${previous#releases/}/database.db
  if [[ -f $backup ]]; then
    # the newer database goes aside whole: its write-ahead log must not meet the older copy
    aside=$db.before-rollback.$(date -u +%Y%m%dT%H%M%SZ)
    for part in "" -wal -shm -journal; do
      if [[ -f $db$part ]]; then mv -f -- "$db$part" "$aside$part" || die 6 "could not move $db$part aside"; fi
    done
    { cp -f -- "$backup" "$db.tmp" && mv -f -- "$db.tmp" "$db"; } || die 6 "could not restore $backup to $db"
    say "restored $db from $backup (the newer database is kept as $aside)"
  else
    say "no database copy for ${previous#releases/} in $PREFIX/backups: the database is left as it is"
  fi
  atomic_symlink "$previous" "$PREFIX/current" || die 6 "could not point $PREFIX/current at $previous"
  atomic_symlink "$current" "$PREFIX/previous" || die 6 "could not update $PREFIX/previous"
  say "current -> $previous (rolled back from $current); start GPUStack again"
}

# The install method bundle.env names, read without running bundle.env (it is not verified yet),
# so that options meant for the other kind of bundle are refused before a long verification.
peek_method() {
  local method=""
  [[ -f bundle.env ]] && method=$(sed -n 's/^INSTALL_METHOD=//p' bundle.env | tail -n1)
  method=${method//[\"\']/}
  check_method_options "${method:-pip}"
}

# check_method_options METHOD: usage errors for options the bundle's method does not take.
check_method_options() {
  case $1 in
    docker)
      ((${#PIP_OPTIONS[@]} == 0)) ||
        die 2 "${PIP_OPTIONS[0]} applies to pip bundles only; this docker bundle installs into the Docker engine (omit ${PIP_OPTIONS[0]}; see --help)"
      ;;
    *)
      ((!HAS_REGISTRY)) ||
        die 2 "--registry applies to docker bundles only; this is a $1 bundle (omit --registry; see --help)"
      ;;
  esac
}

require_keys() {
  local key
  for key in "$@"; do
    [[ -n ${!key:-} ]] || die 3 "bundle.env has no $key; re-copy the whole bundle from the source media"
  done
}

load_bundle_env() {
  [[ -f bundle.env ]] || die 3 "bundle.env not found in $BUNDLE; re-copy the whole bundle from the source media"
  # Optional keys: a value from the caller's environment must not stand in for a missing one.
  TOOLS_ARCHIVE="" INSTALL_METHOD="" IMAGE_ARCHIVE="" IMAGES="" INSTALLER_WHEEL="" START_MODULES=""
  WORKER_OPTIONS="" IMAGE_PUSH=""
  # shellcheck source=/dev/null
  . ./bundle.env
  require_keys BUNDLE_CELL GPUSTACK_VERSION
  # Bundles from before the docker method have no INSTALL_METHOD: they are pip bundles.
  INSTALL_METHOD=${INSTALL_METHOD:-pip}
  case $INSTALL_METHOD in
    pip)
      require_keys TARGET_PYTHON REQUIREMENT
      check_tools_files
      check_installer_file
      ;;
    docker)
      require_keys TARGET_OS TARGET_ARCH TARGET_DEVICE IMAGE_ARCHIVE IMAGES
      check_image_files
      check_worker_options_file
      ;;
    *) die 3 "bundle.env names the install method '$INSTALL_METHOD'; this install.sh knows pip and docker: re-copy the whole bundle from the source media" ;;
  esac
  check_method_options "$INSTALL_METHOD"
}

# The installer wheel bundle.env names must be in the bundle (its bytes are in SHA256SUMS); a
# bundle without one installs with pip, and --installer uv is then refused before anything changes.
check_installer_file() {
  if [[ -z $INSTALLER_WHEEL ]]; then
    [[ $INSTALLER != uv ]] ||
      die 2 "--installer uv: this bundle carries no uv (no INSTALLER_WHEEL in bundle.env); omit --installer or pass --installer pip"
    INSTALLER=pip
    return
  fi
  case /$INSTALLER_WHEEL/ in
    //* | */../*) die 3 "bundle.env has INSTALLER_WHEEL=$INSTALLER_WHEEL, not a path inside the bundle; re-copy the whole bundle from the source media" ;;
  esac
  [[ -f $INSTALLER_WHEEL ]] ||
    die 3 "the installer wheel $INSTALLER_WHEEL named in bundle.env is not in $BUNDLE; re-copy the whole bundle from the source media"
  [[ -z $START_MODULES ]] || case /$START_MODULES/ in
    //* | */../*) die 3 "bundle.env has START_MODULES=$START_MODULES, not a path inside the bundle; re-copy the whole bundle from the source media" ;;
    *) [[ -f $START_MODULES ]] || die 3 "$START_MODULES named in bundle.env is not in $BUNDLE; re-copy the whole bundle from the source media" ;;
  esac
}

# The device's docker run options (one a line), printed in the run line: a GPUStack 2.x worker's,
# or a 0.x image's as upstream's docs run it.
check_worker_options_file() {
  [[ -n $WORKER_OPTIONS ]] || return 0
  case /$WORKER_OPTIONS/ in
    //* | */../*) die 3 "bundle.env has WORKER_OPTIONS=$WORKER_OPTIONS, not a path inside the bundle; re-copy the whole bundle from the source media" ;;
  esac
  [[ -f $WORKER_OPTIONS ]] ||
    die 3 "$WORKER_OPTIONS named in bundle.env is not in $BUNDLE; re-copy the whole bundle from the source media"
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

# A docker bundle's preflight asks Docker, not Python or the prefix.
run_docker_preflight() {
  if ((SKIP_PREFLIGHT)); then
    say "skipping preflight (--skip-preflight)"
    return
  fi
  bash ./preflight.sh ||
    die 4 "preflight failed; fix the items above or pass --skip-preflight"
}

# ---------------------------------------------------------------------------------------------
# Step 4: install into a new release directory.

# Remove the release directory of this run if it did not reach .complete (runs on any exit).
remove_partial_release() {
  if [[ -n ${UV_DIR:-} ]]; then rm -rf -- "$UV_DIR"; fi
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
  local why
  if ! why=$(mkdir -p -- "$PREFIX/releases" 2>&1); then
    # sudo does not help root: say what the file system said, and how to move the prefix
    if [[ $(id -u) == 0 ]]; then
      die 5 "cannot create $PREFIX/releases (${why##*: }); pass --prefix to a directory on a writable file system"
    fi
    die 5 "cannot create $PREFIX/releases (${why##*: }); run as root (sudo) or pass --prefix to a directory you can write"
  fi
  if [[ -e $REL ]]; then
    say "removing the incomplete release $REL_NAME left by an earlier run"
    rm -rf -- "$REL"
  fi

  PARTIAL=$REL
  trap remove_partial_release EXIT
  # Turn Ctrl-C and kill into a normal exit so the EXIT trap cleans up.
  trap 'exit 130' INT
  trap 'exit 143' TERM

  # uv installs into a venv without pip of its own (GPUStack runs none); pip needs one
  local started
  started=$(now_us)
  if [[ $INSTALLER != pip ]] && unpack_uv; then
    make_venv --without-pip
    install_with_uv
    say "installed with uv$(took "$started")"
  else
    make_venv
    install_with_pip
    say "installed with pip$(took "$started")"
  fi

  "$REL/bin/gpustack" version ||
    die 5 "the installed '$REL/bin/gpustack version' failed (see above); nothing was switched"

  load_tools

  touch -- "$REL/.complete"
  PARTIAL=""
  trap - EXIT INT TERM
}

make_venv() {
  say "creating the virtual environment $REL"
  "$PY" -m venv "$@" -- "$REL" ||
    die 5 "could not create a virtual environment with $PY; install python$TARGET_PYTHON-venv (or pass --python PATH)"
}

# Unpack the uv program from the bundle's uv wheel (its sha256 was checked with the rest) into
# a private folder beside the releases, and check that it runs here; on failure say why and
# return 1 (pip installs instead), unless --installer uv asked for uv.
unpack_uv() {
  UV_DIR=$PREFIX/releases/.uv-$$
  rm -rf -- "$UV_DIR"
  local why
  if why=$("$PY" -I -c 'import os, shutil, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.endswith(".data/scripts/uv")]
    if len(names) != 1:
        sys.exit(wheel + " holds no uv program")
    os.makedirs(dest)
    with z.open(names[0]) as src, open(os.path.join(dest, "uv"), "wb") as out:
        shutil.copyfileobj(src, out)
os.chmod(os.path.join(dest, "uv"), 0o755)' "$BUNDLE/$INSTALLER_WHEEL" "$UV_DIR" 2>&1) &&
    why=$("$UV_DIR/uv" --version 2>&1); then
    say "installer: $why (from $INSTALLER_WHEEL)"
    return 0
  fi
  rm -rf -- "$UV_DIR"
  UV_DIR=""
  [[ $INSTALLER != uv ]] ||
    die 5 "--installer uv: the bundled uv cannot run here (${why:-no output}); nothing was switched; pass --installer pip"
  say "the bundled uv cannot run here (${why:-no output}); installing with pip instead"
  return 1
}

# The same hashed wheels, installed by uv: no index, no network, no uv configuration of the site
# (--no-config, and no UV_* variable reaches it), its cache a private folder on the prefix's file
# system, removed afterwards. Then the bytecode of everything `gpustack start` loads (the build
# listed it, from the release's own code, in START_MODULES) is written on every CPU, so the first
# start compiles nothing: about 2,300 of a base release's 15,000 modules, the rest compiled when
# first imported, as after `pip --no-compile`.
install_with_uv() {
  say "installing $REQUIREMENT from the bundled wheels with uv"
  (
    for var in $(compgen -e); do
      if [[ $var == UV_* ]]; then unset "$var"; fi
    done
    UV_CACHE_DIR=$UV_DIR/cache "$UV_DIR/uv" pip install --offline --no-index --no-config \
      --python "$REL/bin/python" --find-links "$BUNDLE/wheels" --require-hashes \
      --only-binary :all: --no-deps -r "$BUNDLE/requirements.txt"
  ) || die 5 "uv could not install the bundled wheels into $REL (see uv's messages above); nothing was switched; install.sh --installer pip installs the same wheels with pip"
  rm -rf -- "$UV_DIR"
  UV_DIR=""
  [[ -n $START_MODULES ]] || return 0
  say "byte-compiling what gpustack start loads ($(wc -l <"$BUNDLE/$START_MODULES") modules)"
  "$REL/bin/python" -I -c 'import compileall, concurrent.futures, functools, os, sys, sysconfig
site = sysconfig.get_paths()["purelib"]
with open(sys.argv[1], encoding="utf-8") as f:
    names = [os.path.join(site, n) for n in f.read().split()]
names = [n for n in names if os.path.isfile(n)]
compile_one = functools.partial(compileall.compile_file, quiet=2)
with concurrent.futures.ProcessPoolExecutor() as pool:
    done = list(pool.map(compile_one, names, chunksize=32))
sys.exit(0 if all(done) else 1)' "$BUNDLE/$START_MODULES" ||
    die 5 "could not byte-compile what gpustack start loads in $REL (see above); nothing was switched"
}

install_with_pip() {
  say "installing $REQUIREMENT from the bundled wheels with pip"
  # The site's pip configuration (pip.conf constraints, find-links, user=true, PIP_* variables)
  # must not change what gets installed: PIP_CONFIG_FILE=/dev/null skips every config file and
  # --isolated ignores PIP_* variables. requirements.txt pins the whole closure with hashes, so
  # --no-deps installs exactly that set.
  PIP_CONFIG_FILE=/dev/null "$REL/bin/python" -m pip --isolated install --no-index \
    --find-links "$BUNDLE/wheels" --require-hashes --only-binary=:all: --no-deps \
    -r "$BUNDLE/requirements.txt" ||
    die 5 "pip could not install the bundled wheels into $REL (see pip's messages above); nothing was switched"
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
# Docker bundles: load the archive into the engine, optionally push to the site's registry, and
# print how to start GPUStack.

# name:tag with an optional registry host, the form `docker load` gives RepoTags.
IMAGE_REF='^([A-Za-z0-9.-]+(:[0-9]+)?/)?[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*(/[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*)*:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$'

check_image_files() {
  local ref
  case /$IMAGE_ARCHIVE/ in
    //* | */../*) die 3 "bundle.env has IMAGE_ARCHIVE=$IMAGE_ARCHIVE, not a path inside the bundle; re-copy the whole bundle from the source media" ;;
  esac
  # a folder (an OCI layout with docker's manifest.json, streamed into docker load as a tar), or
  # in bundles built before it, one tar
  [[ -f $IMAGE_ARCHIVE || -f $IMAGE_ARCHIVE/manifest.json ]] ||
    die 3 "the image archive $IMAGE_ARCHIVE named in bundle.env is not in $BUNDLE; re-copy the whole bundle from the source media"
  IFS=, read -ra IMAGE_REFS <<<"$IMAGES"
  ((${#IMAGE_REFS[@]} > 0)) || die 3 "bundle.env has no image in IMAGES; re-copy the whole bundle from the source media"
  for ref in "${IMAGE_REFS[@]}"; do
    [[ $ref =~ $IMAGE_REF ]] ||
      die 3 "bundle.env has '$ref' in IMAGES, not an image name with a tag; re-copy the whole bundle from the source media"
  done
}

# The repository and tag of REF without a registry host: gpustack/gpustack:v0.7.1-cpu.
repository_path() {
  local ref=$1 first=${1%%/*}
  if [[ $ref == */* && ($first == *.* || $first == *:* || $first == localhost) ]]; then
    ref=${ref#*/}
  fi
  printf '%s' "$ref"
}

# The name REF gets in the site's registry: REGISTRY/gpustack/gpustack:v0.7.1-cpu, with
# NAMESPACE in the place of upstream's gpustack.
registry_ref() {
  local path
  path=$(repository_path "$1")
  if [[ $path == gpustack/* ]]; then path=$NAMESPACE/${path#gpustack/}; fi
  printf '%s/%s' "$REGISTRY" "$path"
}

load_images() {
  local archive=$BUNDLE/$IMAGE_ARCHIVE
  command -v docker >/dev/null 2>&1 ||
    die 5 "docker not found on PATH; install Docker Engine from your OS media or mirror (preflight.sh checks this) and run $PROG again"
  say "loading $IMAGE_ARCHIVE into Docker (docker load; images already there are simply loaded again)"
  if [[ -d $archive ]]; then
    # streamed: the folder's tar is never written to disk
    command -v tar >/dev/null 2>&1 ||
      die 5 "tar not found on PATH; install it from your OS media (package tar) and run $PROG again"
    tar -C "$archive" -cf - . | docker load ||
      die 5 "'tar -C $archive -cf - . | docker load' failed (see the message above); check that the Docker daemon runs and has room under its root dir (bash preflight.sh), then run $PROG again"
  else
    docker load -i "$archive" ||
      die 5 "'docker load -i $archive' failed (see Docker's message above); check that the Docker daemon runs and has room under its root dir (bash preflight.sh), then run $PROG again"
  fi
}

# Every reference in IMAGES must now be in the engine, for this bundle's platform.
check_loaded() {
  local ref info id platform
  say "images in Docker:"
  for ref in "${IMAGE_REFS[@]}"; do
    info=$(docker image inspect --format '{{.Id}} {{.Os}}/{{.Architecture}}' "$ref" 2>&1) ||
      die 5 "$ref is not in Docker after loading $IMAGE_ARCHIVE ($(tail -n1 <<<"$info")); the archive does not hold it: rebuild the bundle"
    id=${info%% *} platform=${info#* }
    printf '  %s  %s  %s\n' "$ref" "$id" "$platform"
    [[ $platform == "$TARGET_OS/$TARGET_ARCH" ]] ||
      die 5 "$ref in $IMAGE_ARCHIVE is for $platform, but this bundle is for $TARGET_OS/$TARGET_ARCH: rebuild the bundle"
  done
}

# Tag each image with the registry's name and push it; the registry is the only host contacted.
# With the bundle's upload list (IMAGE_PUSH) and curl, and a registry that takes anonymous
# pushes, the bundle's own blobs and manifests are uploaded through the distribution API: the
# registry then holds exactly the bytes the bundle's sums name, so a later delta bundle can
# leave out every blob it has. Otherwise docker push, which compresses the layers anew.
push_images() {
  local why=""
  if [[ -z ${IMAGE_PUSH:-} || ! -f ${IMAGE_PUSH:-} ]]; then
    why="the bundle has no upload list (IMAGE_PUSH)"
  elif ! command -v curl >/dev/null 2>&1; then
    why="curl is not installed"
  elif ! REGISTRY_BASE=$(registry_base); then
    why="$REGISTRY does not take anonymous pushes (or does not answer /v2/)"
  fi
  if [[ -z $why ]]; then
    push_exact
  else
    say "pushing with docker push: $why; the registry's layer digests will differ from the bundle's, so later delta bundles cannot take layers from it"
    push_with_docker
  fi
}

# The URL of the registry's API root that answers GET /v2/ without credentials.
registry_base() {
  local scheme code
  for scheme in $(registry_schemes); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "$scheme://${REGISTRY%%/*}/v2/" 2>/dev/null) || code=000
    if [[ $code == 200 ]]; then
      printf '%s://%s' "$scheme" "${REGISTRY%%/*}"
      return 0
    fi
  done
  return 1
}

# upload_blob REPO HEX: the export's blob, unless the repository has it already.
upload_blob() {
  local repo=$1 hex=$2 file=$IMAGE_ARCHIVE/blobs/sha256/$2 code location sep
  code=$(curl -s -o /dev/null -w '%{http_code}' -I "$REGISTRY_BASE/v2/$repo/blobs/sha256:$hex") || code=000
  [[ $code == 200 ]] && return 0
  location=$(curl -fsS -X POST -o /dev/null -D - "$REGISTRY_BASE/v2/$repo/blobs/uploads/" |
    sed -n 's/^[Ll]ocation: *//p' | tr -d '\r') || return 1
  [[ -n $location ]] || return 1
  [[ $location == http* ]] || location=$REGISTRY_BASE$location
  sep='?'
  [[ $location == *\?* ]] && sep='&'
  curl -fsS -o /dev/null -T "$file" -H 'Content-Type: application/octet-stream' \
    "$location${sep}digest=sha256:$hex"
}

push_exact() {
  local ref media manifest blobs target repo tag hex
  say "pushing to $REGISTRY (the bundle's own blobs, through the registry API)"
  while IFS=$'\t' read -r ref media manifest blobs; do
    [[ -n $ref ]] || continue
    target=$(registry_ref "$ref")
    repo=${target#*/}
    tag=${repo##*:}
    repo=${repo%:*}
    docker tag "$ref" "$target" || die 5 "'docker tag $ref $target' failed (see above)"
    for hex in $blobs; do
      upload_blob "$repo" "$hex" ||
        die 5 "uploading blob sha256:$hex of $ref to $REGISTRY_BASE/v2/$repo failed; check that $REGISTRY answers from this host and has room, then run $PROG --registry $REGISTRY again"
    done
    curl -fsS -o /dev/null -X PUT -H "Content-Type: $media" \
      --data-binary "@$IMAGE_ARCHIVE/blobs/sha256/$manifest" "$REGISTRY_BASE/v2/$repo/manifests/$tag" ||
      die 5 "uploading the manifest of $ref to $REGISTRY_BASE/v2/$repo failed; run $PROG --registry $REGISTRY again"
    say "pushed $target@sha256:$manifest"
    PUSHED+=("$target@sha256:$manifest")
  done <"$IMAGE_PUSH"
}

push_with_docker() {
  local ref target out digest
  say "pushing to $REGISTRY"
  for ref in "${IMAGE_REFS[@]}"; do
    target=$(registry_ref "$ref")
    docker tag "$ref" "$target" || die 5 "'docker tag $ref $target' failed (see above)"
    say "docker push $target"
    # Progress goes to the terminal as it comes; the output is kept to find the digest.
    { out=$(docker push "$target" 2>&1 | tee /dev/fd/3); } 3>&1 ||
      die 5 "'docker push $target' failed (see above): check that $REGISTRY answers from this host, log in first if it needs it (docker login ${REGISTRY%%/*}), and list a registry without TLS under insecure-registries in /etc/docker/daemon.json; then run $PROG --registry $REGISTRY again"
    digest=$(sed -n 's/.*digest: \(sha256:[0-9a-f]\{64\}\).*/\1/p' <<<"$out" | tail -n1)
    [[ -n $digest ]] ||
      die 5 "'docker push $target' did not report a digest (see above); check the registry, then run $PROG --registry $REGISTRY again"
    say "pushed $target@$digest"
    PUSHED+=("$target@$digest")
  done
}

# The image the run line starts: GPUStack's own when IMAGES has several.
server_image() {
  local ref
  for ref in "${IMAGE_REFS[@]}"; do
    if [[ $(repository_path "$ref") == gpustack/gpustack:* ]]; then
      printf '%s' "$ref"
      return
    fi
  done
  printf '%s' "${IMAGE_REFS[0]}"
}

# The model catalog install-model.sh writes at its default place under GPUStack's data directory
# (DATA_DIR/models/model-catalog.yaml, its first line naming its format), if it is there: a new
# gpustack.yaml or docker.env names it instead of the catalog shipped with GPUStack.
site_catalog() {
  local file first=""
  file=$(data_dir)/models/model-catalog.yaml
  [[ -f $file ]] || return 0
  IFS= read -r first <"$file" || true
  [[ $first != '# GPUStack model catalog (gpustack-offline, format gpustack-'* ]] || printf '%s' "$file"
}

# add_site_volume DIR: DIR:DIR:ro in PREFIX/docker.volumes (as install-model.sh --prefix adds it).
add_site_volume() {
  local file=$PREFIX/docker.volumes
  if [[ -f $file ]] && grep -qxF -- "$1:$1:ro" "$file"; then return 0; fi
  mkdir -p -- "$PREFIX" || die 6 "could not create $PREFIX; check permissions"
  { printf '%s:%s:ro\n' "$1" "$1" >>"$file"; } 2>/dev/null || die 6 "could not write $file; check permissions on $PREFIX"
}

# site_volumes FLAG: SITE_VOLUMES, "FLAG HOST:CONTAINER[:ro]" for each line of PREFIX/docker.volumes
# (the model folders install-model.sh --prefix recorded), for the docker run lines.
site_volumes() {
  local spec
  SITE_VOLUMES=()
  [[ -f $PREFIX/docker.volumes ]] || return 0
  while IFS= read -r spec; do
    case $spec in '' | '#'*) continue ;; esac
    SITE_VOLUMES+=("$1 $spec")
  done <"$PREFIX/docker.volumes"
}

# The air-gapped environment for the container, as the pip path's gpustack.yaml/gpustack.env:
# GPUStack's own GPUSTACK_* variables (read by `gpustack start` as its option defaults) and the
# libraries' switches. The model catalog's path inside the image is asked of the image itself.
# Written once: a site's edits are kept on later installs.
write_docker_env() {
  local image package
  image=$(server_image)
  DOCKER_ENV=$PREFIX/docker.env
  if [[ -e $DOCKER_ENV ]]; then
    say "kept the existing $DOCKER_ENV"
    return
  fi
  local catalog="# GPUSTACK_MODEL_CATALOG_FILE=(GPUStack's python package not found in $image)" site
  # GPUStack 2.3's content index (gpustack/server/sources/probe.py): its official sources start
  # out of service, serving the content the image ships (GPUSTACK_BOOTSTRAP_WITH_EMBEDDED_SOURCES,
  # upstream's switch "where the OTA server is out of reach"), and --ota-server-url is a closed
  # local port should an admin put one in service; earlier releases ignore both variables
  local ota="# (no OTA content server before GPUStack 2.x)"
  if [[ $GPUSTACK_VERSION == 2.* ]]; then
    ota=$'# (2.3) the content the image ships, not ota.gpustack.ai\nGPUSTACK_BOOTSTRAP_WITH_EMBEDDED_SOURCES=true\n# --ota-server-url (2.3): a closed local port instead of ota.gpustack.ai\nGPUSTACK_OTA_SERVER_URL=http://127.0.0.1:1/latest'
  fi
  site=$(site_catalog)
  if [[ -n $site ]]; then
    catalog=GPUSTACK_MODEL_CATALOG_FILE=$site
    add_site_volume "$(dirname -- "$site")"
    say "model catalog: $site, written by install-model.sh (mounted read-only: $PREFIX/docker.volumes)"
  elif package=$(docker run --rm --network none --pull never --entrypoint python3 "$image" -I -c \
    'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("gpustack").origin))' \
    2>/dev/null); then
    catalog=GPUSTACK_MODEL_CATALOG_FILE=$package/assets/model-catalog.yaml
  else
    say "warning: could not ask $image where GPUStack is installed; the model catalog is not set"
  fi
  mkdir -p -- "$PREFIX" || die 6 "could not create $PREFIX; check permissions"
  cat >"$DOCKER_ENV.tmp" <<EOF || die 6 "could not write $DOCKER_ENV; check permissions on $PREFIX"
# Environment for GPUStack's container on an air-gapped site, written by install.sh
# ($BUNDLE_CELL); used with docker run --env-file. Each line keeps the first start from
# reaching for the internet; delete one to turn upstream's behaviour back on.
# --model-catalog-file: the catalog inside the image (or the site's, by install-model.sh
# --prefix), not huggingface.co / modelscope.cn
$catalog
# --update-check-url: a closed local port (also answers the UI's /update/)
GPUSTACK_UPDATE_CHECK_URL=http://127.0.0.1:1/
# --tools-download-base-url: a missing tool fails at once (the image carries its tools)
GPUSTACK_TOOLS_DOWNLOAD_BASE_URL=http://127.0.0.1:1
$ota
$LIBRARY_SWITCHES
EOF
  mv -f -- "$DOCKER_ENV.tmp" "$DOCKER_ENV" || die 6 "could not write $DOCKER_ENV"
  say "wrote $DOCKER_ENV"
}

# Upstream's `docker run` for the device, as docs/installation/<device>/online-installation.md of
# GPUStack 0.6.2 and 0.7.1 give it (host network; NVIDIA adds --gpus all and --ipc=host for the
# shared memory of vLLM and PyTorch; Ascend, AMD, Hygon and Moore Threads their options from the
# build matrix, WORKER_OPTIONS: device nodes, driver mounts, groups), with `--pull never` added.
print_docker_next_steps() {
  local image line=() device=()
  image=$(server_image)
  if ((HAS_REGISTRY)); then image=$(registry_ref "$image"); fi
  line=("docker run -d --name gpustack" "--restart=unless-stopped")
  if [[ -n $WORKER_OPTIONS ]]; then
    mapfile -t device <"$BUNDLE/$WORKER_OPTIONS"
    line+=("${device[@]}")
  else
    case $TARGET_DEVICE in
      cuda*) line+=("--gpus all" "--network=host" "--ipc=host") ;;
      *) line+=("--network=host") ;;
    esac
  fi
  line+=("-v $VOLUME:/var/lib/gpustack")
  site_volumes -v
  line+=("${SITE_VOLUMES[@]}" "--env-file $DOCKER_ENV" "--pull never" "$image")

  printf '\nGPUStack %s is loaded into Docker (%s).\n' "$GPUSTACK_VERSION" "$BUNDLE_CELL"
  if ((HAS_REGISTRY)); then
    printf '  pushed to %s:\n' "$REGISTRY"
    printf '    %s\n' "${PUSHED[@]}"
  fi
  printf '\nNext steps:\n'
  if ((HAS_REGISTRY)); then
    cat <<EOF
  On every other host of the site, get the image from $REGISTRY (Docker trusts a registry
  without TLS only on 127.0.0.1 or when listed under insecure-registries in daemon.json):
       docker pull $image
EOF
  fi
  printf "  Start the GPUStack server and built-in worker (upstream's line for %s):\n" "$TARGET_DEVICE"
  print_run_line "${line[@]}"
  cat <<EOF
  --pull never makes Docker use the image on this host and never reach for Docker Hub. Append
  gpustack start options after the image name (for example --port 9090). Then:
       docker logs -f gpustack
       docker exec -it gpustack cat /var/lib/gpustack/initial_admin_password
EOF
}

# Lays out a docker run line as upstream's docs do: one option a line, continued with a backslash.
print_run_line() {
  local i
  for ((i = 1; i <= $#; i++)); do
    if ((i == 1)); then printf '       %s' "${!i}"; else printf '           %s' "${!i}"; fi
    if ((i < $#)); then printf ' \\\n'; else printf '\n'; fi
  done
}

# The start flags of GPUStack 2.x for the site registry (docs/cli-reference/start.md of 2.2.3 and
# 2.3.0): --system-default-container-registry prefixes every image the server and worker name
# (gpustack/utils/config.py: apply_registry_override_to_image). Under another namespace than
# gpustack, the server image and the benchmark image are named with --image-repo and
# --benchmark-image-repo, and the runners, pause and health images through gpustack_runtime's
# GPUSTACK_RUNTIME_DEPLOY_DEFAULT_CONTAINER_NAMESPACE (registry.env).
registry_flags() {
  local ref path
  REG_FLAGS=(--system-default-container-registry "$REGISTRY")
  [[ $NAMESPACE != gpustack ]] || return 0
  REG_FLAGS+=(--image-repo "$NAMESPACE/gpustack")
  for ref in "${IMAGE_REFS[@]}"; do
    path=$(repository_path "$ref")
    if [[ $path == gpustack/benchmark-runner:* ]]; then
      REG_FLAGS+=(--benchmark-image-repo "$NAMESPACE/${path#gpustack/}")
    fi
  done
}

# DIR/server.args (one argument a line, as upstream's entrypoint saves them) and, for another
# namespace, DIR/registry.env; rewritten on every install with --registry.
write_registry_files() {
  local args=$PREFIX/server.args renv=$PREFIX/registry.env
  registry_flags
  { printf '%s\n' "${REG_FLAGS[@]}" >"$args.tmp" && mv -f -- "$args.tmp" "$args"; } ||
    die 6 "could not write $args; check permissions on $PREFIX"
  say "wrote $args"
  if [[ $NAMESPACE == gpustack ]]; then
    rm -f -- "$renv"
    return
  fi
  { printf 'GPUSTACK_RUNTIME_DEPLOY_DEFAULT_CONTAINER_NAMESPACE=%s\n' "$NAMESPACE" >"$renv.tmp" &&
    mv -f -- "$renv.tmp" "$renv"; } || die 6 "could not write $renv; check permissions on $PREFIX"
  say "wrote $renv"
}

# GPUStack 2.x (README of the 2.2.3 and 2.3.0 wheels): the server, and a worker on each GPU host
# that starts the runner containers through the Docker socket. The worker line is the UI's Add
# Worker command of that version (gpustack/ui in its wheel): the common options, then the
# device's own (WORKER_OPTIONS: runtime, device env, driver and toolkit mounts) from the build
# matrix's [backends] table. With --registry, both get the flags of registry_flags, so every
# image they ask for (runners, pause, health, benchmark) comes from the site's registry.
print_docker2_next_steps() {
  local image reg_flag=() device=() env_files=("--env-file $DOCKER_ENV") i
  image=$(server_image)
  if ((HAS_REGISTRY)); then
    image=$(registry_ref "$image")
    registry_flags
    for ((i = 0; i < ${#REG_FLAGS[@]}; i += 2)); do
      reg_flag+=("${REG_FLAGS[i]} ${REG_FLAGS[i + 1]}")
    done
    if [[ $NAMESPACE != gpustack ]]; then env_files+=("--env-file $PREFIX/registry.env"); fi
  fi
  if [[ -n $WORKER_OPTIONS ]]; then
    mapfile -t device <"$BUNDLE/$WORKER_OPTIONS"
  fi
  printf '\nGPUStack %s is loaded into Docker (%s): the server and %d more image(s).\n' \
    "$GPUSTACK_VERSION" "$BUNDLE_CELL" "$((${#IMAGE_REFS[@]} - 1))"
  if ((HAS_REGISTRY)); then
    printf '  pushed to %s; the server and workers will ask for exactly these:\n' "$REGISTRY"
    printf '    %s\n' "${PUSHED[@]}"
  else
    printf '  No --registry given: only this host has the runner images. For a cluster, run\n'
    printf '  %s --registry HOST[:PORT][/PREFIX] to push them into the site registry.\n' "$PROG"
  fi
  site_volumes --volume
  printf '\nNext steps:\n  Start the GPUStack server:\n'
  print_run_line "docker run -d --name gpustack" "--restart unless-stopped" "-p 80:80" \
    "--volume $VOLUME:/var/lib/gpustack" "${SITE_VOLUMES[@]}" "${env_files[@]}" "$image" \
    "${reg_flag[@]}"
  printf '  On each %s host, a worker (its token: docker exec gpustack cat /var/lib/gpustack/token;\n' "$TARGET_DEVICE"
  printf '  run preflight.sh there first):\n'
  print_run_line "docker run -d --name gpustack-worker" \
    '-e "GPUSTACK_RUNTIME_DEPLOY_MIRRORED_NAME=gpustack-worker"' "--restart=unless-stopped" \
    "--privileged" "--network=host" "--volume /var/run/docker.sock:/var/run/docker.sock" \
    "--volume $VOLUME:/var/lib/gpustack" "${SITE_VOLUMES[@]}" "${device[@]}" "${env_files[@]}" "$image" \
    "--server-url http://SERVER_IP" "--token TOKEN" "--advertise-address HOST_IP" "${reg_flag[@]}"
  printf '  Then: docker logs -f gpustack; the admin password: docker exec -it gpustack cat /var/lib/gpustack/initial_admin_password\n'
}

install_docker() {
  PUSHED=()
  run_docker_preflight
  load_images
  check_loaded
  if ((HAS_REGISTRY)); then push_images; fi
  write_docker_env
  local name previous=""
  name=$BUNDLE_CELL-$(sha256sum SHA256SUMS | cut -c1-12)
  keep_bundle "$name"
  if [[ $GPUSTACK_VERSION == 2.* ]] && ((HAS_REGISTRY)); then write_registry_files; fi
  # An upgrade: the database in the data volume is copied first, and the run lines are kept
  # for --rollback.
  [[ -f $PREFIX/docker-current ]] && previous=$(<"$PREFIX/docker-current")
  if [[ -n $previous && $previous != "$name" ]]; then
    backup_volume_database "$previous"
    if [[ -f $PREFIX/run-line.txt ]]; then mv -f -- "$PREFIX/run-line.txt" "$PREFIX/run-line.previous.txt"; fi
    printf '%s\n' "$previous" >"$PREFIX/docker-previous"
  fi
  printf '%s\n' "$name" >"$PREFIX/docker-current" || die 6 "could not write $PREFIX/docker-current"
  if [[ $GPUSTACK_VERSION == 2.* ]]; then
    print_docker2_next_steps
  else
    print_docker_next_steps
  fi | tee "$PREFIX/run-line.txt"
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
  if [[ -n $previous && $previous != "releases/$REL_NAME" ]]; then
    backup_database "${previous#releases/}"
  fi
  atomic_symlink "releases/$REL_NAME" "$PREFIX/current" ||
    die 6 "could not point $PREFIX/current at releases/$REL_NAME; check permissions on $PREFIX"
  { mkdir -p -- "$PREFIX/bin" && atomic_symlink ../current/bin/gpustack "$PREFIX/bin/gpustack"; } ||
    die 6 "could not create the link $PREFIX/bin/gpustack; check permissions on $PREFIX/bin"

  say "current -> releases/$REL_NAME"
  if [[ -n $previous && $previous != "releases/$REL_NAME" ]]; then
    atomic_symlink "$previous" "$PREFIX/previous" || die 6 "could not record $PREFIX/previous"
    say "previous release kept: $previous (install.sh --rollback switches back)"
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
  local catalog=$CATALOG site
  CONFIG=$PREFIX/gpustack.yaml ENV_FILE=$PREFIX/gpustack.env
  if [[ -e $CONFIG ]]; then
    say "kept the existing $CONFIG"
  else
    site=$(site_catalog)
    if [[ -n $site ]]; then
      catalog=$(json_string "$site")
      say "model catalog: $site, written by install-model.sh"
    fi
    cat >"$CONFIG.tmp" <<EOF || die 6 "could not write $CONFIG; check permissions on $PREFIX"
# GPUStack configuration for an air-gapped site, written by install.sh ($BUNDLE_CELL).
# Each setting keeps the first start from reaching for the internet; delete one to turn
# upstream's behaviour back on. Start GPUStack with:
#   set -a; . $ENV_FILE; set +a; $PREFIX/bin/gpustack start --config-file $CONFIG

# --model-catalog-file: the catalog shipped in the installed wheel (or the site's, which
# install-model.sh --prefix sets here), instead of probing huggingface.co and modelscope.cn.
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
$LIBRARY_SWITCHES
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

  if ((ROLLBACK)); then
    rollback
    return
  fi
  if [[ -n $INVENTORY ]]; then
    write_inventory
    return
  fi
  check_signature
  peek_method
  # Step 2 before sourcing bundle.env: a damaged bundle.env must not be executed.
  verify_bundle
  load_bundle_env
  if [[ $INSTALL_METHOD == docker ]]; then
    install_docker
    return
  fi
  default_python

  run_preflight
  check_current_is_link

  REL_NAME=$BUNDLE_CELL-$(sha256sum SHA256SUMS | cut -c1-12)
  REL=$PREFIX/releases/$REL_NAME
  install_release
  keep_bundle "$REL_NAME"
  find_catalog
  switch_current
  write_site_config
  print_next_steps
}

main "$@"
