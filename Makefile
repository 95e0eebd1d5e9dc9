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

# The webui's own stack (Python 3.10, torch 2.1.2, gradio 3.41.2, pydantic 1.10, numpy 1.26): the same tests/ suite,
# no ruff, in a second venv. requirements-webui-stack.txt says which CUDA packages PyPI's torch 2.1.2 needs and why.
WEBUI_VENV := .venv-webui
WEBUI_PY := $(WEBUI_VENV)/bin/python
WEBUI_STAMP := $(WEBUI_VENV)/.installed
WEBUI_TORCH := torch==2.1.2
WEBUI_PIP := $(WEBUI_PY) -m pip install --disable-pip-version-check --no-input -q
# pyenv's newest 3.10 if installed, else python3.10 on PATH; empty if neither
PYTHON310 ?= $(shell p=$$(ls -d "$$(pyenv root 2>/dev/null)"/versions/3.10.*/bin/python 2>/dev/null | sort -V | tail -n 1); \
	[ -n "$$p" ] || p=$$(command -v python3.10); echo "$$p")

$(WEBUI_STAMP): requirements-webui-stack.txt Makefile
	@[ -n "$(PYTHON310)" ] || echo "no Python 3.10 (pyenv or python3.10 on PATH): building $(WEBUI_VENV) with $(PYTHON), which torch 2.1.2 must have wheels for (3.8-3.11)"
	$(or $(PYTHON310),$(PYTHON)) -m venv $(WEBUI_VENV)
	$(WEBUI_PIP) --upgrade pip
	# torch first, pinned and without its requirements (triton and two unused CUDA packages stay out)
	$(WEBUI_PIP) --no-deps $(WEBUI_TORCH)
	$(WEBUI_PIP) --no-deps $(SDKIT)
	# fully pinned, so --no-deps: nothing resolves to anything newer than the webui's stack
	$(WEBUI_PIP) --no-deps -r requirements-webui-stack.txt
	$(WEBUI_PY) -c "import torch; assert torch.__version__.startswith('2.1.2'), torch.__version__; torch.ones(2) @ torch.ones(2)"
	touch $(WEBUI_STAMP)

test-webui-stack: $(WEBUI_STAMP)
	@$(WEBUI_PY) -c "import sys, torch, gradio, pydantic, numpy; print('webui stack: python', sys.version.split()[0], \
	'torch', torch.__version__, 'gradio', gradio.__version__, 'pydantic', pydantic.VERSION, 'numpy', numpy.__version__)"
	$(WEBUI_PY) -m pytest

# The webui's Apple Silicon stack (webui-macos-env.sh pins torch 2.3.1; Python 3.10, gradio 3.41.2, pydantic 1.10):
# the same suite on torch 2.3.1 in .venv-mac. PyTorch's CPU wheels (download.pytorch.org) are out of reach here, so
# it is PyPI's Linux build of 2.3.1, a CUDA build that runs on the CPU: the webui stack's pins, plus the NCCL that
# 2.3.1 links against (ncclCommRegister appeared in 2.19; the 2.1.2 stack pins 2.18.1).
MAC_VENV := .venv-mac
MAC_PY := $(MAC_VENV)/bin/python
MAC_STAMP := $(MAC_VENV)/.installed
MAC_TORCH := torch==2.3.1
MAC_PIP := $(MAC_PY) -m pip install --disable-pip-version-check --no-input -q

$(MAC_STAMP): requirements-webui-stack.txt Makefile
	@[ -n "$(PYTHON310)" ] || echo "no Python 3.10 (pyenv or python3.10 on PATH): building $(MAC_VENV) with $(PYTHON)"
	$(or $(PYTHON310),$(PYTHON)) -m venv $(MAC_VENV)
	$(MAC_PIP) --upgrade pip
	$(MAC_PIP) --no-deps $(MAC_TORCH)
	$(MAC_PIP) --no-deps $(SDKIT)
	$(MAC_PIP) --no-deps -r requirements-webui-stack.txt
	$(MAC_PIP) --no-deps nvidia-nccl-cu12==2.20.5
	$(MAC_PY) -c "import torch; assert torch.__version__.startswith('2.3.1'), torch.__version__; torch.ones(2) @ torch.ones(2)"
	touch $(MAC_STAMP)

test-mac-stack: $(MAC_STAMP)
	@$(MAC_PY) -c "import sys, torch, gradio, pydantic; print('Apple pin stack: python', sys.version.split()[0], \
	'torch', torch.__version__, 'gradio', gradio.__version__, 'pydantic', pydantic.VERSION)"
	$(MAC_PY) -m pytest
