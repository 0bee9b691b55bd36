"""Fault injection for tests and demos: make a named step fail, crash its worker, or arrive twice.

Off unless settings.SAGAS_FAULT_INJECTION is true (it costs one query per step)."""

from __future__ import annotations

from django.conf import settings
from django.db import transaction
from django.db.models import Q

from sagas.exceptions import BusinessError, TransientError
from sagas.models import Fault, SagaInstance


class InjectedBusinessError(BusinessError):
    pass


class InjectedTransientError(TransientError):
    pass


def fault_take(*, saga: SagaInstance, step: str, direction: str) -> str | None:
    """Consume one matching fault and return its kind, or None. Commits on its own, so a crash
    fault is used up even though the process dies right after."""
    if not settings.SAGAS_FAULT_INJECTION:
        return None
    with transaction.atomic():
        fault = (
            Fault.objects.select_for_update()
            .filter(saga_name=saga.name, step=step, direction=direction)
            .filter(Q(saga__isnull=True) | Q(saga=saga))
            .filter(Q(remaining__isnull=True) | Q(remaining__gt=0))
            .order_by("pk")
            .first()
        )
        if fault is None:
            return None
        if fault.remaining is not None:
            fault.remaining -= 1
            fault.save(update_fields=["remaining"])
        return fault.kind
