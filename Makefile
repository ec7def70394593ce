# Two entry points for a fresh machine: `make run` (demo) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test clean

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

clean:
	rm -rf $(VENV) demo-out .prefect .pytest_cache
