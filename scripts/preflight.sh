#!/usr/bin/env bash
# preflight.sh: check an air-gapped Linux host against GPUStack's prerequisites for this bundle.
#
# The checks are the ones upstream's installation docs ask for, narrowed to the cell described by
# bundle.env next to this script. Pip bundles (INSTALL_METHOD=pip): CPU flags, Python 3.10-3.12,
# glibc >= 2.29 for pip workers, NVIDIA driver CUDA version, nvcc, cuDNN for audio. Docker bundles
# (INSTALL_METHOD=docker): CPU flags, a Docker daemon that answers and is new enough, room under
# Docker's root dir for the image archive, and for CUDA the driver, Docker's NVIDIA runtime and
# the cgroupfs cgroup driver.
#
# GPUStack 2.x bundles name their device's backend in bundle.env (DEVICE_*, from the build
# matrix's [backends] tables and upstream's runner data): the vendor's device tool must answer; the
# host's version of the backend (read as upstream's detector reads it) must be at least the
# bundle's floor and below its ceiling, the version from which on the worker asks for runners this
# bundle does not carry; the vendor's container runtime, device nodes and driver folders must be
# there. Nothing on the system is changed.
#
# GPUStack 0.x bundles of an Ascend, AMD, Moore Threads or Hygon device name it the same way, and
# the llama-box build their tools archive carries (DEVICE_BUILD, e.g. cann-8.2.rc1-310p): the
# device tool must answer; for pip bundles the host's toolkit, which that build loads, must be at
# least the build's (an image carries its own); an Ascend host's chips must be the build's; for
# docker bundles the device nodes and host paths upstream's docker line passes in (--device, -v)
# must exist, and the vendor's runtime, where that line relies on one, must be Docker's default.
#
# PREFLIGHT_HOST_ROOT=DIR looks for device nodes, driver folders and version files under DIR (the
# host's / mounted into a container; the tests use it too).
#
# Exit status: 0 no check failed (warnings allowed), 1 a check failed, 2 usage error.
set -uo pipefail

PROG=preflight.sh
BUNDLE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)

# Upstream floors that hold whatever the bundle says.
UPSTREAM_GLIBC_FLOOR=2.29
UPSTREAM_PYTHON_MIN=3.10
UPSTREAM_PYTHON_MAX=3.12
# `docker run --pull never` (what install.sh prints) needs 20.10; the image archive's format was
# checked against `docker load` of 20.10.
DOCKER_FLOOR=20.10

