"""The test suite. Uses PostgreSQL + Redis when they answer on their default local ports (or when
DATABASE_URL / CELERY_BROKER_URL say so), otherwise the embedded SQLite + SQLAlchemy broker.
CHAINSAGA_TEST_BACKEND=services|embedded forces one mode."""

import os
import socket

from django.core.exceptions import ImproperlyConfigured

from config.env import VAR_DIR, broker_transport_options, broker_url, control_routes, database, env_str
from config.settings.base import *  # noqa: F403
from config.settings.base import INSTALLED_APPS


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


TEST_BACKEND = env_str("CHAINSAGA_TEST_BACKEND", "auto")
if TEST_BACKEND not in {"auto", "services", "embedded"}:
    raise ImproperlyConfigured("CHAINSAGA_TEST_BACKEND must be auto, services or embedded")
if TEST_BACKEND == "auto":
    up = _answers("127.0.0.1", 5432) and _answers("127.0.0.1", 6379)
    TEST_BACKEND = "services" if up else "embedded"

if TEST_BACKEND == "services":
    _db_url = os.environ.get("DATABASE_URL") or "postgres://postgres@127.0.0.1:5432/chainsaga"
    _broker = os.environ.get("CELERY_BROKER_URL") or "redis://127.0.0.1:6379/15"
    REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/14"
else:
    _db_url = os.environ.get("DATABASE_URL", "")
    _broker = os.environ.get("CELERY_BROKER_URL", "")
    REDIS_URL = ""

DATABASES = {"default": database(_db_url, sqlite_file=VAR_DIR / "test-main.sqlite3")}
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # Worker subprocesses must share the test database, so SQLite's test database is a file.
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / "test.sqlite3")}
CELERY_BROKER_URL = broker_url(_broker, sqlite_file=VAR_DIR / "test-broker.sqlite3")
CELERY_TASK_DEFAULT_QUEUE = env_str("CELERY_TASK_DEFAULT_QUEUE", "chainsaga-test")
SAGAS_CONTROL_QUEUE = env_str("SAGAS_CONTROL_QUEUE", f"{CELERY_TASK_DEFAULT_QUEUE}-control")
CELERY_TASK_ROUTES = control_routes(SAGAS_CONTROL_QUEUE)
CHAINSAGA_TEST_BACKEND = TEST_BACKEND

# Shorter than production's hour, still above every definition's timeout + retry delay. A test
# that kills a whole worker does not wait for it: the sweeper re-drives the saga first.
SAGAS_VISIBILITY_TIMEOUT = int(os.environ.get("SAGAS_VISIBILITY_TIMEOUT", "300"))
CELERY_BROKER_TRANSPORT_OPTIONS = broker_transport_options(CELERY_BROKER_URL, visibility_timeout=SAGAS_VISIBILITY_TIMEOUT)
SAGAS_FAULT_INJECTION = True
SAGAS_STUCK_GRACE = float(os.environ.get("SAGAS_STUCK_GRACE", "1.0"))
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
SECRET_KEY = os.environ.get("SECRET_KEY") or "insecure-test-suite-key-never-used-elsewhere-0123456789"
INSTALLED_APPS = [*INSTALLED_APPS, "tests.sagaapp"]
PAYMENTS_PROVIDER_PATH = os.environ.get("PAYMENTS_PROVIDER_PATH") or str(VAR_DIR / "test-payment-provider.sqlite3")
OUTBOX_PUBLISHER = os.environ.get("OUTBOX_PUBLISHER") or ("redis,consumers" if REDIS_URL else "consumers")
CONSUMER_MAX_DELIVERIES = 3
CONSUMER_MAX_RETRIES = int(os.environ.get("CONSUMER_MAX_RETRIES", "3"))
CONSUMER_RETRY_MAX_DELAY = float(os.environ.get("CONSUMER_RETRY_MAX_DELAY", "1"))

# Metrics of the test run's own processes: a folder per run (the workers it starts inherit the
# run's id), so each run counts from zero; conftest.py removes the folders of finished runs.
TEST_RUN = os.environ.setdefault("CHAINSAGA_TEST_RUN", str(os.getpid()))
PROMETHEUS_MULTIPROC_DIR = os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(VAR_DIR / "test-metrics" / TEST_RUN)
os.makedirs(PROMETHEUS_MULTIPROC_DIR, exist_ok=True)
