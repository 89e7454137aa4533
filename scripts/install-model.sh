#!/usr/bin/env bash
# install-model.sh: place a model bundle's files on an air-gapped GPUStack site and register the
# model in a GPUStack model catalog (`source: local_path`), for the server's --model-catalog-file.
#
# Order matters: every file of the bundle is checked against SHA256SUMS (and, with --verify-key,
# SHA256SUMS against its signature) before anything on the system changes. Each model file is
# then copied beside its final name, checked again where it landed, and renamed into place, so a
# file under its final name is always whole; a file already there with the right sum is kept.
# The catalog is written last (a temporary file beside it, renamed), so a model whose files are
# not all in place is never registered.
#
# The catalog file is this script's own: a header line names its format (GPUStack 0.x: a list of
# model sets with templates; 2.x: model_sets with specs, and draft_models), and each model's entry
# sits between two marker lines, replaced when that model is installed again; other models'
# entries are kept. A catalog written by hand is merged into the same way, where a Python with
# PyYAML reads it as a GPUStack catalog whose list of model sets is its last block (the entries
# are appended to it, indented as its own): its lines are kept as they were, a copy of it is
# kept beside it (FILE.orig) the first time, and the result must read back with every model set
# it had plus this one, else it is left as it was.
#
# With --prefix (the prefix install.sh installed GPUStack into), the server's configuration there
# is pointed at the catalog, each file rewritten whole through a temporary file renamed into
# place, every other line kept: a pip install's PREFIX/gpustack.yaml gets `model_catalog_file:`;
# a docker install's PREFIX/docker.env gets GPUSTACK_MODEL_CATALOG_FILE, and PREFIX/docker.volumes
# the folders the container must see (one HOST:CONTAINER:ro a line), which install.sh adds as
# --volume to every docker run line it prints. The catalog format then follows the GPUStack
# release installed there.
#
# Exit status: 0 placed and registered, 2 usage error, 3 damaged bundle, 5 placing the files,
# writing the catalog or configuring the prefix failed, 7 signature refused or not checkable.
set -euo pipefail

PROG=install-model.sh
DEFAULT_DEST=/var/lib/gpustack/models
HEADER_PREFIX='# GPUStack model catalog (gpustack-offline, format gpustack-'

