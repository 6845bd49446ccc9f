# callerid — top-level build. `make demo` and `make test` install what they need themselves
# (Debian 12, as root); every target is idempotent.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp
APT_STAMP := .apt.stamp
APT_PACKAGES := gcc make pkg-config libsystemd-dev libpam0g-dev pamtester \
	openssh-server openssh-client sshpass iproute2 systemd procps psmisc python3-venv \
	slurmd slurmctld slurm-client munge

.PHONY: all deps apt venv pam test test-unit lint typecheck demo bench clean

all: pam venv

deps: apt venv

$(APT_STAMP):
	@if [ "$$(id -u)" != 0 ]; then echo "make: root is needed to apt-get install: $(APT_PACKAGES)" >&2; exit 1; fi
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "apt-get install $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@touch $@

apt: $(APT_STAMP)

$(STAMP): pyproject.toml $(APT_STAMP)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

venv: $(STAMP)

pam: $(APT_STAMP)
	$(MAKE) -C pam

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check agent bus tests bench

typecheck: venv
	$(PY) scripts/typecheck.py

test: deps pam lint typecheck
	$(PY) -m pytest tests

test-unit: venv
	$(PY) -m pytest tests/unit

demo: deps pam
	$(PY) scripts/demo.py

bench: deps pam
	$(PY) bench/run.py

clean:
	$(MAKE) -C pam clean
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
