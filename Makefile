# loraplex: `make serve` serves the demo, `make test` runs the tests (what CI runs).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The torch build for this host. Here (no GPU) pip takes the local CPU wheel of 2.13.0;
# on a CUDA host the same pin pulls the CUDA build from PyPI.
TORCH  ?= torch==2.13.0
HOST   ?= 127.0.0.1
PORT   ?= 50051
METRICS_PORT ?= 9400
HTTP_PORT ?= 8000

.PHONY: install tools serve test bench gpu-wheels proto clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	# lorax-client, which the LoRAX API's tests call: without its pins (certifi, and
	# huggingface-hub < 1, which transformers outgrew); it needs requests, aiohttp, pydantic
	$(PY) -m pip install --quiet --no-deps "lorax-client==0.6.3"
	touch $@

serve: install
	$(VENV)/bin/loraplex serve --model demo/assets/model --adapter-root demo/assets/adapters \
	  --host $(HOST) --port $(PORT) --metrics-port $(METRICS_PORT) --http-port $(HTTP_PORT)

test: install tools
	$(PY) -m pytest -q

# System tools the deploy/proxy tests use (they skip without them). Installed with
# apt-get when missing and we may (CI runs as root on Debian); otherwise just said.
tools:
	@command -v nginx >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && apt-get install -y -qq nginx >/dev/null; \
	  else echo "note: nginx not found; the proxy tests will be skipped"; fi; }

bench: install
	mkdir -p bench/results
	$(PY) -m bench.bench --out bench/results/latest.json

# What a lent GPU machine lacks (../shared/GPU.md), as wheels in .whl/ (git-ignored): run
# the device call with carry [".whl"]; bench/gpu_check.sh installs them there.
gpu-wheels:
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2

proto: install
	PYTHON=$(PY) bash clients/python/generate_protos.sh

clean:
	rm -rf $(VENV) build *.egg-info