usage() {
  cat <<EOF
Usage: $PROG [--dest DIR] [--catalog FILE] [--prefix DIR] [--gpustack 0|2] [--verify-key KEY] [--help]

Checks every file of this model bundle against SHA256SUMS, places the model's files under
DIR/<model name>/ and writes (or merges into) a GPUStack model catalog that names them with
source: local_path. Start the GPUStack server with --model-catalog-file FILE to offer the model.

  --dest DIR         where models go, each in a folder of its name (default: $DEFAULT_DEST);
                     give a shared mount every worker sees at the same path
  --catalog FILE     the catalog to write or merge into (default: DIR/model-catalog.yaml); one
                     written by hand is merged into where python3 with PyYAML reads it (its
                     model sets the last block), its copy kept as FILE.orig
  --prefix DIR       the prefix install.sh installed GPUStack into (such as /opt/gpustack):
                     point its configuration at the catalog (pip: model_catalog_file in
                     DIR/gpustack.yaml; docker: GPUSTACK_MODEL_CATALOG_FILE in DIR/docker.env
                     and the folders to mount in DIR/docker.volumes), every other line kept;
                     the catalog format follows the GPUStack release installed there
  --gpustack 0|2     the catalog format: GPUStack 0.x or 2.x (default: the existing catalog's,
                     else the release installed in --prefix, else the bundle's
                     CATALOG_DEFAULT: 0 for llama-box models, else 2)
  --verify-key KEY   before anything else, check SHA256SUMS.sig against KEY, the release's
                     public key file, with gpgv
  --help             show this help

Exit status: 0 placed and registered, 2 usage error, 3 damaged bundle, 5 placing, registering
or configuring the prefix failed, 7 signature refused or not checkable.
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

absolute() {
  case $1 in
    /*) printf '%s' "$1" ;;
    *) printf '%s/%s' "$PWD" "$1" ;;
  esac
}

parse_args() {
  DEST=$DEFAULT_DEST CATALOG="" SERIES="" VERIFY_KEY="" PREFIX=""
  while (($# > 0)); do
    case $1 in
      --dest) (($# >= 2)) || die 2 "--dest needs a directory; see --help"; DEST=$2; shift 2 ;;
      --dest=*) DEST=${1#*=}; shift ;;
      --catalog) (($# >= 2)) || die 2 "--catalog needs a file; see --help"; CATALOG=$2; shift 2 ;;
      --catalog=*) CATALOG=${1#*=}; shift ;;
      --prefix) (($# >= 2)) || die 2 "--prefix needs a directory; see --help"; PREFIX=$2; shift 2 ;;
      --prefix=*) PREFIX=${1#*=}; shift ;;
      --gpustack) (($# >= 2)) || die 2 "--gpustack needs 0 or 2; see --help"; SERIES=$2; shift 2 ;;
      --gpustack=*) SERIES=${1#*=}; shift ;;
      --verify-key) (($# >= 2)) || die 2 "--verify-key needs a public key file; see --help"; VERIFY_KEY=$(absolute "$2"); shift 2 ;;
      --verify-key=*) VERIFY_KEY=$(absolute "${1#*=}"); shift ;;
      -h | --help) usage; exit 0 ;;
      *) die 2 "unknown argument: $1; see --help" ;;
    esac
  done
  [[ -n $DEST ]] || die 2 "--dest must not be empty; see --help"
  DEST=$(absolute "$DEST")
  DEST=${DEST%/}
  [[ -n $DEST ]] || die 2 "--dest / is not allowed; pick a directory such as $DEFAULT_DEST"
  CATALOG=$(absolute "${CATALOG:-$DEST/model-catalog.yaml}")
  if [[ -n $PREFIX ]]; then
    PREFIX=$(absolute "$PREFIX")
    PREFIX=${PREFIX%/}
  fi
  case $SERIES in
    "" | 0 | 2) ;;
    0.* | 2.*) SERIES=${SERIES%%.*} ;;
    *) die 2 "--gpustack $SERIES: give 0 (GPUStack 0.x) or 2 (GPUStack 2.x)" ;;
  esac
  for path in "$DEST" "$CATALOG" "$PREFIX"; do
    [[ $path != *[[:cntrl:]]* ]] || die 2 "the path '$path' holds a control character; pick another"
  done
}

# ---------------------------------------------------------------------------------------------
# The bundle: signature, then every sum, before anything changes.

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
  say "verifying the bundle against SHA256SUMS"
  problems=$(PROG=$PROG bash ./check-sums.sh "$BUNDLE") \
    || die 3 "the bundle in $BUNDLE is damaged (${problems:-?} problem(s) listed above); nothing was placed. Re-copy the whole bundle from the source media and run $PROG again"
  say "bundle verified"
}

load_bundle_env() {
  [[ -f bundle.env ]] || die 3 "bundle.env not found in $BUNDLE; re-copy the whole bundle from the source media"
  BUNDLE_KIND="" MODEL_NAME="" MODEL_DIR="" MODEL_ENTRY="" MODEL_BACKEND="" MODEL_REPOSITORY=""
  MODEL_COMMIT="" CATALOG_DEFAULT=""
  # read by name in choose_series (CATALOG_GPUSTACK_$SERIES)
  # shellcheck disable=SC2034
  CATALOG_GPUSTACK_0="" CATALOG_GPUSTACK_2=""
  # shellcheck source=/dev/null
  . ./bundle.env
  [[ $BUNDLE_KIND == model ]] ||
    die 2 "this is not a model bundle (bundle.env has BUNDLE_KIND=${BUNDLE_KIND:-none}); a GPUStack bundle installs with install.sh"
  [[ $MODEL_NAME =~ ^[a-z0-9][a-z0-9._-]*$ && $MODEL_DIR == "models/$MODEL_NAME" ]] ||
    die 3 "bundle.env names the model '$MODEL_NAME' in '$MODEL_DIR'; re-copy the whole bundle from the source media"
  [[ -d $MODEL_DIR ]] || die 3 "$MODEL_DIR is not in $BUNDLE; re-copy the whole bundle from the source media"
  [[ -z $MODEL_ENTRY || -f $MODEL_DIR/$MODEL_ENTRY ]] ||
    die 3 "$MODEL_DIR/$MODEL_ENTRY named in bundle.env is not in $BUNDLE; re-copy the whole bundle from the source media"
  say "model $MODEL_NAME: $MODEL_REPOSITORY at commit $MODEL_COMMIT, for $MODEL_BACKEND"
}

# ---------------------------------------------------------------------------------------------
# The GPUStack install of --prefix: which configuration to point at the catalog, and which
# GPUStack line it runs. Checked before anything changes.

# The GPUStack version of the release installed in PREFIX: a pip install's `current` release,
# else the newest bundle a docker install kept (install.sh keeps each bundle.env under
# PREFIX/bundles/); empty when neither says.
installed_version() {
  local env="" kept
  if [[ -L $PREFIX/current ]]; then
    env=$PREFIX/bundles/$(basename -- "$(readlink -- "$PREFIX/current")")/bundle.env
  else
    for kept in "$PREFIX"/bundles/*/bundle.env; do
      if [[ -f $kept && (-z $env || $kept -nt $env) ]]; then env=$kept; fi
    done
  fi
  [[ -n $env && -f $env ]] || return 0
  sed -n 's/^GPUSTACK_VERSION=//p' "$env" | tail -n1 | tr -d "\"'"
}

check_prefix() {
  PIP_CONFIG="" DOCKER_ENV="" SERIES_WHY="--gpustack"
  [[ -n $PREFIX ]] || return 0
  [[ -f $PREFIX/gpustack.yaml ]] && PIP_CONFIG=$PREFIX/gpustack.yaml
  [[ -f $PREFIX/docker.env ]] && DOCKER_ENV=$PREFIX/docker.env
  [[ -n $PIP_CONFIG || -n $DOCKER_ENV ]] ||
    die 2 "--prefix $PREFIX: neither $PREFIX/gpustack.yaml (a pip install) nor $PREFIX/docker.env (a docker install) is there; install GPUStack there first with install.sh --prefix $PREFIX, or pass the prefix it used"
  local path version
  if [[ -n $DOCKER_ENV ]]; then
    for path in "$DEST" "$CATALOG"; do
      [[ $path != *[:,]* ]] ||
        die 2 "the path '$path' holds ':' or ',', which docker run --volume cannot mount; pick another --dest or --catalog"
    done
  fi
  version=$(installed_version)
  case $version in
    0.* | 2.*)
      if [[ -n $SERIES && $SERIES != "${version%%.*}" ]]; then
        die 2 "--gpustack $SERIES, but $PREFIX has GPUStack $version installed, which reads a ${version%%.*}.x catalog; omit --gpustack"
      fi
      SERIES=${version%%.*} SERIES_WHY="GPUStack $version is installed in $PREFIX"
      ;;
  esac
}

