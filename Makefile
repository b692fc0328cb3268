# The two commands of the README: `make up` runs a local cluster, `make test` runs every test.
VENV   ?= .venv
PYTHON ?= python3
STAMP  := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)

.PHONY: up test lint bench clean

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-* && touch $(STAMP)

up: $(STAMP)
	exec $(VENV)/bin/miaas up

test: $(STAMP)
	@bash tests/install-packages.sh  # Debian packages of the real parts (database, browser, sandbox, VMs), as root
	@$(VENV)/bin/python -m agent.vmhost  # what the VM test (pytest -m vm) still needs here, and how to install it
	$(VENV)/bin/python -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy miaas kafka/embedded_broker service-registry/service_registry model-registry/model_registry \
		controller/controller agent/agent frontend/frontend

clean:
	rm -rf .miaas dist .pytest_cache
