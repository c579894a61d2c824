# `make test` and `make demo` set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bnfx-installed

.PHONY: test demo bench clean

$(STAMP): pyproject.toml setup.py Makefile $(wildcard bnfx/ops/csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	# --no-build-isolation: the C++ kernels build against the torch installed above
	$(PY) -m pip install --quiet --no-build-isolation -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(VENV)/bin/bnfx demo

bench: $(STAMP)
	$(PY) benchmarks/ghost_bn.py

clean:
	rm -rf $(VENV) *.egg-info
