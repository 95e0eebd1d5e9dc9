# Both entry points build .venv themselves from pinned files; nothing else is needed but python3 + pip.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
SDKIT := stable-diffusion-sdkit==2.1.5
PIP := $(PY) -m pip install --disable-pip-version-check --no-input -q

.PHONY: test bench bench-quick gpu-check mutants lint format lock clean venv test-webui-stack test-mac-stack

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

# deliberate breaks of the runtime (tests/mutants.py): fails unless the suite catches every one
mutants: $(STAMP)
	$(PY) tests/mutants.py

# the claims only a CUDA device can check (kernel memory, a real OOM, UNet + VAE, largest size within 4 GiB);
# without a CUDA device it says so in one line and exits 0
gpu-check: $(STAMP)
	$(PY) -m lib_memslice bench --gpu-check $(BENCH_ARGS)

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

# The webui's own stacks, each in its own venv with the same tests/ suite (no ruff): Python 3.10, gradio 3.41.2,
# pydantic 1.10, numpy 1.26 (requirements-webui-stack.txt, fully pinned, installed --no-deps: nothing resolves to
# anything newer), and the webui's torch pin: 2.1.2 (its default) or 2.3.1 (webui-macos-env.sh, Apple Silicon).
# PyTorch's CPU wheels (download.pytorch.org) are out of reach here, so both are PyPI's Linux builds: CUDA builds
# that run on the CPU; requirements-webui-stack.txt says which CUDA packages they need to import and why. torch 2.3.1
# links ncclCommRegister, which NCCL has since 2.19 (the 2.1.2 stack pins 2.18.1): its stack adds NCCL 2.20.5.
# pyenv's newest 3.10 if installed, else python3.10 on PATH; empty if neither
PYTHON310 ?= $(shell p=$$(ls -d "$$(pyenv root 2>/dev/null)"/versions/3.10.*/bin/python 2>/dev/null | sort -V | tail -n 1); \
	[ -n "$$p" ] || p=$$(command -v python3.10); echo "$$p")

# $(1) target, $(2) venv, $(3) torch version, $(4) extra pinned packages, $(5) label
define STACK
$(2)/.installed: requirements-webui-stack.txt Makefile
	@[ -n "$$(PYTHON310)" ] || echo "no Python 3.10 (pyenv or python3.10 on PATH): building $(2) with $$(PYTHON), which torch $(3) must have wheels for"
	$$(or $$(PYTHON310),$$(PYTHON)) -m venv $(2)
	$(2)/bin/python -m pip install --disable-pip-version-check --no-input -q --upgrade pip
	# torch first, pinned and without its requirements (triton and two unused CUDA packages stay out)
	$(2)/bin/python -m pip install --disable-pip-version-check --no-input -q --no-deps torch==$(3) $$(SDKIT)
	$(2)/bin/python -m pip install --disable-pip-version-check --no-input -q --no-deps -r requirements-webui-stack.txt
	$(if $(4),$(2)/bin/python -m pip install --disable-pip-version-check --no-input -q --no-deps $(4))
	$(2)/bin/python -c "import torch; assert torch.__version__.startswith('$(3)'), torch.__version__; torch.ones(2) @ torch.ones(2)"
	touch $(2)/.installed

$(1): $(2)/.installed
	@$(2)/bin/python -c "import sys, torch, gradio, pydantic, numpy; print('$(5): python', sys.version.split()[0], \
	'torch', torch.__version__, 'gradio', gradio.__version__, 'pydantic', pydantic.VERSION, 'numpy', numpy.__version__)"
	$(2)/bin/python -m pytest
endef

$(eval $(call STACK,test-webui-stack,.venv-webui,2.1.2,,webui stack))
$(eval $(call STACK,test-mac-stack,.venv-mac,2.3.1,nvidia-nccl-cu12==2.20.5,Apple pin stack))
