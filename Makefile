# Two entry points do all set-up on a fresh machine:
#   make run   -> creates .venv if missing, installs, runs `gearshift pipeline run` (the embedded
#                 four-stage default: pretrain -> sft -> rl -> qat)
#   make test  -> creates .venv if missing, installs, runs the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch. Installed only when the environment has no torch at all, so a user
# who already has torch (any build) keeps theirs: `make TORCH_SPEC=... install` to choose.
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: run test install bench lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[dev]"
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/gearshift pipeline run

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) bench/overhead.py

lint: install
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf $(VENV) runs pipelines .pytest_cache
