"""The Celery app. Configuration lives in Django settings under the CELERY_ namespace."""

import os

import logging.config

from celery import Celery
from celery.signals import setup_logging, task_prerun

import config.broker  # noqa: F401 - registers the embedded broker's URL prefix

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")

app = Celery("chainsaga")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@setup_logging.connect
def _logging_from_settings(loglevel=None, **kwargs) -> None:
    """Worker and beat log as the web does (settings.LOGGING: LOG_FORMAT, the step context, quiet
    housekeeping) instead of Celery's own setup; `--loglevel` still sets the level."""
    from django.conf import settings

    logging.config.dictConfig(settings.LOGGING)
    if loglevel:
        logging.getLogger().setLevel(loglevel)


@task_prerun.connect
def _drop_unusable_db_connections(**kwargs) -> None:
    """What Django does before each request: close a connection that saw an error and no longer
    works (e.g. PostgreSQL restarted) or that is older than CONN_MAX_AGE, so the task reconnects.
    Needed because connections are reused across tasks (CELERY_DB_REUSE_MAX). First, a connection
    a previous task left inside a transaction is replaced (sagas.worker)."""
    from django.db import close_old_connections

    from sagas.worker import reset_connections_left_in_a_transaction

    reset_connections_left_in_a_transaction()
    close_old_connections()
