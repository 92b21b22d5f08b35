# Two entry points, each doing its own set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

MLVENV ?= .venv-monailabel

.PHONY: setup demo test test-monailabel clean

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) -m bundles demo

test: setup
	$(PY) -m pytest

# a real MONAI Label 0.8.5 server with the BTCV bundle, in its own environment (numpy < 2); minutes
test-monailabel: setup
	$(PY) ci/monailabel_check.py --venv $(MLVENV) --base-python $(PYTHON)

clean:
	rm -rf demo_work .pytest_cache
