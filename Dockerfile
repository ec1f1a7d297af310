# Unsloth fine-tuning recipes; the entrypoint picks and launches the multi-GPU strategy.
#
#   make image                                     # docker build -t unsloth-recipes . (see README)
#   docker run --rm unsloth-recipes                # help and the recipe list
#   docker run --rm --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 --read-only \
#     --user "$(id -u):$(id -g)" -e PARALLELISM=ddp -e NUM_GPUS=4 -v "$PWD/outputs:/workspace/outputs" \
#     -v hf-cache:/workspace/cache unsloth-recipes RECIPE
#
# torch and its CUDA 13.0 libraries come from requirements/image.lock: the host's driver must
# support CUDA 13 (R580 or newer). CUDA_IMAGE chooses the base (tests use a stand-in built from
# the Ubuntu archive where Docker Hub cannot be reached: .ci/docker-standin.sh).
# No `# syntax=` line: BuildKit would fetch that frontend from Docker Hub, and nothing here needs it.

ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04

# ---- llama.cpp for GGUF exports: the pinned source (requirements/llama_cpp.py: the llama.cpp the
# llama-cpp-python sdist on PyPI vendors, sha256-checked), compiled for any x86-64 CPU; the
# runtime stage keeps only its tools (llama-quantize; llama-perplexity and llama-completion, which
# check each GGUF export; llama-simple) and the converter, not the compiler.
FROM ${CUDA_IMAGE} AS llama-cpp
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get -o Acquire::Retries=5 update \
    && apt-get -o Acquire::Retries=5 install -y --no-install-recommends python3.12 cmake make g++ \
    && rm -rf /var/lib/apt/lists/*
COPY requirements/llama_cpp.py /tmp/llama_cpp.py
RUN python3.12 /tmp/llama_cpp.py /opt/llama.cpp

# ---- build: a virtual environment with the locked stack; pip and its cache stay behind
FROM ${CUDA_IMAGE} AS build
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get -o Acquire::Retries=5 update \
    && apt-get -o Acquire::Retries=5 install -y --no-install-recommends python3.12 python3.12-venv \
    && rm -rf /var/lib/apt/lists/*
COPY requirements/image.lock /tmp/image.lock
# --no-deps: the lock already holds every dependency, resolved for Linux x86-64 + Python 3.12.
# --require-hashes: pip refuses any file whose sha256 the lock does not hold (a substituted or
# corrupted wheel). unsloth and unsloth-zoo are in this lock too (requirements/unsloth.txt is the
# CPU development environment's).
# Network steps are retried: pip retries each request, and the whole install runs up to three
# times, reusing what the cache already holds (the cache is removed in the same step).
# Then out goes what training never loads (about 300 MB): Unsloth's bundled web app studio/ (82 MB,
# never imported); bitsandbytes' builds for CUDA 11.8-12.8, ROCm and XPU (119 MB: their runtimes
# are not in the image, so they could not even load; beside torch's CUDA 13.0 it loads
# libbitsandbytes_cuda130, cuda132 stays for BNB_CUDA_VERSION=132, cpu for CPU runs); static
# libraries, which only a linker reads (80 MB, mostly Triton's CUPTI); torch's protoc copies and
# pyarrow's tests; and pip.
RUN python3.12 -m venv /opt/venv \
    && for try in 1 2 3; do \
         /opt/venv/bin/pip install --disable-pip-version-check --retries 10 --timeout 60 \
           --cache-dir /tmp/pip-cache --no-deps --require-hashes -r /tmp/image.lock && break; \
         if [ "$try" = 3 ]; then exit 1; fi; \
         echo "pip install failed (try $try of 3); retrying" >&2; sleep $((try * 15)); \
       done \
    && rm -rf /tmp/pip-cache \
    && sp=/opt/venv/lib/python3.12/site-packages \
    && rm -rf "$sp/studio" "$sp/pyarrow/tests" "$sp"/torch/bin/protoc* \
    && rm -f "$sp"/bitsandbytes/libbitsandbytes_cuda1[12]*.so "$sp"/bitsandbytes/libbitsandbytes_rocm*.so \
       "$sp"/bitsandbytes/libbitsandbytes_xpu*.so \
    && find /opt/venv -name '*.a' -delete \
    && /opt/venv/bin/pip uninstall --disable-pip-version-check -y pip

# ---- runtime: the CUDA base, Python, a C compiler, tini, the venv and the app
FROM ${CUDA_IMAGE}
ARG CUDA_IMAGE
ARG DEBIAN_FRONTEND=noninteractive
LABEL org.opencontainers.image.title=unsloth-recipes \
      org.opencontainers.image.base.name=${CUDA_IMAGE}
# gcc, libc6-dev and Python.h (libpython3.12-dev): Triton compiles its CUDA launcher with cc
# against Python.h at the first GPU kernel; without them Unsloth's kernels and torch.compile
# fail with "Failed to find C compiler".
# dpkg leaves out the parts of them nothing here runs (about 125 MB): the LTO compiler and dumper
# (no -flto), the sanitizer runtimes (no -fsanitize) and the static libpython (Triton builds
# shared modules).
# Ubuntu 24.04 images ship the user `ubuntu` at UID/GID 1000: it makes way for `app`.
# The volumes' folders are writable by any user (mode 1777, like /tmp), so `--user` with any
# UID works; Docker copies that mode into new named and anonymous volumes.
RUN printf 'path-exclude=%s\n' '/usr/libexec/gcc/*/lto1' '/usr/bin/*lto-dump*' '/usr/lib/*/lib*san.so*' \
       '/usr/lib/gcc/*/lib*san*.a' '/usr/lib/python3.12/config-3.12-*/*.a' >/etc/dpkg/dpkg.cfg.d/unsloth-recipes \
    && apt-get -o Acquire::Retries=5 update \
    && apt-get -o Acquire::Retries=5 install -y --no-install-recommends \
       python3.12 libpython3.12-dev gcc libc6-dev tini \
    && rm -rf /var/lib/apt/lists/* \
    && if id -u 1000 >/dev/null 2>&1; then userdel --remove "$(id -nu 1000)"; fi \
    && if getent group 1000 >/dev/null; then groupdel "$(awk -F: '$3 == 1000 {print $1}' /etc/group)"; fi \
    && useradd --uid 1000 --user-group --no-create-home --home-dir /workspace/cache/home --shell /usr/sbin/nologin app \
    && install -d -o 1000 -g 1000 -m 1777 /workspace/outputs /workspace/cache
COPY --from=build /opt/venv /opt/venv
COPY --from=llama-cpp /opt/llama.cpp /opt/llama.cpp
COPY entrypoint /app/entrypoint
COPY recipes /app/recipes
COPY trainer /app/trainer
# Byte-compiled once here: at run time the root filesystem may be read-only.
RUN python3.12 -m compileall -q /app

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
    UNSLOTH_LLAMA_CPP_PATH=/opt/llama.cpp \
    TMPDIR=/tmp
VOLUME ["/workspace/outputs", "/workspace/cache", "/tmp"]
WORKDIR /workspace/outputs
USER 1000:1000
# tini is PID 1: it reaps orphans; the launcher forwards SIGTERM/SIGINT to the whole training group.
ENTRYPOINT ["tini", "--", "python", "-m", "entrypoint"]
CMD []
