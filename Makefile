# Both entry points build .venv themselves from pinned files; nothing else is needed but python3 + pip.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
SDKIT := stable-diffusion-sdkit==2.1.5
PIP := $(PY) -m pip install --disable-pip-version-check --no-input -q

.PHONY: test bench bench-quick lint format lock clean venv

venv: $(STAMP)

$(STAMP): requirements.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	# torch first and pinned: an unpinned torch would pull gigabytes of CUDA packages
	$(PIP) $(TORCH)
	# the real ldm package, without its training stack; requirements.txt adds what ldm.modules needs
	$(PIP) --no-deps $(SDKIT)
	$(PIP) -r requirements.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m lib_memslice bench $(BENCH_ARGS)

bench-quick: $(STAMP)
	$(PY) -m lib_memslice bench --quick $(BENCH_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

lock: $(STAMP)
	$(PIP) -r requirements.in
	{ echo "# Generated from requirements.in with pip freeze (python 3.11, torch 2.13.0 CPU). Regenerate: make lock"; \
	  $(PY) -m pip freeze | grep -viE '^(torch|stable-diffusion-sdkit)=='; } > requirements.txt

clean:
	rm -rf $(VENV) bench-out .pytest_cache .ruff_cache .hypothesis
