"""Orders' periodic tasks (beat, on the control queue: config.env.control_routes)."""

from celery import shared_task
from django.conf import settings

from orders.services import idempotency_records_prune
from sagas.tasks import INFRASTRUCTURE_RETRY, EngineTask, prune_task_run


@shared_task(base=EngineTask, name="orders.prune_idempotency_records", acks_late=True, ignore_result=True, **INFRASTRUCTURE_RETRY)
def prune_idempotency_records() -> int:
    """Idempotency-Keys past ORDER_IDEMPOTENCY_RETENTION_DAYS (0: kept forever)."""
    return prune_task_run("orders.prune_idempotency_records", idempotency_records_prune, settings.ORDER_IDEMPOTENCY_RETENTION_DAYS)
