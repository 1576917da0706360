# The API and the webhooks worker: no torch, no model, a slim image.
# docker build -f infra/docker/api.Dockerfile -t inpaint-api .
# Build arguments, for hosts that cannot pull or reach PyPI (tests/test_compose.py uses them):
#   BASE            another base with python3 and its venv module (default: python:3.12-slim)
#   PIP_NO_INDEX=1 + PIP_FIND_LINKS=URL   install from a wheelhouse instead of PyPI
ARG BASE=python:3.12-slim
FROM ${BASE}
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv
WORKDIR /app
COPY pyproject.toml README.md ./
COPY api ./api
COPY shared ./shared
COPY workers ./workers
COPY stack ./stack
COPY client ./client
RUN pip install ./client . && useradd --uid 10001 --create-home inpaint
USER 10001
# Production unless told otherwise: the guard then refuses development credentials, open auth, test hooks
# and private outbound addresses at start (`inpaint up`, on a laptop, stays development).
ENV INPAINT_ENVIRONMENT=production INPAINT_API_HOST=0.0.0.0 INPAINT_METRICS_HOST=0.0.0.0 INPAINT_DATA_DIR=/tmp/inpaint
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)" || exit 1
CMD ["inpaint", "api"]
