# Two entry points for a fresh machine: `make run` (demo) and `make test`; and one command per
# benchmark, `make bench-NAME` (docs/benchmarks.md).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCHES := train ingest encode e2e scaling index anomaly

.PHONY: install run test clean $(addprefix bench-,$(BENCHES))

# One pip command with the constraints file: every package pinned together (torch 2.13.0 CPU build,
# and boto3/botocore at the versions s3fs's aiobotocore accepts).
$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: install
	DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/ae demo

test: install
	$(BIN)/python -m pytest

# make bench-train (ingest, encode, e2e, scaling, index, anomaly): installs, then runs bench/NAME_bench.py
# with ARGS as its flags, e.g. make bench-train ARGS="--photos 1000"
$(addprefix bench-,$(BENCHES)): bench-%: install
	DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/python bench/$*_bench.py $(ARGS)

clean:
	rm -rf $(VENV) demo-out .prefect .pytest_cache
