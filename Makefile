# chainsaga: `make run` starts everything, `make test` runs the whole suite. Nothing else to install.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install run migrate seed test test-embedded test-services check clean chaos chaos-short bench bench-quick bench-history bench-history-short

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
	@echo "  nothing reloads: after changing code (a saga above all), Ctrl-C and make run again"
	@echo ""
	rm -rf var/metrics  # the processes' metrics (sagas.metrics) count from zero again
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH PORT=$(PORT) $(VENV)/bin/honcho start -f Procfile

# The whole suite: PostgreSQL + Redis when they answer on their default ports, else embedded.
test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-embedded: install
	CHAINSAGA_TEST_BACKEND=embedded $(PY) -m pytest $(PYTEST_ARGS)

test-services: install
	CHAINSAGA_TEST_BACKEND=services $(PY) -m pytest $(PYTEST_ARGS)

# The chaos soak: 2,000 orders in both flows (a fifth through the API) while worker children, a
# whole worker, Redis and PostgreSQL are killed, frozen and restarted, poison and forged messages
# arrive, place_order v2 is deployed and an operator aborts sagas; then invariant checks (report in
# docs/chaos/, exit 1 on a violation). Starts private PostgreSQL/Redis instances and gunicorn;
# e.g. CHAOS_ARGS="--broker rabbitmq".
chaos: install
	$(PY) -m perf.chaos $(CHAOS_ARGS)

# The same in about two minutes (300 orders, every fault class once or more): run by CI.
chaos-short: install
	$(PY) -m perf.chaos --short $(CHAOS_ARGS)

# Benchmarks on the local PostgreSQL + Redis with real workers: chainsaga against hand-rolled
# Celery chains (a fair baseline, the naive chain, a no-op chain) in 5 rounds at 2, 4 and 8 worker
# processes, the outbox, the relay, the API, place_orders embedded against PostgreSQL + Redis
# (report and charts in docs/benchmarks/, exit 1 when a target is missed). Uses its own database and Redis databases: see perf/bench.py.
# The history phase bulk-loads 100,000 finished sagas and times the hot paths at 0 and after; for
# the million (a few minutes more): make bench BENCH_ARGS="--history 1000000"; 0 skips it.
bench: install
	$(PY) -m perf.bench $(BENCH_ARGS)

# The same with small samples and 3 rounds, in about two minutes (figures are noisier; report in
# var/benchmarks/).
bench-quick: install
	$(PY) -m perf.bench --quick $(BENCH_ARGS)

# The scale benchmark (issue 15): 1,000,000 finished sagas bulk-loaded, then the engine's periodic
# jobs, /api/health/, every admin list, filter and search, the order API, a 100,000-event drain,
# throughput (alternated with a twin database whose log is empty), storage per million sagas, keys
# and retention, at 0 and at 1M side by side (report in docs/benchmarks/history.md, exit 1 when a
# target is missed). About 20 minutes on 2 cores; e.g. BENCH_HISTORY_ARGS="--history 100000".
bench-history: install
	$(PY) -m perf.bench_history $(BENCH_HISTORY_ARGS)

# The same with 20,000 sagas and small samples, in a few minutes (report in var/benchmarks/).
bench-history-short: install
	$(PY) -m perf.bench_history --short $(BENCH_HISTORY_ARGS)

check: install
	$(PY) manage.py check
	$(PY) manage.py makemigrations --check --dry-run

clean:
	rm -rf $(VENV) var .pytest_cache
