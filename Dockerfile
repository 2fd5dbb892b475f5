# Needs BuildKit (default since Docker 23; `docker compose build` uses it).
#
# Targets (docker build --target NAME .):
#   trainer   torch==2.13.0 (CPU) + .[train]: `ctr train` / `ctr export`, and the compose
#             one-shot `init` job (deploy/docker/init.sh).
#   gpu       serving image on an NVIDIA CUDA 12 + cuDNN 9 base with onnxruntime-gpu (and
#             onnx, which CTR_PRECISION=fp16 uses to convert the graph at load time).
#   runtime   (default, last) torch-free serving image: onnxruntime (CPU), `ctr serve`,
#             and the prebuilt custom-op library (native/: fused attention unit, AUGRU)
#             in /opt/ctr-ops, CTR_OPS_LIBRARY=/opt/ctr-ops. The `ops-build` stage compiles
#             it once per x86-64 level (x86-64-v4, -v3, -v2; `generic`, no -march flag, on
#             another machine type) with `ctr build-ops --arch ... --out`; at model load
#             the service loads the highest level the CPU it runs on has the flags for
#             (/proc/cpuinfo), self-tested in a child process first, and falls back level
#             by level. No compiler in the image. The gpu target carries no library
#             (its CUDA kernel needs nvcc): it serves DIN and DIEN from model.onnx, the
#             reason in /v1/models' graph_note.
#
# Build args:
#   BASE_IMAGE       Python 3.11+ base for trainer/runtime (default: the official image).
#   CUDA_BASE        base for the gpu target (Ubuntu 24.04: its python3 is 3.12).
#   ORT_GPU_SPEC     onnxruntime-gpu requirement; 1.26 is the last release on PyPI built
#                    for CUDA 12 (1.27+ need CUDA 13: change CUDA_BASE with it).
#   TORCH_INDEX_URL  where torch==2.13.0 comes from (default: PyTorch's CPU wheel index;
#                    empty = the configured pip index).
#   PIP_CERT         optional CA bundle for pip; see certs/README.md. certs/ca.pem in the
#                    build context, or `--secret id=pip_cert,src=...`, also work.

ARG BASE_IMAGE=python:3.11-slim-bookworm
ARG CUDA_BASE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------- common python base
FROM ${BASE_IMAGE} AS python-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=120 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
COPY deploy/docker/pip-install /usr/local/bin/pip-install
RUN chmod 0755 /usr/local/bin/pip-install && python3 -m venv /opt/venv
WORKDIR /src

# ---------------------------------------------------------------- trainer (one-shot jobs)
FROM python-base AS trainer
ARG PIP_CERT=""
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,source=certs,target=/run/certs \
    --mount=type=secret,id=pip_cert \
    pip-install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.13.0
COPY pyproject.toml constraints.txt deploy/docker/requirements.py ./
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,source=certs,target=/run/certs \
    --mount=type=secret,id=pip_cert \
    python3 requirements.py pyproject.toml --extra train > /tmp/requirements.txt \
    && pip-install -c constraints.txt -r /tmp/requirements.txt
COPY ctr ./ctr
COPY training ./training
COPY service ./service
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,source=certs,target=/run/certs \
    --mount=type=secret,id=pip_cert \
    pip-install --no-deps . && rm -rf build ./*.egg-info
RUN groupadd --system --gid 10001 ctr \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --shell /usr/sbin/nologin ctr \
    && mkdir -p /app /models \
    && chown ctr:ctr /app /models
COPY deploy/docker/init.sh /usr/local/bin/ctr-init
COPY configs /app/configs
WORKDIR /app
ENV HOME=/app CTR_MODELS_DIR=/models
USER 10001:10001
CMD ["ctr-init"]

# ---------------------------------------------------------------- gpu (CUDA serving)
FROM ${CUDA_BASE} AS gpu-build
ARG PIP_CERT=""
ARG ORT_GPU_SPEC="onnxruntime-gpu==1.26.0"
ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=120 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY deploy/docker/pip-install /usr/local/bin/pip-install
RUN chmod 0755 /usr/local/bin/pip-install && python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml constraints.txt deploy/docker/requirements.py ./
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,source=certs,target=/run/certs \
    --mount=type=secret,id=pip_cert \
    python3 requirements.py pyproject.toml --exclude onnxruntime > /tmp/requirements.txt \
    && pip-install "$ORT_GPU_SPEC" "onnx>=1.16" -c constraints.txt -r /tmp/requirements.txt
COPY ctr ./ctr
COPY training ./training
COPY service ./service
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,source=certs,target=/run/certs \
    --mount=type=secret,id=pip_cert \
    pip-install --no-deps . \
    && python3 -c "import onnxruntime as ort; print('onnxruntime', ort.__version__)"

FROM ${CUDA_BASE} AS gpu
ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    HOME=/app CTR_HOST=0.0.0.0 CTR_PORT=8000 CTR_MODELS_DIR=/models CTR_PROVIDER=cuda
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 ctr \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --shell /usr/sbin/nologin ctr \
    && mkdir -p /app /models \
    && chown ctr:ctr /app /models
COPY --from=gpu-build /opt/venv /opt/venv
COPY configs /app/configs
WORKDIR /app
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CTR_PORT', '8000'), timeout=4)"]
CMD ["ctr", "serve"]

# ---------------------------------------------------------------- custom-op library
# Built here, copied into the runtime image: one library per CPU level, so an image built
# on one machine runs on others (-march=native would use the build machine's own
# instructions). Only the standard library and g++ are needed (no onnxruntime, no pip).
FROM python-base AS ops-build
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
COPY native ./native
COPY ctr/__init__.py ctr/cli.py ctr/cli_args.py ctr/native.py ./ctr/
RUN levels=generic \
    && if [ "$(uname -m)" = x86_64 ]; then levels=x86-64-v4,x86-64-v3,x86-64-v2; fi \
    && CTR_OPS_CACHE=/tmp/ctr-ops-cache python3 -m ctr.cli build-ops --cuda no \
        --arch "$levels" --out /opt/ctr-ops \
    && rm -rf /tmp/ctr-ops-cache

# ---------------------------------------------------------------- runtime (CPU serving)
FROM python-base AS runtime-build
ARG PIP_CERT=""
COPY pyproject.toml constraints.txt deploy/docker/requirements.py ./
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,source=certs,target=/run/certs \
    --mount=type=secret,id=pip_cert \
    python3 requirements.py pyproject.toml > /tmp/requirements.txt \
    && pip-install -c constraints.txt -r /tmp/requirements.txt
COPY ctr ./ctr
COPY training ./training
COPY service ./service
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=bind,source=certs,target=/run/certs \
    --mount=type=secret,id=pip_cert \
    pip-install --no-deps . \
    && python3 -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)"

FROM ${BASE_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    HOME=/app CTR_HOST=0.0.0.0 CTR_PORT=8000 CTR_MODELS_DIR=/models \
    CTR_OPS_LIBRARY=/opt/ctr-ops
RUN groupadd --system --gid 10001 ctr \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --shell /usr/sbin/nologin ctr \
    && mkdir -p /app /models \
    && chown ctr:ctr /app /models
COPY --from=runtime-build /opt/venv /opt/venv
COPY --from=ops-build /opt/ctr-ops /opt/ctr-ops
COPY configs /app/configs
WORKDIR /app
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CTR_PORT', '8000'), timeout=4)"]
CMD ["ctr", "serve"]