usage() {
  cat <<EOF
Usage: $PROG [--python PATH] [--prefix DIR] [--json] [--help]

Checks this host against the prerequisites of the GPUStack bundle in $BUNDLE_DIR.

  --python PATH   Python interpreter to check (default: python<TARGET_PYTHON>, else python3);
                  pip bundles only, ignored for docker bundles
  --prefix DIR    install prefix whose file system needs the free space (default: /opt/gpustack);
                  pip bundles only (a docker bundle needs the space under Docker's root dir)
  --json          print one JSON object instead of the report
  --help          show this help

Exit status: 0 when no check failed (warnings allowed), 1 when a check failed, 2 on usage error.
EOF
}

usage_error() {
  printf '%s: error: %s\n' "$PROG" "$1" >&2
  printf "Run '%s --help' for usage.\n" "$PROG" >&2
  exit 2
}

# version_ge A B: true when version A >= version B, comparing dot-separated numbers one
# component at a time (so 12.10 > 12.8; a missing component counts as 0). Returns 2 when
# either side is not a dotted number, which callers treat as "cannot tell".
version_ge() {
  local re='^[0-9]+(\.[0-9]+)*$'
  [[ $1 =~ $re && $2 =~ $re ]] || return 2
  local -a a b
  IFS=. read -ra a <<<"$1"
  IFS=. read -ra b <<<"$2"
  local i n=${#a[@]}
  ((${#b[@]} > n)) && n=${#b[@]}
  for ((i = 0; i < n; i++)); do
    # 10# forces base ten, so a component like 08 is not read as octal.
    local x=$((10#${a[i]:-0})) y=$((10#${b[i]:-0}))
    ((x > y)) && return 0
    ((x < y)) && return 1
  done
  return 0
}

# The newer of two versions (used to combine the bundle's floor with upstream's).
version_max() {
  if version_ge "$1" "$2"; then printf '%s' "$1"; else printf '%s' "$2"; fi
}

# ---------------------------------------------------------------------------------------------
# Results: parallel arrays, one entry per check.
C_NAME=() C_STATUS=() C_DETAIL=() C_FIX=()

# add_check NAME STATUS DETAIL [FIX]   (STATUS is ok|warn|fail|skip)
add_check() {
  C_NAME+=("$1")
  C_STATUS+=("$2")
  C_DETAIL+=("$3")
  C_FIX+=("${4:-}")
}

# ---------------------------------------------------------------------------------------------
# Checks. Each adds one or more results and never exits.

check_os() {
  local kernel
  kernel=$(uname -s)
  if [[ $TARGET_OS != linux ]]; then
    add_check os fail "this bundle is for $TARGET_OS, not Linux" \
      "use a bundle built for linux, or run install.ps1 on a $TARGET_OS host"
  elif [[ $kernel != Linux ]]; then
    add_check os fail "host kernel is $kernel; this bundle is for Linux" "run it on a Linux host"
  else
    add_check os ok "Linux"
  fi
}

# Host architecture in the bundle's naming (amd64|arm64), or the raw uname value.
host_arch() {
  local m
  m=$(uname -m)
  case $m in
    x86_64 | amd64) echo amd64 ;;
    aarch64 | arm64) echo arm64 ;;
    *) echo "$m" ;;
  esac
}

check_arch() {
  HOST_ARCH=$(host_arch)
  if [[ $HOST_ARCH == "$TARGET_ARCH" ]]; then
    add_check arch ok "$HOST_ARCH ($(uname -m))"
  else
    add_check arch fail "host is $HOST_ARCH ($(uname -m)); this bundle is for $TARGET_ARCH" \
      "use the $HOST_ARCH bundle of the same cell, or install on a $TARGET_ARCH host"
  fi
}

# The first "<key> : ..." line of /proc/cpuinfo, padded with spaces so " flag " matches whole words.
cpuinfo_words() {
  local line
  line=$(grep -m1 -i "^$1[[:space:]]*:" /proc/cpuinfo 2>/dev/null) || return 1
  printf ' %s ' "${line#*:}" | tr '[:upper:]' '[:lower:]' | tr -s '[:space:]' ' '
}

check_cpu() {
  local words
  if [[ $HOST_ARCH != "$TARGET_ARCH" ]]; then
    add_check cpu skip "architecture does not match (see arch)"
    return
  fi
  case $TARGET_ARCH in
    amd64)
      # No flags line is not proof of a missing flag (restricted /proc, an emulated CPU): warn.
      if ! words=$(cpuinfo_words flags); then
        add_check cpu warn "cannot read CPU flags from /proc/cpuinfo" \
          "check by hand that the CPU has AVX (upstream requires it): grep -w avx /proc/cpuinfo"
      elif [[ $words != *" avx "* ]]; then
        add_check cpu fail "CPU lacks the avx instruction set" \
          "GPUStack needs an x86_64 CPU with AVX; use another host (in a VM, pass the host CPU model through)"
      elif [[ $words != *" avx2 "* ]]; then
        add_check cpu warn "avx present, avx2 missing" \
          "CPU inference is slow without AVX2; use a host with AVX2 or pass the host CPU model through to the VM"
      else
        add_check cpu ok "avx, avx2"
      fi
      ;;
    arm64)
      # Upstream: grep -Ei "neon|asimd" /proc/cpuinfo. The kernel names NEON "asimd" on arm64.
      # qemu-user shows the host's x86 cpuinfo, with no Features line: warn, don't fail.
      if ! words=$(cpuinfo_words features); then
        add_check cpu warn "cannot read CPU features from /proc/cpuinfo (emulated CPU?)" \
          "check by hand that the CPU has NEON/ASIMD (upstream requires it): grep -Ei 'neon|asimd' /proc/cpuinfo"
      elif [[ $words == *" asimd "* || $words == *" neon "* ]]; then
        add_check cpu ok "asimd (NEON)"
      else
        add_check cpu fail "CPU lacks NEON/ASIMD" "GPUStack needs an arm64 CPU with NEON (asimd); use another host"
      fi
      ;;
    *)
      add_check cpu skip "no CPU flag rule for $TARGET_ARCH"
      ;;
  esac
}

# Distribution-neutral hint for installing Python X.Y with venv support.
python_install_hint() {
  printf 'install Python %s with venv support from your OS media or mirror (Debian/Ubuntu: apt install python%s python%s-venv; RHEL: dnf install python%s) and pass --python /usr/bin/python%s' \
    "$1" "$1" "$1" "$1" "$1"
}

check_python() {
  local path version xy
  if ! path=$(command -v -- "$PY" 2>/dev/null); then
    add_check python fail "Python interpreter '$PY' not found" "$(python_install_hint "$TARGET_PYTHON")"
    add_check python-venv skip "no Python to check"
    return
  fi
  if ! version=$("$path" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null); then
    add_check python fail "$path does not run" "$(python_install_hint "$TARGET_PYTHON")"
    add_check python-venv skip "no Python to check"
    return
  fi
  xy=${version%.*}
  if [[ $xy != "$TARGET_PYTHON" ]]; then
    add_check python fail "found Python $version at $path; this bundle's wheels are for Python $TARGET_PYTHON" \
      "$(python_install_hint "$TARGET_PYTHON"), or use the py$xy bundle of the same cell"
  elif ! version_ge "$xy" "$UPSTREAM_PYTHON_MIN" || ! version_ge "$UPSTREAM_PYTHON_MAX" "$xy"; then
    add_check python fail "this bundle is for Python $xy; GPUStack supports $UPSTREAM_PYTHON_MIN to $UPSTREAM_PYTHON_MAX" \
      "use a bundle built for Python $UPSTREAM_PYTHON_MIN to $UPSTREAM_PYTHON_MAX"
  else
    add_check python ok "$version at $path"
  fi
  # install.sh creates a venv; Debian/Ubuntu ship ensurepip separately (pythonX.Y-venv).
  if "$path" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    add_check python-venv ok "venv and ensurepip available"
  else
    add_check python-venv fail "$path cannot create virtual environments (venv or ensurepip missing)" \
      "install python$xy-venv (Debian/Ubuntu: apt install python$xy-venv; RHEL: dnf install python$xy)"
  fi
}

# Installed glibc version (e.g. 2.36), or nothing when it cannot be found (musl, no getconf/ldd).
glibc_version() {
  local v
  v=$(getconf GNU_LIBC_VERSION 2>/dev/null) && v=${v##* } && [[ -n $v ]] && { echo "$v"; return 0; }
  # ldd --version, first line: "ldd (Debian GLIBC 2.36-9+deb12u4) 2.36"; the last field is the version.
  v=$(ldd --version 2>/dev/null | head -n1) && v=${v##* } && [[ $v =~ ^[0-9]+(\.[0-9]+)+$ ]] && { echo "$v"; return 0; }
  return 1
}

check_glibc() {
  local have need
  need=$(version_max "${GLIBC_FLOOR:-$UPSTREAM_GLIBC_FLOOR}" "$UPSTREAM_GLIBC_FLOOR")
  if ! have=$(glibc_version); then
    add_check glibc fail "cannot find the glibc version (getconf GNU_LIBC_VERSION and ldd --version gave nothing)" \
      "use a glibc-based distribution (glibc >= $need; musl-based systems such as Alpine are not supported)"
  elif version_ge "$have" "$need"; then
    add_check glibc ok "$have (need >= $need)"
  else
    add_check glibc fail "glibc $have is older than $need, the newest any wheel in this bundle needs" \
      "upgrade the OS to one with glibc >= $need (for example Ubuntu 22.04, Debian 12 or RHEL 10)"
  fi
}

# One line per GPU from nvidia-smi's CSV, joined with "; ".
gpu_summary() {
  awk -F', *' 'NF >= 6 { printf "%s%s %s (%s total, %s used, util %s, %s C)", sep, $1, $2, $3, $4, $5, $6; sep = "; " }'
}

# nvidia-smi and the driver's CUDA version: both install methods need them.
check_nvidia_driver() {
  local floor=$CUDA_FLOOR csv gpus smi driver_cuda
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    add_check nvidia-smi fail "nvidia-smi not found; this is a $TARGET_DEVICE bundle" \
      "install the NVIDIA driver (it provides nvidia-smi) with CUDA >= $floor support, or use the cpu bundle"
    add_check cuda-driver skip "no nvidia-smi"
  else
    if ! csv=$(nvidia-smi --format=csv,noheader \
      --query-gpu=index,name,memory.total,memory.used,utilization.gpu,temperature.gpu 2>&1); then
      add_check nvidia-smi fail "nvidia-smi cannot query the GPUs: $(head -n1 <<<"$csv")" \
        "make sure the NVIDIA driver is loaded and matches its user-space tools (reboot after a driver upgrade)"
    elif gpus=$(gpu_summary <<<"$csv") && [[ -n $gpus ]]; then
      add_check nvidia-smi ok "$(grep -c . <<<"$csv") GPU(s): $gpus"
    else
      add_check nvidia-smi fail "nvidia-smi lists no GPU" "check that the GPU is visible to this host (lspci, VM passthrough)"
    fi
    # "| NVIDIA-SMI 550.54.15   Driver Version: 550.54.15   CUDA Version: 12.4 |"
    smi=$(nvidia-smi 2>/dev/null)
    driver_cuda=$(sed -n 's/.*CUDA Version: *\([0-9][0-9.]*\).*/\1/p' <<<"$smi" | head -n1)
    if [[ -z $driver_cuda ]]; then
      add_check cuda-driver fail "cannot read 'CUDA Version' from nvidia-smi" \
        "make sure the NVIDIA driver is loaded (run nvidia-smi), then run preflight again"
    elif version_ge "$driver_cuda" "$floor" && [[ -n ${DEVICE_CEILING:-} ]] &&
      version_ge "$driver_cuda" "$DEVICE_CEILING"; then
      add_check cuda-driver fail "nvidia-smi: the driver supports CUDA $driver_cuda; the worker asks for the newest cuda runner not above it, cuda$DEVICE_CEILING or newer, which this bundle ($TARGET_DEVICE: CUDA $floor or newer, below $DEVICE_CEILING) does not carry" \
        "use the bundle built for the newest cuda device not above CUDA $driver_cuda (same version, arch and services), or a driver below CUDA $DEVICE_CEILING"
    elif version_ge "$driver_cuda" "$floor"; then
      add_check cuda-driver ok "driver supports CUDA $driver_cuda (need >= $floor${DEVICE_CEILING:+, < $DEVICE_CEILING})"
    else
      local fix="upgrade the NVIDIA driver to one that supports CUDA $floor or newer"
      [[ ${GPUSTACK_VERSION:-0} == 0.* ]] && version_ge "$floor" 12.5 && fix+=", or use the cuda12.4 bundle of the same cell"
      add_check cuda-driver fail "nvidia-smi: the driver supports CUDA $driver_cuda, older than $floor, this bundle's floor" "$fix"
    fi
  fi
}

# The pip path's CUDA checks: the driver, then the toolkit and cuDNN upstream lists for pip.
check_nvidia() {
  local floor=$CUDA_FLOOR nvcc nvcc_rel
  check_nvidia_driver

  # Upstream lists nvcc for the pip path, but the wheels carry their own CUDA runtime: warn only.
  nvcc=$(command -v nvcc 2>/dev/null || { [[ -x /usr/local/cuda/bin/nvcc ]] && echo /usr/local/cuda/bin/nvcc; })
  if [[ -z $nvcc ]]; then
    add_check nvcc warn "nvcc not found (CUDA toolkit)" \
      "optional for this bundle; install CUDA toolkit >= $floor if models need to compile CUDA code"
  else
    nvcc_rel=$("$nvcc" -V 2>/dev/null | sed -n 's/.*release \([0-9][0-9.]*\),.*/\1/p' | head -n1)
    if [[ -n $nvcc_rel ]] && version_ge "$nvcc_rel" "$floor"; then
      add_check nvcc ok "CUDA toolkit $nvcc_rel at $nvcc"
    else
      add_check nvcc warn "CUDA toolkit ${nvcc_rel:-of unknown version} at $nvcc is older than $floor" \
        "optional for this bundle; install CUDA toolkit >= $floor if models need to compile CUDA code"
    fi
  fi

  check_cudnn
}

check_cudnn() {
  local ldconfig found=""
  ldconfig=$(command -v ldconfig 2>/dev/null || echo /sbin/ldconfig)
  found=$("$ldconfig" -p 2>/dev/null | grep -m1 -o 'libcudnn[^ ]*') || found=""
  case $TARGET_EXTRAS in
    audio | all)
      if [[ -n $found ]]; then
        add_check cudnn ok "$found"
      else
        add_check cudnn warn "cuDNN not found (ldconfig -p | grep libcudnn); audio models need cuDNN 9" \
          "install cuDNN 9 for CUDA 12 from your mirror (e.g. apt install libcudnn9-cuda-12), then run ldconfig"
      fi
      ;;
    *)
      add_check cudnn skip "not needed for $TARGET_EXTRAS extras${found:+ (found $found)}"
      ;;
  esac
}

# Nearest existing directory at or above $1 (the prefix may not exist yet).
existing_parent() {
  local d=$1
  while [[ ! -e $d ]]; do d=$(dirname -- "$d"); done
  printf '%s' "$d"
}

# One disk check: free space at DIR (the nearest existing folder) against NEED_KB, for WHAT;
# FIX says how to make room.
check_free() {
  local dir=$1 need_kb=$2 what=$3 fix=$4 need_mb free_kb
  need_mb=$(((need_kb + 1023) / 1024))
  # -P keeps each file system on one line; the 4th column is the space available to non-root too.
  free_kb=$(df -Pk -- "$dir" 2>/dev/null | awk 'END { print $4 }')
  if [[ ! $free_kb =~ ^[0-9]+$ ]]; then
    add_check disk warn "cannot read free space of ${dir:-(unknown)}" "make sure $need_mb MiB are free there for $what"
  elif ((free_kb >= need_kb)); then
    add_check disk ok "$((free_kb / 1024)) MiB free at $dir (need $need_mb MiB for $what)"
  else
    add_check disk fail "$((free_kb / 1024)) MiB free at $dir; $what needs $need_mb MiB" "$fix"
  fi
}

check_disk() {
  local wheels_kb need_kb
  if [[ ! -d $BUNDLE_DIR/wheels ]]; then
    add_check disk fail "wheels/ is missing from the bundle" "re-copy the whole bundle from the source media"
    return
  fi
  wheels_kb=$(du -sk -- "$BUNDLE_DIR/wheels" | awk '{ print $1 }')
  need_kb=$((wheels_kb * 2))
  check_free "$(existing_parent "$PREFIX")" "$need_kb" "$PREFIX" \
    "free space there or pass --prefix on a file system with $(((need_kb + 1023) / 1024)) MiB free"
}

# What to tell a user who cannot write somewhere: root is not helped by sudo.
write_fix() {
  if [[ $(id -u) == 0 ]]; then
    printf '%s' "its file system is read-only or refuses writes even to root; pass --prefix on a writable file system"
  else
    printf '%s' "run as root (sudo), or pass --prefix to a directory you can write"
  fi
}

# The install writes the new release under the prefix: try it (nothing is left behind).
check_prefix() {
  local dir probe
  dir=$(existing_parent "$PREFIX")
  if probe=$(mktemp -d -- "$dir/.preflight-write.XXXXXX" 2>/dev/null); then
    rmdir -- "$probe"
    add_check prefix ok "$PREFIX can be written (tried in $dir)"
  else
    add_check prefix fail "$dir cannot be written, so $PREFIX cannot be installed" "$(write_fix)"
  fi
}

# ---------------------------------------------------------------------------------------------
# Docker bundles

# Runs docker with a time limit where coreutils' timeout exists: a DOCKER_HOST on an unreachable
# TCP address would otherwise hang the preflight.
docker_cmd() {
  if command -v timeout >/dev/null 2>&1; then
    timeout 60 docker "$@"
  else
    docker "$@"
  fi
}

# A fix line for a daemon that does not answer, from the client's error message.
docker_daemon_fix() {
  case $1 in
    *"permission denied"*)
      printf 'run as root (sudo), or add this user to the docker group (usermod -aG docker USER, then log in again)' ;;
    *)
      printf 'start the Docker daemon (systemctl start docker) and check that docker info works%s' \
        "${DOCKER_HOST:+; DOCKER_HOST=$DOCKER_HOST is set: unset it or point it at the running daemon}" ;;
  esac
}

