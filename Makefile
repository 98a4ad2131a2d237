# The README's two commands: `make demo` and `make test`. Each sets up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Torch is pinned here, not in pyproject.toml: users bring their own build.
TORCH  := torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[test,plot]'
	touch $(STAMP)

# The demo's own quality check: its exit status is make's (the pictures are drawn either way).
DEMO_RUN   := runs/quickstart_digits
DEMO_CHECK := $(BIN)/python -m scoretk.evaluation samples.h5 --tolerance 0.1 --require-pass

demo: setup
	$(BIN)/scoretk train recipes/quickstart_digits.yaml --restart
	$(BIN)/scoretk sample --run $(DEMO_RUN) --out samples.h5 --force
	$(DEMO_CHECK); status=$$?; \
	$(BIN)/python -m scoretk.evaluation.pictures $(DEMO_RUN) samples.h5; exit $$status

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs samples.h5
