# Two commands: `make demo` and `make test`. Each creates .venv, installs the CPU build of torch first
# (pinned, so pip never pulls the multi-GB CUDA build on a CPU machine), then this package.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean install

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test,serve]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/minirlhf demo --config configs/rlhf.yaml

# Two workers, one test file each at a time, in collection order (conftest.py): the first learning file, whose
# worker builds the shared pretrain + SFT pipeline, then everything else on the other worker, then the second
# learning file on whichever worker is free. Every test runs on one thread (two threads per worker on two cores
# made the learning pipeline 2x slower), except the pipeline's SFT, which starts when the other worker is idle.
test: $(STAMP)
	$(VENV)/bin/ruff check minirlhf tests bench
	$(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder tests

bench: $(STAMP)
	$(PY) bench/generate.py

clean:
	rm -rf runs .pytest_cache
