# The two commands that matter: `make demo` (main job on the default model) and `make test`.
# Everything installs into .venv. torch is installed first and only if the venv lacks it:
# TORCH_SPEC pins the build this machine serves from local disk (a CPU wheel); a GPU user
# who pre-installs their CUDA torch in .venv, or runs `make TORCH_SPEC=torch`, keeps theirs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
DEMO_ARGS ?=

.PHONY: install demo test clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/skipgpt demo $(DEMO_ARGS)

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs .pytest_cache
