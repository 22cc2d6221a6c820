# Two commands for a newcomer (see README):
#   make lab    create .venv, install minillama4 with the course and test extras, open JupyterLab on notebooks/
#   make test   create .venv, install everything the tests need, run the whole test suite
#
# torch: if the Python that creates the venv already has torch (say, a CUDA build), the venv
# reuses it through --system-site-packages and nothing reinstalls it. Otherwise TORCH_SPEC is
# installed first: torch==2.13.0, which pip takes from a local wheel where one is configured
# (the course's CPU machines) and from PyPI elsewhere. For a CPU-only wheel on a laptop:
#   make lab TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

CHROMIUM ?= /usr/bin/chromium

.PHONY: lab test install notebooks browser-deps clean-venv

$(PY):
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
	  echo "torch found in $(PYTHON): the venv will reuse it"; \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	  $(PYTHON) -m venv $(VENV); \
	fi

$(STAMP): $(PY) pyproject.toml
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PIP) install -e ".[notebooks,dev]"
	@touch $(STAMP)

install: $(STAMP)

# LAB_ARGS: extra JupyterLab options (e.g. LAB_ARGS="--no-browser --port 8890"); as root (containers)
# JupyterLab refuses to start without --allow-root, so it is added there.
LAB_ARGS ?=
lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

# The browser tests drive Debian's Chromium; install it when we can (root with apt), else they skip.
browser-deps:
	@if [ ! -x $(CHROMIUM) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing chromium for the browser tests"; apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else echo "note: $(CHROMIUM) not found: the browser tests will be skipped (apt-get install chromium)"; fi; \
	fi

test: $(STAMP) browser-deps
	$(PY) -m pytest tests
	@if ls notebooks/*.ipynb >/dev/null 2>&1; then \
	  $(PY) -m pytest --nbval-lax --nbval-current-env --nbval-cell-timeout=180 -p no:cacheprovider notebooks/; \
	else echo "no notebooks yet: nbval skipped"; fi

# Re-execute the notebooks in place (outputs and execution counts kept, widget state stripped).
notebooks: $(STAMP)
	$(PY) scripts/run_notebooks.py

clean-venv:
	rm -rf $(VENV)