# ---------------------------------------------------------------------------------------------
# Placing the files.

sha256_of() {
  local out
  out=$(sha256sum <"$1") || return 1
  printf '%s' "${out%% *}"
}

# The model's lines of SHA256SUMS as "<sum> <path inside the model folder>", one per line.
model_files() {
  local line
  while IFS= read -r line; do
    [[ $line =~ ^([0-9a-fA-F]{64})\ [\ *](.+)$ ]] || continue
    case ${BASH_REMATCH[2]} in
      "$MODEL_DIR"/*) printf '%s %s\n' "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]#"$MODEL_DIR"/}" ;;
    esac
  done <SHA256SUMS
}

remove_part() {
  if [[ -n ${PART:-} ]]; then rm -f -- "$PART"; fi
  if [[ -n ${CATALOG_PART:-} ]]; then rm -f -- "$CATALOG_PART"; fi
  if [[ -n ${CONFIG_PART:-} ]]; then rm -f -- "$CONFIG_PART"; fi
}

place_files() {
  TARGET=$DEST/$MODEL_NAME
  local sum rel dst need=0 free why got count=0 kept=0 bytes=0
  if ! why=$(mkdir -p -- "$TARGET" 2>&1); then
    die 5 "cannot create $TARGET (${why##*: }); run as root (sudo) or pass --dest to a directory you can write"
  fi
  while read -r sum rel; do
    case /$rel/ in
      */../* | */./* | //*) die 3 "SHA256SUMS lists $MODEL_DIR/$rel, not a path inside the model; re-copy the whole bundle from the source media" ;;
    esac
    dst=$TARGET/$rel
    if [[ ! -f $dst ]] || [[ $(sha256_of "$dst") != "$sum" ]]; then
      need=$((need + $(stat -c %s -- "$MODEL_DIR/$rel")))
    fi
  done < <(model_files)
  free=$(df -Pk -- "$TARGET" | awk 'NR == 2 { print $4 }')
  if [[ $free =~ ^[0-9]+$ ]] && ((need / 1024 + 1 > free)); then
    die 5 "placing $MODEL_NAME needs $((need / 1000000 + 1)) MB in $TARGET and $((free * 1024 / 1000000)) MB is free there; free space or pass --dest to a larger disk (nothing was placed)"
  fi

  trap remove_part EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  while read -r sum rel; do
    dst=$TARGET/$rel
    count=$((count + 1))
    bytes=$((bytes + $(stat -c %s -- "$MODEL_DIR/$rel")))
    if [[ -f $dst ]] && [[ $(sha256_of "$dst") == "$sum" ]]; then
      kept=$((kept + 1))
      continue
    fi
    mkdir -p -- "$(dirname -- "$dst")" || die 5 "cannot create the folder of $dst"
    PART=$(dirname -- "$dst")/.$(basename -- "$dst").$$.part
    if ! why=$(cp -- "$MODEL_DIR/$rel" "$PART" 2>&1); then
      die 5 "copying $MODEL_DIR/$rel to $PART failed (${why##*: }); nothing was registered"
    fi
    got=$(sha256_of "$PART") || die 5 "cannot read back $PART; nothing was registered"
    [[ $got == "$sum" ]] ||
      die 5 "the copy of $MODEL_DIR/$rel at $PART has sha256 $got, not $sum (the disk under $TARGET?); it was removed and nothing was registered"
    chmod 0644 -- "$PART"
    mv -f -- "$PART" "$dst" || die 5 "cannot rename $PART to $dst; nothing was registered"
    PART=""
  done < <(model_files)
  ((count > 0)) || die 3 "SHA256SUMS lists no file under $MODEL_DIR; re-copy the whole bundle from the source media"
  say "placed $MODEL_NAME in $TARGET: $count files, $((bytes / 1000000)) MB ($kept already there)"
}

# ---------------------------------------------------------------------------------------------
# The catalog.

# catalog_series FILE: the format a catalog this script wrote declares (0 or 2); empty if the
# file is someone else's.
catalog_series() {
  local first
  IFS= read -r first <"$1" || true
  case $first in
    "$HEADER_PREFIX"0.x*) printf 0 ;;
    "$HEADER_PREFIX"2.x*) printf 2 ;;
  esac
}

# A Python with PyYAML (a pip install of GPUStack has one), on PATH; fails if there is none.
yaml_python() {
  local py
  for py in python3 python; do
    if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import yaml' 2>/dev/null; then
      printf '%s' "$py"
      return 0
    fi
  done
  return 1
}

# foreign_catalog PYTHON FILE: for a catalog written by hand, "SERIES INDENT": its format (0: a
# list of model sets; 2: a mapping whose last key is model_sets) and the indent of its model
# sets' "-" lines, so entries appended at the end join that list; fails if it is not such a
# catalog. PYTHON is one with PyYAML (yaml_python).
foreign_catalog() {
  "$1" - "$2" <<'PY'
import re
import sys

import yaml

with open(sys.argv[1]) as fh:
    text = fh.read()
try:
    data = yaml.safe_load(text)
except yaml.YAMLError:
    sys.exit(1)
lines = text.splitlines()
if isinstance(data, list) and all(isinstance(s, dict) and s.get("name") for s in data):
    series, start = "0", 0
elif isinstance(data, dict) and isinstance(data.get("model_sets"), list):
    keys = [i for i, line in enumerate(lines) if re.match(r"[^\s#-]", line)]
    if not keys or not re.match(r"model_sets:\s*(#.*)?$", lines[keys[-1]]):
        sys.exit(1)  # model_sets is not the last block, or not a block list
    series, start = "2", keys[-1] + 1
else:
    sys.exit(1)
items = [line for line in lines[start:] if line.strip() and not line.lstrip().startswith("#")]
if items and not items[0].lstrip().startswith("- "):
    sys.exit(1)
print(series, len(items[0]) - len(items[0].lstrip()) if items else 0)
PY
}

choose_series() {
  local found="" foreign py
  CATALOG_INDENT=0 FOREIGN=0
  if [[ -e $CATALOG ]]; then
    [[ -f $CATALOG ]] || die 5 "$CATALOG is not a file; pass --catalog FILE"
    found=$(catalog_series "$CATALOG")
    if [[ -z $found ]]; then
      py=$(yaml_python) ||
        die 5 "$CATALOG was not written by $PROG, and merging into it needs python3 with PyYAML (pip install pyyaml), which is not here: install it, or pass --catalog to a new file, or move $CATALOG aside"
      foreign=$(foreign_catalog "$py" "$CATALOG") ||
        die 5 "$CATALOG was not written by $PROG and does not read as a GPUStack catalog whose model sets are its last block (a list; for 2.x model_sets: as the last key), so it is not edited: pass --catalog to a new file and merge its entries into yours by hand, or move $CATALOG aside"
      read -r found CATALOG_INDENT <<<"$foreign"
      FOREIGN=1
    fi
    if [[ -n $SERIES && $SERIES != "$found" ]]; then
      die 2 "$CATALOG is a GPUStack $found.x catalog; GPUStack $SERIES.x ($SERIES_WHY) would mix formats. Pass --catalog to another file for GPUStack $SERIES.x"
    fi
    SERIES=$found
  fi
  SERIES=${SERIES:-$CATALOG_DEFAULT}
  local var=CATALOG_GPUSTACK_$SERIES
  FRAGMENT=${!var:-}
  if [[ -z $FRAGMENT ]]; then
    die 2 "GPUStack $SERIES.x has no $MODEL_BACKEND backend, so this model cannot be in its catalog (llama-box is GPUStack 0.x only; SGLang 2.x only); pass --gpustack with the other line, or --catalog to a catalog of it"
  fi
  [[ -f $FRAGMENT ]] || die 3 "$FRAGMENT named in bundle.env is not in $BUNDLE; re-copy the whole bundle from the source media"
}

# The entry, with the placed path (LOCAL_PATH) as a YAML double-quoted string, each line
# indented by CATALOG_INDENT (a hand-written catalog's own indent of its model sets).
catalog_entry() {
  local escaped fragment pad
  escaped=${LOCAL_PATH//\\/\\\\}
  escaped=${escaped//\"/\\\"}
  fragment=$(<"$FRAGMENT")
  shopt -u patsub_replacement 2>/dev/null || true
  printf -v pad '%*s' "$CATALOG_INDENT" ''
  printf '%s\n' "${fragment//@LOCAL_PATH@/"$escaped"}" | sed "s/^./$pad&/"
}

write_catalog() {
  local dir begin="# >>> model $MODEL_NAME" end="# <<< model $MODEL_NAME" entry models
  dir=$(dirname -- "$CATALOG")
  mkdir -p -- "$dir" || die 5 "cannot create $dir for the catalog; pass --catalog FILE"
  LOCAL_PATH=$TARGET
  [[ -z $MODEL_ENTRY ]] || LOCAL_PATH=$TARGET/$MODEL_ENTRY
  entry=$(catalog_entry)
  CATALOG_PART=$(mktemp "$dir/.$(basename -- "$CATALOG").XXXXXXXX") ||
    die 5 "cannot write in $dir; pass --catalog to a file you can write"
  {
    if [[ -f $CATALOG ]]; then
      # every line but this model's old entry (between its markers, compared as text)
      awk -v begin="$begin" -v end="$end" '
        $0 == begin { skip = 1; next }
        skip && $0 == end { skip = 0; next }
        !skip { print }' "$CATALOG"
    else
      printf '%s%s.x): written by %s.\n' "$HEADER_PREFIX" "$SERIES" "$PROG"
      printf '# Each model sits between its marker lines, replaced when its bundle is installed again.\n'
      printf '# Pass this file to the GPUStack server with --model-catalog-file (or model_catalog_file\n'
      printf '# in its config file).\n'
      if [[ $SERIES == 2 ]]; then
        printf '# Keep model_sets the last key: entries are added at the end.\n'
        printf 'draft_models: []\nmodel_sets:\n'
      fi
    fi
    printf '%s\n%s\n%s\n' "$begin" "$entry" "$end"
  } >"$CATALOG_PART" || die 5 "cannot write $CATALOG_PART"
  check_catalog "$CATALOG_PART" "$CATALOG"
  if ((FOREIGN)) && [[ ! -e $CATALOG.orig ]]; then
    if ! { cp -p -- "$CATALOG" "$CATALOG.orig.part" && mv -f -- "$CATALOG.orig.part" "$CATALOG.orig"; }; then
      rm -f -- "$CATALOG.orig.part"
      die 5 "cannot keep a copy of $CATALOG as $CATALOG.orig; check permissions in $dir"
    fi
    say "kept the hand-written catalog as it was: $CATALOG.orig"
  fi
  chmod 0644 -- "$CATALOG_PART"
  mv -f -- "$CATALOG_PART" "$CATALOG" || die 5 "cannot rename $CATALOG_PART to $CATALOG"
  CATALOG_PART=""
  models=$(grep -c '^# >>> model ' "$CATALOG" || true)
  say "catalog $CATALOG (GPUStack $SERIES.x, $models model(s)): $MODEL_NAME -> $LOCAL_PATH"
}

# check_catalog NEW OLD: where a Python with PyYAML is at hand (a pip install of GPUStack has
# one), read the new catalog back as GPUStack will, before it replaces the old one: a list of
# model sets, those of the old one (if any) with this model's once, in their order.
check_catalog() {
  local py
  py=$(yaml_python) || return 0
  "$py" - "$1" "$2" "$SERIES" "$MODEL_NAME" <<'PY' || die 5 "the catalog written for $MODEL_NAME does not read back as a GPUStack $SERIES.x catalog with every model set it had plus $MODEL_NAME (above); $CATALOG was left as it was"
import os
import sys

import yaml


def names(path):
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        data = yaml.safe_load(fh)
    sets = data if sys.argv[3] == "0" else (data or {}).get("model_sets")
    if not isinstance(sets, list) or not all(isinstance(s, dict) and s.get("name") for s in sets):
        sys.exit(f"{path}: not a list of model sets, each with a name")
    return [s["name"] for s in sets]


new, model = names(sys.argv[1]), sys.argv[4]
kept = [n for n in names(sys.argv[2]) if n != model]
if [n for n in new if n != model] != kept or new.count(model) != 1:
    sys.exit(f"model sets read back: {new}; wanted {kept} and {model} once")
PY
}

# ---------------------------------------------------------------------------------------------
# The configuration of --prefix.

# A YAML double-quoted scalar (as catalog_entry writes the path).
yaml_string() {
  local v=${1//\\/\\\\}
  v=${v//\"/\\\"}
  printf '"%s"' "$v"
}

# set_setting FILE PATTERN LINE: FILE with its first line matching the extended regular
# expression PATTERN replaced by LINE (any later match dropped; LINE appended when none
# matches), written beside FILE with FILE's mode and renamed over it. OLD_LINE: the line
# replaced (empty: none).
set_setting() {
  local file=$1 pattern=$2 line=$3
  OLD_LINE=$(grep -E -m1 -- "$pattern" "$file" || true)
  [[ $OLD_LINE != "$line" ]] || return 0
  CONFIG_PART=$(mktemp "$(dirname -- "$file")/.$(basename -- "$file").XXXXXXXX") ||
    die 5 "cannot write beside $file; the catalog is registered, but $file does not name it yet: set it by hand"
  PATTERN=$pattern LINE=$line awk '
    $0 ~ ENVIRON["PATTERN"] { if (!done) print ENVIRON["LINE"]; done = 1; next }
    { print }
    END { if (!done) print ENVIRON["LINE"] }' "$file" >"$CONFIG_PART" ||
    die 5 "cannot write $CONFIG_PART; $file was left as it was"
  chmod --reference="$file" -- "$CONFIG_PART" 2>/dev/null || chmod 0644 -- "$CONFIG_PART"
  chown --reference="$file" -- "$CONFIG_PART" 2>/dev/null || true
  mv -f -- "$CONFIG_PART" "$file" || die 5 "cannot rename $CONFIG_PART to $file; $file was left as it was"
  CONFIG_PART=""
}

# add_volume SPEC: SPEC (HOST:CONTAINER:ro) in PREFIX/docker.volumes, once.
add_volume() {
  local file=$PREFIX/docker.volumes
  if [[ -f $file ]] && grep -qxF -- "$1" "$file"; then return 0; fi
  CONFIG_PART=$(mktemp "$PREFIX/.docker.volumes.XXXXXXXX") || die 5 "cannot write in $PREFIX"
  {
    if [[ -f $file ]]; then
      cat -- "$file"
    else
      printf '# Folders the GPUStack containers must see, one HOST:CONTAINER[:ro] a line, written by\n'
      printf '# %s; install.sh adds each as --volume to the docker run lines it prints.\n' "$PROG"
    fi
    printf '%s\n' "$1"
  } >"$CONFIG_PART" || die 5 "cannot write $CONFIG_PART"
  chmod 0644 -- "$CONFIG_PART"
  mv -f -- "$CONFIG_PART" "$file" || die 5 "cannot rename $CONFIG_PART to $file"
  CONFIG_PART=""
}

# say_setting FILE LINE: what set_setting did.
say_setting() {
  if [[ $OLD_LINE == "$2" ]]; then
    say "$1 already has $2"
  else
    say "$1: ${OLD_LINE:-(none)} -> $2 (every other line kept)"
  fi
}

configure_prefix() {
  local line dir
  VOLUMES=()
  if [[ -n $PIP_CONFIG ]]; then
    line="model_catalog_file: $(yaml_string "$CATALOG")"
    set_setting "$PIP_CONFIG" '^model_catalog_file:' "$line"
    say_setting "$PIP_CONFIG" "$line"
  fi
  if [[ -n $DOCKER_ENV ]]; then
    line="GPUSTACK_MODEL_CATALOG_FILE=$CATALOG"
    set_setting "$DOCKER_ENV" '^#? *GPUSTACK_MODEL_CATALOG_FILE=' "$line"
    say_setting "$DOCKER_ENV" "$line"
    VOLUMES=("$DEST:$DEST:ro")
    dir=$(dirname -- "$CATALOG")
    [[ $dir == "$DEST" || $dir == "$DEST"/* ]] || VOLUMES+=("$dir:$dir:ro")
    for line in "${VOLUMES[@]}"; do add_volume "$line"; done
    say "$PREFIX/docker.volumes has ${VOLUMES[*]}"
  fi
}

next_steps() {
  local volume
  if [[ -n $PREFIX ]]; then
    printf '%s: GPUStack reads its model catalog when it starts: restart it to offer %s.\n' "$PROG" "$MODEL_NAME"
    if [[ -n $PIP_CONFIG ]]; then
      printf '  pip:     set -a; . %s/gpustack.env; set +a; %s/bin/gpustack start --config-file %s\n' "$PREFIX" "$PREFIX" "$PIP_CONFIG"
    fi
    if [[ -n $DOCKER_ENV ]]; then
      printf '  docker:  recreate the server container (GPUStack 2.x: and each worker) with --env-file %s\n          ' "$DOCKER_ENV"
      for volume in "${VOLUMES[@]}"; do printf ' --volume %s' "$volume"; done
      printf '\n           (bash install.sh --prefix %s prints its run lines with them)\n' "$PREFIX"
    fi
  else
    cat <<EOF
$PROG: to offer it, start the GPUStack server with this catalog, or run $PROG again with
--prefix (the prefix install.sh used) to point that install's configuration at it:
  pip:     gpustack start --model-catalog-file $CATALOG   (or model_catalog_file: $CATALOG in the config file)
  docker:  docker run ... --volume $DEST:$DEST:ro ... IMAGE --model-catalog-file $CATALOG
EOF
  fi
  cat <<EOF
Every worker that serves the model must see $TARGET at that same path (a shared mount, or $PROG
run on each worker host with the same --dest).
EOF
}

main() {
  parse_args "$@"
  BUNDLE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
  cd -- "$BUNDLE"
  check_signature
  verify_bundle
  load_bundle_env
  check_prefix
  choose_series
  place_files
  write_catalog
  configure_prefix
  next_steps
}

main "$@"
