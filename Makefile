# nbdcrypt: `make run` serves a demo image, `make test` runs the whole suite.
# Both install what is missing first (Debian 12, as root).

SHELL := /bin/bash
VENV := $(CURDIR)/.venv
PYTHON := $(VENV)/bin/python
STATE ?= $(CURDIR)/.state
# nbdkit's Python plugin embeds Debian's interpreter: the venv must be built from it.
SYSTEM_PYTHON := /usr/bin/python3
APT_PACKAGES := nbdkit nbdkit-plugin-python python3-libnbd libnbd-bin fio qemu-utils \
	cryptsetup-bin fuse3 e2fsprogs python3-venv python3-pip python3-botan systemd keyutils gnutls-bin \
	python3-prometheus-client gcc libssl-dev python3-dev
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: run test lint bench install deps venv clean

run: deps venv
	@scripts/demo "$(STATE)"

test: deps venv lint
	$(PYTHON) -m pytest $(PYTEST_ARGS)

# ruff (style and likely bugs) and mypy (types, including the Protocol contracts).
lint: venv
	$(PYTHON) -m ruff check src tests bench setup.py
	$(PYTHON) -m mypy

# nbdcrypt against its peers, one run: docs/benchmarks.md
bench: deps venv
	$(PYTHON) -m bench.run $(BENCH_ARGS)

# A system install: the package in its own venv, the systemd units (docs/operations.md).
PREFIX ?= /opt/nbdcrypt
UNITDIR ?= /usr/local/lib/systemd/system
install: deps
	$(SYSTEM_PYTHON) -m venv --system-site-packages $(PREFIX)
	$(PREFIX)/bin/pip install -q .
	install -d $(PREFIX)/share/doc/nbdcrypt
	install -d -m 0700 /etc/nbdcrypt /var/lib/nbdcrypt
	install -m 0644 docs/*.md $(PREFIX)/share/doc/nbdcrypt/
	install -D -m 0644 -t $(UNITDIR) systemd/nbdcrypt@.service systemd/nbdcrypt@.socket
	systemctl daemon-reload 2>/dev/null || true

deps:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

venv: $(VENV)/.installed

# setup.py builds the native sector kernel (src/nbdcrypt/crypto/_sector.c) in place.
$(VENV)/.installed: pyproject.toml setup.py src/nbdcrypt/crypto/_sector.c
	$(SYSTEM_PYTHON) -m venv --system-site-packages $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
