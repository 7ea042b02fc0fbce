# Every target does its own set-up: a fresh Debian machine needs nothing but `make test` (or
# `make serve`). Expensive artifacts (guest kernel, lab image) are cached outside the checkout,
# keyed by a hash of their inputs, so reruns skip them.

PYTHON ?= python3
VENV := .venv
CUBE := $(VENV)/bin/cube
PY := $(VENV)/bin/python
# The lab boots a TCG-emulated L1 guest; give its tests generous but finite limits.
LAB_TIMEOUT ?= 3600

.PHONY: all deps venv kernel lab-image serve test test-unit test-net test-kvm test-lab lint format clean

all: venv kernel

deps:
	bash scripts/install-deps.sh

$(VENV)/.stamp: pyproject.toml setup.py cube/vmm/kvm_build.py | deps
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test,guest]'
	touch $@

venv: $(VENV)/.stamp

kernel: venv
	$(CUBE) kernel build

lab-image: venv
	$(CUBE) lab build

# The service on 127.0.0.1:3000. With hardware KVM it runs here; on a PVM host (no standard
# Linux guest can run) it runs inside the lab with the port forwarded. Either way the default
# templates are built first unless they are up to date, and an API key is made if none exists.
serve: venv kernel
	$(CUBE) apikey ensure
	@if $(CUBE) doctor --json | $(PY) -c 'import json, sys; sys.exit(json.load(sys.stdin)["kvm"] != "hardware")'; then \
		$(CUBE) template build-defaults && exec $(CUBE) serve; \
	else \
		echo "make serve: no hardware KVM here; serving from the nested lab"; \
		$(CUBE) lab build && exec $(CUBE) lab serve; \
	fi

lint: venv
	$(VENV)/bin/ruff check cube tests tools
	$(VENV)/bin/ruff format --check cube tests tools

format: venv
	$(VENV)/bin/ruff format cube tests tools
	$(VENV)/bin/ruff check --fix cube tests tools

test: lint test-unit test-net test-kvm test-lab

test-unit: venv
	$(PY) -m pytest tests/unit

# Network namespaces, taps and eBPF on the host (root; nothing leaves the test's namespaces).
test-net: venv
	$(PY) -m pytest -m net tests/net

test-kvm: venv
	$(PY) -m pytest -m kvm tests/kvm

# Host-built artifacts the lab tests use (guest kernel, test initramfs), then the lab tier itself,
# which runs inside the L1 guest with the checkout and the cache shared at the same paths. No
# per-test faulthandler there: the stress tests run longer than its 15 minutes by design, and a
# hung lab run is dumped by the lab runner before it is stopped.
test-lab: venv
	$(PY) -m tests.lab.artifacts
	$(CUBE) template build-defaults --rootfs-only
	$(CUBE) lab build
	$(CUBE) lab run --timeout $(LAB_TIMEOUT) -- \
		python3 -u -m pytest -o faulthandler_timeout=0 -m lab tests/lab

clean:
	rm -rf $(VENV) build *.egg-info cube/vmm/_kvm*.so