# Sets DOCKER_OK=1 and DOCKER_ROOT, DOCKER_CGROUP, DOCKER_RUNTIMES, DOCKER_DEFAULT_RUNTIME when
# the daemon answers.
check_docker() {
  local out version
  DOCKER_OK=0 DOCKER_ROOT="" DOCKER_CGROUP="" DOCKER_RUNTIMES="" DOCKER_DEFAULT_RUNTIME=""
  if ! command -v docker >/dev/null 2>&1; then
    add_check docker fail "docker CLI not found on PATH; this is a docker bundle" \
      "install Docker Engine (docker-ce, or docker.io on Debian/Ubuntu) from your OS media or mirror, or use the pip bundle of the same cell"
    add_check docker-daemon skip "no docker CLI"
    add_check docker-version skip "no docker CLI"
    return
  fi
  add_check docker ok "$(command -v docker)"

  # `docker info --format` says nothing when the daemon is down; `docker version` names why.
  if ! out=$(docker_cmd version --format '{{.Server.Version}}' 2>&1) || [[ -z $out ]]; then
    out=$(grep -v '^[[:space:]]*$' <<<"$out" | tail -n1)
    add_check docker-daemon fail "the Docker daemon does not answer: ${out:-docker version printed nothing}" \
      "$(docker_daemon_fix "$out")"
    add_check docker-version skip "no Docker daemon"
    return
  fi
  version=$out
  # One call for the rest, one value per line. Its warnings on stderr ("No swap limit support")
  # must not mix with the values; on failure it runs again to say why.
  # shellcheck disable=SC2016 # a Go template, not shell
  local format='{{.DockerRootDir}}{{"\n"}}{{.CgroupDriver}}{{"\n"}}{{range $name, $_ := .Runtimes}}{{$name}} {{end}}{{"\n"}}{{.DefaultRuntime}}'
  if ! out=$(docker_cmd info --format "$format" 2>/dev/null); then
    out=$(docker_cmd info --format "$format" 2>&1 >/dev/null)
    add_check docker-daemon fail "docker info failed: $(grep -v '^[[:space:]]*$' <<<"$out" | tail -n1)" \
      "$(docker_daemon_fix "$out")"
    add_check docker-version skip "no Docker daemon"
    return
  fi
  { IFS= read -r DOCKER_ROOT; IFS= read -r DOCKER_CGROUP; IFS= read -r DOCKER_RUNTIMES; IFS= read -r DOCKER_DEFAULT_RUNTIME; } <<<"$out"
  DOCKER_RUNTIMES=${DOCKER_RUNTIMES% }
  DOCKER_OK=1
  add_check docker-daemon ok "Docker Engine $version answers${DOCKER_HOST:+ at $DOCKER_HOST}"

  # "20.10.24+dfsg1", "24.0.7-ce", "28.2.2": the leading dotted number is what counts.
  local number=${version%%[!0-9.]*}
  number=${number%.}
  if version_ge "$number" "$DOCKER_FLOOR"; then
    add_check docker-version ok "$version (need >= $DOCKER_FLOOR)"
  elif [[ -n $number ]] && version_ge "$number" 0; then
    add_check docker-version fail "Docker Engine $version is older than $DOCKER_FLOOR" \
      "upgrade Docker Engine to $DOCKER_FLOOR or newer from your mirror (docker run --pull never needs it)"
  else
    add_check docker-version warn "cannot read the Docker Engine version from '$version'" \
      "check by hand that docker version shows a server of $DOCKER_FLOOR or newer"
  fi
}

