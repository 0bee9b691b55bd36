"""Inventory's periodic tasks (beat, on the control queue: config.env.control_routes)."""

from celery import shared_task
from django.conf import settings
from django.utils import timezone

from inventory.services import reservations_prune
from sagas.retention import retention_period
from sagas.services import housekeeping_record
from sagas.tasks import INFRASTRUCTURE_RETRY, EngineTask


@shared_task(base=EngineTask, name="inventory.prune_reservations", acks_late=True, ignore_result=True, **INFRASTRUCTURE_RETRY)
def prune_reservations() -> int:
    """Settled reservations past INVENTORY_RESERVATION_RETENTION_DAYS (0: kept forever)."""
    period = retention_period(settings.INVENTORY_RESERVATION_RETENTION_DAYS)
    if period is None:
        return 0
    now = timezone.now()
    run = reservations_prune(now=now, retention=period)
    housekeeping_record(task="inventory.prune_reservations", now=now, count=run.deleted, more=run.more)
    return run.deleted
