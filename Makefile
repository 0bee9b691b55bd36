# chainsaga: `make run` starts everything, `make test` runs the whole suite. Nothing else to install.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install run migrate seed test test-embedded test-services check clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

migrate: install
	$(PY) manage.py migrate --noinput

# web (Django dev server), celery worker and celery beat together, until Ctrl-C.
run: migrate
	$(PY) manage.py seed_demo
	@echo ""
	@echo "  chainsaga is starting:"
	@echo "    web    http://127.0.0.1:$(PORT)/"
	@echo "    api    http://127.0.0.1:$(PORT)/api/docs/"
	@echo "    admin  http://127.0.0.1:$(PORT)/admin/"
	@echo "    broker $$($(PY) -c 'import os; os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local"); import django; django.setup(); from django.conf import settings; from kombu.utils.url import maybe_sanitize_url; print(maybe_sanitize_url(settings.CELERY_BROKER_URL))')"
	@echo ""
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH PORT=$(PORT) $(VENV)/bin/honcho start -f Procfile

# The whole suite: PostgreSQL + Redis when they answer on their default ports, else embedded.
test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-embedded: install
	CHAINSAGA_TEST_BACKEND=embedded $(PY) -m pytest $(PYTEST_ARGS)

test-services: install
	CHAINSAGA_TEST_BACKEND=services $(PY) -m pytest $(PYTEST_ARGS)

check: install
	$(PY) manage.py check
	$(PY) manage.py makemigrations --check --dry-run

clean:
	rm -rf $(VENV) var .pytest_cache
