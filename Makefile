# Two commands do everything on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint typecheck unit bench airflow deployment-test constraints clean browser

$(STAMP): requirements.txt requirements-dev.txt constraints.txt pyproject.toml devtools/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt -r requirements-dev.txt -c constraints.txt
	$(BIN)/python -m pip install --quiet --no-deps -e . -e devtools
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q

test: lint typecheck unit

# Debian's headless Chromium and its chromedriver for the console's browser test
# (tests/console/test_console_browser.py; skipped without them). Never downloads a browser
# otherwise: apt only, and only when missing.
browser:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }

demo: $(STAMP)
	$(BIN)/python -m capi_devtools.demo

# The Airflow UI on this machine (airflow standalone, SQLite) with the DAGs, the stand-in and the
# sample partition wired in: http://localhost:8080, user admin, password in
# .airflow/home/simple_auth_manager_passwords.json.generated.
airflow: $(STAMP)
	$(BIN)/python -m capi_devtools.airflow_local

# The distributed deployment proof alone: PostgreSQL + Redis + Celery workers (needs both running).
deployment-test: $(STAMP)
	$(BIN)/pytest -q tests/deployment

bench: $(STAMP)
	$(BIN)/python -m capi_devtools.bench

constraints: $(STAMP)
	( echo '# Every package installed into .venv, pinned (pip freeze of a working environment). Regenerate with `make constraints`.'; \
	  $(BIN)/pip freeze --exclude-editable | grep -v '^liveramp' | sort -f ) > constraints.txt

clean:
	rm -rf .demo .pytest_cache build *.egg-info src/*.egg-info
