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

.PHONY: demo test bench install install-dev postgres-server os-packages browser stack-up stack-down clean

demo: install postgres-server
	$(BIN)/maas stack up
	$(BIN)/maas run
	$(BIN)/maas predict "$(DEMO_TEXT_POS)" "$(DEMO_TEXT_NEG)"
	$(BIN)/maas predict --grpc "$(DEMO_TEXT_POS)" "$(DEMO_TEXT_NEG)"

# TEST_WORKERS: pytest processes (pytest-xdist), each given whole test files so that a file's module
# fixtures (a trained model, a started stack) are built once; 1 runs the suite in this process.
TEST_WORKERS ?= 2
test: install-dev os-packages
	$(BIN)/python -m pytest -ra $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

# QUICK=1: every section on less data and shorter load cells (about 3 minutes instead of 30).
bench: install postgres-server
	$(BIN)/python -m benchmarks$(if $(filter 1,$(QUICK)), --quick)

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

# OS programs come from the OS's packages: `need` checks each command and, when root with apt, installs
# every missing Debian package in one go; otherwise it says exactly what to install.
#   postgres-server: the local stack's private PostgreSQL cluster (initdb, pg_ctl)
#   os-packages:     everything `make test` drives for real: PostgreSQL, nginx (the API gateway),
#                    redis-server (the Celery broker), Chromium (the Airflow UI tests) and docker-compose
#                    (`docker-compose config` checks of docker-compose.yaml; no Docker daemon is needed)
define need
	@missing=""; \
	for pair in $(1); do \
	  cmd=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$cmd >/dev/null 2>&1 || [ -x /usr/sbin/$$cmd ] || ls /usr/lib/postgresql/*/bin/$$cmd >/dev/null 2>&1 \
	    || missing="$$missing $$pkg"; \
	done; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "Installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	else \
	  echo "Missing OS packages:$$missing. Install them, then re-run:"; \
	  echo "  Debian/Ubuntu: sudo apt-get install$$missing"; \
	  echo "  (Ubuntu names Chromium chromium-browser; Fedora/RHEL: postgresql-server nginx redis chromium docker-compose)"; \
	  exit 1; \
	fi
endef

postgres-server:
	$(call need,initdb:postgresql)

os-packages:
	$(call need,initdb:postgresql nginx:nginx redis-server:redis-server chromium:chromium docker-compose:docker-compose)

# Kept for habit: the browser alone.
browser:
	$(call need,chromium:chromium)

stack-up: install postgres-server
	$(BIN)/maas stack up
stack-down:
	$(BIN)/maas stack down

clean: stack-down
	rm -rf .maas
