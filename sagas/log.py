"""One structured log line per state transition, always carrying the saga id and step; and the
step context that every other line logged while a step runs carries (StepContextFilter)."""

from __future__ import annotations

import contextvars
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # not imported: logging is configured before Django's apps are loaded
    from sagas.models import SagaInstance

log = logging.getLogger("sagas")

# The step a task is running in this process: saga_id, step, direction (from the message), then
# saga_name, saga_version and delivery (once the saga log is read).
_step: contextvars.ContextVar[dict | None] = contextvars.ContextVar("sagas_step", default=None)
STEP_FIELDS = ("saga_id", "saga_name", "saga_version", "step", "direction", "delivery")


def step_context_begin(**fields) -> None:
    _step.set({name: value for name, value in fields.items() if value is not None})


def step_context_add(**fields) -> None:
    current = _step.get()
    if current is not None:
        current.update({name: value for name, value in fields.items() if value is not None})


def step_context_end() -> None:
    _step.set(None)


class StepContextFilter(logging.Filter):
    """Puts the running step's fields on each record (for a structured formatter to show), unless
    the record has its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = _step.get()
        if current:
            for name, value in current.items():
                if not hasattr(record, name):
                    setattr(record, name, value)
        return True


def transition(
    saga: SagaInstance,
    old: str,
    new: str,
    *,
    step: str = "-",
    direction: str = "-",
    detail: str = "",
) -> None:
    log.info(
        "saga_transition saga=%s name=%s v=%s step=%s direction=%s from=%s to=%s detail=%r",
        saga.id,
        saga.name,
        saga.version,
        step,
        direction,
        old,
        new,
        detail,
        extra={"saga_id": str(saga.id), "saga_name": saga.name, "saga_version": saga.version, "step": step, "direction": direction, "state": new},
    )