# Upstream's Docker path for NVIDIA: `docker info | grep Runtimes | grep nvidia`, and systemd
# cgroup management disabled, else containers lose the GPU after `systemctl daemon-reload`
# ("Failed to initialize NVML: Unknown Error").
check_nvidia_docker() {
  if ((!DOCKER_OK)); then
    add_check nvidia-runtime skip "no Docker daemon"
    add_check cgroup-driver skip "no Docker daemon"
    return
  fi
  if [[ " $DOCKER_RUNTIMES " == *" nvidia "* ]]; then
    add_check nvidia-runtime ok "Docker runtimes: $DOCKER_RUNTIMES"
  else
    add_check nvidia-runtime fail "the NVIDIA runtime is not registered with Docker (runtimes: ${DOCKER_RUNTIMES:-none}); GPU containers cannot start" \
      "install the NVIDIA Container Toolkit from your mirror, run nvidia-ctk runtime configure --runtime=docker, restart Docker, and check: docker info | grep Runtimes | grep nvidia"
  fi
  if [[ $DOCKER_CGROUP == cgroupfs ]]; then
    add_check cgroup-driver ok "cgroupfs"
  else
    add_check cgroup-driver fail "Docker's cgroup driver is ${DOCKER_CGROUP:-unknown}, not cgroupfs; GPU containers lose their GPUs after systemctl daemon-reload (Failed to initialize NVML: Unknown Error)" \
      "add \"exec-opts\": [\"native.cgroupdriver=cgroupfs\"] to /etc/docker/daemon.json, then systemctl daemon-reload && systemctl restart docker"
  fi
}

# ---------------------------------------------------------------------------------------------
# GPUStack 2.x: the cell's device backend (bundle.env DEVICE_*)

# PATH under the host root (PREFLIGHT_HOST_ROOT), for files and device nodes.
host_path() {
  printf '%s%s' "${PREFLIGHT_HOST_ROOT:-}" "$1"
}

# brief_version V: major.minor, as upstream's get_brief_version (8.2.RC1 -> 8.2, 25.04.3 -> 25.04).
brief_version() {
  local v=$1
  [[ $v =~ ^([0-9]+)\.([0-9]+) ]] && { printf '%s.%s' "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}"; return 0; }
  [[ $v =~ ^[0-9]+$ ]] && { printf '%s' "$v"; return 0; }
  return 1
}

# The host's version of the backend, as upstream's detector reads it: each reader sets
# DEV_VERSION (major.minor) and DEV_SOURCE (where it was read), or DEV_SOURCE (where it looked)
# and returns 1. DEV_TOOL_OUT holds the device tool's output.

# AMD (gpustack_runtime/detector/amd.py): /opt/rocm/.info/version, else amd-smi version.
version_rocm() {
  local info v
  info=$(host_path /opt/rocm/.info/version)
  if [[ -r $info ]] && v=$(brief_version "$(head -n1 "$info")"); then
    DEV_VERSION=$v DEV_SOURCE=$info
    return 0
  fi
  if command -v amd-smi >/dev/null 2>&1; then
    # "AMDSMI Tool: 26.0.0+... | AMDSMI Library version: 26.0.0 | ROCm version: 7.0.1"
    v=$(amd-smi version 2>/dev/null | sed -n 's/.*ROCm version: *\([0-9][0-9.]*\).*/\1/p' | head -n1)
    if v=$(brief_version "$v"); then DEV_VERSION=$v DEV_SOURCE="amd-smi version"; return 0; fi
  fi
  DEV_SOURCE="$info or amd-smi version"
  return 1
}

