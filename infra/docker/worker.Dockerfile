# The GPU inference worker: CUDA runtime, torch with CUDA, the pinned pipeline.
# docker build -f infra/docker/worker.Dockerfile -t inpaint-worker .
# Weights, either way (the revision is pinned and verified by `inpaint model fetch`). The image sets
# HF_HUB_OFFLINE=1, so a worker never downloads at start; the one fetch turns it off for itself:
#   baked in:  docker build --build-arg BAKE_WEIGHTS=1 ...   (needs network at build time; large image)
#   volume:    mount a Hugging Face cache at /models (compose: volume hf-cache; k8s: a PVC), and run
#              `inpaint model fetch` once into it, with network and HF_HUB_OFFLINE=0:
#              compose: docker compose run --rm --no-deps -e HF_HUB_OFFLINE=0 worker inpaint model fetch
#              docker:  docker run --rm -e HF_HUB_OFFLINE=0 -v CACHE:/models inpaint-worker inpaint model fetch
#              k8s:     the Job inpaint-model-fetch (infra/k8s/base/worker.yaml) sets HF_HUB_OFFLINE=0
# Build arguments, for hosts that cannot pull or reach PyPI (tests/test_compose.py builds a CPU image
# with them): BASE, APT_PACKAGES (what apt adds to it; empty: the base has them), PIP_NO_INDEX=1 with
# PIP_FIND_LINKS=URL (a wheelhouse instead of PyPI).
ARG BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE}
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS
ARG APT_PACKAGES="python3 python3-venv libgl1 libglib2.0-0"
ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN if [ -n "$APT_PACKAGES" ]; then apt-get update && apt-get install -y --no-install-recommends $APT_PACKAGES \
    && rm -rf /var/lib/apt/lists/*; fi && python3 -m venv /opt/venv
# The torch the suite runs on (Makefile, .ci/run: 2.13.0, its CPU build there). PyPI's Linux x86_64
# wheel of the same release is a CUDA build that carries its CUDA libraries; the host needs only a
# driver recent enough for them (python -c "import torch; print(torch.version.cuda)" says which).
ARG TORCH_SPEC="torch==2.13.0"
RUN pip install "$TORCH_SPEC"
WORKDIR /app
COPY pyproject.toml README.md ./
COPY api ./api
COPY shared ./shared
COPY workers ./workers
COPY stack ./stack
COPY client ./client
RUN pip install ./client ".[worker]" && useradd --uid 10001 --create-home inpaint && mkdir -p /models && chown 10001 /models
# Production unless told otherwise (the guard refuses toy models, test hooks, development credentials).
ENV INPAINT_ENVIRONMENT=production INPAINT_HF_CACHE_DIR=/models HF_HUB_OFFLINE=1 INPAINT_MODEL=sd2-inpainting \
    INPAINT_DEVICE=cuda INPAINT_METRICS_HOST=0.0.0.0 INPAINT_DATA_DIR=/tmp/inpaint
ARG BAKE_WEIGHTS=0
RUN if [ "$BAKE_WEIGHTS" = "1" ]; then HF_HUB_OFFLINE=0 inpaint model fetch && chown -R 10001 /models; fi
USER 10001
EXPOSE 9100
# Ready means the pipeline is loaded and warmed: the worker's metrics port answers only after that.
HEALTHCHECK --interval=15s --timeout=3s --start-period=600s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9100/metrics', timeout=2)" || exit 1
# One worker process per GPU; warm shutdown on SIGTERM lets the running batch finish.
STOPSIGNAL SIGTERM
CMD ["inpaint", "worker"]
