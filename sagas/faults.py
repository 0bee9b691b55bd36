"""Fault injection for tests and demos: make a named step fail, crash its worker, or arrive twice.

Off unless settings.SAGAS_FAULT_INJECTION is true (it costs one read per step)."""

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


def fault_take(*, saga: SagaInstance, step: str, direction: str) -> frozenset[str]:
    """Consume one of each kind of matching fault and return their kinds. Commits on its own, so
    a crash fault is used up even though the process dies right after."""
    if not settings.SAGAS_FAULT_INJECTION:
        return frozenset()
    kinds: set[str] = set()
    matching = (
        Fault.objects.filter(saga_name=saga.name, step=step, direction=direction)
        .filter(Q(saga__isnull=True) | Q(saga=saga))
        .filter(Q(remaining__isnull=True) | Q(remaining__gt=0))
    )
    # A plain read first: almost every step has no fault, and the transaction below would take
    # SQLite's write lock (transaction_mode IMMEDIATE) for nothing, once per step (issue 11).
    if not matching.exists():
        return frozenset()
    with transaction.atomic():
        faults = matching.select_for_update().order_by("pk")
        for fault in faults:
            if fault.kind in kinds:
                continue
            kinds.add(fault.kind)
            if fault.remaining is not None:
                fault.remaining -= 1
                fault.save(update_fields=["remaining"])
    return frozenset(kinds)
