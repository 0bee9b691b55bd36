"""Orders' periodic tasks (beat, on the control queue: config.env.control_routes)."""

from celery import shared_task
from django.conf import settings
from django.utils import timezone

from orders.services import idempotency_records_prune
from sagas.retention import retention_period
from sagas.services import housekeeping_record
from sagas.tasks import INFRASTRUCTURE_RETRY, EngineTask


@shared_task(base=EngineTask, name="orders.prune_idempotency_records", acks_late=True, ignore_result=True, **INFRASTRUCTURE_RETRY)
def prune_idempotency_records() -> int:
    """Idempotency-Keys past ORDER_IDEMPOTENCY_RETENTION_DAYS (0: kept forever)."""
    period = retention_period(settings.ORDER_IDEMPOTENCY_RETENTION_DAYS)
    if period is None:
        return 0
    now = timezone.now()
    run = idempotency_records_prune(now=now, retention=period)
    housekeeping_record(task="orders.prune_idempotency_records", now=now, count=run.deleted, more=run.more)
    return run.deleted
