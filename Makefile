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

# Until the API service lands (next issue) the appliance is its toolkit: set up a local
# configuration under ./var (SQLite and scratch there), check it, and show how to use the CLI.
run: venv
	@mkdir -p var
	@test -f var/imaging.yaml || printf '# local configuration written by make run\nstate_dir: .\nscratch:\n  quota: 20GiB\n' > var/imaging.yaml
	@IMAGING_CONFIG=var/imaging.yaml $(BIN)/imaging workflows list
	@IMAGING_CONFIG=var/imaging.yaml $(BIN)/imaging tasks recover
	@echo
	@echo "The toolkit is ready (state and scratch under ./var). Try:"
	@echo "  export IMAGING_CONFIG=$$PWD/var/imaging.yaml PATH=$$PWD/$(BIN):\$$PATH"
	@echo "  qemu-img create -f qcow2 /tmp/disk.qcow2 1G"
	@echo "  imaging inspect /tmp/disk.qcow2 --format qcow2"
	@echo "  imaging run convert-image -p source=/tmp/disk.qcow2 -p target=/tmp/disk.vmdk -p format=vmdk"
	@echo "  imaging tasks list"

test: venv
	$(BIN)/python -m pytest tests

lint: venv
	$(BIN)/ruff check appliance api tests bench
	$(BIN)/ruff format --check appliance api tests bench

bench: venv
	$(BIN)/python bench/convert.py

clean:
	rm -rf $(VENV) var build *.egg-info
