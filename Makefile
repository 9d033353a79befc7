# MaaS: `make demo` runs the pipeline end to end on the local stack; `make test` runs the whole suite.
# Both create .venv and install the pinned requirements on first use (Python 3.11).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.runtime-installed
DEV_STAMP     := $(VENV)/.dev-installed
export TF_CPP_MIN_LOG_LEVEL ?= 2
export PIP_DISABLE_PIP_VERSION_CHECK := 1

DEMO_TEXT_POS ?= A wonderful film: the acting was superb and the story moved me.
DEMO_TEXT_NEG ?= A dull, boring mess. The plot made no sense and I want my money back.

.PHONY: demo test bench install install-dev postgres-server browser stack-up stack-down clean

demo: install postgres-server
	$(BIN)/maas stack up
	$(BIN)/maas run
	$(BIN)/maas predict "$(DEMO_TEXT_POS)" "$(DEMO_TEXT_NEG)"
	$(BIN)/maas predict --grpc "$(DEMO_TEXT_POS)" "$(DEMO_TEXT_NEG)"

test: install-dev postgres-server browser
	$(BIN)/python -m pytest -ra

bench: install postgres-server
	$(BIN)/python -m benchmarks

install: $(RUNTIME_STAMP)
install-dev: $(DEV_STAMP)

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' || \
	  { echo "MaaS needs Python 3.11 (found $$($(PYTHON) --version 2>&1) at $(PYTHON)): install python3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(RUNTIME_STAMP): requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -r requirements.txt
	$(BIN)/python -m pip install --no-deps --no-build-isolation -e .
	@touch $@

$(DEV_STAMP): requirements-dev.txt $(RUNTIME_STAMP)
	$(BIN)/python -m pip install -r requirements-dev.txt
	@touch $@

# The local stack runs a private PostgreSQL cluster with the OS's server binaries.
postgres-server:
	@if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "Installing the PostgreSQL server (Debian package postgresql)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	else \
	  echo "The PostgreSQL server binaries (initdb, pg_ctl) are missing. Install them, then re-run:"; \
	  echo "  Debian/Ubuntu: sudo apt-get install postgresql"; \
	  echo "  Fedora/RHEL:   sudo dnf install postgresql-server"; \
	  exit 1; \
	fi

# The Airflow UI tests drive the OS's Chromium through Playwright (no browser download).
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "Installing Chromium for the browser tests (Debian package chromium)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
	  echo "Chromium is missing; the Airflow UI tests need it. Install it, then re-run:"; \
	  echo "  Debian: sudo apt-get install chromium     Ubuntu: sudo apt-get install chromium-browser"; \
	  echo "  Fedora/RHEL: sudo dnf install chromium"; \
	  exit 1; \
	fi

stack-up: install postgres-server
	$(BIN)/maas stack up
stack-down:
	$(BIN)/maas stack down

clean: stack-down
	rm -rf .maas
