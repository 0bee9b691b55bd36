"""Inventory's periodic tasks (beat, on the control queue: config.env.control_routes)."""

from celery import shared_task
from django.conf import settings

from inventory.services import reservations_prune
from sagas.tasks import INFRASTRUCTURE_RETRY, EngineTask, prune_task_run


@shared_task(base=EngineTask, name="inventory.prune_reservations", acks_late=True, ignore_result=True, **INFRASTRUCTURE_RETRY)
def prune_reservations() -> int:
    """Settled reservations past INVENTORY_RESERVATION_RETENTION_DAYS (0: kept forever)."""
    return prune_task_run("inventory.prune_reservations", reservations_prune, settings.INVENTORY_RESERVATION_RETENTION_DAYS)
