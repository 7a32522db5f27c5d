# `make demo` and `make test` work on a fresh clone: both depend on `setup`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU_VERSION ?= 2.13.0

.PHONY: setup demo test lint gpu-data gpu-train clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Install torch only when it is missing, so a CUDA build already present is kept.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_CPU_VERSION)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(VENV)/bin/mbmamba deblur examples/ out/ --variant s --tile auto

lint: setup
	$(VENV)/bin/ruff check mbmamba_cli tests scripts

test: lint
	$(VENV)/bin/python -m pytest -q tests

clean:
	rm -rf $(VENV) out build *.egg-info

# Fill the git-ignored gpu_data/ (sharp crops, kernels, real pairs) and gpu_wheels/ from ../shared/data
# and PyPI, for a GPU machine without network; pass both folders in the device tool's `carry`.
gpu-data: setup
	$(PY) scripts/make_gpu_data.py

# Run on the GPU machine from the repository root: fine-tune for GPU_TRAIN_MINUTES (default 6) and
# write weights, metrics.csv and train.log to $$OUT. Needs no virtualenv there, so no `setup`.
gpu-train:
	bash scripts/gpu_train.sh
