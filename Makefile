# Imaging Appliance — developer entry points. See README.md.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Debian packages the toolkit and its tests need at run time.
SYSTEM_PACKAGES := qemu-utils python3-venv util-linux zstd xz-utils bzip2 gzip
STAMP := $(VENV)/.installed

.PHONY: help system-deps venv run test lint bench clean

help:
	@echo "make run    - start the appliance locally on embedded defaults (state under ./var)"
	@echo "make test   - install what is needed (system packages too, as root) and run every test"
	@echo "make lint   - ruff"
	@echo "make bench  - benchmarks (ratios against bare qemu-img)"

# Installs missing Debian packages when run as root; otherwise prints the exact command and fails.
system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing system packages:$$missing"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else \
	    echo "missing system packages:$$missing"; \
	    echo "run: sudo apt-get install -y$$missing"; exit 1; \
	  fi; \
	fi

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $(STAMP)

venv: system-deps $(STAMP)

# The appliance on this machine, on embedded defaults: SQLite, scratch and volumes under ./var.
# The first run writes var/imaging.yaml with generated API credentials (S3_ENDPOINT=URL also trusts
# a local S3 server as the source of uploads). The worker runs in the background, the API in the
# foreground; Ctrl-C stops both.
CONFIG := var/imaging.yaml
run: venv
	@mkdir -p var
	@test -f $(CONFIG) || $(BIN)/imaging config init $(CONFIG) $(if $(S3_ENDPOINT),--s3-endpoint $(S3_ENDPOINT))
	@echo "Imaging Appliance: EC2 import API and admin API"
	@$(BIN)/imaging -c $(CONFIG) config show --credentials
	@echo "Point AWS clients at it:  eval \"\$$($(BIN)/imaging -c $(CONFIG) config show --env)\""
	@echo "Then e.g.:                $(BIN)/aws ec2 describe-conversion-tasks --endpoint-url \$$IMAGING_ENDPOINT"
	@$(BIN)/imaging -c $(CONFIG) worker & worker=$$!; \
	  trap 'kill $$worker 2>/dev/null; wait $$worker' EXIT INT TERM; \
	  $(BIN)/imaging -c $(CONFIG) serve

test: venv
	$(BIN)/python -m pytest tests

lint: venv
	$(BIN)/ruff check appliance api tests bench
	$(BIN)/ruff format --check appliance api tests bench

bench: venv
	$(BIN)/python bench/convert.py

clean:
	rm -rf $(VENV) var build *.egg-info
