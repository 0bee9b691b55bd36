"""Fault injection for tests and demos: make a named step fail, crash its worker, or arrive twice.

An interceptor (sagas.interceptors), configured only when settings.SAGAS_FAULT_INJECTION is true;
it costs one read per delivery then, and nothing otherwise."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from django.db import transaction
from django.db.models import Q

from sagas.exceptions import BusinessError, SagaNotFound, TransientError
from sagas.interceptors import Interceptor
from sagas.models import Fault, FaultKind, SagaInstance

if TYPE_CHECKING:
    from sagas.runner import Delivery, StepResult

log = logging.getLogger("sagas")


class InjectedBusinessError(BusinessError):
    pass


class InjectedTransientError(TransientError):
    pass


class FaultInjection(Interceptor):
    """Takes the faults meant for a delivery when it arrives and plays them at their moment:
    DUPLICATE on arrival, BUSINESS / TRANSIENT instead of the action, CRASH inside the step's
    transaction (nothing of the step commits), CRASH_AFTER_COMMIT once the step committed."""

    def __init__(self) -> None:
        self.kinds: frozenset[str] = frozenset()

    def delivered(self, delivery: Delivery) -> None:
        try:
            saga = SagaInstance.objects.only("name").get(pk=delivery.saga_id)
        except SagaInstance.DoesNotExist:
            raise SagaNotFound(f"saga {delivery.saga_id} does not exist") from None
        self.kinds = fault_take(saga=saga, step=delivery.step_name, direction=delivery.direction)
        if FaultKind.DUPLICATE in self.kinds:
            delivery.republish()

    def call(self, delivery: Delivery, action: Callable[[], Any]) -> Any:
        if FaultKind.CRASH in self.kinds:
            _die(delivery, "before commit")
        if FaultKind.BUSINESS in self.kinds:
            raise InjectedBusinessError(f"injected business failure in {delivery.step_name}")
        if FaultKind.TRANSIENT in self.kinds:
            raise InjectedTransientError(f"injected transient failure in {delivery.step_name}")
        return action()

    def finished(self, delivery: Delivery, result: StepResult) -> None:
        from sagas.runner import Outcome

        if FaultKind.CRASH_AFTER_COMMIT in self.kinds and result.outcome is Outcome.DONE:
            _die(delivery, "after commit")


def fault_take(*, saga: SagaInstance, step: str, direction: str) -> frozenset[str]:
    """Consume one of each kind of matching fault and return their kinds. Commits on its own, so
    a crash fault is used up even though the process dies right after."""
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


def _die(delivery: Delivery, when: str) -> None:
    log.warning(
        "saga_fault_crash saga=%s step=%s killing worker process %s %s", delivery.saga_id, delivery.step_name, os.getpid(), when
    )
    os.kill(os.getpid(), signal.SIGKILL)
