#!/usr/bin/env bash
# Prepare a Debian/Ubuntu build host (run as root): the system parts the online stage and the
# verification need, the Docker daemon, arm64 emulation, and the project's virtualenv in .venv.
# Safe to run again; it only does what is missing.
set -euo pipefail

cd "$(dirname "$0")/.."
# gcc and the arm64 cross compiler build the small fixture tool binaries the tests serve from a
# loopback release mirror; docker-registry is the loopback OCI registry of the Docker-path tests;
# gnupg signs bundles (sites check them with gpgv, which every Debian/Ubuntu/RHEL host has).
PACKAGES=(docker.io debootstrap qemu-user-static binfmt-support skopeo shellcheck python3-venv git
  gcc libc6-dev gcc-aarch64-linux-gnu libc6-dev-arm64-cross docker-registry gnupg)
DOCKER_LOG=/var/log/gpustack-offline-dockerd.log

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (or with sudo): it installs Debian packages and starts dockerd"

install_packages() {
  local missing=()
  # A host that already runs a Docker Engine (docker-ce on GitHub's runners) keeps it.
  if docker info >/dev/null 2>&1; then PACKAGES=("${PACKAGES[@]/docker.io/}"); fi
  for pkg in "${PACKAGES[@]}"; do
    [ -n "$pkg" ] || continue
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
  fi
}

start_docker() {
  if docker info >/dev/null 2>&1; then return; fi
  if [ -d /run/systemd/system ] && systemctl start docker 2>/dev/null; then :; else
    say "starting dockerd (log: $DOCKER_LOG)"
    nohup /usr/sbin/dockerd >"$DOCKER_LOG" 2>&1 &
  fi
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && return; sleep 1; done
  die "the Docker daemon did not start within 60s; see $DOCKER_LOG"
}

enable_arm64_emulation() {
  if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  fi
  update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
  # The F flag makes the interpreter work inside containers too.
  grep -q '^flags:.*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null \
    || die "qemu-aarch64 binfmt is not registered with the F flag; arm64 containers cannot run"
}

make_venv() {
  local py="${PYTHON:-python3}"
  "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$py is older than 3.11; set PYTHON=/path/to/python3.11 or newer"
  [ -x .venv/bin/python ] || "$py" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
}

install_packages
start_docker
enable_arm64_emulation
make_venv
say "ready: docker $(docker version --format '{{.Server.Version}}'), arm64 emulation on, .venv set up"