# Ascend (gpustack_runtime/detector/ascend.py _get_toolkit_version): the "Version=" line of
# version.info under the toolkit the worker sees through its line's mount.
version_cann() {
  local home f v
  home=$(host_path /usr/local/Ascend/ascend-toolkit/latest/runtime)
  for f in "$home/version.info" "$home/share/info/runtime/version.info"; do
    [[ -r $f ]] || continue
    # Version=8.2.RC1
    v=$(sed -n 's/^Version=\([^[:space:]]*\).*/\1/p' "$f" | head -n1)
    if v=$(brief_version "$v"); then DEV_VERSION=$v DEV_SOURCE=$f; return 0; fi
  done
  DEV_SOURCE="$home/version.info"
  return 1
}

# Hygon (gpustack_runtime/detector/hygon.py): $ROCM_PATH/.info/version with ROCM_PATH=/opt/dtk.
version_dtk() {
  local info v
  info=$(host_path /opt/dtk/.info/version)
  if [[ -r $info ]] && v=$(brief_version "$(head -n1 "$info")"); then
    DEV_VERSION=$v DEV_SOURCE=$info
    return 0
  fi
  DEV_SOURCE=$info
  return 1
}

# tool_field LABEL: the value after "LABEL:" in the device tool's output (its header line).
tool_field() {
  sed -n "s/.*$1: *\\([^[:space:]|]*\\).*/\\1/p" <<<"$DEV_TOOL_OUT" | head -n1
}

# field_version LABEL: the toolkit version from the device tool's "LABEL:" field.
field_version() {
  local v
  DEV_SOURCE="$DEV_TOOL's $1"
  v=$(brief_version "$(tool_field "$1")") || return 1
  DEV_VERSION=$v
}

# MetaX (detector/metax.py: mxSmlGetMacaVersion): "| MACA Version: 2.33.0.5   BIOS Version: ... |"
version_mx_smi() { field_version 'MACA Version'; }

# Iluvatar: "|  IX-ML: 4.3.0       Driver Version: 4.3.0       CUDA Version: 10.2  |"
version_ixsmi() { field_version 'Driver Version'; }

# T-Head (detector/thead.py: hgmlSystemGetHggcDriverVersion):
# "| PPU-SMI 1.28          Driver Version: 2.1.0-dbda51  HGGC Version: 13.0          |"
version_ppu_smi() { field_version 'HGGC Version'; }

# The device tool as upstream's docs and UI run it (npu-smi info, amd-smi static, hy-smi, ...).
check_device_tool() {
  local -a tool
  local out
  IFS=, read -ra tool <<<"$DEVICE_TOOL"
  DEV_TOOL=${tool[0]} DEV_TOOL_OUT="" DEV_TOOL_OK=0
  if ! command -v "$DEV_TOOL" >/dev/null 2>&1; then
    add_check "$DEV_TOOL" fail "$DEV_TOOL not found; this is a $TARGET_DEVICE bundle" \
      "install the $DEVICE_TOOLKIT driver of the vendor (it provides $DEV_TOOL) from your OS media or mirror, then run preflight again"
    return
  fi
  if ! out=$("${tool[@]}" 2>&1); then
    add_check "$DEV_TOOL" fail "${tool[*]} failed: $(grep -v '^[[:space:]]*$' <<<"$out" | head -n1)" \
      "make sure the driver is loaded and matches its user-space tools (reboot after a driver upgrade), then run ${tool[*]}"
    return
  fi
  DEV_TOOL_OUT=$out DEV_TOOL_OK=1
  local driver
  driver=$(tool_field 'Driver Version')
  [[ -n $driver ]] || driver=$(sed -n 's/.*npu-smi [^ ]* *Version: *\([^[:space:]|]*\).*/\1/p' <<<"$out" | head -n1)
  add_check "$DEV_TOOL" ok "${tool[*]} answers${driver:+ (driver $driver)}"
}

# The host's version against the bundle's floor and ceiling.
check_device_version() {
  local name=$DEVICE_BACKEND tk=$DEVICE_TOOLKIT floor=$DEVICE_FLOOR ceiling=$DEVICE_CEILING
  local reader=${DEVICE_VERSION_READER//-/_} newest="$DEVICE_BACKEND$DEVICE_NEWEST${DEVICE_VARIANT:+-$DEVICE_VARIANT}"
  local range="$floor or newer${ceiling:+, below $ceiling}"
  if [[ -z $reader ]]; then
    if [[ -n $ceiling ]]; then
      add_check "$name" fail "upstream's detector reads no $tk version, so the worker asks for the newest $DEVICE_BACKEND runner ($newest), which this bundle ($TARGET_DEVICE) does not carry" \
        "use the $newest bundle of the same version, arch and services"
    else
      add_check "$name" ok "not compared: upstream's detector reads no $tk version and the worker asks for the newest $DEVICE_BACKEND runner, this bundle's ($TARGET_DEVICE)"
    fi
    return
  fi
  DEV_VERSION="" DEV_SOURCE=""
  if [[ $reader == mx_smi || $reader == ixsmi || $reader == ppu_smi ]] && ((!DEV_TOOL_OK)); then
    add_check "$name" skip "no $DEV_TOOL output to read the $tk version from"
    return
  fi
  if ! "version_$reader"; then
    if [[ $DEVICE_BACKEND == cann && -z $ceiling ]]; then
      add_check "$name" warn "no CANN toolkit at $DEV_SOURCE: the worker detects no CANN version and asks for the newest CANN runner, this bundle's ($TARGET_DEVICE); the floor $floor cannot be checked" \
        "make sure the Ascend driver supports CANN $floor (Ascend's CANN and driver version table)"
    elif [[ $DEVICE_BACKEND == cann ]]; then
      add_check "$name" fail "no CANN toolkit at $DEV_SOURCE: the worker detects no CANN version and asks for the newest CANN runner ($newest), which this bundle ($TARGET_DEVICE) does not carry" \
        "install CANN toolkit $range under /usr/local/Ascend/ascend-toolkit (the worker line mounts it), or use the $newest bundle"
    else
      add_check "$name" fail "cannot read the $tk version ($DEV_SOURCE); this is a $TARGET_DEVICE bundle" \
        "install $tk $range from your mirror, then run preflight again"
    fi
    return
  fi
  if ! version_ge "$DEV_VERSION" "$floor"; then
    add_check "$name" fail "$tk $DEV_VERSION ($DEV_SOURCE) is older than $floor, the floor of this bundle's $TARGET_DEVICE runners" \
      "upgrade $tk to $range, or use the bundle of a $DEVICE_BACKEND device not above $DEV_VERSION"
  elif [[ -n $ceiling ]] && version_ge "$DEV_VERSION" "$ceiling"; then
    add_check "$name" fail "$tk $DEV_VERSION ($DEV_SOURCE): the worker asks for the newest $DEVICE_BACKEND runner not above it, $DEVICE_BACKEND$ceiling or newer, which this bundle ($TARGET_DEVICE: $tk $range) does not carry" \
      "use the bundle built for the newest $DEVICE_BACKEND device not above $tk $DEV_VERSION (same version, arch and services), or a $tk below $ceiling"
  else
    add_check "$name" ok "$tk $DEV_VERSION ($DEV_SOURCE; need >= $floor${ceiling:+, < $ceiling})"
  fi
}

# npu_variant NAME: the CANN variant of an npu-smi chip name, as upstream's
# get_ascend_cann_variant maps the SoC (910B3 -> 910b, 310P3 -> 310p, Ascend910 -> a3). A 0.x
# worker knows two builds only: the 310P one and the other (get_cann_chip, tools_manager.py),
# which the 0.x bundles call 910b.
npu_variant() {
  local soc="Ascend${1#Ascend}"
  case $soc in
    Ascend910 | Ascend910_93*) echo a3 ;;
    Ascend950* | Ascend910_95*) echo 950 ;;
    Ascend310P* | AscendI2*) echo 310p ;;
    Ascend310B*) echo 310b ;;
    Ascend910B[0-9]* | AscendA2G[0-9]*) echo 910b ;;
    Ascend910*) echo 910 ;;
  esac
}

