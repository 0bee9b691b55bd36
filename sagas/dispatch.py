"""Turning saga-log decisions into Celery messages.

Forward steps are joined with `link` (each message carries the rest of the saga as its callback),
and every step message carries a `link_error` to `sagas.step_failed`, a bind=True task: Celery
always sends such an errback through the broker with the failed task's id first (DESIGN.md rule
4), so the compensation trigger is itself a durable, acks-late message. Compensations run the
same way, newest first, or all at once when the definition asks for parallel compensation.

Signatures are built by task name, so this module does not import the task module.
"""

from __future__ import annotations

from collections.abc import Sequence
from uuid import UUID

from celery import Signature, signature

from sagas.definition import FORWARD, HARD_LIMIT_GRACE, Saga, Step


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


def send_forward(saga_id: UUID, definition: Saga, *, from_position: int) -> None:
    steps = definition.steps[from_position:]
    linked([step_signature(saga_id, step, FORWARD) for step in steps]).apply_async()


def send_compensations(saga_id: UUID, definition: Saga, step_names: Sequence[str], *, direction: str) -> None:
    """Send the compensations of `step_names`, given newest first."""
    sigs = [step_signature(saga_id, definition.step(name), direction) for name in step_names]
    if definition.compensate_in_parallel:
        for sig in sigs:
            sig.apply_async()
    else:
        linked(sigs).apply_async()
