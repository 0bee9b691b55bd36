"""Shared by both test folders (tests/ and sagas/tests/): the `services` marker, the header."""

import shutil
from pathlib import Path

import pytest
from django.conf import settings

pytest_plugins = ["sagas.testing.fixtures"]

EMBEDDED = settings.CHAINSAGA_TEST_BACKEND == "embedded"


def pytest_sessionstart(session):
    """Remove the metrics folders of earlier runs whose process is gone (config.settings.test)."""
    ours = Path(settings.PROMETHEUS_MULTIPROC_DIR)
    for folder in ours.parent.iterdir():
        if folder != ours and folder.name.isdigit() and not Path(f"/proc/{folder.name}").exists():
            shutil.rmtree(folder, ignore_errors=True)


def pytest_report_header(config):
    return f"chainsaga test backend: {settings.CHAINSAGA_TEST_BACKEND} (db {settings.DATABASES['default']['ENGINE']}, broker {settings.CELERY_BROKER_URL.split('://')[0]})"


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `services` in embedded mode, with the reason the marker gives."""
    for item in items:
        marker = item.get_closest_marker("services")
        if EMBEDDED and marker is not None:
            reason = marker.kwargs.get("reason", "needs PostgreSQL row locks or Redis")
            item.add_marker(pytest.mark.skip(reason=f"embedded mode: {reason}"))