# Ascend: the worker asks for the runners of the NPUs' variant (910b when it cannot tell); a 0.x
# bundle's llama-box build is for 310P chips or for the others.
check_npu_variant() {
  local names name variant wrong="" seen="" wants="the worker asks for runners of the NPUs' variant, and this bundle ($TARGET_DEVICE) carries $DEVICE_VARIANT ones"
  local same=services
  if [[ -n $DEVICE_BUILD ]]; then
    wants="this bundle's llama-box build ($DEVICE_BUILD) is for $DEVICE_VARIANT chips" same=extras
  fi
  if ((!DEV_TOOL_OK)); then
    add_check npu-variant skip "no npu-smi output"
    return
  fi
  # "| 0     910B3               | OK            | 97.6   52   0    / 0 |": NPU id, then the name
  names=$(awk -F'|' '{ split($2, w, " "); if (w[1] ~ /^[0-9]+$/ && w[2] != "" && w[2] !~ /^[0-9]+$/) print w[2] }' <<<"$DEV_TOOL_OUT" | sort -u)
  if [[ -z $names ]]; then
    add_check npu-variant warn "cannot read the NPU names from npu-smi info; the worker then asks for 910b runners" \
      "check by hand that the NPUs are ${DEVICE_VARIANT} ones (npu-smi info)"
    return
  fi
  for name in $names; do
    variant=$(npu_variant "$name")
    [[ -n $DEVICE_BUILD && $variant != 310p ]] && variant=910b
    seen+="${seen:+, }$name (${variant:-unknown})"
    [[ $variant == "$DEVICE_VARIANT" ]] || wrong+="${wrong:+, }$name"
  done
  if [[ -n $wrong ]]; then
    variant=$(npu_variant "${wrong%%,*}")
    [[ -n $DEVICE_BUILD && $variant != 310p ]] && variant=910b
    add_check npu-variant fail "npu-smi lists $seen; $wants" \
      "use the bundle built for cann$DEVICE_FLOOR-$variant (same version, arch and $same)"
  else
    add_check npu-variant ok "$seen"
  fi
}

# The vendor's container runtime the worker line names (--runtime), as upstream's UI checks it.
check_device_runtime() {
  local rt=$DEVICE_RUNTIME
  [[ -n $rt ]] || return 0
  if ((!DOCKER_OK)); then
    add_check "$rt-runtime" skip "no Docker daemon"
  elif [[ " $DOCKER_RUNTIMES " == *" $rt "* ]]; then
    add_check "$rt-runtime" ok "Docker runtimes: $DOCKER_RUNTIMES"
  else
    add_check "$rt-runtime" fail "the $rt runtime is not registered with Docker (runtimes: ${DOCKER_RUNTIMES:-none}); the worker line names --runtime $rt" \
      "install the vendor's container toolkit for $DEVICE_TOOLKIT from your mirror, register it with Docker, restart Docker, and check: docker info | grep $rt"
  fi
}

# Device nodes the containers are given (2.x: the runners'; a 0.x image: its run line's
# --device): each pattern must match.
check_device_nodes() {
  local -a patterns
  local p missing="" who="runner containers cannot reach the devices"
  [[ -n $DEVICE_NODES ]] || return 0
  [[ -z $DEVICE_BUILD ]] || who="the run line passes them to GPUStack's container (--device), which docker refuses to start without them"
  IFS=, read -ra patterns <<<"$DEVICE_NODES"
  for p in "${patterns[@]}"; do
    compgen -G "$(host_path "$p")" >/dev/null || missing+="${missing:+, }$p"
  done
  if [[ -n $missing ]]; then
    add_check "$DEVICE_BACKEND-devices" fail "device nodes missing: $missing; $who" \
      "load the $DEVICE_TOOLKIT driver (its kernel module) and check that $DEV_TOOL lists the devices"
  else
    add_check "$DEVICE_BACKEND-devices" ok "${DEVICE_NODES//,/, }"
  fi
}

# Driver and toolkit files or folders the worker line (0.x image: the run line, -v) mounts, or a
# 0.x pip install loads the toolkit from (docker would mount an empty folder made in its place).
check_device_paths() {
  local -a paths
  local p missing="" who="the worker line mounts it into the worker"
  [[ -n $DEVICE_PATHS ]] || return 0
  if [[ -n $DEVICE_BUILD && $INSTALL_METHOD == docker ]]; then
    who="the run line mounts it into GPUStack's container (-v), and docker would create an empty folder in its place"
  elif [[ -n $DEVICE_BUILD ]]; then
    who="the llama-box build ($DEVICE_BUILD) loads the host's $DEVICE_TOOLKIT from there"
  fi
  IFS=, read -ra paths <<<"$DEVICE_PATHS"
  for p in "${paths[@]}"; do
    [[ -e $(host_path "$p") ]] || missing+="${missing:+, }$p"
  done
  if [[ -n $missing ]]; then
    add_check "$DEVICE_BACKEND-paths" fail "missing: $missing; $who" \
      "install the $DEVICE_TOOLKIT driver and toolkit in their default places"
  else
    add_check "$DEVICE_BACKEND-paths" ok "${DEVICE_PATHS//,/, }"
  fi
}

check_device() {
  if [[ $DEVICE_BACKEND == cuda ]]; then
    # upstream's NVIDIA path: the driver's CUDA version, the NVIDIA runtime, the cgroup driver
    check_nvidia_driver
    check_nvidia_docker
    return
  fi
  DEV_TOOL=${DEVICE_TOOL%%,*} DEV_TOOL_OK=0 DEV_TOOL_OUT=""
  check_device_tool
  check_device_version
  if [[ $DEVICE_BACKEND == cann ]]; then check_npu_variant; fi
  check_device_runtime
  check_device_nodes
  check_device_paths
}

