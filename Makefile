# Imaging Appliance — developer entry points. See README.md.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Debian packages the toolkit and its tests need at run time.
SYSTEM_PACKAGES := qemu-utils python3-venv util-linux zstd xz-utils bzip2 gzip
# ... and what build.sh (diskimage-builder) and the image tests (boot under qemu, NoCloud seed, SSH) need.
SYSTEM_PACKAGES += qemu-system-x86 debootstrap kpartx squashfs-tools dosfstools gdisk fdisk parted \
  e2fsprogs xfsprogs procps sudo mount cloud-image-utils genisoimage openssh-client git file \
  ca-certificates
# ... and what guest validation, guest mounts and their tests use (filesystems the tests build and read).
SYSTEM_PACKAGES += btrfs-progs ntfs-3g mtools libhivex-bin
# ... and the PostgreSQL server the store, workflow, worker and API tests also run against (a throwaway
# cluster the tests start themselves: tests/postgres.py); the appliance itself only needs a client (psycopg).
SYSTEM_PACKAGES += postgresql
# ... and the independent readers the export tests read every exported VHD and VMDK back with (libyal's
# libvhdi and libvmdk, bindings for the system Python 3: tests/diskreaders.py runs them from /usr/bin/python3).
SYSTEM_PACKAGES += python3-libvhdi python3-libvmdk
# ... and Info-ZIP's zip, which the archive tests pack a disk with as a user would (a zip given as a disk).
SYSTEM_PACKAGES += zip
APT_GET := apt-get -o DPkg::Lock::Timeout=600
STAMP := $(VENV)/.installed

.PHONY: help system-deps venv run fleet test lint bench image clean

help:
	@echo "make run    - start the appliance locally on embedded defaults (state under ./var)"
	@echo "make fleet  - a local fleet: PostgreSQL, a moto server and three appliances on loopback"
	@echo "make test   - install what is needed (system packages too, as root) and run every test"
	@echo "make lint   - ruff and mypy"
	@echo "make bench  - benchmarks (conversion, API, end-to-end import, fleet, appliance image)"
	@echo "make image  - build imaging-appliance.qcow2 with build.sh (as root)"

# Installs missing Debian packages when run as root; otherwise prints the exact command and fails.
system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing system packages:$$missing"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    $(APT_GET) update -qq && $(APT_GET) install -y -qq --no-install-recommends $$missing >/dev/null; \
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

# Three appliances (`imaging serve` + `imaging worker` each, own state directory and port) sharing a
# throwaway PostgreSQL cluster and one volume directory, and a moto server for S3/EC2 (tests/fleet.py,
# which the tests use too); prints the endpoints and credentials. Ctrl-C stops everything it started
# and removes the cluster and the appliances' directory. FLEET_ARGS="--keep --lease 5" e.g.
fleet: venv
	@$(BIN)/python -m tests.fleet $(FLEET_ARGS)

# the slowest tests are listed at the end, so a run that creeps towards CI's limit says where the time went
test: venv
	$(BIN)/python -m pytest --durations=30 tests

lint: venv
	$(BIN)/ruff check appliance api tests bench
	$(BIN)/ruff format --check appliance api tests bench
	$(BIN)/mypy

# Each prints ratios against its baseline (bare qemu-img, the goal latency, the slowest stage,
# the bare base image); see bench/README.md. bench/appliance.sh builds and boots images (root).
bench: venv
	$(BIN)/python bench/convert.py
	$(BIN)/python bench/validate.py
	$(BIN)/python bench/api.py
	$(BIN)/python bench/import_e2e.py
	$(BIN)/python bench/fleet.py
	bench/appliance.sh

image: system-deps
	./build.sh

clean:
	rm -rf $(VENV) var build *.egg-info .build
