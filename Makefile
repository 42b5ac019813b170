# `make run` and `make test` do all set-up on a fresh machine: they create .venv,
# install the pinned CPU build of torch when no torch is present (a bare range would
# pull a multi-GB CUDA build), then install metassl in editable mode.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# Where the CPU build of torch comes from when no torch is installed. Empty: pip's own
# configuration (a local wheel or an index it is set up with). Elsewhere use
# TORCH_INDEX=https://download.pytorch.org/whl/cpu so that pip does not pick the CUDA build.
TORCH_INDEX ?=
STAMP := $(VENV)/.installed

.PHONY: run test install clean

$(PY):
	@$(PYTHON) -m venv $(VENV)

# pip's output goes to $(VENV)/install.log (its last lines are shown when it fails)
$(STAMP): pyproject.toml | $(PY)
	@echo "installing metassl and its dependencies into $(VENV) (log: $(VENV)/install.log)"
	@( $(PY) -m pip install --upgrade pip && \
	  { $(PY) -c "import torch" 2>/dev/null || \
	    $(PY) -m pip install "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); } && \
	  $(PY) -m pip install -e ".[dev]" ) > $(VENV)/install.log 2>&1 || \
	  { tail -n 30 $(VENV)/install.log; echo "installation failed: see $(VENV)/install.log"; exit 1; }
	@touch $(STAMP)

install: $(STAMP)

# Self-supervised meta-learning on the Omniglot shipped in the package (offline), then the
# untrained and the trained network side by side on the test characters. Re-running
# resumes (and re-reports) the same run; `make clean` starts afresh.
run: $(STAMP)
	$(VENV)/bin/metassl train experiments/quickstart.yaml --run-dir runs/quickstart --workers 1

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs .pytest_cache
