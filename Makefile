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
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/metassl train experiments/digits_protonet.yaml --run-dir runs/digits_protonet --workers 2

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs .pytest_cache
