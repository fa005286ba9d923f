# Every target sets itself up: a fresh clone needs only `make run` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/default.yaml
E2E ?= tests/e2e
DEFAULT_TORCH_SPEC := torch==2.13.0
TORCH_SPEC ?= $(DEFAULT_TORCH_SPEC)
# The install depends on TORCH_SPEC too: one stamp per spec, so another spec reinstalls.
TORCH_STAMP := $(VENV)/.torch-$(shell printf '%s' '$(TORCH_SPEC)' | cksum | cut -d' ' -f1)
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install run test test-unit test-slow test-e2e lint format clean

$(VENV)/.installed: pyproject.toml $(TORCH_STAMP)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: on CPU machines this is the CPU build; unpinned it can pull a CUDA build.
	# Another spec than the venv's replaces torch: pip takes an installed 2.13.0+cpu for a CUDA index's 2.13.0.
	if [ "$$(cat $(VENV)/.torch-spec 2>/dev/null || echo '$(DEFAULT_TORCH_SPEC)')" != '$(TORCH_SPEC)' ]; then \
	  $(PY) -m pip uninstall -y -q torch; fi
	$(PY) -m pip install -q $(TORCH_SPEC)
	printf '%s\n' '$(TORCH_SPEC)' > $(VENV)/.torch-spec
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# A venv from before the per-spec stamp was built with the default spec: no reinstall for it.
$(TORCH_STAMP):
	mkdir -p $(VENV)
	rm -f $(VENV)/.torch-[0-9]*
	if [ -f $(VENV)/.installed ] && [ ! -f $(VENV)/.torch-spec ] && [ '$(TORCH_SPEC)' = '$(DEFAULT_TORCH_SPEC)' ]; then \
	  printf '%s\n' '$(TORCH_SPEC)' > $(VENV)/.torch-spec; touch -r $(VENV)/.installed $@; else touch $@; fi

install: $(VENV)/.installed

run: install
	$(VENV)/bin/forgeline run --config $(CONFIG)

# The default suite: unit + integration without the tests marked slow (about 10 minutes on 2 cores).
test: install
	$(PY) -m pytest -q --durations=15 -m "not slow" tests/unit tests/integration

test-unit: install
	$(PY) -m pytest -q tests/unit

# The slow unit and integration tests (long fault scenarios, benchmark smoke runs, multi-run tuning, an
# mlflow server stopped mid-run); CI runs them in its end-to-end stage. Exit 5 (none collected) is fine.
test-slow: install
	$(PY) -m pytest -q --durations=15 -m slow tests/unit tests/integration || [ $$? -eq 5 ]

# Real prefect server, mlflow server and workers on loopback (forgeline up/deploy/run --deployed/ingest/down).
test-e2e: install
	$(PY) -m pytest -q --durations=10 $(E2E)

lint: install
	$(VENV)/bin/ruff check forgeline flows tasks tests bench
	$(VENV)/bin/ruff format --check forgeline flows tasks tests bench
	$(PY) -m tests.architecture  # import-linter contracts (pyproject.toml) and no import circles

format: install
	$(VENV)/bin/ruff format forgeline flows tasks tests bench
	$(VENV)/bin/ruff check --fix forgeline flows tasks tests bench

clean:
	rm -rf .forgeline mlruns/mlflow.db mlruns/artifacts mlruns/cache mlruns/checkpoints
