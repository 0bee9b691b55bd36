"""Test-only tasks (autodiscovered by the worker): what an interrupted task can leave behind."""

import os

from celery import shared_task
from django.db import transaction

from tests.sagaapp.models import Effect


@shared_task(name="tests.leave_a_transaction_open")
def leave_a_transaction_open() -> None:
    """As a soft time limit landing inside Django's transaction bookkeeping does: the connection is
    left inside a transaction when the task ends."""
    transaction.atomic().__enter__()
    Effect.objects.create(saga_id="00000000-0000-0000-0000-000000000000", step="left-open", direction="-", pid=os.getpid())


@shared_task(name="tests.record_effect")
def record_effect(saga_id: str) -> None:
    with transaction.atomic():
        Effect.objects.create(saga_id=saga_id, step="recorded", direction="-", pid=os.getpid())