# GPUStack 0.x image: upstream's run line names no --runtime where the vendor's runtime gives the
# container its devices (Moore Threads: "MT Container Toolkits ... set as the default runtime",
# docs/installation/moorethreads-musa), so that runtime must be Docker's default.
check_default_runtime() {
  local rt=$DEVICE_RUNTIME
  [[ -n $rt ]] || return 0
  if ((!DOCKER_OK)); then
    add_check "$rt-runtime" skip "no Docker daemon"
  elif [[ $DOCKER_DEFAULT_RUNTIME == "$rt" ]]; then
    add_check "$rt-runtime" ok "Docker's default runtime: $rt"
  elif [[ " $DOCKER_RUNTIMES " == *" $rt "* ]]; then
    add_check "$rt-runtime" fail "the $rt runtime is registered with Docker but its default runtime is ${DOCKER_DEFAULT_RUNTIME:-unknown}; upstream's run line names no --runtime, so GPUStack's container would see no device" \
      "make $rt Docker's default runtime (\"default-runtime\": \"$rt\" in /etc/docker/daemon.json), restart Docker, and check: docker info | grep -i runtime"
  else
    add_check "$rt-runtime" fail "the $rt runtime is not registered with Docker (runtimes: ${DOCKER_RUNTIMES:-none}); upstream's run line needs it as Docker's default runtime to give GPUStack's container the devices" \
      "install the vendor's container toolkit for $DEVICE_TOOLKIT from your mirror, make $rt Docker's default runtime (\"default-runtime\": \"$rt\" in /etc/docker/daemon.json), restart Docker, and check: docker info | grep -i runtime"
  fi
}

# GPUStack 0.x: the host's toolkit against what the bundle's llama-box build was made for (pip
# bundles: the build loads the host's libraries; the worker runs it whatever the host has).
check_toolkit_0x() {
  local name=$DEVICE_BACKEND tk=$DEVICE_TOOLKIT reader=${DEVICE_VERSION_READER//-/_} floor
  local build="this bundle's llama-box build ($DEVICE_BUILD)"
  if [[ -z $reader ]]; then
    add_check "$name" warn "not compared: GPUStack $GPUSTACK_VERSION reads no $tk version, and $build needs $tk $DEVICE_FLOOR" \
      "check by hand that $tk $DEVICE_FLOOR is installed (the vendor's SDK), or use the bundle of the $tk the host has"
    return
  fi
  if ! floor=$(brief_version "$DEVICE_FLOOR"); then
    add_check "$name" fail "bundle.env names the $tk floor '$DEVICE_FLOOR', which is no version" "re-copy the bundle from the source media"
    return
  fi
  DEV_VERSION="" DEV_SOURCE=""
  if [[ $reader == mx_smi || $reader == ixsmi || $reader == ppu_smi ]] && ((!DEV_TOOL_OK)); then
    add_check "$name" skip "no $DEV_TOOL output to read the $tk version from"
    return
  fi
  if ! "version_$reader"; then
    add_check "$name" fail "no $tk found ($DEV_SOURCE); $build loads $tk $DEVICE_FLOOR's libraries" \
      "install $tk $DEVICE_FLOOR or newer from your mirror in its default place, then run preflight again"
  elif ! version_ge "$DEV_VERSION" "$floor"; then
    add_check "$name" fail "$tk $DEV_VERSION ($DEV_SOURCE) is older than $tk $DEVICE_FLOOR, which $build needs" \
      "upgrade $tk to $DEVICE_FLOOR or newer, or use the bundle of the $DEVICE_BACKEND device of $tk $DEV_VERSION (invoke matrix lists them)"
  else
    add_check "$name" ok "$tk $DEV_VERSION ($DEV_SOURCE; need >= $DEVICE_FLOOR for $DEVICE_BUILD)"
  fi
}

# GPUStack 0.x: the vendor's device, and what the bundle's llama-box build needs of the host.
check_device_0x() {
  DEV_TOOL=${DEVICE_TOOL%%,*} DEV_TOOL_OK=0 DEV_TOOL_OUT=""
  check_device_tool
  if [[ $INSTALL_METHOD == pip ]]; then
    check_toolkit_0x
  else
    add_check "$DEVICE_BACKEND" ok "the image carries $DEVICE_TOOLKIT $DEVICE_FLOOR and its llama-box build ($DEVICE_BUILD); the host's driver must support $DEVICE_TOOLKIT $DEVICE_FLOOR"
  fi
  if [[ $DEVICE_BACKEND == cann ]]; then check_npu_variant; fi
  # pip: the toolkit's folders; docker: what the run line passes in (the image has the toolkit)
  check_device_nodes
  check_device_paths
  if [[ $INSTALL_METHOD == docker ]]; then check_default_runtime; fi
}

# `docker load` unpacks the archive's compressed layers under Docker's root dir: ask for about
# twice the archive's size there. IMAGE_ARCHIVE is a folder (older bundles: a tar).
check_docker_disk() {
  local archive=$BUNDLE_DIR/$IMAGE_ARCHIVE archive_kb
  if [[ ! -f $archive && ! -f $archive/manifest.json ]]; then
    add_check disk fail "the image archive $IMAGE_ARCHIVE is missing from the bundle" \
      "re-copy the whole bundle from the source media"
    return
  fi
  if ((!DOCKER_OK)); then
    add_check disk skip "no Docker daemon to ask for its root dir"
    return
  fi
  archive_kb=$(du -sk -- "$archive" | awk '{ print $1 }')
  check_free "$DOCKER_ROOT" $((archive_kb * 2)) "$IMAGE_ARCHIVE" \
    "free space in Docker's root dir $DOCKER_ROOT (docker image prune, docker system df) or move Docker's data-root to a larger file system"
}

# ---------------------------------------------------------------------------------------------
# Output

# json_str S: S as a JSON string literal. Backslash and quote are escaped first, then the
# whitespace controls; any other control character is dropped (details are one line of text).
json_str() {
  local s=$1
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  s=${s//$'\n'/\\n}
  s=${s//$'\r'/\\r}
  s=${s//$'\t'/\\t}
  s=$(LC_ALL=C tr -d '\001-\010\013\014\016-\037' <<<"$s")
  printf '"%s"' "$s"
}

print_json() {
  local i sep="" ok=$1
  printf '{"cell": %s, "ok": %s, "checks": [' "$(json_str "$BUNDLE_CELL")" "$ok"
  for i in "${!C_NAME[@]}"; do
    printf '%s{"name": %s, "status": %s, "detail": %s, "fix": %s}' "$sep" \
      "$(json_str "${C_NAME[i]}")" "$(json_str "${C_STATUS[i]}")" \
      "$(json_str "${C_DETAIL[i]}")" "$(json_str "${C_FIX[i]}")"
    sep=", "
  done
  printf ']}\n'
}

print_report() {
  local i width=0 tag n_ok=0 n_warn=0 n_fail=0 n_skip=0
  for i in "${!C_NAME[@]}"; do ((${#C_NAME[i]} > width)) && width=${#C_NAME[i]}; done
  printf 'GPUStack preflight for %s\n' "$BUNDLE_CELL"
  for i in "${!C_NAME[@]}"; do
    case ${C_STATUS[i]} in
      ok) tag=" ok " n_ok=$((n_ok + 1)) ;;
      warn) tag=warn n_warn=$((n_warn + 1)) ;;
      fail) tag=fail n_fail=$((n_fail + 1)) ;;
      *) tag=skip n_skip=$((n_skip + 1)) ;;
    esac
    printf '[%s] %-*s  %s\n' "$tag" "$width" "${C_NAME[i]}" "${C_DETAIL[i]}"
    [[ -n ${C_FIX[i]} ]] && printf '       %-*s  fix: %s\n' "$width" "" "${C_FIX[i]}"
  done
  if ((n_fail > 0)); then
    printf 'preflight: FAILED (%d ok, %d warn, %d fail, %d skip); fix the failed items above\n' \
      "$n_ok" "$n_warn" "$n_fail" "$n_skip"
  else
    printf 'preflight: passed (%d ok, %d warn, %d fail, %d skip); this host can install %s\n' \
      "$n_ok" "$n_warn" "$n_fail" "$n_skip" "$BUNDLE_CELL"
  fi
}

# ---------------------------------------------------------------------------------------------

load_bundle_env() {
  local env=$BUNDLE_DIR/bundle.env key
  [[ -f $env ]] || usage_error "bundle.env not found in $BUNDLE_DIR; run the preflight.sh that sits in the bundle"
  # shellcheck source=/dev/null
  . "$env"
  for key in BUNDLE_CELL TARGET_OS TARGET_ARCH TARGET_DEVICE TARGET_PYTHON TARGET_EXTRAS; do
    [[ -n ${!key:-} ]] || usage_error "bundle.env in $BUNDLE_DIR has no $key; re-copy the bundle from the source media"
  done
  GLIBC_FLOOR=${GLIBC_FLOOR:-}
  CUDA_FLOOR=${CUDA_FLOOR:-}
  ROCM_FLOOR=${ROCM_FLOOR:-}
  for key in DEVICE_BACKEND DEVICE_FLOOR DEVICE_VARIANT DEVICE_CEILING DEVICE_NEWEST DEVICE_TOOLKIT \
    DEVICE_TOOL DEVICE_VERSION_READER DEVICE_RUNTIME DEVICE_NODES DEVICE_PATHS DEVICE_BUILD; do
    printf -v "$key" '%s' "${!key:-}"
  done
  if [[ -n $DEVICE_BACKEND ]]; then
    for key in DEVICE_FLOOR DEVICE_TOOLKIT DEVICE_TOOL; do
      [[ -n ${!key} ]] || usage_error "bundle.env in $BUNDLE_DIR names device backend $DEVICE_BACKEND but no $key; re-copy the bundle from the source media"
    done
  fi
  # Bundles from before the docker method have no INSTALL_METHOD: they are pip bundles.
  INSTALL_METHOD=${INSTALL_METHOD:-pip}
  case $INSTALL_METHOD in
    pip) ;;
    docker)
      [[ -n ${IMAGE_ARCHIVE:-} ]] || usage_error "bundle.env in $BUNDLE_DIR has no IMAGE_ARCHIVE; re-copy the bundle from the source media"
      ;;
    *) usage_error "bundle.env in $BUNDLE_DIR names the install method '$INSTALL_METHOD'; this preflight.sh knows pip and docker: re-copy the bundle from the source media" ;;
  esac
}

