# Two commands: `make run` (install what is missing, then `inpaint up`) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch as PyPI serves it (on Linux, with CUDA's libraries); TORCH_SPEC picks another build or version.
TORCH_SPEC ?= torch==2.13.0
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install system-deps browser-deps net-deps docker-deps run test lint bench-overhead bench-gpu bench-gpu-tiny gpu-wheels clean

system-deps:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server (apt)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq redis-server >/dev/null; }

# The multi-host tests (tests/test_hosts.py) build hosts from network namespaces with iproute2's `ip`;
# the README's quick start, which tests/test_quickstart.py runs as written, uses curl.
net-deps:
	@{ command -v ip && command -v curl; } >/dev/null 2>&1 || { \
	  echo "installing iproute2, curl (apt)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq iproute2 curl >/dev/null; }

# The compose test (tests/test_compose.py) builds the images and brings compose.yaml up: Debian's Docker
# engine and docker-compose 1.29, and debootstrap for a base image (no registry is reachable from CI).
docker-deps:
	@{ command -v dockerd && command -v docker-compose && command -v debootstrap; } >/dev/null 2>&1 || { \
	  echo "installing docker.io, docker-compose, debootstrap (apt)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	    docker.io docker-compose debootstrap >/dev/null; }

# The page's browser test drives Debian's chromium with Playwright (it never downloads a browser).
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing chromium (apt)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	    --no-install-recommends chromium fonts-dejavu-core >/dev/null; }

$(STAMP): pyproject.toml client/pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ./client
	$(PY) -m pip install -q -e ".[worker,local,dev]"
	@touch $(STAMP)

install: system-deps $(STAMP)

run: install
	$(VENV)/bin/inpaint up

# INPAINT_SKIP_COMPOSE=1 skips the compose test: then Docker is not installed for it either.
COMPOSE_DEPS := $(if $(filter 1,$(INPAINT_SKIP_COMPOSE)),,docker-deps)

test: install browser-deps net-deps $(COMPOSE_DEPS)
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check api workers shared stack client tests benchmarks
	$(VENV)/bin/mypy api workers shared client/inpaint_client

bench-overhead: install
	$(PY) benchmarks/overhead.py

bench-gpu: install
	$(PY) benchmarks/gpu_throughput.py

bench-gpu-tiny: install
	$(PY) benchmarks/gpu_throughput.py --tiny --out /tmp/gpu-tiny.json

# Wheels for the GPU machine (cp312, manylinux; it reaches no index): carried there as .gpu-wheels.
GPU_WHEELS := .gpu-wheels
GPU_WHEELS_MAX := 67108864
gpu-wheels:
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d $(GPU_WHEELS) -r benchmarks/gpu_wheels.txt
	@size=$$(du -sb $(GPU_WHEELS) | cut -f1); echo "$(GPU_WHEELS): $$size bytes"; \
		[ $$size -lt $(GPU_WHEELS_MAX) ] || { echo "over 64 MiB: too large to travel"; exit 1; }

clean:
	rm -rf $(VENV) .inpaint .pytest_cache
