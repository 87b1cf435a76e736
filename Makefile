# Two commands set up a fresh machine: `make run` (the demo on the tiny profile) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

install: $(STAMP)

## The demo catalog on the tiny profile (generate -> caption): built in code, no network needed.
run: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/catalogen run catalogs/demo_prompts.parquet --config configs/dataset.yaml --profile tiny --out outputs/demo

## The whole test suite, offline, on the CPU: two pytest-xdist workers, a test file per worker at a
## time (its module fixtures, such as a local S3 server or a baseline run, are made once).
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n 2 --dist loadfile

## Every benchmark (prints figures side by side; not tests).
bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/overhead.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/threads.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/scale.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/scaleout.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/enhance.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/caption.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/score.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/product.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/select_gates.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/export.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/duplicates.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/renditions.py

clean:
	rm -rf $(VENV) outputs/*/
