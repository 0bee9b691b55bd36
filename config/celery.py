"""The Celery app. Configuration lives in Django settings under the CELERY_ namespace."""

import os

from celery import Celery

import config.broker  # noqa: F401 - registers the embedded broker's URL prefix

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")

app = Celery("chainsaga")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
