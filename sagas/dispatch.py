"""Turning saga-log decisions into Celery messages.

Forward steps are joined with `link` (each message carries the rest of the saga as its callback),
and every step message carries a `link_error` to `sagas.step_failed`, a bind=True task: Celery
always sends such an errback through the broker with the failed task's id first (DESIGN.md rule
4), so the compensation trigger is itself a durable, acks-late message. Compensations run the
same way, newest first, or all at once when the definition asks for parallel compensation.

Signatures are built by task name, so this module does not import the task module.

A message that cannot be sent (the broker is down or frozen) does not fail what was committed
before it: the saga is marked for the sweeper, which re-drives it from the log once the broker
answers, and for a few seconds this process does not try the broker again, so an outage costs a
request one bounded timeout, not one per message.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from uuid import UUID

from celery import Signature, signature
from django.conf import settings
from django.db import DatabaseError
from django.utils import timezone
from kombu.exceptions import OperationalError as BrokerUnavailable

from sagas.definition import FORWARD, HARD_LIMIT_GRACE, Saga, Step

log = logging.getLogger("sagas")

_broker_down_until = 0.0
_breaker_lock = threading.Lock()


def broker_presumed_down() -> bool:
    """A send failed in this process less than SAGAS_BROKER_RETRY_AFTER seconds ago."""
    return time.monotonic() < _broker_down_until


def send(sig: Signature, *, saga_id: UUID | str | None = None) -> bool:
    """Publish `sig`; on a broker outage, log, hand the saga (if any) to the sweeper and return
    False instead of raising."""
    global _broker_down_until
    if not broker_presumed_down():
        try:
            sig.apply_async()
            return True
        except (BrokerUnavailable, OSError) as exc:
            with _breaker_lock:
                _broker_down_until = time.monotonic() + settings.SAGAS_BROKER_RETRY_AFTER
            log.warning("broker_unavailable task=%s saga=%s: %s: %s", sig.task, saga_id, type(exc).__name__, exc)
    if saga_id is not None:
        _leave_to_sweeper(saga_id)
    return False


def _leave_to_sweeper(saga_id) -> None:
    from sagas.models import ACTIVE_STATES, SagaInstance

    try:
        SagaInstance.objects.filter(pk=saga_id, state__in=ACTIVE_STATES).update(stuck_after=timezone.now())
        log.warning("saga_send_deferred saga=%s: not sent; the sweeper re-drives it", saga_id)
    except DatabaseError:
        log.warning("saga_send_deferred saga=%s: not sent, not marked; the sweeper re-drives it when its step times out", saga_id)


def step_signature(saga_id: UUID, step: Step, direction: str) -> Signature:
    options = {
        "soft_time_limit": step.timeout,
        "time_limit": step.timeout + HARD_LIMIT_GRACE,
        "link_error": [
            signature("sagas.step_failed", kwargs={"saga_id": str(saga_id), "step": step.name, "direction": direction})
        ],
    }
    if step.queue:
        options["queue"] = step.queue
    return signature(
        "sagas.run_step",
        kwargs={"saga_id": str(saga_id), "step": step.name, "direction": direction},
        immutable=True,
        **options,
    )


def linked(signatures: Sequence[Signature]) -> Signature:
    """The first signature, with each one linked to the next: a chain built from `link`."""
    head = signatures[-1]
    for sig in reversed(signatures[:-1]):
        sig.link(head)
        head = sig
    return head


# A message header on what the sweeper re-sends: the message before it may have died with its
# worker without a trace, so the runner counts this delivery before running the step
# (sagas.runner.Counting). Only the re-sent step's own message carries it, not the steps linked
# after it. A header, not an argument, so a worker of the previous release still accepts it.
REDRIVE_HEADER = "sagas_redrive"


def send_forward(saga_id: UUID, definition: Saga, *, from_position: int, redrive: bool = False) -> None:
    steps = definition.steps[from_position:]
    sigs = [step_signature(saga_id, step, FORWARD) for step in steps]
    if redrive:
        _mark_redrive(sigs[0])
    send(linked(sigs), saga_id=saga_id)


def send_compensations(saga_id: UUID, definition: Saga, step_names: Sequence[str], *, direction: str, redrive: bool = False) -> None:
    """Send the compensations of `step_names`, given newest first."""
    sigs = [step_signature(saga_id, definition.step(name), direction) for name in step_names]
    if definition.compensate_in_parallel:
        for sig in sigs:
            if redrive:
                _mark_redrive(sig)
            send(sig, saga_id=saga_id)
    else:
        if redrive:
            _mark_redrive(sigs[0])
        send(linked(sigs), saga_id=saga_id)


def _mark_redrive(sig: Signature) -> None:
    sig.set(headers={REDRIVE_HEADER: True})
