# syntax=docker/dockerfile:1
# Unsloth fine-tuning recipes; the entrypoint picks and launches the multi-GPU strategy.
#
#   docker build -t unsloth-recipes .
#   docker run --rm --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
#     -e PARALLELISM=ddp -e NUM_GPUS=4 -v $PWD/outputs:/workspace/outputs \
#     -v hf-cache:/workspace/cache unsloth-recipes RECIPE
#   docker run --rm unsloth-recipes              # help and the recipe list
#
# Build arguments choose the CUDA base and, optionally, a torch build from another index
# (e.g. --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 for CUDA 12.8
# drivers); by default torch and its CUDA 13.0 libraries come from requirements/image.lock.

ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04

# ---- build: a virtual environment with the locked stack; pip and caches stay behind
FROM ${CUDA_IMAGE} AS build
ARG DEBIAN_FRONTEND=noninteractive
ARG TORCH_INDEX_URL=""
ARG TORCH_VERSION=2.11.0
ARG TORCHVISION_VERSION=0.26.0
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
    && rm -rf /var/lib/apt/lists/*
COPY requirements/image.lock /tmp/image.lock
# --no-deps: the lock already holds every dependency, resolved for Linux x86-64 + Python 3.12.
# studio/ is Unsloth's bundled web app (82 MB), which training never imports.
RUN python3.12 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps -r /tmp/image.lock \
    && if [ -n "${TORCH_INDEX_URL}" ]; then \
         /opt/venv/bin/pip install --no-cache-dir --no-deps --force-reinstall --index-url "${TORCH_INDEX_URL}" \
           "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"; \
       fi \
    && rm -rf /opt/venv/lib/python3.12/site-packages/studio \
    && /opt/venv/bin/pip uninstall -y pip \
    && find /opt/venv -name '*.pyc' -delete
COPY entrypoint /app/entrypoint
COPY recipes /app/recipes
COPY trainer /app/trainer
RUN /opt/venv/bin/python -m compileall -q /app /opt/venv/lib/python3.12/site-packages > /dev/null || true

# ---- runtime: the CUDA base, Python, tini, the venv and the app; nothing else
FROM ${CUDA_IMAGE}
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 1000 --user-group --no-create-home --home-dir /workspace/cache/home app \
    && mkdir -p /workspace/outputs /workspace/cache \
    && chown -R app:app /workspace
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app

# Every path the stack writes is under a declared volume, so the container also runs with a
# read-only root filesystem: outputs, caches (Hugging Face, Unsloth's compiled kernels and
# mega cache, Triton, TorchInductor, the home folder) and /tmp.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    OUTPUTS_DIR=/workspace/outputs \
    HOME=/workspace/cache/home \
    XDG_CACHE_HOME=/workspace/cache \
    HF_HOME=/workspace/cache/huggingface \
    TRITON_CACHE_DIR=/workspace/cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/workspace/cache/torchinductor \
    UNSLOTH_COMPILE_LOCATION=/workspace/cache/unsloth_compiled_cache \
    UNSLOTH_MEGA_CACHE_DIR=/workspace/cache/unsloth_mega_cache \
    MPLCONFIGDIR=/workspace/cache/matplotlib \
    TMPDIR=/tmp
VOLUME ["/workspace/outputs", "/workspace/cache", "/tmp"]
WORKDIR /workspace/outputs
USER 1000:1000
# tini is PID 1: it reaps orphans; the launcher forwards SIGTERM/SIGINT to the whole training group.
ENTRYPOINT ["tini", "--", "python", "-m", "entrypoint"]
CMD []
