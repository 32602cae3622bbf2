# Quick start: `make demo` runs the main job, `make test` runs the test suite.
# Both create .venv and install specserve into it first.
#
# TORCH_SPEC picks the torch build installed before specserve. The default pins the CPU build
# available on CPU-only machines here; on a GPU machine use `make install TORCH_SPEC=torch`
# (or `pip install -e .`, which lets pip choose the CUDA build).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install demo test bench report train-demo

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

demo: install
	$(BIN)/specserve demo

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/specserve bench

# every benchmark the report draws on (about 1.5 hours here), then runs/report/REPORT.md
report: install
	$(BIN)/specserve bench --serving --concurrency 1,4,16,32 --prompts 8 --max-tokens 64 --rounds 2
	$(BIN)/specserve bench --distill
	$(BIN)/specserve bench --faults
	$(BIN)/specserve bench --overload
	SPECSERVE_FUZZ_EXAMPLES=10000 $(BIN)/python -m pytest -q -s tests/cluster/test_hardening.py -k fuzzed
	$(BIN)/specserve report

train-demo: install
	$(BIN)/specserve train-demo --out actors/demo/weights
