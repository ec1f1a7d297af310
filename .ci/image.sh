#!/usr/bin/env bash
# `make image`: `docker build -t unsloth-recipes .` on any machine of the project.
#   - As root, it makes sure a Docker engine and the compose plugin answer (.ci/docker-standin.sh
#     engine starts dockerd where none runs: CI starts nothing for us).
#   - The base is the Dockerfile's own (nvidia/cuda) where Docker Hub answers; where it does not
#     (the project's machines and CI), the stand-in built from the Ubuntu archive (CPU only).
#     CUDA_IMAGE=... chooses one outright.
#   - BuildKit where its buildx plugin is installed, else the legacy builder.
# IMAGE names the tag (default unsloth-recipes, the name the README's commands use).
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-unsloth-recipes}
DEFAULT_BASE=$(sed -n 's/^ARG CUDA_IMAGE=//p' Dockerfile)  # read from the Dockerfile: one place

if [ "$(id -u)" -eq 0 ]; then
  .ci/docker-standin.sh engine
elif ! timeout 20 docker info >/dev/null 2>&1; then
  echo "error: no Docker engine answers 'docker info'; start Docker, or run make image as root to start one" >&2
  exit 2
fi

pulled() {  # the default base, pulled if needed; three tries, as every network step of the build
  local try
  docker image inspect "$DEFAULT_BASE" >/dev/null 2>&1 && return 0
  for try in 1 2 3; do
    docker pull -q "$DEFAULT_BASE" >/dev/null 2>&1 && return 0
    [ "$try" -eq 3 ] || sleep $((try * 5))
  done
  return 1
}

base=${CUDA_IMAGE:-}
if [ -z "$base" ]; then
  if pulled; then
    base=$DEFAULT_BASE
  else
    base=$(.ci/docker-standin.sh base | tail -n 1)
    echo "note: $DEFAULT_BASE cannot be pulled here; building on the stand-in $base (it runs on the CPU only)" >&2
  fi
fi

docker buildx version >/dev/null 2>&1 || export DOCKER_BUILDKIT=0
docker build --build-arg CUDA_IMAGE="$base" -t "$IMAGE" .
