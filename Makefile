# callerid — top-level build. `make demo` and `make test` install what they need themselves
# (Debian 12, as root); every target is idempotent.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp
APT_STAMP := .apt.stamp
# systemd-container debootstrap: tests/e2e/test_systemd.py boots a Debian 12 tree with nspawn.
# apt-install.sh installs without recommends: systemd-container's libnss-mymachines would
# edit this machine's /etc/nsswitch.conf.
APT_PACKAGES := gcc make pkg-config libsystemd-dev libpam0g-dev pamtester \
	openssh-server openssh-client sshpass iproute2 systemd procps psmisc python3-venv \
	slurmd slurmctld slurm-client munge libjson-c5 libdbus-1-3 libhwloc15 \
	clang libclang-rt-14-dev llvm faketime \
	systemd-container debootstrap
# Only for `make deb`, `make rpm` and `make test-packages` (packaging/build.sh): build tools,
# linters, and the distribution's Python packages the .deb depends on.
PKG_APT_PACKAGES := debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools \
	python3-wheel libpam0g-dev gcc make rpm rpmlint lintian fakeroot devscripts pamtester systemd strace \
	python3-zmq python3-msgpack python3-psutil python3-yaml python3-systemd python3-prometheus-client
PKG_APT_STAMP := build/.pkg-apt.stamp

.PHONY: all deps apt venv pam test test-unit lint typecheck demo bench clean deb rpm test-packages \
	fuzz chaos slurm-trees

all: pam venv

deps: apt venv

# Re-checked when the Makefile (the package list) changes; apt-install.sh installs only what is missing.
$(APT_STAMP): Makefile
	scripts/apt-install.sh $(APT_PACKAGES)
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

test: deps pam lint typecheck slurm-trees
	$(PY) -m pytest tests

# Slurm 24.11 and 26.05 for the slurm tests (22.05 is Debian's): the installed trees from the
# team tree's shared/reference/slurm-builds (beside this checkout, ../shared; or
# SLURM_BUILDS=dir) unpacked into /opt/slurm-24.11 and /opt/slurm-26.05, each once (a stamp in
# the tree names its tarball's sha256). No tarballs is an error: the tests would fail without.
slurm-trees: venv
	$(if $(SLURM_BUILDS),CALLERID_SLURM_BUILDS=$(SLURM_BUILDS)) $(PY) -m tests.support.slurm_release

# libFuzzer + ASan/UBSan harnesses of pam/codec.c, each for FUZZ_SECONDS (default 300); what
# they learn and any crash stay in pam/fuzz/build/. `make test` runs each for 10 s
# (tests/integration/test_fuzz_codec.py; CALLERID_FUZZ_SECONDS changes that).
FUZZ_SECONDS ?= 300
fuzz: $(APT_STAMP)
	$(MAKE) -C pam fuzz FUZZ_SECONDS=$(FUZZ_SECONDS)

test-unit: venv
	$(PY) -m pytest tests/unit

demo: deps pam
	$(PY) scripts/demo.py

bench: deps pam
	$(PY) -m bench.run

# Faults during a 1,000-login storm (bench/chaos.py; docs/reliability.md, "Faults").
chaos: deps pam
	$(PY) -m bench.chaos

$(PKG_APT_STAMP): Makefile
	scripts/apt-install.sh $(PKG_APT_PACKAGES)
	@mkdir -p $(@D) && touch $@

# build/deb/*.deb and build/rpm/RPMS/*/*.rpm from a copy of the working tree, each checked
# with lintian / rpmlint (filters: packaging/lintian-suppress, packaging/rpmlintrc).
deb: $(PKG_APT_STAMP)
	packaging/build.sh deb

rpm: $(PKG_APT_STAMP)
	packaging/build.sh rpm

# Builds both, installs the .debs on this machine, logs in through the installed PAM module,
# purges them again; installs the .rpms into a scratch root (needs root: CI).
test-packages: $(PKG_APT_STAMP) venv
	$(PY) -m pytest tests/e2e/test_packages.py

clean:
	$(MAKE) -C pam clean
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
