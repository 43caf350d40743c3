# skyferry developer commands. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_LOGGING_LEVEL ?= WARNING

.PHONY: setup demo test test-slow test-frameworks test-ray coverage bench chaos lint clean

$(STAMP): pyproject.toml constraints.txt tools/package.json
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[cloud,dask,tables,test]"
	cd tools && npm install --no-audit --no-fund --loglevel=error
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/skyferry demo

test: setup
	$(BIN)/ruff check .
	$(BIN)/mypy skyferry flows tasks blocks
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# The reader's front ends in their frameworks. PyPI's torch for Linux brings its CUDA
# libraries (about 3 GB) even on a machine without a GPU.
test-frameworks: setup
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[torch,hf,ray]"
	$(BIN)/python -m pytest -q -m frameworks

# Chunk tasks on a Ray cluster started as processes (`ray start --head`, `ray start`).
test-ray: setup
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[ray-runner]"
	$(BIN)/python -m pytest -q -m ray

# Line and branch coverage of skyferry/, flows/, tasks/ and blocks/ from the default suite
# (the code that runs in the test process; not the subprocesses it starts).
coverage: setup
	rm -rf .coverage-data && mkdir -p .coverage-data
	$(BIN)/python -m coverage run -m pytest -q
	$(BIN)/python -m coverage report --sort=cover | tail -n 30

bench: setup
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[torch]" \
		|| echo "torch could not be installed: reader_throughput_ratio_to_mosaic is not reported"
	command -v rclone >/dev/null || (apt-get update -qq && apt-get install -y -qq rclone) \
		|| echo "rclone could not be installed: rclone_ratio is not reported"
	test -x .venv-mosaic/bin/python || ($(PYTHON) -m venv .venv-mosaic \
		&& .venv-mosaic/bin/pip install --quiet mosaicml-streaming==0.13.0 pyarrow) \
		|| echo "MosaicML Streaming could not be installed: reader_throughput_ratio_to_mosaic is not reported"
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
		|| (apt-get update -qq && apt-get install -y -qq postgresql) \
		|| echo "PostgreSQL could not be installed: the scale figures run Prefect's server on SQLite"
	$(BIN)/python bench/bench.py

chaos: setup
	$(BIN)/python bench/chaos.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy skyferry flows tasks blocks
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV)
