# make demo: set up .venv and run the main job (synthetic identities, 2 CPU ranks under DeepSpeed).
# make test: set up .venv and run the whole test suite.
# make gpu-check: on a CUDA machine, the gpu tests + GPU benchmarks + a short training run (benchmarks/README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.constraints.sha256
CONSTRAINTS := requirements/constraints.txt
RANKS ?= 2
SAMPLE_RATE ?= 0.1
MODE ?= pfc
DEMO_DIR ?= runs/demo

GPU_PYTHON ?= $(if $(wildcard $(VENV)/bin/python),$(VENV)/bin/python,$(PYTHON))
GPU_CHECK_DIR ?= runs/gpu_check

.PHONY: venv demo test lint clean gpu-check

# The venv is rebuilt only when the pins change (the stamp holds the constraints' checksum).
venv:
	@want=$$(sha256sum $(CONSTRAINTS) setup.cfg | sha256sum | cut -d' ' -f1); \
	if [ ! -f $(STAMP) ] || [ "$$(cat $(STAMP))" != "$$want" ]; then \
		echo "[setup] creating $(VENV) from $(CONSTRAINTS)"; \
		rm -rf $(VENV) && $(PYTHON) -m venv $(VENV) && \
		$(VENV)/bin/pip install -q --upgrade pip && \
		$(VENV)/bin/pip install -q -c $(CONSTRAINTS) -e '.[dali,dev]' && \
		echo "$$want" > $(STAMP); \
	else echo "[setup] $(VENV) is up to date"; fi

demo: venv
	$(VENV)/bin/python -m facescale.demo --ranks $(RANKS) --sample-rate $(SAMPLE_RATE) --mode $(MODE) --out $(DEMO_DIR)

test: venv
	$(VENV)/bin/ruff check facescale launcher tests benchmarks
	$(VENV)/bin/python -m pytest -q -ra $(PYTEST_ARGS)

# no venv step: the GPU machine brings its own torch (see benchmarks/README.md, "GPU check")
gpu-check:
	PYTHONPATH=.$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PYTHON) benchmarks/gpu_check.py --out $(GPU_CHECK_DIR)

lint: venv
	$(VENV)/bin/ruff check facescale launcher tests benchmarks

clean:
	rm -rf $(VENV) runs/demo data/synthetic