main() {
  local json=0
  PY="" PREFIX=/opt/gpustack
  while (($# > 0)); do
    case $1 in
      --python) (($# >= 2)) || usage_error "--python needs a path"; PY=$2; shift 2 ;;
      --python=*) PY=${1#*=}; shift ;;
      --prefix) (($# >= 2)) || usage_error "--prefix needs a directory"; PREFIX=$2; shift 2 ;;
      --prefix=*) PREFIX=${1#*=}; shift ;;
      --json) json=1; shift ;;
      -h | --help) usage; exit 0 ;;
      *) usage_error "unknown argument: $1" ;;
    esac
  done
  [[ -n $PREFIX ]] || usage_error "--prefix must not be empty"
  [[ $PREFIX == /* ]] || PREFIX=$PWD/$PREFIX
  # Values of the caller's environment must not stand in for keys bundle.env lacks.
  INSTALL_METHOD="" IMAGE_ARCHIVE=""
  unset DEVICE_BACKEND DEVICE_FLOOR DEVICE_VARIANT DEVICE_CEILING DEVICE_NEWEST DEVICE_TOOLKIT \
    DEVICE_TOOL DEVICE_VERSION_READER DEVICE_RUNTIME DEVICE_NODES DEVICE_PATHS DEVICE_BUILD
  load_bundle_env
  if [[ -z $PY ]]; then
    PY=python$TARGET_PYTHON
    command -v "$PY" >/dev/null 2>&1 || PY=python3
  fi

  check_os
  check_arch
  check_cpu
  if [[ $INSTALL_METHOD == docker ]]; then
    # The image carries Python, glibc and the CUDA runtime: the host needs Docker instead.
    check_docker
    if [[ -n $DEVICE_BUILD ]]; then
      check_device_0x
    elif [[ -n $DEVICE_BACKEND ]]; then
      check_device
    elif [[ $TARGET_DEVICE != cuda* ]]; then
      add_check nvidia-smi skip "not a CUDA bundle (device $TARGET_DEVICE)"
    elif [[ -z $CUDA_FLOOR ]]; then
      add_check cuda-driver fail "bundle.env names device $TARGET_DEVICE but no CUDA_FLOOR" \
        "re-copy the bundle from the source media"
    else
      check_nvidia_driver
      check_nvidia_docker
    fi
    check_docker_disk
  else
    check_python
    check_glibc
    if [[ $TARGET_DEVICE == cuda* ]]; then
      if [[ -z $CUDA_FLOOR ]]; then
        add_check cuda-driver fail "bundle.env names device $TARGET_DEVICE but no CUDA_FLOOR" \
          "re-copy the bundle from the source media"
      else
        check_nvidia
      fi
    elif [[ -n $DEVICE_BACKEND ]]; then
      check_device_0x
    else
      add_check nvidia-smi skip "not a CUDA bundle (device $TARGET_DEVICE)"
    fi
    check_disk
    check_prefix
  fi

  local failed=0 s
  for s in "${C_STATUS[@]}"; do [[ $s == fail ]] && failed=1; done
  if ((json)); then
    if ((failed)); then print_json false; else print_json true; fi
  else
    print_report
  fi
  return "$failed"
}

main "$@"
