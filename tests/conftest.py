import pytest
from django.conf import settings

pytest_plugins = ["sagas.testing.fixtures"]

EMBEDDED = settings.CHAINSAGA_TEST_BACKEND == "embedded"


def pytest_report_header(config):
    return f"chainsaga test backend: {settings.CHAINSAGA_TEST_BACKEND} (db {settings.DATABASES['default']['ENGINE']}, broker {settings.CELERY_BROKER_URL.split('://')[0]})"


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs PostgreSQL row locks / Redis redelivery; embedded mode (SQLite + SQLAlchemy broker)")
    for item in items:
        if EMBEDDED and "services" in item.keywords:
            item.add_marker(skip)
